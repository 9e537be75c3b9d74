"""`nvme-lm bench migrate`: the migration engine's figures against issue 6's goals, each beside its baseline.

Every measurement runs real scenarios (`hypervisor.orchestrator.run_scenario`: two host agent processes on
loopback, mutual TLS, a VM under a verified workload) and reads the figures from the reports:

1. **precopy_ratio**: an idle VM (reads only, 10 IOPS) with 256 MiB allocated in a 1 GiB namespace and 16 MiB
   of RAM: wall time of pre-copy pass 0 (the allocated LBAs and the ~5 MiB of RAM holding data, read through
   the source PF, framed, CRC32C-checked, sent over mutual TLS, written through the destination PF) against
   the same allocated bytes copied between two plain sparse files on the same filesystem with
   `SEEK_DATA`/`SEEK_HOLE` + `os.copy_file_range` (in-kernel copy, no network, no TLS, no NVMe; median of
   5, each after `os.sync()`). A user-space copy (`os.preadv`/`os.pwrite`, 1 MiB) is shown too.
2. **bytes_ratio**: LBA bytes the engine moved / (allocated bytes at pass 0 + bytes the guest wrote between the
   start of pass 0 and the pause), summed over the legs of measurement 3. Guest writes in that window are
   the guest's completions in the window (its own timeline) times the run's write share times the block size.
3. **blackout_p50_ms / blackout_p99_ms**: the guest-seen blackout (longest completion gap across the
   switchover, measured by the guest) of every leg of the default VM ping-ponged 20 times under load, its
   writes confined to the prefilled 256 MiB so that every leg moves the same amount.
4. **capacity_ratio**: leg time (HELLO to DONE) of a 1 TiB namespace with 1 GiB allocated against a 1 GiB
   namespace fully allocated, idle VM, the workload confined to the allocated GiB (`region_gib`). Measurements
   1 and 4 run twice and keep the faster run (the one least disturbed by the rest of the machine).
5. **Throttling**: a guest that writes 2x the engine's stream cap (`max_bandwidth_mib_s`, the slow link):
   with the predictive policy and the throttle on, and with the throttle off (`give_up_s` set).
   `converged_*` = the leg succeeded and the guest-seen blackout was within `downtime_target_ms`;
   `throughput_kept` = guest IOPS during pre-copy / IOPS before the migration, throttle on. The guest's
   writes go to a hot 16 MiB region, allocated at boot.
6. The four policies on the throttling case, and (`hol`) what the device's TP4176 write limit does to reads
   queued behind throttled writes: one queue with reads and writes vs reads and writes on separate queues.

`--quick` uses smaller sizes, 4 legs and runs only the two headline throttling runs (docs/benchmarks.md).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import numpy as np

from nvme_lm.cli.bench_migrate_metrics import (
    GOALS,
    KEYS,
    MIB,
    _finite,
    blackout_metrics,
    bytes_metrics,
    capacity_metrics,
    goals_met,
    infrastructure_failure,
    precopy_metrics,
    throttle_metrics,
    window_ios,
)
from nvme_lm.device.namespace import file_extents
from nvme_lm.hypervisor.control import json_safe

GIB = 1 << 30
BASELINE_REPS = 5
COPY_CHUNK = 1 << 20  # the user-space reference copy's buffer
MORE_RUNS = 5  # ping-pong runs started again for the legs still missing after a failed leg

Progress = Callable[[str, dict[str, Any]], None]  # ("step", {"text"}) or the orchestrator's events


# ============================================================================================ configuration
@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """Sizes of one bench run; `full()` is what docs/benchmarks.md quotes, `quick()` takes about a minute."""

    quick: bool
    idle_capacity_gib: float  # measurement 1
    idle_allocated_gib: float
    capacity_big_gib: float  # measurement 4
    capacity_allocated_gib: float
    reps: int  # runs of measurements 1 and 4 (the fastest counts: the least disturbed by the rest of the machine)
    legs: int  # measurement 3 (and 2)
    load_capacity_gib: float  # 0: the default VM
    load_prefill_gib: float
    load_memory_mib: int
    throttle_policies: tuple[str, ...]  # measurement 6 (predictive with the throttle on always runs)
    throttle_timeout_s: float
    give_up_s: float
    hol_seconds: float

    @classmethod
    def full(cls) -> BenchConfig:
        return cls(False, 1.0, 0.25, 1024.0, 1.0, 2, 20, 0.0, 0.0, 0, ("fixed", "auto-converge", "local-minimum"),
                   60.0, 20.0, 2.0)

    @classmethod
    def quick_(cls) -> BenchConfig:
        return cls(True, 0.25, 0.0625, 1024.0, 0.0625, 1, 4, 0.125, 0.03125, 32, (), 40.0, 8.0, 1.0)


# The throttling case: a reader job and a writer job (two vCPUs, one I/O queue each, like two fio jobs),
# 16 KiB at QD16 each, paced at THROTTLE_IOPS / 2 each, so the guest writes THROTTLE_IOPS / 2 x 16 KiB =
# 12.5 MiB/s; the link (the engine's stream cap) is half of that. The I/O goes to a hot 16 MiB region
# (8 MiB per job), all of it allocated at boot: each pass finds most of the writer's half rewritten.
THROTTLE_IOPS = 1600
THROTTLE_BLOCK = 16 << 10
THROTTLE_MIX = 50
THROTTLE_REGION_GIB = 16 / 1024
THROTTLE_PASSES = 12


def default_scenario() -> Any:
    from nvme_lm.hypervisor.scenario import default_scenario as default

    return default()


def _scenario(name: str, *, ns: dict[str, Any] | None = None, wl: dict[str, Any] | None = None,
              vm: dict[str, Any] | None = None, mig: dict[str, Any] | None = None) -> Any:
    """The default scenario with some keys changed, validated like a file."""
    s = default_scenario()
    v = s.vm
    v = dataclasses.replace(v, namespace=dataclasses.replace(v.namespace, **(ns or {})),
                            workload=dataclasses.replace(v.workload, **(wl or {})), **(vm or {}))
    return dataclasses.replace(s, name=name, description=f"bench migrate: {name}", vm=v,
                               migration=dataclasses.replace(s.migration, **(mig or {}))).validate(f"<bench {name}>")


_IDLE = {"pattern": "randread", "rate_iops": 10, "run_after_s": 0.2}  # reads only: nothing for pre-copy to redo


def idle_scenario(capacity_gib: float, allocated_gib: float, name: str = "idle") -> Any:
    """An idle VM (16 MiB RAM, 10 reads/s) with `allocated_gib` written from LBA 0 and the workload confined
    there (so neither its bookkeeping nor the final read-back scales with the capacity)."""
    region = allocated_gib if allocated_gib < capacity_gib else 0.0
    return _scenario(name, ns={"capacity_gib": capacity_gib, "prefill_gib": allocated_gib},
                     wl={**_IDLE, "region_gib": region}, vm={"memory_mib": 16}, mig={"start_after_s": 0.5})


def load_scenario_for(cfg: BenchConfig) -> Any:
    """The default VM under its default load, ping-ponged `cfg.legs` times (quick: a smaller VM). Its writes
    are confined to the prefilled part (`region_gib` = `prefill_gib`): otherwise every leg finds more of the
    namespace allocated than the one before (the default randrw allocates ~6 MiB/s), and 20 legs take long."""
    if not cfg.load_capacity_gib:
        d = default_scenario()
        return _scenario("default-ping-pong", wl={"region_gib": d.vm.namespace.prefill_gib}, mig={"repeat": cfg.legs})
    return _scenario("small-ping-pong", ns={"capacity_gib": cfg.load_capacity_gib, "prefill_gib": cfg.load_prefill_gib},
                     vm={"memory_mib": cfg.load_memory_mib},
                     wl={"run_after_s": 0.5, "region_gib": cfg.load_prefill_gib},
                     mig={"repeat": cfg.legs, "start_after_s": 1.0})


def throttle_link_mib_s() -> float:
    """The stream cap of the throttling case: half the guest's planned write rate."""
    return THROTTLE_IOPS * (1 - THROTTLE_MIX / 100) * THROTTLE_BLOCK / MIB / 2


