"""Controller Data Queues (TP4159) in host memory, user-data change logging and host-memory tracking.

A CDQ is a ring of 32-byte LBA Migration Queue entries (Type 0) written only by the controller through
its PCIe function's DMA (so the IOMMU `on_write` tracking sees it), phase byte last. The host owns the
head (Set Features FID 21h). State is per subsystem because UDMQ/range limits are subsystem wide.
Decisions (coalescing, full handling, HP semantics, granularity) are in docs/tracking.md.
"""

from __future__ import annotations

import bisect
import threading
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING

from nvme_lm.device.events import AsyncEvent, AsyncEventType
from nvme_lm.spec.cdq import (
    AEI_CDQ_FULL,
    AEI_CDQ_TAIL_POINTER,
    ESA_FIRST,
    ESA_LAST_FULL,
    ESA_LAST_STOPPED,
    ESA_LAST_SUSPENDED,
    ESA_NONE,
    LBA_ENTRY,
    LBA_ENTRY_SIZE,
    LBACIR_NONE,
    LBACIR_RANGE,
    lbamqa,
)

if TYPE_CHECKING:
    from nvme_lm.device.controller import Controller
    from nvme_lm.device.namespace import Namespace
    from nvme_lm.device.subsystem import NvmSubsystem

MAX_COALESCED_NLB = 1 << 16  # a held range is posted once it covers this many blocks


class Cdq:
    """One User Data Migration Queue created by `mmc` for the migratable controller `target`."""

    def __init__(self, mmc: Controller, cdqid: int, target: int, pages: list[int], nslots: int) -> None:
        self.mmc = mmc
        self.cdqid = cdqid
        self.target = target
        self.pages = pages  # page addresses in host memory (one entry for a contiguous queue)
        self.page_size = mmc.page_size
        self.contiguous = len(pages) == 1
        self.nslots = nslots
        self.head = 0
        self.tail = 0
        self.phase = 1
        self.etpt = False
        self.tpt = 0
        self.logging = False
        self.first = False  # the next entry is the first since logging started (ESA 001b)
        self.pending: dict[int, list[int]] = {}  # nsid -> [slba, nlb, dlba] held for coalescing
        self.namespaces: list[Namespace] = []
        self.lock = threading.RLock()
        self._events: list[int] = []  # posted after `lock` is released (the MMC engine may hold its lock, want ours)

    # --- ring -----------------------------------------------------------------------------------
    def free_slots(self) -> int:
        return (self.head - self.tail - 1) % self.nslots

    def posted(self) -> int:
        return (self.tail - self.head) % self.nslots

    def _slot_addr(self, slot: int) -> int:
        off = slot * LBA_ENTRY_SIZE
        if self.contiguous:
            return self.pages[0] + off
        return self.pages[off // self.page_size] + off % self.page_size

    def _write(self, nsid: int, nlb0: int, slba: int, esa: int, dlba: bool, lbacir: int) -> None:
        """Writes one entry at the tail (bytes 30:0, then byte 31 with the phase) and advances."""
        view = self.mmc.fn.dma_view(self._slot_addr(self.tail), LBA_ENTRY_SIZE, True)
        LBA_ENTRY.pack_into(view, 0, nsid, nlb0, slba)
        view[31] = lbamqa(self.phase, esa, dlba, lbacir)
        slot = self.tail
        self.tail = (self.tail + 1) % self.nslots
        if self.tail == 0:
            self.phase ^= 1
        if self.etpt and slot == self.tpt:
            self.etpt = False  # one-shot
            self._event(AEI_CDQ_TAIL_POINTER)

    def _event(self, info: int) -> None:
        self._events.append(info)

    def fire_events(self) -> None:
        """Posts the one-shot events gathered under the lock (call with `lock` released)."""
        while self._events:
            self.mmc.post_event(AsyncEvent(AsyncEventType.ONE_SHOT, self._events.pop(0), 0, self.cdqid))

    def post(self, nsid: int, nlb0: int, slba: int, esa: int, dlba: bool, lbacir: int) -> bool:
        """Posts an entry; when it would take the last free slot the entry becomes ESA 111b, logging
        stops and a CDQ Full one-shot event is raised. False if nothing could be posted."""
        free = self.free_slots()
        if free == 0:
            return False
        if free == 1 and esa != ESA_LAST_FULL:
            self.logging = False
            self.pending.clear()
            self._write(nsid, nlb0, slba, ESA_LAST_FULL, dlba, lbacir)
            self._unhook()
            self._event(AEI_CDQ_FULL)
            return True
        self._write(nsid, nlb0, slba, esa, dlba, lbacir)
        return True

    # --- change logging --------------------------------------------------------------------------
    def on_change(self, nsid: int, slba: int, nlb: int, dlba: bool) -> None:
        """A namespace of the target changed [slba, slba+nlb): merge with the held range or post it."""
        with self.lock:
            if not self.logging:
                return
            held = self.pending.get(nsid)
            if held is not None:
                h_slba, h_nlb, h_dlba = held
                if h_dlba == dlba and slba <= h_slba + h_nlb and slba + nlb >= h_slba:
                    lo, hi = min(slba, h_slba), max(slba + nlb, h_slba + h_nlb)
                    if hi - lo <= MAX_COALESCED_NLB:
                        held[0], held[1] = lo, hi - lo
                        return
                self._post_held(nsid)
            if self.logging:
                self.pending[nsid] = [slba, nlb, int(dlba)]
        self.fire_events()

    def _post_held(self, nsid: int) -> None:
        slba, nlb, dlba = self.pending.pop(nsid)
        esa = ESA_FIRST if self.first else ESA_NONE
        if self.post(nsid, nlb - 1, slba, esa, bool(dlba), LBACIR_RANGE):
            self.first = False

    def flush(self) -> None:
        """Posts every held range (host sync points: FID 21h, Track Send, suspend)."""
        with self.lock:
            self._flush_locked()
        self.fire_events()

    def _flush_locked(self) -> None:
        for nsid in list(self.pending):
            if not self.logging:
                break
            self._post_held(nsid)
        self.pending.clear()

    def start(self) -> None:
        with self.lock:
            if self.logging:
                return
            self.logging = True
            self.first = True
            ctrl = self.mmc.subsystem.controllers.get(self.target)
            if ctrl is not None:
                for ns in self.mmc.subsystem.namespaces.values():
                    if self.mmc.subsystem.is_attached(ns.nsid, self.target) and self not in ns.change_loggers:
                        ns.change_loggers.append(self)
                        self.namespaces.append(ns)

    def _unhook(self) -> None:
        for ns in self.namespaces:
            if self in ns.change_loggers:
                ns.change_loggers.remove(self)
        self.namespaces = []

    def stop(self, esa: int = ESA_LAST_STOPPED) -> None:
        """Stops logging with a final marker entry (010b by the host, 011b on suspend)."""
        with self.lock:
            if not self.logging:
                return
            self._flush_locked()
            if self.logging:
                self.logging = False
                self.post(0, 0, 0, esa, False, LBACIR_NONE)
            self._unhook()
        self.fire_events()

    def delete(self) -> None:
        with self.lock:
            self.logging = False
            self.pending.clear()
            self._unhook()


class MemoryTracker:
    """Host memory the target controller wrote by DMA, at 2**shift bytes granularity (D6)."""

    def __init__(self, target: Controller, shift: int, ranges: list[tuple[int, int]]) -> None:
        self.target = target
        self.shift = shift
        self.ranges = ranges  # [(saddr, end)) in bytes, as the host gave them
        merged: list[list[int]] = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], hi)
            else:
                merged.append([lo, hi])
        self._starts = [lo for lo, _ in merged]
        self._merged = merged
        self.dirty: set[int] = set()
        self.lock = threading.Lock()
        self._prev: Callable[[int, int], None] | None = None

    def on_write(self, iova: int, length: int) -> None:
        if self._prev is not None:
            self._prev(iova, length)
        end = iova + length
        i = max(bisect.bisect_right(self._starts, iova) - 1, 0)  # sorted, disjoint: a DMA write spans few
        merged = self._merged
        while i < len(merged) and merged[i][0] < end:
            a, b = max(merged[i][0], iova), min(merged[i][1], end)
            if a < b:
                with self.lock:
                    self.dirty.update(range(a >> self.shift, ((b - 1) >> self.shift) + 1))
            i += 1

    def install(self) -> None:
        iommu = self.target.fn.iommu
        self._prev = iommu.on_write
        iommu.on_write = self.on_write

    def uninstall(self) -> None:
        iommu = self.target.fn.iommu
        if iommu.on_write == self.on_write:
            iommu.on_write = self._prev
        self._prev = None

    def drain(self, max_descriptors: int) -> tuple[list[tuple[int, int]], bool]:
        """Up to `max_descriptors` coalesced (granule, count) runs, removed from the bitmap; and MTR."""
        with self.lock:
            granules = sorted(self.dirty)
            runs: list[tuple[int, int]] = []
            more = False
            for g in granules:
                if runs and runs[-1][0] + runs[-1][1] == g and runs[-1][1] < 0xFFFFFFFF:
                    runs[-1] = (runs[-1][0], runs[-1][1] + 1)
                elif len(runs) == max_descriptors:
                    more = True
                    break
                else:
                    runs.append((g, 1))
            for g, n in runs:
                self.dirty.difference_update(range(g, g + n))
            return runs, more


