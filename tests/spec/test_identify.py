"""Identify structures against QEMU 7.2 data decoded by nvme-cli 2.3, plus spec-offset checks."""

from __future__ import annotations

import struct
import uuid
from collections.abc import Sequence

import pytest

from nvme_lm.spec.identify import (
    CNS,
    OACS,
    ONCS,
    IdentifyController,
    IdentifyNamespace,
    LbaFormat,
    NidType,
    NvmIdentifyController,
    NvmIdentifyNamespace,
    PowerStateDescriptor,
    PrimaryControllerCapabilities,
    SecondaryControllerEntry,
    SecondaryControllerList,
    decode_ctrl_list,
    decode_ns_descs,
    decode_nsid_list,
    encode_ctrl_list,
    encode_ns_descs,
    encode_nsid_list,
)

from .fixtures import FieldTable, assert_matches, fixture_bytes, fixture_json, render, requires_fixtures

# --------------------------------------------------------------------------------------------- tables
# nvme-cli 2.3 JSON key -> our attribute, or a function printing our value the way nvme-cli does.
PSD_TABLE: FieldTable = {
    "max_power": "mp",
    "flags": "flags",
    "entry_lat": "enlat",
    "exit_lat": "exlat",
    "read_tput": "rrt",
    "read_lat": "rrl",
    "write_tput": "rwt",
    "write_lat": "rwl",
    "idle_power": "idlp",
    "idle_scale": "idle_scale",  # IPS 7:6
    "active_power": "actp",
    "active_power_work": "active_power_workload",  # APWS 2:0
    "active_scale": "active_scale",  # APWS 7:6
}

ID_CTRL_TABLE: FieldTable = {
    "vid": "vid",
    "ssvid": "ssvid",
    # nvme-cli prints the raw space-padded text; we strip the padding.
    "sn": lambda c: c.sn.ljust(20),
    "mn": lambda c: c.mn.ljust(40),
    "fr": lambda c: c.fr.ljust(8),
    "rab": "rab",
    "ieee": "ieee",
    "cmic": "cmic",
    "mdts": "mdts",
    "cntlid": "cntlid",
    "ver": "ver",
    "rtd3r": "rtd3r",
    "rtd3e": "rtd3e",
    "oaes": "oaes",
    "ctratt": "ctratt",
    "rrls": "rrls",
    "cntrltype": "cntrltype",
    "fguid": lambda c: str(uuid.UUID(bytes=c.fguid)),
    "crdt1": "crdt1",
    "crdt2": "crdt2",
    "crdt3": "crdt3",
    "nvmsr": "nvmsr",
    "vwci": "vwci",
    "mec": "mec",
    "oacs": "oacs",
    "acl": "acl",
    "aerl": "aerl",
    "frmw": "frmw",
    "lpa": "lpa",
    "elpe": "elpe",
    "npss": "npss",
    "avscc": "avscc",
    "apsta": "apsta",
    "wctemp": "wctemp",
    "cctemp": "cctemp",
    "mtfa": "mtfa",
    "hmpre": "hmpre",
    "hmmin": "hmmin",
    "tnvmcap": lambda c: str(c.tnvmcap),  # 128-bit values are printed as decimal strings
    "unvmcap": lambda c: str(c.unvmcap),
    "rpmbs": "rpmbs",
    "edstt": "edstt",
    "dsto": "dsto",
    "fwug": "fwug",
    "kas": "kas",
    "hctma": "hctma",
    "mntmt": "mntmt",
    "mxtmt": "mxtmt",
    "sanicap": "sanicap",
    "hmminds": "hmminds",
    "hmmaxd": "hmmaxd",
    "nsetidmax": "nsetidmax",
    "endgidmax": "endgidmax",
    "anatt": "anatt",
    "anacap": "anacap",
    "anagrpmax": "anagrpmax",
    "nanagrpid": "nanagrpid",
    "pels": "pels",
    "domainid": "domainid",
    "megcap": lambda c: str(c.megcap),
    "sqes": "sqes",
    "cqes": "cqes",
    "maxcmd": "maxcmd",
    "nn": "nn",
    "oncs": "oncs",
    "fuses": "fuses",
    "fna": "fna",
    "vwc": "vwc",
    "awun": "awun",
    "awupf": "awupf",
    "icsvscc": "icsvscc",
    "nwpc": "nwpc",
    "acwu": "acwu",
    "ocfs": "ocfs",
    "sgls": "sgls",
    "mnan": "mnan",
    "maxdna": lambda c: str(c.maxdna),
    "maxcna": "maxcna",
    "subnqn": "subnqn",
    "ioccsz": "ioccsz",
    "iorcsz": "iorcsz",
    "icdoff": "icdoff",
    "fcatt": "fcatt",
    "msdbd": "msdbd",
    "ofcs": "ofcs",
    # nvme-cli prints NPSS+1 descriptors
    "psds": lambda c: [render(p, PSD_TABLE) for p in c.psd[: c.npss + 1]],
}
ID_CTRL_SKIPPED: dict[str, str] = {}  # nvme-cli 2.3 prints nothing we do not model