def throttle_scenario(policy: str = "predictive", throttle: bool = True, give_up_s: float = 0.0,
                      timeout_s: float = 60.0) -> Any:
    """A guest writing 2x the link: a 16 KiB random reader and a 16 KiB random writer paced at THROTTLE_IOPS / 2
    each over a hot 16 MiB region (prefilled) of a 256 MiB namespace, 16 MiB RAM; the engine's stream capped
    at half the guest's write rate."""
    name = f"throttle-{policy}" + ("" if throttle else "-no-throttle")
    return _scenario(name, ns={"capacity_gib": 0.25, "prefill_gib": THROTTLE_REGION_GIB},
                     wl={"pattern": "randrw", "queue_patterns": "randread,randwrite", "block_size": THROTTLE_BLOCK,
                         "rate_iops": THROTTLE_IOPS // 2, "run_after_s": 0.5, "region_gib": THROTTLE_REGION_GIB},
                     vm={"memory_mib": 16, "queues": 2},
                     mig={"start_after_s": 2.0, "policy": policy, "throttle": throttle, "give_up_s": give_up_s,
                          "max_passes": THROTTLE_PASSES, "max_bandwidth_mib_s": throttle_link_mib_s(),
                          "timeout_s": timeout_s})


# ============================================================================================ baseline
def write_sparse_source(path: Path, capacity: int, allocated: int, seed: int = 1) -> None:
    """A sparse file of `capacity` bytes whose first `allocated` bytes hold random data: the layout the
    prefill gives the VM's namespace (written from LBA 0)."""
    chunk = np.random.default_rng(seed).integers(0, 256, 8 * MIB, dtype=np.uint8).tobytes()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, capacity)
        for off in range(0, allocated, len(chunk)):
            os.pwrite(fd, chunk[: min(len(chunk), allocated - off)], off)
    finally:
        os.close(fd)


