"""Exported NVM subsystems (Base 2.4, TP4193): command dwords and data structures, wire formats only.

Command dwords follow spec notes §17.2. Where no public source gives a layout (the data buffers of
the list selects, the controller association list, the template UUID list and the exported
configuration state) the layouts are ours and are documented in docs/exported-subsystems.md; they
are marked [D] below. Both the device (to decode) and the host driver (to encode) use this module.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from enum import IntEnum

from .layout import Layout, array, ascii_field, layout, raw, u8, u16, u32, u64

__all__ = [
    "CONFIG_STATE_MAGIC",
    "CONFIG_STATE_VERSION",
    "CREATE_TR",
    "ESUBIDV",
    "ESUBNQN_SIZE",
    "EXPORTED_NS_BUFFER_SIZE",
    "MOS_DISASSOCIATE",
    "ConfigState",
    "ConfigStateError",
    "ExportedControllerEntry",
    "ExportedControllerList",
    "ExportedNamespaceEntry",
    "ExportedNamespaceList",
    "ExportedNsAssociation",
    "ExportedNsSel",
    "ExportedSubsystemEntry",
    "ExportedSubsystemList",
    "ReceiveSel",
    "SendSel",
    "StateController",
    "StateNamespace",
    "TemplateUuidList",
    "decode_controller_pairs",
    "encode_controller_pairs",
    "error_location",
    "mgmt_cdw10",
]

ESUBNQN_SIZE = 256
CREATE_TR = 1 << 31  # Receive SEL 00h CDW11: a template is required (ENSTI is valid)
ESUBIDV = 1 << 7  # Send / Manage Exported Namespace CDW14: the ESUBID field (31:16) is valid
MOS_DISASSOCIATE = 1 << 0  # [D] Send SEL 05h MOS bit 0: remove the listed associations instead
EXPORTED_NS_BUFFER_SIZE = 1024  # [D] Manage Exported Namespace data buffer


class ReceiveSel(IntEnum):
    """Manage Exported NVM Subsystem Receive (2Ah) CDW10.SEL."""

    CREATE = 0x00
    LIST_SUBSYSTEMS = 0x01
    LIST_NAMESPACES = 0x02
    LIST_CONTROLLERS = 0x03
    LIST_PORTS = 0x04
    GET_CONFIG_STATE = 0x05


class SendSel(IntEnum):
    """Manage Exported NVM Subsystem Send (2Dh) CDW10.SEL."""

    DELETE = 0x01
    CHANGE_ACCESS_MODE = 0x02
    GRANT_HOST_ACCESS = 0x03
    REVOKE_HOST_ACCESS = 0x04
    ASSOCIATE_CONTROLLERS = 0x05
    SET_CONFIG_STATE = 0x06


class ExportedNsSel(IntEnum):
    """Manage Exported Namespace (31h) CDW10.SEL."""

    ASSOCIATE = 0x01
    DISASSOCIATE = 0x02


def mgmt_cdw10(sel: int, mos: int = 0, mose: int = 0) -> int:
    """CDW10 of 2Ah / 2Dh / 31h: SEL 7:0, MOS 15:8, MOSE 31:16."""
    return (sel & 0xFF) | (mos & 0xFF) << 8 | (mose & 0xFFFF) << 16


def error_location(dwloc: int, bitloc: int = 0) -> int:
    """CQE DW0 of status 44h: DWLOC 26:0 (dword of the offending field), BITLOC 31:27."""
    return (dwloc & 0x7FFFFFF) | (bitloc & 0x1F) << 27


# --------------------------------------------------------------------------------------------- CNS 22h
@layout(size=32)
class TemplateUuidEntry(Layout):
    """[D] One template, shaped like a UUID List (CNS 17h) entry: the UUID in bytes 31:16."""

    uuid: bytes = raw(16, 16)


@layout(size=4096)
class TemplateUuidList(Layout):
    """[D] Exported NVM Subsystem Template UUID List (CNS 22h): 32 reserved bytes, then up to 127
    entries; the list ends at the first all-zero UUID. ENSTI is an entry's 0-based index."""

    entries: list[TemplateUuidEntry] = array(32, TemplateUuidEntry, 127)

    @classmethod
    def of(cls, uuids: Sequence[uuidlib.UUID]) -> TemplateUuidList:
        if len(uuids) > 127:
            raise ValueError("at most 127 templates")
        return cls(entries=[TemplateUuidEntry(uuid=u.bytes) for u in uuids])

    @property
    def uuids(self) -> list[uuidlib.UUID]:
        out = []
        for e in self.entries:
            if e.uuid == bytes(16):
                break
            out.append(uuidlib.UUID(bytes=e.uuid))
        return out