LBAF_TABLE: FieldTable = {"ms": "ms", "ds": "lbads", "rp": "rp"}

ID_NS_TABLE: FieldTable = {
    "nsze": "nsze",
    "ncap": "ncap",
    "nuse": "nuse",
    "nsfeat": "nsfeat",
    "nlbaf": "nlbaf",
    "flbas": "flbas",
    "mc": "mc",
    "dpc": "dpc",
    "dps": "dps",
    "nmic": "nmic",
    "rescap": "rescap",
    "fpi": "fpi",
    "dlfeat": "dlfeat",
    "nawun": "nawun",
    "nawupf": "nawupf",
    "nacwu": "nacwu",
    "nabsn": "nabsn",
    "nabo": "nabo",
    "nabspf": "nabspf",
    "noiob": "noiob",
    "nvmcap": lambda n: str(n.nvmcap),
    "nsattr": "nsattr",
    "nvmsetid": "nvmsetid",
    "npwg": "npwg",
    "npwa": "npwa",
    "npdg": "npdg",
    "npda": "npda",
    "nows": "nows",
    "mssrl": "mssrl",
    "mcl": "mcl",
    "msrc": "msrc",
    "nulbaf": "nulbaf",
    "anagrpid": "anagrpid",
    "endgid": "endgid",
    "eui64": lambda n: n.eui64.hex(),
    "nguid": lambda n: n.nguid.hex(),
    # nvme-cli prints NLBAF+1 (+ NULBAF) formats
    "lbafs": lambda n: [render(f, LBAF_TABLE) for f in n.lbaf[: n.nlbaf + 1 + n.nulbaf]],
}
ID_NS_SKIPPED: dict[str, str] = {}

PRIMARY_CAPS_TABLE: FieldTable = {  # nvme-cli uses the spec acronyms, as we do
    "cntlid": "cntlid",
    "portid": "portid",
    "crt": "crt",
    "vqfrt": "vqfrt",
    "vqrfa": "vqrfa",
    "vqrfap": "vqrfap",
    "vqprt": "vqprt",
    "vqfrsm": "vqfrsm",
    "vqgran": "vqgran",
    "vifrt": "vifrt",
    "virfa": "virfa",
    "virfap": "virfap",
    "viprt": "viprt",
    "vifrsm": "vifrsm",
    "vigran": "vigran",
}

SECONDARY_ENTRY_TABLE: FieldTable = {
    "secondary-controller-identifier": "scid",
    "primary-controller-identifier": "pcid",
    "secondary-controller-state": "scs",
    "virtual-function-number": "vfn",
    "num-virtual-queues": "nvq",
    "num-virtual-interrupts": "nvi",
}
SECONDARY_LIST_TABLE: FieldTable = {
    "num": "num",
    "secondary-controllers": lambda s: [render(e, SECONDARY_ENTRY_TABLE) for e in s.active],
}