def data_extents(fd: int) -> list[tuple[int, int]]:
    """(offset, length) of every data extent of an open file, by SEEK_DATA/SEEK_HOLE."""
    return list(file_extents(fd))


def sparse_copy(src: Path, dst: Path, *, userspace: bool = False) -> int:
    """Copies the data extents of `src` into a new sparse `dst` of the same size; returns the bytes copied.
    The baseline: `os.copy_file_range` (the kernel moves the pages); `userspace`: `os.preadv`/`os.pwrite`
    through a 1 MiB buffer, what any user-space copier pays at least."""
    fi = os.open(src, os.O_RDONLY)
    fo = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    total = 0
    try:
        os.ftruncate(fo, os.fstat(fi).st_size)
        buf = bytearray(COPY_CHUNK) if userspace else None
        view = memoryview(buf) if buf is not None else None
        for off, length in data_extents(fi):
            end = off + length
            while off < end:
                if view is not None:
                    n = os.preadv(fi, [view[: min(COPY_CHUNK, end - off)]], off)
                    if n > 0:
                        os.pwrite(fo, view[:n], off)
                else:
                    n = os.copy_file_range(fi, fo, end - off, off, off)
                if n <= 0:
                    break  # the file shrank under us: copy what is there
                off += n
                total += n
    finally:
        os.close(fi)
        os.close(fo)
    return total


