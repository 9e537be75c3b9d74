"""Host side of Rate Limiting (TP4176): Set/Get Features 28h and log page 28h, run on the PF.

The hypervisor caps a VM by limiting the VF's controller: `set_rate_limit(pf, cntlid, iops=...)`.
Bandwidth is given in MiB/s and sent with BWSF 0 (1 MiB/s units) unless the caller picks a scale.
Every refusal raises NvmeCommandError with the controller's status (Invalid Field for a bad TID or
value, Invalid Field on a VF, which has no FID 28h).
"""

from __future__ import annotations

from nvme_lm.host import commands as cmd
from nvme_lm.host.driver import NvmeDriver
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.logs import LogId
from nvme_lm.spec.rate_limit import (
    BWSF_UNIT_BYTES,
    LOG_HEADER_SIZE,
    RATE_LIMIT_DATA_SIZE,
    RateLimitData,
    RateLimitLog,
    RateLimitLogHeader,
    RateLimitMode,
    decode_log,
    encode_cdw11,
)

FID_RATE_LIMITING = 0x28
MIB = 1 << 20

__all__ = [
    "FID_RATE_LIMITING",
    "clear_rate_limit",
    "get_rate_limit",
    "get_rate_limit_sqe",
    "rate_limit_data",
    "rate_limit_log",
    "set_rate_limit",
    "set_rate_limit_raw",
    "set_rate_limit_sqe",
]


# ----------------------------------------------------------------------------- builders
def set_rate_limit_sqe(cntlid: int) -> SQE:
    """Set Features 28h naming controller `cntlid` (TGT 00h); the 1024-byte data buffer goes with it."""
    return cmd.set_features(FID_RATE_LIMITING, encode_cdw11(cntlid))


def get_rate_limit_sqe(cntlid: int, sel: int = 0) -> SQE:
    return cmd.get_features(FID_RATE_LIMITING, sel, cdw11=encode_cdw11(cntlid))


def _in_units(mib_s: float | None, bwsf: int) -> int:
    if not mib_s:
        return 0
    unit_mib = BWSF_UNIT_BYTES[bwsf] / MIB
    value = mib_s / unit_mib
    if value != int(value) or value < 1:
        raise ValueError(f"{mib_s} MiB/s is not a whole number of BWSF {bwsf} units ({unit_mib:g} MiB/s)")
    return int(value)


def rate_limit_data(*, iops: int | None = None, write_iops: int | None = None, mib_s: float | None = None,
                    write_mib_s: float | None = None, soft: bool = False, enabled: bool = True,
                    bwsf: int = 0) -> RateLimitData:
    """The Feature 28h buffer for the given limits (None or 0 = no limit of that kind)."""
    return RateLimitData.make(enabled=enabled, mode=RateLimitMode.SOFT if soft else RateLimitMode.HARD, bwsf=bwsf,
                              tbwv=_in_units(mib_s, bwsf), wbwv=_in_units(write_mib_s, bwsf), tiops=iops or 0,
                              wiops=write_iops or 0)


# ----------------------------------------------------------------------------- commands
def set_rate_limit(pf: NvmeDriver, cntlid: int, *, iops: int | None = None, write_iops: int | None = None,
                   mib_s: float | None = None, write_mib_s: float | None = None, soft: bool = False,
                   bwsf: int = 0) -> None:
    """Limits controller `cntlid` (hard unless `soft`); takes effect at the controller's next fetch."""
    data = rate_limit_data(iops=iops, write_iops=write_iops, mib_s=mib_s, write_mib_s=write_mib_s, soft=soft,
                           bwsf=bwsf)
    pf.admin(set_rate_limit_sqe(cntlid), data=data.encode())


def set_rate_limit_raw(pf: NvmeDriver, cntlid: int, data: RateLimitData | bytes, *, check: bool = True):
    """Sends a prepared buffer as is (tests use it for refusals); returns the Completion."""
    buf = data.encode() if isinstance(data, RateLimitData) else bytes(data)
    return pf.admin(set_rate_limit_sqe(cntlid), data=buf, check=check)[0]


def clear_rate_limit(pf: NvmeDriver, cntlid: int) -> None:
    """No limit on `cntlid` any more (RLE 0, all values 0)."""
    pf.admin(set_rate_limit_sqe(cntlid), data=RateLimitData().encode())


def get_rate_limit(pf: NvmeDriver, cntlid: int, sel: int = 0) -> RateLimitData:
    """The configuration of `cntlid`: SEL 0 current, 1 default, 2 saved."""
    return RateLimitData.decode(pf.admin(get_rate_limit_sqe(cntlid, sel), read=RATE_LIMIT_DATA_SIZE)[1])


def rate_limit_log(pf: NvmeDriver, *, rae: bool = False) -> RateLimitLog:
    """Log page 28h: the header first (for LPL), then the whole page, decoded."""
    head = RateLimitLogHeader.decode(pf.get_log(LogId.RATE_LIMITING, LOG_HEADER_SIZE, rae=True))
    return decode_log(pf.get_log(LogId.RATE_LIMITING, max(head.lpl * 4, LOG_HEADER_SIZE), rae=rae))