NID_TYPE_NAMES = {1: "eui64", 2: "nguid", 3: "uuid", 4: "csi"}


def _render_descs(descs: Sequence[tuple[int, bytes]]) -> list[dict[str, object]]:
    """Our descriptor list as nvme-cli 2.3 prints it (``loc`` is the byte offset of each descriptor)."""
    out, loc = [], 0
    for nidt, nid in descs:
        name = NID_TYPE_NAMES[nidt]
        if nidt == NidType.CSI:
            value = str(nid[0])
        elif nidt == NidType.UUID:
            value = str(uuid.UUID(bytes=nid))
        else:
            value = nid.hex()
        out.append({"loc": loc, "nidt": nidt, "nidl": len(nid), "type": name, name: value})
        loc += 4 + len(nid)
    return out


# --------------------------------------------------------------------------------------------- fixtures
@requires_fixtures
def test_id_ctrl_matches_nvme_cli_and_round_trips() -> None:
    raw = fixture_bytes("id-ctrl.bin")
    ctrl = IdentifyController.decode(raw)
    assert_matches(fixture_json("id-ctrl.json"), ctrl, ID_CTRL_TABLE, ID_CTRL_SKIPPED, "id-ctrl")
    assert ctrl.encode() == raw
    # a few semantic reads of the same data
    assert ctrl.sn == "nvmeguest0" and ctrl.mn == "QEMU NVMe Ctrl" and ctrl.fr == "7.2.22"
    # QEMU 7.2 does NOT set OACS.VMS (bit 7) although it implements Virtualization Management (1Ch) and
    # lists it as supported in the Commands Supported and Effects log; later QEMU sets VMS with SR-IOV.
    assert OACS(ctrl.oacs) == OACS.FORMAT | OACS.NS_MGMT | OACS.DBBUF
    assert ONCS.COPY in ONCS(ctrl.oncs)
    assert ctrl.psd[1:] == [PowerStateDescriptor()] * 31


@requires_fixtures
def test_id_ns_matches_nvme_cli_and_round_trips() -> None:
    raw = fixture_bytes("id-ns.bin")
    ns = IdentifyNamespace.decode(raw)
    assert_matches(fixture_json("id-ns.json"), ns, ID_NS_TABLE, ID_NS_SKIPPED, "id-ns")
    assert ns.encode() == raw
    assert ns.format_index == 0 and 1 << ns.lbaf[ns.format_index].lbads == 512
    assert ns.nsze * 512 == 1 << 30  # the 1 GiB namespace of the README


@requires_fixtures
def test_ns_descs_match_nvme_cli_and_round_trip() -> None:
    raw = fixture_bytes("ns-descs.bin")
    descs = decode_ns_descs(raw)
    assert descs == [(NidType.CSI, b"\x00")]
    printed = fixture_json("ns-descs.json")
    assert list(printed) == ["ns-descs"]
    assert _render_descs(descs) == printed["ns-descs"]
    assert encode_ns_descs(descs) == raw


@requires_fixtures
def test_active_nsid_list_matches_nvme_cli() -> None:
    # list-ns has only nvme-cli's JSON (no .bin): check our encoding of the printed list reads back.
    printed = fixture_json("list-ns.json")
    assert list(printed) == ["nsid_list"]
    nsids = [entry["nsid"] for entry in printed["nsid_list"]]
    assert all(list(entry) == ["nsid"] for entry in printed["nsid_list"])
    buf = encode_nsid_list(nsids)
    assert len(buf) == 4096 and buf[:8] == struct.pack("<II", 1, 0)
    assert decode_nsid_list(buf) == nsids == [1]


@requires_fixtures
def test_primary_ctrl_caps_match_nvme_cli_and_round_trip() -> None:
    raw = fixture_bytes("primary-ctrl-caps.bin")
    caps = PrimaryControllerCapabilities.decode(raw)
    assert_matches(fixture_json("primary-ctrl-caps.json"), caps, PRIMARY_CAPS_TABLE, {}, "primary-ctrl-caps")
    assert caps.encode() == raw


