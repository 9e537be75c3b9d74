"""I/O benchmark: 4 KiB random reads and writes through the full emulated path, against a raw baseline.

Full path, per I/O: host driver builds the SQE in guest memory -> SQ tail doorbell (BAR0) ->
controller engine thread fetches it by DMA -> Read/Write handler -> `os.preadv`/`os.pwritev`
between the namespace file and the DMA-mapped guest buffer -> CQE by DMA -> MSI-X -> the
driver's interrupt handler -> reap -> completion callback. At QD32 the driver keeps 32 commands
in flight: it submits a batch with `ring=False`, rings the doorbell once, and reaps on interrupt.

Raw baseline: the same offsets (same sequence, same order), the same 4 KiB buffers in guest
memory, on the same namespace file, with `os.preadv`/`os.pwritev` called directly.

* QD1 raw: a single-threaded loop, one call after the other.
* QD32 raw: a page-cache `preadv` completes synchronously, so "32 in flight" has no direct
  equivalent. Two baselines are measured and the higher is reported as `raw_iops`:
  - `raw_iops_1t`: the same single-threaded loop (rotating over 32 buffers); on a page-cache
    file this is the throughput ceiling of one core;
  - `raw_iops_32t`: 32 threads, each looping over its share of the offsets with its own
    buffer (what an application would do to keep 32 I/Os outstanding with synchronous calls).
  `raw_mode` says which one won. Reporting the higher makes the ratio the pessimistic one.

Both sides time every I/O with `perf_counter_ns` (the raw latency is the call's duration; the
full-path latency is submit to completion callback), so the timing overhead is on both sides.
The file is prefilled through the driver first, so reads hit real, cached data.
"""

from __future__ import annotations

import os
import platform
import sys
import threading
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import numpy as np

from nvme_lm.cli.demo import SingleHost
from nvme_lm.host import commands as cmd
from nvme_lm.host.driver import IoQueue
from nvme_lm.host.qpair import Completion
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.opcodes import IoOpcode
from nvme_lm.vm.latency import LatencyRecorder

BLOCK = 4096
CASES: tuple[tuple[str, bool, int], ...] = (
    ("randread-qd1", False, 1),
    ("randread-qd32", False, 32),
    ("randwrite-qd1", True, 1),
    ("randwrite-qd32", True, 32),
)
_N_OFFSETS = 1 << 18
_PREFILL_CHUNK = 256 << 10
BASELINE_DOC = (
    "raw = os.preadv/os.pwritev on the same namespace file, same offsets, same 4 KiB guest-memory buffers. "
    "QD1: single-threaded loop. QD32: max of a single-threaded loop (page-cache I/O completes synchronously) "
    "and a pool of 32 threads each looping on its own buffer; raw_mode says which won."
)

Progress = Callable[[str], None]


# ------------------------------------------------------------------------------------- full path
def drive(q: IoQueue, nsid: int, lba_size: int, bufs: list[int], offsets: list[int], qd: int, write: bool,
          seconds: float, timeout: float = 10.0) -> tuple[int, float, LatencyRecorder, int]:
    """Keeps `qd` 4 KiB commands in flight on `q` for `seconds`; returns (ios, elapsed s, latencies, errors).

    Per-slot SQEs and callbacks are built once, so a command costs one SQE field update, one
    `IoQueue.submit` and, per batch, one doorbell write.
    """
    qp = q.qp
    submit = q.submit
    nlb = BLOCK // lba_size
    opcode = int(IoOpcode.WRITE if write else IoOpcode.READ)
    sqes = [SQE(opcode=opcode, nsid=nsid, cdw12=nlb - 1) for _ in range(qd)]
    start = [0] * qd
    free = list(range(qd))
    lat = LatencyRecorder()
    record = lat.record
    clock = time.perf_counter_ns
    errors = 0

    def done(slot: int, comp: Completion) -> None:
        nonlocal errors
        record(clock() - start[slot])
        if comp.status & 0x7FF:
            errors += 1
        free.append(slot)

    callbacks = [partial(done, s) for s in range(qd)]
    n = len(offsets)
    i = 0
    ios = 0
    t0 = clock()
    end = t0 + int(seconds * 1e9)
    while clock() < end:
        while free:
            s = free.pop()
            lba = offsets[i] * nlb
            i += 1
            if i == n:
                i = 0
            sqe = sqes[s]
            sqe.cdw10 = lba & 0xFFFFFFFF
            sqe.cdw11 = lba >> 32
            start[s] = clock()
            submit(sqe, bufs[s], BLOCK, callbacks[s], ring=False)
            ios += 1
        qp.ring()
        qp.wait_any(timeout)
    while len(free) < qd:
        qp.wait_any(timeout)
    return ios, (clock() - t0) / 1e9, lat, errors


