"""A verified workload over one I/O queue, in fio's vocabulary: what a guest's application does.

Every block the workload writes starts with a header, so any block read back proves itself:

    bytes 0-7   LBA the block was written to (u64, little-endian) - catches misdirected I/O
    bytes 8-15  generation: how many times the workload has written this block (u64) - catches
                lost or stale writes (a migration that forgot the last delta shows up here)
    bytes 16-19 CRC-32 (zlib) of the rest of the block, bytes 20..end - catches torn or corrupted data

The payload after the header is a slice of a random pool chosen by (LBA, generation), so two
writes of the same block differ. A block the workload never wrote must read back as zeroes, and
so must a block it trimmed (Dataset Management with Attribute Deallocate, or Write Zeroes with
DEAC: the exported template reports DLFEAT 09h, deallocated blocks read as zeroes). A trim keeps
the block's generation; the next write continues at generation + 1, so generations only grow.
Blocks with an I/O in flight are never picked again until it completes, so the expected content
of every read is known exactly, at any queue depth.

Patterns: `randread`, `randwrite`, `randrw` (`read_fraction` = rwmixread/100), `write` (sequential,
wrapping), `trim` (random reads and writes, `trim_fraction` of the writes deallocate). `hot_set`
(a fraction of the region, its first blocks) receives `hot_share` of the random I/O. `rate_iops`
paces submissions on a schedule (no busy waiting). Random choices come from numpy in batches.

The engine only uses the host driver's queue API (`IoQueue.submit` with a callback and a `tag`,
`QueuePair.ring`, `reap`, `irq`): commands are submitted in batches and the doorbell is rung once
per batch. `run_until(stop, gate=...)` is the VM's vCPU loop: `gate()` is called at a safe point
(everything submitted is rung, nobody waits synchronously), where the VM may pause it or stop it
with `VcpuStopped`; `state()` / `restore()` then move the workload with the VM, its in-flight
commands completing at the destination through `callback_for(tag)`.
"""

from __future__ import annotations

import dataclasses
import json
import secrets
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from nvme_lm.host.memory import DmaMemory
from nvme_lm.host.qpair import NvmeTimeout
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.opcodes import IoOpcode
from nvme_lm.vm.blocks import HEADER, HEADER_SIZE, check_block, check_trimmed, fill_block, payload_pool
from nvme_lm.vm.latency import LatencyRecorder

if TYPE_CHECKING:
    from nvme_lm.host.driver import IoQueue
    from nvme_lm.host.qpair import Callback, Completion
    from nvme_lm.vm.timeline import Timeline

DSM_RANGE = struct.Struct("<IIQ")  # Dataset Management range: context attributes, NLB, SLBA
DSM_AD = 1 << 2  # CDW11 of Dataset Management: attribute deallocate
WZ_DEAC = 1 << 25  # CDW12 of Write Zeroes: deallocate
WORKLOAD_STATE_VERSION = 2  # 2: per-block bookkeeping in guest memory ("book")
PATTERNS = ("randread", "randwrite", "randrw", "write", "trim")
TRIM_OPS = ("dsm", "write_zeroes")
MAX_FAILURE_EXAMPLES = 1000  # verify failures kept in full; all of them are counted
_BATCH = 4096  # random choices drawn from numpy per refill
_SKIP_LIMIT = 64  # picks of in-flight blocks tolerated per slot before leaving it for the next round
_TICK_NS = 5_000_000  # longest wait without passing the gate (pause and stop latency)
_GATE_SLACK_NS = 1_000_000  # a gate that held the vCPU longer than this was a pause: not a hang
_PROGRESS_EVERY_NS = 100_000_000
READ, WRITE, TRIM = 0, 1, 2  # slot operation kinds
_READ = int(IoOpcode.READ)
_WRITE = int(IoOpcode.WRITE)
_DSM = int(IoOpcode.DATASET_MANAGEMENT)
_WZ = int(IoOpcode.WRITE_ZEROES)


class VcpuStopped(BaseException):
    """Raised by a gate to stop a vCPU where it stands: no drain, in-flight commands stay outstanding."""


def trim_op_for(oncs: int) -> str:
    """The deallocating command a controller offers (Identify Controller ONCS): DSM, else Write Zeroes."""
    if oncs & (1 << 2):
        return "dsm"
    if oncs & (1 << 3):
        return "write_zeroes"
    raise ValueError("the controller supports neither Dataset Management nor Write Zeroes")


