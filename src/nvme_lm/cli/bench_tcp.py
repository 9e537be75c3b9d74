"""`nvme-lm bench tcp`: reads over NVMe/TCP on loopback with our Python initiator, against raw preadv.

Setup: the target is a separate process, `nvme-lm target serve` (run as `python -m nvme_lm.cli.main`
with this interpreter) listening on 127.0.0.1 port 0, its SSD in a temporary directory, namespace 1
of `--size-mib` MiB with 4 KiB LBAs; its `--ready-file` gives the port and the subsystem NQN. The
benchmark process is the host: `fabrics.initiator.HostController` over real TCP (admin queue, then
`--queues` I/O queues with SQ flow control disabled, as `nvme connect --disable-sqflow` asks, so a
successful read ends with its last C2HData and needs no CapsuleResp). The namespace is written
through the target first (128 KiB writes, R2T + H2CData), so reads hit real data in the page cache.

Cases (each: a short warm-up, then `--seconds` of closed-loop reads):

* `randread-4k-qd1`, `randread-4k-qd32`: 4 KiB reads at random 4 KiB-aligned offsets; the QD32
  commands are spread over the I/O queues (16 per queue with 2 queues).
* `seqread-128k-qd8`: 128 KiB reads in address order, wrapping at the end (`mib_s`).
* with `--digests` (the default) the QD32 and 128 KiB cases again on a second association whose
  queues negotiated header and data digests (CRC32C over every PDU header and every data payload).

Full path, per read: the initiator builds the capsule (SGL transport descriptor), writes it on the
queue's socket; the target process decodes it, runs the same Read handler as the PCIe controller
(`os.preadv` from the namespace file), sends the data as C2HData; the initiator decodes it, copies
the data into the slot's buffer and runs the completion callback, which starts the slot's next read.
PDUs produced while one received chunk is handled leave in one write, on both sides.

Raw baseline (same run, same offsets in the same order, buffers of the same size, the same
namespace file): `os.preadv` from this process, as `nvme-lm bench io` measures it (its `raw_loop`
and `raw_threads`): QD1 a single-threaded loop; QD > 1 the higher of a single-threaded loop and
QD threads each looping on its own buffer (`raw_mode` says which won). `ratio` = iops / raw_iops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import mmap
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from nvme_lm.cli.bench import raw_loop, raw_threads
from nvme_lm.fabrics.initiator import HostController, TcpQueue
from nvme_lm.spec.commands import CQE, SQE
from nvme_lm.spec.opcodes import IoOpcode
from nvme_lm.vm.latency import LatencyRecorder

KIB = 1 << 10
MIB = 1 << 20
LBA_SIZE = 4096
NSID = 1
HOSTNQN = "nqn.2014-08.org.nvmexpress:nvme-lm-bench-tcp"
QUEUE_ENTRIES = 128
RAW_UNIT = 4096  # `raw_loop` / `raw_threads` take offsets in 4 KiB blocks
_N_OFFSETS = 1 << 18
_PREFILL = 128 * KIB
_PREFILL_QD = 8
_READY_TIMEOUT = 60.0
_CASE_TIMEOUT = 30.0  # beyond `seconds`: a target that stops answering fails the run instead of hanging it

BASELINE_DOC = (
    "raw = os.preadv in the benchmark process on the target's namespace file, same offsets in the same order, "
    "buffers of the same size. QD1: a single-threaded loop. QD > 1: the higher of a single-threaded loop and QD "
    "threads each looping on its own buffer (raw_mode says which won)."
)


@dataclass(frozen=True)
class Case:
    name: str
    block: int
    qd: int
    sequential: bool
    digests: bool = False


def cases_for(digests: bool) -> list[Case]:
    base = [
        Case("randread-4k-qd1", 4 * KIB, 1, False),
        Case("randread-4k-qd32", 4 * KIB, 32, False),
        Case("seqread-128k-qd8", 128 * KIB, 8, True),
    ]
    if digests:
        base += [Case("randread-4k-qd32-digests", 4 * KIB, 32, False, True),
                 Case("seqread-128k-qd8-digests", 128 * KIB, 8, True, True)]
    return base


Progress = Callable[[str], None]


# ------------------------------------------------------------------------------------------ the target process
@dataclass
class TargetProcess:
    """A running `nvme-lm target serve`: where to connect and which file backs namespace 1."""

    proc: subprocess.Popen[bytes]
    host: str
    port: int
    subnqn: str
    namespace_file: Path
    log_file: Path
    startup_s: float


def _log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


@contextlib.contextmanager
def target_process(work: Path, *, size_mib: int, lba_size: int = LBA_SIZE,
                   ready_timeout: float = _READY_TIMEOUT) -> Iterator[TargetProcess]:
    """Starts `nvme-lm target serve` on 127.0.0.1 (a port the kernel picks) with its SSD under `work`,
    waits for its ready file, and stops it with SIGTERM (it flushes) when the block ends."""
    ready = work / "target-ready.json"
    log_file = work / "target.log"
    data_dir = work / "ssd"
    cmd = [sys.executable, "-m", "nvme_lm.cli.main", "target", "serve", "--listen", "127.0.0.1:0",
           "--data-dir", str(data_dir), "--size-mib", str(size_mib), "--lba-size", str(lba_size),
           "--ready-file", str(ready)]
    t0 = time.monotonic()
    with open(log_file, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    try:
        while not ready.exists():
            if proc.poll() is not None:
                raise RuntimeError(f"the target exited with status {proc.returncode} before it was ready:\n"
                                   f"{_log_tail(log_file)}")
            if time.monotonic() - t0 > ready_timeout:
                raise RuntimeError(f"the target was not ready within {ready_timeout:g} s:\n{_log_tail(log_file)}")
            time.sleep(0.02)
        info = json.loads(ready.read_text())
        port = info["ports"][0]
        ns_file = data_dir / f"ns{NSID}.img"
        if not ns_file.exists():
            raise RuntimeError(f"namespace file {ns_file} not found")
        yield TargetProcess(proc, port["host"], port["port"], info["subsystems"][0], ns_file, log_file,
                            time.monotonic() - t0)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# ------------------------------------------------------------------------------------------ full path
def _buffers(n: int, size: int) -> list[memoryview]:
    """Page-aligned buffers (anonymous mmap), one per slot, on both sides of the comparison."""
    return [memoryview(mmap.mmap(-1, size)) for _ in range(n)]


async def drive(queues: list[TcpQueue], nsid: int, lba_size: int, bufs: list[memoryview], offsets: list[int],
                qd: int, seconds: float) -> tuple[int, float, LatencyRecorder, int]:
    """Keeps `qd` reads of `len(bufs[0])` bytes in flight for `seconds`, slot s on queue s % len(queues);
    `offsets` are in units of the read size. Returns (ios, elapsed s, latencies, errors).

    Each slot has one SQE and one callback built once; a completion records its latency and starts the
    slot's next read from inside the receive callback, so a batch of completions becomes one write.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    block = len(bufs[0])
    nlb = block // lba_size
    starts = [q.start for q in queues]
    nq = len(queues)
    sqes = [SQE(opcode=IoOpcode.READ, nsid=nsid, cdw12=nlb - 1) for _ in range(qd)]
    t_start = [0] * qd
    lat = LatencyRecorder()
    record = lat.record
    clock = time.perf_counter_ns
    n = len(offsets)
    state = [0, 0, 0, qd]  # next offset index, ios, errors, slots still running
    end = 0

    def issue(s: int) -> None:
        i = state[0]
        state[0] = i + 1 if i + 1 < n else 0
        lba = offsets[i] * nlb
        sqe = sqes[s]
        sqe.cdw10 = lba & 0xFFFFFFFF
        sqe.cdw11 = lba >> 32
        t_start[s] = clock()
        starts[s % nq](sqe, callbacks[s], read_into=bufs[s])

    def completed(s: int, cqe: CQE | None) -> None:
        now = clock()
        if cqe is None:  # the connection ended
            if not done.done():
                err = queues[s % nq].error or ConnectionError("connection closed")
                done.set_exception(ConnectionError(f"queue {queues[s % nq].qid}: {err}"))
            return
        record(now - t_start[s])
        state[1] += 1
        if cqe.status & 0x7FF:
            state[2] += 1
        if now < end and not done.done():
            issue(s)
            return
        state[3] -= 1
        if not state[3] and not done.done():
            done.set_result(None)

    callbacks = [(lambda cqe, s=s: completed(s, cqe)) for s in range(qd)]
    t0 = clock()
    end = t0 + int(seconds * 1e9)
    for s in range(qd):
        issue(s)
    await asyncio.wait_for(done, seconds + _CASE_TIMEOUT)
    return state[1], (clock() - t0) / 1e9, lat, state[2]


