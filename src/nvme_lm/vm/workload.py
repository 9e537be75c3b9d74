"""A verified random read/write workload over one I/O queue: what a guest's application does.

Every block the workload writes starts with a header, so any block read back proves itself:

    bytes 0-7   LBA the block was written to (u64, little-endian) - catches misdirected I/O
    bytes 8-15  generation: how many times the workload has written this block (u64) - catches
                lost or stale writes (a migration that forgot the last delta shows up here)
    bytes 16-19 CRC-32 (zlib) of the rest of the block, bytes 20..end - catches torn or corrupted data

The payload after the header is a slice of a random pool chosen by (LBA, generation), so two
writes of the same block differ. A block the workload never wrote must read back as zeroes.
Blocks with an I/O in flight are never picked again until it completes, so the expected
generation of every read is known exactly, at any queue depth.

The engine only uses the host driver's public queue API (`IoQueue.submit` with callbacks,
`QueuePair.ring`, `QueuePair.wait_any`): commands are submitted in batches, the doorbell is
rung once per batch, and completions are reaped on interrupt.
"""

from __future__ import annotations

import struct
import time
import zlib
from array import array
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from nvme_lm.host.memory import DmaMemory
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.opcodes import IoOpcode
from nvme_lm.vm.latency import LatencyRecorder

if TYPE_CHECKING:
    from nvme_lm.host.driver import IoQueue
    from nvme_lm.host.qpair import Completion

HEADER = struct.Struct("<QQI")  # LBA, generation, crc32 of bytes [HEADER_SIZE:block_size]
HEADER_SIZE = HEADER.size
_POOL_SIZE = 1 << 20
_BATCH = 4096  # random choices drawn from numpy per refill
_PROGRESS_EVERY_NS = 100_000_000
_READ = int(IoOpcode.READ)
_WRITE = int(IoOpcode.WRITE)


def _payload_offset(lba: int, generation: int, span: int) -> int:
    return ((lba * 0x9E3779B1) ^ (generation * 0x85EBCA77)) % span


def fill_block(view: memoryview, lba: int, generation: int, pool: bytes | memoryview) -> None:
    """Writes header + payload for (`lba`, `generation`) into `view` (one whole block)."""
    n = len(view) - HEADER_SIZE
    off = _payload_offset(lba, generation, len(pool) - n)
    body = view[HEADER_SIZE:]
    body[:] = pool[off : off + n]
    HEADER.pack_into(view, 0, lba, generation, zlib.crc32(body))


def check_block(view: memoryview, lba: int, generation: int) -> str | None:
    """Why `view` is not the block written at `lba` with `generation` (0 = never written), or None."""
    if generation == 0:
        if view.tobytes().count(0) != len(view):
            return "block never written but not zero"
        return None
    h_lba, h_gen, h_crc = HEADER.unpack_from(view, 0)
    if h_lba != lba:
        return f"header LBA {h_lba} != {lba} (misdirected or foreign block)"
    if h_gen != generation:
        return f"generation {h_gen} != expected {generation} ({'stale' if h_gen < generation else 'future'} data)"
    crc = zlib.crc32(view[HEADER_SIZE:])
    if crc != h_crc:
        return f"CRC-32 {crc:#010x} != header {h_crc:#010x} (corrupted data)"
    return None


@dataclass(frozen=True)
class WorkloadConfig:
    nsid: int
    lba_size: int
    block_size: int = 4096
    first_lba: int = 0
    nblocks: int = 4096  # size of the region the workload touches, in blocks
    read_fraction: float = 0.5
    qd: int = 1
    seed: int | None = None
    verify: bool = True
    timeout: float = 10.0  # no completion for this long is a hang, reported as NvmeTimeout

    def __post_init__(self) -> None:
        if self.block_size % self.lba_size or self.block_size <= HEADER_SIZE:
            raise ValueError("block_size must be a multiple of lba_size and larger than the header")
        if not 0.0 <= self.read_fraction <= 1.0:
            raise ValueError("read_fraction must be within [0, 1]")
        if self.qd < 1 or self.nblocks < 2 * self.qd:
            raise ValueError("need qd >= 1 and at least 2*qd blocks (a block is never in flight twice)")

    @property
    def lbas_per_block(self) -> int:
        return self.block_size // self.lba_size