@dataclass(frozen=True)
class WorkloadConfig:
    nsid: int
    lba_size: int
    block_size: int = 4096
    first_lba: int = 0
    nblocks: int = 4096  # size of the region the workload touches, in blocks
    read_fraction: float = 0.5  # rwmixread / 100, for randrw and trim
    qd: int = 1
    seed: int | None = None
    verify: bool = True
    timeout: float = 10.0  # no completion for this long is a hang, reported as NvmeTimeout
    pattern: str = "randrw"
    trim_fraction: float = 0.25  # pattern trim: share of the writes that deallocate instead
    trim_op: str = "dsm"  # "dsm" (Dataset Management, AD) or "write_zeroes" (DEAC): see trim_op_for()
    rate_iops: float = 0.0  # 0 = unlimited
    hot_set: float = 1.0  # fraction of the region (its first blocks) that gets hot_share of random I/O
    hot_share: float = 0.9
    max_transfer: int = 128 << 10  # bytes per command for prefill / verify_all (template MDTS 5)

    def __post_init__(self) -> None:
        if self.block_size % self.lba_size or self.block_size <= HEADER_SIZE or self.block_size % 8:
            raise ValueError("block_size must be a multiple of lba_size and larger than the header")
        if not 0.0 <= self.read_fraction <= 1.0:
            raise ValueError("read_fraction must be within [0, 1]")
        if self.qd < 1 or self.nblocks < 2 * self.qd:
            raise ValueError("need qd >= 1 and at least 2*qd blocks (a block is never in flight twice)")
        if self.pattern not in PATTERNS:
            raise ValueError(f"pattern {self.pattern!r} is not one of {', '.join(PATTERNS)}")
        if not 0.0 <= self.trim_fraction <= 1.0:
            raise ValueError("trim_fraction must be within [0, 1]")
        if self.trim_op not in TRIM_OPS:
            raise ValueError(f"trim_op {self.trim_op!r} is not one of {', '.join(TRIM_OPS)}")
        if self.rate_iops < 0:
            raise ValueError("rate_iops must be >= 0 (0 = unlimited)")
        if not 0.0 < self.hot_set <= 1.0 or not 0.0 <= self.hot_share <= 1.0:
            raise ValueError("hot_set must be within (0, 1] and hot_share within [0, 1]")
        if self.max_transfer < self.block_size:
            raise ValueError("max_transfer must hold at least one block")

    @property
    def lbas_per_block(self) -> int:
        return self.block_size // self.lba_size

    @property
    def effective_read_fraction(self) -> float:
        return {"randread": 1.0, "randwrite": 0.0, "write": 0.0}.get(self.pattern, self.read_fraction)

    @property
    def hot_blocks(self) -> int:
        return max(1, min(self.nblocks, round(self.hot_set * self.nblocks)))


@dataclass(frozen=True)
class VerifyFailure:
    lba: int
    expected_generation: int
    reason: str
    expected_zero: bool = False  # the block was expected to read as zeroes (never written, or trimmed)