async def prefill(queue: TcpQueue, nsid: int, lba_size: int, size: int, seed: int) -> float:
    """Writes the whole namespace (128 KiB writes, several in flight); returns the seconds it took."""
    import numpy as np

    data = memoryview(np.random.default_rng(seed).integers(0, 256, _PREFILL, dtype=np.uint8).tobytes())
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    nlb = _PREFILL // lba_size
    total = -(-size // _PREFILL)
    state = [0, 0]  # next chunk, chunks completed

    def issue() -> None:
        k = state[0]
        state[0] += 1
        slba = k * nlb
        n = min(nlb, size // lba_size - slba)
        sqe = SQE(opcode=IoOpcode.WRITE, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=n - 1)
        queue.start(sqe, completed, data=data[: n * lba_size])

    def completed(cqe: CQE | None) -> None:
        if done.done():
            return
        if cqe is None or not cqe.ok:
            why = cqe.st if cqe is not None else queue.error
            done.set_exception(RuntimeError(f"prefill write failed: {why}"))
            return
        state[1] += 1
        if state[1] == total:
            done.set_result(None)
        elif state[0] < total:
            issue()

    t0 = time.perf_counter()
    for _ in range(min(_PREFILL_QD, total)):
        issue()
    await asyncio.wait_for(done, _CASE_TIMEOUT + size / MIB)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------------------------ the benchmark
def _round(x: float, nd: int = 2) -> float:
    return round(float(x), nd)


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process from /proc (None where there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": state is field 3, utime 14, stime 15
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def case_result(case: Case, *, queues: int, ios: int, elapsed: float, errors: int, lat: LatencyRecorder,
                raw_1t: float, raw_nt: float | None, raw_lat: LatencyRecorder, target_cpu_s: float | None = None,
                host_cpu_s: float | None = None) -> dict[str, Any]:
    """One case's figures: IOPS and MiB/s of both sides, `ratio` = iops / raw_iops (the higher raw mode), and
    the CPU each process spent per read (what bounds the IOPS on a busy machine, and far steadier than them)."""
    iops = _round(ios / elapsed if elapsed > 0 else 0.0, 1)
    raw_iops = _round(max(raw_1t, raw_nt or 0.0), 1)  # the ratio is of the figures reported, exactly
    pl = lat.percentiles_us((50, 99))
    rl = raw_lat.percentiles_us((50, 99))
    per_mib = case.block / MIB
    return {
        "name": case.name, "op": "read", "pattern": "sequential" if case.sequential else "random",
        "block_size": case.block, "qd": case.qd, "queues": min(queues, case.qd), "digests": case.digests,
        "iops": iops, "mib_s": _round(iops * per_mib, 2),
        "raw_iops": raw_iops, "raw_mib_s": _round(raw_iops * per_mib, 2),
        "ratio": round(iops / raw_iops, 4) if raw_iops else None,
        "p50_us": _round(pl["p50"]), "p99_us": _round(pl["p99"]),
        "raw_p50_us": _round(rl["p50"]), "raw_p99_us": _round(rl["p99"]),
        "raw_iops_1t": _round(raw_1t, 1),
        "raw_iops_nt": None if raw_nt is None else _round(raw_nt, 1),
        "raw_mode": "1 thread" if raw_nt is None or raw_1t >= raw_nt else f"{case.qd} threads",
        "ios": ios, "errors": errors, "seconds": _round(elapsed, 3),
        "target_cpu_us": None if target_cpu_s is None or not ios else _round(target_cpu_s / ios * 1e6, 1),
        "host_cpu_us": None if host_cpu_s is None or not ios else _round(host_cpu_s / ios * 1e6, 1),
        "target_cpu_pct": None if target_cpu_s is None or elapsed <= 0 else _round(100 * target_cpu_s / elapsed, 1),
    }


def headline(cases: list[dict[str, Any]]) -> dict[str, Any]:
    """The top-level figures: `iops`/`raw_iops`/`ratio` of 4 KiB random reads at QD32, `mib_s` of the
    128 KiB sequential reads, the QD1 figures, and what digests cost (digest-on / digest-off)."""
    by = {c["name"]: c for c in cases}
    q32, q1, seq = by["randread-4k-qd32"], by["randread-4k-qd1"], by["seqread-128k-qd8"]
    out: dict[str, Any] = {
        "iops": q32["iops"], "raw_iops": q32["raw_iops"], "ratio": q32["ratio"],
        "iops_qd1": q1["iops"], "raw_iops_qd1": q1["raw_iops"], "ratio_qd1": q1["ratio"],
        "mib_s": seq["mib_s"], "raw_mib_s": seq["raw_mib_s"], "mib_s_ratio": seq["ratio"],
        "digests": None,
    }
    d32, dseq = by.get("randread-4k-qd32-digests"), by.get("seqread-128k-qd8-digests")
    if d32 is not None and dseq is not None:
        out["digests"] = {
            "iops": d32["iops"], "mib_s": dseq["mib_s"],
            "iops_kept": round(d32["iops"] / q32["iops"], 4) if q32["iops"] else None,
            "mib_s_kept": round(dseq["mib_s"] / seq["mib_s"], 4) if seq["mib_s"] else None,
        }
    return out


async def _measure(tgt: TargetProcess, cases: list[Case], *, seconds: float, size: int, queues: int, seed: int,
                   say: Progress, meta: dict[str, Any]) -> list[dict[str, Any]]:
    import numpy as np

    rng = np.random.default_rng(seed)
    offsets: dict[int, list[int]] = {}
    for c in cases:  # per block size: random or sequential block numbers, the same list on both sides
        nblocks = size // c.block
        offsets.setdefault(c.block, list(range(nblocks)) if c.sequential
                           else rng.integers(0, nblocks, _N_OFFSETS).tolist())
    ctrls: dict[bool, HostController] = {}
    results: list[dict[str, Any]] = []
    fd = os.open(tgt.namespace_file, os.O_RDONLY)
    try:
        for c in cases:
            ctrl = ctrls.get(c.digests)
            if ctrl is None:
                say(f"connecting {queues} I/O queue(s){' with header and data digests' if c.digests else ''}")
                ctrl = ctrls[c.digests] = await HostController.connect(
                    tgt.host, tgt.port, tgt.subnqn, HOSTNQN, io_queues=queues, io_entries=QUEUE_ENTRIES,
                    hdgst=c.digests, ddgst=c.digests, disable_sqflow=True)
                if "prefill_s" not in meta:
                    say(f"prefilling {size // MIB} MiB through the target (128 KiB writes)")
                    secs = await prefill(ctrl.io[0], NSID, LBA_SIZE, size, seed)
                    meta["prefill_s"] = _round(secs, 3)
                    meta["prefill_mib_s"] = _round(size / MIB / secs, 1)
            qs = ctrl.io[: min(queues, c.qd)]
            bufs = _buffers(c.qd, c.block)
            offs = offsets[c.block]
            say(f"{c.name}: warm-up")
            await drive(qs, NSID, LBA_SIZE, bufs, offs, c.qd, min(0.1, seconds))
            say(f"{c.name}: over NVMe/TCP, {seconds:g} s")
            pid = tgt.proc.pid
            t_cpu, h_cpu = process_cpu_seconds(pid), time.process_time()
            ios, elapsed, lat, errors = await drive(qs, NSID, LBA_SIZE, bufs, offs, c.qd, seconds)
            h_cpu = time.process_time() - h_cpu
            t_end = process_cpu_seconds(pid)
            t_cpu = None if t_cpu is None or t_end is None else t_end - t_cpu
            raw_offs = [o * (c.block // RAW_UNIT) for o in offs]
            say(f"{c.name}: raw preadv, 1 thread")
            r_ios, r_elapsed, r_lat = raw_loop(fd, bufs, raw_offs, False, seconds)
            raw_nt = None
            if c.qd > 1:
                say(f"{c.name}: raw preadv, {c.qd} threads")
                t_ios, t_elapsed = raw_threads(fd, bufs, raw_offs, False, seconds)
                raw_nt = t_ios / t_elapsed
            results.append(case_result(c, queues=queues, ios=ios, elapsed=elapsed, errors=errors, lat=lat,
                                       raw_1t=r_ios / r_elapsed, raw_nt=raw_nt, raw_lat=r_lat, target_cpu_s=t_cpu,
                                       host_cpu_s=h_cpu))
    finally:
        os.close(fd)
        for ctrl in ctrls.values():
            await ctrl.close()
    return results


@contextlib.contextmanager
def pinned(cpu: int | None) -> Iterator[None]:
    """This process (and the target it starts: affinity is inherited) on one CPU, for the block."""
    if cpu is None:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {cpu})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run_tcp_bench(*, seconds: float = 2.0, size_mib: int = 64, queues: int = 2, digests: bool = True,
                  data_dir: str | None = None, seed: int = 1, quick: bool = False, pin_cpu: int | None = None,
                  progress: Progress | None = None) -> dict[str, Any]:
    """Starts the target process, runs the cases, stops it; returns the headline figures, `cases` and `meta`.
    `pin_cpu` runs both processes (and the raw baseline) on that one CPU."""
    say = progress or (lambda _msg: None)
    cases = cases_for(digests)
    size = size_mib * MIB
    load_start = os.getloadavg()
    meta: dict[str, Any] = {}
    with contextlib.ExitStack() as stack:
        stack.enter_context(pinned(pin_cpu))
        if data_dir is None:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="nvme-lm-bench-tcp-")))
        else:
            work = Path(data_dir)
            work.mkdir(parents=True, exist_ok=True)
        say("starting the target process (nvme-lm target serve)")
        tgt = stack.enter_context(target_process(work, size_mib=size_mib))
        results = asyncio.run(_measure(tgt, cases, seconds=seconds, size=size, queues=queues, seed=seed, say=say,
                                       meta=meta))
        say("stopping the target")
        target_pid, startup = tgt.proc.pid, tgt.startup_s
    result = headline(results)
    result["cases"] = results
    result["meta"] = {
        "baseline": BASELINE_DOC,
        "quick": quick, "seconds_per_case": seconds, "size_mib": size_mib, "lba_size": LBA_SIZE,
        "io_queues": queues, "queue_entries": QUEUE_ENTRIES, "sq_flow_control": False, "pinned_cpu": pin_cpu,
        "transport": "NVMe/TCP over 127.0.0.1, target in its own process (nvme-lm target serve)",
        "target_pid": target_pid, "target_exit": tgt.proc.returncode, "target_startup_s": _round(startup, 3),
        **meta,
        "loadavg_start": [round(x, 2) for x in load_start],
        "loadavg_end": [round(x, 2) for x in os.getloadavg()],
        "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
    }
    return result


# ------------------------------------------------------------------------------------------ output
def render(result: dict[str, Any], console: Any) -> None:
    """The cases as a rich table and the headline with its baseline and ratio."""
    from rich import box
    from rich.table import Table

    m = result["meta"]
    pin = f", both on CPU {m['pinned_cpu']}" if m.get("pinned_cpu") is not None else ""
    t = Table(title=f"Reads over NVMe/TCP (127.0.0.1, target process, {m['io_queues']} I/O queue(s){pin}) vs raw "
                    "preadv" + (" (--quick)" if m["quick"] else ""), title_justify="left", box=box.SIMPLE_HEAD)
    cols = ("case", "IOPS", "MiB/s", "raw IOPS", "ratio", "p50 µs", "p99 µs", "raw p50", "raw", "target CPU",
            "host CPU")
    for col in cols:
        t.add_column(col, justify="left" if col in ("case", "raw") else "right")

    def cpu(v: float | None) -> str:
        return "-" if v is None else f"{v:,.0f} µs"

    for c in result["cases"]:
        mode = "1t" if c["raw_mode"] == "1 thread" else c["raw_mode"].replace(" threads", "t")
        t.add_row(c["name"], f"{c['iops']:,.0f}", f"{c['mib_s']:,.1f}", f"{c['raw_iops']:,.0f}", f"{c['ratio']:.3f}",
                  f"{c['p50_us']:,.0f}", f"{c['p99_us']:,.0f}", f"{c['raw_p50_us']:.1f}", mode,
                  cpu(c.get("target_cpu_us")), cpu(c.get("host_cpu_us")))
    console.print(t)
    r = result
    console.print(f"4 KiB random read QD32: [bold]{r['iops']:,.0f}[/bold] IOPS vs raw {r['raw_iops']:,.0f} "
                  f"(ratio [bold]{r['ratio']:.3f}[/bold]); QD1: {r['iops_qd1']:,.0f} vs {r['raw_iops_qd1']:,.0f} "
                  f"(ratio {r['ratio_qd1']:.3f})")
    console.print(f"128 KiB sequential read: [bold]{r['mib_s']:,.1f}[/bold] MiB/s vs raw {r['raw_mib_s']:,.1f} "
                  f"(ratio [bold]{r['mib_s_ratio']:.3f}[/bold])")
    d = r["digests"]
    if d is not None:
        console.print(f"header + data digests (CRC32C): {d['iops']:,.0f} IOPS at QD32 ({d['iops_kept']:.2f} of "
                      f"without), {d['mib_s']:,.1f} MiB/s sequential ({d['mib_s_kept']:.2f} of without)")
    load = f"load average {m['loadavg_start'][0]:.2f} -> {m['loadavg_end'][0]:.2f} on {m['cpus']} CPUs"
    console.print("[dim]target CPU / host CPU: CPU time (user + system) each process spent per read while the case "
                  "ran.[/dim]")
    console.print(f"[dim]{m['baseline']} Prefill: {m.get('prefill_mib_s', 0):,.1f} MiB/s of 128 KiB writes. "
                  f"{load}.[/dim]")


@click.command("tcp")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON (progress goes to stderr).")
@click.option("--quick", is_flag=True, help="A short run: 0.5 s per measurement, a 16 MiB namespace.")
@click.option("--seconds", type=click.FloatRange(0.05), default=None,
              help="Duration of each measurement [default: 2, or 0.5 with --quick].")
@click.option("--size-mib", type=click.IntRange(1), default=None,
              help="Namespace (file) size [default: 64, or 16 with --quick].")
@click.option("--queues", type=click.IntRange(1, 32), default=2, show_default=True,
              help="I/O queues (TCP connections) the QD32 commands are spread over.")
@click.option("--digests/--no-digests", default=True, show_default=True,
              help="Also measure with header and data digests (CRC32C) negotiated.")
@click.option("--pin-cpu", type=click.IntRange(0), default=None, metavar="CPU",
              help="Run the target, the host and the raw baseline on this one CPU (no cross-CPU wake-ups).")
@click.option("--data-dir", type=click.Path(file_okay=False), default=None,
              help="Keep the target's SSD and log here (default: a temporary directory, removed).")
def tcp_command(as_json: bool, quick: bool, seconds: float | None, size_mib: int | None, queues: int, digests: bool,
                pin_cpu: int | None, data_dir: str | None) -> None:
    """4 KiB random reads at QD1/QD32 and 128 KiB sequential reads over NVMe/TCP (target in its own
    process, our Python initiator), against raw preadv on the same namespace file."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    seconds = seconds if seconds is not None else (0.5 if quick else 2.0)
    size_mib = size_mib if size_mib is not None else (16 if quick else 64)
    console = Console(stderr=as_json)
    if not console.is_terminal:
        console = Console(stderr=as_json, width=max(console.width, 140))  # piped or `make bench`: whole tables
    # start, connect (x2 with digests), prefill, per case warm-up/measure/raw (+ raw threads), stop
    steps = 3 + (2 if digests else 1) + sum(4 if c.qd > 1 else 3 for c in cases_for(digests))
    with Progress(TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn(), console=console,
                  transient=True) as bar:
        task = bar.add_task("bench tcp", total=steps)

        def say(msg: str) -> None:
            bar.update(task, description=msg, advance=1)

        try:
            result = run_tcp_bench(seconds=seconds, size_mib=size_mib, queues=queues, digests=digests,
                                   data_dir=data_dir, quick=quick, pin_cpu=pin_cpu, progress=say)
        except (RuntimeError, ConnectionError, TimeoutError, OSError) as e:
            raise click.ClickException(str(e)) from None
    if as_json:
        click.echo(json.dumps(result, indent=2))
    else:
        render(result, console)
    if any(c["errors"] for c in result["cases"]):
        raise SystemExit(1)


__all__ = ["BASELINE_DOC", "Case", "TargetProcess", "case_result", "cases_for", "drive", "headline", "pinned",
           "prefill", "process_cpu_seconds", "render", "run_tcp_bench", "target_process", "tcp_command"]