@requires_fixtures
def test_secondary_list_matches_nvme_cli_and_round_trips() -> None:
    raw = fixture_bytes("list-secondary.bin")
    sl = SecondaryControllerList.decode(raw)
    assert_matches(fixture_json("list-secondary.json"), sl, SECONDARY_LIST_TABLE, {}, "list-secondary")
    assert sl.encode() == raw
    assert [e.online for e in sl.active] == [False, False]
    assert SecondaryControllerList.of(sl.active).encode() == raw


# --------------------------------------------------------------------------------------------- spec offsets
# Independent of the declarations: offsets copied from the spec notes' tables (§2.1, §2.2, §15, §18, §20.7,
# §20.8). A wrong declaration shows up here even where the QEMU data is all zero.
ID_CTRL_SPEC_OFFSETS = {
    "vid": 0, "ssvid": 2, "sn": 4, "mn": 24, "fr": 64, "rab": 72, "ieee": 73, "cmic": 76, "mdts": 77,
    "cntlid": 78, "ver": 80, "rtd3r": 84, "rtd3e": 88, "oaes": 92, "ctratt": 96, "rrls": 100, "bpcap": 102,
    "nssl": 104, "plsi": 110, "cntrltype": 111, "fguid": 112, "crdt1": 128, "crdt2": 130, "crdt3": 132,
    "crcap": 134, "ciu": 135, "cirn": 136, "nvmsr": 253, "vwci": 254, "mec": 255, "oacs": 256, "acl": 258,
    "aerl": 259, "frmw": 260, "lpa": 261, "elpe": 262, "npss": 263, "avscc": 264, "apsta": 265,
    "wctemp": 266, "cctemp": 268, "mtfa": 270, "hmpre": 272, "hmmin": 276, "tnvmcap": 280, "unvmcap": 296,
    "rpmbs": 312, "edstt": 316, "dsto": 318, "fwug": 319, "kas": 320, "hctma": 322, "sanicap": 328,
    "nsetidmax": 338, "endgidmax": 340, "anatt": 342, "anacap": 343, "anagrpmax": 344, "nanagrpid": 348,
    "pels": 352, "domainid": 356, "megcap": 368, "cqt": 386, "sqes": 512, "cqes": 513, "maxcmd": 514,
    "nn": 516, "oncs": 520, "fuses": 522, "fna": 524, "vwc": 525, "awun": 526, "awupf": 528,
    "icsvscc": 530, "nwpc": 531, "acwu": 532, "ocfs": 534, "sgls": 536, "mnan": 540, "maxdna": 544,
    "maxcna": 560, "oaqd": 564, "rhiri": 568, "hirt": 569, "cmmrtd": 570, "nmmrtd": 572, "minmrtg": 574,
    "maxmrtg": 575, "trattr": 576, "mcudmq": 578, "mnsudmq": 580, "mcmr": 582, "nmcmr": 584,
    "mcdqpc": 586, "subnqn": 768, "ioccsz": 1792, "psd": 2048, "vs": 3072,
}  # fmt: skip


def test_id_ctrl_offsets_follow_the_spec_notes() -> None:
    for name, off in ID_CTRL_SPEC_OFFSETS.items():
        assert IdentifyController.offset_of(name) == off, name


def test_id_ctrl_lm_fields_encode_at_their_bytes() -> None:
    c = IdentifyController(
        oacs=OACS.HMLMS | OACS.VMS, cmmrtd=0x1111, nmmrtd=0x2222, minmrtg=0x33, maxmrtg=0x44, trattr=0x07,
        mcudmq=0x5555, mnsudmq=0x6666, mcmr=0x7777, nmcmr=0x8888, mcdqpc=0x9999,
    )
    b = c.encode()
    assert struct.unpack_from("<H", b, 256)[0] == 0x880
    assert struct.unpack_from("<HHBBBxHHHHH", b, 570) == (
        0x1111, 0x2222, 0x33, 0x44, 0x07, 0x5555, 0x6666, 0x7777, 0x8888, 0x9999,
    )
    assert b[577] == 0 and not any(b[588:768])
    assert IdentifyController.decode(b) == c


