"""Get LBA Status (admin 86h): command dwords and the LBA Status Descriptor List, no behaviour.

Sources (spec notes §15, NVM Command Set 1.0 §4.2.1 Figures 108-112, TP4165 in NVM CS 1.2; libnvme
``struct nvme_lba_status`` / ``nvme_lba_status_desc``; nvme-cli sizes the buffer as (MNDW + 1) * 4):

* CDW10/11 SLBA (64 bit); CDW12 MNDW, the most dwords to return, **0's based**;
  CDW13 bits 31:24 ATYPE, 23:16 reserved, 15:0 RL in logical blocks (0 = from SLBA to NSZE - 1).
* Data: an 8-byte header {NLSD u32, CMPC u8, 3 reserved} then NLSD 16-byte descriptors
  {DSLBA u64, NLB u32 (**0's based**), reserved u8, STATUS u8 (2:0 LBARS), 2 reserved}.

The header and one descriptor are `@layout` structures; whole lists go through a numpy dtype with the
same layout (checked in the tests), so ten thousand descriptors encode or decode in one call.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np

from .layout import Layout, bits, layout, u8, u32, u64

__all__ = [
    "DESCRIPTOR_DTYPE",
    "DESCRIPTOR_SIZE",
    "HEADER_SIZE",
    "LBARS_ALLOCATED",
    "MAX_DESCRIPTOR_NLB",
    "Atype",
    "Cmpc",
    "GetLbaStatus",
    "LbaStatusDescriptor",
    "LbaStatusHeader",
    "decode_lba_status",
    "encode_lba_status",
    "max_descriptors",
]

HEADER_SIZE = 8
DESCRIPTOR_SIZE = 16
MAX_DESCRIPTOR_NLB = 1 << 32  # NLB is a 0's based u32: one descriptor covers at most 2^32 blocks
LBARS_ALLOCATED = 0b010  # TP4165: "one or more LBAs in the range are allocated" (ATYPE 02h)


class Atype(IntEnum):
    """Action Type (CDW13 bits 31:24)."""

    ALLOCATED = 0x02  # TP4165: tracked allocated LBAs, at TLBAAG granularity
    SCAN_UNTRACKED = 0x10  # scan, then return untracked and tracked potentially unrecoverable LBAs
    TRACKED = 0x11  # tracked potentially unrecoverable LBAs only


class Cmpc(IntEnum):
    """Completion Condition (header byte 4)."""

    NONE = 0
    INCOMPLETE = 1  # MNDW reached and more descriptors exist in the range
    COMPLETE = 2  # the whole range was processed and every descriptor transferred


class GetLbaStatus:
    """The command's fields from CDW10-13 (a value object; `dwords()` is the inverse)."""

    __slots__ = ("atype", "mndw", "rl", "slba")

    def __init__(self, slba: int, mndw: int, rl: int, atype: int) -> None:
        self.slba = slba
        self.mndw = mndw  # 0's based, as on the wire
        self.rl = rl
        self.atype = atype

    @classmethod
    def decode(cls, cdw10: int, cdw11: int, cdw12: int, cdw13: int) -> GetLbaStatus:
        return cls(cdw10 | cdw11 << 32, cdw12, bits(cdw13, 0, 15), bits(cdw13, 24, 31))

    def dwords(self) -> tuple[int, int, int, int]:
        return (self.slba & 0xFFFFFFFF, self.slba >> 32, self.mndw & 0xFFFFFFFF,
                (self.rl & 0xFFFF) | (self.atype & 0xFF) << 24)

    @property
    def buffer_bytes(self) -> int:
        """Size of the host buffer the command describes: (MNDW + 1) dwords."""
        return (self.mndw + 1) * 4


@layout(size=HEADER_SIZE)
class LbaStatusHeader(Layout):
    """LBA Status Descriptor List header."""

    nlsd: int = u32(0)
    cmpc: int = u8(4)


@layout(size=DESCRIPTOR_SIZE)
class LbaStatusDescriptor(Layout):
    """One LBA Status Descriptor; `nlb` is 0's based as on the wire (`count` is the 1-based length)."""

    dslba: int = u64(0)
    nlb: int = u32(8)
    status: int = u8(13)

    @property
    def count(self) -> int:
        return self.nlb + 1

    @property
    def lbars(self) -> int:
        return bits(self.status, 0, 2)


DESCRIPTOR_DTYPE = np.dtype([("dslba", "<u8"), ("nlb", "<u4"), ("rsvd12", "u1"), ("status", "u1"),
                             ("rsvd14", "<u2")])
assert DESCRIPTOR_DTYPE.itemsize == DESCRIPTOR_SIZE


def max_descriptors(buffer_bytes: int) -> int:
    """How many whole descriptors fit after the header in a buffer of `buffer_bytes`."""
    return max(0, (buffer_bytes - HEADER_SIZE) // DESCRIPTOR_SIZE)


def encode_lba_status(starts: np.ndarray, counts: np.ndarray, status: int, cmpc: int) -> bytes:
    """Header + descriptors for ranges `starts[i]` of `counts[i]` blocks (1-based, each <= 2^32)."""
    n = len(starts)
    out = bytearray(HEADER_SIZE + n * DESCRIPTOR_SIZE)
    LbaStatusHeader(nlsd=n, cmpc=cmpc).encode_into(out)
    if n:
        desc = np.frombuffer(out, dtype=DESCRIPTOR_DTYPE, offset=HEADER_SIZE, count=n)
        desc["dslba"] = starts
        desc["nlb"] = np.asarray(counts, dtype=np.uint64) - 1
        desc["status"] = status
    return bytes(out)


def decode_lba_status(buf: bytes | bytearray | memoryview) -> tuple[LbaStatusHeader, np.ndarray]:
    """The header and the NLSD descriptors (a DESCRIPTOR_DTYPE array); NLSD beyond the buffer raises."""
    header = LbaStatusHeader.decode(buf)
    need = HEADER_SIZE + header.nlsd * DESCRIPTOR_SIZE
    if need > len(buf):
        raise ValueError(f"NLSD {header.nlsd} needs {need} bytes, the buffer has {len(buf)}")
    desc = np.frombuffer(bytes(buf[HEADER_SIZE:need]), dtype=DESCRIPTOR_DTYPE)
    return header, desc
