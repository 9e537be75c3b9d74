"""Exported NVM subsystems (Base 2.4, TP4193) in the admin command set.

On the primary controller (the PF; privileged, so a VF's dispatch table has none of them):
Manage Exported NVM Subsystem Receive (2Ah: create, list subsystems / namespaces / controllers, get
exported configuration state), Send (2Dh: delete, associate / disassociate controllers, set exported
configuration state), Manage Exported Namespace (31h: associate / disassociate), Identify CNS 21h
(underlying controller list) and 22h (template UUID list). The rules live in device/exported.py
(`subsystem.exported`); this module decodes commands and encodes answers.

For a controller bound to an exported subsystem: the Identify CNS and log page builders it answers
with (`capabilities_for` hands them to device/exported.py), all from the template.
Formats and status choices: docs/exported-subsystems.md.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from nvme_lm.device import identity
from nvme_lm.device.admin import log_pages
from nvme_lm.device.events import AsyncEvent, AsyncEventType, NoticeInfo
from nvme_lm.device.exported import DeviceCapabilities, ExportedSubsystems
from nvme_lm.device.feature_defaults import default_feature_specs
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.request import Handler, NvmeError, Request
from nvme_lm.spec import status as st
from nvme_lm.spec.exported import (
    CREATE_TR,
    ESUBIDV,
    ESUBNQN_SIZE,
    EXPORTED_NS_BUFFER_SIZE,
    MOS_DISASSOCIATE,
    NO_CONTROLLER,
    ConfigStateError,
    ExportedControllerEntry,
    ExportedControllerList,
    ExportedNamespaceEntry,
    ExportedNamespaceList,
    ExportedNsAssociation,
    ExportedNsSel,
    ExportedSubsystemEntry,
    ExportedSubsystemList,
    ReceiveSel,
    SendSel,
    TemplateUuidList,
    decode_controller_pairs,
)
from nvme_lm.spec.identify import NidType, encode_ctrl_list, encode_ns_descs, encode_nsid_list
from nvme_lm.spec.logs import (
    CmdEffect,
    CommandEffectsLog,
    FirmwareSlotLog,
    SmartLog,
    cmd_effect,
    encode_changed_ns_list,
    lid_support,
)
from nvme_lm.spec.opcodes import AdminOpcode as A

if TYPE_CHECKING:
    from nvme_lm.device.exported import ExportBinding

PEL_NSID = 4
PEL_CDW10 = 40
PEL_CDW11 = 44
PEL_CDW12 = 48
PEL_CDW14 = 56
PEL_CDW15 = 60
PEL_CNS = 40
BROADCAST = 0xFFFFFFFF
CSI_NVM = 0
LOG_CHANGED_NS = 0x04
PAGE = 4096


# ====================================================================================== PF commands
def _exports(req: Request) -> ExportedSubsystems | None:
    """The device's exported subsystems if `req` runs on the primary controller of an SR-IOV device."""
    sub = req.ctrl.subsystem
    ex = getattr(sub, "exported", None)
    if ex is None or sub.sriov is None or req.ctrl.cntlid != sub.sriov.primary_cntlid:
        return None
    return ex


def _require(req: Request) -> ExportedSubsystems:
    ex = _exports(req)
    if ex is None:  # only reachable through a hand-built dispatch table
        raise NvmeError(st.INVALID_OPCODE, "exported NVM subsystems need an SR-IOV primary controller")
    return ex


def _transfer(req: Request) -> int:
    """Bytes of the data buffer: CDW15 NUMDL (0's based dwords), at most MDTS."""
    length = ((req.sqe.cdw15 & 0xFFFFFFFF) + 1) * 4
    mdts = req.ctrl.model.mdts
    if mdts and length > 4096 << (req.ctrl.cap.mpsmin + mdts):
        raise NvmeError(st.INVALID_FIELD, f"{length} bytes exceeds MDTS", PEL_CDW15)
    return length


def _esubid(req: Request) -> int:
    """CDW14: ESUBIDV (bit 7) must be set and ESUBID (31:16) names the exported subsystem."""
    if not req.sqe.cdw14 & ESUBIDV:
        raise NvmeError(st.INVALID_FIELD, "ESUBIDV is clear: this select needs an exported NVM subsystem", PEL_CDW14)
    return req.sqe.cdw14 >> 16


def _list_subsystems(ex: ExportedSubsystems, first: int) -> bytes:
    entries = [
        ExportedSubsystemEntry(esubid=e.esubid, nctrl=len(e.controllers), nns=len(e.namespaces),
                               actrl=len(e.associated_controllers), ans=len(e.nsid_map), template=e.template.uuid.bytes,
                               sn=e.serial)
        for _, e in sorted(ex.subsystems.items()) if e.esubid >= first
    ][:63]
    return ExportedSubsystemList(num=len(entries), entries=entries).encode()


