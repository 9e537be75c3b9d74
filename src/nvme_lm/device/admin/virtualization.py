"""Virtualization Management (admin 1Ch) and Identify CNS 14h / 15h: the SR-IOV resource commands.

The rules live in `device/virtualization.py` (SriovResources, reached as `subsystem.sriov`); this
module only decodes the command and encodes the answers. All of it belongs to the primary
controller: a VF's dispatch table has no 1Ch (Invalid Opcode there), and CNS 14h/15h asked of a
secondary are refused like an unsupported CNS (Invalid Field), because they describe the other VFs.
"""

from __future__ import annotations

from nvme_lm.device.request import Handler, NvmeError, Request
from nvme_lm.device.virtualization import SriovResources
from nvme_lm.spec import status as st
from nvme_lm.spec.opcodes import AdminOpcode
from nvme_lm.spec.virtualization import VirtMgmt

PEL_CNS = 40


SECONDARY_ACTIONS = (0x7, 0x8, 0x9)  # secondary offline, assign, online
PEL_CNTLID = 42  # CDW10 bits 31:16


def _sriov(req: Request) -> SriovResources | None:
    sriov = req.ctrl.subsystem.sriov
    if sriov is None or req.ctrl.cntlid != sriov.primary_cntlid:
        return None
    return sriov


def virtualization_management(req: Request) -> st.Status:
    sriov = _sriov(req)
    if sriov is None:  # only reachable through a hand-built dispatch table
        raise NvmeError(st.INVALID_OPCODE, "Virtualization Management needs an SR-IOV primary controller")
    cmd = VirtMgmt.decode(req.sqe.cdw10, req.sqe.cdw11)
    target = req.ctrl.subsystem.controllers.get(cmd.cntlid)
    if cmd.act in SECONDARY_ACTIONS and target is not None and getattr(target, "suspended", False):
        # A suspended controller's state is frozen for migration (Get Controller State must stay
        # true to it); offlining, re-assigning or onlining it would reset or reshape it (docs/controller-state.md).
        raise NvmeError(st.CONTROLLER_SUSPENDED, f"controller {cmd.cntlid} is suspended", PEL_CNTLID)
    req.dw0 = sriov.execute(cmd.act, cmd.rt, cmd.cntlid, cmd.nr)
    return st.SUCCESS


def cns_primary_capabilities(req: Request) -> bytes:
    sriov = _sriov(req)
    if sriov is None:
        raise NvmeError(st.INVALID_FIELD, "CNS 14h: not a primary controller with SR-IOV", PEL_CNS)
    return sriov.primary_capabilities().encode()


def cns_secondary_list(req: Request) -> bytes:
    sriov = _sriov(req)
    if sriov is None:
        raise NvmeError(st.INVALID_FIELD, "CNS 15h: not a primary controller with SR-IOV", PEL_CNS)
    return sriov.secondary_list(req.sqe.cdw10 >> 16).encode()


HANDLERS: dict[int, Handler] = {AdminOpcode.VIRTUALIZATION_MANAGEMENT: virtualization_management}
