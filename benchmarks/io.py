"""4 KiB random I/O benchmark (issue 2): full emulated path vs raw preadv/pwritev.

A thin entry point for `make bench`; the benchmark itself lives in `nvme_lm.cli.bench` and is
also `nvme-lm bench io`. Usage: `python benchmarks/io.py [--json] [--seconds S] [--size-mib N]`.
"""

from __future__ import annotations

from nvme_lm.cli.main import bench_io

if __name__ == "__main__":
    bench_io(prog_name="benchmarks/io.py")