def _list_namespaces(ex: ExportedSubsystems, esubid: int) -> bytes:
    esub = ex.get(esubid)
    entries = [ExportedNamespaceEntry(ensid=n.ensid, unsid=n.unsid or 0, nsze=n.nsze,
                                      lbads=n.lba_size.bit_length() - 1)
               for _, n in sorted(esub.namespaces.items())][:127]
    return ExportedNamespaceList(num=len(entries), entries=entries).encode()


def _list_controllers(ex: ExportedSubsystems, esubid: int) -> bytes:
    esub = ex.get(esubid)
    entries = [ExportedControllerEntry(ecntlid=c.ecntlid, cntlid=NO_CONTROLLER if c.cntlid is None else c.cntlid)
               for _, c in sorted(esub.controllers.items())]
    return ExportedControllerList(num=len(entries), entries=entries).encode()


def manage_exported_receive(req: Request) -> st.Status:
    ex = _require(req)
    sqe = req.sqe
    sel = sqe.cdw10 & 0xFF
    length = _transfer(req)
    offset = (sqe.cdw12 | sqe.cdw13 << 32) * 4  # in dwords
    mosi = sqe.cdw14 >> 16
    if sel == ReceiveSel.CREATE:
        if not sqe.cdw11 & CREATE_TR:
            raise NvmeError(st.INVALID_FIELD, "TR clear: an exported PCIe subsystem needs a template", PEL_CDW11 + 3)
        req.data_views(length, to_host=True)  # a bad data pointer refuses the command before anything is made
        esub = ex.create(sqe.cdw11 & 0xFF)
        req.dw0 = esub.esubid
        req.write_to_host(esub.nqn.encode("ascii").ljust(ESUBNQN_SIZE, b"\0"), length)
        return st.SUCCESS
    if sel == ReceiveSel.LIST_SUBSYSTEMS:
        data = _list_subsystems(ex, mosi)
    elif sel == ReceiveSel.LIST_NAMESPACES:
        data = _list_namespaces(ex, mosi)
    elif sel == ReceiveSel.LIST_CONTROLLERS:
        data = _list_controllers(ex, mosi)
    elif sel == ReceiveSel.GET_CONFIG_STATE:
        data = ex.get_state(mosi)
        req.dw0 = len(data)  # the host learns the size from its first (header) read
    else:
        raise NvmeError(st.INVALID_FIELD, f"Receive select {sel:#x} not supported on PCIe", PEL_CDW10)
    if offset >= len(data):
        raise NvmeError(st.INVALID_FIELD, f"offset {offset} beyond the {len(data)}-byte data", PEL_CDW12)
    req.write_to_host(data[offset : offset + length], length)
    return st.SUCCESS


def manage_exported_send(req: Request) -> st.Status:
    ex = _require(req)
    sqe = req.sqe
    sel, mos = sqe.cdw10 & 0xFF, (sqe.cdw10 >> 8) & 0xFF
    if sel == SendSel.DELETE:
        ex.delete(_esubid(req))
    elif sel == SendSel.ASSOCIATE_CONTROLLERS:
        if mos & ~MOS_DISASSOCIATE:
            raise NvmeError(st.INVALID_FIELD, f"MOS {mos:#x} reserved bits set", PEL_CDW10 + 1)
        esubid = _esubid(req)
        try:
            pairs = decode_controller_pairs(req.read_from_host(_transfer(req)))
        except ValueError as e:
            raise NvmeError(st.INVALID_FIELD, str(e), PEL_CDW15) from None
        if mos & MOS_DISASSOCIATE:
            ex.disassociate_controllers(esubid, pairs)
        else:
            ex.associate_controllers(esubid, pairs)
    elif sel == SendSel.SET_CONFIG_STATE:
        esubid = _esubid(req) if sqe.cdw14 & ESUBIDV else None
        blob = req.read_from_host(_transfer(req))
        try:
            req.dw0 = ex.set_state(esubid, blob)
        except ConfigStateError as e:
            req.dw0 = e.dw0  # DWLOC / BITLOC of the offending field
            raise NvmeError(st.INVALID_EXPORTED_CONFIGURATION_STATE, str(e)) from None
    else:
        raise NvmeError(st.INVALID_FIELD, f"Send select {sel:#x} not supported on PCIe", PEL_CDW10)
    return st.SUCCESS


