"""Submission and completion queue entries (64-byte SQE, 16-byte CQE).

These are on the hot path of every I/O, so they use precompiled structs and `__slots__`
classes instead of the generic layout machinery in `layout.py`.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from nvme_lm.spec.status import SUCCESS, Status

SQE_SIZE = 64
CQE_SIZE = 16

# dword0 (opc, flags, cid), nsid, cdw2, cdw3, mptr, prp1, prp2, cdw10..cdw15
_SQE = struct.Struct("<BBHIIIQQQ6I")
_CQE = struct.Struct("<IIHHHH")


@dataclass(slots=True)
class SQE:
    """A submission queue entry. `flags` holds FUSE (1:0) and PSDT (7:6) of byte 1."""

    opcode: int = 0
    flags: int = 0
    cid: int = 0
    nsid: int = 0
    cdw2: int = 0
    cdw3: int = 0
    mptr: int = 0
    prp1: int = 0
    prp2: int = 0
    cdw10: int = 0
    cdw11: int = 0
    cdw12: int = 0
    cdw13: int = 0
    cdw14: int = 0
    cdw15: int = 0

    @property
    def fuse(self) -> int:
        return self.flags & 0x3

    @property
    def psdt(self) -> int:
        return (self.flags >> 6) & 0x3

    def encode(self) -> bytes:
        return _SQE.pack(
            self.opcode, self.flags, self.cid, self.nsid, self.cdw2, self.cdw3, self.mptr,
            self.prp1, self.prp2, self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        )

    def pack_into(self, buf: memoryview | bytearray, offset: int = 0) -> None:
        _SQE.pack_into(
            buf, offset, self.opcode, self.flags, self.cid, self.nsid, self.cdw2, self.cdw3, self.mptr,
            self.prp1, self.prp2, self.cdw10, self.cdw11, self.cdw12, self.cdw13, self.cdw14, self.cdw15,
        )

    @classmethod
    def decode(cls, buf: bytes | memoryview, offset: int = 0) -> SQE:
        return cls(*_SQE.unpack_from(buf, offset))


@dataclass(slots=True)
class CQE:
    """A completion queue entry; `status` is the 15-bit status field (without the phase bit)."""

    dw0: int = 0
    dw1: int = 0
    sqhd: int = 0
    sqid: int = 0
    cid: int = 0
    status: int = 0
    phase: int = 0

    @property
    def st(self) -> Status:
        return Status.from_field(self.status)

    @property
    def ok(self) -> bool:
        return (self.status & 0x7FF) == 0

    def encode(self) -> bytes:
        return _CQE.pack(self.dw0, self.dw1, self.sqhd, self.sqid, self.cid, (self.status << 1) | self.phase)

    @classmethod
    def decode(cls, buf: bytes | memoryview, offset: int = 0) -> CQE:
        dw0, dw1, sqhd, sqid, cid, sf = _CQE.unpack_from(buf, offset)
        return cls(dw0, dw1, sqhd, sqid, cid, sf >> 1, sf & 1)


def pack_cqe_into(
    buf: memoryview, offset: int, dw0: int, dw1: int, sqhd: int, sqid: int, cid: int, status: int, phase: int
) -> None:
    """Write a CQE without building an object (the controller's completion path)."""
    _CQE.pack_into(buf, offset, dw0, dw1, sqhd, sqid, cid, (status << 1) | phase)


def unpack_cqe_from(buf: memoryview, offset: int) -> tuple[int, int, int, int, int, int]:
    """(dw0, dw1, sqhd, sqid, cid, status-with-phase) straight from memory (the driver's reap path)."""
    return _CQE.unpack_from(buf, offset)


unpack_sqe_from = _SQE.unpack_from

__all__ = ["CQE", "CQE_SIZE", "SQE", "SQE_SIZE", "SUCCESS", "pack_cqe_into", "unpack_cqe_from", "unpack_sqe_from"]
