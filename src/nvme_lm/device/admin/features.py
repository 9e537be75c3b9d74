"""Set Features / Get Features (admin 09h / 0Ah).

Order of checks for Set Features, as QEMU and the OCP datacenter spec apply them: unsupported
FID -> Invalid Field; SV on a feature that cannot be saved -> Feature Identifier Not Saveable;
a specific NSID on a feature that is not namespace specific -> Feature Not Namespace Specific
(Invalid Namespace or Format if the NSID is not even valid); then the feature's own fields.
Get Features ignores the NSID of a controller-wide feature (QEMU does too; nvme-cli sends the
namespace's NSID when given a namespace device).

Values are kept in `ctrl.features` (device/features.py) as the CDW11 dword; a feature with a
side effect (interrupts, keep alive, write cache, temperature events) applies it here, at Set.
"""

from __future__ import annotations

from collections.abc import Callable

from nvme_lm.device import feature_defaults as F
from nvme_lm.device.admin import cdq, rate_limit
from nvme_lm.device.events import AsyncEvent, AsyncEventType
from nvme_lm.device.features import FeatureSpec
from nvme_lm.device.request import Handler, NvmeError, Request
from nvme_lm.spec import status as st
from nvme_lm.spec.features import (
    Arbitration,
    AsyncEventConfig,
    InterruptCoalescing,
    PowerManagement,
    Timestamp,
    WriteAtomicityNormal,
)
from nvme_lm.spec.opcodes import AdminOpcode

PEL_NSID = 4
PEL_CDW10 = 40
PEL_SV = 43
PEL_CDW11 = 44
BROADCAST = 0xFFFFFFFF
NPSS = 0  # one power state (PS 0); Identify NPSS is 0's based
CD = 1 << 16  # Interrupt Vector Configuration: coalescing disable
SMART_TEMPERATURE_INFO = 0x01
LOG_SMART = 0x02

SetHandler = Callable[[Request, int, bool], "int | None"]


# ----------------------------------------------------------------------------------- helpers
def _spec(req: Request) -> FeatureSpec:
    fid = req.sqe.cdw10 & 0xFF
    spec = req.ctrl.features.specs.get(fid)
    if spec is None:
        raise NvmeError(st.INVALID_FIELD, f"feature {fid:#04x} not supported", PEL_CDW10)
    return spec


def _check_nsid(req: Request, spec: FeatureSpec, setting: bool) -> None:
    nsid = req.sqe.nsid
    if spec.ns_specific:
        if nsid != BROADCAST and req.ctrl.namespace(nsid) is None:
            raise NvmeError(st.INVALID_NAMESPACE, f"namespace {nsid:#x} is not active", PEL_NSID)
        return
    if not setting or nsid in (0, BROADCAST):
        return
    if nsid > req.ctrl.model.max_namespaces:
        raise NvmeError(st.INVALID_NAMESPACE, f"NSID {nsid:#x} is not valid", PEL_NSID)
    raise NvmeError(st.FEATURE_NOT_NS_SPECIFIC, f"feature {spec.fid:#04x} is not namespace specific", PEL_NSID)


def _temperature_selector(cdw11: int, allow_all: bool) -> tuple[int, int]:
    tmpsel, thsel = (cdw11 >> 16) & 0xF, (cdw11 >> 20) & 0x3
    if thsel not in (F.THSEL_OVER, F.THSEL_UNDER):
        raise NvmeError(st.INVALID_FIELD, f"THSEL {thsel} reserved", PEL_CDW11 + 2)
    if tmpsel not in F.TEMPERATURE_SENSORS and not (allow_all and tmpsel == F.TMPSEL_ALL):
        raise NvmeError(st.INVALID_FIELD, f"temperature sensor {tmpsel} not implemented", PEL_CDW11 + 2)
    return tmpsel, thsel


def _temperature_key(tmpsel: int, thsel: int) -> int:
    return tmpsel << 2 | thsel


def _check_vector(req: Request, iv: int) -> None:
    """A vector is valid if the function has it and it serves the admin CQ or an I/O CQ."""
    ctrl = req.ctrl
    if iv >= ctrl.fn.msix.nvectors or (iv != 0 and not any(cq.vector == iv for cq in ctrl.cqs.values())):
        raise NvmeError(st.INVALID_FIELD, f"interrupt vector {iv} is not in use by a completion queue", PEL_CDW11)


