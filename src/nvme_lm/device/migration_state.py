"""Suspend / Resume and capture / restore of a migratable controller's state (TP4159, spec notes §9-11, D2-D4).

The Migration Send / Receive handlers (admin/migration.py) call these functions; other parts of the
device (CDQ, tracking, CLI) may call them too. Everything here works on the *target* controller,
which runs its own engine thread: state is read and written only while holding its lock, and a
Set Controller State builds every new object before it touches the target, so a refused state
leaves the target exactly as it was. Byte format: docs/controller-state.md.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from nvme_lm.device.doorbells import ShadowDoorbells
from nvme_lm.device.error_log import ErrorEntry
from nvme_lm.device.events import AsyncEvent
from nvme_lm.device.features import _monotonic_ms
from nvme_lm.device.queues import CompletionQueue, Ring, SubmissionQueue
from nvme_lm.device.request import NvmeError, Request
from nvme_lm.pcie.iommu import DmaFault
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.controller_state import (
    SMART_FIELDS,
    ControllerState,
    CqState,
    NvmeState,
    SqState,
    Tlv,
    decode_vendor,
    encode_error_log,
    encode_events,
    encode_vendor,
)
from nvme_lm.spec.opcodes import AdminOpcode
from nvme_lm.spec.registers import CC, CSTS, aqa_decode

if TYPE_CHECKING:
    from nvme_lm.device.cdq import LmTracking
    from nvme_lm.device.controller import Controller

log = logging.getLogger(__name__)

CONTROLLER_SUSPENDED = st.CONTROLLER_SUSPENDED  # named in spec/status.py (spec notes §13)
CONTROLLER_NOT_SUSPENDED = st.CONTROLLER_NOT_SUSPENDED
DRAIN_TIMEOUT = 5.0  # seconds a Suspend waits for fetched commands before giving up
MAX_STATE_BYTES = 1 << 20  # staging limit for Set Controller State


_keep_alive_paused: set[Controller] = set()  # suspended targets whose Keep Alive timer was running
_draining: set[Controller] = set()  # Suspend in progress: state commands wait for it (Command Sequence Error)
LOCK_TIMEOUT = 2.0  # seconds the MMC waits for a target's lock before refusing (never a deadlock)


@contextmanager
def locked(target: Controller) -> Iterator[None]:
    """The target's lock, taken from the MMC's engine with a bound: the target's I/O path may wait for the
    MMC's lock (UDMQ entries), so an unbounded wait here could deadlock the two engines."""
    if not target._lock.acquire(timeout=LOCK_TIMEOUT):
        raise NvmeError(st.COMMAND_SEQUENCE_ERROR, f"controller {target.cntlid} is busy")
    try:
        yield
    finally:
        target._lock.release()


def check_settled(target: Controller) -> None:
    """Get / Set Controller State and Resume need a finished Suspend (the host waits for its CQE)."""
    if target in _draining:
        raise NvmeError(st.COMMAND_SEQUENCE_ERROR, f"controller {target.cntlid}: Suspend still in progress")


def is_migratable(ctrl: Controller) -> bool:
    """A migratable controller is one that cannot run Migration Send itself (not an MMC; D9)."""
    return AdminOpcode.MIGRATION_SEND not in ctrl.admin_handlers


def _fetched_not_done(target: Controller) -> int:
    """Commands fetched and not completed, outstanding AERs excluded (they stay outstanding)."""
    return sum(sq.inflight for sq in list(target.sqs.values())) - len(target.aers)


