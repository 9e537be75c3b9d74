"""TP4159 tracking commands on the migration management controller (the PF): Controller Data Queue (45h),
Track Send (3Dh), Track Receive (3Eh) and Set/Get Features FID 21h (dispatched here by admin/features.py).

Every refusal raises before any state changes. Decisions on open points are in docs/tracking.md.
"""

from __future__ import annotations

import struct
from typing import TYPE_CHECKING

from nvme_lm.device.cdq import Cdq, MemoryTracker, tracking
from nvme_lm.device.features import FeatureSpec
from nvme_lm.device.request import Handler, NvmeError, Request, by_select
from nvme_lm.pcie.iommu import DmaFault
from nvme_lm.spec import status as st
from nvme_lm.spec.cdq import (
    CDQ_FULL,
    CDQ_SEL_CREATE,
    CDQ_SEL_DELETE,
    CDW11_ETPT,
    CDW11_PC,
    CMMRTD,
    FID_CDQ,
    FID_CDQ_BUFFER_SIZE,
    INVALID_CDQ,
    LBA_ENTRY_DWORDS,
    MAXMRTG,
    MCDQPC,
    MCMR,
    MCUDMQ,
    MINMRTG,
    MNSUDMQ,
    NMCMR,
    NMMRTD,
    NOT_ENOUGH_RESOURCES,
    QT_USER_DATA_MIGRATION,
    TMC_DESCRIPTOR,
    TMC_HEADER,
    TR_DESCRIPTOR,
    TR_HEADER,
    TR_MTR,
    TR_SEL_TRACKED_MEMORY_CHANGES,
    TR_SUSP,
    TS_SEL_LOG_USER_DATA_CHANGES,
    TS_SEL_TRACK_MEMORY_CHANGES,
)
from nvme_lm.spec.opcodes import AdminOpcode

if TYPE_CHECKING:
    from nvme_lm.device.controller import Controller

PEL_CDW10 = 40
PEL_CDW11 = 44
PEL_CDW12 = 48
PEL_CDW13 = 52
PEL_PRP1 = 24


def _target(req: Request, cntlid: int) -> Controller:
    """The migratable controller `cntlid` (a secondary controller of this subsystem), else 1Fh."""
    ctrl = req.ctrl.subsystem.controllers.get(cntlid)
    if ctrl is None or ctrl is req.ctrl or not ctrl.fn.is_virtual:
        raise NvmeError(st.INVALID_CONTROLLER_IDENTIFIER, f"CNTLID {cntlid:#x} is not a migratable controller",
                        PEL_CDW11)
    return ctrl


def _cdq(req: Request, cdqid: int) -> Cdq:
    q = tracking(req.ctrl.subsystem).cdqs.get((req.ctrl.cntlid, cdqid))
    if q is None:
        raise NvmeError(INVALID_CDQ, f"no CDQ {cdqid}", PEL_CDW11)
    return q


