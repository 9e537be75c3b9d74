"""Noisy-neighbour benchmark (issue 3): a paced victim VF beside a QD32 aggressor VF on one vendor-a SSD,
with the aggressor unlimited and under a hard rate limit (TP4176).

A thin entry point for `make bench`; the benchmark itself lives in `nvme_lm.cli.bench_noisy` and is also
`nvme-lm bench noisy`. Usage: `python benchmarks/noisy_neighbor.py [--json] [--seconds S] [--limit-iops N]`.
"""

from __future__ import annotations

from nvme_lm.cli.bench_noisy import noisy_command

if __name__ == "__main__":
    noisy_command(prog_name="benchmarks/noisy_neighbor.py")
