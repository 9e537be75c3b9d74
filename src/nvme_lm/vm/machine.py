"""A virtual machine: guest RAM, the guest's NVMe driver on its VF, vCPU threads running verified
workloads, a verifier thread re-reading identity data, and the pause gate a hypervisor stops them at.

The guest is Python threads in the host agent's process, but it keeps to what a guest can do: it reaches
its VF only through BAR0, DMA into its own RAM and MSI-X. What a hypervisor captures at switchover is
(1) guest RAM, moved page by page, and (2) `state()`: what a real VMM would read from the vCPUs and the
guest kernel's own bookkeeping - driver queue pointers and outstanding command ids, the workloads'
expected generations and in-flight slots, the timeline and verifier baselines. `Vm.restore` rebuilds
the guest from those two on another host, where it carries on as if nothing happened.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import msgpack
import numpy as np

from nvme_lm.host import commands as cmd
from nvme_lm.host.driver import NvmeDriver
from nvme_lm.host.qpair import Completion
from nvme_lm.pcie.function import PcieFunction
from nvme_lm.vm.blocks import payload_pool
from nvme_lm.vm.memory import GuestMemory
from nvme_lm.vm.timeline import Timeline
from nvme_lm.vm.verifier import IdentityVerifier
from nvme_lm.vm.workload import VcpuStopped, Workload, WorkloadConfig

GUEST_BASE = 0x1000_0000  # guest-physical address of the first byte of RAM
VM_STATE_VERSION = 1
AER_TAG = "aer"
FOLD_EVERY_S = 0.5
PATTERNS = ("randread", "randwrite", "randrw", "write", "trim")


@dataclass(frozen=True)
class VmSpec:
    """What a VM is, as plain data: travels with it in the migration stream's HELLO."""

    name: str = "vm1"
    memory_bytes: int = 256 << 20
    queues: int = 1
    nsid: int = 1  # the ENSID the guest uses
    lba_size: int = 512
    capacity_bytes: int = 1 << 30
    prefill_bytes: int = 0
    pattern: str = "randrw"
    block_size: int = 4096
    iodepth: int = 16
    rwmixread: int = 50
    rate_iops: int = 0
    hot_set: float = 1.0
    hot_share: float = 0.9
    trim_percent: int = 0
    identity_check_s: float = 1.0
    ram_fill: float = 0.25  # share of guest RAM the guest fills with data at boot (its "page cache")
    ram_dirty_mib_s: float = 0.0  # rate at which a guest thread rewrites RAM pages while running
    seed: int = 1
    region_bytes: int = 0  # the part of the namespace the workload uses, from LBA 0; 0: all of it
    # one pattern per queue, comma-separated ("randread,randwrite": a reader job and a writer job, as two fio
    # jobs would be); "" = every queue runs `pattern`
    queue_patterns: str = ""

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("bad VM spec: " + "; ".join(problems))

    def problems(self) -> list[str]:
        """Why this VM cannot be (it crosses hosts: a peer's spec is checked like user input)."""
        out = []
        for name, f in self.__dataclass_fields__.items():
            v, want = getattr(self, name), type(f.default)
            ok = isinstance(v, float | int) and not isinstance(v, bool) if want is float else (
                isinstance(v, want) and not (want is int and isinstance(v, bool)))
            if not ok:
                out.append(f"{name} = {v!r}: must be {want.__name__}")
        if out:
            return out

        def rule(cond: bool, what: str) -> None:
            if not cond:
                out.append(what)

        rule(4096 <= self.memory_bytes <= 1 << 40 and self.memory_bytes % 4096 == 0,
             f"memory_bytes = {self.memory_bytes}: a multiple of 4096 up to 1 TiB")
        rule(1 <= self.queues <= 64, f"queues = {self.queues}: 1..64")
        rule(1 <= self.nsid < 0xFFFFFFFF, f"nsid = {self.nsid}: 1..FFFFFFFEh")
        rule(self.lba_size in (512, 4096), f"lba_size = {self.lba_size}: 512 or 4096")
        rule(0 < self.capacity_bytes <= 1 << 50 and self.capacity_bytes % max(self.lba_size, 1) == 0,
             f"capacity_bytes = {self.capacity_bytes}: whole LBAs, up to 1 PiB")
        rule(0 <= self.prefill_bytes <= self.capacity_bytes, f"prefill_bytes = {self.prefill_bytes}: 0..capacity")
        rule(self.pattern in PATTERNS, f"pattern = {self.pattern!r}: one of {', '.join(PATTERNS)}")
        rule(512 <= self.block_size <= 128 << 10 and self.block_size % max(self.lba_size, 1) == 0,
             f"block_size = {self.block_size}: whole LBAs, 512 B..128 KiB")
        rule(1 <= self.iodepth <= 1023, f"iodepth = {self.iodepth}: 1..1023")
        rule(0 <= self.rwmixread <= 100, f"rwmixread = {self.rwmixread}: 0..100")
        rule(0 <= self.rate_iops < 1 << 32, f"rate_iops = {self.rate_iops}: 0..2^32-1")
        rule(0 < self.hot_set <= 1 and 0 <= self.hot_share <= 1, "hot_set in (0, 1], hot_share in [0, 1]")
        rule(0 <= self.trim_percent <= 100, f"trim_percent = {self.trim_percent}: 0..100")
        rule(0 < self.identity_check_s <= 3600, f"identity_check_s = {self.identity_check_s}: (0, 3600]")
        rule(0 <= self.ram_fill < 1 and 0 <= self.ram_dirty_mib_s <= 1 << 20,
             "ram_fill in [0, 1), ram_dirty_mib_s >= 0")
        rule(0 <= self.region_bytes <= self.capacity_bytes and self.region_bytes % max(self.block_size, 1) == 0,
             f"region_bytes = {self.region_bytes}: whole blocks, up to the capacity")
        if self.queue_patterns:
            per = self.queue_patterns.split(",")
            rule(len(per) == self.queues and all(p in PATTERNS for p in per),
                 f"queue_patterns = {self.queue_patterns!r}: {self.queues} of {', '.join(PATTERNS)}, comma-separated")
        if not out:
            blocks = self.workload_bytes // self.block_size // self.queues
            rule(blocks >= 2 * self.iodepth, f"each of the {self.queues} queues needs at least 2 x iodepth blocks")
        return out

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> VmSpec:
        if not isinstance(d, dict):
            raise ValueError(f"a VM spec is a mapping of keys, not {type(d).__name__}")
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown VM spec keys: {sorted(map(str, unknown))}")
        return cls(**d)

    @property
    def workload_bytes(self) -> int:
        return self.region_bytes or self.capacity_bytes

    @property
    def io_queue_depth(self) -> int:
        return max(32, 1 << (self.iodepth + 1).bit_length())  # room for iodepth plus the full-queue slot

    def workload_config(self, queue_index: int) -> WorkloadConfig:
        """Queue i drives its own slice of the namespace, so every block has exactly one writer."""
        blocks = self.workload_bytes // self.block_size
        per = blocks // self.queues
        pattern = self.queue_patterns.split(",")[queue_index] if self.queue_patterns else self.pattern
        reads = {"randread": 1.0, "randwrite": 0.0, "write": 0.0}.get(pattern, self.rwmixread / 100)
        return WorkloadConfig(nsid=self.nsid, lba_size=self.lba_size, block_size=self.block_size,
                              first_lba=queue_index * per * (self.block_size // self.lba_size), nblocks=per,
                              read_fraction=reads, qd=self.iodepth, seed=self.seed * 1000 + queue_index,
                              pattern=pattern, trim_fraction=self.trim_percent / 100, rate_iops=self.rate_iops,
                              hot_set=self.hot_set, hot_share=self.hot_share)


class PauseGate:
    """Where guest threads stop when the hypervisor pauses the VM.

    Threads call the gate at safe points (nothing half-submitted, nobody blocked in a synchronous
    wait). `pause()` returns once every registered thread is parked there; `stop()` makes parked
    and arriving threads raise `VcpuStopped` (the VM left this host)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._paused = False
        self._stopped = False
        self._members = 0
        self._parked = 0

    def join(self) -> None:
        with self._cond:
            self._members += 1

    def leave(self) -> None:
        with self._cond:
            self._members -= 1
            self._cond.notify_all()

    def __call__(self) -> None:
        with self._cond:
            if self._stopped:
                raise VcpuStopped
            if not self._paused:
                return
            self._parked += 1
            self._cond.notify_all()
            while self._paused and not self._stopped:
                self._cond.wait()
            self._parked -= 1
            if self._stopped:
                raise VcpuStopped

    def sleep(self, seconds: float) -> None:
        """A guest thread idling: wakes early for a pause (and parks) or a stop."""
        deadline = time.monotonic() + seconds
        while True:
            self()
            left = deadline - time.monotonic()
            if left <= 0:
                return
            with self._cond:
                if not self._paused and not self._stopped:
                    self._cond.wait(min(left, 0.05))

    def pause(self, timeout: float = 10.0, wake: Callable[[], None] | None = None) -> None:
        """Parks every member; `wake` nudges members blocked elsewhere (waiting for completions)."""
        with self._cond:
            self._paused = True
            self._cond.notify_all()
        if wake is not None:
            wake()
        with self._cond:
            deadline = time.monotonic() + timeout
            while self._parked < self._members:
                left = deadline - time.monotonic()
                if left <= 0:
                    self._paused = False
                    self._cond.notify_all()
                    raise TimeoutError(f"{self._members - self._parked} guest threads did not reach the pause gate")
                self._cond.wait(left)

    def resume(self) -> None:
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused


@dataclass
class GuestCounters:
    """What the guest itself noticed; any non-zero error figure is a failed migration."""

    async_events: int = 0
    ram_pages_written: int = 0
    ram_verify_failures: int = 0
    fatal: list[str] = field(default_factory=list)


class Vm:
    """A VM on one host. Build with `Vm.boot` (new) or `Vm.restore` (arriving by migration)."""

    def __init__(self, spec: VmSpec, mem: GuestMemory) -> None:
        self.spec = spec
        self.mem = mem
        self.driver: NvmeDriver | None = None
        self.workloads: list[Workload] = []
        self.verifier: IdentityVerifier | None = None
        self.timeline: Timeline | None = None
        self.counters = GuestCounters()
        self.gate = PauseGate()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._events: list[Completion] = []
        self._ram_pages: np.ndarray = np.empty(0, dtype=np.int64)  # pages of the "page cache"
        self._ram_gen: np.ndarray = np.empty(0, dtype=np.uint32)
        self._ram_rng = np.random.default_rng(spec.seed)
        self.t0_ns = 0
        self.running = False
        self.arrived = False  # restored from a migration (not booted here)

    # ------------------------------------------------------------------ boot on this host
    @classmethod
    def create_memory(cls, spec: VmSpec) -> GuestMemory:
        return GuestMemory(spec.memory_bytes, base=GUEST_BASE)

    @classmethod
    def boot(cls, spec: VmSpec, mem: GuestMemory, fn: PcieFunction, *, progress: Callable[[int], None] | None = None,
             timeout: float = 10.0) -> Vm:
        """Guest boot: driver bring-up on the VF, I/O queues, an AER, identity baseline, workloads,
        RAM fill and prefill of the namespace. `fn` must already map `mem` in its IOMMU."""
        vm = cls(spec, mem)
        d = vm.driver = NvmeDriver(fn, mem, timeout=timeout)
        d.start()
        d.set_number_of_queues(spec.queues, spec.queues)
        queues = [d.create_io_queue(q + 1, spec.io_queue_depth, vector=(q + 1) % fn.msix.nvectors)
                  for q in range(spec.queues)]
        vm._post_aer()
        vm.verifier = IdentityVerifier(d, spec.nsid)
        vm.verifier.baseline()
        vm.workloads = [Workload(q, mem, spec.workload_config(i)) for i, q in enumerate(queues)]
        vm._fill_ram()
        if spec.prefill_bytes:
            fraction = min(1.0, spec.prefill_bytes / spec.workload_bytes)
            for w in vm.workloads:
                w.prefill(fraction)
        return vm

    def _post_aer(self) -> None:
        assert self.driver is not None and self.driver.admin_q is not None
        self.driver.admin_q.submit(cmd.async_event_request(), callback=self._aer_done, tag=AER_TAG)

    def _aer_done(self, comp: Completion) -> None:
        self._events.append(comp)  # handled (log read, AER re-posted) by the verifier thread

    def _fill_ram(self) -> None:
        """The guest's own data in RAM: pages it owns, each stamped with (page, generation) so that
        after a migration every one can be checked."""
        n = int(self.mem.free_bytes * self.spec.ram_fill) // self.mem.page_size
        if n <= 0:
            return
        addr = self.mem.alloc(n * self.mem.page_size)
        self._ram_pages = (addr - self.mem.base) // self.mem.page_size + np.arange(n, dtype=np.int64)
        self._ram_gen = np.ones(n, dtype=np.uint32)
        self._stamp_pages(np.arange(n))

    def _stamp_pages(self, idx: np.ndarray) -> None:
        """Writes every word of the chosen pages from (page number, generation): a CPU write, logged dirty."""
        ps = self.mem.page_size
        words = np.frombuffer(self.mem.buf, dtype=np.uint64).reshape(-1, ps // 8)
        pages = self._ram_pages[idx]
        gens = self._ram_gen[idx].astype(np.uint64)
        pattern = (pages.astype(np.uint64) << np.uint64(32)) | gens
        words[pages] = pattern[:, None] ^ np.arange(ps // 8, dtype=np.uint64)[None, :]
        for p in pages.tolist():
            self.mem.mark_dirty(self.mem.base + p * ps, ps)
        self.counters.ram_pages_written += len(pages)

    def check_ram(self) -> int:
        """Pages of the guest's RAM data that do not hold what it last wrote there (0 after a good migration)."""
        if not len(self._ram_pages):
            return 0
        ps = self.mem.page_size
        words = np.frombuffer(self.mem.buf, dtype=np.uint64).reshape(-1, ps // 8)
        bad = 0
        for chunk in range(0, len(self._ram_pages), 4096):
            sl = slice(chunk, chunk + 4096)
            pages = self._ram_pages[sl]
            pattern = (pages.astype(np.uint64) << np.uint64(32)) | self._ram_gen[sl].astype(np.uint64)
            want = pattern[:, None] ^ np.arange(ps // 8, dtype=np.uint64)[None, :]
            bad += int((words[pages] != want).any(axis=1).sum())
        return bad

    # ------------------------------------------------------------------ running
    def start(self) -> None:
        """vCPUs go: one thread per I/O queue, the verifier/event thread, and a RAM writer if asked."""
        if not self.t0_ns:
            self.t0_ns = time.monotonic_ns()
        if self.timeline is None:
            self.timeline = Timeline(self.t0_ns)
        for w in self.workloads:
            w.timeline = self.timeline
        self._stop.clear()
        self._threads = [threading.Thread(target=self._vcpu, args=(w,), name=f"{self.spec.name}-vcpu{i}",
                                          daemon=True) for i, w in enumerate(self.workloads)]
        self._threads.append(threading.Thread(target=self._guest_kernel, name=f"{self.spec.name}-kernel",
                                              daemon=True))
        for t in self._threads:
            self.gate.join()
            t.start()
        self.running = True

    def _vcpu(self, w: Workload) -> None:
        try:
            w.run_until(self._stop, gate=self.gate)
        except VcpuStopped:
            pass
        except Exception as e:  # a guest crash: counted, never silent
            self.counters.fatal.append(f"{threading.current_thread().name}: {e!r}")
        finally:
            self.gate.leave()

    def _guest_kernel(self) -> None:
        """Identity checks every identity_check_s, async events, and the RAM writer."""
        assert self.verifier is not None
        # a VM that just arrived by migration checks its identity at once, then periodically
        next_check = time.monotonic() + (0.0 if self.arrived else self.spec.identity_check_s)
        next_fold = time.monotonic() + FOLD_EVERY_S
        rate_pages = self.spec.ram_dirty_mib_s * (1 << 20) / self.mem.page_size
        last = time.monotonic()
        owed = 0.0
        try:
            while not self._stop.is_set():
                self.gate.sleep(0.01)
                now = time.monotonic()
                if rate_pages and len(self._ram_pages):
                    owed += (now - last) * rate_pages
                    n = int(owed)
                    if n:
                        owed -= n
                        idx = np.unique(self._ram_rng.integers(0, len(self._ram_pages), n))
                        self._ram_gen[idx] += 1
                        self._stamp_pages(idx)
                last = now
                if now >= next_fold and self.timeline is not None:
                    next_fold = now + FOLD_EVERY_S
                    self.timeline.fold()  # here, so that no vCPU thread ever stalls folding
                if now >= next_check:
                    next_check = now + self.spec.identity_check_s
                    self.verifier.check()
                self._handle_events()
        except VcpuStopped:
            pass
        except Exception as e:
            self.counters.fatal.append(f"guest kernel: {e!r}")
        finally:
            self.gate.leave()

    def _handle_events(self) -> None:
        assert self.driver is not None and self.driver.admin_q is not None
        self.driver.admin_q.reap()  # AER completions arrive on the admin queue (vector 0)
        while self._events:
            comp = self._events.pop(0)
            self.counters.async_events += 1
            if not comp.ok:
                continue  # aborted at reset: not re-posted
            log_page = (comp.dw0 >> 16) & 0xFF
            try:
                self.driver.get_log(log_page, 512, rae=False)
            except Exception as e:
                self.counters.fatal.append(f"event log {log_page:#x}: {e!r}")
            self._post_aer()

    def pause(self, timeout: float = 10.0) -> int:
        """Stops the vCPUs at their gates; returns the pause time (guest clock, ns)."""
        if self.timeline is not None:
            self.timeline.fold()  # while still running: keeps state() short in the blackout
        self.gate.pause(timeout, wake=self._wake_vcpus)
        return time.monotonic_ns()

    def _wake_vcpus(self) -> None:
        for w in self.workloads:
            w.wake()

    def resume(self) -> None:
        self.gate.resume()

    def kill(self) -> None:
        """The VM left this host: its threads end where they are parked, nothing is drained."""
        self.gate.stop()
        self._stop.set()
        for t in self._threads:
            t.join(10)
        self.running = False

    def stop(self, timeout: float = 30.0) -> None:
        """Normal end of the run: vCPUs finish their in-flight I/O and exit."""
        self._stop.set()
        self.gate.resume()
        for t in self._threads:
            t.join(timeout)
        self.running = False

    def final_verify(self) -> int:
        """After stop(): reads every block of every workload region back; returns the blocks verified."""
        total = 0
        for w in self.workloads:
            stats = w.verify_all()
            total += stats.verified_blocks
        self.counters.ram_verify_failures = self.check_ram()
        return total

    # ------------------------------------------------------------------ migration
    def state(self) -> bytes:
        """The paused guest's non-RAM state (see module docstring), versioned, msgpack."""
        assert self.driver is not None and self.verifier is not None
        return msgpack.packb({
            "v": VM_STATE_VERSION,
            "spec": self.spec.to_dict(),
            "t0_ns": self.t0_ns,
            "allocator": self.mem.allocator_state(),
            "driver": self.driver.state(),
            "workloads": [w.state() for w in self.workloads],
            "timeline": self.timeline.state() if self.timeline is not None else None,
            "verifier": self.verifier.state(),
            "counters": asdict(self.counters),
            "events": [list(c) for c in self._events],
            "ram_pages": self._ram_pages.tobytes(),
            "ram_gen": self._ram_gen.tobytes(),
            "ram_rng": json.dumps(self._ram_rng.bit_generator.state),  # 128-bit integers: too big for msgpack
        }, use_bin_type=True)

    @staticmethod
    def prepare_for(spec: VmSpec) -> None:
        """What a destination can make before the VM's state arrives, so `restore` in the blackout does not:
        the workloads' payload pools (a function of their seeds)."""
        for i in range(spec.queues):
            payload_pool(spec.workload_config(i).seed)

    @classmethod
    def restore(cls, blob: bytes, mem: GuestMemory, fn: PcieFunction) -> Vm:
        """The guest as captured by `state()`, on `fn` (controller state already set) over `mem` (RAM already
        copied). Not running: call `start()` once the controller was resumed."""
        try:
            s = msgpack.unpackb(blob, raw=False, strict_map_key=False)
        except Exception as e:
            raise ValueError(f"VM state is not a msgpack document: {e}") from e
        if not isinstance(s, dict) or s.get("v") != VM_STATE_VERSION:
            raise ValueError(f"VM state version {s.get('v') if isinstance(s, dict) else None!r} "
                             f"is not {VM_STATE_VERSION}")
        vm = cls(VmSpec.from_dict(s["spec"]), mem)
        vm.arrived = True
        if mem.size != vm.spec.memory_bytes or mem.base != GUEST_BASE:
            raise ValueError("guest memory does not match the VM's size and base")
        vm.t0_ns = s["t0_ns"]
        mem.restore_allocator(s["allocator"])
        d = vm.driver = NvmeDriver.restore(fn, mem, s["driver"])
        vm.timeline = Timeline.restore(s["timeline"]) if s["timeline"] is not None else None
        by_qid = {}
        for ws in s["workloads"]:
            w = Workload.restore(d.io_queues[ws["qid"]], mem, ws, timeline=vm.timeline)
            vm.workloads.append(w)
            by_qid[ws["qid"]] = w

        def resolve(qid: int, tag: object) -> Callable[[Completion], None]:
            if qid == 0:
                if tag != AER_TAG:
                    raise ValueError(f"unknown admin command tag {tag!r} in VM state")
                return vm._aer_done
            return by_qid[qid].callback_for(tag)

        d.bind(resolve)
        vm.verifier = IdentityVerifier.restore(d, s["verifier"])
        vm.counters = GuestCounters(**s["counters"])
        vm._events = [Completion(*c) for c in s["events"]]
        vm._ram_pages = np.frombuffer(s["ram_pages"], dtype=np.int64).copy()
        vm._ram_gen = np.frombuffer(s["ram_gen"], dtype=np.uint32).copy()
        vm._ram_rng.bit_generator.state = json.loads(s["ram_rng"])
        return vm

    # ------------------------------------------------------------------ reporting
    def io_counts(self) -> dict[str, int]:
        """Completed guest I/Os so far, all and by kind (a snapshot; the vCPUs keep counting)."""
        stats = [w.stats for w in self.workloads]
        return {"ios": sum(s.ios for s in stats), "reads": sum(s.reads for s in stats),
                "writes": sum(s.writes for s in stats)}

    def report(self) -> dict[str, Any]:
        """The guest part of a migration report (see docs/scenarios.md and the report schema)."""
        stats = [w.stats for w in self.workloads]
        verifier = self.verifier
        tl = self.timeline
        errors = sum(s.errors for s in stats)
        timeouts = sum(s.timeouts for s in stats)
        spurious = self.driver.spurious_completions if self.driver is not None else 0
        failures = [f for s in stats for f in s.verify_failures]  # examples (the first ones of each)
        fatal = self.counters.fatal + [f"vCPU {i}: {s.fatal}" for i, s in enumerate(stats) if s.fatal]
        elapsed = (time.monotonic_ns() - self.t0_ns) / 1e9 if self.t0_ns else 0.0
        ios = sum(s.ios for s in stats)
        return {
            "ios": ios, "reads": sum(s.reads for s in stats), "writes": sum(s.writes for s in stats),
            "trims": sum(s.trims for s in stats),
            "errors": errors + (verifier.errors if verifier else 0) + len(fatal),
            "timeouts": timeouts, "spurious_completions": spurious,
            "identity_checks": verifier.checks if verifier else 0,
            "identity_changes": verifier.changes if verifier else 0,
            "verified_reads": sum(s.verified_reads for s in stats),
            "verified_blocks": sum(s.verified_blocks for s in stats),
            "verify_failures": sum(s.verify_failure_count for s in stats) + self.counters.ram_verify_failures,
            "verify_failure_examples": [f"LBA {f.lba} gen {f.expected_generation}: {f.reason}" for f in failures[:10]]
            + fatal[:10] + (verifier.last[:5] if verifier and verifier.changes else []),
            "ram_pages_written": self.counters.ram_pages_written,
            "ram_verify_failures": self.counters.ram_verify_failures,
            "async_events": self.counters.async_events,
            "iops": ios / elapsed if elapsed else 0.0,
            "latency_us": tl.percentiles_us() if tl is not None else {},
        }

    def close(self) -> None:
        if self.running:
            self.kill()