def temperature_alarm(req: Request) -> bool:
    """True when the drive's temperature is at or beyond a composite threshold (SMART bit 1)."""
    feats = req.ctrl.features
    fid = F.TEMPERATURE_THRESHOLD
    temp = F.COMPOSITE_TEMPERATURE_K
    for sensor in F.TEMPERATURE_SENSORS:
        over = feats.get_indexed(fid, _temperature_key(sensor, F.THSEL_OVER),
                                 F.default_temperature_threshold(sensor, F.THSEL_OVER))
        under = feats.get_indexed(fid, _temperature_key(sensor, F.THSEL_UNDER),
                                  F.default_temperature_threshold(sensor, F.THSEL_UNDER))
        if temp >= over or temp <= under:
            return True
    return False


# ------------------------------------------------------------------------------ Set Features
def _set_masked(mask: int) -> SetHandler:
    def handler(req: Request, value: int, save: bool) -> int:
        return value & mask

    return handler


def _set_power_management(req: Request, value: int, save: bool) -> int:
    if value & 0x1F > NPSS:
        raise NvmeError(st.INVALID_FIELD, f"power state {value & 0x1F} beyond NPSS {NPSS}", PEL_CDW11)
    return value & PowerManagement.MASK


def _set_temperature_threshold(req: Request, value: int, save: bool) -> None:
    tmpsel, thsel = _temperature_selector(value, allow_all=True)
    sensors = F.TEMPERATURE_SENSORS if tmpsel == F.TMPSEL_ALL else (tmpsel,)
    feats = req.ctrl.features
    for sensor in sensors:
        feats.set_indexed(F.TEMPERATURE_THRESHOLD, _temperature_key(sensor, thsel), value & 0xFFFF, save)
    if temperature_alarm(req):
        req.ctrl.post_event(AsyncEvent(AsyncEventType.SMART, SMART_TEMPERATURE_INFO, LOG_SMART))


def _set_volatile_write_cache(req: Request, value: int, save: bool) -> int:
    ctrl = req.ctrl
    if not value & 1:  # disabling the cache: what it holds must reach the media first
        for nsid in ctrl.subsystem.attached_namespaces(ctrl.cntlid):
            ns = ctrl.subsystem.namespaces.get(nsid)
            if ns is not None and ns.dirty:
                ns.flush()
    return value & 1


def _set_number_of_queues(req: Request, value: int, save: bool) -> int:
    ctrl = req.ctrl
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
    return value


def _set_interrupt_vector_config(req: Request, value: int, save: bool) -> None:
    iv = value & 0xFFFF
    _check_vector(req, iv)
    if iv == 0 and not value & CD:
        raise NvmeError(st.INVALID_FIELD, "the admin vector cannot be coalesced", PEL_CDW11 + 2)
    req.ctrl.features.set_indexed(F.INTERRUPT_VECTOR_CONFIG, iv, value & (CD | 0xFFFF), save)


def _set_timestamp(req: Request, value: int, save: bool) -> None:
    ts = Timestamp.from_bytes(req.read_from_host(Timestamp.SIZE))
    req.ctrl.features.set_timestamp(ts.timestamp_ms)