def measure_baseline(workdir: Path, capacity: int, allocated: int, reps: int = BASELINE_REPS) -> dict[str, Any]:
    """Median wall time of `reps` sparse copies (each after os.sync(), into a fresh file), and of a
    user-space copy, of `allocated` bytes in a `capacity`-byte file."""
    workdir.mkdir(parents=True, exist_ok=True)
    src, dst = workdir / "baseline-src", workdir / "baseline-dst"
    write_sparse_source(src, capacity, allocated)

    def timed(userspace: bool, n: int) -> tuple[list[float], int]:
        runs = []
        copied = 0
        for _ in range(n):
            os.sync()  # no writeback of the last copy (or of the source) during this one
            t = time.perf_counter()
            copied = sparse_copy(src, dst, userspace=userspace)
            runs.append(time.perf_counter() - t)
            dst.unlink()
        return runs, copied

    try:
        runs, copied = timed(False, reps)
        user_runs, _ = timed(True, max(1, reps // 2))
    finally:
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)
    return {"seconds": statistics.median(runs), "min_s": min(runs), "max_s": max(runs), "runs": reps,
            "bytes": copied, "userspace_seconds": statistics.median(user_runs),
            "what": "SEEK_DATA/SEEK_HOLE + os.copy_file_range between two sparse files on the same filesystem "
                    "(in-kernel copy through the page cache; no NVMe, no network, no TLS, no fsync)"}


# ============================================================================================ separate queues
def run_hol(seconds: float, data_dir: Path, progress: Progress) -> dict[str, Any]:
    """Reads queued behind throttled writes: one VF, 16 KiB 50/50 random I/O at QD16, unlimited and then
    with the VF's TP4176 write bandwidth limited to a quarter of the write rate it had (what the
    predictive policy asks of a guest writing 2x the link). Shared: one queue carries reads and writes.
    Split: reads on one queue (QD8), writes on another (QD8). Everything in this process."""
    from nvme_lm.cli.demo import lba_format_index
    from nvme_lm.device.model import DeviceModel
    from nvme_lm.device.ssd import EmulatedSsd
    from nvme_lm.host import commands as cmd
    from nvme_lm.host import rate_limit as hrl
    from nvme_lm.host import virtualization as hv
    from nvme_lm.host.driver import NvmeDriver
    from nvme_lm.spec.identify import CNS, IdentifyNamespace, encode_ctrl_list
    from nvme_lm.vm.memory import GuestMemory
    from nvme_lm.vm.workload import Workload, WorkloadConfig

    bs, lba, region = THROTTLE_BLOCK, 4096, 64 * MIB
    dev = EmulatedSsd(data_dir / "hol-ssd", DeviceModel.builtin("vendor-a"))
    pf = vf = None
    try:
        pf_mem = GuestMemory(4 * MIB)
        dev.pf.iommu.map(pf_mem.base, pf_mem.buf)
        pf = NvmeDriver(dev.pf, pf_mem, timeout=10.0)
        pf.start()
        entry = hv.bring_up_vf(pf, 1, nvq=3, nvi=3)
        index = lba_format_index(pf.identify(CNS.NS, nsid=0xFFFFFFFF), lba)
        nsze = region // lba
        comp, _ = pf.admin(cmd.ns_create(), data=IdentifyNamespace(nsze=nsze, ncap=nsze, flbas=index or 0).encode())
        nsid = comp.dw0
        pf.admin(cmd.ns_attach(nsid), data=encode_ctrl_list([entry.scid]))
        mem = GuestMemory(32 * MIB, base=0x1000_0000)
        fn = dev.vf(1)
        fn.iommu.map(mem.base, mem.buf)
        vf = NvmeDriver(fn, mem, timeout=10.0)
        vf.start()
        vf.set_number_of_queues(2, 2)
        q1, q2 = vf.create_io_queue(1, 64, vector=1), vf.create_io_queue(2, 64, vector=2)
        half = region // bs // 2

        def config(first_block: int, nblocks: int, reads: float, qd: int, seed: int) -> WorkloadConfig:
            return WorkloadConfig(nsid=nsid, lba_size=lba, block_size=bs, first_lba=first_block * bs // lba,
                                  nblocks=nblocks, read_fraction=reads, qd=qd, seed=seed, pattern="randrw")

        shared = Workload(q1, mem, config(0, half, 0.5, 16, 1))
        reader = Workload(q1, mem, config(0, half, 1.0, 8, 2))  # runs after `shared`, over the same blocks
        writer = Workload(q2, mem, config(half, half, 0.0, 8, 3))

        def phase(workloads: list[Workload], length: float = seconds) -> dict[str, float]:
            results: list[Any] = [None] * len(workloads)

            def go(i: int) -> None:
                results[i] = workloads[i].run(length)

            threads = [threading.Thread(target=go, args=(i,)) for i in range(len(workloads))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            reads = sum(r.reads for r in results) / length
            writes = sum(r.writes for r in results) / length
            errors = sum(r.errors + r.verify_failure_count for r in results)
            return {"read_iops": reads, "write_iops": writes, "iops": reads + writes, "errors": errors}

        out: dict[str, Any] = {"seconds": seconds, "block_size": bs}
        for name, wls in (("shared", [shared]), ("split", [reader, writer])):
            progress("step", {"text": f"separate queues: {name}, prefilling"})
            wls[0].prefill()  # each workload knows only its own writes: the readers prefill their blocks
            progress("step", {"text": f"separate queues: {name}, unlimited"})
            phase(wls, 0.2)  # warm-up
            free = phase(wls)
            limit = max(1, math.floor(free["write_iops"] * bs / MIB / 4))
            hrl.set_rate_limit(pf, entry.scid, write_mib_s=limit)
            progress("step", {"text": f"separate queues: {name}, writes limited to {limit} MiB/s"})
            held = phase(wls)
            hrl.clear_rate_limit(pf, entry.scid)
            out[name] = {"unlimited": free, "limited": held, "write_limit_mib_s": limit,
                         "read_kept": held["read_iops"] / free["read_iops"] if free["read_iops"] else math.nan,
                         "iops_kept": held["iops"] / free["iops"] if free["iops"] else math.nan}
        return out
    finally:
        if vf is not None and vf.admin_q is not None:
            vf.shutdown()
        if pf is not None and pf.admin_q is not None:
            pf.shutdown()
        dev.power_off()


# ============================================================================================ the bench
def _fs_type(path: Path) -> str:
    """The filesystem type `path` lives on (longest mount point prefix in /proc/mounts)."""
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 3 and str(path.resolve()).startswith(parts[1]) and len(parts[1]) >= len(best):
                    best, kind = parts[1], parts[2]
    except OSError:
        pass
    return kind


def run_migrate_bench(cfg: BenchConfig, *, workdir: Path | None = None, progress: Progress | None = None,
                      reports_dir: Path | None = None, skip_hol: bool = False) -> dict[str, Any]:
    """Runs the six measurements; returns the flat result (KEYS), `goals_met`, `details` and `meta`."""
    from nvme_lm.hypervisor.orchestrator import run_scenario

    emit: Progress = progress or (lambda kind, data: None)
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="nvme-lm-bench-migrate-")
        workdir = Path(tmp)
    n_steps = 6 + len(cfg.throttle_policies) - (1 if skip_hol else 0)
    step = 0

    def begin(text: str) -> None:
        nonlocal step
        step += 1
        emit("step", {"text": f"[{step}/{n_steps}] {text}", "step": step, "steps": n_steps})

    failures: list[str] = []  # runs that failed for the test bed's sake and were run again
    runs = 0

    def run(sc: Any, retry: bool = True) -> dict[str, Any]:
        """One scenario; run again once if it failed for a reason that is not the measured behaviour
        (agents, a PF copy timeout): see `infrastructure_failure`."""
        nonlocal runs
        for attempt in (1, 2):
            runs += 1
            where = workdir / f"run-{runs:02d}-{sc.name}"
            report = asyncio.run(run_scenario(sc, where, emit))
            shutil.rmtree(where, ignore_errors=True)
            if reports_dir is not None:
                reports_dir.mkdir(parents=True, exist_ok=True)
                (reports_dir / f"{runs:02d}-{sc.name}.json").write_text(json.dumps(json_safe(report), indent=1))
            why = infrastructure_failure(report)
            if why is None or not retry or attempt == 2:
                return report
            failures.append(f"{sc.name}: {why}")
            emit("step", {"text": f"{sc.name} failed ({why[:60]}): once more"})
        raise AssertionError("unreachable")

    details: dict[str, Any] = {}
    t0 = time.monotonic()
    load_start = os.getloadavg()  # other work on the machine skews every timing
    try:
        # 1. pre-copy of an idle VM's allocated data vs a sparse kernel copy
        sc = idle_scenario(cfg.idle_capacity_gib, cfg.idle_allocated_gib)
        begin(f"pre-copy: idle VM, {cfg.idle_allocated_gib * 1024:g} MiB allocated in "
              f"{cfg.idle_capacity_gib:g} GiB" + (f", {cfg.reps} runs" if cfg.reps > 1 else ""))
        idles = [run(sc) for _ in range(cfg.reps)]
        emit("step", {"text": "pre-copy baseline: SEEK_DATA + copy_file_range"})
        base = measure_baseline(workdir / "baseline", sc.capacity_bytes, sc.prefill_bytes)
        details["precopy"] = precopy_metrics(idles, base) if any(r["legs"] for r in idles) else {
            "ok": False, "error": idles[0]["error"]}

        # 4. capacity: a huge sparse namespace costs what its allocated data costs (runs alternate)
        alloc = cfg.capacity_allocated_gib
        begin(f"capacity: {cfg.capacity_big_gib / 1024:g} TiB namespace with {alloc * 1024:g} MiB allocated vs "
              f"{alloc * 1024:g} MiB full" + (f", {cfg.reps} runs each" if cfg.reps > 1 else ""))
        bigs, smalls = [], []
        for _ in range(cfg.reps):
            smalls.append(run(idle_scenario(alloc, alloc, "capacity-small")))
            bigs.append(run(idle_scenario(cfg.capacity_big_gib, alloc, "capacity-big")))
        details["capacity"] = capacity_metrics(bigs, smalls) if any(r["legs"] for r in bigs) and any(
            r["legs"] for r in smalls) else {"ok": False, "error": bigs[0]["error"] or smalls[0]["error"]}

        # 3 and 2. the default VM under load, ping-ponged
        sc = load_scenario_for(cfg)
        begin(f"blackout: {sc.vm.name} under load, {cfg.legs} legs")
        loads = [run(sc, retry=False)]
        for _ in range(MORE_RUNS):  # a leg that fails ends its run: the legs still missing run in a new one
            done = sum(leg["ok"] for r in loads for leg in r["legs"])
            if done >= cfg.legs:
                break
            failures.append(f"{sc.name}: {loads[-1]['error']}")
            more = dataclasses.replace(sc, migration=dataclasses.replace(sc.migration, repeat=cfg.legs - done))
            emit("step", {"text": f"blackout: {cfg.legs - done} more legs"})
            loads.append(run(more, retry=False))
        details["blackout"] = blackout_metrics(loads)
        details["bytes"] = bytes_metrics(loads, sc.vm.workload.block_size)

        # 5 and 6. a guest writing 2x the link
        link = throttle_link_mib_s()
        rows = []
        plan = [("predictive", True, 0.0), ("predictive", False, cfg.give_up_s)]
        plan += [(p, True, 0.0) for p in cfg.throttle_policies]
        for policy, throttle, give_up in plan:
            sc = throttle_scenario(policy, throttle, give_up, cfg.throttle_timeout_s)
            begin(f"throttling: {policy}, throttle {'on' if throttle else 'off'}, link {link:g} MiB/s")
            r = run(sc)
            row = throttle_metrics(r, target_ms=sc.migration.downtime_target_ms,
                                   block_size=sc.vm.workload.block_size, link_mib_s=link)
            rows.append({"policy": policy, "throttle": throttle, "give_up_s": give_up, **row})
        details["throttle"] = {"target_ms": sc.migration.downtime_target_ms, "link_mib_s": link,
                               "guest_planned_write_mib_s": 2 * link, "max_passes": THROTTLE_PASSES,
                               "guest": f"a {THROTTLE_BLOCK >> 10} KiB randread job and a randwrite job, QD16 "
                                        f"each, on their own queues, paced at {THROTTLE_IOPS // 2} IOPS each"}
        details["policies"] = rows

        if not skip_hol:
            begin("separate queues: reads behind throttled writes")
            details["hol"] = run_hol(cfg.hol_seconds, workdir, emit)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)

    with_t, without_t = rows[0], rows[1]
    result: dict[str, Any] = {
        "precopy_ratio": details["precopy"].get("precopy_ratio", math.nan),
        "bytes_ratio": details["bytes"]["bytes_ratio"],
        "blackout_p50_ms": details["blackout"]["blackout_p50_ms"],
        "blackout_p99_ms": details["blackout"]["blackout_p99_ms"],
        "capacity_ratio": details["capacity"].get("capacity_ratio", math.nan),
        "converged_with_throttle": with_t["converged"],
        "converged_without_throttle": without_t["converged"],
        "throughput_kept": with_t["throughput_kept"],
    }
    result["goals"] = {k: f"{op} {g}" for k, (op, g) in GOALS.items()}
    result["goals_met"] = goals_met(result)
    result["details"] = details
    result["meta"] = {"quick": cfg.quick, "seconds": round(time.monotonic() - t0, 1), "rerun": failures,
                      "loadavg_start": load_start, "loadavg_end": os.getloadavg(), "python": sys.version.split()[0],
                      "platform": platform.platform(), "cpus": os.cpu_count(),
                      "filesystem": _fs_type(workdir if tmp is None else Path(tempfile.gettempdir())),
                      "config": dataclasses.asdict(cfg)}
    return result