def _notify(req: Request, cntlids: list[int], ensid: int) -> None:
    """Namespace Attribute Changed at the exported controllers whose namespaces changed. Posted from a
    short-lived thread: the PF's engine holds its own lock (as admin/namespaces.py does)."""
    for cntlid in cntlids:
        target = req.ctrl.subsystem.controllers.get(cntlid)
        binding = target.export if target is not None else None
        if binding is None:
            continue
        if ensid not in binding.changed:
            binding.changed.append(ensid)
        event = AsyncEvent(AsyncEventType.NOTICE, NoticeInfo.NAMESPACE_ATTRIBUTE_CHANGED, LOG_CHANGED_NS)
        threading.Thread(target=target.post_event, args=(event,), name="nvme-notice", daemon=True).start()


def manage_exported_namespace(req: Request) -> st.Status:
    ex = _require(req)
    sel = req.sqe.cdw10 & 0xFF
    if sel not in (ExportedNsSel.ASSOCIATE, ExportedNsSel.DISASSOCIATE):
        raise NvmeError(st.INVALID_FIELD, f"Manage Exported Namespace select {sel:#x} reserved", PEL_CDW10)
    esubid = _esubid(req)
    buf = ExportedNsAssociation.decode(req.read_from_host(EXPORTED_NS_BUFFER_SIZE))
    if sel == ExportedNsSel.ASSOCIATE:
        cntlids = ex.associate_namespace(esubid, buf.ensid, buf.unsid)
    else:
        cntlids = ex.disassociate_namespace(esubid, buf.ensid)
    _notify(req, cntlids, buf.ensid)
    return st.SUCCESS


# ---------------------------------------------------------------------------------- Identify 21h / 22h
def cns_underlying_controllers(req: Request) -> bytes:
    """CNS 21h: CNSSID 0 = the controllers that may be exported (the VFs' secondaries); otherwise the
    controllers associated with exported subsystem CNSSID. From CDW10.CNTID on."""
    ex = _exports(req)
    if ex is None:
        raise NvmeError(st.INVALID_FIELD, "CNS 21h: not a primary controller with exported subsystems", PEL_CNS)
    start, cnssid = req.sqe.cdw10 >> 16, req.sqe.cdw11 & 0xFFFF
    if cnssid:
        esub = ex.subsystems.get(cnssid)
        if esub is None:
            raise NvmeError(st.INVALID_FIELD, f"CNS 21h: no exported NVM subsystem {cnssid}", PEL_CDW11)
        ids = sorted(esub.associated_controllers)
    else:
        ids = ex.underlying_controllers()
    return encode_ctrl_list([c for c in ids if c >= start])


def cns_template_list(req: Request) -> bytes:
    """CNS 22h: the templates this device can present; ENSTI indexes this list."""
    ex = _exports(req)
    if ex is None:
        raise NvmeError(st.INVALID_FIELD, "CNS 22h: not a primary controller with exported subsystems", PEL_CNS)
    return TemplateUuidList.of([t.uuid for t in ex.templates]).encode()


HANDLERS: dict[int, Handler] = {
    A.MANAGE_EXPORTED_NVM_SUBSYSTEM_RECEIVE: manage_exported_receive,
    A.MANAGE_EXPORTED_NVM_SUBSYSTEM_SEND: manage_exported_send,
    A.MANAGE_EXPORTED_NAMESPACE: manage_exported_namespace,
}
OPCODES = frozenset(HANDLERS)


# ====================================================================================== exported views
def _binding(req: Request) -> ExportBinding:
    binding = req.ctrl.export
    assert binding is not None, "exported views run only on bound controllers"
    return binding


def vf_active_list(req: Request) -> bytes:
    """CNS 02h: active ENSIDs greater than CDW1.NSID."""
    start = req.sqe.nsid
    if start in (0xFFFFFFFE, BROADCAST):
        raise NvmeError(st.INVALID_NAMESPACE, f"NSID {start:#x} not allowed for a namespace list", PEL_NSID)
    return encode_nsid_list([n for n in _binding(req).active_nsids(req.ctrl) if n > start])


def vf_ns_descriptors(req: Request) -> bytes:
    """CNS 03h: the exported namespace's identifiers, never the underlying namespace's."""
    binding = _binding(req)
    ns = req.ctrl.namespace(req.sqe.nsid)
    rec = binding.esub.namespace_of(ns.nsid) if ns is not None else None
    if rec is None:
        raise NvmeError(st.INVALID_NAMESPACE, f"namespace {req.sqe.nsid} is not active", PEL_NSID)
    t = binding.template
    descs = []
    if t.eui64 == "generate":
        descs.append((NidType.EUI64, rec.eui64))
    if t.nguid == "generate":
        descs.append((NidType.NGUID, rec.nguid))
    if t.ns_uuid == "generate":
        descs.append((NidType.UUID, rec.uuid))
    descs.append((NidType.CSI, bytes([CSI_NVM])))
    return encode_ns_descs(descs)


