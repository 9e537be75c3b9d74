"""Format NVM (admin 80h): CDW10 3:0 LBAF (13:12 upper bits), 4 MSET, 7:5 PI, 8 PIL, 11:9 SES.

A format picks one of the model's LBA formats (index i = `model.lba_data_sizes[i]`) and keeps
the namespace's capacity in bytes. Every block is deallocated whatever SES says, as QEMU does
(the user data after a format is not defined by the specification without SES, and a fresh
sparse file is the cheapest defined answer); SES 1 (user data erase) therefore costs nothing
more. Cryptographic erase (SES 2) is not supported (FNA bit 2 = 0) -> Invalid Field.
There is no metadata and no protection information, so PI must be 0 (else Invalid Format).

NSID FFFFFFFFh formats every namespace attached to this controller. Other controllers that
have a formatted namespace attached see its Identify data change, so they get the namespace
in their Changed Namespace List and a Namespace Attribute Changed notice.
"""

from __future__ import annotations

from nvme_lm.device.admin.namespaces import lba_format_index, notify_namespace_changed
from nvme_lm.device.request import Handler, NvmeError, Request
from nvme_lm.spec import status as st
from nvme_lm.spec.opcodes import AdminOpcode

PEL_NSID = 4
PEL_CDW10 = 40
BROADCAST = 0xFFFFFFFF
SES_NONE, SES_USER_DATA, SES_CRYPTO = 0, 1, 2


def format_nvm(req: Request) -> st.Status:
    ctrl = req.ctrl
    sub = ctrl.subsystem
    cdw10 = req.sqe.cdw10
    nsid = req.sqe.nsid
    index = lba_format_index(cdw10, flbas=False)
    pi = (cdw10 >> 5) & 0x7
    ses = (cdw10 >> 9) & 0x7
    if ses == SES_CRYPTO:
        raise NvmeError(st.INVALID_FIELD, "cryptographic erase is not supported", PEL_CDW10 + 1)
    if ses > SES_CRYPTO:
        raise NvmeError(st.INVALID_FIELD, f"SES {ses} reserved", PEL_CDW10 + 1)
    if index >= len(ctrl.model.lba_data_sizes):
        raise NvmeError(st.INVALID_FORMAT, f"LBA format {index} not supported", PEL_CDW10)
    if pi:
        raise NvmeError(st.INVALID_FORMAT, "protection information needs metadata, which no format has", PEL_CDW10)
    if nsid == BROADCAST:
        nsids = sub.attached_namespaces(ctrl.cntlid)
    elif nsid == 0 or nsid > ctrl.model.max_namespaces:
        raise NvmeError(st.INVALID_NAMESPACE, f"NSID {nsid:#x} is not valid", PEL_NSID)
    elif ctrl.namespace(nsid) is None:
        raise NvmeError(st.INVALID_FIELD, f"namespace {nsid:#x} is not attached", PEL_NSID)
    else:
        nsids = [nsid]
    lba_size = ctrl.model.lba_data_sizes[index]
    namespaces = [sub.namespaces[n] for n in nsids]
    for ns in namespaces:
        if ns.nsze * ns.lba_size < lba_size:
            raise NvmeError(st.INVALID_FORMAT, f"namespace {ns.nsid} is smaller than one {lba_size}-byte block")
    with sub.lock:
        for ns in namespaces:
            ns.reformat(lba_size)
            others = sub.attached.get(ns.nsid, set()) - {ctrl.cntlid}
            for cntlid in sorted(others):
                target = sub.controllers.get(cntlid)
                if target is not None:
                    notify_namespace_changed(target, ns.nsid, ctrl)
    return st.SUCCESS


HANDLERS: dict[int, Handler] = {AdminOpcode.FORMAT_NVM: format_nvm}
