"""Host side of SR-IOV: Virtualization Management builders, CNS 14h/15h parsers, VF bring-up.

Runs on the PF (the hypervisor's controller). `bring_up_vf` is the sequence libvfn's migration
example uses before a VF is handed to a guest (spec notes §1, §18): take the secondary Offline,
assign its VQ and VI resources, reset the VF (FLR) so it starts clean, and bring it Online.
"""

from __future__ import annotations

from nvme_lm.host.driver import NvmeDriver
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.identify import CNS, PrimaryControllerCapabilities, SecondaryControllerEntry, SecondaryControllerList
from nvme_lm.spec.opcodes import AdminOpcode
from nvme_lm.spec.virtualization import ResourceType, VirtAction, VirtMgmt

__all__ = [
    "ResourceType",
    "VirtAction",
    "assign",
    "bring_up_vf",
    "offline",
    "online",
    "primary_allocate",
    "primary_capabilities",
    "secondary_controllers",
    "secondary_for_vf",
    "virt_mgmt",
]


# ----------------------------------------------------------------------------- builders
def virt_mgmt(act: int, *, cntlid: int = 0, rt: int = 0, nr: int = 0) -> SQE:
    """Virtualization Management (1Ch); completion DW0 = resources modified."""
    cdw10, cdw11 = VirtMgmt(act, rt, cntlid, nr).encode()
    return SQE(opcode=AdminOpcode.VIRTUALIZATION_MANAGEMENT, cdw10=cdw10, cdw11=cdw11)


# ----------------------------------------------------------------------------- parsers / queries
def primary_capabilities(pf: NvmeDriver) -> PrimaryControllerCapabilities:
    """Identify CNS 14h, decoded."""
    return PrimaryControllerCapabilities.decode(pf.identify(CNS.PRIMARY_CTRL_CAPS))


def secondary_controllers(pf: NvmeDriver, first_scid: int = 0) -> list[SecondaryControllerEntry]:
    """Identify CNS 15h from `first_scid` on, following the list past 127 entries."""
    out: list[SecondaryControllerEntry] = []
    while True:
        page = SecondaryControllerList.decode(pf.identify(CNS.SECONDARY_CTRL_LIST, cntid=first_scid)).active
        out.extend(page)
        if len(page) < 127:
            return out
        first_scid = page[-1].scid + 1


def secondary_for_vf(pf: NvmeDriver, vfn: int) -> SecondaryControllerEntry:
    """The secondary controller behind VF number `vfn` (1-based), as the PF reports it."""
    for entry in secondary_controllers(pf):
        if entry.vfn == vfn:
            return entry
    raise LookupError(f"no secondary controller for VF {vfn}")


# ----------------------------------------------------------------------------- actions
def offline(pf: NvmeDriver, cntlid: int) -> int:
    return pf.admin(virt_mgmt(VirtAction.SECONDARY_OFFLINE, cntlid=cntlid))[0].dw0


def assign(pf: NvmeDriver, cntlid: int, rt: ResourceType, nr: int) -> int:
    return pf.admin(virt_mgmt(VirtAction.SECONDARY_ASSIGN, cntlid=cntlid, rt=rt, nr=nr))[0].dw0


def online(pf: NvmeDriver, cntlid: int) -> int:
    return pf.admin(virt_mgmt(VirtAction.SECONDARY_ONLINE, cntlid=cntlid))[0].dw0


def primary_allocate(pf: NvmeDriver, rt: ResourceType, nr: int, cntlid: int = 0) -> int:
    """Primary Controller Flexible Allocation; takes effect at the PF's next FLR."""
    return pf.admin(virt_mgmt(VirtAction.PRIMARY_FLEXIBLE_ALLOCATION, cntlid=cntlid, rt=rt, nr=nr))[0].dw0


def bring_up_vf(pf: NvmeDriver, vfn: int, nvq: int, nvi: int) -> SecondaryControllerEntry:
    """Offline -> assign `nvq` VQ (admin queue included) -> assign `nvi` VI -> VF FLR -> Online.

    `vfn` is the 1-based VF number; the VF's function is found through the PF's SR-IOV
    capability. Returns the secondary's list entry after the bring-up (Online). Any refusal
    raises NvmeCommandError with the controller's status.
    """
    entry = secondary_for_vf(pf, vfn)
    offline(pf, entry.scid)
    assign(pf, entry.scid, ResourceType.VQ, nvq)
    assign(pf, entry.scid, ResourceType.VI, nvi)
    pf.fn.virtfns[vfn - 1].flr()
    online(pf, entry.scid)
    return secondary_for_vf(pf, vfn)