# ============================================================================================ output



def _f(v: Any, nd: int = 1) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if not _finite(v):
        return "-"
    return f"{v:,.{nd}f}"


def render(r: dict[str, Any], console: Any) -> None:
    from rich import box
    from rich.table import Table

    d = r["details"]
    met = r["goals_met"]
    t = Table(title="bench migrate: the engine against issue 6's goals" + (" (--quick)" if r["meta"]["quick"] else ""),
              title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("figure", "value", "goal", "", "measured against (same run)"):
        t.add_column(col, justify="right" if col in ("value", "goal") else "left")
    p, c, bl, by = d["precopy"], d["capacity"], d["blackout"], d["bytes"]
    rows = [
        ("precopy_ratio", _f(r["precopy_ratio"], 2),
         f"pass 0 {_f(p.get('pass0_s'), 2)} s for {_f(p.get('pass0_lba_bytes', 0) / MIB, 0)} MiB + "
         f"{_f(p.get('pass0_ram_bytes', 0) / MIB, 1)} MiB RAM vs copy_file_range {_f(p.get('baseline_s'), 3)} s "
         f"(user-space copy {_f(p.get('userspace_s'), 3)} s)"),
        ("bytes_ratio", _f(r["bytes_ratio"], 3),
         f"{_f(by['bytes_lba'] / MIB, 0)} MiB moved vs {_f(by['allocated_bytes'] / MIB, 0)} MiB allocated + "
         f"{_f(by['redirtied_bytes'] / MIB, 0)} MiB written by the guest during pre-copy ({by['legs']} legs)"),
        ("blackout_p50_ms", _f(r["blackout_p50_ms"]), f"{bl['legs_ok']}/{bl['legs']} legs; engine pause p50 "
         f"{_f(bl['engine_pause_p50_ms'])} ms"),
        ("blackout_p99_ms", _f(r["blackout_p99_ms"]), f"max {_f(bl['blackout_max_ms'])} ms; engine pause p99 "
         f"{_f(bl['engine_pause_p99_ms'])} ms"),
        ("capacity_ratio", _f(r["capacity_ratio"], 2),
         f"leg {_f(c.get('big_leg_s'), 2)} s (1 TiB, {_f(c.get('big_allocated_bytes', 0) / MIB, 0)} MiB allocated) "
         f"vs {_f(c.get('small_leg_s'), 2)} s (namespace full)"),
    ]
    rows_t = d["policies"]
    w, wo = rows_t[0], rows_t[1]
    rows += [
        ("converged_with_throttle", _f(r["converged_with_throttle"]),
         f"ok {_f(w['ok'])}, blackout {_f(w['blackout_ms'])} ms, {w['passes']} passes; pre-copy converged "
         f"{_f(w['precopy_converged'])}"),
        ("converged_without_throttle", _f(r["converged_without_throttle"]),
         f"ok {_f(wo['ok'])}: {(wo.get('error') or wo.get('last_decision') or '')[:70]}"),
        ("throughput_kept", _f(r["throughput_kept"], 2),
         f"{_f(w['iops_during'], 0)} IOPS during pre-copy vs {_f(w['iops_before'], 0)} before"),
    ]
    for key, value, against in rows:
        op, goal = GOALS[key]
        ok = met[key]
        t.add_row(key, value, f"{op} {goal}", "[green]met[/green]" if ok else "[red]not met[/red]", against)
    console.print(t)

    pt = Table(title=f"Policies on the throttling case: guest writes {_f(d['throttle']['guest_planned_write_mib_s'])} "
                     f"MiB/s planned, link {_f(d['throttle']['link_mib_s'])} MiB/s, target "
                     f"{_f(d['throttle']['target_ms'], 0)} ms", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("policy", "ok", "passes", "blackout ms", "pause ms", "converged", "pre-copy conv.", "kept",
                "write limit MiB/s", "leg s", "guest W/link"):
        pt.add_column(col, justify="left" if col == "policy" else "right")
    for row in rows_t:
        name = row["policy"] + ("" if row["throttle"] else f" (no throttle, give up {row['give_up_s']:g} s)")
        lim = (f"{_f(row.get('min_write_limit_mib_s'), 0)}..{_f(row.get('max_write_limit_mib_s'), 0)}"
               if row.get("max_write_limit_mib_s") else "-")
        pt.add_row(name, _f(row["ok"]), str(row["passes"]), _f(row["blackout_ms"]), _f(row["engine_pause_ms"]),
                   _f(row["converged"]), _f(row["precopy_converged"]), _f(row["throughput_kept"], 2), lim,
                   _f(row.get("total_s"), 1), _f(row.get("write_to_link"), 2))
    console.print(pt)
    if "hol" in d:
        h = d["hol"]
        console.print(f"Reads behind throttled writes ({h['block_size'] >> 10} KiB, writes limited to a quarter of "
                      f"their unlimited rate): one shared queue keeps {_f(h['shared']['read_kept'], 2)} of its read "
                      f"IOPS ({_f(h['shared']['iops_kept'], 2)} of all); reads and writes on separate queues keep "
                      f"{_f(h['split']['read_kept'], 2)} of read IOPS ({_f(h['split']['iops_kept'], 2)} of all).")
    steps = bl.get("steps_mean_ms", {})
    if steps:
        top = sorted(steps.items(), key=lambda kv: -kv[1])[:5]
        console.print("Blackout steps (mean ms over the legs): " + ", ".join(f"{k} {v:.1f}" for k, v in top))
    console.print(f"[dim]{p.get('baseline', '')}; filesystem {r['meta']['filesystem']}; "
                  f"{r['meta']['seconds']:.0f} s[/dim]")


class _Live:
    """Rich progress: the measurement, the scenario's phase and guest counters, the current leg's copy."""

    def __init__(self, console: Any) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.fields[info]}"),
                            TimeElapsedColumn(), console=console, transient=True)
        self.step = self.bar.add_task("starting", total=1, info="")
        self.phase = self.bar.add_task("", total=None, info="")
        self.leg = self.bar.add_task("migration", total=1.0, info="", visible=False)

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        b = self.bar
        if kind == "step":
            if "steps" in data:
                b.update(self.step, description=data["text"], total=data["steps"], completed=data["step"] - 1)
                b.update(self.leg, visible=False)
            else:
                b.update(self.phase, description=data["text"], info="")
        elif kind == "phase":
            b.update(self.phase, description=data["text"])
        elif kind == "guest":
            b.update(self.phase, info=f"guest {data.get('ios', 0):,} I/Os, {data.get('iops', 0):,.0f} IOPS")
        elif kind == "migration":
            moved = data["bytes_lba"] + data["bytes_ram"]
            todo = moved + data["remaining_bytes"] if data["pass"] else max(data["allocated_bytes"], moved)
            limit = data.get("write_limit_mib_s") or 0
            b.update(self.leg, visible=True, description=f"leg {data['leg']}",
                     completed=1.0 if data["result"] is not None else (moved / todo if todo else 0.0),
                     info=f"{data['phase']}, pass {data['pass']}, {moved / MIB:,.1f} MiB moved"
                          + (f", guest writes <= {limit:g} MiB/s" if limit else ""))


