"""Rate Limiting (TP4176, NVMe Base 2.4 draft): the Feature 28h data buffer and the log page 28h structures.

Wire formats only. Sources: spec notes §16 (nvme-cli HEAD has FID/LID 28h; the field list comes from
the unmerged PR #3888, whose printer confirms TBWV/WBWV are 64-bit and TIOPS/WIOPS 32-bit). Byte ranges
follow the §16 table; where the notes give only a field list (log page 28h) the widths and positions
chosen here are documented in docs/rate-limiting.md ("format notes") and marked [D] below.

Feature 28h (Set/Get Features): CDW11 bits 15:0 TID (target id), 23:16 TGT (target type; 00h = TID is a
CNTLID, C0h-FFh vendor specific). The 1024-byte data buffer is :class:`RateLimitData`. A value of 0 in
TBWV/WBWV/TIOPS/WIOPS means "no limit of that kind".

Log page 28h: a 16-byte header, NP+1 offsets to port descriptors, each port descriptor (1024 bytes +
NC+1 offsets) followed by its controller descriptors (320 bytes + NNSMAD offsets). Offsets are 32-bit
values counting dwords from the start of the log page [D].
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

from .layout import Layout, bits, layout, raw, set_bits, u8, u16, u32, u64

__all__ = [
    "BWSF_MAX",
    "BWSF_UNIT_BYTES",
    "CONTROLLER_DESCRIPTOR_SIZE",
    "LOG_HEADER_SIZE",
    "PORT_DESCRIPTOR_SIZE",
    "RATE_LIMIT_DATA_SIZE",
    "RLA_HLS",
    "RLA_SLS",
    "RLC_RESERVED_MASK",
    "RLE",
    "TGT_CNTLID",
    "VS_VERSION",
    "ControllerDescriptor",
    "ControllerVendorData",
    "PortDescriptor",
    "RateLimitData",
    "RateLimitLog",
    "RateLimitLogHeader",
    "RateLimitMode",
    "RateLimitPort",
    "bandwidth_bytes",
    "decode_cdw11",
    "decode_log",
    "encode_cdw11",
    "encode_log",
]

RATE_LIMIT_DATA_SIZE = 1024
TGT_CNTLID = 0x00  # TGT: TID is a controller identifier; C0h-FFh vendor specific, the rest reserved
RLE = 1 << 15  # RLC bit 15: rate limiting enabled
RLM_MASK = 0xF  # RLC bits 3:0: rate limiting mode
RLC_RESERVED_MASK = 0x7FF0  # RLC bits 14:4
RLA_HLS = 1 << 0  # Identify NVM CNS 06h RLA: hard limit supported
RLA_SLS = 1 << 1  # soft limit supported
BWSF_MAX = 5
# BWSF: the unit of TBWV/WBWV (and of MRBWV/MWBWV/ARBWV/AWBWV with MBSF/ABWSF) in bytes per second
BWSF_UNIT_BYTES = (1 << 20, 10 << 20, 100 << 20, 1 << 30, 10 << 30, 100 << 30)


class RateLimitMode(IntEnum):
    """RLC.RLM: a hard limit always binds; a soft limit binds only while the subsystem is contended."""

    HARD = 0
    SOFT = 1


def encode_cdw11(tid: int, tgt: int = TGT_CNTLID) -> int:
    """Set/Get Features 28h CDW11: TID 15:0, TGT 23:16."""
    return set_bits(set_bits(0, 0, 15, tid), 16, 23, tgt)


def decode_cdw11(cdw11: int) -> tuple[int, int]:
    """(TID, TGT) from CDW11."""
    return bits(cdw11, 0, 15), bits(cdw11, 16, 23)


def bandwidth_bytes(value: int, bwsf: int) -> int:
    """A bandwidth value in bytes per second (`value` x the BWSF unit); raises ValueError on a reserved BWSF."""
    if not 0 <= bwsf <= BWSF_MAX:
        raise ValueError(f"BWSF {bwsf} is reserved")
    return value * BWSF_UNIT_BYTES[bwsf]


# --------------------------------------------------------------------------------------------- FID 28h
@layout(size=RATE_LIMIT_DATA_SIZE)
class RateLimitData(Layout):
    """Rate Limiting feature data (spec notes §16 table; bytes 6:2 and 511:36 reserved)."""

    rlc: int = u16(0)  # 3:0 RLM, 15 RLE
    bwsf: int = u8(7)
    tbwv: int = u64(8)  # total bandwidth, in BWSF units
    wbwv: int = u64(16)  # write bandwidth, in BWSF units
    tiops: int = u32(24)  # total I/O commands per second
    wiops: int = u32(28)  # write I/O commands per second
    riopsr: int = u8(32)  # read part of the read:write IOPS ratio
    wiopsr: int = u8(33)  # write part
    rbwr: int = u8(34)  # read part of the read:write bandwidth ratio
    wbwr: int = u8(35)  # write part
    # bytes 1023:512 are vendor specific; nvme-lm defines none (ignored on Set, zero on Get)

    @classmethod
    def make(cls, *, enabled: bool = True, mode: int = RateLimitMode.HARD, bwsf: int = 0, tbwv: int = 0,
             wbwv: int = 0, tiops: int = 0, wiops: int = 0, riopsr: int = 0, wiopsr: int = 0, rbwr: int = 0,
             wbwr: int = 0) -> RateLimitData:
        rlc = (RLE if enabled else 0) | (mode & RLM_MASK)
        return cls(rlc=rlc, bwsf=bwsf, tbwv=tbwv, wbwv=wbwv, tiops=tiops, wiops=wiops, riopsr=riopsr,
                   wiopsr=wiopsr, rbwr=rbwr, wbwr=wbwr)

    @property
    def enabled(self) -> bool:
        return bool(self.rlc & RLE)

    @property
    def mode(self) -> int:
        return self.rlc & RLM_MASK

    @property
    def soft(self) -> bool:
        return self.mode == RateLimitMode.SOFT

    @property
    def total_bytes_s(self) -> int:
        return bandwidth_bytes(self.tbwv, self.bwsf)

    @property
    def write_bytes_s(self) -> int:
        return bandwidth_bytes(self.wbwv, self.bwsf)


# --------------------------------------------------------------------------------------------- log 28h
LOG_HEADER_SIZE = 16
PORT_DESCRIPTOR_SIZE = 1024  # fixed part; NC+1 dword offsets follow
CONTROLLER_DESCRIPTOR_SIZE = 320  # fixed part; NNSMAD dword offsets follow
VS_VERSION = 1  # version of our vendor-specific controller descriptor area (ControllerVendorData)
_OFFSET = struct.Struct("<I")


@layout(size=LOG_HEADER_SIZE)
class RateLimitLogHeader(Layout):
    """Bytes 1:0 reserved, NP 3:2 (ports, 0's based), LPL 7:4 (log length in dwords), GC 11:8 (generation
    count, bumped on every configuration change), NST 13:12 (supported targets, 0's based), 15:14 reserved."""

    np: int = u16(2)
    lpl: int = u32(4)
    gc: int = u32(8)
    nst: int = u16(12)


@layout(size=PORT_DESCRIPTOR_SIZE)
class PortDescriptor(Layout):
    """[D] positions: PORTID, NC (0's based), ABWSF, the 32-byte maximum-access descriptor at 39:8
    {MBSF, MRBWV, MWBWV (64-bit), MRIOPS, MWIOPS (32-bit)}, available read/write bandwidth (64-bit, ABWSF
    units) and IOPS (32-bit) at 63:40, 448 bytes reserved, 512 bytes vendor specific."""

    portid: int = u16(0)
    nc: int = u16(2)
    abwsf: int = u8(4)
    mbsf: int = u8(8)
    mrbwv: int = u64(16)
    mwbwv: int = u64(24)
    mriops: int = u32(32)
    mwiops: int = u32(36)
    arbwv: int = u64(40)
    awbwv: int = u64(48)
    ariops: int = u32(56)
    awiops: int = u32(60)
    vs: bytes = raw(512, 512)


@layout(size=CONTROLLER_DESCRIPTOR_SIZE)
class ControllerDescriptor(Layout):
    """[D] positions: CNTLID, NNSMAD (number of NVM storage medium access descriptors), the maximum-access
    descriptor at 39:8, 24 bytes reserved, 256 bytes vendor specific (ours: ControllerVendorData)."""

    cntlid: int = u16(0)
    nnsmad: int = u16(2)
    mbsf: int = u8(8)
    mrbwv: int = u64(16)
    mwbwv: int = u64(24)
    mriops: int = u32(32)
    mwiops: int = u32(36)
    vs: bytes = raw(64, 256)


@layout(size=256)
class ControllerVendorData(Layout):
    """nvme-lm's vendor-specific controller descriptor area, version VS_VERSION (docs/rate-limiting.md).

    The configuration as set (RLC, BWSF, values) plus what the limiter observed: `flags` bit 0 = the limit
    binds now (hard and enabled, or soft while contended), bit 1 = the subsystem is contended for this
    controller; `held` = commands whose fetch the limiter deferred; `refusals` = admission checks that
    said "not yet" (a measure of engine wake-ups while holding); `ios`/`nbytes` = I/O commands and data
    bytes admitted since the limiter was attached; `iops`/`bytes_s` = their rates over the last
    measurement window (kept while a soft limit is enabled in the subsystem, else 0).
    """

    version: int = u16(0)
    rlc: int = u16(2)
    bwsf: int = u8(4)
    flags: int = u8(5)
    tbwv: int = u64(8)
    wbwv: int = u64(16)
    tiops: int = u32(24)
    wiops: int = u32(28)
    held: int = u64(32)
    ios: int = u64(40)
    nbytes: int = u64(48)
    iops: int = u32(56)
    bytes_s: int = u64(64)
    refusals: int = u64(72)


@dataclass
class RateLimitPort:
    """One port descriptor with its controller descriptors (decoded or to encode)."""

    descriptor: PortDescriptor
    controllers: list[ControllerDescriptor] = field(default_factory=list)


@dataclass
class RateLimitLog:
    header: RateLimitLogHeader
    ports: list[RateLimitPort]

    def controller(self, cntlid: int) -> ControllerDescriptor | None:
        for port in self.ports:
            for c in port.controllers:
                if c.cntlid == cntlid:
                    return c
        return None


def encode_log(gc: int, nst: int, ports: list[RateLimitPort]) -> bytes:
    """The whole log page; NP, NC, NNSMAD (0: no storage-medium descriptors), LPL and offsets are filled in."""
    if not ports:
        raise ValueError("a rate limiting log has at least one port")
    head = LOG_HEADER_SIZE + 4 * len(ports)
    chunks: list[bytes] = []
    port_offsets: list[int] = []
    pos = head
    for port in ports:
        if not port.controllers:
            raise ValueError("a port descriptor names at least one controller")
        port_offsets.append(pos // 4)
        fixed = PORT_DESCRIPTOR_SIZE + 4 * len(port.controllers)
        ctrl_pos = pos + fixed
        offs = b"".join(_OFFSET.pack((ctrl_pos + i * CONTROLLER_DESCRIPTOR_SIZE) // 4)
                        for i in range(len(port.controllers)))
        d = port.descriptor
        d.nc = len(port.controllers) - 1
        chunks.append(d.encode() + offs)
        for c in port.controllers:
            c.nnsmad = 0
            chunks.append(c.encode())
        pos = ctrl_pos + CONTROLLER_DESCRIPTOR_SIZE * len(port.controllers)
    hdr = RateLimitLogHeader(np=len(ports) - 1, lpl=pos // 4, gc=gc, nst=nst)
    return hdr.encode() + b"".join(_OFFSET.pack(o) for o in port_offsets) + b"".join(chunks)


def decode_log(buf: bytes | bytearray | memoryview) -> RateLimitLog:
    """Parses a log page 28h by following its offsets (so it also reads layouts with padding between parts)."""
    hdr = RateLimitLogHeader.decode(buf)
    ports: list[RateLimitPort] = []
    for i in range(hdr.np + 1):
        (poff,) = _OFFSET.unpack_from(buf, LOG_HEADER_SIZE + 4 * i)
        base = poff * 4
        desc = PortDescriptor.decode(buf, base)
        ctrls = []
        for j in range(desc.nc + 1):
            (coff,) = _OFFSET.unpack_from(buf, base + PORT_DESCRIPTOR_SIZE + 4 * j)
            ctrls.append(ControllerDescriptor.decode(buf, coff * 4))
        ports.append(RateLimitPort(desc, ctrls))
    return RateLimitLog(hdr, ports)
