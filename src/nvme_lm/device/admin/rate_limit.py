"""Rate Limiting (TP4176) admin side: Set/Get Features 28h and log page 28h (docs/rate-limiting.md).

`admin/features.py` dispatches FID 28h here after its common checks (FID supported by this controller,
SV, NSID, changeable), and `admin/log_pages.py` lists log 28h with `log_page` as its builder. The limiter
itself is `device/rate_limit.py`.

Set Features 28h refuses with Invalid Field, changing nothing, when: TGT is not 00h (CNTLID; vendor
types are not supported); TID names no controller of the subsystem; RLC has reserved bits 14:4 set or
RLM is not 0 (hard) / 1 (soft); BWSF is above 5; RLE=1 with no limit value at all; WIOPS > TIOPS or
WBWV > TBWV when both are given; a ratio pair has exactly one part zero; a bandwidth does not fit in
64 bits of bytes per second. Reserved and vendor-specific bytes of the buffer are ignored.
"""

from __future__ import annotations

from nvme_lm.device.events import AsyncEvent, AsyncEventType
from nvme_lm.device.rate_limit import FID_RATE_LIMITING, RateLimits, manages_limits
from nvme_lm.device.request import NvmeError, Request
from nvme_lm.spec import status as st
from nvme_lm.spec.logs import LogId
from nvme_lm.spec.rate_limit import (
    BWSF_MAX,
    BWSF_UNIT_BYTES,
    RATE_LIMIT_DATA_SIZE,
    RLC_RESERVED_MASK,
    TGT_CNTLID,
    VS_VERSION,
    ControllerDescriptor,
    ControllerVendorData,
    PortDescriptor,
    RateLimitData,
    RateLimitMode,
    RateLimitPort,
    decode_cdw11,
    encode_log,
)

FID = FID_RATE_LIMITING
PEL_CDW11 = 44
NOTICE_RATE_LIMITING_CHANGE = 0x0A  # AER notice info: Rate Limiting Configuration Change
U32 = 0xFFFFFFFF
MIB = 1 << 20
FLAG_BINDING = 1 << 0
FLAG_CONTENDED = 1 << 1


def _domain(req: Request) -> RateLimits:
    domain = req.ctrl.subsystem.rate_limits
    if domain is None:
        raise NvmeError(st.INVALID_FIELD, "rate limiting not supported", PEL_CDW11)
    return domain


def _target(req: Request) -> tuple[RateLimits, int]:
    """(limits, target CNTLID) from CDW11 TID/TGT."""
    domain = _domain(req)
    tid, tgt = decode_cdw11(req.sqe.cdw11)
    if tgt != TGT_CNTLID:
        raise NvmeError(st.INVALID_FIELD, f"TGT {tgt:#04x} not supported (only 00h, a CNTLID)", PEL_CDW11 + 2)
    if tid not in req.ctrl.subsystem.controllers:
        raise NvmeError(st.INVALID_FIELD, f"TID {tid:#06x} names no controller", PEL_CDW11)
    return domain, tid


def validate(data: RateLimitData) -> None:
    """Refuses a configuration the controller cannot apply (Invalid Field)."""
    def refuse(why: str) -> NvmeError:
        return NvmeError(st.INVALID_FIELD, why)

    if data.rlc & RLC_RESERVED_MASK:
        raise refuse(f"RLC {data.rlc:#06x} has reserved bits set")
    if data.mode not in (RateLimitMode.HARD, RateLimitMode.SOFT):
        raise refuse(f"RLM {data.mode} reserved")
    if data.bwsf > BWSF_MAX:
        raise refuse(f"BWSF {data.bwsf} reserved")
    if data.enabled and not (data.tbwv or data.wbwv or data.tiops or data.wiops):
        raise refuse("RLE set but no limit given")
    if data.tiops and data.wiops > data.tiops:
        raise refuse(f"WIOPS {data.wiops} above TIOPS {data.tiops}")
    if data.tbwv and data.wbwv > data.tbwv:
        raise refuse(f"WBWV {data.wbwv} above TBWV {data.tbwv}")
    for name, a, b in (("IOPS", data.riopsr, data.wiopsr), ("bandwidth", data.rbwr, data.wbwr)):
        if bool(a) != bool(b):
            raise refuse(f"{name} ratio {a}:{b} has one part zero")
    unit = BWSF_UNIT_BYTES[data.bwsf]
    if max(data.tbwv, data.wbwv) * unit >= 1 << 64:
        raise refuse("bandwidth beyond 2^64 bytes per second")


