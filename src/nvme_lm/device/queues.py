"""Submission and completion queues as the controller sees them: rings in host memory.

A queue is either physically contiguous (PC=1, one view) or described by a PRP list (PC=0,
one view per page). Views are resolved at creation and again whenever the IOMMU mappings
change, so the fetch and completion paths do no address translation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from nvme_lm.device.request import NvmeError
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import CQE_SIZE, SQE_SIZE, pack_cqe_into

if TYPE_CHECKING:
    from nvme_lm.pcie.function import PcieFunction


class Ring:
    """Entry-addressable memory of a queue: `slot(i)` gives (view, offset)."""

    def __init__(self, fn: PcieFunction, base: int, entries: int, entry_size: int, page_size: int,
                 contiguous: bool, write: bool) -> None:
        self.fn = fn
        self.base = base
        self.entries = entries
        self.entry_size = entry_size
        self.page_size = page_size
        self.contiguous = contiguous
        self.write = write
        nbytes = entries * entry_size
        if contiguous and base & (page_size - 1):
            raise NvmeError(st.INVALID_FIELD, "contiguous queue base address is not page aligned")
        if contiguous:
            self.pages = np.array([base], dtype=np.uint64)
        else:
            from nvme_lm.device.prp import _walk_list

            # PC=0: `base` is a PRP list pointer, even when the ring fits in one page
            npages = -(-nbytes // page_size)
            self.pages = _walk_list(fn, base, npages, page_size)
            if npages == 1:
                self.contiguous = True
        self._nbytes = nbytes
        self._gen = -1
        self._views: list[memoryview] = []
        self._per_page = page_size // entry_size
        self.resolve()

    def resolve(self) -> None:
        """(Re)translates the ring's pages through the IOMMU; raises DmaFault."""
        if self.contiguous:
            self._views = [self.fn.dma_view(int(self.pages[0]), self._nbytes, self.write)]
        else:
            self._views = [self.fn.dma_view(int(p), self.page_size, self.write) for p in self.pages]
        self._gen = self.fn.iommu.generation

    def slot(self, index: int) -> tuple[memoryview, int]:
        if self._gen != self.fn.iommu.generation:
            self.resolve()
        if self.contiguous:
            return self._views[0], index * self.entry_size
        return self._views[index // self._per_page], (index % self._per_page) * self.entry_size

    def addr(self, index: int) -> int:
        if self.contiguous:
            return int(self.pages[0]) + index * self.entry_size
        return int(self.pages[index // self._per_page]) + (index % self._per_page) * self.entry_size


class CompletionQueue:
    def __init__(self, fn: PcieFunction, qid: int, base: int, size: int, page_size: int, contiguous: bool,
                 ien: bool, vector: int) -> None:
        self.qid = qid
        self.size = size
        self.ring = Ring(fn, base, size, CQE_SIZE, page_size, contiguous, write=True)
        self.ien = ien
        self.vector = vector
        self.head = 0
        self.tail = 0
        self.phase = 1
        self.sqs: set[int] = set()
        self.fn = fn

    @property
    def full(self) -> bool:
        return (self.tail + 1) % self.size == self.head

    @property
    def free_slots(self) -> int:
        return (self.head - self.tail - 1) % self.size

    def post(self, dw0: int, dw1: int, sqhd: int, sqid: int, cid: int, status: int) -> None:
        """Writes one CQE at the tail with the current phase; the caller checked `full`.

        The tail moves *before* the entry is written: a host may see the entry (its phase bit) the
        moment it lands and ring the head doorbell past it at once, and that new head must already
        be within the tail, or it would be refused as an invalid doorbell write (and a queue that
        just filled would look full forever)."""
        slot, phase = self.tail, self.phase
        self.tail += 1
        if self.tail == self.size:
            self.tail = 0
            self.phase ^= 1
        view, off = self.ring.slot(slot)
        pack_cqe_into(view, off, dw0, dw1, sqhd, sqid, cid, status, phase)
        on_write = self.fn.iommu.on_write
        if on_write is not None:  # after the write: a tracker drained now cannot miss the CQE
            on_write(self.ring.addr(slot), CQE_SIZE)


class SubmissionQueue:
    def __init__(self, fn: PcieFunction, qid: int, base: int, size: int, page_size: int, contiguous: bool,
                 cq: CompletionQueue, priority: int = 0) -> None:
        self.qid = qid
        self.size = size
        self.ring = Ring(fn, base, size, SQE_SIZE, page_size, contiguous, write=False)
        self.cq = cq
        self.priority = priority
        self.head = 0
        self.tail = 0
        self.inflight = 0  # fetched, not yet completed (deferred commands count here)

    @property
    def pending(self) -> int:
        return (self.tail - self.head) % self.size