@click.command("migrate")
@click.option("--json", "as_json", is_flag=True, help="Print the figures as JSON (progress goes to stderr).")
@click.option("--quick", is_flag=True, help="Smaller sizes, 4 legs, two throttling runs: about a minute.")
@click.option("--workdir", type=click.Path(file_okay=False), default=None,
              help="Where the runs' SSDs and the baseline files go (default: a temporary directory, removed).")
@click.option("--reports", "reports_dir", type=click.Path(file_okay=False), default=None,
              help="Also write each scenario's full migration report (JSON) into this directory.")
def migrate_command(as_json: bool, quick: bool, workdir: str | None, reports_dir: str | None) -> None:
    """Live migration against issue 6's goals: pre-copy vs a sparse kernel copy, bytes moved, blackout
    percentiles, a 1 TiB namespace, and a guest writing twice the link with each policy."""
    from rich.console import Console

    cfg = BenchConfig.quick_() if quick else BenchConfig.full()
    console = Console(stderr=as_json)
    if not console.is_terminal:
        console = Console(stderr=as_json, width=max(console.width, 140))  # piped or `make bench`: whole tables
    live = _Live(console)
    with live.bar:
        result = run_migrate_bench(cfg, workdir=Path(workdir) if workdir else None, progress=live,
                                   reports_dir=Path(reports_dir) if reports_dir else None)
    if as_json:
        click.echo(json.dumps(json_safe(result), indent=2))
    else:
        render(result, console)


__all__ = ["GOALS", "KEYS", "BenchConfig", "blackout_metrics", "bytes_metrics", "capacity_metrics", "goals_met",
           "idle_scenario", "load_scenario_for", "measure_baseline", "migrate_command", "precopy_metrics",
           "run_migrate_bench", "sparse_copy", "throttle_metrics", "throttle_scenario", "window_ios"]
