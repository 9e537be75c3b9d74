"""Doorbell Buffer Config (admin 7Ch): PRP1 = Shadow Doorbell buffer, PRP2 = EventIdx buffer.

Both are one memory page (CC.MPS) and must be page aligned and reachable by DMA, else Invalid
Field in Command. The command is meant for emulated controllers, which is what this is; the
semantics are in `device/doorbells.py`. Issuing it again replaces the buffers.
"""

from __future__ import annotations

from nvme_lm.device.doorbells import ShadowDoorbells
from nvme_lm.device.request import Handler, NvmeError, Request
from nvme_lm.pcie.iommu import DmaFault
from nvme_lm.spec import status as st
from nvme_lm.spec.opcodes import AdminOpcode

PEL_PRP1 = 24
PEL_PRP2 = 32


def doorbell_buffer_config(req: Request) -> st.Status:
    ctrl = req.ctrl
    ps = ctrl.page_size
    for addr, pel in ((req.sqe.prp1, PEL_PRP1), (req.sqe.prp2, PEL_PRP2)):
        if addr == 0 or addr & (ps - 1):
            raise NvmeError(st.INVALID_FIELD, f"buffer address {addr:#x} is not page aligned", pel)
    if req.sqe.prp1 == req.sqe.prp2:
        raise NvmeError(st.INVALID_FIELD, "shadow doorbell and EventIdx buffers overlap", PEL_PRP2)
    try:
        shadow = ShadowDoorbells(ctrl.fn, req.sqe.prp1, req.sqe.prp2, ps, ctrl.cap.dstrd)
        shadow.attach(ctrl)
    except DmaFault as e:
        raise NvmeError(st.INVALID_FIELD, f"doorbell buffers not reachable: {e}") from e
    ctrl.shadow = shadow
    return st.SUCCESS


HANDLERS: dict[int, Handler] = {AdminOpcode.DOORBELL_BUFFER_CONFIG: doorbell_buffer_config}
