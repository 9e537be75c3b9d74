"""Host side of exported NVM subsystems (TP4193): builders for 2Ah / 2Dh / 31h, parsers for Identify
CNS 21h / 22h and the Receive lists, and `export_vf`, the hypervisor's one-call way to give a VF a
fixed identity from a template. Runs on the PF. Formats: docs/exported-subsystems.md.
"""

from __future__ import annotations

import contextlib
import uuid as uuidlib

from nvme_lm.host.driver import NvmeDriver
from nvme_lm.host.virtualization import secondary_for_vf
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.exported import (
    CREATE_TR,
    ESUBIDV,
    ESUBNQN_SIZE,
    MOS_DISASSOCIATE,
    ConfigState,
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
    encode_controller_pairs,
    mgmt_cdw10,
)
from nvme_lm.spec.identify import CNS, decode_ctrl_list
from nvme_lm.spec.opcodes import AdminOpcode as A

__all__ = [
    "associate_controllers",
    "associate_namespace",
    "config_state",
    "create",
    "delete",
    "disassociate_controllers",
    "disassociate_namespace",
    "export_vf",
    "exported_controllers",
    "exported_namespaces",
    "get_config_state",
    "list_subsystems",
    "manage_exported_namespace",
    "receive",
    "send",
    "set_config_state",
    "template_index",
    "template_uuids",
    "underlying_controllers",
]

CHUNK = 4096  # Receive transfers are paged at this size (any PF's MDTS allows it)
STATE_HEADER = 64


# ----------------------------------------------------------------------------- builders
def _cdw14(esubid: int | None) -> int:
    return 0 if esubid is None else ESUBIDV | (esubid & 0xFFFF) << 16