# --------------------------------------------------------------------------------------------- Receive lists
@layout(size=64)
class ExportedSubsystemEntry(Layout):
    """[D] Receive SEL 01h entry."""

    esubid: int = u16(0)
    nctrl: int = u16(2)  # exported controllers (associated or reserved by a configuration state)
    nns: int = u16(4)  # exported namespaces (associated or reserved)
    actrl: int = u16(6)  # of them associated with an underlying controller
    ans: int = u16(8)  # of them associated with an underlying namespace
    template: bytes = raw(16, 16)  # template UUID
    sn: str = ascii_field(32, 20)


@layout(size=4096)
class ExportedSubsystemList(Layout):
    """[D] Receive SEL 01h: u16 count, then up to 63 entries with ESUBID >= MOSI."""

    num: int = u16(0)
    entries: list[ExportedSubsystemEntry] = array(64, ExportedSubsystemEntry, 63)

    @property
    def active(self) -> list[ExportedSubsystemEntry]:
        return self.entries[: self.num]


@layout(size=32)
class ExportedNamespaceEntry(Layout):
    """[D] Receive SEL 02h entry; UNSID 0 = reserved by a configuration state, not associated."""

    ensid: int = u32(0)
    unsid: int = u32(4)
    nsze: int = u64(8)
    lbads: int = u8(16)


@layout(size=4096)
class ExportedNamespaceList(Layout):
    """[D] Receive SEL 02h (MOSI = ESUBID): u16 count, then up to 127 entries."""

    num: int = u16(0)
    entries: list[ExportedNamespaceEntry] = array(32, ExportedNamespaceEntry, 127)

    @property
    def active(self) -> list[ExportedNamespaceEntry]:
        return self.entries[: self.num]


NO_CONTROLLER = 0xFFFF


@layout(size=4)
class ExportedControllerEntry(Layout):
    """[D] Receive SEL 03h entry; CNTLID FFFFh = reserved by a configuration state, not associated."""

    ecntlid: int = u16(0)
    cntlid: int = u16(2)


@layout(size=4096)
class ExportedControllerList(Layout):
    """[D] Receive SEL 03h (MOSI = ESUBID): u16 count, then up to 1023 entries."""

    num: int = u16(0)
    entries: list[ExportedControllerEntry] = array(4, ExportedControllerEntry, 1023)

    @property
    def active(self) -> list[ExportedControllerEntry]:
        return self.entries[: self.num]


# --------------------------------------------------------------------------------------------- Send 05h
_PAIR = struct.Struct("<HH")
MAX_PAIRS = 1023


def encode_controller_pairs(pairs: Sequence[tuple[int, int]]) -> bytes:
    """[D] Send SEL 05h data: u16 count, 2 reserved bytes, then {CNTLID u16, ECNTLID u16} pairs."""
    if len(pairs) > MAX_PAIRS:
        raise ValueError(f"at most {MAX_PAIRS} pairs")
    out = bytearray(4 + 4 * len(pairs))
    struct.pack_into("<H", out, 0, len(pairs))
    for i, (cntlid, ecntlid) in enumerate(pairs):
        _PAIR.pack_into(out, 4 + 4 * i, cntlid, ecntlid)
    return bytes(out)


def decode_controller_pairs(buf: bytes | bytearray | memoryview) -> list[tuple[int, int]]:
    """The pairs of a Send SEL 05h buffer; ValueError if the count runs past the buffer."""
    if len(buf) < 4:
        raise ValueError("controller pair list shorter than its header")
    (n,) = struct.unpack_from("<H", buf, 0)
    if n > MAX_PAIRS or 4 + 4 * n > len(buf):
        raise ValueError(f"{n} controller pairs do not fit in {len(buf)} bytes")
    return [_PAIR.unpack_from(buf, 4 + 4 * i) for i in range(n)]


