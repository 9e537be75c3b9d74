"""Shadow doorbells (Doorbell Buffer Config, NVMe Base "emulated controllers").

The host gives two memory pages: the Shadow Doorbell buffer, laid out like the doorbell
registers (SQ y tail at 2y x stride, CQ y head at (2y+1) x stride, stride = 4 << CAP.DSTRD),
and the EventIdx buffer with the same layout. A host driver then writes new SQ tails and CQ
heads into the shadow buffer and rings the real (trapping, expensive) MMIO doorbell only when
the value passes the EventIdx the controller published, as virtio does:

    ring if (u16)(new - event_idx - 1) < (u16)(new - old)        (Linux nvme_dbbuf_need_event)

The controller treats the shadow buffer as the one true doorbell value (OpenVMM's lesson): an
MMIO doorbell write also updates the shadow entry, so a host that keeps ringing MMIO for some
queues (Linux does, for the admin queue) stays consistent. On each engine pass `refresh()`
reads every queue's shadow value; when an SQ is caught up it publishes EventIdx = tail and
reads the tail once more, closing the race with a host that wrote just before. For a CQ, it
publishes EventIdx = head while the CQ is full, so the host rings when it frees a slot.
A queue created later starts with shadow and EventIdx 0 (`queue_created`). The buffers live
until the next Controller Level Reset, which drops this object.
"""

from __future__ import annotations

import contextlib
import logging
import struct
from typing import TYPE_CHECKING

from nvme_lm.pcie.iommu import DmaFault

if TYPE_CHECKING:
    from nvme_lm.device.controller import Controller
    from nvme_lm.device.queues import CompletionQueue
    from nvme_lm.pcie.function import PcieFunction

log = logging.getLogger(__name__)
_U32 = struct.Struct("<I")


class ShadowDoorbells:
    def __init__(self, fn: PcieFunction, shadow_addr: int, eventidx_addr: int, page_size: int, dstrd: int) -> None:
        self.fn = fn
        self.shadow_addr = shadow_addr
        self.eventidx_addr = eventidx_addr
        self.page_size = page_size
        self.stride = 4 << dstrd
        self.max_qid = page_size // (2 * self.stride) - 1  # queues whose doorbells fit in one page
        self._gen = -1
        self._dbs = memoryview(b"")
        self._eis = memoryview(b"")
        self._published: dict[tuple[int, bool], int] = {}  # last EventIdx written per doorbell
        self._faulted = False
        self._resolve()  # raises DmaFault if either page is not mapped for DMA

    def _resolve(self) -> None:
        self._dbs = self.fn.dma_view(self.shadow_addr, self.page_size, write=True)
        self._eis = self.fn.dma_view(self.eventidx_addr, self.page_size, write=True)
        self._gen = self.fn.iommu.generation

    def _views(self) -> tuple[memoryview, memoryview]:
        if self._gen != self.fn.iommu.generation:
            self._resolve()
        return self._dbs, self._eis

    def _offset(self, qid: int, is_cq: bool) -> int:
        return (2 * qid + int(is_cq)) * self.stride

    def covers(self, qid: int) -> bool:
        return qid <= self.max_qid

    # --- single entries ---------------------------------------------------------------------------
    def read(self, qid: int, is_cq: bool) -> int:
        return _U32.unpack_from(self._views()[0], self._offset(qid, is_cq))[0]

    def write(self, qid: int, is_cq: bool, value: int) -> None:
        off = self._offset(qid, is_cq)
        _U32.pack_into(self._views()[0], off, value)
        self._dma_written(self.shadow_addr + off)

    def publish(self, qid: int, is_cq: bool, value: int) -> None:
        """Writes EventIdx: the host rings MMIO once its value moves past `value`."""
        off = self._offset(qid, is_cq)
        _U32.pack_into(self._views()[1], off, value)
        self._published[(qid, is_cq)] = value
        self._dma_written(self.eventidx_addr + off)

    def _dma_written(self, addr: int) -> None:
        on_write = self.fn.iommu.on_write  # dirty-page tracking sees device writes too
        if on_write is not None:
            on_write(addr, 4)

    # --- controller hooks -----------------------------------------------------------------------
    def attach(self, ctrl: Controller) -> None:
        """Doorbell Buffer Config: seed both buffers with the doorbell values in force."""
        for qid, sq in ctrl.sqs.items():
            if self.covers(qid):
                self.write(qid, False, sq.tail)
                self.publish(qid, False, sq.tail)
        for qid, cq in ctrl.cqs.items():
            if self.covers(qid):
                self.write(qid, True, cq.head)
                self.publish(qid, True, cq.head)

    def queue_created(self, qid: int, is_cq: bool) -> None:
        """A new queue starts at 0: stale values from an earlier queue with this ID must not count."""
        if self.covers(qid):
            self.write(qid, is_cq, 0)
            self.publish(qid, is_cq, 0)

    def doorbell_written(self, qid: int, is_cq: bool, value: int) -> None:
        """An MMIO doorbell write (already validated) becomes the shadow value too."""
        if self.covers(qid):
            with contextlib.suppress(DmaFault):  # refresh() reports an unreachable buffer
                self.write(qid, is_cq, value)

    def refresh(self, ctrl: Controller) -> None:
        """Picks up SQ tails and CQ heads from the shadow buffer (once per engine pass)."""
        try:
            for qid, sq in list(ctrl.sqs.items()):
                if not self.covers(qid):
                    continue
                tail = self.read(qid, False)
                if tail != sq.tail:
                    if tail < sq.size:
                        sq.tail = tail
                    continue
                if sq.head == tail and self._published.get((qid, False)) != tail:
                    self.publish(qid, False, tail)  # idle: ask for an MMIO ring on the next submission
                    again = self.read(qid, False)
                    if again != tail and again < sq.size:
                        sq.tail = again
            for qid, cq in list(ctrl.cqs.items()):
                if not self.covers(qid):
                    continue
                self._refresh_cq(ctrl, qid, cq)
            self._faulted = False
        except DmaFault as e:
            if not self._faulted:
                log.warning("controller %d: shadow doorbell buffers unreachable: %s", ctrl.cntlid, e)
            self._faulted = True

    def _refresh_cq(self, ctrl: Controller, qid: int, cq: CompletionQueue) -> None:
        head = self.read(qid, True)
        if head != cq.head and _valid_cq_head(cq, head):
            cq.head = head
        if (cq.full or ctrl.overflow.get(qid)) and self._published.get((qid, True)) != cq.head:
            self.publish(qid, True, cq.head)  # waiting for space: ask for an MMIO ring on the next head move
            again = self.read(qid, True)
            if again != cq.head and _valid_cq_head(cq, again):
                cq.head = again


def _valid_cq_head(cq: CompletionQueue, head: int) -> bool:
    """The head may only move within the entries posted so far (as the MMIO doorbell checks)."""
    return head < cq.size and (head - cq.head) % cq.size <= (cq.tail - cq.head) % cq.size