def vf_supported_logs(req: Request) -> bytes:
    lids = [0] * 256
    for lid in _binding(req).template.logs:
        lids[lid] = lid_support()
    return b"".join(v.to_bytes(4, "little") for v in lids)


def vf_smart_log(req: Request) -> bytes:
    """SMART / Health from the template: fixed health values, no device-wide I/O counters (they would
    describe the other VFs' traffic and differ from device to device)."""
    if req.sqe.nsid not in (0, BROADCAST):
        raise NvmeError(st.INVALID_FIELD, "SMART log is not kept per namespace", PEL_NSID)
    s = _binding(req).template.smart
    return SmartLog(temperature=s["temperature"], avail_spare=s["avail_spare"], spare_thresh=s["spare_thresh"],
                    percent_used=s["percent_used"], num_err_log_entries=req.ctrl.error_log.count,
                    temperature_sensor=[s["temperature"]] + [0] * 7).encode()


def vf_firmware_slot_log(req: Request) -> bytes:
    return FirmwareSlotLog(afi=1, frs=[str(_binding(req).template.identify_controller["fr"])] + [""] * 6).encode()


def vf_changed_ns_log(req: Request) -> bytes:
    """ENSIDs whose association changed, plus underlying changes (NS Attachment on the PF) translated to
    ENSIDs; an underlying NSID outside the exported subsystem is never reported."""
    binding = _binding(req)
    ctrl = req.ctrl
    reverse = {u: e for e, u in binding.esub.nsid_map.items()}
    changed = list(binding.changed)
    for unsid in ctrl.changed_namespaces:
        ensid = reverse.get(unsid)
        if ensid is not None and ensid not in changed:
            changed.append(ensid)
    if not req.sqe.cdw10 & (1 << 15):  # RAE=0: reading clears the list
        binding.changed.clear()
        ctrl.changed_namespaces = []
    return encode_changed_ns_list(sorted(changed))


def vf_command_effects_log(req: Request) -> bytes:
    t = _binding(req).template
    acs = [0] * 256
    iocs = [0] * 256
    for op, effects in t.admin.items():
        acs[op] = effects
    for op, effects in t.io.items():
        iocs[op] = effects
    return CommandEffectsLog(acs=acs, iocs=iocs).encode()


EXPORTED_LOG_BUILDERS: dict[int, Callable[[Request], bytes]] = {
    0x00: vf_supported_logs,
    0x01: log_pages.error_log,  # the controller's own (its size is the template's ELPE)
    0x02: vf_smart_log,
    0x03: vf_firmware_slot_log,
    0x04: vf_changed_ns_log,
    0x05: vf_command_effects_log,
    0x12: log_pages.fid_effects_log,  # from the controller's features, which are the template's
}


def capabilities_for(model: DeviceModel, admin_handlers: Mapping[int, Handler] | None = None,
                     io_handlers: Mapping[int, Handler] | None = None) -> DeviceCapabilities:
    """What a secondary controller of a `model` device can do (by default: every non-privileged admin
    command and the NVM I/O command set), and the views a bound controller answers with."""
    from nvme_lm.device.admin import ADMIN_HANDLERS  # the package imports this module: resolve at call time
    from nvme_lm.device.admin import identify as cns
    from nvme_lm.device.nvm_io import IO_HANDLERS
    from nvme_lm.device.virtualization import PRIVILEGED_ADMIN_OPCODES

    if admin_handlers is None:
        admin_handlers = {op: h for op, h in ADMIN_HANDLERS.items() if op not in PRIVILEGED_ADMIN_OPCODES}
    if io_handlers is None:
        io_handlers = IO_HANDLERS
    csupp = cmd_effect(CmdEffect.CSUPP)
    return DeviceCapabilities(
        model=model,
        admin_effects={op: log_pages.ADMIN_EFFECTS.get(op, csupp) for op in admin_handlers},
        io_effects={op: log_pages.IO_EFFECTS.get(op, csupp) for op in io_handlers},
        features=default_feature_specs(model),
        dlfeat=identity.DLFEAT_READ_ZEROES | identity.DLFEAT_WZ_DEAC,
        vwc=identity.VWC_PRESENT_FLUSH_ALL,
        cns_handlers={0x00: cns.cns_namespace, 0x01: cns.cns_controller, 0x02: vf_active_list,
                      0x03: vf_ns_descriptors, 0x05: cns.cns_nvm_namespace, 0x06: cns.cns_nvm_controller},
        log_builders=EXPORTED_LOG_BUILDERS,
    )
