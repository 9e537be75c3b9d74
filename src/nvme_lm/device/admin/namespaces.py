"""Namespace Management (admin 0Dh) and Namespace Attachment (admin 15h).

Create (SEL 0) takes the host's 4 KiB Identify Namespace-shaped buffer: NSZE, NCAP, FLBAS
(format index = the model's `lba_data_sizes` index), DPS, NMIC. Capacity is reserved in full
(NCAP must equal NSZE: thin provisioning is not offered through management), no protection
information, no metadata; only the NVM command set. The new NSID is returned in DW0; the
namespace starts detached. Delete (SEL 1) takes an NSID or FFFFFFFFh for all namespaces.

Attach/detach (SEL 0/1) take a Controller List (u16 count, u16 CNTLIDs). The whole list is
validated before anything changes, so a refused command leaves every attachment as it was.
Each controller whose attachments changed gets the NSID in its Changed Namespace List (log
04h) and a Namespace Attribute Changed notice (if its AEC bit 8 allows), the issuing
controller included, as QEMU does.

NSID checks: 0 or beyond NN -> Invalid Namespace or Format; a valid but unallocated NSID, or
FFFFFFFFh where a single namespace is meant -> Invalid Field in Command.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

from nvme_lm.device.events import AsyncEvent, AsyncEventType, NoticeInfo
from nvme_lm.device.request import Handler, NvmeError, Request, by_select
from nvme_lm.spec import status as st
from nvme_lm.spec.identify import CTRL_LIST_MAX, IdentifyNamespace, decode_ctrl_list
from nvme_lm.spec.opcodes import AdminOpcode

if TYPE_CHECKING:
    from nvme_lm.device.controller import Controller

PEL_NSID = 4
PEL_CDW10 = 40
PEL_CSI = 47
BROADCAST = 0xFFFFFFFF
CSI_NVM = 0
LOG_CHANGED_NS = 0x04
CHANGED_NS_LIST_MAX = 1024
DATA_SIZE = 4096
SEL_CREATE = SEL_ATTACH = 0
SEL_DELETE = SEL_DETACH = 1


# ----------------------------------------------------------------------------------- helpers
def notify_namespace_changed(target: Controller, nsid: int, issuer: Controller) -> None:
    """Adds `nsid` to the target's Changed Namespace List and raises the notice event there.

    The issuer's engine holds its own controller lock; posting to another controller takes
    that controller's lock, so it is done from a short-lived thread: two controllers notifying
    each other at the same moment must not deadlock.
    """
    changed = target.changed_namespaces
    if nsid not in changed and len(changed) <= CHANGED_NS_LIST_MAX:
        changed.append(nsid)  # more than 1024 entries is reported as FFFFFFFFh by the log
    event = AsyncEvent(AsyncEventType.NOTICE, NoticeInfo.NAMESPACE_ATTRIBUTE_CHANGED, LOG_CHANGED_NS)
    if target is issuer:
        target.post_event(event)
    else:
        threading.Thread(target=target.post_event, args=(event,), name="nvme-notice", daemon=True).start()


def _notify(req: Request, cntlids: set[int] | list[int], nsid: int) -> None:
    controllers = req.ctrl.subsystem.controllers
    for cntlid in sorted(cntlids):
        target = controllers.get(cntlid)
        if target is not None:
            notify_namespace_changed(target, nsid, req.ctrl)


def lba_format_index(cdw_or_flbas: int, *, flbas: bool) -> int:
    """The LBA format index from FLBAS (bits 3:0 + 6:5) or Format NVM CDW10 (3:0 + 13:12)."""
    low = cdw_or_flbas & 0xF
    high = (cdw_or_flbas >> 5) & 0x3 if flbas else (cdw_or_flbas >> 12) & 0x3
    return low | high << 4


def _allocated(req: Request, nsid: int) -> None:
    """`nsid` must name one allocated namespace."""
    if nsid == 0 or (nsid > req.ctrl.model.max_namespaces and nsid != BROADCAST):
        raise NvmeError(st.INVALID_NAMESPACE, f"NSID {nsid:#x} is not valid", PEL_NSID)
    if nsid not in req.ctrl.subsystem.namespaces:
        raise NvmeError(st.INVALID_FIELD, f"namespace {nsid:#x} is not allocated", PEL_NSID)


# ---------------------------------------------------------------------- Namespace Management
def _create(req: Request) -> st.Status:
    ctrl = req.ctrl
    sub = ctrl.subsystem
    model = ctrl.model
    csi = req.sqe.cdw11 >> 24
    if csi != CSI_NVM:
        raise NvmeError(st.IO_CMD_SET_NOT_SUPPORTED, f"I/O command set {csi} not supported", PEL_CSI)
    idns = IdentifyNamespace.decode(req.read_from_host(DATA_SIZE))
    index = lba_format_index(idns.flbas, flbas=True)
    if idns.nsze == 0:
        raise NvmeError(st.INVALID_FIELD, "NSZE is 0")
    if idns.ncap > idns.nsze:
        raise NvmeError(st.INVALID_FIELD, f"NCAP {idns.ncap} exceeds NSZE {idns.nsze}")
    if idns.ncap < idns.nsze:
        raise NvmeError(st.THIN_PROVISIONING_NOT_SUPPORTED, "NCAP must equal NSZE")
    if index >= len(model.lba_data_sizes) or idns.flbas & 0x10:
        raise NvmeError(st.INVALID_FORMAT, f"LBA format {index} (FLBAS {idns.flbas:#x}) not supported")
    if idns.dps:
        raise NvmeError(st.INVALID_FIELD, "end-to-end protection is not supported")
    if idns.nmic & ~1:
        raise NvmeError(st.INVALID_FIELD, f"NMIC {idns.nmic:#x} has reserved bits set")
    lba_size = model.lba_data_sizes[index]
    with sub.lock:
        if idns.nsze * lba_size > sub.unallocated_capacity_bytes:
            raise NvmeError(st.NS_INSUFFICIENT_CAPACITY,
                            f"{idns.nsze * lba_size} bytes asked, {sub.unallocated_capacity_bytes} free")
        nsid = sub.free_nsid()
        if nsid is None:
            raise NvmeError(st.NSID_UNAVAILABLE, f"all {model.max_namespaces} namespace identifiers in use")
        ns = sub.create_namespace(idns.nsze, lba_size, nsid)
        if ns.info.nmic != idns.nmic & 1:
            ns.info.nmic = idns.nmic & 1
            ns.save_info()
    req.dw0 = nsid
    return st.SUCCESS


def _delete(req: Request) -> st.Status:
    sub = req.ctrl.subsystem
    nsid = req.sqe.nsid
    with sub.lock:
        if nsid == BROADCAST:
            nsids = sorted(sub.namespaces)
        else:
            _allocated(req, nsid)
            nsids = [nsid]
        for n in nsids:
            _notify(req, sub.delete_namespace(n), n)
    return st.SUCCESS


namespace_management = by_select("Namespace Management", {SEL_CREATE: _create, SEL_DELETE: _delete}, mask=0xF)


# ----------------------------------------------------------------------- Namespace Attachment
def _controller_list(req: Request) -> list[int]:
    data = req.read_from_host(DATA_SIZE)
    count = int.from_bytes(data[:2], "little")
    if count == 0 or count > CTRL_LIST_MAX:
        raise NvmeError(st.CONTROLLER_LIST_INVALID, f"controller list of {count} entries")
    cntlids = decode_ctrl_list(data)
    known = req.ctrl.subsystem.controllers
    if len(set(cntlids)) != count or any(c not in known for c in cntlids):
        raise NvmeError(st.CONTROLLER_LIST_INVALID, f"controller list {cntlids} names unknown or repeated controllers")
    return cntlids


def namespace_attachment(req: Request) -> st.Status:
    sub = req.ctrl.subsystem
    nsid = req.sqe.nsid
    sel = req.sqe.cdw10 & 0xF
    if sel not in (SEL_ATTACH, SEL_DETACH):
        raise NvmeError(st.INVALID_FIELD, f"SEL {sel} reserved", PEL_CDW10)
    if nsid == BROADCAST:
        raise NvmeError(st.INVALID_FIELD, "attachment needs a single namespace", PEL_NSID)
    _allocated(req, nsid)
    cntlids = _controller_list(req)
    with sub.lock:
        ns = sub.namespaces.get(nsid)
        if ns is None:
            raise NvmeError(st.INVALID_FIELD, f"namespace {nsid:#x} is not allocated", PEL_NSID)
        attached = sub.attached.get(nsid, set())
        if sel == SEL_ATTACH:
            already = [c for c in cntlids if c in attached]
            if already:
                raise NvmeError(st.NS_ALREADY_ATTACHED, f"namespace {nsid} already attached to {already}")
            if not ns.info.nmic & 1 and len(attached) + len(cntlids) > 1:
                raise NvmeError(st.NS_IS_PRIVATE, f"namespace {nsid} is private")
            for c in cntlids:
                sub.attach(nsid, c)
        else:
            missing = [c for c in cntlids if c not in attached]
            if missing:
                raise NvmeError(st.NS_NOT_ATTACHED, f"namespace {nsid} not attached to {missing}")
            for c in cntlids:
                sub.detach(nsid, c)
    _notify(req, cntlids, nsid)
    return st.SUCCESS


HANDLERS: dict[int, Handler] = {
    AdminOpcode.NS_MANAGEMENT: namespace_management,
    AdminOpcode.NS_ATTACHMENT: namespace_attachment,
}
