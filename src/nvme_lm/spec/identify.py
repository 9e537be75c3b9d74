"""Identify data structures (admin opcode 06h): wire formats only.

Offsets follow NVMe Base 2.1 / NVM Command Set 1.2 as captured in the project spec notes (sections 2, 18,
20) and cross-checked against libnvme's ``struct nvme_id_ctrl`` & co. Field names are the spec's
acronyms in lower case so they can be grepped against the specification.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from enum import IntEnum, IntFlag

from .layout import Layout, array, ascii_field, bit, bits, layout, raw, u8, u16, u32, u64, u128, uint

__all__ = [
    "AOCS",
    "CMIC",
    "CNS",
    "CRT",
    "CTRL_LIST_MAX",
    "IDENTIFY_SIZE",
    "NID_LENGTHS",
    "NSID_LIST_MAX",
    "OACS",
    "ONCS",
    "SECONDARY_CTRL_MAX",
    "TRATTR",
    "IdentifyController",
    "IdentifyNamespace",
    "LbaFormat",
    "NidType",
    "NvmIdentifyController",
    "NvmIdentifyNamespace",
    "PowerStateDescriptor",
    "PrimaryControllerCapabilities",
    "SecondaryControllerEntry",
    "SecondaryControllerList",
    "decode_ctrl_list",
    "decode_ns_descs",
    "decode_nsid_list",
    "encode_ctrl_list",
    "encode_ns_descs",
    "encode_nsid_list",
]

IDENTIFY_SIZE = 4096
NSID_LIST_MAX = 1024
CTRL_LIST_MAX = 2047
SECONDARY_CTRL_MAX = 127


class CNS(IntEnum):
    """Identify CDW10.CNS values (spec notes §20.6)."""

    NS = 0x00
    CTRL = 0x01
    NS_ACTIVE_LIST = 0x02
    NS_DESC_LIST = 0x03
    NVMSET_LIST = 0x04
    CSI_NS = 0x05
    CSI_CTRL = 0x06
    CSI_NS_ACTIVE_LIST = 0x07
    CSI_INDEPENDENT_NS = 0x08
    NS_USER_DATA_FORMAT = 0x09
    CSI_NS_USER_DATA_FORMAT = 0x0A
    ALLOCATED_NS_LIST = 0x10
    ALLOCATED_NS = 0x11
    NS_CTRL_LIST = 0x12
    CTRL_LIST = 0x13
    PRIMARY_CTRL_CAPS = 0x14
    SECONDARY_CTRL_LIST = 0x15
    NS_GRANULARITY = 0x16
    UUID_LIST = 0x17
    DOMAIN_LIST = 0x18
    ENDURANCE_GROUP_LIST = 0x19
    CSI_ALLOCATED_NS_LIST = 0x1A
    CSI_ALLOCATED_NS = 0x1B
    COMMAND_SET_STRUCTURE = 0x1C
    UNDERLYING_NS_LIST = 0x1D
    PORTS_LIST = 0x1E
    CSI_INDEPENDENT_ALLOCATED_NS = 0x1F
    SUPPORTED_CTRL_STATE_FORMATS = 0x20  # [!] spec prose says 21h; every implementation uses 20h
    UNDERLYING_CTRL_LIST = 0x21  # Base 2.4
    EXPORTED_TEMPLATE_UUID_LIST = 0x22  # Base 2.4


class OACS(IntFlag):
    """Identify Controller OACS (bytes 257:256) bits."""

    SSRS = 1 << 0
    FORMAT = 1 << 1
    FW = 1 << 2
    NS_MGMT = 1 << 3
    SELF_TEST = 1 << 4
    DIRECTIVES = 1 << 5
    MI = 1 << 6
    VMS = 1 << 7  # Virtualization Management
    DBBUF = 1 << 8
    GET_LBA_STATUS = 1 << 9
    LOCKDOWN = 1 << 10
    HMLMS = 1 << 11  # Host Managed Live Migration: this controller is an MMC


class ONCS(IntFlag):
    """Identify Controller ONCS (bytes 521:520) bits."""

    COMPARE = 1 << 0
    WRITE_UNCORRECTABLE = 1 << 1
    DSM = 1 << 2
    WRITE_ZEROES = 1 << 3
    SAVE_SELECT = 1 << 4
    RESERVATIONS = 1 << 5
    TIMESTAMP = 1 << 6
    VERIFY = 1 << 7
    COPY = 1 << 8


class CMIC(IntFlag):
    """Identify Controller CMIC (byte 76) bits."""

    MULTI_PORT = 1 << 0
    MULTI_CTRL = 1 << 1
    SRIOV_VF = 1 << 2  # the controller is associated with an SR-IOV virtual function
    ANA = 1 << 3


class TRATTR(IntFlag):
    """Identify Controller TRATTR (byte 576) bits (TP4159)."""

    THMCS = 1 << 0  # Track Host Memory Changes supported
    TUDCS = 1 << 1  # Track User Data Changes supported
    MRTLL = 1 << 2  # Memory Range Tracking Length Limit


class CRT(IntFlag):
    """Primary Controller Capabilities CRT (byte 4): resource types supported."""

    VQ = 1 << 0
    VI = 1 << 1


class AOCS(IntFlag):
    """NVM I/O-CS Identify Controller AOCS (bytes 19:18)."""

    RALBAS = 1 << 0  # Get LBA Status ATYPE 02h (tracked allocated LBAs, TP4165)


# --------------------------------------------------------------------------------------------- CNS 01h
@layout(size=32)
class PowerStateDescriptor(Layout):
    """One of the 32 Power State Descriptors at Identify Controller byte 2048."""

    mp: int = u16(0)  # Maximum Power, centiwatts (or 0.0001 W if MXPS)
    flags: int = u8(3)  # bit0 MXPS, bit1 NOPS
    enlat: int = u32(4)  # Entry Latency, µs
    exlat: int = u32(8)  # Exit Latency, µs
    rrt: int = u8(12)  # Relative Read Throughput (4:0)
    rrl: int = u8(13)  # Relative Read Latency (4:0)
    rwt: int = u8(14)  # Relative Write Throughput (4:0)
    rwl: int = u8(15)  # Relative Write Latency (4:0)
    idlp: int = u16(16)  # Idle Power
    ips: int = u8(18)  # Idle Power Scale (7:6)
    actp: int = u16(20)  # Active Power
    apws: int = u8(22)  # Active Power Workload (2:0) and Active Power Scale (7:6)

    @property
    def max_power_scale(self) -> bool:
        """MXPS: MP is in 0.0001 W units instead of 0.01 W."""
        return bit(self.flags, 0)

    @property
    def non_operational(self) -> bool:
        """NOPS: no I/O commands are processed in this state."""
        return bit(self.flags, 1)

    @property
    def idle_scale(self) -> int:
        return bits(self.ips, 6, 7)

    @property
    def active_power_workload(self) -> int:
        return bits(self.apws, 0, 2)

    @property
    def active_scale(self) -> int:
        return bits(self.apws, 6, 7)


@layout(size=IDENTIFY_SIZE)
class IdentifyController(Layout):
    """Identify Controller data structure (CNS 01h), incl. the TP4159 live-migration fields 570-587."""

    vid: int = u16(0)
    ssvid: int = u16(2)
    sn: str = ascii_field(4, 20)
    mn: str = ascii_field(24, 40)
    fr: str = ascii_field(64, 8)
    rab: int = u8(72)
    ieee: int = uint(73, 3)  # IEEE OUI, little-endian 24-bit
    cmic: int = u8(76)
    mdts: int = u8(77)  # 2^n * CAP.MPSMIN; 0 = no limit
    cntlid: int = u16(78)
    ver: int = u32(80)
    rtd3r: int = u32(84)
    rtd3e: int = u32(88)
    oaes: int = u32(92)
    ctratt: int = u32(96)
    rrls: int = u16(100)
    bpcap: int = u8(102)
    chsi: int = u8(103)
    nssl: int = u32(104)
    plsi: int = u8(110)
    cntrltype: int = u8(111)  # 1 I/O, 2 discovery, 3 administrative
    fguid: bytes = raw(112, 16)
    crdt1: int = u16(128)
    crdt2: int = u16(130)
    crdt3: int = u16(132)
    crcap: int = u8(134)
    ciu: int = u8(135)
    cirn: int = u64(136)
    nvmsr: int = u8(253)
    vwci: int = u8(254)
    mec: int = u8(255)
    oacs: int = u16(256)
    acl: int = u8(258)
    aerl: int = u8(259)
    frmw: int = u8(260)
    lpa: int = u8(261)
    elpe: int = u8(262)
    npss: int = u8(263)
    avscc: int = u8(264)
    apsta: int = u8(265)
    wctemp: int = u16(266)
    cctemp: int = u16(268)
    mtfa: int = u16(270)
    hmpre: int = u32(272)
    hmmin: int = u32(276)
    tnvmcap: int = u128(280)
    unvmcap: int = u128(296)
    rpmbs: int = u32(312)
    edstt: int = u16(316)
    dsto: int = u8(318)
    fwug: int = u8(319)
    kas: int = u16(320)
    hctma: int = u16(322)
    mntmt: int = u16(324)
    mxtmt: int = u16(326)
    sanicap: int = u32(328)
    hmminds: int = u32(332)
    hmmaxd: int = u16(336)
    nsetidmax: int = u16(338)
    endgidmax: int = u16(340)
    anatt: int = u8(342)
    anacap: int = u8(343)
    anagrpmax: int = u32(344)
    nanagrpid: int = u32(348)
    pels: int = u32(352)
    domainid: int = u16(356)
    kpioc: int = u8(358)
    mptfawr: int = u16(360)
    rmdca: int = u8(362)
    megcap: int = u128(368)
    tmpthha: int = u8(384)
    cqt: int = u16(386)
    sqes: int = u8(512)  # 3:0 required, 7:4 maximum, as log2(bytes)
    cqes: int = u8(513)
    maxcmd: int = u16(514)
    nn: int = u32(516)
    oncs: int = u16(520)
    fuses: int = u16(522)
    fna: int = u8(524)
    vwc: int = u8(525)
    awun: int = u16(526)
    awupf: int = u16(528)
    icsvscc: int = u8(530)
    nwpc: int = u8(531)
    acwu: int = u16(532)
    ocfs: int = u16(534)
    sgls: int = u32(536)
    mnan: int = u32(540)
    maxdna: int = u128(544)
    maxcna: int = u32(560)
    oaqd: int = u32(564)
    rhiri: int = u8(568)
    hirt: int = u8(569)
    # TP4159 Host Managed Live Migration (spec notes §2.1)
    cmmrtd: int = u16(570)
    nmmrtd: int = u16(572)
    minmrtg: int = u8(574)
    maxmrtg: int = u8(575)
    trattr: int = u8(576)
    mcudmq: int = u16(578)
    mnsudmq: int = u16(580)
    mcmr: int = u16(582)
    nmcmr: int = u16(584)
    mcdqpc: int = u16(586)
    subnqn: str = ascii_field(768, 256, pad="\0")  # NUL-terminated UTF-8 in the spec; ASCII here
    # Fabrics only (1792-1807)
    ioccsz: int = u32(1792)
    iorcsz: int = u32(1796)
    icdoff: int = u16(1800)
    fcatt: int = u8(1802)
    msdbd: int = u8(1803)
    ofcs: int = u16(1804)
    dctype: int = u8(1806)
    psd: list[PowerStateDescriptor] = array(2048, PowerStateDescriptor, 32)
    vs: bytes = raw(3072, 1024)


# --------------------------------------------------------------------------------------------- CNS 00h
@layout(size=4)
class LbaFormat(Layout):
    """LBA Format descriptor (4 bytes): metadata size, log2 data size, relative performance."""

    ms: int = u16(0)
    lbads: int = u8(2)  # LBA data size as a power of two; 0 = format not supported
    rp: int = u8(3)  # 1:0 relative performance


@layout(size=IDENTIFY_SIZE)
class IdentifyNamespace(Layout):
    """Identify Namespace data structure for the NVM command set (CNS 00h)."""

    nsze: int = u64(0)
    ncap: int = u64(8)
    nuse: int = u64(16)
    nsfeat: int = u8(24)
    nlbaf: int = u8(25)  # 0's based
    flbas: int = u8(26)  # 3:0 format index low, 4 extended metadata, 6:5 format index high
    mc: int = u8(27)
    dpc: int = u8(28)
    dps: int = u8(29)
    nmic: int = u8(30)
    rescap: int = u8(31)
    fpi: int = u8(32)
    dlfeat: int = u8(33)
    nawun: int = u16(34)
    nawupf: int = u16(36)
    nacwu: int = u16(38)
    nabsn: int = u16(40)
    nabo: int = u16(42)
    nabspf: int = u16(44)
    noiob: int = u16(46)
    nvmcap: int = u128(48)
    npwg: int = u16(64)
    npwa: int = u16(66)
    npdg: int = u16(68)
    npda: int = u16(70)
    nows: int = u16(72)
    mssrl: int = u16(74)
    mcl: int = u32(76)
    msrc: int = u8(80)
    kpios: int = u8(81)
    nulbaf: int = u8(82)
    kpiodaag: int = u32(84)
    anagrpid: int = u32(92)
    nsattr: int = u8(99)
    nvmsetid: int = u16(100)
    endgid: int = u16(102)
    nguid: bytes = raw(104, 16)
    eui64: bytes = raw(120, 8)
    lbaf: list[LbaFormat] = array(128, LbaFormat, 64)
    vs: bytes = raw(384, 3712)

    @property
    def format_index(self) -> int:
        """The LBA format in use, from FLBAS bits 3:0 (low) and 6:5 (high)."""
        return bits(self.flbas, 0, 3) | (bits(self.flbas, 5, 6) << 4)


# --------------------------------------------------------------------------------------------- CNS 05h/06h, CSI 0
@layout(size=IDENTIFY_SIZE)
class NvmIdentifyNamespace(Layout):
    """I/O Command Set specific Identify Namespace for the NVM command set (CNS 05h, CSI 00h)."""

    lbstm: int = u64(0)
    pic: int = u8(8)
    pifa: int = u8(9)
    elbaf: list[int] = array(12, u32, 64)  # 6:0 STS, 8:7 PIF, 12:9 QPIF
    npdgl: int = u32(268)
    nprg: int = u32(272)
    npra: int = u32(276)
    nors: int = u32(280)
    npdal: int = u32(284)
    lbapss: int = u32(288)
    tlbaag: int = u32(292)  # TP4165 Tracked LBA Allocation Granularity, in logical blocks; 0 = not reported


@layout(size=IDENTIFY_SIZE)
class NvmIdentifyController(Layout):
    """I/O Command Set specific Identify Controller for the NVM command set (CNS 06h, CSI 00h)."""

    vsl: int = u8(0)
    wzsl: int = u8(1)
    wusl: int = u8(2)
    dmrl: int = u8(3)
    dmrsl: int = u32(4)
    dmsl: int = u64(8)
    kpiocap: int = u8(16)
    wzdsl: int = u8(17)
    aocs: int = u16(18)  # bit 0 RALBAS
    ver: int = u32(20)
    lbamqf: int = u8(24)  # 0 = LBA Migration Queue Entry Type 0
    rla: int = u8(25)  # Base 2.4 draft (TP4176): bit0 HLS, bit1 SLS
    slmc: int = u16(26)  # Base 2.4 draft (TP4176): soft-limit max controllers, 0's based


# --------------------------------------------------------------------------------------------- CNS 14h/15h
@layout(size=IDENTIFY_SIZE)
class PrimaryControllerCapabilities(Layout):
    """Primary Controller Capabilities (CNS 14h): the SR-IOV flexible resource pools."""

    cntlid: int = u16(0)
    portid: int = u16(2)
    crt: int = u8(4)
    vqfrt: int = u32(32)
    vqrfa: int = u32(36)
    vqrfap: int = u16(40)
    vqprt: int = u16(42)
    vqfrsm: int = u16(44)
    vqgran: int = u16(46)
    vifrt: int = u32(64)
    virfa: int = u32(68)
    virfap: int = u16(72)
    viprt: int = u16(74)
    vifrsm: int = u16(76)
    vigran: int = u16(78)


@layout(size=32)
class SecondaryControllerEntry(Layout):
    """One secondary controller (an SR-IOV VF) in the Secondary Controller List."""

    scid: int = u16(0)
    pcid: int = u16(2)
    scs: int = u8(4)  # bit 0: online
    vfn: int = u16(8)  # VF number (1-based)
    nvq: int = u16(10)  # VQ flexible resources assigned
    nvi: int = u16(12)  # VI flexible resources assigned

    @property
    def online(self) -> bool:
        return bit(self.scs, 0)


@layout(size=IDENTIFY_SIZE)
class SecondaryControllerList(Layout):
    """Secondary Controller List (CNS 15h); ``num`` entries are meaningful, the rest are zero."""

    num: int = u8(0)
    entries: list[SecondaryControllerEntry] = array(32, SecondaryControllerEntry, SECONDARY_CTRL_MAX)

    @classmethod
    def of(cls, entries: Sequence[SecondaryControllerEntry]) -> SecondaryControllerList:
        """Build a list whose ``num`` matches ``entries``."""
        return cls(num=len(entries), entries=list(entries))

    @property
    def active(self) -> list[SecondaryControllerEntry]:
        """The first ``num`` entries."""
        return self.entries[: self.num]


# --------------------------------------------------------------------------------------------- lists
_NSID_LIST = struct.Struct(f"<{NSID_LIST_MAX}I")
_CTRL_LIST = struct.Struct(f"<H{CTRL_LIST_MAX}H")


def encode_nsid_list(nsids: Sequence[int]) -> bytes:
    """A 4096-byte NSID list (CNS 02h/07h/10h/1Ah, and the Changed Namespace List log): zero terminated."""
    n = len(nsids)
    if n > NSID_LIST_MAX:
        raise ValueError(f"an NSID list holds at most {NSID_LIST_MAX} entries, got {n}")
    if 0 in nsids:
        raise ValueError("NSID 0 would terminate the list early")
    try:
        return _NSID_LIST.pack(*nsids, *([0] * (NSID_LIST_MAX - n)))
    except struct.error as e:
        raise ValueError(f"NSID out of range: {e}") from e


def decode_nsid_list(buf: bytes | bytearray | memoryview) -> list[int]:
    """The NSIDs before the first zero entry."""
    if len(buf) < _NSID_LIST.size:
        raise ValueError(f"an NSID list is {_NSID_LIST.size} bytes, got {len(buf)}")
    v = _NSID_LIST.unpack_from(buf)
    try:
        return list(v[: v.index(0)])
    except ValueError:
        return list(v)


def encode_ctrl_list(cntlids: Sequence[int]) -> bytes:
    """A 4096-byte Controller List (CNS 12h/13h): u16 count then the identifiers."""
    n = len(cntlids)
    if n > CTRL_LIST_MAX:
        raise ValueError(f"a controller list holds at most {CTRL_LIST_MAX} entries, got {n}")
    try:
        return _CTRL_LIST.pack(n, *cntlids, *([0] * (CTRL_LIST_MAX - n)))
    except struct.error as e:
        raise ValueError(f"controller identifier out of range: {e}") from e


def decode_ctrl_list(buf: bytes | bytearray | memoryview) -> list[int]:
    """The ``count`` controller identifiers of a Controller List."""
    if len(buf) < _CTRL_LIST.size:
        raise ValueError(f"a controller list is {_CTRL_LIST.size} bytes, got {len(buf)}")
    v = _CTRL_LIST.unpack_from(buf)
    if v[0] > CTRL_LIST_MAX:
        raise ValueError(f"controller list count {v[0]} exceeds {CTRL_LIST_MAX}")
    return list(v[1 : 1 + v[0]])


class NidType(IntEnum):
    """Namespace Identification Descriptor types (CNS 03h)."""

    EUI64 = 1
    NGUID = 2
    UUID = 3
    CSI = 4


NID_LENGTHS: dict[int, int] = {NidType.EUI64: 8, NidType.NGUID: 16, NidType.UUID: 16, NidType.CSI: 1}
_NID_HDR = struct.Struct("<BB2x")


def encode_ns_descs(descs: Sequence[tuple[int, bytes]]) -> bytes:
    """A 4096-byte Namespace Identification Descriptor list from ``(NIDT, NID)`` pairs."""
    out = bytearray(IDENTIFY_SIZE)
    pos = 0
    for nidt, nid in descs:
        want = NID_LENGTHS.get(nidt)
        if want is None:
            raise ValueError(f"unknown NIDT {nidt}")
        if len(nid) != want:
            raise ValueError(f"NIDT {nidt} needs a {want}-byte NID, got {len(nid)}")
        end = pos + _NID_HDR.size + want
        if end > IDENTIFY_SIZE:
            raise ValueError("descriptors exceed 4096 bytes")
        _NID_HDR.pack_into(out, pos, nidt, want)
        out[pos + _NID_HDR.size : end] = nid
        pos = end
    return bytes(out)


def decode_ns_descs(buf: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
    """``(NIDT, NID)`` pairs up to the first descriptor with NIDT 0 (unknown types are kept as is)."""
    mv = memoryview(buf)
    out: list[tuple[int, bytes]] = []
    pos = 0
    while pos + _NID_HDR.size <= len(mv):
        nidt, nidl = _NID_HDR.unpack_from(mv, pos)
        if nidt == 0:
            break
        start = pos + _NID_HDR.size
        if nidl == 0 or start + nidl > len(mv):
            raise ValueError(f"descriptor at byte {pos}: NIDL {nidl} is invalid")
        want = NID_LENGTHS.get(nidt)
        if want is not None and nidl != want:
            raise ValueError(f"descriptor at byte {pos}: NIDT {nidt} needs NIDL {want}, got {nidl}")
        out.append((nidt, bytes(mv[start : start + nidl])))
        pos = start + nidl
    return out