def set_feature(req: Request, value: int, save: bool) -> None:
    """Set Features 28h: applies at once; a change raises the notice on the target controller."""
    domain, tid = _target(req)
    data = RateLimitData.decode(req.read_from_host(RATE_LIMIT_DATA_SIZE))  # reserved/vendor bytes dropped
    validate(data)
    if domain.configure(tid, data):
        target = req.ctrl.subsystem.controllers[tid]
        target.post_event(AsyncEvent(AsyncEventType.NOTICE, NOTICE_RATE_LIMITING_CHANGE, LogId.RATE_LIMITING))


def get_feature(req: Request, sel: int) -> None:
    """Get Features 28h, SEL 0-2: current, default (no limit) or saved (not saveable: the default)."""
    domain, tid = _target(req)
    data = domain.config(tid) if sel == 0 else RateLimitData()
    req.write_to_host(data.encode())


# ------------------------------------------------------------------------------------------- log 28h
def _controller_descriptor(domain: RateLimits, cntlid: int) -> ControllerDescriptor:
    cfg = domain.config(cntlid)
    lim = domain.limiters.get(cntlid)
    flags = 0
    if lim is not None and lim.binding:
        flags |= FLAG_BINDING
    if lim is not None and lim.contended:
        flags |= FLAG_CONTENDED
    iops, bps = domain.rates.get(cntlid, (0.0, 0.0))
    vs = ControllerVendorData(
        version=VS_VERSION, rlc=cfg.rlc, bwsf=cfg.bwsf, flags=flags, tbwv=cfg.tbwv, wbwv=cfg.wbwv, tiops=cfg.tiops,
        wiops=cfg.wiops, held=lim.held if lim else 0, ios=lim.ios if lim else 0, nbytes=lim.nbytes if lim else 0,
        iops=min(round(iops), U32), bytes_s=round(bps), refusals=lim.refusals if lim else 0)
    if not cfg.enabled:  # the maximum-access descriptor: what the controller may use, 0 = no limit
        return ControllerDescriptor(cntlid=cntlid, vs=vs.encode())
    return ControllerDescriptor(cntlid=cntlid, mbsf=cfg.bwsf, mrbwv=cfg.tbwv, mwbwv=cfg.wbwv or cfg.tbwv,
                                mriops=cfg.tiops, mwiops=cfg.wiops or cfg.tiops, vs=vs.encode())


def log_page(req: Request) -> bytes:
    """Log 28h. The managing controller (PF) sees every controller and the port's unallocated capacity;
    any other controller sees only its own descriptor, so it can read what its AER notice is about."""
    domain = req.ctrl.subsystem.rate_limits
    if domain is None:
        raise NvmeError(st.INVALID_LOG_PAGE, "rate limiting not supported", 40)
    sub = req.ctrl.subsystem
    manager = manages_limits(req.ctrl)
    cntlids = sorted(sub.controllers) if manager else [req.ctrl.cntlid]
    cap_mib = int(domain.capacity_bytes_s // MIB)
    cap_iops = min(int(domain.capacity_iops), U32)
    port = PortDescriptor(portid=0, abwsf=0, mbsf=0, mrbwv=cap_mib, mwbwv=cap_mib, mriops=cap_iops, mwiops=cap_iops)
    if manager:
        used_iops, used_bps = domain.hard_allocated()
        avail_mib = max(0, cap_mib - int(-(-used_bps // MIB)))
        avail_iops = max(0, cap_iops - int(-(-used_iops // 1)))
        port.arbwv = port.awbwv = avail_mib
        port.ariops = port.awiops = avail_iops
    nst = max(len(sub.controllers), sub.model.max_vfs + 1) - 1
    return encode_log(domain.generation, nst, [RateLimitPort(port, [_controller_descriptor(domain, c)
                                                                     for c in cntlids])])


__all__ = ["FID", "NOTICE_RATE_LIMITING_CHANGE", "get_feature", "log_page", "set_feature", "validate"]