# ------------------------------------------------------------------------------------- raw baseline
def raw_loop(fd: int, views: list[memoryview], offsets: list[int], write: bool,
             seconds: float) -> tuple[int, float, LatencyRecorder]:
    """Single-threaded `preadv`/`pwritev` over `offsets` (block numbers), rotating over `views`."""
    op = os.pwritev if write else os.preadv
    iovs = [[v] for v in views]
    nbuf = len(iovs)
    lat = LatencyRecorder()
    record = lat.record
    clock = time.perf_counter_ns
    n = len(offsets)
    i = 0
    ios = 0
    t0 = clock()
    end = t0 + int(seconds * 1e9)
    while clock() < end:
        for _ in range(64):
            t = clock()
            op(fd, iovs[ios % nbuf], offsets[i] * BLOCK)
            record(clock() - t)
            ios += 1
            i += 1
            if i == n:
                i = 0
    return ios, (clock() - t0) / 1e9, lat


def raw_threads(fd: int, views: list[memoryview], offsets: list[int], write: bool,
                seconds: float) -> tuple[int, float]:
    """`len(views)` threads, each looping over its share of `offsets` with its own buffer."""
    nthreads = len(views)
    counts = [0] * nthreads
    barrier = threading.Barrier(nthreads + 1)
    stop = threading.Event()
    op = os.pwritev if write else os.preadv

    def worker(k: int) -> None:
        iov = [views[k]]
        mine = offsets[k::nthreads]
        m = len(mine)
        j = 0
        c = 0
        barrier.wait()
        while not stop.is_set():
            for _ in range(64):
                op(fd, iov, mine[j] * BLOCK)
                j += 1
                if j == m:
                    j = 0
            c += 64
        counts[k] = c

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(nthreads)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    return sum(counts), time.perf_counter() - t0


# ------------------------------------------------------------------------------------- the benchmark
def _round(x: float, nd: int = 2) -> float:
    return round(float(x), nd)


