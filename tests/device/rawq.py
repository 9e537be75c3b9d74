"""Raw host-side queues for tests that must do what a normal driver never does: rings of
different depths on one CQ, PC=0 rings scattered over pages, a CQ the host stops consuming,
reading every CQE field (SQID included). Everything still goes through BAR0 and DMA memory."""

from __future__ import annotations

import time
from typing import NamedTuple

import numpy as np

from nvme_lm.pcie.function import PcieFunction
from nvme_lm.spec.commands import CQE_SIZE, SQE, SQE_SIZE, unpack_cqe_from
from nvme_lm.spec.registers import cq_head_doorbell, sq_tail_doorbell
from nvme_lm.spec.status import Status
from nvme_lm.vm.memory import GuestMemory

PAGE = 4096


class Cqe(NamedTuple):
    dw0: int
    dw1: int
    sqhd: int
    sqid: int
    cid: int
    status: int  # 15-bit status field
    phase: int

    @property
    def st(self) -> Status:
        return Status.from_field(self.status)


class Ring:
    """Entries over pages of guest memory: one contiguous block (PC=1) or scattered pages
    described by a hand-built PRP list (PC=0)."""

    def __init__(self, mem: GuestMemory, entries: int, entry_size: int, *, contiguous: bool = True) -> None:
        self.mem = mem
        self.entries = entries
        self.entry_size = entry_size
        nbytes = entries * entry_size
        self.contiguous = contiguous
        self.allocs: list[int] = []
        if contiguous:
            self.base = self._alloc(nbytes)
            self.pages = [self.base]
        else:
            npages = -(-nbytes // PAGE)
            # scatter: allocate with a hole after each page so no two ring pages are adjacent,
            # and hand them to the device in reverse order
            pages = []
            for _ in range(npages):
                pages.append(self._alloc(PAGE))
                self._alloc(PAGE)
            self.pages = pages[::-1]
            self.list_page = self._alloc(PAGE)
            np.frombuffer(mem.view(self.list_page, PAGE), dtype="<u8")[:npages] = self.pages
            self.base = self.list_page  # PRP1 of the create command
        self.per_page = PAGE // entry_size

    def _alloc(self, n: int) -> int:
        a = self.mem.alloc(n)
        self.allocs.append(a)
        return a

    def view(self, index: int) -> memoryview:
        if self.contiguous:
            return self.mem.view(self.base + index * self.entry_size, self.entry_size)
        page = self.pages[index // self.per_page]
        return self.mem.view(page + (index % self.per_page) * self.entry_size, self.entry_size)

    def release(self) -> None:
        for a in self.allocs:
            self.mem.free(a)
        self.allocs.clear()


class RawSq:
    def __init__(self, fn: PcieFunction, mem: GuestMemory, qid: int, depth: int, *, dstrd: int = 0,
                 contiguous: bool = True) -> None:
        self.fn = fn
        self.qid = qid
        self.depth = depth
        self.ring = Ring(mem, depth, SQE_SIZE, contiguous=contiguous)
        self.tail = 0
        self.db = sq_tail_doorbell(qid, dstrd)
        self._cid = 0

    @property
    def addr(self) -> int:
        return self.ring.base

    def put(self, sqe: SQE, cid: int | None = None) -> int:
        """Writes `sqe` at the tail (cid assigned unless given); does not ring."""
        if cid is None:
            cid = self._cid
            self._cid = (self._cid + 1) & 0xFFFF
        sqe.cid = cid
        sqe.pack_into(self.ring.view(self.tail))
        self.tail = (self.tail + 1) % self.depth
        return cid

    def ring_doorbell(self) -> None:
        self.fn.bar0.write32(self.db, self.tail)


class RawCq:
    def __init__(self, fn: PcieFunction, mem: GuestMemory, qid: int, depth: int, *, dstrd: int = 0,
                 contiguous: bool = True) -> None:
        self.fn = fn
        self.qid = qid
        self.depth = depth
        self.ring = Ring(mem, depth, CQE_SIZE, contiguous=contiguous)
        self.head = 0
        self.phase = 1
        self.db = cq_head_doorbell(qid, dstrd)

    @property
    def addr(self) -> int:
        return self.ring.base

    def peek(self, index: int) -> Cqe:
        dw0, dw1, sqhd, sqid, cid, sf = unpack_cqe_from(self.ring.view(index), 0)
        return Cqe(dw0, dw1, sqhd, sqid, cid, sf >> 1, sf & 1)

    def available(self) -> int:
        """How many new CQEs (current phase) are waiting at the head, without consuming them."""
        n, i, phase = 0, self.head, self.phase
        while n < self.depth and self.peek(i).phase == phase:
            n += 1
            i += 1
            if i == self.depth:
                i, phase = 0, phase ^ 1
        return n

    def take(self, n: int | None = None) -> list[Cqe]:
        """Consumes up to `n` new CQEs (all if None); does not ring the head doorbell."""
        out: list[Cqe] = []
        while n is None or len(out) < n:
            e = self.peek(self.head)
            if e.phase != self.phase:
                break
            out.append(e)
            self.head += 1
            if self.head == self.depth:
                self.head, self.phase = 0, self.phase ^ 1
        return out

    def ring_doorbell(self) -> None:
        self.fn.bar0.write32(self.db, self.head)

    def wait(self, n: int, timeout: float = 5.0) -> list[Cqe]:
        """Consumes exactly `n` CQEs, waiting for them; rings the head doorbell as it goes."""
        out: list[Cqe] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            got = self.take(n - len(out))
            if got:
                out.extend(got)
                self.ring_doorbell()
                continue
            if time.monotonic() > deadline:
                raise TimeoutError(f"CQ {self.qid}: {len(out)}/{n} completions after {timeout}s")
            time.sleep(0.0002)
        return out

    def wait_available(self, n: int, timeout: float = 5.0) -> None:
        """Waits until at least `n` CQEs are waiting (without consuming them)."""
        deadline = time.monotonic() + timeout
        while self.available() < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"CQ {self.qid}: {self.available()}/{n} completions waiting after {timeout}s")
            time.sleep(0.0002)