class LmTracking:
    """Per-subsystem TP4159 tracking state: CDQs by (MMC CNTLID, CDQID), memory trackers by target."""

    def __init__(self) -> None:
        self.cdqs: dict[tuple[int, int], Cdq] = {}
        self.memory: dict[int, MemoryTracker] = {}
        self.lock = threading.Lock()

    def ranges_in_use(self) -> int:
        return sum(len(q.pages) for q in self.cdqs.values())

    def descriptors_in_use(self) -> int:
        return sum(len(t.ranges) for t in self.memory.values())

    def of_controller(self, mmc: Controller) -> dict[int, Cdq]:
        return {cdqid: q for (cntlid, cdqid), q in self.cdqs.items() if cntlid == mmc.cntlid}

    def udmq_for_target(self, target: int) -> Cdq | None:
        return next((q for q in self.cdqs.values() if q.target == target), None)


_STATE: weakref.WeakKeyDictionary[NvmSubsystem, LmTracking] = weakref.WeakKeyDictionary()
_STATE_LOCK = threading.Lock()


def tracking(subsystem: NvmSubsystem) -> LmTracking:
    with _STATE_LOCK:
        state = _STATE.get(subsystem)
        if state is None:
            state = _STATE[subsystem] = LmTracking()
        return state


def on_controller_suspended(ctrl: Controller) -> None:
    """Called by Migration Send Suspend: the target's UDMQ gets its ESA 011b entry and logging stops."""
    q = tracking(ctrl.subsystem).udmq_for_target(ctrl.cntlid)
    if q is not None:
        q.stop(ESA_LAST_SUSPENDED)


def delete_udmq_of_target(ctrl: Controller) -> None:
    """Migration Send Suspend with DUDMQ=1: the UDMQ logging `ctrl` is deleted (its CDQID becomes free)."""
    state = tracking(ctrl.subsystem)
    with state.lock:
        for key, q in list(state.cdqs.items()):
            if q.target == ctrl.cntlid:
                q.delete()
                del state.cdqs[key]