def run_io_bench(*, seconds: float = 2.0, size_mib: int = 64, lba_size: int = 4096,
                 data_dir: str | None = None, seed: int = 1, progress: Progress | None = None) -> dict[str, Any]:
    """Runs the four cases; returns `{"cases": [...], "meta": {...}}`."""
    say = progress or (lambda _msg: None)
    size = size_mib << 20
    nblocks = size // BLOCK
    rng = np.random.default_rng(seed)
    offsets = rng.integers(0, nblocks, _N_OFFSETS).tolist()  # block numbers, shared by both sides
    cases: list[dict[str, Any]] = []
    with SingleHost(data_dir, mem_size=max(64 << 20, 4 * _PREFILL_CHUNK)) as host:
        nsid = host.create_namespace(size, lba_size)
        q = host.io_queue(depth=256)
        bufs = [host.mem.alloc(BLOCK) for _ in range(32)]
        views = [host.mem.view(a, BLOCK) for a in bufs]
        for v in views:
            v[:] = rng.integers(0, 256, BLOCK, dtype=np.uint8).tobytes()

        say(f"prefilling {size_mib} MiB through the driver")
        chunk = host.mem.alloc(_PREFILL_CHUNK)
        host.mem.view(chunk, _PREFILL_CHUNK)[:] = rng.integers(0, 256, _PREFILL_CHUNK, dtype=np.uint8).tobytes()
        per = _PREFILL_CHUNK // lba_size
        for slba in range(0, size // lba_size, per):
            sqe = cmd.write(nsid, slba, min(per, size // lba_size - slba))
            done: list[Completion] = []
            q.submit(sqe, chunk, min(_PREFILL_CHUNK, size - slba * lba_size), done.append)
            while not done:
                q.qp.wait_any(10.0)
            if not done[0].ok:
                raise RuntimeError(f"prefill write at LBA {slba} failed: {done[0].st}")
        host.mem.free(chunk)

        fd = os.open(host.namespace_file(nsid), os.O_RDWR)
        try:
            for name, write, qd in CASES:
                say(f"{name}: warm-up")
                drive(q, nsid, lba_size, bufs, offsets, qd, write, min(0.1, seconds))
                say(f"{name}: full path, {seconds:g} s")
                ios, elapsed, lat, errors = drive(q, nsid, lba_size, bufs, offsets, qd, write, seconds)
                iops = ios / elapsed
                say(f"{name}: raw baseline, single thread")
                r_ios, r_elapsed, r_lat = raw_loop(fd, views[:qd], offsets, write, seconds)
                raw_1t = r_ios / r_elapsed
                case: dict[str, Any] = {"name": name, "op": "write" if write else "read", "qd": qd,
                                        "block_size": BLOCK}
                raw_32t = None
                if qd > 1:
                    say(f"{name}: raw baseline, {qd} threads")
                    t_ios, t_elapsed = raw_threads(fd, views[:qd], offsets, write, seconds)
                    raw_32t = t_ios / t_elapsed
                raw_iops = max(raw_1t, raw_32t or 0.0)
                pl = lat.percentiles_us((50, 99))
                rl = r_lat.percentiles_us((50, 99))
                case.update(
                    iops=_round(iops, 1), raw_iops=_round(raw_iops, 1), ratio=round(iops / raw_iops, 4),
                    p50_us=_round(pl["p50"]), p99_us=_round(pl["p99"]),
                    raw_p50_us=_round(rl["p50"]), raw_p99_us=_round(rl["p99"]),
                    raw_iops_1t=_round(raw_1t, 1),
                    raw_iops_32t=None if raw_32t is None else _round(raw_32t, 1),
                    raw_mode="1 thread" if raw_32t is None or raw_1t >= raw_32t else f"{qd} threads",
                    ios=ios, errors=errors, seconds=_round(elapsed, 3),
                )
                cases.append(case)
        finally:
            os.close(fd)
    meta = {
        "baseline": BASELINE_DOC,
        "size_mib": size_mib, "lba_size": lba_size, "seconds_per_case": seconds,
        "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
    }
    return {"cases": cases, "meta": meta}


def render(result: dict[str, Any], console: Any) -> None:
    """The cases as a rich table (console is a `rich.console.Console`)."""
    from rich import box
    from rich.table import Table

    t = Table(title="4 KiB random I/O: full emulated path vs raw preadv/pwritev", title_justify="left",
              box=box.SIMPLE_HEAD)
    cols = ("case", "IOPS", "raw IOPS", "ratio", "p50 µs", "p99 µs", "raw p50", "raw p99", "raw")
    for col in cols:
        t.add_column(col, justify="left" if col in ("case", "raw") else "right")
    for c in result["cases"]:
        mode = "1t" if c["raw_mode"] == "1 thread" else c["raw_mode"].replace(" threads", "t")
        t.add_row(c["name"], f"{c['iops']:,.0f}", f"{c['raw_iops']:,.0f}", f"{c['ratio']:.3f}",
                  f"{c['p50_us']:,.0f}", f"{c['p99_us']:,.0f}", f"{c['raw_p50_us']:.1f}", f"{c['raw_p99_us']:.1f}",
                  mode)
    console.print(t)
    console.print(f"[dim]{result['meta']['baseline']} (raw: 1t = single thread, 32t = 32 threads)[/dim]")


__all__ = ["BASELINE_DOC", "CASES", "drive", "raw_loop", "raw_threads", "render", "run_io_bench"]