def test_psd_layout() -> None:
    p = PowerStateDescriptor(mp=2500, flags=0b11, enlat=16, exlat=4, rrt=1, rrl=2, rwt=3, rwl=4,
                             idlp=500, ips=0x80, actp=900, apws=0x42)
    b = p.encode()
    assert struct.unpack("<HxBIIBBBBHBxHB9x", b) == (2500, 3, 16, 4, 1, 2, 3, 4, 500, 0x80, 900, 0x42)
    assert p.max_power_scale and p.non_operational
    assert (p.idle_scale, p.active_power_workload, p.active_scale) == (2, 2, 1)
    c = IdentifyController(psd=[p])
    assert c.encode()[2048:2080] == b and IdentifyController.decode(c.encode()).psd[0] == p


def test_id_ns_offsets_and_lbaf() -> None:
    spec = {"nsze": 0, "ncap": 8, "nuse": 16, "nsfeat": 24, "nlbaf": 25, "flbas": 26, "mc": 27, "dpc": 28,
            "dps": 29, "nmic": 30, "rescap": 31, "fpi": 32, "dlfeat": 33, "nvmcap": 48, "npwg": 64, "mssrl": 74,
            "mcl": 76, "msrc": 80, "anagrpid": 92, "nsattr": 99, "nvmsetid": 100, "endgid": 102, "nguid": 104,
            "eui64": 120, "lbaf": 128, "vs": 384}
    for name, off in spec.items():
        assert IdentifyNamespace.offset_of(name) == off, name
    ns = IdentifyNamespace(flbas=0b0100_0011, lbaf=[LbaFormat()] * 35 + [LbaFormat(ms=8, lbads=12, rp=2)])
    assert ns.format_index == 0x23
    b = ns.encode()
    assert b[128 + 35 * 4 : 128 + 36 * 4] == bytes([8, 0, 12, 2])


def test_nvm_cs_identify_controller_offsets() -> None:
    c = NvmIdentifyController(vsl=1, wzsl=2, wusl=3, dmrl=4, dmrsl=5, dmsl=6, kpiocap=7, wzdsl=8, aocs=1,
                              ver=0x00010200, lbamqf=0, rla=3, slmc=9)
    b = c.encode()
    assert struct.unpack_from("<BBBBIQBBHIBBH", b, 0) == (1, 2, 3, 4, 5, 6, 7, 8, 1, 0x10200, 0, 3, 9)
    assert len(b) == 4096 and not any(b[28:])
    assert NvmIdentifyController.decode(b) == c


def test_nvm_cs_identify_namespace_offsets() -> None:
    n = NvmIdentifyNamespace(lbstm=1, pic=2, pifa=3, elbaf=[0x80] + [0] * 62 + [0x7F], npdgl=4, nprg=5,
                             npra=6, nors=7, npdal=8, lbapss=9, tlbaag=10)
    b = n.encode()
    assert struct.unpack_from("<QBB", b, 0) == (1, 2, 3)
    assert struct.unpack_from("<I", b, 12)[0] == 0x80 and struct.unpack_from("<I", b, 12 + 63 * 4)[0] == 0x7F
    assert struct.unpack_from("<7I", b, 268) == (4, 5, 6, 7, 8, 9, 10)  # TLBAAG at 295:292
    assert NvmIdentifyNamespace.decode(b) == n


