"""NVMe over Fabrics commands and structures (opcode 7Fh, Connect data, discovery log): wire formats only.

The Fabrics command puts its type (FCTYPE) in SQE byte 4, where other commands have the NSID; the
command-specific fields sit in CDW10 onwards. The target (fabrics/server.py, device/fabrics_controller.py)
decodes them and the Python initiator (fabrics/initiator.py) encodes them with the same helpers. Offsets
and sources: docs/nvme-tcp.md sections 5 and 7.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum
from typing import NamedTuple

from .commands import SQE
from .layout import Layout, ascii_field, layout, raw, u8, u16, u64
from .status import Status

FABRICS_OPCODE = 0x7F
DISCOVERY_NQN = "nqn.2014-08.org.nvmexpress.discovery"  # the well-known discovery subsystem
CNTLID_DYNAMIC = 0xFFFF  # Connect data CNTLID: "any controller" (dynamic controller model)
CNTLID_MAX = 0xFFEF  # FFF0h-FFFFh are not controller identifiers
CONNECT_DATA_SIZE = 1024
NQN_FIELD = 256  # SUBNQN / HOSTNQN fields: NUL-terminated UTF-8, at most 223 bytes of NQN
NQN_MAX = 223
CATTR_DISABLE_SQ_FLOW = 1 << 2  # Connect CATTR bit 2: the host asks for SQ flow control to be disabled
AUTHREQ_SHIFT = 16  # Connect response DW0 bits 17:16 (authentication required): always 0 here


class FabricsType(IntEnum):
    """FCTYPE (SQE byte 4) of a Fabrics command; bits 1:0 give the data direction like an opcode."""

    PROPERTY_SET = 0x00
    CONNECT = 0x01
    PROPERTY_GET = 0x04
    AUTHENTICATION_SEND = 0x05
    AUTHENTICATION_RECEIVE = 0x06
    DISCONNECT = 0x08


# PEL (byte offset in the SQE) of each Fabrics field, for error log entries and Invalid Parameter IPO
OFF_FCTYPE = 4
OFF_RECFMT = 40
OFF_QID = 42
OFF_SQSIZE = 44
OFF_CATTR = 46
OFF_KATO = 48
OFF_ATTRIB = 40
OFF_OFFSET = 44
OFF_VALUE = 48


def _c(sc: int) -> Status:
    return Status(1, sc)


# Command specific status values of Fabrics commands (SCT 1)
CONNECT_INCOMPATIBLE_FORMAT = _c(0x80)
CONNECT_CONTROLLER_BUSY = _c(0x81)
CONNECT_INVALID_PARAMETERS = _c(0x82)
CONNECT_RESTART_DISCOVERY = _c(0x83)
CONNECT_INVALID_HOST = _c(0x84)
INVALID_QUEUE_TYPE = _c(0x85)
DISCOVER_RESTART = _c(0x90)
AUTHENTICATION_REQUIRED = _c(0x91)


_NAMES = {
    0x80: "Connect Incompatible Format", 0x81: "Connect Controller Busy", 0x82: "Connect Invalid Parameters",
    0x83: "Connect Restart Discovery", 0x84: "Connect Invalid Host", 0x85: "Invalid Queue Type",
    0x90: "Discover Restart", 0x91: "Authentication Required",
}


def status_text(status: Status) -> str:
    """A Fabrics command's status by its Fabrics name (SCT 1 80h-91h mean something else for NVM I/O)."""
    name = _NAMES.get(status.sc) if status.sct == 1 else None
    return f"{name} (SCT 1h SC {status.sc:02x}h)" if name else str(status)


def fctype(sqe: SQE) -> int:
    return sqe.nsid & 0xFF


def connect_ipo(offset: int, in_data: bool) -> int:
    """Connect response DW0 for Invalid Parameters: IPO (offset of the bad field) and IATTR bit 0 (set
    when the offset is in the Connect data rather than the SQE)."""
    return (1 << 16 if in_data else 0) | (offset & 0xFFFF)


class ConnectFields(NamedTuple):
    recfmt: int
    qid: int
    sqsize: int  # 0's based
    cattr: int
    kato: int  # ms; 0 = no keep alive

    @classmethod
    def of(cls, sqe: SQE) -> ConnectFields:
        return cls(sqe.cdw10 & 0xFFFF, sqe.cdw10 >> 16, sqe.cdw11 & 0xFFFF, (sqe.cdw11 >> 16) & 0xFF, sqe.cdw12)


class PropertyFields(NamedTuple):
    attrib: int  # bits 2:0 size: 0 = 4 bytes, 1 = 8 bytes
    offset: int
    value: int  # Property Set only

    @property
    def size(self) -> int | None:
        return {0: 4, 1: 8}.get(self.attrib & 0x7)

    @classmethod
    def of(cls, sqe: SQE) -> PropertyFields:
        return cls(sqe.cdw10 & 0xFF, sqe.cdw11, sqe.cdw12 | sqe.cdw13 << 32)


