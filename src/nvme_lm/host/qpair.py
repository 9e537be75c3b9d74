"""A host-side queue pair: SQ and CQ rings in DMA memory, command ids, doorbells, reaping.

Completion can be waited for by interrupt (the driver's MSI-X handler sets `irq`) or by
polling the phase bit. Timeouts are reported as `NvmeTimeout`, never as a hang.
"""

from __future__ import annotations

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
        self.done: dict[int, Completion] = {}
        self.irq = threading.Event()
        self.lock = threading.Lock()
        self._unrung = 0

    # --- submission ---------------------------------------------------------------------------
    @property
    def free(self) -> int:
        return len(self._free_cids)

    def submit(self, sqe: SQE, *, callback: Callback | None = None, cleanup: list[int] | None = None,
               ring: bool = True) -> int:
        """Places `sqe` (its cid is assigned here) at the SQ tail; rings unless `ring` is False."""
        with self.lock:
            if not self._free_cids:
                raise RuntimeError(f"queue {self.qid} is full ({self.depth - 1} outstanding)")
            cid = self._free_cids.pop()
            sqe.cid = cid
            self.outstanding[cid] = (callback, cleanup or [])
            sqe.pack_into(self.sq, self.sq_tail * SQE_SIZE)
            self.sq_tail = (self.sq_tail + 1) % self.depth
            self._unrung += 1
        if ring:
            self.ring()
        return cid

    def ring(self) -> None:
        if self._unrung:
            self._unrung = 0
            self.fn.bar0.write32(self.sq_db, self.sq_tail)

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
                    continue  # a completion for a command we never sent: ignore it
                callback, cleanup = entry
                for addr in cleanup:
                    self.mem.free(addr)
                self._free_cids.append(cid)
                if callback is None:
                    self.done[cid] = comp
                else:
                    callback(comp)
            if n:
                self.cq_head, self.phase = head, phase
        if n:
            self.fn.bar0.write32(self.cq_db, head)
        return n

    def wait(self, cid: int, timeout: float, poll: bool = False) -> Completion:
        """Waits for command `cid`; raises NvmeTimeout after `timeout` seconds."""
        deadline = time.monotonic() + timeout
        while True:
            self.irq.clear()
            self.reap()
            comp = self.done.pop(cid, None)
            if comp is not None:
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

    def release(self) -> None:
        for addr in (self.sq_addr, self.cq_addr):
            self.mem.free(addr)