def suspend(target: Controller, *, dudmq: bool = False, timeout: float = DRAIN_TIMEOUT) -> None:
    """Stops fetching, then waits until every fetched command except AERs has completed (D3).

    The CDQ module (if present) then writes the suspended entry into the target's UDMQ and, with
    DUDMQ, deletes that queue (hook `delete_udmq_of_target(ctrl)`, if the CDQ module offers it)."""
    with target._lock:
        if not target.suspended:  # leftovers of a suspension a Controller Level Reset ended
            _keep_alive_paused.discard(target)
            drop_staging(target)
        target.suspended = True
        _draining.add(target)
        if target.keep_alive_deadline is not None:  # the guest is paused: its keep-alive timer is too
            target.keep_alive_deadline = None
            _keep_alive_paused.add(target)
    deadline = time.monotonic() + timeout
    try:
        while True:
            with target._lock:
                if _fetched_not_done(target) <= 0:
                    break
            if time.monotonic() > deadline:
                raise NvmeError(st.INTERNAL_ERROR, "fetched commands did not complete in time")
            time.sleep(0.001)
    finally:
        _draining.discard(target)
    target.kick()  # the engine signals the interrupts of what completed during the drain
    try:
        from nvme_lm.device import cdq  # type: ignore[attr-defined]
    except ImportError:
        return
    hook = getattr(cdq, "on_controller_suspended", None)
    if hook is not None:
        hook(target)  # the suspended entry (ESA 011b) in the target's User Data Migration Queue
    if dudmq:
        delete = getattr(cdq, "delete_udmq_of_target", None)
        if delete is not None:
            delete(target)
        elif hasattr(cdq, "tracking"):
            _delete_udmq(cdq.tracking(target.subsystem), target)


def _delete_udmq(state: LmTracking, target: Controller) -> None:
    """DUDMQ: the target's User Data Migration Queue goes before the Suspend completes."""
    with state.lock:
        q = state.udmq_for_target(target.cntlid)
        if q is None:
            return
        q.delete()
        for key, v in list(state.cdqs.items()):
            if v is q:
                del state.cdqs[key]


def resume(target: Controller) -> None:
    check_settled(target)
    with locked(target):
        if not target.suspended:
            raise NvmeError(CONTROLLER_NOT_SUSPENDED, f"controller {target.cntlid} is not suspended")
        if target in _staging:
            raise NvmeError(st.COMMAND_SEQUENCE_ERROR, "a Set Controller State sequence is not committed")
        target.suspended = False
        if target in _keep_alive_paused:
            _keep_alive_paused.discard(target)
            target.restart_keep_alive()
    target.kick()


# ============================================================================ capture
def _capture_nvme(t: Controller) -> bytes:
    ns = NvmeState()
    for qid, sq in sorted(t.sqs.items()):
        if qid:
            pc = _ring_pc(sq.ring)
            ns.sqs.append(SqState(sq.ring.base, sq.size - 1, qid, sq.cq.qid, pc, sq.priority, sq.head, sq.tail))
    for qid, cq in sorted(t.cqs.items()):
        if qid:
            s0pt = cq.phase if cq.tail else cq.phase ^ 1
            ns.cqs.append(CqState(cq.ring.base, cq.size - 1, qid, cq.head, cq.tail, _ring_pc(cq.ring), cq.ien, s0pt,
                                  cq.vector))
    return ns.encode()


def _ring_pc(ring: Ring) -> bool:
    # a PC=0 ring of one page is flattened to contiguous, but its base stays the PRP list pointer
    return ring.contiguous and int(ring.pages[0]) == ring.base