def _fabrics(cid: int, ftype: int, **kw: int) -> SQE:
    return SQE(opcode=FABRICS_OPCODE, cid=cid, nsid=int(ftype), **kw)


def connect_sqe(cid: int, qid: int, sqsize: int, *, kato: int = 0, cattr: int = 0, recfmt: int = 0) -> SQE:
    """Connect (SQSIZE 0's based); its 1024-byte ConnectData goes in the capsule."""
    return _fabrics(cid, FabricsType.CONNECT, cdw10=(recfmt & 0xFFFF) | qid << 16,
                    cdw11=(sqsize & 0xFFFF) | (cattr & 0xFF) << 16, cdw12=kato)


def property_get_sqe(cid: int, offset: int, size: int = 4) -> SQE:
    return _fabrics(cid, FabricsType.PROPERTY_GET, cdw10=1 if size == 8 else 0, cdw11=offset)


def property_set_sqe(cid: int, offset: int, value: int, size: int = 4) -> SQE:
    return _fabrics(cid, FabricsType.PROPERTY_SET, cdw10=1 if size == 8 else 0, cdw11=offset,
                    cdw12=value & 0xFFFFFFFF, cdw13=value >> 32)


def disconnect_sqe(cid: int) -> SQE:
    return _fabrics(cid, FabricsType.DISCONNECT)


@layout(size=CONNECT_DATA_SIZE)
class ConnectData(Layout):
    """The data of a Connect command. NQNs are NUL-terminated; `decode_nqn` reads them strictly."""

    hostid: bytes = raw(0, 16)
    cntlid: int = u16(16)
    subnqn: str = ascii_field(256, NQN_FIELD, pad="\0")
    hostnqn: str = ascii_field(512, NQN_FIELD, pad="\0")


OFF_DATA_CNTLID = 16
OFF_DATA_SUBNQN = 256
OFF_DATA_HOSTNQN = 512


def decode_nqn(field: bytes | memoryview) -> str | None:
    """The NQN in a 256-byte field, or None when it is empty, not NUL-terminated, too long or not
    printable UTF-8 (a Connect naming such a thing is refused with Invalid Parameters)."""
    raw_bytes = bytes(field)
    end = raw_bytes.find(0)
    if end <= 0 or end > NQN_MAX:
        return None
    try:
        nqn = raw_bytes[:end].decode("utf-8")
    except UnicodeDecodeError:
        return None
    return nqn if nqn.isprintable() else None


# ------------------------------------------------------------------------------------------ discovery
class TrType(IntEnum):
    RDMA = 1
    FC = 2
    TCP = 3
    LOOP = 254


class AdrFam(IntEnum):
    IPV4 = 1
    IPV6 = 2


class SubType(IntEnum):
    REFERRAL = 1  # another discovery service
    NVME = 2  # an NVM subsystem
    CURRENT_DISCOVERY = 3


TREQ_SECURE_CHANNEL_NOT_REQUIRED = 0x02  # bits 1:0 = 10b: no TLS needed (we offer none)
TREQ_DISABLE_SQ_FLOW_SUPPORTED = 0x04  # bit 2: Connect may disable SQ flow control
DISCOVERY_LOG_ID = 0x70
DISCOVERY_ENTRY_SIZE = 1024


@layout(size=1024)
class DiscoveryLogHeader(Layout):
    genctr: int = u64(0)  # changes whenever the log's contents change
    numrec: int = u64(8)
    recfmt: int = u16(16)


@layout(size=DISCOVERY_ENTRY_SIZE)
class DiscoveryLogEntry(Layout):
    """One Discovery Log Page Entry; string fields are ASCII, NUL padded (libnvme also trims spaces)."""

    trtype: int = u8(0)
    adrfam: int = u8(1)
    subtype: int = u8(2)
    treq: int = u8(3)
    portid: int = u16(4)
    cntlid: int = u16(6)
    asqsz: int = u16(8)
    eflags: int = u16(10)
    trsvcid: str = ascii_field(32, 32, pad="\0")
    subnqn: str = ascii_field(256, NQN_FIELD, pad="\0")
    traddr: str = ascii_field(512, 256, pad="\0")
    tsas: bytes = raw(768, 256)  # TCP: byte 0 SECTYPE (0 = no security)


def encode_discovery_log(genctr: int, entries: Sequence[DiscoveryLogEntry]) -> bytes:
    head = DiscoveryLogHeader(genctr=genctr, numrec=len(entries), recfmt=0).encode()
    return head + b"".join(e.encode() for e in entries)


def decode_discovery_log(buf: bytes | bytearray | memoryview) -> tuple[DiscoveryLogHeader, list[DiscoveryLogEntry]]:
    """The header and the entries present in `buf` (a log read in part holds fewer than NUMREC)."""
    head = DiscoveryLogHeader.decode(buf)
    n = min(head.numrec, max(0, (len(buf) - 1024) // DISCOVERY_ENTRY_SIZE))
    return head, [DiscoveryLogEntry.decode(buf, 1024 + i * DISCOVERY_ENTRY_SIZE) for i in range(n)]

