"""Controller State structure of Migration Receive / Migration Send (TP4159; spec notes §11, D2).

Layout only: the outer 48-byte header, the NVMe-defined part (I/O SQ and CQ records) and the
vendor-specific part selected by our UUID (a versioned TLV list, documented in
docs/controller-state.md). Capture and restore live in device/migration_state.py.
Decoders raise ValueError on any inconsistency so a hostile blob never reaches the device.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass, field

HEADER_SIZE = 48
NVME_STATE_VERSION = 0  # NVMe Controller State VER, shall be 0 (Fig 359); CNS 20h lists it
OUTER_VERSION = 0
CSATTR_SUSPENDED = 0x01
# Our vendor-specific state format (CNS 20h NUUID entry 1; D1)
VENDOR_UUID = uuid.UUID("6e766d65-6c6d-4d69-8772-617465537431")
VENDOR_MAGIC = b"NLMV"
VENDOR_VERSION = 1

_HEADER = struct.Struct("<HB13xQ8xQ8x")  # VER, CSATTR, NVMECSS (low qword of 128 bits), VSS (low qword)
_NVME_HDR = struct.Struct("<HHH2x")
_SQ = struct.Struct("<QHHHHHH4x")  # PRP1, QSIZE, QID, CQID, IOSQA, HP, TP
_CQ = struct.Struct("<QHHHHI4x")  # PRP1, QSIZE, QID, HP, TP, IOCQA
_VHDR = struct.Struct("<4sHH")  # magic, version, TLV count
_TLV = struct.Struct("<HH")
assert _SQ.size == 24 and _CQ.size == 24


def supported_formats() -> bytes:
    """Identify CNS 20h data: NV=1 (version 0), NUUID=1 (our UUID) (spec notes §2.3, D1)."""
    return bytes([1, 1]) + struct.pack("<H", NVME_STATE_VERSION) + VENDOR_UUID.bytes


@dataclass(frozen=True, slots=True)
class SqState:
    prp1: int
    qsize: int  # 0's based
    qid: int
    cqid: int
    pc: bool
    qprio: int
    head: int
    tail: int


@dataclass(frozen=True, slots=True)
class CqState:
    prp1: int
    qsize: int  # 0's based
    qid: int
    head: int
    tail: int
    pc: bool
    ien: bool
    s0pt: int  # phase tag currently in slot 0
    iv: int


@dataclass
class NvmeState:
    sqs: list[SqState] = field(default_factory=list)
    cqs: list[CqState] = field(default_factory=list)

    def encode(self) -> bytes:
        out = bytearray(_NVME_HDR.pack(NVME_STATE_VERSION, len(self.sqs), len(self.cqs)))
        for s in sorted(self.sqs, key=lambda s: s.qid):
            out += _SQ.pack(s.prp1, s.qsize, s.qid, s.cqid, int(s.pc) | (s.qprio & 3) << 1, s.head, s.tail)
        for c in sorted(self.cqs, key=lambda c: c.qid):
            attr = int(c.pc) | int(c.ien) << 1 | (c.s0pt & 1) << 2 | c.iv << 16
            out += _CQ.pack(c.prp1, c.qsize, c.qid, c.head, c.tail, attr)
        return bytes(out)

    @classmethod
    def decode(cls, buf: bytes | memoryview) -> NvmeState:
        if len(buf) < _NVME_HDR.size:
            raise ValueError("NVMe controller state shorter than its header")
        ver, nsq, ncq = _NVME_HDR.unpack_from(buf, 0)
        if ver != NVME_STATE_VERSION:
            raise ValueError(f"NVMe controller state version {ver}")
        if len(buf) != _NVME_HDR.size + 24 * (nsq + ncq):
            raise ValueError(f"NVMECSS does not match NIOSQ {nsq} + NIOCQ {ncq}")
        st = cls()
        off = _NVME_HDR.size
        for _ in range(nsq):
            prp1, qsize, qid, cqid, attr, hp, tp = _SQ.unpack_from(buf, off)
            if attr & ~0x7:
                raise ValueError("reserved IOSQA bits set")
            st.sqs.append(SqState(prp1, qsize, qid, cqid, bool(attr & 1), (attr >> 1) & 3, hp, tp))
            off += 24
        for _ in range(ncq):
            prp1, qsize, qid, hp, tp, attr = _CQ.unpack_from(buf, off)
            if attr & 0xFFF8:
                raise ValueError("reserved IOCQA bits set")
            st.cqs.append(CqState(prp1, qsize, qid, hp, tp, bool(attr & 1), bool(attr & 2), (attr >> 2) & 1,
                                  attr >> 16))
            off += 24
        return st


# ----------------------------------------------------------------------------- vendor TLVs
class Tlv:
    """Vendor TLV types (docs/controller-state.md). Unknown types are refused, not skipped."""

    REGISTERS = 1  # <IIQQI: CC, AQA, ASQ, ACQ, INTMS
    ADMIN_QUEUES = 2  # <HHHHB3x: SQ head, SQ tail, CQ head, CQ tail, CQ phase
    FEATURES = 3  # n x <IIIB3x: FID, current, saved, has_saved
    INDEXED_FEATURES = 4  # n x <IIIIB3x: FID, selector, current, saved, flags (1 current, 2 saved)
    TIMESTAMP = 5  # <QB7x: timestamp (ms) at capture, origin
    AERS = 6  # n x <H: CIDs of outstanding AERs, oldest first
    EVENTS = 7  # <H pending count, n x <BBBxI (type, info, log page, CQE DW1), then masked log pages as bytes
    ERROR_LOG = 8  # <Q count, then n x <QHHHHQI newest first
    QUEUE_ALLOC = 9  # <HHBB2x: NSQA, NCQA, queues requested, keep-alive running
    SHADOW = 10  # <QQ: shadow doorbell and EventIdx page addresses
    ABORT_MARKS = 11  # n x <HH: SQID, CID
    CHANGED_NS = 12  # n x <I
    SMART = 13  # <9Q: SMART counters that must stay monotonic
    HELD_COMPLETIONS = 14  # n x <HIIHHHH2x: CQID, DW0, DW1, SQHD, SQID, CID, status (CQ was full)


_FIXED = {Tlv.REGISTERS: struct.Struct("<IIQQI4x"), Tlv.ADMIN_QUEUES: struct.Struct("<HHHHB3x"),
          Tlv.TIMESTAMP: struct.Struct("<QB7x"), Tlv.QUEUE_ALLOC: struct.Struct("<HHBB2x"),
          Tlv.SHADOW: struct.Struct("<QQ"), Tlv.SMART: struct.Struct("<9Q")}
_RECORDS = {Tlv.FEATURES: struct.Struct("<IIIB3x"), Tlv.INDEXED_FEATURES: struct.Struct("<IIIIB3x"),
            Tlv.AERS: struct.Struct("<H"), Tlv.ABORT_MARKS: struct.Struct("<HH"), Tlv.CHANGED_NS: struct.Struct("<I"),
            Tlv.ERROR_LOG: struct.Struct("<QHHHHQI"), Tlv.HELD_COMPLETIONS: struct.Struct("<HIIHHHH2x")}
ERROR_RECORD = _RECORDS[Tlv.ERROR_LOG]
_EVENT = struct.Struct("<BBBxI")
SMART_FIELDS = ("data_units_read", "data_units_written", "host_read_commands", "host_write_commands",
                "controller_busy_ns", "media_errors", "error_log_entries", "_read_bytes", "_written_bytes")


def _pad4(n: int) -> int:
    return -n % 4


def encode_vendor(tlvs: dict[int, object]) -> bytes:
    """`tlvs`: type -> tuple (fixed types), list of tuples (record types), or bytes (EVENTS, ERROR_LOG)."""
    out = bytearray(_VHDR.pack(VENDOR_MAGIC, VENDOR_VERSION, len(tlvs)))
    for t in sorted(tlvs):
        v = tlvs[t]
        if t in _FIXED:
            body = _FIXED[t].pack(*v)  # type: ignore[misc]
        elif t in (Tlv.EVENTS, Tlv.ERROR_LOG):
            body = bytes(v)  # type: ignore[call-overload]
        else:
            rec = _RECORDS[t]
            body = b"".join(rec.pack(*r) for r in v)  # type: ignore[attr-defined]
        if len(body) > 0xFFFF:
            raise ValueError(f"TLV {t} too long")
        out += _TLV.pack(t, len(body)) + body + bytes(_pad4(len(body)))
    out += bytes(_pad4(len(out)))
    return bytes(out)


def decode_vendor(buf: bytes | memoryview) -> dict[int, object]:
    """Inverse of encode_vendor, strict: wrong magic/version, duplicate or unknown types, bad lengths."""
    buf = bytes(buf)
    if len(buf) < _VHDR.size:
        raise ValueError("vendor state shorter than its header")
    magic, ver, count = _VHDR.unpack_from(buf, 0)
    if magic != VENDOR_MAGIC or ver != VENDOR_VERSION:
        raise ValueError(f"vendor state magic/version {magic!r}/{ver}")
    off = _VHDR.size
    out: dict[int, object] = {}
    for _ in range(count):
        if off + _TLV.size > len(buf):
            raise ValueError("truncated TLV header")
        t, n = _TLV.unpack_from(buf, off)
        off += _TLV.size
        if off + n > len(buf):
            raise ValueError(f"TLV {t} runs past the end")
        body = buf[off : off + n]
        off += n + _pad4(n)
        if t in out:
            raise ValueError(f"duplicate TLV {t}")
        if t in _FIXED:
            if n != _FIXED[t].size:
                raise ValueError(f"TLV {t} length {n}")
            out[t] = _FIXED[t].unpack(body)
        elif t in _RECORDS and t != Tlv.ERROR_LOG:
            rec = _RECORDS[t]
            if n % rec.size:
                raise ValueError(f"TLV {t} length {n}")
            out[t] = [rec.unpack_from(body, i) for i in range(0, n, rec.size)]
        elif t == Tlv.ERROR_LOG:
            if n < 8 or (n - 8) % ERROR_RECORD.size:
                raise ValueError("error log TLV length")
            out[t] = (struct.unpack_from("<Q", body)[0],
                      [ERROR_RECORD.unpack_from(body, i) for i in range(8, n, ERROR_RECORD.size)])
        elif t == Tlv.EVENTS:
            if n < 2:
                raise ValueError("events TLV length")
            npend = struct.unpack_from("<H", body)[0]
            if 2 + _EVENT.size * npend > n:
                raise ValueError("events TLV length")
            pend = [_EVENT.unpack_from(body, 2 + _EVENT.size * i) for i in range(npend)]
            out[t] = (pend, list(body[2 + _EVENT.size * npend :]))
        else:
            raise ValueError(f"unknown TLV type {t}")
    if any(buf[off:]):
        raise ValueError("non-zero bytes after the last TLV")
    return out


def encode_events(pending: list[tuple[int, int, int, int]], masked: list[int]) -> bytes:
    return struct.pack("<H", len(pending)) + b"".join(_EVENT.pack(*p) for p in pending) + bytes(sorted(masked))


def encode_error_log(count: int, entries: list[tuple]) -> bytes:
    return struct.pack("<Q", count) + b"".join(ERROR_RECORD.pack(*e) for e in entries)


# ----------------------------------------------------------------------------- outer structure
@dataclass
class ControllerState:
    suspended: bool = False
    nvme: bytes = b""  # encoded NVMe Controller State (empty when CSVI = 0)
    vendor: bytes = b""  # encoded vendor TLVs (empty when CSUUIDI = 0)

    def encode(self) -> bytes:
        if len(self.nvme) % 4 or len(self.vendor) % 4:
            raise ValueError("state parts must be dword multiples")
        hdr = _HEADER.pack(OUTER_VERSION, CSATTR_SUSPENDED if self.suspended else 0, len(self.nvme) // 4,
                           len(self.vendor) // 4)
        return hdr + self.nvme + self.vendor

    @classmethod
    def decode(cls, buf: bytes | memoryview) -> ControllerState:
        buf = bytes(buf)
        if len(buf) < HEADER_SIZE:
            raise ValueError("controller state shorter than its 48-byte header")
        ver, csattr, nvmecss, vss = _HEADER.unpack_from(buf, 0)
        if ver != OUTER_VERSION:
            raise ValueError(f"controller state version {ver}")
        if any(buf[3:16]) or any(buf[24:32]) or any(buf[40:48]) or csattr & ~CSATTR_SUSPENDED:
            raise ValueError("reserved header bytes set")
        if HEADER_SIZE + 4 * (nvmecss + vss) != len(buf):
            raise ValueError(f"NVMECSS {nvmecss} + VSS {vss} dwords do not match {len(buf)} bytes")
        n_end = HEADER_SIZE + 4 * nvmecss
        return cls(bool(csattr & CSATTR_SUSPENDED), buf[HEADER_SIZE:n_end], buf[n_end:])
