"""A host-side queue pair: SQ and CQ rings in DMA memory, command ids, doorbells, reaping.

Completion can be waited for by interrupt (the driver's MSI-X handler sets `irq`) or by
polling the phase bit. Timeouts are reported as `NvmeTimeout`, never as a hang.
"""

from __future__ import annotations

import struct
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from nvme_lm.host.memory import DmaMemory
from nvme_lm.pcie.function import PcieFunction
from nvme_lm.spec.commands import CQE_SIZE, SQE, SQE_SIZE, unpack_cqe_from
from nvme_lm.spec.registers import cq_head_doorbell, sq_tail_doorbell
from nvme_lm.spec.status import Status


class Completion(NamedTuple):
    cid: int
    dw0: int
    dw1: int
    status: int  # 15-bit status field
    sqhd: int

    @property
    def ok(self) -> bool:
        return (self.status & 0x7FF) == 0

    @property
    def st(self) -> Status:
        return Status.from_field(self.status)


class NvmeTimeout(TimeoutError):
    pass


class NvmeCommandError(Exception):
    """A command completed with an error status."""

    def __init__(self, what: str, completion: Completion) -> None:
        super().__init__(f"{what}: {completion.st}")
        self.completion = completion
        self.status = completion.st


Callback = Callable[[Completion], None]
Resolver = Callable[[object], Callback]  # tag of an outstanding command -> its callback (after a restore)
_U32 = struct.Struct("<I")
QPAIR_STATE_VERSION = 1


def _marker(mem: DmaMemory) -> Callable[[int, int], None] | None:
    """The memory's CPU-write logger (guest RAM under dirty logging), if it has one."""
    return getattr(mem, "mark_dirty", None)


class ShadowDoorbellPages:
    """The host's half of Doorbell Buffer Config: a Shadow Doorbell page and an EventIdx page.

    A queue pair in shadow mode writes its new SQ tail / CQ head into the shadow page and rings
    the MMIO doorbell only when the controller's EventIdx says it is waiting for that value
    (Linux's nvme_dbbuf_update_and_check_event): (u16)(new - ei - 1) < (u16)(new - old).
    """

    def __init__(self, mem: DmaMemory, dstrd: int = 0) -> None:
        self.mem = mem
        self.stride = 4 << dstrd
        self.shadow_addr = mem.alloc(mem.page_size)
        self.eventidx_addr = mem.alloc(mem.page_size)
        self.shadow = mem.view(self.shadow_addr, mem.page_size)
        self.eventidx = mem.view(self.eventidx_addr, mem.page_size)

    def rebind(self, mem: DmaMemory) -> None:
        """The same pages, now in `mem` (guest RAM moved to another host at the same addresses)."""
        self.mem = mem
        self.shadow = mem.view(self.shadow_addr, mem.page_size)
        self.eventidx = mem.view(self.eventidx_addr, mem.page_size)

    def offset(self, qid: int, is_cq: bool) -> int:
        return (2 * qid + int(is_cq)) * self.stride

    def update(self, qid: int, is_cq: bool, value: int) -> bool:
        """Stores `value` as the doorbell; True if the MMIO doorbell must be rung as well."""
        off = self.offset(qid, is_cq)
        if off + 4 > len(self.shadow):
            return True  # beyond the page: this queue has no shadow doorbell
        old = _U32.unpack_from(self.shadow, off)[0]
        _U32.pack_into(self.shadow, off, value)
        mark = _marker(self.mem)
        if mark is not None:
            mark(self.shadow_addr + off, 4)
        event_idx = _U32.unpack_from(self.eventidx, off)[0]
        return ((value - event_idx - 1) & 0xFFFF) < ((value - old) & 0xFFFF)

    def release(self) -> None:
        for addr in (self.shadow_addr, self.eventidx_addr):
            self.mem.free(addr)