@dataclass
class WorkloadStats:
    reads: int = 0
    writes: int = 0
    trims: int = 0
    errors: int = 0  # commands that completed with an error status
    error_statuses: dict[int, int] = field(default_factory=dict)  # 15-bit status field -> count
    verify_failures: list[VerifyFailure] = field(default_factory=list)  # the first MAX_FAILURE_EXAMPLES
    verify_failure_count: int = 0
    verified_reads: int = 0  # single-block reads checked during runs
    verified_blocks: int = 0  # blocks checked by verify_all sweeps
    submitted: int = 0  # commands submitted by runs; == ios once drained (each completes exactly once)
    timeouts: int = 0
    fatal: str | None = None  # why run_until ended early (a timeout, a driver error)
    elapsed: float = 0.0
    block_size: int = 4096
    read_latency: LatencyRecorder = field(default_factory=LatencyRecorder)
    write_latency: LatencyRecorder = field(default_factory=LatencyRecorder)  # writes and trims

    @property
    def ios(self) -> int:
        return self.reads + self.writes + self.trims

    @property
    def iops(self) -> float:
        return self.ios / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def mib_s(self) -> float:
        return self.iops * self.block_size / (1 << 20)

    @property
    def latency(self) -> LatencyRecorder:
        both = LatencyRecorder()
        both.merge(self.read_latency)
        both.merge(self.write_latency)
        return both

    def add_failure(self, failure: VerifyFailure) -> None:
        self.verify_failure_count += 1
        if len(self.verify_failures) < MAX_FAILURE_EXAMPLES:
            self.verify_failures.append(failure)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ios": self.ios,
            "reads": self.reads,
            "writes": self.writes,
            "trims": self.trims,
            "errors": self.errors,
            "error_statuses": {f"{k:#06x}": v for k, v in sorted(self.error_statuses.items())},
            "timeouts": self.timeouts,
            "fatal": self.fatal,
            "verified_reads": self.verified_reads,
            "verified_blocks": self.verified_blocks,
            "verify_failures": self.verify_failure_count,
            "verify_failure_examples": [vars(f) for f in self.verify_failures[:10]],
            "elapsed_s": round(self.elapsed, 6),
            "iops": round(self.iops, 1),
            "mib_s": round(self.mib_s, 2),
            "latency_us": {
                "all": _rounded(self.latency.summary_us()),
                "read": _rounded(self.read_latency.summary_us()),
                "write": _rounded(self.write_latency.summary_us()),
            },
        }

    # counters carried by Workload.state() (per-I/O latencies are not: the Timeline carries a histogram)
    _COUNTERS = ("reads", "writes", "trims", "errors", "verify_failure_count", "verified_reads", "verified_blocks",
                 "submitted", "timeouts", "fatal", "elapsed", "block_size")

    def counters(self) -> dict[str, Any]:
        d: dict[str, Any] = {k: getattr(self, k) for k in self._COUNTERS}
        d["error_statuses"] = [[k, v] for k, v in self.error_statuses.items()]
        d["verify_failures"] = [[f.lba, f.expected_generation, f.reason, f.expected_zero]
                                for f in self.verify_failures]
        return d

    @classmethod
    def from_counters(cls, d: dict[str, Any]) -> WorkloadStats:
        s = cls(**{k: d[k] for k in cls._COUNTERS})
        s.error_statuses = {int(k): int(v) for k, v in d["error_statuses"]}
        s.verify_failures = [VerifyFailure(int(a), int(b), str(c), bool(z)) for a, b, c, z in d["verify_failures"]]
        return s


def _rounded(d: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if v != v else round(v, 2)) for k, v in d.items()}  # NaN -> null for JSON


Progress = Callable[[int], None]  # called with the number of I/Os completed so far
Gate = Callable[[], None]


