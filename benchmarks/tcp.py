"""NVMe/TCP read benchmark (issue 7): 4 KiB random reads at QD1/QD32 and 128 KiB sequential reads over
loopback, our Python initiator against `nvme-lm target serve` in its own process, vs raw preadv.

A thin entry point for `make bench`; the benchmark itself lives in `nvme_lm.cli.bench_tcp` and is also
`nvme-lm bench tcp`. Usage: `python benchmarks/tcp.py [--json] [--quick] [--seconds S] [--queues N]`.
"""

from __future__ import annotations

from nvme_lm.cli.bench_tcp import tcp_command

if __name__ == "__main__":
    tcp_command(prog_name="benchmarks/tcp.py")
