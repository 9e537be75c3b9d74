"""Live-migration benchmark (issue 6): pre-copy vs a sparse kernel copy, bytes moved, blackout percentiles over
ping-pong legs, a 1 TiB namespace, and a guest writing twice the link with each convergence policy.

A thin entry point for `make bench`; the benchmark itself lives in `nvme_lm.cli.bench_migrate` and is also
`nvme-lm bench migrate`. Usage: `python benchmarks/migrate.py [--json] [--quick] [--reports DIR]`.
"""

from __future__ import annotations

from nvme_lm.cli.bench_migrate import migrate_command

if __name__ == "__main__":
    migrate_command(prog_name="benchmarks/migrate.py")