class Workload:
    """Verified I/O on the region [first_lba, first_lba + nblocks*lbas_per_block) of a namespace.

    `stats` accumulates everything `run_until` did (and what `verify_all` checked) over the
    workload's whole life, across migrations; `run`, `prefill` and `verify_all` also return their
    own per-call stats. With a `timeline`, `run_until` records latencies there (a histogram)
    instead of keeping every sample in `stats`."""

    def __init__(self, queue: IoQueue, mem: DmaMemory, config: WorkloadConfig, *,
                 timeline: Timeline | None = None) -> None:
        self._setup(queue, mem, config, timeline, pool_seed=None, bufs=None, book=None)

    def _setup(self, queue: IoQueue, mem: DmaMemory, config: WorkloadConfig, timeline: Timeline | None,
               pool_seed: int | None, bufs: list[int] | None, book: int | None) -> None:
        self.queue = queue
        self.qp = queue.qp
        self.mem = mem
        self.cfg = cfg = config
        self.timeline = timeline
        n, qd, bs = cfg.nblocks, cfg.qd, cfg.block_size
        # The per-block bookkeeping lives in guest memory, as an application's data would: it moves with
        # the VM's RAM (pre-copy sends the pages its completions dirty), not in the VM state.
        self._book = book if book is not None else mem.alloc(9 * n)
        gen_view = mem.view(self._book, 8 * n)
        self.generations = gen_view.cast("Q")  # last generation written per block (monotonic)
        self.zeroed = mem.view(self._book + 8 * n, n)  # 1: trimmed since its last write, must read as zeroes
        self.unknown: set[int] = set()  # blocks whose content is uncertain after a failed write or trim
        self._gen_np = np.frombuffer(gen_view, dtype=np.uint64)
        self._zero_np = np.frombuffer(self.zeroed, dtype=np.uint8)
        self.pool_seed = pool_seed if pool_seed is not None else (
            cfg.seed if cfg.seed is not None else secrets.randbits(63))
        self._pool = payload_pool(self.pool_seed)
        self._rng = np.random.default_rng(cfg.seed)
        self._mark_dirty = getattr(mem, "mark_dirty", None)  # CPU writes feed the guest's dirty log
        self._bufs = bufs if bufs is not None else [mem.alloc(bs) for _ in range(qd)]
        self._views = [mem.view(a, bs) for a in self._bufs]
        self._sqes = [SQE(nsid=cfg.nsid) for _ in range(qd)]
        self._callbacks = [partial(self._done, s) for s in range(qd)]
        self._slot_block = [0] * qd
        self._slot_gen = [0] * qd
        self._slot_kind = [READ] * qd
        self._slot_start = [0] * qd
        self._free: list[int] = list(range(qd - 1, -1, -1))
        self._inflight: set[int] = set()  # blocks with a command in flight
        self.stats = WorkloadStats(block_size=bs)
        self._cur = self.stats  # where completions are counted (a run()'s own stats while it runs)
        self._keep_latency = True
        self._clock = time.monotonic_ns
        self._anchor_ns = 0  # last sign of life of the queue (completion, start, pause end): hang detection
        self._nhot = cfg.hot_blocks
        self._rf = cfg.effective_read_fraction
        self._seq_next = 0
        self._origin: Any = None
        self._bblocks: list[int] = []
        self._bkinds: list[int] = []
        self._pos = 0
        self._refill()

    # ------------------------------------------------------------------------------ public API
    def lba_of(self, block: int) -> int:
        return self.cfg.first_lba + block * self.cfg.lbas_per_block

    @property
    def inflight(self) -> int:
        """Commands of the run engine in flight (outstanding at the controller or not yet reaped)."""
        return self.cfg.qd - len(self._free)

    def _touched(self, first: int, k: int) -> None:
        """CPU writes to the bookkeeping of blocks [first, first + k): logged as dirty guest pages."""
        mark = self._mark_dirty
        if mark is not None:
            mark(self._book + 8 * first, 8 * k)
            mark(self._book + 8 * self.cfg.nblocks + first, k)

    def callback_for(self, tag: object) -> Callback:
        """The completion callback of slot `tag` (what `NvmeDriver.bind` needs after a restore)."""
        return self._callbacks[int(tag)]  # type: ignore[call-overload]

    def wake(self) -> None:
        """Makes a waiting engine pass its gate now instead of at its next tick (a pause or stop request)."""
        self.qp.irq.set()

    def prefill(self, fraction: float = 1.0, progress: Progress | None = None, *, inflight: int = 4) -> WorkloadStats:
        """Writes the first `fraction` of the region once (generation + 1 on each block) with large
        commands, `inflight` at a time, so reads there hit written data."""
        if not 0.0 <= fraction <= 1.0:
            raise ValueError("fraction must be within [0, 1]")
        return self._bulk(round(fraction * self.cfg.nblocks), True, progress, inflight)

    def verify_all(self, progress: Progress | None = None, *, inflight: int = 4) -> WorkloadStats:
        """Reads the whole region back with large commands and checks every block (a full sweep after a
        run or a migration). Checked blocks and failures are also added to `stats`."""
        sweep = self._bulk(self.cfg.nblocks, False, progress, inflight)
        s = self.stats
        s.verified_blocks += sweep.verified_blocks
        s.errors += sweep.errors
        for k, v in sweep.error_statuses.items():
            s.error_statuses[k] = s.error_statuses.get(k, 0) + v
        s.verify_failure_count += sweep.verify_failure_count - len(sweep.verify_failures)
        for f in sweep.verify_failures:
            s.add_failure(f)
        return sweep

    def run(self, seconds: float | None = None, *, ios: int | None = None,
            progress: Progress | None = None) -> WorkloadStats:
        """The pattern for `seconds` and/or `ios` submitted I/Os, verified; returns this run's stats."""
        if seconds is None and ios is None:
            raise ValueError("give seconds and/or ios")
        stats = WorkloadStats(block_size=self.cfg.block_size)
        deadline = None if seconds is None else self._clock() + int(seconds * 1e9)
        self._cur, self._keep_latency = stats, True
        t0 = self._clock()
        try:
            self._engine(stats, None, deadline, ios, None, progress)
        finally:
            stats.elapsed = (self._clock() - t0) / 1e9
            self._cur = self.stats
        return stats

    def run_until(self, stop: threading.Event, *, gate: Gate | None = None,
                  progress: Progress | None = None) -> WorkloadStats:
        """The vCPU loop: runs the pattern until `stop` is set, drains, returns the cumulative `stats`.

        `gate()` runs once per iteration at a safe point (batch submitted and rung, before waiting);
        it may block (VM paused) or raise VcpuStopped, which propagates at once without draining.
        A timeout or a driver error ends the run with `stats.fatal` set instead of raising."""
        stats = self.stats
        self._cur, self._keep_latency = stats, self.timeline is None
        t0 = self._clock()
        try:
            self._engine(stats, stop, None, None, gate, progress)
        except NvmeTimeout as e:
            stats.timeouts += 1
            stats.fatal = f"timeout: {e}"
        except Exception as e:
            stats.fatal = f"{type(e).__name__}: {e}"
        finally:
            stats.elapsed += (self._clock() - t0) / 1e9
        return stats

    def close(self) -> None:
        for addr in self._bufs:
            self.mem.free(addr)
        self._bufs = []
        if self._book is not None:
            self.generations.release()
            self.mem.free(self._book)
            self._book = None

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ migration
    def state(self) -> dict[str, Any]:
        """The workload as plain data (msgpack-able): config, buffers (addresses in guest memory, which
        moves with the VM), per-block generations and trim map, in-flight slots, RNG position, counters."""
        free = set(self._free)
        slots = [[s, self._slot_block[s], self._slot_gen[s], self._slot_kind[s], self._slot_start[s]]
                 for s in range(self.cfg.qd) if s not in free]
        return {"v": WORKLOAD_STATE_VERSION, "qid": self.qp.qid, "config": dataclasses.asdict(self.cfg),
                "pool_seed": self.pool_seed, "bufs": list(self._bufs), "book": self._book,
                "unknown": sorted(self.unknown), "slots": slots,
                "free": list(self._free),
                "origin": self._origin if self.cfg.pattern == "write" else json.dumps(self._origin),
                "pos": self._pos, "stats": self.stats.counters()}

    @classmethod
    def restore(cls, queue: IoQueue, mem: DmaMemory, state: dict[str, Any], *,
                timeline: Timeline | None = None) -> Workload:
        """The captured workload on `queue` over `mem` (its buffers already there). In-flight slots are
        not resubmitted: they complete through `callback_for(slot)`, bound with `NvmeDriver.bind`."""
        if state.get("v") != WORKLOAD_STATE_VERSION:
            raise ValueError(f"workload state version {state.get('v')!r} is not {WORKLOAD_STATE_VERSION}")
        if state["qid"] != queue.qid:
            raise ValueError(f"workload state is for I/O queue {state['qid']}, not {queue.qid}")
        w = cls.__new__(cls)
        w._setup(queue, mem, WorkloadConfig(**state["config"]), timeline, pool_seed=state["pool_seed"],
                 bufs=[int(a) for a in state["bufs"]], book=int(state["book"]))
        w.unknown = {int(b) for b in state["unknown"]}
        for s, block, gen, kind, start in state["slots"]:
            w._slot_block[s], w._slot_gen[s], w._slot_kind[s], w._slot_start[s] = block, gen, kind, start
            w._inflight.add(block)
        w._free = [int(s) for s in state["free"]]
        if w.cfg.pattern == "write":
            w._seq_next = state["origin"]
        else:
            w._rng.bit_generator.state = json.loads(state["origin"])
        w._refill()  # the batch in use at capture, drawn again from its origin
        w._pos = state["pos"]
        w.stats = w._cur = WorkloadStats.from_counters(state["stats"])
        return w

    # ------------------------------------------------------------------------------ op stream
    def _refill(self) -> None:
        """Draws the next batch of (block, kind); remembers where it came from so a restore redraws it."""
        cfg, n = self.cfg, self.cfg.nblocks
        if cfg.pattern == "write":
            self._origin = start = self._seq_next
            self._bblocks = ((np.arange(_BATCH, dtype=np.int64) + start) % n).tolist()
            self._bkinds = [WRITE] * _BATCH
            self._seq_next = (start + _BATCH) % n
        else:
            rng = self._rng
            self._origin = rng.bit_generator.state
            nhot = self._nhot
            if nhot < n:
                hot = rng.random(_BATCH) < cfg.hot_share
                blocks = np.where(hot, rng.integers(0, nhot, _BATCH), rng.integers(nhot, n, _BATCH))
            else:
                blocks = rng.integers(0, n, _BATCH)
            kinds = (rng.random(_BATCH) >= self._rf).astype(np.int64)
            if cfg.pattern == "trim" and cfg.trim_fraction > 0:
                kinds[(kinds == WRITE) & (rng.random(_BATCH) < cfg.trim_fraction)] = TRIM
            self._bblocks = blocks.tolist()
            self._bkinds = kinds.tolist()
        self._pos = 0

    # ------------------------------------------------------------------------------ engine
    def _engine(self, stats: WorkloadStats, stop: threading.Event | None, deadline: int | None,
                limit: int | None, gate: Gate | None, progress: Progress | None) -> None:
        """Keeps up to `qd` commands in flight (paced by rate_iops) until `stop` is set, `deadline`
        (monotonic ns) passes or `limit` commands were submitted; then drains."""
        qp, free, inflight, clock = self.qp, self._free, self._inflight, self._clock
        submit = self._submit
        rate = self.cfg.rate_iops
        interval = 1e9 / rate if rate else 0.0
        burst_ns = min(self.cfg.qd, max(2, int(rate * 0.002))) * interval  # catch-up allowed after a late wake
        now = clock()
        due = float(now)
        self._anchor_ns = now
        next_progress = now + _PROGRESS_EVERY_NS
        left = -1 if limit is None else limit
        while True:
            now = clock()
            if (stop is not None and stop.is_set()) or (deadline is not None and now >= deadline) or left == 0:
                break
            n = len(free)
            if 0 <= left < n:
                n = left
            if rate and n:
                if due < now - burst_ns:
                    due = now - burst_ns
                tokens = int((now - due) // interval) + 1 if now >= due else 0
                if tokens < n:
                    n = tokens
                due += n * interval
            if n and not inflight:
                self._anchor_ns = now  # idle until now (paced): the hang clock starts with this batch
            for _ in range(n):
                for _draw in range(_SKIP_LIMIT + 1):  # never two I/Os on one block at once: draw again
                    pos = self._pos
                    if pos == _BATCH:
                        self._refill()
                        pos = 0
                    block = self._bblocks[pos]
                    kind = self._bkinds[pos]
                    self._pos = pos + 1
                    if block not in inflight:
                        submit(free.pop(), block, kind)
                        stats.submitted += 1
                        if left > 0:
                            left -= 1
                        break
            qp.ring()
            if gate is not None:
                self._pass_gate(gate)
            until = clock() + _TICK_NS
            if rate and free and now < due < until:  # the next token, unless blocks are what we lack
                until = int(due)
            self._wait(until)
            if progress is not None and now >= next_progress:
                next_progress = now + _PROGRESS_EVERY_NS
                progress(stats.ios)
        while inflight:  # drain what is still in flight
            if gate is not None:
                self._pass_gate(gate)
            self._wait(clock() + _TICK_NS)
        if progress is not None:
            progress(stats.ios)

    def _pass_gate(self, gate: Gate) -> None:
        t = self._clock()
        gate()
        held = self._clock() - t
        if held > _GATE_SLACK_NS:
            self._anchor_ns += held  # a pause is not a hang: the wait starts again after it

    def _wait(self, until_ns: int) -> int:
        """Reaps completions (callbacks run here) or waits for an interrupt until `until_ns`; raises
        NvmeTimeout when commands are in flight and nothing completed for `timeout` seconds."""
        qp, clock = self.qp, self._clock
        timeout_ns = int(self.cfg.timeout * 1e9)
        while True:
            qp.irq.clear()
            n = qp.reap()
            now = clock()
            if n:
                self._anchor_ns = now
                return n
            if self._inflight and now - self._anchor_ns > timeout_ns:
                raise NvmeTimeout(f"no completion on queue {qp.qid} within {self.cfg.timeout:.1f}s "
                                  f"({len(self._inflight)} commands in flight)")
            left = until_ns - now
            if left <= 0:
                return 0
            if self._inflight:
                left = min(left, self._anchor_ns + timeout_ns - now + 1)
            qp.irq.wait(left / 1e9)

    def _submit(self, slot: int, block: int, kind: int) -> None:
        sqe = self._sqes[slot]
        cfg = self.cfg
        lba = self.lba_of(block)
        if kind == READ:
            sqe.opcode, sqe.cdw10, sqe.cdw11, sqe.cdw12 = _READ, lba & 0xFFFFFFFF, lba >> 32, cfg.lbas_per_block - 1
            length = cfg.block_size
        elif kind == WRITE:
            sqe.opcode, sqe.cdw10, sqe.cdw11, sqe.cdw12 = _WRITE, lba & 0xFFFFFFFF, lba >> 32, cfg.lbas_per_block - 1
            length = cfg.block_size
            gen = self.generations[block] + 1
            if cfg.verify:
                fill_block(self._views[slot], lba, gen, self._pool)
                if self._mark_dirty is not None:
                    self._mark_dirty(self._bufs[slot], cfg.block_size)
            self._slot_gen[slot] = gen
        elif cfg.trim_op == "dsm":
            DSM_RANGE.pack_into(self._views[slot], 0, 0, cfg.lbas_per_block, lba)
            if self._mark_dirty is not None:
                self._mark_dirty(self._bufs[slot], DSM_RANGE.size)
            sqe.opcode, sqe.cdw10, sqe.cdw11, sqe.cdw12 = _DSM, 0, DSM_AD, 0  # one range
            length = DSM_RANGE.size
        else:
            sqe.opcode, sqe.cdw10, sqe.cdw11 = _WZ, lba & 0xFFFFFFFF, lba >> 32
            sqe.cdw12 = (cfg.lbas_per_block - 1) | WZ_DEAC
            sqe.prp1 = sqe.prp2 = 0
            length = 0
        self._slot_kind[slot] = kind
        self._slot_block[slot] = block
        self._inflight.add(block)
        self._slot_start[slot] = self._clock()
        try:
            self.queue.submit(sqe, self._bufs[slot], length, self._callbacks[slot], ring=False, tag=slot)
        except BaseException:
            self._inflight.discard(block)
            self._free.append(slot)
            raise

    def _done(self, slot: int, comp: Completion) -> None:
        """Completion callback (runs in the reaping thread): latency, verification, bookkeeping."""
        now = self._clock()
        took = now - self._slot_start[slot]
        block = self._slot_block[slot]
        kind = self._slot_kind[slot]
        stats = self._cur
        if kind == READ:
            stats.reads += 1
            if self._keep_latency:
                stats.read_latency.record(took)
        else:
            if kind == WRITE:
                stats.writes += 1
            else:
                stats.trims += 1
            if self._keep_latency:
                stats.write_latency.record(took)
        if self.timeline is not None:
            self.timeline.record(now, took)
        if comp.status & 0x7FF:
            stats.errors += 1
            stats.error_statuses[comp.status] = stats.error_statuses.get(comp.status, 0) + 1
            if kind != READ:
                self.unknown.add(block)  # a failed write or trim may have landed partly
        elif kind == WRITE:
            self.generations[block] = self._slot_gen[slot]
            self.zeroed[block] = 0
            self._touched(block, 1)
            self.unknown.discard(block)
        elif kind == TRIM:
            self.zeroed[block] = 1
            self._touched(block, 1)
            self.unknown.discard(block)
        elif self.cfg.verify and block not in self.unknown:
            lba = self.lba_of(block)
            gen = self.generations[block]
            stats.verified_reads += 1
            if self.zeroed[block]:
                why = check_trimmed(self._views[slot], lba, gen)
            else:
                why = check_block(self._views[slot], lba, gen)
            if why is not None:
                stats.add_failure(VerifyFailure(lba, gen, why, bool(self.zeroed[block]) or gen == 0))
        self._inflight.discard(block)
        self._free.append(slot)

    # ------------------------------------------------------------------------------ bulk I/O
    def _bulk(self, total: int, write: bool, progress: Progress | None, inflight: int) -> WorkloadStats:
        """Blocks [0, total) written (generation + 1) or read and checked, `max_transfer` per command."""
        if self._inflight:
            raise RuntimeError("prefill/verify_all need an idle workload (a run has commands in flight)")
        cfg, mem, qp = self.cfg, self.mem, self.qp
        bs = cfg.block_size
        per = max(1, min(cfg.max_transfer // bs, 65536 // cfg.lbas_per_block))
        nbuf = max(1, min(inflight, -(-total // per) or 1, qp.depth - 1))
        stats = WorkloadStats(block_size=bs)
        bufs = [mem.alloc(per * bs) for _ in range(nbuf)]
        free = list(range(nbuf))
        busy: dict[int, tuple[int, int, int]] = {}  # buffer -> (first block, blocks, submit time)
        clock = self._clock
        t0 = clock()
        next_progress = t0 + _PROGRESS_EVERY_NS

        def done(i: int, comp: Completion) -> None:
            first, k, start = busy.pop(i)
            took = clock() - start
            if write:
                stats.writes += k
                stats.write_latency.record(took)
            else:
                stats.reads += k
                stats.read_latency.record(took)
            if comp.status & 0x7FF:
                stats.errors += 1
                stats.error_statuses[comp.status] = stats.error_statuses.get(comp.status, 0) + 1
                if write:
                    self.unknown.update(range(first, first + k))
            elif write:
                self._gen_np[first : first + k] += np.uint64(1)
                self._zero_np[first : first + k] = 0
                self._touched(first, k)
                self.unknown.difference_update(range(first, first + k))
            elif cfg.verify:
                self._check_span(mem.view(bufs[i], k * bs), first, k, stats)
            free.append(i)

        nxt = 0
        try:
            while nxt < total or busy:
                while free and nxt < total:
                    i = free.pop()
                    k = min(per, total - nxt)
                    if write:
                        self._fill_span(mem.view(bufs[i], k * bs), nxt, k)
                        if self._mark_dirty is not None:
                            self._mark_dirty(bufs[i], k * bs)
                    lba = self.lba_of(nxt)
                    sqe = SQE(opcode=_WRITE if write else _READ, nsid=cfg.nsid, cdw10=lba & 0xFFFFFFFF,
                              cdw11=lba >> 32, cdw12=k * cfg.lbas_per_block - 1)
                    busy[i] = (nxt, k, clock())
                    try:
                        self.queue.submit(sqe, bufs[i], k * bs, partial(done, i), ring=False)
                    except BaseException:
                        busy.pop(i)
                        free.append(i)
                        raise
                    nxt += k
                qp.ring()
                if busy:
                    qp.wait_any(cfg.timeout)
                now = clock()
                if progress is not None and now >= next_progress:
                    next_progress = now + _PROGRESS_EVERY_NS
                    progress(stats.ios)
        finally:
            stats.elapsed = (clock() - t0) / 1e9
            if not busy:  # buffers the device may still write into are leaked, not reused
                for a in bufs:
                    mem.free(a)
        if progress is not None:
            progress(stats.ios)
        return stats

    def _fill_span(self, view: memoryview, first: int, k: int) -> None:
        bs, pool, gens = self.cfg.block_size, self._pool, self.generations
        if not self.cfg.verify:
            return
        for j in range(k):
            b = first + j
            fill_block(view[j * bs : (j + 1) * bs], self.lba_of(b), gens[b] + 1, pool)

    def _check_span(self, view: memoryview, first: int, k: int, stats: WorkloadStats) -> None:
        """Checks k blocks read into `view`: zero-expected rows that are zero in one numpy pass, the
        others one by one (header + CRC, or the reason they are not zero)."""
        bs = self.cfg.block_size
        gens = self._gen_np[first : first + k]
        zero_exp = (gens == 0) | (self._zero_np[first : first + k] != 0)
        nonzero = np.frombuffer(view, dtype=np.uint64).reshape(k, bs // 8).any(axis=1)
        unknown = self.unknown
        skipped = [j for j in range(k) if first + j in unknown] if unknown else []
        stats.verified_blocks += k - len(skipped)
        for j in np.flatnonzero(~zero_exp | nonzero).tolist():
            b = first + j
            if b in unknown:
                continue
            lba, gen = self.lba_of(b), int(gens[j])
            block = view[j * bs : (j + 1) * bs]
            if not zero_exp[j]:
                why = check_block(block, lba, gen)
            elif self.zeroed[b]:
                why = check_trimmed(block, lba, gen)
            else:
                why = check_block(block, lba, 0)
            if why is not None:
                stats.add_failure(VerifyFailure(lba, gen, why, bool(zero_exp[j])))

__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "PATTERNS",
    "WORKLOAD_STATE_VERSION",
    "VcpuStopped",
    "VerifyFailure",
    "Workload",
    "WorkloadConfig",
    "WorkloadStats",
    "check_block",
    "check_trimmed",
    "fill_block",
    "payload_pool",
    "trim_op_for",
]
