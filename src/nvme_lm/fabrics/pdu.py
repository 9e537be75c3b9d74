"""NVMe/TCP PDU wire formats (PDU format version PFV 0): plain data, encoders, validating decoders.

Every PDU starts with the 8-byte common header (type, flags, HLEN, PDO, PLEN), then the rest of the
PDU header (HLEN bytes in all), an optional header digest, padding up to PDO, data, an optional data
digest. Digests are CRC32C, stored little-endian. Layouts, sources and decisions: docs/nvme-tcp.md.

Encoders return a list of buffers to write in order; a payload is passed through as the caller's
memoryview (never copied). Decoders check every defined field and raise :class:`PduError` carrying
the Fatal Error Status (FES) and Fatal Error Information (FEI) that the receiver must put in its
termination request. Checks that need connection state (transfer tags, limits, sequence) live in
``connection.py``; this module only knows what one PDU can say about itself.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import ClassVar, NamedTuple

import crc32c

from nvme_lm.spec.commands import CQE, CQE_SIZE, SQE, SQE_SIZE

FORMAT_VERSION = 1  # version of this module's decisions (docs/nvme-tcp.md), not a wire field

PFV_1_0 = 0  # the only PDU format version defined
DIGEST_LEN = 4
CH_LEN = 8
IC_LEN = 128  # ICReq / ICResp: HLEN = PLEN = 128
TERM_HLEN = 24
TERM_MAX_DATA = 128  # a TermReq carries at most 128 bytes of the offending PDU header
TERM_MAX_PLEN = TERM_HLEN + TERM_MAX_DATA  # 152
CMD_HLEN = CH_LEN + SQE_SIZE  # 72
RSP_HLEN = CH_LEN + CQE_SIZE  # 24
DATA_HLEN = 24  # H2CData, C2HData
R2T_HLEN = 24
MIN_MAXH2CDATA = 4096  # a host refuses a smaller MAXH2CDATA (and one not a multiple of 4)
MAX_PDA = 31  # HPDA / CPDA: 0's based dwords, so alignment (PDA + 1) * 4 is 4..128 bytes
FABRICS_ICD_MAX = 8192  # in-capsule data a controller accepts on the admin queue and for Fabrics commands
DEFAULT_PORT = 4420
DISCOVERY_PORT = 8009
FABRICS_OPCODE = 0x7F

# common header flags
HDGSTF = 0x01
DDGSTF = 0x02
LAST_PDU = 0x04  # H2CData / C2HData
SUCCESS = 0x08  # C2HData only: the command completed successfully, no CapsuleResp follows

# SGL descriptor identifiers (type << 4 | subtype) the transport uses in SGL1 of a command capsule
SGL_ICD = 0x01  # Data Block, subtype Offset: in-capsule data (offset must be 0)
SGL_TRANSPORT = 0x5A  # Transport SGL Data Block, subtype Transport specific: data moves in C2HData/H2CData

# Byte offsets reported as FEI (offset of the offending field from the start of the PDU)
OFF_TYPE, OFF_FLAGS, OFF_HLEN, OFF_PDO, OFF_PLEN = 0, 1, 2, 3, 4
OFF_IC_PFV, OFF_IC_PDA, OFF_IC_DGST, OFF_IC_MAX = 8, 10, 11, 12
OFF_CMD_CID = CH_LEN + 2  # 10
OFF_CMD_SGL_ADDR = CH_LEN + 24  # 32
OFF_CMD_SGL_LEN = CH_LEN + 32  # 40
OFF_CMD_SGL_ID = CH_LEN + 39  # 47
OFF_RSP_CID = CH_LEN + 12  # 20
OFF_CCCID, OFF_TTAG, OFF_DATAO, OFF_DATAL = 8, 10, 12, 16  # H2CData / C2HData / R2T (R2TO, R2TL)

Buffer = bytes | bytearray | memoryview


class PduType(IntEnum):
    ICREQ = 0x0
    ICRESP = 0x1
    H2C_TERM_REQ = 0x2
    C2H_TERM_REQ = 0x3
    CAPSULE_CMD = 0x4
    CAPSULE_RESP = 0x5
    H2C_DATA = 0x6
    C2H_DATA = 0x7
    R2T = 0x9


class Fes(IntEnum):
    """Fatal Error Status of a termination request."""

    INVALID_HEADER_FIELD = 0x01  # FEI: byte offset of the field
    PDU_SEQUENCE_ERROR = 0x02
    HEADER_DIGEST_ERROR = 0x03  # FEI: the header digest that was received
    DATA_OUT_OF_RANGE = 0x04
    DATA_LIMIT_EXCEEDED = 0x05  # originally "R2T Limit Exceeded"; the kernel header keeps both names
    R2T_LIMIT_EXCEEDED = 0x05
    UNSUPPORTED_PARAMETER = 0x06  # FEI: byte offset of the field


class PduError(Exception):
    """A received PDU breaks the protocol: the receiver must terminate the connection.

    `fes`/`fei` go into the termination request. `silent` means "close without sending one" (a
    termination request with an invalid length is answered by closing the connection).
    """

    def __init__(self, fes: int, fei: int, message: str, *, silent: bool = False) -> None:
        super().__init__(message)
        self.fes = int(fes)
        self.fei = int(fei)
        self.silent = silent


# ------------------------------------------------------------------------------------------ structs
_CH = struct.Struct("<BBBBI")  # type, flags, hlen, pdo, plen
_IC_PSH = struct.Struct("<HBBI112x")  # pfv, hpda|cpda, dgst, maxr2t|maxh2cdata, reserved
_TERM_PSH = struct.Struct("<HI10x")  # fes, fei (unaligned at PDU offset 10), reserved
_DATA_PSH = struct.Struct("<HHII4x")  # cccid, ttag (reserved in C2HData), datao|r2to, datal|r2tl
_DIGEST = struct.Struct("<I")
_SGL = struct.Struct("<QI3xB")  # address, length, reserved, identifier (SQE bytes 24..39)
assert _CH.size == CH_LEN and CH_LEN + _IC_PSH.size == IC_LEN
assert CH_LEN + _TERM_PSH.size == TERM_HLEN and CH_LEN + _DATA_PSH.size == DATA_HLEN

_EXPECTED_HLEN = {
    PduType.ICREQ: IC_LEN,
    PduType.ICRESP: IC_LEN,
    PduType.H2C_TERM_REQ: TERM_HLEN,
    PduType.C2H_TERM_REQ: TERM_HLEN,
    PduType.CAPSULE_CMD: CMD_HLEN,
    PduType.CAPSULE_RESP: RSP_HLEN,
    PduType.H2C_DATA: DATA_HLEN,
    PduType.C2H_DATA: DATA_HLEN,
    PduType.R2T: R2T_HLEN,
}
_VALID_FLAGS = {
    PduType.ICREQ: 0,
    PduType.ICRESP: 0,
    PduType.H2C_TERM_REQ: 0,
    PduType.C2H_TERM_REQ: 0,
    PduType.CAPSULE_CMD: HDGSTF | DDGSTF,
    PduType.CAPSULE_RESP: HDGSTF,
    PduType.H2C_DATA: HDGSTF | DDGSTF | LAST_PDU,
    PduType.C2H_DATA: HDGSTF | DDGSTF | LAST_PDU | SUCCESS,
    PduType.R2T: HDGSTF,
}
_DATA_TYPES = frozenset({PduType.CAPSULE_CMD, PduType.H2C_DATA, PduType.C2H_DATA})
_TERM_TYPES = frozenset({PduType.H2C_TERM_REQ, PduType.C2H_TERM_REQ})
_KNOWN_TYPES = frozenset(int(t) for t in PduType)


def crc32c_of(*buffers: Buffer) -> int:
    """CRC32C (Castagnoli) over the buffers in order, as the digests use it."""
    crc = 0
    for b in buffers:
        crc = crc32c.crc32c(b, crc)
    return crc


def pda_alignment(pda: int) -> int:
    """Bytes of alignment a PDA value (0's based dwords) asks for: 4 .. 128."""
    return (pda + 1) * 4


def receives(ptype: int, *, controller: bool) -> bool:
    """Whether a known PDU type travels towards that side (controller-bound types are even)."""
    return ptype in _KNOWN_TYPES and (ptype & 1) == (0 if controller else 1)


def _view(buf: Buffer) -> memoryview:
    mv = memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


# ------------------------------------------------------------------------------------------ common header
@dataclass(slots=True)
class CommonHeader:
    type: int
    flags: int
    hlen: int
    pdo: int
    plen: int

    @classmethod
    def unpack(cls, buf: Buffer, offset: int = 0) -> CommonHeader:
        return cls(*_CH.unpack_from(buf, offset))

    def pack(self) -> bytes:
        return _CH.pack(self.type, self.flags, self.hlen, self.pdo, self.plen)

    @property
    def full_hlen(self) -> int:
        """Header bytes on the wire: HLEN plus the header digest when HDGSTF is set."""
        return self.hlen + (DIGEST_LEN if self.flags & HDGSTF else 0)


def check_common_header(ch: CommonHeader, *, controller: bool, hdgst: bool, ddgst: bool, rxpda: int) -> int:
    """Validate a common header as the receiving side; return the PDU's data length (digest excluded).

    `hdgst`/`ddgst` are the negotiated digests, `rxpda` the data alignment this side asked for (CPDA
    when `controller`, HPDA otherwise). Fields are checked in order of their offset, so the error
    names the lowest wrong field.
    """
    t = ch.type
    if not receives(t, controller=controller):
        raise PduError(Fes.INVALID_HEADER_FIELD, OFF_TYPE, f"PDU type {t:#x} is not one this side receives")
    expected = _EXPECTED_HLEN[t]
    valid = _VALID_FLAGS[t]
    flags = ch.flags
    plen = ch.plen
    if flags & ~valid:
        raise PduError(Fes.INVALID_HEADER_FIELD, OFF_FLAGS, f"flags {flags:#x} not valid for PDU type {t:#x}")
    if valid & HDGSTF and bool(flags & HDGSTF) != hdgst:
        raise PduError(Fes.INVALID_HEADER_FIELD, OFF_FLAGS, "HDGSTF does not match the negotiated header digest")
    full = expected + (DIGEST_LEN if flags & HDGSTF else 0)
    has_data = plen > full
    if t in _DATA_TYPES:
        if flags & DDGSTF and not (ddgst and has_data):
            raise PduError(Fes.INVALID_HEADER_FIELD, OFF_FLAGS, "DDGSTF set without a negotiated digest or data")
        if ddgst and has_data and not flags & DDGSTF:
            raise PduError(Fes.INVALID_HEADER_FIELD, OFF_FLAGS, "data digest negotiated but DDGSTF clear")
        if flags & SUCCESS and not flags & LAST_PDU:
            raise PduError(Fes.INVALID_HEADER_FIELD, OFF_FLAGS, "SUCCESS without LAST_PDU")
    if ch.hlen != expected:
        raise PduError(Fes.INVALID_HEADER_FIELD, OFF_HLEN, f"HLEN {ch.hlen}, expected {expected}")
    if t in _TERM_TYPES:
        if ch.pdo != 0:
            raise PduError(Fes.INVALID_HEADER_FIELD, OFF_PDO, "PDO of a termination request must be 0")
        if not TERM_HLEN <= plen <= TERM_MAX_PLEN:
            raise PduError(0, OFF_PLEN, f"termination request with PLEN {plen}", silent=True)
        return plen - TERM_HLEN
    if t not in _DATA_TYPES:
        if ch.pdo != 0:
            raise PduError(Fes.INVALID_HEADER_FIELD, OFF_PDO, f"PDO {ch.pdo} in a PDU without data")
        if plen != full:
            raise PduError(Fes.INVALID_HEADER_FIELD, OFF_PLEN, f"PLEN {plen}, expected {full}")
        return 0
    if not has_data:
        if ch.pdo not in (0, full) or ch.pdo % pda_alignment(rxpda):
            raise PduError(Fes.INVALID_HEADER_FIELD, OFF_PDO, f"PDO {ch.pdo} in a PDU without data")
        if plen != full or t != PduType.CAPSULE_CMD:  # H2CData / C2HData always carry data
            raise PduError(Fes.INVALID_HEADER_FIELD, OFF_PLEN, f"PLEN {plen}: no data where data is required")
        return 0
    if ch.pdo < full or ch.pdo > plen or ch.pdo % pda_alignment(rxpda):
        raise PduError(Fes.INVALID_HEADER_FIELD, OFF_PDO, f"PDO {ch.pdo} (header {full}, PDA {rxpda})")
    data_len = plen - ch.pdo - (DIGEST_LEN if flags & DDGSTF else 0)
    if data_len <= 0:
        raise PduError(Fes.INVALID_HEADER_FIELD, OFF_PLEN, f"PLEN {plen} leaves no data after PDO {ch.pdo}")
    return data_len


def check_header_digest(header: Buffer, hlen: int) -> None:
    """Verify the header digest stored after `hlen` header bytes (FEI carries the received digest)."""
    received = _DIGEST.unpack_from(header, hlen)[0]
    if crc32c.crc32c(_view(header)[:hlen]) != received:
        raise PduError(Fes.HEADER_DIGEST_ERROR, received, "header digest mismatch")


# ------------------------------------------------------------------------------------------ PDUs
def _build(
    ptype: int, flags: int, psh: bytes, data: Buffer | None, hdgst: bool, ddgst: bool, pda: int
) -> list[Buffer]:
    """Common header + PDU header (+ header digest, padding) as one bytes, then data, then data digest."""
    hlen = CH_LEN + len(psh)
    full = hlen + (DIGEST_LEN if hdgst else 0)
    n = len(data) if data is not None else 0
    if hdgst:
        flags |= HDGSTF
    if n:
        align = pda_alignment(pda)
        pdo = -(-full // align) * align
        plen = pdo + n + (DIGEST_LEN if ddgst else 0)
        if ddgst:
            flags |= DDGSTF
    else:
        pdo = 0
        plen = full
    head = bytearray(pdo if n else full)
    _CH.pack_into(head, 0, ptype, flags, hlen, pdo, plen)
    head[CH_LEN:hlen] = psh
    if hdgst:
        _DIGEST.pack_into(head, hlen, crc32c.crc32c(memoryview(head)[:hlen]))
    out: list[Buffer] = [bytes(head)]
    if n:
        assert data is not None
        out.append(data)
        if ddgst:
            out.append(_DIGEST.pack(crc32c.crc32c(data)))
    return out


class SglDescriptor(NamedTuple):
    """SGL1 of a command capsule as the transport reads it."""

    address: int
    length: int
    identifier: int  # descriptor type << 4 | subtype

    @property
    def type(self) -> int:
        return self.identifier >> 4

    @property
    def subtype(self) -> int:
        return self.identifier & 0xF


def sgl_fields(length: int, identifier: int, address: int = 0) -> tuple[int, int]:
    """(prp1, prp2) values of an SQE whose SGL1 is this descriptor (the SQE dataclass names them PRPs)."""
    return address, (length & 0xFFFFFFFF) | (identifier << 56)


@dataclass(slots=True)
class IcReq:
    """Initialize Connection Request (host to controller, first PDU on a connection)."""

    TYPE: ClassVar[int] = PduType.ICREQ
    pfv: int = PFV_1_0
    hpda: int = 0
    hdgst: bool = False
    ddgst: bool = False
    maxr2t: int = 0  # 0's based: outstanding R2Ts per command the host accepts, minus one

    def encode(self, *, hdgst: bool = False, ddgst: bool = False, pda: int = 0) -> list[Buffer]:
        dgst = (1 if self.hdgst else 0) | (2 if self.ddgst else 0)
        return _build(self.TYPE, 0, _IC_PSH.pack(self.pfv, self.hpda, dgst, self.maxr2t), None, False, False, 0)


@dataclass(slots=True)
class IcResp:
    """Initialize Connection Response (controller to host)."""

    TYPE: ClassVar[int] = PduType.ICRESP
    pfv: int = PFV_1_0
    cpda: int = 0
    hdgst: bool = False
    ddgst: bool = False
    maxh2cdata: int = 131072  # bytes of data one H2CData PDU may carry

    def encode(self, *, hdgst: bool = False, ddgst: bool = False, pda: int = 0) -> list[Buffer]:
        dgst = (1 if self.hdgst else 0) | (2 if self.ddgst else 0)
        psh = _IC_PSH.pack(self.pfv, self.cpda, dgst, self.maxh2cdata)
        return _build(self.TYPE, 0, psh, None, False, False, 0)


@dataclass(slots=True)
class _TermReq:
    TYPE: ClassVar[int] = 0
    fes: int
    fei: int = 0
    data: bytes = b""  # a copy of the offending PDU header, at most 128 bytes

    def encode(self, *, hdgst: bool = False, ddgst: bool = False, pda: int = 0) -> list[Buffer]:
        # The header copy follows the 24-byte header directly (PDO 0); never digests.
        data = bytes(self.data[:TERM_MAX_DATA])
        head = _CH.pack(self.TYPE, 0, TERM_HLEN, 0, TERM_HLEN + len(data)) + _TERM_PSH.pack(self.fes, self.fei)
        return [head + data]


@dataclass(slots=True)
class H2CTermReq(_TermReq):
    TYPE: ClassVar[int] = PduType.H2C_TERM_REQ


@dataclass(slots=True)
class C2HTermReq(_TermReq):
    TYPE: ClassVar[int] = PduType.C2H_TERM_REQ


@dataclass(slots=True)
class CapsuleCmd:
    """A command capsule: the 64-byte SQE and optional in-capsule data."""

    TYPE: ClassVar[int] = PduType.CAPSULE_CMD
    sqe: SQE
    data: Buffer = b""
    data_digest_ok: bool = True  # set by the decoder

    @property
    def sgl(self) -> SglDescriptor:
        return SglDescriptor(self.sqe.prp1, self.sqe.prp2 & 0xFFFFFFFF, self.sqe.prp2 >> 56)

    def encode(self, *, hdgst: bool = False, ddgst: bool = False, pda: int = 0) -> list[Buffer]:
        return _build(self.TYPE, 0, self.sqe.encode(), self.data, hdgst, ddgst, pda)


@dataclass(slots=True)
class CapsuleResp:
    TYPE: ClassVar[int] = PduType.CAPSULE_RESP
    cqe: CQE

    def encode(self, *, hdgst: bool = False, ddgst: bool = False, pda: int = 0) -> list[Buffer]:
        return _build(self.TYPE, 0, self.cqe.encode(), None, hdgst, False, 0)


@dataclass(slots=True)
class H2CData:
    """Host to controller data answering an R2T (`ttag` echoes the R2T's tag)."""

    TYPE: ClassVar[int] = PduType.H2C_DATA
    cccid: int
    ttag: int
    datao: int
    data: Buffer
    last: bool = False  # last PDU of the R2T's window
    data_digest_ok: bool = True

    def encode(self, *, hdgst: bool = False, ddgst: bool = False, pda: int = 0) -> list[Buffer]:
        psh = _DATA_PSH.pack(self.cccid, self.ttag, self.datao, len(self.data))
        return _build(self.TYPE, LAST_PDU if self.last else 0, psh, self.data, hdgst, ddgst, pda)


@dataclass(slots=True)
class C2HData:
    """Controller to host data of a command; `success` also completes it (no CapsuleResp follows)."""

    TYPE: ClassVar[int] = PduType.C2H_DATA
    cccid: int
    datao: int
    data: Buffer
    last: bool = False  # last PDU of the command's data
    success: bool = False
    data_digest_ok: bool = True

    def encode(self, *, hdgst: bool = False, ddgst: bool = False, pda: int = 0) -> list[Buffer]:
        if self.success and not self.last:
            raise ValueError("SUCCESS requires LAST_PDU")
        flags = (LAST_PDU if self.last else 0) | (SUCCESS if self.success else 0)
        psh = _DATA_PSH.pack(self.cccid, 0, self.datao, len(self.data))
        return _build(self.TYPE, flags, psh, self.data, hdgst, ddgst, pda)


@dataclass(slots=True)
class R2T:
    """Ready to Transfer: the controller asks for bytes [r2to, r2to + r2tl) of a command's data."""

    TYPE: ClassVar[int] = PduType.R2T
    cccid: int
    ttag: int
    r2to: int
    r2tl: int

    def encode(self, *, hdgst: bool = False, ddgst: bool = False, pda: int = 0) -> list[Buffer]:
        return _build(self.TYPE, 0, _DATA_PSH.pack(self.cccid, self.ttag, self.r2to, self.r2tl), None, hdgst, False, 0)


Pdu = IcReq | IcResp | H2CTermReq | C2HTermReq | CapsuleCmd | CapsuleResp | H2CData | C2HData | R2T


def encode_pdu(pdu: Pdu, *, hdgst: bool = False, ddgst: bool = False, pda: int = 0) -> bytes:
    """The PDU as one bytes object (copies the data: for tests and small PDUs)."""
    return b"".join(pdu.encode(hdgst=hdgst, ddgst=ddgst, pda=pda))


# ------------------------------------------------------------------------------------------ decoding
def _check_sgl(sgl: SglDescriptor, data_len: int) -> None:
    """SGL1 of a command capsule must agree with the in-capsule data actually present."""
    if data_len:
        if sgl.identifier != SGL_ICD:
            if sgl.identifier == SGL_TRANSPORT:
                raise PduError(Fes.INVALID_HEADER_FIELD, OFF_PLEN, "in-capsule data with a transport SGL")
            raise PduError(Fes.UNSUPPORTED_PARAMETER, OFF_CMD_SGL_ID, f"SGL identifier {sgl.identifier:#x}")
        if sgl.address != 0:
            raise PduError(Fes.UNSUPPORTED_PARAMETER, OFF_CMD_SGL_ADDR, "in-capsule data offset must be 0")
        if sgl.length != data_len:
            raise PduError(
                Fes.INVALID_HEADER_FIELD, OFF_PLEN, f"{data_len} bytes in capsule, SGL says {sgl.length}"
            )
    elif sgl.length:
        if sgl.identifier == SGL_ICD:
            raise PduError(Fes.INVALID_HEADER_FIELD, OFF_PLEN, f"SGL promises {sgl.length} in-capsule bytes, none sent")
        if sgl.identifier != SGL_TRANSPORT:
            raise PduError(Fes.UNSUPPORTED_PARAMETER, OFF_CMD_SGL_ID, f"SGL identifier {sgl.identifier:#x}")


def decode_header(buf: Buffer, ch: CommonHeader, data_len: int) -> Pdu:
    """The PDU described by a validated common header, from its header bytes (data left empty).

    Checks the PDU-specific header fields; `data_len` is what `check_common_header` returned.
    """
    t = ch.type
    if t in (PduType.ICREQ, PduType.ICRESP):
        pfv, pda, dgst, value = _IC_PSH.unpack_from(buf, CH_LEN)
        if pfv != PFV_1_0:
            raise PduError(Fes.INVALID_HEADER_FIELD, OFF_IC_PFV, f"PFV {pfv} not supported")
        if pda > MAX_PDA:
            raise PduError(Fes.INVALID_HEADER_FIELD, OFF_IC_PDA, f"PDA {pda} above {MAX_PDA}")
        if t == PduType.ICREQ:
            return IcReq(pfv, pda, bool(dgst & 1), bool(dgst & 2), value)
        if value < MIN_MAXH2CDATA or value % 4:
            raise PduError(Fes.INVALID_HEADER_FIELD, OFF_IC_MAX, f"MAXH2CDATA {value}")
        return IcResp(pfv, pda, bool(dgst & 1), bool(dgst & 2), value)
    if t == PduType.CAPSULE_CMD:
        cmd = CapsuleCmd(SQE.decode(buf, CH_LEN))
        _check_sgl(cmd.sgl, data_len)
        return cmd
    if t == PduType.CAPSULE_RESP:
        return CapsuleResp(CQE.decode(buf, CH_LEN))
    if t in (PduType.H2C_DATA, PduType.C2H_DATA, PduType.R2T):
        cccid, ttag, offset, length = _DATA_PSH.unpack_from(buf, CH_LEN)
        if t == PduType.R2T:
            if length == 0:
                raise PduError(Fes.INVALID_HEADER_FIELD, OFF_DATAL, "R2TL of 0")
            return R2T(cccid, ttag, offset, length)
        if length != data_len:
            raise PduError(Fes.INVALID_HEADER_FIELD, OFF_DATAL, f"DATAL {length}, PDU carries {data_len}")
        if t == PduType.H2C_DATA:
            return H2CData(cccid, ttag, offset, b"", bool(ch.flags & LAST_PDU))
        return C2HData(cccid, offset, b"", bool(ch.flags & LAST_PDU), bool(ch.flags & SUCCESS))
    fes, fei = _TERM_PSH.unpack_from(buf, CH_LEN)
    return H2CTermReq(fes, fei) if t == PduType.H2C_TERM_REQ else C2HTermReq(fes, fei)


def attach_data(pdu: Pdu, ch: CommonHeader, buf: memoryview, data_len: int) -> None:
    """Point a decoded PDU at its data inside the whole-PDU buffer `buf` and verify the data digest."""
    if isinstance(pdu, _TermReq):
        pdu.data = bytes(buf[TERM_HLEN : ch.plen])
        return
    if not data_len or not isinstance(pdu, CapsuleCmd | H2CData | C2HData):
        return
    data = buf[ch.pdo : ch.pdo + data_len]
    pdu.data = data
    if ch.flags & DDGSTF:
        received = _DIGEST.unpack_from(buf, ch.pdo + data_len)[0]
        pdu.data_digest_ok = crc32c.crc32c(data) == received


def decode_pdu(buf: Buffer, *, controller: bool, hdgst: bool = False, ddgst: bool = False, rxpda: int = 0) -> Pdu:
    """Decode one whole PDU (exactly PLEN bytes) as the receiving side, checking everything it says.

    A data digest mismatch is not fatal (the command fails, the connection lives): it shows as
    `data_digest_ok=False` on the returned PDU.
    """
    mv = _view(buf)
    if len(mv) < CH_LEN:
        raise PduError(Fes.INVALID_HEADER_FIELD, OFF_PLEN, f"{len(mv)} bytes: shorter than a common header")
    ch = CommonHeader.unpack(mv)
    data_len = check_common_header(ch, controller=controller, hdgst=hdgst, ddgst=ddgst, rxpda=rxpda)
    if len(mv) != ch.plen:
        raise PduError(Fes.INVALID_HEADER_FIELD, OFF_PLEN, f"PLEN {ch.plen} but {len(mv)} bytes given")
    if ch.flags & HDGSTF:
        check_header_digest(mv, ch.hlen)
    pdu = decode_header(mv, ch, data_len)
    attach_data(pdu, ch, mv, data_len)
    return pdu


def split(data: Buffer, piece: int) -> Sequence[memoryview]:
    """Zero-copy slices of at most `piece` bytes."""
    mv = _view(data)
    return [mv[i : i + piece] for i in range(0, len(mv), piece)]


__all__ = [
    "CH_LEN",
    "CMD_HLEN",
    "DATA_HLEN",
    "DDGSTF",
    "DIGEST_LEN",
    "FABRICS_ICD_MAX",
    "FABRICS_OPCODE",
    "FORMAT_VERSION",
    "HDGSTF",
    "IC_LEN",
    "LAST_PDU",
    "MAX_PDA",
    "MIN_MAXH2CDATA",
    "PFV_1_0",
    "R2T",
    "RSP_HLEN",
    "SGL_ICD",
    "SGL_TRANSPORT",
    "SUCCESS",
    "TERM_HLEN",
    "TERM_MAX_DATA",
    "TERM_MAX_PLEN",
    "Buffer",
    "C2HData",
    "C2HTermReq",
    "CapsuleCmd",
    "CapsuleResp",
    "CommonHeader",
    "Fes",
    "H2CData",
    "H2CTermReq",
    "IcReq",
    "IcResp",
    "Pdu",
    "PduError",
    "PduType",
    "SglDescriptor",
    "attach_data",
    "check_common_header",
    "check_header_digest",
    "crc32c_of",
    "decode_header",
    "decode_pdu",
    "encode_pdu",
    "pda_alignment",
    "receives",
    "sgl_fields",
    "split",
]