# --------------------------------------------------------------------------------------------- 31h
@layout(size=EXPORTED_NS_BUFFER_SIZE)
class ExportedNsAssociation(Layout):
    """[D] Manage Exported Namespace data (order of fields per spec notes §17.2). On PCIe the NQNs
    are not used; UCTRLID is ignored (an exported namespace serves every exported controller)."""

    ensid: int = u32(32)
    ensnqn: str = ascii_field(36, 256, pad="\0")
    unsid: int = u32(292)
    uctrlid: int = u16(296)
    unsnqn: str = ascii_field(300, 256, pad="\0")


# --------------------------------------------------------------------------------------------- configuration state
CONFIG_STATE_MAGIC = b"NLES"
CONFIG_STATE_VERSION = 1
_HEADER = struct.Struct("<4sHHII16sHH28x")  # 64 bytes
_NQN_OFF, _SN_OFF, _BODY_OFF = 64, 320, 352
_CTRL = struct.Struct("<H14x")  # 16 bytes
_NS = struct.Struct("<I4xQB7x16s8s16s")  # 64 bytes
_NS_FIELD_DW = {"ensid": 0, "nsze": 2, "lbads": 4, "nguid": 6, "eui64": 10, "uuid": 12}


class ConfigStateError(ValueError):
    """A configuration state blob is not acceptable; `dwloc`/`bitloc` locate the offending field."""

    def __init__(self, message: str, dwloc: int, bitloc: int = 0) -> None:
        super().__init__(f"{message} (dword {dwloc}, bit {bitloc})")
        self.dwloc = dwloc
        self.bitloc = bitloc

    @property
    def dw0(self) -> int:
        return error_location(self.dwloc, self.bitloc)


@dataclass(frozen=True)
class StateController:
    ecntlid: int


@dataclass(frozen=True)
class StateNamespace:
    ensid: int
    nsze: int
    lbads: int
    nguid: bytes
    eui64: bytes
    uuid: bytes


