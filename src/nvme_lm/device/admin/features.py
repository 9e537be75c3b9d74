"""Set Features / Get Features (admin 09h / 0Ah)."""

from __future__ import annotations

from nvme_lm.device import feature_defaults as F
from nvme_lm.device.request import Handler, NvmeError, Request
from nvme_lm.spec import status as st
from nvme_lm.spec.opcodes import AdminOpcode

PEL_CDW10 = 40
PEL_CDW11 = 44


def set_features(req: Request) -> st.Status:
    ctrl = req.ctrl
    fid = req.sqe.cdw10 & 0xFF
    save = bool(req.sqe.cdw10 >> 31)
    spec = ctrl.features.specs.get(fid)
    if spec is None:
        raise NvmeError(st.INVALID_FIELD, f"feature {fid:#x} not supported", PEL_CDW10)
    if save and not spec.saveable:
        raise NvmeError(st.FEATURE_NOT_SAVEABLE, f"feature {fid:#x} not saveable", PEL_CDW10 + 3)
    value = req.sqe.cdw11
    if fid == F.NUMBER_OF_QUEUES:
        nsq, ncq = (value & 0xFFFF) + 1, (value >> 16) + 1
        if nsq == 0x10000 or ncq == 0x10000:
            raise NvmeError(st.INVALID_FIELD, "65535 queues requested", PEL_CDW11)
        if ctrl.queues_requested and (len(ctrl.sqs) > 1 or len(ctrl.cqs) > 1):
            raise NvmeError(st.COMMAND_SEQUENCE_ERROR, "Number of Queues after I/O queues exist")
        ctrl.nsqa = min(nsq, ctrl.max_io_queues)
        ctrl.ncqa = min(ncq, ctrl.max_io_queues)
        ctrl.queues_requested = True
        value = (ctrl.nsqa - 1) | (ctrl.ncqa - 1) << 16
        req.dw0 = value
    ctrl.features.set(fid, value, save)
    return st.SUCCESS


def get_features(req: Request) -> st.Status:
    ctrl = req.ctrl
    fid = req.sqe.cdw10 & 0xFF
    sel = (req.sqe.cdw10 >> 8) & 0x7
    spec = ctrl.features.specs.get(fid)
    if spec is None:
        raise NvmeError(st.INVALID_FIELD, f"feature {fid:#x} not supported", PEL_CDW10)
    if sel == 0:
        req.dw0 = ctrl.features.get(fid)
    elif sel == 1:
        req.dw0 = spec.default
    elif sel == 2:
        req.dw0 = ctrl.features.saved.get(fid, spec.default)
    elif sel == 3:
        req.dw0 = spec.capabilities
    else:
        raise NvmeError(st.INVALID_FIELD, f"select {sel} reserved", PEL_CDW10 + 1)
    return st.SUCCESS


HANDLERS: dict[int, Handler] = {
    AdminOpcode.SET_FEATURES: set_features,
    AdminOpcode.GET_FEATURES: get_features,
}
