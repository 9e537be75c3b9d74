"""Identify (admin 06h): CNS 00h-03h, 05h, 06h, 10h-13h, 1Ch; 14h-15h from admin/virtualization.py; 21h-22h from
admin/exported.py. A controller of an exported subsystem answers only its template's CNS values (`ctrl.export`)."""

from __future__ import annotations

import uuid

from nvme_lm.device import identity
from nvme_lm.device.admin import exported, migration, virtualization
from nvme_lm.device.request import Handler, NvmeError, Request
from nvme_lm.spec import status as st
from nvme_lm.spec.identify import (
    CNS,
    IDENTIFY_SIZE,
    IdentifyNamespace,
    NidType,
    encode_ctrl_list,
    encode_ns_descs,
    encode_nsid_list,
)
from nvme_lm.spec.opcodes import AdminOpcode

PEL_NSID = 4
PEL_CNS = 40
PEL_CSI = 47
BROADCAST = 0xFFFFFFFF
CSI_NVM = 0


def _active_ns(req: Request):
    ns = req.ctrl.namespace(req.sqe.nsid)
    if ns is None:
        raise NvmeError(st.INVALID_NAMESPACE, f"namespace {req.sqe.nsid} is not active", PEL_NSID)
    return ns


def _check_nsid_valid(req: Request, allow_broadcast: bool) -> None:
    nsid = req.sqe.nsid
    if nsid == BROADCAST and allow_broadcast:
        return
    if nsid == 0 or nsid > req.ctrl.model.max_namespaces:
        raise NvmeError(st.INVALID_NAMESPACE, f"NSID {nsid:#x} is not valid", PEL_NSID)


def _csi(req: Request) -> int:
    csi = req.sqe.cdw11 >> 24
    if csi != CSI_NVM:
        raise NvmeError(st.INVALID_FIELD, f"I/O command set {csi} not supported", PEL_CSI)
    return csi


def cns_namespace(req: Request) -> bytes:
    _check_nsid_valid(req, allow_broadcast=True)
    if req.sqe.nsid == BROADCAST:
        return identity.identify_namespace(req.ctrl, None).encode()
    ns = req.ctrl.namespace(req.sqe.nsid)
    return identity.identify_namespace(req.ctrl, ns).encode() if ns else IdentifyNamespace().encode()


def cns_controller(req: Request) -> bytes:
    return identity.identify_controller(req.ctrl).encode()


def _nsid_list(req: Request, nsids: list[int]) -> bytes:
    start = req.sqe.nsid
    if start in (0xFFFFFFFE, BROADCAST):
        raise NvmeError(st.INVALID_NAMESPACE, f"NSID {start:#x} not allowed for a namespace list", PEL_NSID)
    return encode_nsid_list([n for n in nsids if n > start])


def cns_active_list(req: Request) -> bytes:
    return _nsid_list(req, req.ctrl.subsystem.attached_namespaces(req.ctrl.cntlid))


def cns_allocated_list(req: Request) -> bytes:
    return _nsid_list(req, sorted(req.ctrl.subsystem.namespaces))


def cns_ns_descriptors(req: Request) -> bytes:
    ns = _active_ns(req)
    info = ns.info
    return encode_ns_descs([
        (NidType.EUI64, bytes.fromhex(info.eui64)),
        (NidType.NGUID, bytes.fromhex(info.nguid)),
        (NidType.UUID, uuid.UUID(info.uuid).bytes),
        (NidType.CSI, bytes([CSI_NVM])),
    ])


def cns_nvm_namespace(req: Request) -> bytes:
    _csi(req)
    return identity.nvm_identify_namespace(req.ctrl, _active_ns(req)).encode()


def cns_nvm_controller(req: Request) -> bytes:
    _csi(req)
    return identity.nvm_identify_controller(req.ctrl).encode()


IOCS_NVM_ONLY = 1 << CSI_NVM  # an I/O Command Set Combination vector: bit n = the command set with CSI n


def cns_io_command_sets(req: Request) -> bytes:
    """CNS 1Ch: the I/O Command Set Combinations the controller supports (512 little-endian 64-bit vectors,
    index 0 first); we support one, the NVM command set alone. CAP.CSS bit 6 promises this structure. Every
    controller of the subsystem supports the same combinations, so CDW10's CNTID does not change the answer."""
    return IOCS_NVM_ONLY.to_bytes(8, "little") + bytes(IDENTIFY_SIZE - 8)


def cns_allocated_namespace(req: Request) -> bytes:
    _check_nsid_valid(req, allow_broadcast=False)
    ns = req.ctrl.subsystem.namespaces.get(req.sqe.nsid)
    return identity.identify_namespace(req.ctrl, ns).encode() if ns else IdentifyNamespace().encode()


def cns_ns_controller_list(req: Request) -> bytes:
    _check_nsid_valid(req, allow_broadcast=False)
    if req.sqe.nsid not in req.ctrl.subsystem.namespaces:
        raise NvmeError(st.INVALID_NAMESPACE, f"namespace {req.sqe.nsid} does not exist", PEL_NSID)
    start = req.sqe.cdw10 >> 16
    ids = sorted(c for c in req.ctrl.subsystem.attached[req.sqe.nsid] if c >= start)
    return encode_ctrl_list(ids)


def cns_controller_list(req: Request) -> bytes:
    start = req.sqe.cdw10 >> 16
    return encode_ctrl_list(sorted(c for c in req.ctrl.subsystem.controllers if c >= start))


CNS_HANDLERS = {
    CNS.NS: cns_namespace,
    CNS.CTRL: cns_controller,
    CNS.NS_ACTIVE_LIST: cns_active_list,
    CNS.NS_DESC_LIST: cns_ns_descriptors,
    CNS.CSI_NS: cns_nvm_namespace,
    CNS.CSI_CTRL: cns_nvm_controller,
    CNS.ALLOCATED_NS_LIST: cns_allocated_list,
    CNS.ALLOCATED_NS: cns_allocated_namespace,
    CNS.NS_CTRL_LIST: cns_ns_controller_list,
    CNS.CTRL_LIST: cns_controller_list,
    CNS.PRIMARY_CTRL_CAPS: virtualization.cns_primary_capabilities,
    CNS.SECONDARY_CTRL_LIST: virtualization.cns_secondary_list,
    CNS.UNDERLYING_CTRL_LIST: exported.cns_underlying_controllers,
    CNS.EXPORTED_TEMPLATE_UUID_LIST: exported.cns_template_list,
    CNS.SUPPORTED_CTRL_STATE_FORMATS: migration.cns_supported_state_formats,
    CNS.COMMAND_SET_STRUCTURE: cns_io_command_sets,
}


def identify(req: Request) -> st.Status:
    cns = req.sqe.cdw10 & 0xFF
    build = (CNS_HANDLERS if req.ctrl.export is None else req.ctrl.export.cns_handlers).get(cns)
    if build is None:
        raise NvmeError(st.INVALID_FIELD, f"CNS {cns:#04x} not supported", PEL_CNS)
    req.write_to_host(build(req), IDENTIFY_SIZE)
    return st.SUCCESS


HANDLERS: dict[int, Handler] = {AdminOpcode.IDENTIFY: identify}