def test_primary_caps_and_secondary_entry_offsets() -> None:
    caps = PrimaryControllerCapabilities(cntlid=1, portid=2, crt=3, vqfrt=4, vqrfa=5, vqrfap=6, vqprt=7,
                                         vqfrsm=8, vqgran=9, vifrt=10, virfa=11, virfap=12, viprt=13, vifrsm=14,
                                         vigran=15)
    b = caps.encode()
    assert struct.unpack_from("<HHB", b, 0) == (1, 2, 3)
    assert struct.unpack_from("<IIHHHH", b, 32) == (4, 5, 6, 7, 8, 9)
    assert struct.unpack_from("<IIHHHH", b, 64) == (10, 11, 12, 13, 14, 15)
    e = SecondaryControllerEntry(scid=5, pcid=1, scs=1, vfn=3, nvq=2, nvi=1)
    assert e.encode() == struct.pack("<HHB3xHHH18x", 5, 1, 1, 3, 2, 1) and e.online
    sl = SecondaryControllerList.of([e] * 127)
    assert sl.encode()[0] == 127 and SecondaryControllerList.decode(sl.encode()).active == [e] * 127
    with pytest.raises(ValueError, match="holds 127"):
        SecondaryControllerList.of([e] * 128).encode()


# --------------------------------------------------------------------------------------------- lists
def test_nsid_list_edges() -> None:
    full = list(range(1, 1025))
    assert decode_nsid_list(encode_nsid_list(full)) == full  # no terminator needed when full
    assert decode_nsid_list(bytes(4096)) == []
    with pytest.raises(ValueError, match="at most 1024"):
        encode_nsid_list(list(range(1, 1026)))
    with pytest.raises(ValueError, match="NSID 0"):
        encode_nsid_list([1, 0, 2])
    with pytest.raises(ValueError, match="out of range"):
        encode_nsid_list([1 << 32])
    with pytest.raises(ValueError, match="4096 bytes"):
        decode_nsid_list(bytes(100))


def test_ctrl_list() -> None:
    b = encode_ctrl_list([0, 1, 2])
    assert len(b) == 4096 and b[:8] == struct.pack("<4H", 3, 0, 1, 2)
    assert decode_ctrl_list(b) == [0, 1, 2]
    assert decode_ctrl_list(encode_ctrl_list([])) == []
    assert decode_ctrl_list(encode_ctrl_list(list(range(2047)))) == list(range(2047))
    with pytest.raises(ValueError, match="at most 2047"):
        encode_ctrl_list(list(range(2048)))
    with pytest.raises(ValueError, match="count"):
        decode_ctrl_list(struct.pack("<H", 2048) + bytes(4094))


def test_ns_descs_all_types() -> None:
    descs = [(NidType.EUI64, bytes(range(8))), (NidType.NGUID, bytes(range(16))),
             (NidType.UUID, uuid.UUID(int=7).bytes), (NidType.CSI, b"\x00")]
    b = encode_ns_descs(descs)
    assert b[:4] == bytes([1, 8, 0, 0]) and b[12:16] == bytes([2, 16, 0, 0])
    assert decode_ns_descs(b) == descs
    assert _render_descs(descs)[3]["loc"] == 12 + 20 + 20
    with pytest.raises(ValueError, match="8-byte"):
        encode_ns_descs([(NidType.EUI64, b"\x01")])
    with pytest.raises(ValueError, match="unknown NIDT"):
        encode_ns_descs([(9, b"\x01")])
    with pytest.raises(ValueError, match="needs NIDL 16"):
        decode_ns_descs(bytes([2, 8, 0, 0]) + bytes(8) + bytes(4084))


def test_cns_values() -> None:
    assert (CNS.NS, CNS.CTRL, CNS.NS_ACTIVE_LIST, CNS.NS_DESC_LIST) == (0, 1, 2, 3)
    assert (CNS.CSI_NS, CNS.CSI_CTRL, CNS.CTRL_LIST, CNS.PRIMARY_CTRL_CAPS, CNS.SECONDARY_CTRL_LIST) == (
        5, 6, 0x13, 0x14, 0x15,
    )
    assert CNS.SUPPORTED_CTRL_STATE_FORMATS == 0x20