class QueuePair:
    def __init__(self, fn: PcieFunction, mem: DmaMemory, qid: int, depth: int, *, dstrd: int = 0,
                 vector: int = 0, sq_addr: int | None = None, cq_addr: int | None = None) -> None:
        self.fn = fn
        self.mem = mem
        self.qid = qid
        self.depth = depth
        self.vector = vector
        self.sq_addr = sq_addr if sq_addr is not None else mem.alloc(depth * SQE_SIZE)
        self.cq_addr = cq_addr if cq_addr is not None else mem.alloc(depth * CQE_SIZE)
        self.sq = mem.view(self.sq_addr, depth * SQE_SIZE)
        self.cq = mem.view(self.cq_addr, depth * CQE_SIZE)
        self.sq_db = sq_tail_doorbell(qid, dstrd)
        self.cq_db = cq_head_doorbell(qid, dstrd)
        self.sq_tail = 0
        self.sq_head = 0  # as last reported by the controller in a CQE
        self.cq_head = 0
        self.phase = 1
        self._free_cids = list(range(depth - 2, -1, -1))  # at most depth-1 outstanding
        self.outstanding: dict[int, tuple[Callback | None, list[int]]] = {}
        self.tags: dict[int, object] = {}  # cid -> the submitter's tag, for commands that must survive a migration
        self.done: dict[int, Completion] = {}
        self.spurious = 0  # completions for CIDs not outstanding (a duplicate or a controller bug)
        self.irq = threading.Event()
        self.shadow: ShadowDoorbellPages | None = None  # set after Doorbell Buffer Config
        self.mmio_doorbells = 0  # MMIO doorbell writes (what shadow doorbells save)
        self.lock = threading.RLock()  # re-entrant: a completion callback may submit again
        self._unrung = 0
        self._mark = _marker(mem)

    # --- submission ---------------------------------------------------------------------------
    @property
    def free(self) -> int:
        return len(self._free_cids)

    def submit(self, sqe: SQE, *, callback: Callback | None = None, cleanup: list[int] | None = None,
               ring: bool = True, tag: object = None) -> int:
        """Places `sqe` (its cid is assigned here) at the SQ tail; rings unless `ring` is False.

        A `tag` (plain data) names the callback so that the command can complete after the queue
        pair was captured with `state()` and rebuilt elsewhere with `restore()`."""
        with self.lock:
            if not self._free_cids:
                raise RuntimeError(f"queue {self.qid} is full ({self.depth - 1} outstanding)")
            cid = self._free_cids.pop()
            sqe.cid = cid
            self.outstanding[cid] = (callback, cleanup or [])
            if tag is not None:
                self.tags[cid] = tag
            sqe.pack_into(self.sq, self.sq_tail * SQE_SIZE)
            if self._mark is not None:
                self._mark(self.sq_addr + self.sq_tail * SQE_SIZE, SQE_SIZE)
            self.sq_tail = (self.sq_tail + 1) % self.depth
            self._unrung += 1
        if ring:
            self.ring()
        return cid

    def ring(self) -> None:
        with self.lock:  # a stale tail rung after a newer one would make the device replay old slots
            if self._unrung:
                self._unrung = 0
                self._doorbell(self.sq_db, self.sq_tail, is_cq=False)

    def _doorbell(self, offset: int, value: int, is_cq: bool) -> None:
        shadow = self.shadow
        if shadow is not None and not shadow.update(self.qid, is_cq, value):
            return  # the controller will read it from the shadow buffer
        self.mmio_doorbells += 1
        self.fn.bar0.write32(offset, value)

    # --- completion ---------------------------------------------------------------------------
    def reap(self) -> int:
        """Consumes every new CQE; runs callbacks or stores results in `done`. Returns the count."""
        n = 0
        cq = self.cq
        with self.lock:
            head, phase = self.cq_head, self.phase
            while True:
                dw0, dw1, sqhd, _sqid, cid, sf = unpack_cqe_from(cq, head * CQE_SIZE)
                if sf & 1 != phase:
                    break
                head += 1
                if head == self.depth:
                    head = 0
                    phase ^= 1
                n += 1
                self.sq_head = sqhd
                comp = Completion(cid, dw0, dw1, sf >> 1, sqhd)
                entry = self.outstanding.pop(cid, None)
                if entry is None:
                    self.spurious += 1  # a completion for a command we never sent: counted, ignored
                    continue
                self.tags.pop(cid, None)
                callback, cleanup = entry
                for addr in cleanup:
                    self.mem.free(addr)
                if callback is None:
                    self.done[cid] = comp  # the CID stays taken until `wait` hands the result over
                else:
                    self._free_cids.append(cid)
                    callback(comp)
            if n:
                self.cq_head, self.phase = head, phase
                # under the lock: two reapers must not ring heads out of order (head going back)
                self._doorbell(self.cq_db, head, is_cq=True)
        return n

    def wait(self, cid: int, timeout: float, poll: bool = False) -> Completion:
        """Waits for command `cid`; raises NvmeTimeout after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.irq.clear()
            self.reap()
            with self.lock:
                comp = self.done.pop(cid, None)
                if comp is not None:
                    self._free_cids.append(cid)  # only now: a reused CID must not find a stale result
                    return comp
            left = deadline - time.monotonic()
            if left <= 0:
                raise NvmeTimeout(f"command {cid} on queue {self.qid} timed out after {timeout:.1f}s")
            if poll:
                time.sleep(0)
            else:
                self.irq.wait(min(left, 0.1))

    def wait_any(self, timeout: float) -> int:
        """Waits until at least one completion is reaped; returns how many."""
        deadline = time.monotonic() + timeout
        while True:
            self.irq.clear()
            n = self.reap()
            if n:
                return n
            left = deadline - time.monotonic()
            if left <= 0:
                raise NvmeTimeout(f"no completion on queue {self.qid} within {timeout:.1f}s")
            self.irq.wait(min(left, 0.1))

    def rebind(self, fn: PcieFunction, mem: DmaMemory) -> None:
        """Follows the guest to another function and memory holding the same rings at the same addresses."""
        self.fn, self.mem = fn, mem
        self.sq = mem.view(self.sq_addr, self.depth * SQE_SIZE)
        self.cq = mem.view(self.cq_addr, self.depth * CQE_SIZE)
        self._mark = _marker(mem)

    # --- migration: the driver's half of a queue pair as plain data --------------------------------
    def state(self) -> dict:
        """Everything about this queue pair that is not in guest memory (a paused guest's driver state).

        Every outstanding command must carry a tag: an untagged one has a waiter (a thread blocked in
        `wait`) that cannot move with the state, so capturing then is an error."""
        with self.lock:
            untagged = [cid for cid in self.outstanding if cid not in self.tags]
            if untagged:
                raise RuntimeError(f"queue {self.qid}: commands {untagged} have no tag (a thread is waiting on them)")
            if self._unrung:
                raise RuntimeError(f"queue {self.qid}: {self._unrung} commands placed but the doorbell not rung")
            return {"v": QPAIR_STATE_VERSION, "qid": self.qid, "depth": self.depth, "vector": self.vector,
                    "sq_addr": self.sq_addr, "cq_addr": self.cq_addr, "sq_tail": self.sq_tail,
                    "sq_head": self.sq_head, "cq_head": self.cq_head, "phase": self.phase,
                    "free_cids": list(self._free_cids), "spurious": self.spurious,
                    "outstanding": [[cid, self.tags[cid], list(cleanup)]
                                    for cid, (_cb, cleanup) in self.outstanding.items()],
                    "done": [list(c) for c in self.done.values()]}

    @classmethod
    def restore(cls, fn: PcieFunction, mem: DmaMemory, state: dict, *, dstrd: int = 0) -> QueuePair:
        """Rebuilds a captured queue pair on `fn` over `mem` (rings already there, at the same addresses).
        Outstanding commands have no callback until `bind(resolver)`."""
        if state.get("v") != QPAIR_STATE_VERSION:
            raise ValueError(f"queue pair state version {state.get('v')!r} is not {QPAIR_STATE_VERSION}")
        qp = cls(fn, mem, state["qid"], state["depth"], dstrd=dstrd, vector=state["vector"],
                 sq_addr=state["sq_addr"], cq_addr=state["cq_addr"])
        qp.sq_tail, qp.sq_head, qp.cq_head, qp.phase = (state["sq_tail"], state["sq_head"], state["cq_head"],
                                                       state["phase"])
        qp._free_cids = list(state["free_cids"])
        qp.spurious = state["spurious"]
        for cid, tag, cleanup in state["outstanding"]:
            qp.outstanding[cid] = (None, list(cleanup))
            qp.tags[cid] = tag
        qp.done = {c[0]: Completion(*c) for c in state["done"]}
        return qp

    def bind(self, resolver: Resolver) -> None:
        """Gives every restored outstanding command its callback again, looked up by tag."""
        with self.lock:
            for cid, (_cb, cleanup) in list(self.outstanding.items()):
                self.outstanding[cid] = (resolver(self.tags[cid]), cleanup)

    def release(self) -> None:
        for addr in (self.sq_addr, self.cq_addr):
            self.mem.free(addr)