def _capture_vendor(t: Controller) -> bytes:
    f = t.features
    tl: dict[int, object] = {Tlv.REGISTERS: (t.cc, t.aqa, t.asq, t.acq, t.intms)}
    asq, acq = t.sqs.get(0), t.cqs.get(0)
    if asq is not None and acq is not None:
        tl[Tlv.ADMIN_QUEUES] = (asq.head, asq.tail, acq.head, acq.tail, acq.phase)
    tl[Tlv.FEATURES] = [(fid, v, f.saved.get(fid, 0), int(fid in f.saved)) for fid, v in sorted(f.current.items())]
    keys = sorted(set(f.indexed) | set(f.indexed_saved))
    tl[Tlv.INDEXED_FEATURES] = [(fid, idx, f.indexed.get((fid, idx), 0), f.indexed_saved.get((fid, idx), 0),
                                 int((fid, idx) in f.indexed) | int((fid, idx) in f.indexed_saved) << 1)
                                for fid, idx in keys]
    tl[Tlv.TIMESTAMP] = (f.timestamp_now(), f.timestamp_origin)
    tl[Tlv.AERS] = [(a.sqe.cid,) for a in t.aers]
    tl[Tlv.EVENTS] = encode_events([(e.type, e.info, e.log_page, e.dw1) for e in t.events.pending],
                                   list(t.events.masked_logs))
    tl[Tlv.ERROR_LOG] = encode_error_log(t.error_log.count, [
        (e.error_count, e.sqid, e.cid, e.status_field, e.param_location, e.lba, e.nsid)
        for e in t.error_log.entries])
    tl[Tlv.QUEUE_ALLOC] = (t.nsqa, t.ncqa, int(t.queues_requested),
                           int(t.keep_alive_deadline is not None or t in _keep_alive_paused))
    if t.shadow is not None:
        tl[Tlv.SHADOW] = (t.shadow.shadow_addr, t.shadow.eventidx_addr)
    tl[Tlv.ABORT_MARKS] = sorted(t.abort_marks)
    tl[Tlv.CHANGED_NS] = [(n,) for n in t.changed_namespaces]
    tl[Tlv.HELD_COMPLETIONS] = [(cqid, *e) for cqid, entries in sorted(t.overflow.items()) for e in entries]
    smart = t.subsystem.smart
    tl[Tlv.SMART] = tuple(int(getattr(smart, name)) for name in SMART_FIELDS)
    return encode_vendor(tl)


def capture(target: Controller, *, nvme: bool = True, vendor: bool = True) -> bytes:
    """The Controller State structure of `target` (with the parts selected by CSVI / CSUUIDI)."""
    check_settled(target)
    with locked(target):
        return ControllerState(target.suspended, _capture_nvme(target) if nvme else b"",
                               _capture_vendor(target) if vendor else b"").encode()


# ============================================================================ restore
_staging: dict[Controller, bytearray] = {}  # Set Controller State segments per target (D4)


def stage(target: Controller, seqind: int, offset: int, data: bytes) -> bool:
    """Appends one SEQIND segment; returns True when the sequence is complete (10b / 11b)."""
    if seqind in (0b01, 0b11):
        _staging.pop(target, None)  # a new first segment discards an unfinished sequence
        buf = bytearray()
    else:
        buf = _staging.get(target)  # type: ignore[assignment]
        if buf is None:
            raise NvmeError(st.COMMAND_SEQUENCE_ERROR, "no Set Controller State sequence in progress")
    if offset != len(buf) or len(buf) + len(data) > MAX_STATE_BYTES:
        _staging.pop(target, None)
        raise NvmeError(st.INVALID_FIELD, f"segment at offset {offset} is not contiguous or too large")
    buf += data
    if seqind in (0b10, 0b11):
        _staging.pop(target, None)
        _staged_complete[target] = bytes(buf)
        return True
    _staging[target] = buf
    return False


_staged_complete: dict[Controller, bytes] = {}


def take_staged(target: Controller) -> bytes:
    return _staged_complete.pop(target)


def drop_staging(target: Controller) -> None:
    _staging.pop(target, None)
    _staged_complete.pop(target, None)


def _bad(why: str) -> NvmeError:
    log.debug("Set Controller State refused: %s", why)
    return NvmeError(st.INVALID_FIELD, f"controller state refused: {why}")