def receive(sel: int, length: int, *, mos: int = 0, cdw11: int = 0, offset: int = 0, mosi: int = 0) -> SQE:
    """Manage Exported NVM Subsystem Receive (2Ah); `length` bytes (a multiple of 4), `offset` in bytes."""
    return SQE(opcode=A.MANAGE_EXPORTED_NVM_SUBSYSTEM_RECEIVE, cdw10=mgmt_cdw10(sel, mos), cdw11=cdw11,
               cdw12=(offset // 4) & 0xFFFFFFFF, cdw13=(offset // 4) >> 32, cdw14=(mosi & 0xFFFF) << 16,
               cdw15=length // 4 - 1)


def send(sel: int, *, esubid: int | None = None, mos: int = 0, length: int = 4) -> SQE:
    """Manage Exported NVM Subsystem Send (2Dh); `length` bytes of data (NUMDL)."""
    return SQE(opcode=A.MANAGE_EXPORTED_NVM_SUBSYSTEM_SEND, cdw10=mgmt_cdw10(sel, mos), cdw14=_cdw14(esubid),
               cdw15=max(length, 4) // 4 - 1)


def manage_exported_namespace(sel: int, esubid: int) -> SQE:
    """Manage Exported Namespace (31h); the 1024-byte ExportedNsAssociation buffer is the caller's."""
    return SQE(opcode=A.MANAGE_EXPORTED_NAMESPACE, cdw10=mgmt_cdw10(sel), cdw14=_cdw14(esubid))


# ----------------------------------------------------------------------------- Identify
def template_uuids(pf: NvmeDriver) -> list[uuidlib.UUID]:
    """Identify CNS 22h: the templates the device can present, in ENSTI order."""
    return TemplateUuidList.decode(pf.identify(CNS.EXPORTED_TEMPLATE_UUID_LIST)).uuids


def template_index(pf: NvmeDriver, template: uuidlib.UUID | str) -> int:
    """ENSTI of `template` on this device (indexes differ between devices; UUIDs do not)."""
    want = uuidlib.UUID(str(template))
    uuids = template_uuids(pf)
    if want not in uuids:
        raise LookupError(f"template {want} is not offered by this device ({', '.join(map(str, uuids))})")
    return uuids.index(want)


def underlying_controllers(pf: NvmeDriver, esubid: int = 0, first: int = 0) -> list[int]:
    """Identify CNS 21h: exportable controllers (esubid 0) or those associated with `esubid`."""
    return decode_ctrl_list(pf.admin(SQE(opcode=A.IDENTIFY, cdw10=CNS.UNDERLYING_CTRL_LIST | first << 16,
                                         cdw11=esubid & 0xFFFF), read=4096)[1])


# ----------------------------------------------------------------------------- Receive
def create(pf: NvmeDriver, template: int) -> tuple[int, str]:
    """Receive SEL 00h with TR: a new exported subsystem from template index `template`; (ESUBID, ESUBNQN)."""
    comp, data = pf.admin(receive(ReceiveSel.CREATE, ESUBNQN_SIZE, cdw11=CREATE_TR | (template & 0xFF)),
                          read=ESUBNQN_SIZE)
    return comp.dw0 & 0xFFFF, data.split(b"\0", 1)[0].decode("ascii")


def list_subsystems(pf: NvmeDriver, first: int = 0) -> list[ExportedSubsystemEntry]:
    out: list[ExportedSubsystemEntry] = []
    while True:
        page = ExportedSubsystemList.decode(pf.admin(receive(ReceiveSel.LIST_SUBSYSTEMS, 4096, mosi=first),
                                                     read=4096)[1]).active
        out.extend(page)
        if len(page) < 63:
            return out
        first = page[-1].esubid + 1


def exported_namespaces(pf: NvmeDriver, esubid: int) -> list[ExportedNamespaceEntry]:
    return ExportedNamespaceList.decode(pf.admin(receive(ReceiveSel.LIST_NAMESPACES, 4096, mosi=esubid),
                                                 read=4096)[1]).active


def exported_controllers(pf: NvmeDriver, esubid: int) -> list[ExportedControllerEntry]:
    return ExportedControllerList.decode(pf.admin(receive(ReceiveSel.LIST_CONTROLLERS, 4096, mosi=esubid),
                                                  read=4096)[1]).active


def get_config_state(pf: NvmeDriver, esubid: int) -> bytes:
    """Receive SEL 05h: the whole exported configuration state, paged by offset."""
    comp, head = pf.admin(receive(ReceiveSel.GET_CONFIG_STATE, STATE_HEADER, mosi=esubid), read=STATE_HEADER)
    size = comp.dw0
    out = bytearray(head[: min(size, STATE_HEADER)])
    while len(out) < size:
        n = min(CHUNK, -(-(size - len(out)) // 4) * 4)
        out += pf.admin(receive(ReceiveSel.GET_CONFIG_STATE, n, offset=len(out), mosi=esubid), read=n)[1]
    return bytes(out[:size])


def config_state(pf: NvmeDriver, esubid: int) -> ConfigState:
    return ConfigState.decode(get_config_state(pf, esubid))


# ----------------------------------------------------------------------------- Send
def delete(pf: NvmeDriver, esubid: int) -> None:
    pf.admin(send(SendSel.DELETE, esubid=esubid))


def associate_controllers(pf: NvmeDriver, esubid: int, pairs: list[tuple[int, int]]) -> None:
    """{CNTLID, ECNTLID} pairs; each VF must be Offline or disabled."""
    data = encode_controller_pairs(pairs)
    pf.admin(send(SendSel.ASSOCIATE_CONTROLLERS, esubid=esubid, length=len(data)), data=data)


def disassociate_controllers(pf: NvmeDriver, esubid: int, pairs: list[tuple[int, int]]) -> None:
    data = encode_controller_pairs(pairs)
    pf.admin(send(SendSel.ASSOCIATE_CONTROLLERS, esubid=esubid, mos=MOS_DISASSOCIATE, length=len(data)), data=data)


def set_config_state(pf: NvmeDriver, state: bytes, esubid: int | None = None) -> int:
    """Send SEL 06h: recreate an exported subsystem from `state` (into `esubid`, or a new one); ESUBID."""
    data = state + bytes(-len(state) % 4)
    return pf.admin(send(SendSel.SET_CONFIG_STATE, esubid=esubid, length=len(data)), data=data)[0].dw0 & 0xFFFF


# ----------------------------------------------------------------------------- Manage Exported Namespace
def associate_namespace(pf: NvmeDriver, esubid: int, ensid: int, unsid: int) -> None:
    pf.admin(manage_exported_namespace(ExportedNsSel.ASSOCIATE, esubid),
             data=ExportedNsAssociation(ensid=ensid, unsid=unsid).encode())


def disassociate_namespace(pf: NvmeDriver, esubid: int, ensid: int) -> None:
    pf.admin(manage_exported_namespace(ExportedNsSel.DISASSOCIATE, esubid),
             data=ExportedNsAssociation(ensid=ensid).encode())


# ----------------------------------------------------------------------------- convenience
def export_vf(pf: NvmeDriver, vfn: int, template_uuid: uuidlib.UUID | str, nsid: int, *, ensid: int = 1,
              ecntlid: int = 1) -> int:
    """Gives VF `vfn` a fixed identity: a new exported subsystem from `template_uuid`, the underlying
    namespace `nsid` exported as ENSID `ensid`, the VF's secondary controller as ECNTLID `ecntlid`.
    The VF must be Offline or not enabled (bring it up with `bring_up_vf` after). Returns the ESUBID."""
    scid = secondary_for_vf(pf, vfn).scid
    esubid, _ = create(pf, template_index(pf, template_uuid))
    try:
        associate_namespace(pf, esubid, ensid, nsid)
        associate_controllers(pf, esubid, [(scid, ecntlid)])
    except Exception:  # leave nothing half made
        with contextlib.suppress(Exception):
            disassociate_namespace(pf, esubid, ensid)
        with contextlib.suppress(Exception):
            delete(pf, esubid)
        raise
    return esubid
