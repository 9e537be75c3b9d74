"""Noisy-neighbour benchmark: two VMs' VFs on one SSD, and what a hard rate limit (TP4176) buys the quiet one.

Rig: one emulated SSD (default model vendor-a, with its latency/bandwidth model), the hypervisor's driver on
the PF, two VFs brought up by the PF (Virtualization Management, VF FLR, Online), each with its own guest
memory, driver, namespace (64 MiB, 4 KiB LBAs, 16 MiB of it prefilled) and one I/O queue.

* victim: 4 KiB random reads, paced at a fixed rate (`victim_iops`, default 3000) with at most `victim_qd`
  (4) in flight. Requests arrive on schedule; one that finds all slots busy waits for a slot (it is not
  dropped), so the victim reaches its target whenever the device gives it enough service. Latency is
  submission to completion.
* aggressor: 4 KiB random reads, closed loop at QD32, as fast as the device lets it.

Phases, each `seconds` long: victim alone; victim with the aggressor unlimited; victim with the aggressor
under a hard limit (`limit_iops`, Set Features 28h on the PF naming the aggressor's CNTLID). The limit
accuracy is the aggressor's measured IOPS over the configured limit. Goal (issue 3): under the limit the
victim keeps at least 90% of its solo IOPS; `goal_met` reports whether it did on this run.

Everything runs in one Python process: the two guests' loops, the two controllers' engine threads and
the media timer share the interpreter, so the aggressor competes with the victim for CPU as well as for
the device. That is the noise a rate limit at command fetch removes, which makes the comparison fair.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import click
import numpy as np

from nvme_lm.cli.bench import drive
from nvme_lm.cli.demo import lba_format_index
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.host import commands as cmd
from nvme_lm.host import rate_limit as hrl
from nvme_lm.host import virtualization as hv
from nvme_lm.host.driver import IoQueue, NvmeDriver
from nvme_lm.host.qpair import Completion
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.identify import CNS, IdentifyNamespace, encode_ctrl_list
from nvme_lm.spec.opcodes import IoOpcode
from nvme_lm.vm.latency import LatencyRecorder
from nvme_lm.vm.memory import GuestMemory

BLOCK = 4096
NS_BYTES = 64 << 20
REGION_BYTES = 16 << 20  # prefilled and used by the random reads
PREFILL_CHUNK = 128 << 10
AGGRESSOR_QD = 32
WARMUP_S = 0.25  # the aggressor runs this long before the victim's measurement starts
GOAL = 0.90
KEYS = ("victim_solo_iops", "victim_vs_unlimited_iops", "victim_vs_limited_iops", "limit_accuracy",
        "victim_solo_p99_us", "victim_vs_unlimited_p99_us", "victim_vs_limited_p99_us")

Progress = Callable[[str], None]


class _Vm:
    """One VF as its VM sees it: guest memory, its own driver, one namespace, one I/O queue."""

    def __init__(self, dev: EmulatedSsd, pf: NvmeDriver, vfn: int, rng: np.random.Generator) -> None:
        entry = hv.bring_up_vf(pf, vfn, nvq=2, nvi=2)
        self.cntlid = entry.scid
        index = lba_format_index(pf.identify(CNS.NS, nsid=0xFFFFFFFF), BLOCK)
        if index is None:
            raise RuntimeError(f"model {dev.model.name} has no {BLOCK}-byte LBA format")
        nsze = NS_BYTES // BLOCK
        comp, _ = pf.admin(cmd.ns_create(), data=IdentifyNamespace(nsze=nsze, ncap=nsze, flbas=index).encode())
        self.nsid = comp.dw0
        pf.admin(cmd.ns_attach(self.nsid), data=encode_ctrl_list([self.cntlid]))
        self.mem = GuestMemory(16 << 20, base=0x1000_0000 * vfn)
        fn = dev.vf(vfn)
        fn.iommu.map(self.mem.base, self.mem.buf)
        self.driver = NvmeDriver(fn, self.mem, timeout=10.0)
        self.driver.start()
        self.driver.set_number_of_queues(1, 1)
        self.q = self.driver.create_io_queue(1, 256, vector=1)
        self.bufs = [self.mem.alloc(BLOCK) for _ in range(AGGRESSOR_QD)]
        self.offsets = rng.integers(0, REGION_BYTES // BLOCK, 1 << 16).tolist()
        self._prefill(rng)

    def _prefill(self, rng: np.random.Generator) -> None:
        chunk = self.mem.alloc(PREFILL_CHUNK)
        self.mem.view(chunk, PREFILL_CHUNK)[:] = rng.integers(0, 256, PREFILL_CHUNK, dtype=np.uint8).tobytes()
        per = PREFILL_CHUNK // BLOCK
        for slba in range(0, REGION_BYTES // BLOCK, per):
            done: list[Completion] = []
            self.q.submit(cmd.write(self.nsid, slba, per), chunk, PREFILL_CHUNK, done.append)
            while not done:
                self.q.qp.wait_any(10.0)
            if not done[0].ok:
                raise RuntimeError(f"prefill write at LBA {slba} failed: {done[0].st}")
        self.mem.free(chunk)


def paced(q: IoQueue, nsid: int, bufs: list[int], offsets: list[int], *, rate: float, qd: int,
          seconds: float) -> tuple[int, float, LatencyRecorder]:
    """Random 4 KiB reads arriving at `rate` per second, at most `qd` in flight; (ios, elapsed, latencies).

    An arrival that finds every slot busy waits for one, so the loop falls behind only when the device
    does not give it `rate` completions per second.
    """
    qp = q.qp
    period = 1.0 / rate
    sqes = [SQE(opcode=int(IoOpcode.READ), nsid=nsid, cdw12=0) for _ in range(qd)]
    start = [0] * qd
    free = list(range(qd))
    lat = LatencyRecorder()
    record = lat.record
    clock = time.perf_counter_ns
    done_count = 0

    def done(slot: int, comp: Completion) -> None:
        nonlocal done_count
        record(clock() - start[slot])
        if comp.status & 0x7FF:
            raise RuntimeError(f"victim read failed: {comp.st}")
        done_count += 1
        free.append(slot)

    callbacks = [partial(done, s) for s in range(qd)]
    n = len(offsets)
    i = 0
    t0 = time.monotonic()
    end = t0 + seconds
    due = t0
    while True:
        now = time.monotonic()
        if now >= end:
            break
        submitted = False
        while free and due <= now:
            s = free.pop()
            sqe = sqes[s]
            sqe.cdw10 = offsets[i]
            i = i + 1 if i + 1 < n else 0
            start[s] = clock()
            q.submit(sqe, bufs[s], BLOCK, callbacks[s], ring=False)
            submitted = True
            due += period
        if submitted:
            qp.ring()
        qp.irq.clear()
        if qp.reap():
            continue
        qp.irq.wait(min(max(due - time.monotonic(), 0.0), end - time.monotonic(), 0.1) if free else 0.1)
    while len(free) < qd:
        qp.wait_any(10.0)
    return done_count, time.monotonic() - t0, lat


def _phase(victim: _Vm, aggressor: _Vm | None, *, seconds: float, rate: float, qd: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    stop = threading.Event()
    agg: list[tuple[int, float]] = []
    thread = None
    if aggressor is not None:
        def run_aggressor() -> None:
            # `drive` runs closed-loop for a fixed time; loop it in short slices until told to stop
            while not stop.is_set():
                ios, elapsed, _lat, errors = drive(aggressor.q, aggressor.nsid, BLOCK, aggressor.bufs,
                                                   aggressor.offsets, AGGRESSOR_QD, False, 0.1)
                if errors:
                    raise RuntimeError(f"aggressor: {errors} failed reads")
                agg.append((ios, elapsed))

        thread = threading.Thread(target=run_aggressor, name="aggressor", daemon=True)
        thread.start()
        time.sleep(WARMUP_S)
        agg.clear()  # measure the aggressor over the victim's window only
    try:
        ios, elapsed, lat = paced(victim.q, victim.nsid, victim.bufs, victim.offsets, rate=rate, qd=qd,
                                  seconds=seconds)
    finally:
        stop.set()
        if thread is not None:
            thread.join()
    p = lat.percentiles_us((50, 99))
    result.update(iops=ios / elapsed, p50_us=p["p50"], p99_us=p["p99"], ios=ios)
    if aggressor is not None:
        a_ios = sum(x for x, _ in agg)
        a_time = sum(t for _, t in agg)
        result["aggressor_iops"] = a_ios / a_time if a_time else 0.0
    return result


def run_noisy_bench(*, seconds: float = 2.0, model: str = "vendor-a", victim_iops: int = 3000, victim_qd: int = 4,
                    limit_iops: int = 2000, seed: int = 1, data_dir: str | Path | None = None,
                    progress: Progress | None = None) -> dict[str, Any]:
    """Runs the three phases; returns the flat result dictionary (`KEYS` plus details and `meta`)."""
    say = progress or (lambda _msg: None)
    tmp = tempfile.TemporaryDirectory(prefix="nvme-lm-noisy-") if data_dir is None else None
    root = Path(tmp.name if tmp is not None else data_dir)  # type: ignore[arg-type]
    dev = EmulatedSsd(root / "ssd", DeviceModel.builtin(model))
    rng = np.random.default_rng(seed)
    pf = None
    try:
        pf_mem = GuestMemory(4 << 20)
        dev.pf.iommu.map(pf_mem.base, pf_mem.buf)
        pf = NvmeDriver(dev.pf, pf_mem, timeout=10.0)
        pf.start()
        say("bringing up two VFs and prefilling their namespaces")
        victim, aggressor = _Vm(dev, pf, 1, rng), _Vm(dev, pf, 2, rng)
        say("warm-up")
        _phase(victim, None, seconds=min(0.2, seconds), rate=victim_iops, qd=victim_qd)
        say(f"victim alone, {seconds:g} s")
        solo = _phase(victim, None, seconds=seconds, rate=victim_iops, qd=victim_qd)
        say(f"victim + aggressor unlimited, {seconds:g} s")
        unlimited = _phase(victim, aggressor, seconds=seconds, rate=victim_iops, qd=victim_qd)
        say(f"victim + aggressor under a hard limit of {limit_iops} IOPS, {seconds:g} s")
        hrl.set_rate_limit(pf, aggressor.cntlid, iops=limit_iops)
        limited = _phase(victim, aggressor, seconds=seconds, rate=victim_iops, qd=victim_qd)
        hrl.clear_rate_limit(pf, aggressor.cntlid)
    finally:
        if pf is not None and pf.admin_q is not None:
            pf.shutdown()
        dev.power_off()
        if tmp is not None:
            tmp.cleanup()

    def r(x: float, nd: int = 1) -> float:
        return round(float(x), nd)

    kept = limited["iops"] / solo["iops"] if solo["iops"] else 0.0
    return {
        "victim_solo_iops": r(solo["iops"]),
        "victim_vs_unlimited_iops": r(unlimited["iops"]),
        "victim_vs_limited_iops": r(limited["iops"]),
        "limit_accuracy": round(limited["aggressor_iops"] / limit_iops, 4),
        "victim_solo_p99_us": r(solo["p99_us"]),
        "victim_vs_unlimited_p99_us": r(unlimited["p99_us"]),
        "victim_vs_limited_p99_us": r(limited["p99_us"]),
        "victim_solo_p50_us": r(solo["p50_us"]),
        "victim_vs_unlimited_p50_us": r(unlimited["p50_us"]),
        "victim_vs_limited_p50_us": r(limited["p50_us"]),
        "aggressor_unlimited_iops": r(unlimited["aggressor_iops"]),
        "aggressor_limited_iops": r(limited["aggressor_iops"]),
        "aggressor_limit_iops": limit_iops,
        "victim_target_iops": victim_iops,
        "victim_kept_unlimited": round(unlimited["iops"] / solo["iops"], 4) if solo["iops"] else 0.0,
        "victim_kept_limited": round(kept, 4),
        "goal": f"victim_vs_limited_iops >= {GOAL:.0%} of victim_solo_iops",
        "goal_met": kept >= GOAL,
        "meta": {
            "model": model, "seconds_per_phase": seconds, "block_size": BLOCK, "victim_qd": victim_qd,
            "aggressor_qd": AGGRESSOR_QD, "op": "random read", "python": sys.version.split()[0],
            "platform": platform.platform(), "cpus": os.cpu_count(),
        },
    }


def render(d: dict[str, Any], console: Any) -> None:
    """The three phases as a rich table, then accuracy and the goal."""
    from rich import box
    from rich.table import Table

    m = d["meta"]
    t = Table(title=f"Noisy neighbour on {m['model']}: victim 4 KiB random reads paced at "
              f"{d['victim_target_iops']} IOPS (QD{m['victim_qd']}), aggressor QD{m['aggressor_qd']}",
              title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("phase", "victim IOPS", "kept", "victim p50 µs", "victim p99 µs", "aggressor IOPS"):
        t.add_column(col, justify="left" if col == "phase" else "right")
    t.add_row("victim alone", f"{d['victim_solo_iops']:,.0f}", "100%", f"{d['victim_solo_p50_us']:,.0f}",
              f"{d['victim_solo_p99_us']:,.0f}", "-")
    t.add_row("aggressor unlimited", f"{d['victim_vs_unlimited_iops']:,.0f}", f"{d['victim_kept_unlimited']:.0%}",
              f"{d['victim_vs_unlimited_p50_us']:,.0f}", f"{d['victim_vs_unlimited_p99_us']:,.0f}",
              f"{d['aggressor_unlimited_iops']:,.0f}")
    t.add_row(f"aggressor hard limit {d['aggressor_limit_iops']:,}", f"{d['victim_vs_limited_iops']:,.0f}",
              f"{d['victim_kept_limited']:.0%}", f"{d['victim_vs_limited_p50_us']:,.0f}",
              f"{d['victim_vs_limited_p99_us']:,.0f}", f"{d['aggressor_limited_iops']:,.0f}")
    console.print(t)
    console.print(f"limit accuracy (measured / configured): {d['limit_accuracy']:.3f}")
    style = "green" if d["goal_met"] else "bold red"
    console.print(f"[{style}]goal ({d['goal']}): {'met' if d['goal_met'] else 'NOT met'}[/{style}]")


@click.command("noisy")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--seconds", type=click.FloatRange(0.1), default=2.0, show_default=True, help="Duration of each phase.")
@click.option("--model", default="vendor-a", show_default=True, help="Built-in device model.")
@click.option("--victim-iops", type=click.IntRange(1), default=3000, show_default=True,
              help="The victim's paced request rate.")
@click.option("--limit-iops", type=click.IntRange(1), default=2000, show_default=True,
              help="Hard limit put on the aggressor's VF in the third phase.")
def noisy_command(as_json: bool, seconds: float, model: str, victim_iops: int, limit_iops: int) -> None:
    """Noisy neighbour: a paced victim VF beside a QD32 aggressor VF, unlimited and under a hard rate limit."""
    import json

    from rich.console import Console

    if as_json:
        click.echo(json.dumps(run_noisy_bench(seconds=seconds, model=model, victim_iops=victim_iops,
                                              limit_iops=limit_iops), indent=2))
        return
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 110))  # piped or `make bench`: keep the table whole
    with console.status("starting") as status:
        result = run_noisy_bench(seconds=seconds, model=model, victim_iops=victim_iops, limit_iops=limit_iops,
                                 progress=status.update)
    render(result, console)


__all__ = ["KEYS", "noisy_command", "paced", "render", "run_noisy_bench"]