def restore(target: Controller, blob: bytes, *, csvi: int, csuuidi: int) -> None:
    """Validates the whole state against `target`, then commits it (queues, admin queue, features,
    AERs, events, error log...). Any problem raises Invalid Field before anything changes."""
    try:
        cs = ControllerState.decode(blob)
        nvme = NvmeState.decode(cs.nvme) if cs.nvme else None
        vendor = decode_vendor(cs.vendor) if cs.vendor else None
    except (ValueError, IndexError) as e:
        raise _bad(str(e)) from e
    if (csvi == 0 and cs.nvme) or (csuuidi == 0 and cs.vendor) or (csvi == 0 and csuuidi == 0):
        raise _bad("CSVI/CSUUIDI do not match the parts present")
    check_settled(target)
    with locked(target):
        commit = _plan(target, nvme, vendor)
        commit()


def _plan(t: Controller, nvme: NvmeState | None, vendor: dict[int, object] | None):
    """Builds every object the commit needs; returns the commit closure. No side effects on `t`."""
    if any(qid for qid in t.sqs) or any(qid for qid in t.cqs):
        raise NvmeError(st.INVALID_CONTROLLER_IDENTIFIER, "target already has I/O queues")
    fn = t.fn
    mqes = t.cap.mqes
    v = vendor or {}
    regs = v.get(Tlv.REGISTERS)
    if regs is not None:
        cc, aqa, asq_addr, acq_addr, intms = regs  # type: ignore[misc]
        if cc & ~0x00FFFFF1 or asq_addr & 0xFFF or acq_addr & 0xFFF or aqa & ~0x0FFF0FFF:
            raise _bad("register values")
        mps = CC.mps(cc)
        if not t.cap.mpsmin <= mps <= t.cap.mpsmax:
            raise _bad("CC.MPS")
        page = 1 << (12 + mps)
        enabled = bool(cc & CC.EN)
    else:
        if not t.ready:
            raise NvmeError(st.INVALID_CONTROLLER_IDENTIFIER, "target not enabled and no registers in the state")
        cc, aqa, asq_addr, acq_addr, intms = t.cc, t.aqa, t.asq, t.acq, t.intms
        page, enabled = t.page_size, True
    # --- admin queue
    new_admin: tuple[SubmissionQueue, CompletionQueue] | None = None
    if regs is not None and enabled:
        asqs, acqs = aqa_decode(aqa)
        if asqs < 1 or acqs < 1 or asqs > mqes or acqs > mqes:
            raise _bad("AQA")
        ptrs = v.get(Tlv.ADMIN_QUEUES)
        if ptrs is None:
            raise _bad("admin queue pointers missing")
        sh, stl, ch, ctl, cph = ptrs  # type: ignore[misc]
        if sh > asqs or stl > asqs or ch > acqs or ctl > acqs or cph > 1:
            raise _bad("admin queue pointers")
        try:
            acq = CompletionQueue(fn, 0, acq_addr, acqs + 1, page, True, True, 0)
            asq = SubmissionQueue(fn, 0, asq_addr, asqs + 1, page, True, acq)
        except (DmaFault, NvmeError) as e:
            raise _bad(f"admin queue memory: {e}") from e
        acq.head, acq.tail, acq.phase = ch, ctl, cph
        asq.head, asq.tail = sh, stl
        acq.sqs.add(0)
        new_admin = (asq, acq)
    elif regs is None:
        new_admin = None  # keep the target's running admin queue
    # --- I/O queues
    cqs: dict[int, CompletionQueue] = {}
    sqs: dict[int, SubmissionQueue] = {}
    if nvme is not None and (nvme.sqs or nvme.cqs):
        if not enabled:
            raise _bad("I/O queues on a disabled controller")
        nvec = fn.msix.nvectors
        for c in nvme.cqs:
            if not 1 <= c.qid <= t.max_io_queues or c.qid in cqs:
                raise _bad(f"CQ id {c.qid}")
            size = c.qsize + 1
            if size < 2 or size > mqes + 1 or c.head >= size or c.tail >= size:
                raise _bad(f"CQ {c.qid} size/pointers")
            if c.iv >= nvec or c.prp1 & (page - 1) or (not c.pc and t.cap.cqr):
                raise _bad(f"CQ {c.qid} vector/PRP1")
            try:
                cq = CompletionQueue(fn, c.qid, c.prp1, size, page, c.pc, c.ien, c.iv)
            except (DmaFault, NvmeError) as e:
                raise _bad(f"CQ {c.qid} memory: {e}") from e
            cq.head, cq.tail = c.head, c.tail
            cq.phase = c.s0pt if c.tail else c.s0pt ^ 1
            cqs[c.qid] = cq
        for s in nvme.sqs:
            if not 1 <= s.qid <= t.max_io_queues or s.qid in sqs:
                raise _bad(f"SQ id {s.qid}")
            size = s.qsize + 1
            if size < 2 or size > mqes + 1 or s.head >= size or s.tail >= size:
                raise _bad(f"SQ {s.qid} size/pointers")
            if s.cqid not in cqs:
                raise _bad(f"SQ {s.qid} names missing CQ {s.cqid}")
            if s.prp1 & (page - 1) or (not s.pc and t.cap.cqr):
                raise _bad(f"SQ {s.qid} PRP1")
            try:
                sq = SubmissionQueue(fn, s.qid, s.prp1, size, page, s.pc, cqs[s.cqid], s.qprio)
            except (DmaFault, NvmeError) as e:
                raise _bad(f"SQ {s.qid} memory: {e}") from e
            sq.head, sq.tail = s.head, s.tail
            sqs[s.qid] = sq
    # --- queue allocation
    qa = v.get(Tlv.QUEUE_ALLOC)
    if qa is not None:
        nsqa, ncqa, requested, ka = qa  # type: ignore[misc]
    else:
        nsqa = ncqa = t.max_io_queues if sqs or cqs else t.nsqa
        requested, ka = int(t.queues_requested), int(t.keep_alive_deadline is not None)
    if nsqa > t.max_io_queues or ncqa > t.max_io_queues or max(sqs, default=0) > nsqa or max(cqs, default=0) > ncqa:
        raise _bad("queue allocation beyond the target's resources")
    # --- features
    specs = t.features.specs
    feats = v.get(Tlv.FEATURES, [])
    for fid, _cur, _saved, _has in feats:  # type: ignore[attr-defined]
        if fid not in specs:
            raise _bad(f"feature {fid:#x} unknown here")
    idx_feats = v.get(Tlv.INDEXED_FEATURES, [])
    for fid, _i, _c, _s, flags in idx_feats:  # type: ignore[attr-defined]
        if fid not in specs or flags & ~3:
            raise _bad(f"indexed feature {fid:#x}")
    # --- AERs, events, errors, shadow doorbells, abort marks
    aer_cids = [c for (c,) in v.get(Tlv.AERS, [])]  # type: ignore[attr-defined]
    if len(aer_cids) > t.model.aerl + 1 or len(set(aer_cids)) != len(aer_cids):
        raise _bad("outstanding AERs")
    if aer_cids and new_admin is None and 0 not in t.sqs:
        raise _bad("AERs without an admin queue")
    pending, masked = v.get(Tlv.EVENTS, ([], []))  # type: ignore[misc]
    errors = v.get(Tlv.ERROR_LOG)
    if errors is not None and len(errors[1]) > t.error_log.capacity:  # type: ignore[index]
        raise _bad("error log longer than the target's")
    shadow = None
    sh = v.get(Tlv.SHADOW)
    if sh is not None:
        try:
            shadow = ShadowDoorbells(fn, sh[0], sh[1], page, t.cap.dstrd)  # type: ignore[index]
        except (DmaFault, ValueError) as e:
            raise _bad(f"shadow doorbell pages: {e}") from e
    marks = v.get(Tlv.ABORT_MARKS, [])
    for sqid, _cid in marks:  # type: ignore[attr-defined]
        if sqid not in sqs and sqid != 0:
            raise _bad(f"abort mark on missing SQ {sqid}")
    held = v.get(Tlv.HELD_COMPLETIONS, [])
    for rec in held:  # type: ignore[attr-defined]
        if rec[0] not in cqs and not (rec[0] == 0 and (new_admin is not None or 0 in t.cqs)):
            raise _bad(f"held completion for missing CQ {rec[0]}")
    ts = v.get(Tlv.TIMESTAMP)
    smart = v.get(Tlv.SMART)

    def commit() -> None:
        t.overflow.clear()
        t.abort_marks.clear()
        if regs is not None:
            t.cc, t.aqa, t.asq, t.acq, t.intms = cc, aqa, asq_addr, acq_addr, intms
            t.page_size = page
            t.csts = CSTS.RDY if enabled else 0
            t.shut_down = False
            if new_admin is not None:
                t.sqs = {0: new_admin[0]}
                t.cqs = {0: new_admin[1]}
            else:
                t.sqs, t.cqs = {}, {}
        for cq in cqs.values():
            t.cqs[cq.qid] = cq
        for sq in sqs.values():
            sq.cq.sqs.add(sq.qid)
            t.sqs[sq.qid] = sq
        t.nsqa, t.ncqa, t.queues_requested = nsqa, ncqa, bool(requested)
        for cqid, *entry in held:  # type: ignore[attr-defined]
            t.overflow.setdefault(cqid, deque()).append(tuple(entry))  # posted once the guest frees CQ slots
        f = t.features
        for fid, cur, saved, has in feats:  # type: ignore[attr-defined]
            f.current[fid] = cur
            if has:
                f.saved[fid] = saved
        if idx_feats:
            f.indexed, f.indexed_saved = {}, {}
        for fid, i, cur, saved, flags in idx_feats:  # type: ignore[attr-defined]
            if flags & 1:
                f.indexed[(fid, i)] = cur
            if flags & 2:
                f.indexed_saved[(fid, i)] = saved
        if ts is not None:
            f.timestamp_ms_base = ts[0] - _monotonic_ms()  # type: ignore[index]
            f.timestamp_origin = ts[1]  # type: ignore[index]
        f.apply_interrupts(t.irq)
        if vendor is not None:
            t.events.clear()
            for ty, info, lp, dw1 in pending:
                t.events.pending.append(AsyncEvent(ty, info, lp, dw1))
            t.events.masked_logs = set(masked)
            admin_sq = t.sqs.get(0)
            t.aers.clear()
            for cid in aer_cids:  # re-created so a later event completes them with the guest's CID
                assert admin_sq is not None
                t.aers.append(Request(t, admin_sq, SQE(opcode=AdminOpcode.ASYNC_EVENT_REQUEST, cid=cid)))
                admin_sq.inflight += 1
            t.shadow = shadow
            t.abort_marks.update({(sqid, cid): t.sqs[sqid] for sqid, cid in marks})  # type: ignore[attr-defined]
            t.changed_namespaces = [n for (n,) in v.get(Tlv.CHANGED_NS, [])]  # type: ignore[attr-defined]
        if errors is not None:
            count, entries = errors  # type: ignore[misc]
            t.error_log.count = max(t.error_log.count, count)
            t.error_log.entries = deque((ErrorEntry(*e) for e in entries), maxlen=t.error_log.capacity)
        if smart is not None:
            sc = t.subsystem.smart
            for name, value in zip(SMART_FIELDS, smart, strict=True):  # type: ignore[call-overload]
                setattr(sc, name, max(int(getattr(sc, name)), value))  # monotonic at the destination
        t.keep_alive_deadline = None
        _keep_alive_paused.discard(t)
        if ka:
            _keep_alive_paused.add(t)  # restarted by Resume (the target stays suspended until then)

    return commit