def _set_keep_alive(req: Request, value: int, save: bool) -> int:
    """KATO in ms, rounded up to the Keep Alive Granularity the controller reports (KAS)."""
    gran = max(1, req.ctrl.model.keep_alive_granularity_ms)
    return -(-value // gran) * gran


SET_HANDLERS: dict[int, SetHandler] = {
    F.ARBITRATION: _set_masked(Arbitration.MASK),
    F.POWER_MANAGEMENT: _set_power_management,
    F.TEMPERATURE_THRESHOLD: _set_temperature_threshold,
    F.VOLATILE_WRITE_CACHE: _set_volatile_write_cache,
    F.NUMBER_OF_QUEUES: _set_number_of_queues,
    F.INTERRUPT_COALESCING: _set_masked(InterruptCoalescing.MASK),
    F.INTERRUPT_VECTOR_CONFIG: _set_interrupt_vector_config,
    F.WRITE_ATOMICITY: _set_masked(WriteAtomicityNormal.MASK),
    F.ASYNC_EVENT_CONFIG: _set_masked(AsyncEventConfig.MASK),
    F.TIMESTAMP: _set_timestamp,
    F.KEEP_ALIVE_TIMER: _set_keep_alive,
    rate_limit.FID: rate_limit.set_feature,  # only on controllers whose feature table has FID 28h (the PF)
    cdq.FID_CDQ: cdq.set_feature,  # FID 21h: only on the controller that creates CDQs (the PF)
}


def set_features(req: Request) -> st.Status:
    ctrl = req.ctrl
    spec = _spec(req)
    fid = spec.fid
    save = bool(req.sqe.cdw10 >> 31)
    if save and not spec.saveable:
        raise NvmeError(st.FEATURE_NOT_SAVEABLE, f"feature {fid:#04x} not saveable", PEL_SV)
    _check_nsid(req, spec, setting=True)
    if not spec.changeable:
        raise NvmeError(st.FEATURE_NOT_CHANGEABLE, f"feature {fid:#04x} not changeable", PEL_CDW10)
    handler = SET_HANDLERS.get(fid, _set_masked(0xFFFFFFFF))
    value = handler(req, req.sqe.cdw11, save)
    if value is not None:
        ctrl.features.set(fid, value, save)
    if fid in (F.INTERRUPT_COALESCING, F.INTERRUPT_VECTOR_CONFIG):
        ctrl.features.apply_interrupts(ctrl.irq)
    elif fid == F.KEEP_ALIVE_TIMER:
        ctrl.restart_keep_alive()
    return st.SUCCESS


# ------------------------------------------------------------------------------ Get Features
def _get_indexed(req: Request, spec: FeatureSpec, sel: int) -> int:
    feats = req.ctrl.features
    cdw11 = req.sqe.cdw11
    if spec.fid == F.TEMPERATURE_THRESHOLD:
        tmpsel, thsel = _temperature_selector(cdw11, allow_all=False)
        key, default = _temperature_key(tmpsel, thsel), F.default_temperature_threshold(tmpsel, thsel)
        selector = tmpsel << 16 | thsel << 20
    else:  # interrupt vector configuration
        key = cdw11 & 0xFFFF
        _check_vector(req, key)
        default, selector = 0, key
    if sel == 0:
        value = feats.get_indexed(spec.fid, key, default)
    elif sel == 1:
        value = default
    else:
        value = feats.saved_indexed(spec.fid, key, default)
    if spec.fid == F.INTERRUPT_VECTOR_CONFIG:
        return selector | (value & CD) | (CD if key == 0 else 0)
    return selector | (value & 0xFFFF)


def get_features(req: Request) -> st.Status:
    ctrl = req.ctrl
    spec = _spec(req)
    fid = spec.fid
    sel = (req.sqe.cdw10 >> 8) & 0x7
    _check_nsid(req, spec, setting=False)
    if sel == 3:
        req.dw0 = spec.capabilities
        return st.SUCCESS
    if sel > 3:
        raise NvmeError(st.INVALID_FIELD, f"select {sel} reserved", PEL_CDW10 + 1)
    if fid == F.TIMESTAMP:
        # one clock whatever SEL asks for (QEMU does the same): it is not saveable
        feats = ctrl.features
        ts = Timestamp(timestamp_ms=feats.timestamp_now(), synch=False, origin=feats.timestamp_origin)
        req.write_to_host(ts.to_bytes())
    elif fid in (F.TEMPERATURE_THRESHOLD, F.INTERRUPT_VECTOR_CONFIG):
        req.dw0 = _get_indexed(req, spec, sel)
    elif fid == rate_limit.FID:
        rate_limit.get_feature(req, sel)
    elif fid == cdq.FID_CDQ:
        cdq.get_feature(req, sel)
    elif sel == 0:
        req.dw0 = ctrl.features.get(fid)
    elif sel == 1:
        req.dw0 = spec.default
    else:
        req.dw0 = ctrl.features.saved.get(fid, spec.default)
    return st.SUCCESS


HANDLERS: dict[int, Handler] = {
    AdminOpcode.SET_FEATURES: set_features,
    AdminOpcode.GET_FEATURES: get_features,
}