# ------------------------------------------------------------------------- Controller Data Queue
def _queue_pages(req: Request, pc: bool, nbytes: int) -> list[int]:
    ctrl = req.ctrl
    ps = ctrl.page_size
    prp1 = req.sqe.prp1
    if prp1 & (ps - 1):
        raise NvmeError(st.PRP_OFFSET_INVALID, "CDQ PRP1 has a page offset", PEL_PRP1)
    npages = -(-nbytes // ps)
    try:
        if pc:
            ctrl.fn.dma_view(prp1, nbytes, False)
            return [prp1]
        if npages > MCDQPC or npages > ps // 8:
            raise NvmeError(st.INVALID_FIELD, f"{npages} PRP entries exceed MCDQPC", PEL_CDW12)
        raw = bytes(ctrl.fn.dma_view(prp1, npages * 8, False))
        pages = list(struct.unpack(f"<{npages}Q", raw))
        for p in pages:
            if p & (ps - 1):
                raise NvmeError(st.PRP_OFFSET_INVALID, "CDQ PRP list entry has a page offset", PEL_PRP1)
            ctrl.fn.dma_view(p, ps, False)
        return pages
    except DmaFault as e:
        raise NvmeError(st.INVALID_FIELD, f"CDQ memory is not host memory: {e}", PEL_PRP1) from e


def _create(req: Request) -> st.Status:
    ctrl, sqe = req.ctrl, req.sqe
    qt = (sqe.cdw10 >> 16) & 0xFF
    if qt != QT_USER_DATA_MIGRATION:
        raise NvmeError(st.INVALID_FIELD, f"queue type {qt:#x} not supported", PEL_CDW10 + 2)
    pc = bool(sqe.cdw11 & CDW11_PC)
    cntlid = sqe.cdw11 >> 16
    size = sqe.cdw12
    if size == 0 or size % LBA_ENTRY_DWORDS or size // LBA_ENTRY_DWORDS < 2:
        raise NvmeError(st.INVALID_FIELD, f"CDQSIZE {size} is not a multiple of the entry size", PEL_CDW12)
    _target(req, cntlid)
    state = tracking(ctrl.subsystem)
    with state.lock:
        if state.udmq_for_target(cntlid) is not None:
            raise NvmeError(st.INVALID_FIELD, f"CNTLID {cntlid:#x} already has a UDMQ", PEL_CDW11 + 2)
        mine = state.of_controller(ctrl)
        if len(mine) >= MCUDMQ or len(state.cdqs) >= MNSUDMQ:
            raise NvmeError(NOT_ENOUGH_RESOURCES, "UDMQ limit reached", PEL_CDW10)
        pages = _queue_pages(req, pc, size * 4)
        if len(pages) > MCMR or state.ranges_in_use() + len(pages) > NMCMR:
            raise NvmeError(st.INVALID_FIELD, "too many CDQ memory ranges", PEL_PRP1)
        cdqid = next(i for i in range(len(mine) + 1) if i not in mine)
        state.cdqs[(ctrl.cntlid, cdqid)] = Cdq(ctrl, cdqid, cntlid, pages, size // LBA_ENTRY_DWORDS)
    req.dw0 = cdqid
    return st.SUCCESS


def _delete(req: Request) -> st.Status:
    q = _cdq(req, req.sqe.cdw11 & 0xFFFF)
    state = tracking(req.ctrl.subsystem)
    with state.lock:
        q.delete()
        del state.cdqs[(req.ctrl.cntlid, q.cdqid)]
    return st.SUCCESS


controller_data_queue = by_select("CDQ", {CDQ_SEL_CREATE: _create, CDQ_SEL_DELETE: _delete})


def reset_mmc(mmc: Controller) -> None:
    """Controller Level Reset of the MMC: its UDMQs are deleted and host-memory tracking stops (spec notes §1)."""
    state = tracking(mmc.subsystem)
    with state.lock:
        for cdqid, q in state.of_controller(mmc).items():
            q.delete()
            del state.cdqs[(mmc.cntlid, cdqid)]
        for cntlid, tracker in list(state.memory.items()):
            tracker.uninstall()
            del state.memory[cntlid]


# ------------------------------------------------------------------------------ Feature 21h
def install(primary: Controller) -> None:
    """FID 21h exists on the controller that can create CDQs (the PF) only."""
    if AdminOpcode.CONTROLLER_DATA_QUEUE in primary.admin_handlers:
        primary.features.specs[FID_CDQ] = FeatureSpec(FID_CDQ, 0, saveable=False)
        primary.features.current.setdefault(FID_CDQ, 0)


def set_feature(req: Request, value: int, save: bool) -> None:
    """HP = the next slot the host has not consumed (the new head, as libvfn writes it): any slot from the
    current head up to the tail inclusive; TPT is any slot of the queue when ETPT=1."""
    q = _cdq(req, value & 0xFFFF)
    hp, tpt = req.sqe.cdw12, req.sqe.cdw13
    etpt = bool(value & CDW11_ETPT)
    with q.lock:
        if hp >= q.nslots or (hp - q.head) % q.nslots > q.posted():
            raise NvmeError(st.INVALID_FIELD, f"HP {hp} is not a posted slot or the tail", PEL_CDW12)
        if etpt and tpt >= q.nslots:
            raise NvmeError(st.INVALID_FIELD, f"TPT {tpt} is not a slot of CDQ {q.cdqid}", PEL_CDW13)
        q.head = hp
        q.etpt, q.tpt = etpt, (tpt if etpt else 0)
    q.flush()  # a sync point, after the checks: a refused Set changes nothing
    return None


def get_feature(req: Request, sel: int) -> None:
    q = _cdq(req, req.sqe.cdw11 & 0xFFFF)
    q.flush()
    with q.lock:
        data = struct.pack("<II", q.head, q.tpt if q.etpt else 0)
    req.write_to_host(data, FID_CDQ_BUFFER_SIZE)


# ------------------------------------------------------------------------------- Track Send
def _log_user_data_changes(req: Request) -> st.Status:
    q = _cdq(req, req.sqe.cdw11 & 0xFFFF)
    start = bool((req.sqe.cdw10 >> 16) & 1)
    with q.lock:
        if start:
            if not q.logging and q.free_slots() < 2:
                raise NvmeError(CDQ_FULL, f"CDQ {q.cdqid} is full", PEL_CDW11)
            q.start()
        else:
            q.stop()
    return st.SUCCESS


def _track_memory_changes(req: Request) -> st.Status:
    target = _target(req, req.sqe.cdw11 & 0xFFFF)
    start = bool((req.sqe.cdw10 >> 16) & 1)
    state = tracking(req.ctrl.subsystem)
    with state.lock:
        current = state.memory.get(target.cntlid)
        if not start:
            if current is None:
                raise NvmeError(st.COMMAND_SEQUENCE_ERROR, "not tracking host memory changes", PEL_CDW10 + 2)
            current.uninstall()
            del state.memory[target.cntlid]
            return st.SUCCESS
        if current is not None:
            raise NvmeError(st.INVALID_CONTROLLER_IDENTIFIER, "already tracking host memory changes", PEL_CDW11)
        ver, rmrtg, n = TMC_HEADER.unpack(req.read_from_host(TMC_HEADER.size))
        if ver != 0 or not MINMRTG <= rmrtg <= MAXMRTG or n == 0 or n > CMMRTD:
            raise NvmeError(st.INVALID_FIELD, "bad Track Memory Changes header", PEL_CDW10)
        if state.descriptors_in_use() + n > NMMRTD:
            raise NvmeError(NOT_ENOUGH_RESOURCES, "memory range tracking descriptors exhausted", PEL_CDW10)
        raw = req.read_from_host(TMC_HEADER.size + n * TMC_DESCRIPTOR.size)[TMC_HEADER.size:]
        ranges = []
        for saddr, length in TMC_DESCRIPTOR.iter_unpack(raw):
            if length == 0 or saddr & ((1 << rmrtg) - 1):
                raise NvmeError(st.INVALID_FIELD, "bad memory range tracking descriptor", PEL_CDW10)
            ranges.append((saddr, saddr + (length << rmrtg)))
        tracker = MemoryTracker(target, rmrtg, ranges)
        tracker.install()
        state.memory[target.cntlid] = tracker
    req.dw0 = rmrtg
    return st.SUCCESS


track_send = by_select("Track Send", {TS_SEL_LOG_USER_DATA_CHANGES: _log_user_data_changes,
                                      TS_SEL_TRACK_MEMORY_CHANGES: _track_memory_changes})


# ---------------------------------------------------------------------------- Track Receive
def track_receive(req: Request) -> st.Status:
    sel = req.sqe.cdw10 & 0xFF
    if sel != TR_SEL_TRACKED_MEMORY_CHANGES:
        raise NvmeError(st.INVALID_FIELD, f"Track Receive select {sel:#x} reserved", PEL_CDW10)
    target = _target(req, req.sqe.cdw11 & 0xFFFF)
    nbytes = (req.sqe.cdw12 + 1) * 4
    if nbytes < TR_HEADER.size:
        raise NvmeError(st.INVALID_FIELD, "NUMDL smaller than the response header", PEL_CDW12)
    tracker = tracking(req.ctrl.subsystem).memory.get(target.cntlid)
    if tracker is None:
        raise NvmeError(st.COMMAND_SEQUENCE_ERROR, "not tracking host memory changes", PEL_CDW11)
    # Fault-check the buffer before draining, so a bad buffer loses no dirty ranges
    req.data_views(nbytes, to_host=True)
    runs, more = tracker.drain((nbytes - TR_HEADER.size) // TR_DESCRIPTOR.size)
    attrs = (TR_MTR if more else 0) | (TR_SUSP if getattr(target, "suspended", False) else 0)
    out = bytearray(TR_HEADER.pack(0, attrs, target.cntlid, len(runs), tracker.shift))
    for g, n in runs:
        out += TR_DESCRIPTOR.pack(g << tracker.shift, n)
    req.write_to_host(out, nbytes)
    return st.SUCCESS


HANDLERS: dict[int, Handler] = {
    AdminOpcode.CONTROLLER_DATA_QUEUE: controller_data_queue,
    AdminOpcode.TRACK_SEND: track_send,
    AdminOpcode.TRACK_RECEIVE: track_receive,
}
