"""Migration Send (41h: Suspend, Resume, Set Controller State) and Migration Receive (42h: Get
Controller State), TP4159 / spec notes §9-11. Only the migration management controller (the PF)
has these opcodes (PRIVILEGED_ADMIN_OPCODES); the target is named by CNTLID and must be a
migratable controller of the same subsystem. Decisions: docs/controller-state.md.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING

from nvme_lm.device import migration_state as ms
from nvme_lm.device.request import DEFERRED, Handler, NvmeError, Request
from nvme_lm.spec import status as st
from nvme_lm.spec.opcodes import AdminOpcode

if TYPE_CHECKING:
    from nvme_lm.device.controller import Controller

log = logging.getLogger(__name__)

SEL_SUSPEND, SEL_RESUME, SEL_SET_STATE = 0, 1, 2
SEL_GET_STATE = 0
STYPE_NOTIFICATION, STYPE_SUSPEND = 0, 1
PEL_CDW10, PEL_CDW11, PEL_CDW12 = 40, 44, 48


def _target(req: Request) -> Controller:
    cntlid = req.sqe.cdw11 & 0xFFFF
    target = req.ctrl.subsystem.controllers.get(cntlid)
    if target is None or target is req.ctrl or not ms.is_migratable(target):
        raise NvmeError(st.INVALID_CONTROLLER_IDENTIFIER, f"CNTLID {cntlid} is not a migratable controller",
                        PEL_CDW11)
    return target


def migration_send(req: Request) -> st.Status:
    sel = req.sqe.cdw10 & 0xFF
    if sel == SEL_SUSPEND:
        return _suspend(req)
    if sel == SEL_RESUME:
        if req.sqe.cdw10 >> 16 or req.sqe.cdw11 >> 16:
            raise NvmeError(st.INVALID_FIELD, "reserved fields set", PEL_CDW10)
        ms.resume(_target(req))
        return st.SUCCESS
    if sel == SEL_SET_STATE:
        return _set_state(req)
    raise NvmeError(st.INVALID_FIELD, f"Migration Send SEL {sel:#x}", PEL_CDW10)


def _suspend(req: Request) -> st.Status:
    cdw11 = req.sqe.cdw11
    stype = (cdw11 >> 16) & 0xFF
    if req.sqe.cdw10 >> 16 or cdw11 & 0x7F000000:
        raise NvmeError(st.INVALID_FIELD, "reserved fields set", PEL_CDW10)
    if stype not in (STYPE_NOTIFICATION, STYPE_SUSPEND):
        raise NvmeError(st.INVALID_FIELD, f"STYPE {stype:#x}", PEL_CDW11 + 2)
    target = _target(req)
    if stype != STYPE_SUSPEND:
        return st.SUCCESS  # Suspend Notification: only a warning
    # The drain runs beside the MMC's engine, not in it: the target's I/O path may need the MMC's lock
    # (UDMQ entries, one-shot events), so waiting for the target while holding that lock could deadlock.
    # A second Suspend of a suspended controller is not an error.
    threading.Thread(target=_suspend_worker, args=(req, target, bool(cdw11 >> 31)), daemon=True,
                     name=f"nvme-suspend{target.cntlid}").start()
    return DEFERRED


def _suspend_worker(req: Request, target: Controller, dudmq: bool) -> None:
    status = st.SUCCESS
    try:
        ms.suspend(target, dudmq=dudmq)
    except NvmeError as e:
        status = e.status
    except Exception:  # the MMC's command must complete whatever happened
        log.exception("Suspend of controller %d failed", target.cntlid)
        status = st.INTERNAL_ERROR
    with req.ctrl._lock:  # the dispatcher has counted the request in flight once this is free
        req.ctrl.complete_deferred(req, status)


def _set_state(req: Request) -> st.Status:
    sqe = req.sqe
    seqind = (sqe.cdw10 >> 16) & 0x3
    if sqe.cdw10 >> 18:
        raise NvmeError(st.INVALID_FIELD, "reserved MOS bits set", PEL_CDW10 + 2)
    csvi, csuuidi = (sqe.cdw11 >> 16) & 0xFF, sqe.cdw11 >> 24
    target = _target(req)
    if csvi > 1 or csuuidi > 1:
        ms.drop_staging(target)
        raise NvmeError(st.INVALID_FIELD, f"CSVI {csvi} / CSUUIDI {csuuidi} not in CNS 20h", PEL_CDW11 + 2)
    if not target.suspended:
        ms.drop_staging(target)
        raise NvmeError(ms.CONTROLLER_NOT_SUSPENDED, f"controller {target.cntlid} is not suspended", PEL_CDW11)
    offset = sqe.cdw12 | sqe.cdw13 << 32
    nbytes = sqe.cdw15 * 4  # NUMD is 1's based (spec notes §14.3)
    if offset % 4 or nbytes > ms.MAX_STATE_BYTES:
        ms.drop_staging(target)
        raise NvmeError(st.INVALID_FIELD, "offset not dword aligned or segment too large", PEL_CDW12)
    data = req.read_from_host(nbytes) if nbytes else b""
    if not ms.stage(target, seqind, offset, data):
        return st.SUCCESS
    ms.restore(target, ms.take_staged(target), csvi=csvi, csuuidi=csuuidi)
    return st.SUCCESS


def migration_receive(req: Request) -> st.Status:
    sqe = req.sqe
    sel = sqe.cdw10 & 0xFF
    if sel != SEL_GET_STATE:
        raise NvmeError(st.INVALID_FIELD, f"Migration Receive SEL {sel:#x}", PEL_CDW10)
    if sqe.cdw10 & 0xFF00FF00:
        raise NvmeError(st.INVALID_FIELD, "reserved fields set", PEL_CDW10)
    csvi, csuuidi = (sqe.cdw10 >> 16) & 0xFF, (sqe.cdw11 >> 16) & 0xFF
    target = _target(req)
    if csvi > 1 or csuuidi > 1:
        raise NvmeError(st.INVALID_FIELD, f"CSVI {csvi} / CSUUIDI {csuuidi} not in CNS 20h", PEL_CDW10 + 2)
    if not target.suspended:
        raise NvmeError(ms.CONTROLLER_NOT_SUSPENDED, f"controller {target.cntlid} is not suspended", PEL_CDW11)
    was = target.suspended
    blob = ms.capture(target, nvme=csvi == 1, vendor=csuuidi == 1)
    offset = sqe.cdw12 | sqe.cdw13 << 32
    if offset % 4 or offset > len(blob):
        raise NvmeError(st.INVALID_FIELD, f"offset {offset} outside the {len(blob)}-byte state", PEL_CDW12)
    length = (sqe.cdw15 + 1) * 4  # NUMDL is 0's based
    req.write_to_host(blob[offset : offset + length], length)
    req.dw0 = int(was and target.suspended)  # CSUP: suspended for the whole command
    return st.SUCCESS


def cns_supported_state_formats(req: Request) -> bytes:
    """Identify CNS 20h, MMC only (spec notes §2.3, D1)."""
    from nvme_lm.spec.controller_state import supported_formats

    if AdminOpcode.MIGRATION_SEND not in req.ctrl.admin_handlers:
        raise NvmeError(st.INVALID_FIELD, "CNS 20h is for the migration management controller", 40)
    return supported_formats()


HANDLERS: dict[int, Handler] = {
    AdminOpcode.MIGRATION_SEND: migration_send,
    AdminOpcode.MIGRATION_RECEIVE: migration_receive,
}