@dataclass(frozen=True)
class ConfigState:
    """[D] Exported configuration state, version 1: everything a destination needs to present the
    same exported NVM subsystem (no underlying identifiers). Layout, little endian:

    header (64 B): 0 magic "NLES", 4 u16 version, 6 u16 header size (64), 8 u32 total size,
    12 u32 CRC-32 of the whole blob with this field zero, 16 template UUID, 32 u16 controllers,
    34 u16 namespaces, 36-63 reserved (zero). 64: ESUBNQN (256, NUL padded), 320: SN (20, space
    padded), 340-351 reserved. 352: 16-byte controller entries {u16 ECNTLID, 14 reserved}, then
    64-byte namespace entries {u32 ENSID, 4 rsvd, u64 NSZE, u8 LBADS, 7 rsvd, NGUID 16, EUI64 8, UUID 16}.
    """

    template: uuidlib.UUID
    nqn: str
    serial: str
    controllers: tuple[StateController, ...] = field(default_factory=tuple)
    namespaces: tuple[StateNamespace, ...] = field(default_factory=tuple)

    @property
    def size(self) -> int:
        return _BODY_OFF + _CTRL.size * len(self.controllers) + _NS.size * len(self.namespaces)

    def encode(self) -> bytes:
        size = self.size
        out = bytearray(size)
        _HEADER.pack_into(out, 0, CONFIG_STATE_MAGIC, CONFIG_STATE_VERSION, _HEADER.size, size, 0,
                          self.template.bytes, len(self.controllers), len(self.namespaces))
        nqn = self.nqn.encode("ascii")
        if len(nqn) >= ESUBNQN_SIZE:
            raise ValueError("ESUBNQN longer than 255 bytes")
        out[_NQN_OFF : _NQN_OFF + len(nqn)] = nqn
        out[_SN_OFF : _SN_OFF + 20] = self.serial.encode("ascii").ljust(20, b" ")[:20]
        pos = _BODY_OFF
        for c in self.controllers:
            _CTRL.pack_into(out, pos, c.ecntlid)
            pos += _CTRL.size
        for n in self.namespaces:
            _NS.pack_into(out, pos, n.ensid, n.nsze, n.lbads, n.nguid, n.eui64, n.uuid)
            pos += _NS.size
        struct.pack_into("<I", out, 12, zlib.crc32(out))
        return bytes(out)

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview) -> ConfigState:
        """Structural checks only (magic, version, sizes, CRC, reserved bytes, string fields);
        what the values mean on a device is the device's to check. Raises ConfigStateError."""
        mv = memoryview(buf)
        if len(mv) < _HEADER.size:
            raise ConfigStateError(f"truncated: {len(mv)} bytes, the header alone is 64", len(mv) // 4)
        magic, version, hsize, size, crc, tmpl, nctrl, nns = _HEADER.unpack_from(mv, 0)
        if magic != CONFIG_STATE_MAGIC:
            raise ConfigStateError(f"bad magic {bytes(magic)!r}", 0)
        if version != CONFIG_STATE_VERSION:
            raise ConfigStateError(f"version {version} not supported (only {CONFIG_STATE_VERSION})", 1)
        if hsize != _HEADER.size:
            raise ConfigStateError(f"header size {hsize}, expected {_HEADER.size}", 1, 16)
        want = _BODY_OFF + _CTRL.size * nctrl + _NS.size * nns
        if size != want:
            raise ConfigStateError(f"size {size} does not match {nctrl} controllers and {nns} namespaces "
                                   f"({want} bytes)", 2)
        if len(mv) < size:
            raise ConfigStateError(f"truncated: {len(mv)} of {size} bytes", len(mv) // 4)
        blob = bytearray(mv[:size])
        blob[12:16] = bytes(4)
        if zlib.crc32(blob) != crc:
            raise ConfigStateError("CRC-32 mismatch", 3)
        for dw in (*range(9, 16), *range(85, 88)):  # reserved bytes 36-63 and 340-351
            if any(blob[4 * dw : 4 * dw + 4]):
                raise ConfigStateError("reserved field not zero", dw)
        raw_nqn = bytes(blob[_NQN_OFF : _NQN_OFF + ESUBNQN_SIZE])
        nqn, _, rest = raw_nqn.partition(b"\0")
        if not nqn or any(rest) or not _printable(nqn):
            raise ConfigStateError("ESUBNQN is not a NUL-terminated printable string", _NQN_OFF // 4)
        raw_sn = bytes(blob[_SN_OFF : _SN_OFF + 20])
        if not _printable(raw_sn) or not raw_sn.strip():
            raise ConfigStateError("SN is not printable ASCII", _SN_OFF // 4)
        pos = _BODY_OFF
        ctrls = []
        for _ in range(nctrl):
            (ecntlid,) = _CTRL.unpack_from(blob, pos)
            if any(blob[pos + 2 : pos + 16]):
                raise ConfigStateError("reserved field not zero", pos // 4, 16)
            ctrls.append(StateController(ecntlid))
            pos += _CTRL.size
        nss = []
        for _ in range(nns):
            ensid, nsze, lbads, nguid, eui64, nuuid = _NS.unpack_from(blob, pos)
            if any(blob[pos + 4 : pos + 8]):
                raise ConfigStateError("reserved field not zero", pos // 4 + 1)
            if any(blob[pos + 17 : pos + 24]):
                raise ConfigStateError("reserved field not zero", pos // 4 + 4, 8)
            nss.append(StateNamespace(ensid, nsze, lbads, nguid, eui64, nuuid))
            pos += _NS.size
        return cls(uuidlib.UUID(bytes=tmpl), nqn.decode("ascii"), raw_sn.decode("ascii").rstrip(" "),
                   tuple(ctrls), tuple(nss))

    # where each field lives, for the device's semantic errors
    TEMPLATE_DWORD = 4
    NQN_DWORD = _NQN_OFF // 4
    SN_DWORD = _SN_OFF // 4

    def controller_dword(self, index: int) -> int:
        return (_BODY_OFF + _CTRL.size * index) // 4

    def namespace_dword(self, index: int, name: str = "ensid") -> int:
        return (_BODY_OFF + _CTRL.size * len(self.controllers) + _NS.size * index) // 4 + _NS_FIELD_DW[name]


def _printable(b: bytes) -> bool:
    return all(0x20 <= c < 0x7F for c in b)
