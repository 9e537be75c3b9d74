"""Get LBA Status benchmark (issue 4, TP4165): allocated ranges of a 4 TiB sparse namespace vs SEEK_DATA/SEEK_HOLE.

A thin entry point for `make bench`; the benchmark itself lives in `nvme_lm.cli.bench_lba` and is
also `nvme-lm bench lba-status`. Usage: `python benchmarks/lba_status.py [--json] [--capacity-gib N] [--extents N]`.
"""

from __future__ import annotations

from nvme_lm.cli.bench_lba import lba_status_command

if __name__ == "__main__":
    lba_status_command(prog_name="benchmarks/lba_status.py")