@dataclass(frozen=True)
class VerifyFailure:
    lba: int
    expected_generation: int
    reason: str


@dataclass
class WorkloadStats:
    reads: int = 0
    writes: int = 0
    errors: int = 0  # commands that completed with an error status
    error_statuses: dict[int, int] = field(default_factory=dict)  # 15-bit status field -> count
    verify_failures: list[VerifyFailure] = field(default_factory=list)
    elapsed: float = 0.0
    block_size: int = 4096
    read_latency: LatencyRecorder = field(default_factory=LatencyRecorder)
    write_latency: LatencyRecorder = field(default_factory=LatencyRecorder)

    @property
    def ios(self) -> int:
        return self.reads + self.writes

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

    def to_dict(self) -> dict[str, Any]:
        return {
            "ios": self.ios,
            "reads": self.reads,
            "writes": self.writes,
            "errors": self.errors,
            "error_statuses": {f"{k:#06x}": v for k, v in sorted(self.error_statuses.items())},
            "verify_failures": len(self.verify_failures),
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


def _rounded(d: dict[str, float]) -> dict[str, float | None]:
    return {k: (None if v != v else round(v, 2)) for k, v in d.items()}  # NaN -> null for JSON


Progress = Callable[[int], None]  # called with the number of I/Os completed so far


class Workload:
    """Random verified I/O on the region [first_lba, first_lba + nblocks*lbas_per_block) of a namespace."""

    def __init__(self, queue: IoQueue, mem: DmaMemory, config: WorkloadConfig) -> None:
        self.queue = queue
        self.qp = queue.qp
        self.mem = mem
        self.cfg = config
        self.generations = array("Q", bytes(8 * config.nblocks))  # last generation written per block
        self.unknown: set[int] = set()  # blocks whose content is uncertain after a failed write
        self._rng = np.random.default_rng(config.seed)
        self._pool = memoryview(self._rng.integers(0, 256, _POOL_SIZE, dtype=np.uint8).tobytes())
        self._mark_dirty = getattr(mem, "mark_dirty", None)  # CPU writes feed the guest's dirty log
        bs = config.block_size
        self._bufs = [mem.alloc(bs) for _ in range(config.qd)]
        self._views = [mem.view(a, bs) for a in self._bufs]
        self._sqes = [SQE(nsid=config.nsid, cdw12=config.lbas_per_block - 1) for _ in range(config.qd)]
        self._callbacks = [partial(self._done, s) for s in range(config.qd)]
        self._slot_block = [0] * config.qd
        self._slot_gen = [0] * config.qd
        self._slot_start = [0] * config.qd
        self._free: list[int] = []
        self._inflight: set[int] = set()
        self._stats = WorkloadStats(block_size=bs)
        self._clock = time.perf_counter_ns

    # ------------------------------------------------------------------------------ public API
    def lba_of(self, block: int) -> int:
        return self.cfg.first_lba + block * self.cfg.lbas_per_block

    def prefill(self, progress: Progress | None = None) -> WorkloadStats:
        """Writes every block of the region once, sequentially, so reads never hit unwritten blocks."""
        return self._drive(((b, True) for b in range(self.cfg.nblocks)), None, progress)

    def run(self, seconds: float | None = None, *, ios: int | None = None,
            progress: Progress | None = None) -> WorkloadStats:
        """Random reads and writes (`read_fraction`) for `seconds` and/or `ios` I/Os, verified."""
        if seconds is None and ios is None:
            raise ValueError("give seconds and/or ios")
        deadline = None if seconds is None else self._clock() + int(seconds * 1e9)
        return self._drive(self._random_ops(), deadline, progress, limit=ios)

    def verify_all(self, progress: Progress | None = None) -> WorkloadStats:
        """Reads the whole region back and checks every block (a full sweep after a run or a migration)."""
        return self._drive(((b, False) for b in range(self.cfg.nblocks)), None, progress)

    def close(self) -> None:
        for addr in self._bufs:
            self.mem.free(addr)
        self._bufs = []

    def __enter__(self) -> Workload:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------------------ engine
    def _random_ops(self) -> Iterator[tuple[int, bool]]:
        n, rng, rf = self.cfg.nblocks, self._rng, self.cfg.read_fraction
        while True:
            blocks = rng.integers(0, n, _BATCH).tolist()
            writes = (rng.random(_BATCH) >= rf).tolist()
            yield from zip(blocks, writes, strict=True)

    def _drive(self, ops: Iterator[tuple[int, bool]], deadline: int | None, progress: Progress | None,
               limit: int | None = None) -> WorkloadStats:
        """Keeps up to `qd` commands in flight until `ops` runs out, `limit` I/Os were submitted or
        `deadline` (perf_counter ns) passes."""
        self._stats = stats = WorkloadStats(block_size=self.cfg.block_size)
        self._free = list(range(self.cfg.qd))
        self._inflight.clear()
        qd, free, inflight, clock = self.cfg.qd, self._free, self._inflight, self._clock
        qp, submit_one = self.qp, self._submit
        t0 = clock()
        next_progress = t0 + _PROGRESS_EVERY_NS
        exhausted = False
        left = -1 if limit is None else limit
        try:
            while not exhausted:
                while free:
                    if left == 0:
                        exhausted = True
                        break
                    left -= 1
                    op = next(ops, None)
                    while op is not None and op[0] in inflight:
                        op = next(ops, None)  # never two I/Os on one block at once
                    if op is None:
                        exhausted = True
                        break
                    submit_one(free.pop(), op[0], op[1])
                qp.ring()
                if len(free) == qd:
                    break
                qp.wait_any(self.cfg.timeout)
                now = clock()
                if deadline is not None and now >= deadline:
                    exhausted = True
                if progress is not None and now >= next_progress:
                    next_progress = now + _PROGRESS_EVERY_NS
                    progress(stats.ios)
            while len(free) < qd:  # drain what is still in flight
                qp.wait_any(self.cfg.timeout)
        finally:
            stats.elapsed = (clock() - t0) / 1e9
        if progress is not None:
            progress(stats.ios)
        return stats

    def _submit(self, slot: int, block: int, write: bool) -> None:
        sqe = self._sqes[slot]
        lba = self.lba_of(block)
        sqe.cdw10 = lba & 0xFFFFFFFF
        sqe.cdw11 = lba >> 32
        if write:
            sqe.opcode = _WRITE
            gen = self.generations[block] + 1
            if self.cfg.verify:
                fill_block(self._views[slot], lba, gen, self._pool)
                if self._mark_dirty is not None:
                    self._mark_dirty(self._bufs[slot], self.cfg.block_size)
            self._slot_gen[slot] = gen
        else:
            sqe.opcode = _READ
        self._slot_block[slot] = block
        self._inflight.add(block)
        self._slot_start[slot] = self._clock()
        try:
            self.queue.submit(sqe, self._bufs[slot], self.cfg.block_size, self._callbacks[slot], ring=False)
        except BaseException:
            self._inflight.discard(block)
            self._free.append(slot)
            raise

    def _done(self, slot: int, comp: Completion) -> None:
        """Completion callback (runs in the reaping thread): latency, verification, bookkeeping."""
        took = self._clock() - self._slot_start[slot]
        block = self._slot_block[slot]
        stats = self._stats
        write = self._sqes[slot].opcode == _WRITE
        if write:
            stats.writes += 1
            stats.write_latency.record(took)
        else:
            stats.reads += 1
            stats.read_latency.record(took)
        if comp.status & 0x7FF:
            stats.errors += 1
            stats.error_statuses[comp.status] = stats.error_statuses.get(comp.status, 0) + 1
            if write:
                self.unknown.add(block)  # a failed write may have landed partly
        elif write:
            self.generations[block] = self._slot_gen[slot]
            self.unknown.discard(block)
        elif self.cfg.verify and block not in self.unknown:
            lba = self.lba_of(block)
            gen = self.generations[block]
            why = check_block(self._views[slot], lba, gen)
            if why is not None:
                stats.verify_failures.append(VerifyFailure(lba, gen, why))
        self._inflight.discard(block)
        self._free.append(slot)


__all__ = [
    "HEADER",
    "HEADER_SIZE",
    "VerifyFailure",
    "Workload",
    "WorkloadConfig",
    "WorkloadStats",
    "check_block",
    "fill_block",
]
