"""NVMe/TCP PDU codec: byte-exact layouts (Linux include/linux/nvme-tcp.h, SPDK nvmf_spec.h), CRC32C
digests, round trips of every PDU, and the FES/FEI every malformed field earns."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nvme_lm.fabrics import pdu as P
from nvme_lm.fabrics.pdu import (
    R2T,
    C2HData,
    C2HTermReq,
    CapsuleCmd,
    CapsuleResp,
    Fes,
    H2CData,
    H2CTermReq,
    IcReq,
    IcResp,
    PduError,
    PduType,
    crc32c_of,
    decode_pdu,
    encode_pdu,
    sgl_fields,
)
from nvme_lm.spec.commands import CQE, SQE

CH = struct.Struct("<BBBBI")


def le32(b: bytes, off: int) -> int:
    return struct.unpack_from("<I", b, off)[0]


def le16(b: bytes, off: int) -> int:
    return struct.unpack_from("<H", b, off)[0]


def sqe_with_icd(n: int, **kw) -> SQE:
    prp1, prp2 = sgl_fields(n, P.SGL_ICD)
    return SQE(prp1=prp1, prp2=prp2, **kw)


# ------------------------------------------------------------------------------------------ constants
def test_wire_constants_match_the_linux_header():
    # include/linux/nvme-tcp.h: enum nvme_tcp_pdu_type, nvme_tcp_pdu_flags, nvme_tcp_fatal_error_status
    assert [int(t) for t in PduType] == [0, 1, 2, 3, 4, 5, 6, 7, 9]
    assert (P.HDGSTF, P.DDGSTF, P.LAST_PDU, P.SUCCESS) == (1, 2, 4, 8)
    fes = (Fes.INVALID_HEADER_FIELD, Fes.PDU_SEQUENCE_ERROR, Fes.HEADER_DIGEST_ERROR, Fes.DATA_OUT_OF_RANGE,
           Fes.R2T_LIMIT_EXCEEDED, Fes.UNSUPPORTED_PARAMETER)
    assert [int(f) for f in fes] == [1, 2, 3, 4, 5, 6]
    assert Fes.DATA_LIMIT_EXCEEDED == Fes.R2T_LIMIT_EXCEEDED == 5
    assert (P.TERM_MAX_PLEN, P.MIN_MAXH2CDATA, P.DIGEST_LEN) == (152, 4096, 4)
    assert (P.DISCOVERY_PORT, P.DEFAULT_PORT) == (8009, 4420)
    assert (P.CMD_HLEN, P.RSP_HLEN, P.DATA_HLEN, P.R2T_HLEN, P.TERM_HLEN, P.IC_LEN) == (72, 24, 24, 24, 24, 128)


# ------------------------------------------------------------------------------------------ byte layouts
def test_icreq_layout():
    b = encode_pdu(IcReq(hpda=3, hdgst=True, ddgst=True, maxr2t=7))
    assert len(b) == 128
    assert CH.unpack_from(b) == (0, 0, 128, 0, 128)  # type, flags, hlen, pdo, plen
    assert le16(b, 8) == 0  # PFV 1.0
    assert b[10] == 3  # HPDA
    assert b[11] == 0b11  # DGST: bit 0 header digest, bit 1 data digest
    assert le32(b, 12) == 7  # MAXR2T
    assert b[16:] == bytes(112)


def test_icresp_layout():
    b = encode_pdu(IcResp(cpda=1, hdgst=False, ddgst=True, maxh2cdata=0x400000))
    assert CH.unpack_from(b) == (1, 0, 128, 0, 128)
    assert (le16(b, 8), b[10], b[11], le32(b, 12)) == (0, 1, 0b10, 0x400000)
    assert b[16:] == bytes(112)


def test_term_req_layout_and_header_copy_limit():
    b = encode_pdu(C2HTermReq(Fes.INVALID_HEADER_FIELD, 0x01020304, b"\xaa" * 10))
    assert CH.unpack_from(b) == (3, 0, 24, 0, 34)
    assert le16(b, 8) == 1
    assert le32(b, 10) == 0x01020304  # FEI is unaligned at offset 10
    assert b[14:24] == bytes(10)
    assert b[24:] == b"\xaa" * 10
    big = encode_pdu(H2CTermReq(Fes.PDU_SEQUENCE_ERROR, 0, bytes(300)))
    assert big[0] == 2 and len(big) == 152 and le32(big, 4) == 152  # at most 128 bytes of header copy


def test_capsule_cmd_layout_plain_and_with_digests_and_padding():
    sqe = SQE(opcode=0x01, cid=0x1234, nsid=1, cdw10=5)
    b = encode_pdu(CapsuleCmd(sqe))
    assert CH.unpack_from(b) == (4, 0, 72, 0, 72)
    assert b[8:72] == sqe.encode()

    data = bytes(range(16))
    s = sqe_with_icd(16, opcode=0x01, cid=1)
    b = encode_pdu(CapsuleCmd(s, data))
    assert CH.unpack_from(b) == (4, 0, 72, 72, 88) and b[72:] == data

    # header digest after HLEN, PDO rounded up to CPDA (1 -> 8 bytes): 72 + 4 = 76 -> 80
    b = encode_pdu(CapsuleCmd(s, data), hdgst=True, ddgst=True, pda=1)
    assert CH.unpack_from(b) == (4, P.HDGSTF | P.DDGSTF, 72, 80, 80 + 16 + 4)
    assert le32(b, 72) == crc32c_of(b[:72])
    assert b[76:80] == bytes(4)
    assert b[80:96] == data
    assert le32(b, 96) == crc32c_of(data)


def test_capsule_resp_layout():
    cqe = CQE(dw0=0xDEADBEEF, dw1=2, sqhd=3, sqid=4, cid=0x55, status=0x4002)
    b = encode_pdu(CapsuleResp(cqe), hdgst=True)
    assert CH.unpack_from(b) == (5, P.HDGSTF, 24, 0, 28)
    assert b[8:24] == cqe.encode()
    assert le16(b, 8 + 12) == 0x55  # CID at PDU offset 20
    assert le32(b, 24) == crc32c_of(b[:24])


def test_data_and_r2t_layouts():
    payload = b"x" * 100
    b = encode_pdu(H2CData(cccid=0x11, ttag=0x22, datao=0x1000, data=payload, last=True))
    assert CH.unpack_from(b) == (6, P.LAST_PDU, 24, 24, 124)
    assert (le16(b, 8), le16(b, 10), le32(b, 12), le32(b, 16)) == (0x11, 0x22, 0x1000, 100)
    assert b[20:24] == bytes(4) and b[24:] == payload

    b = encode_pdu(C2HData(cccid=0x11, datao=8, data=payload, last=True, success=True), pda=3)  # 16-byte align
    assert CH.unpack_from(b) == (7, P.LAST_PDU | P.SUCCESS, 24, 32, 132)
    assert b[10:12] == bytes(2)  # reserved where H2CData has TTAG
    assert b[24:32] == bytes(8) and b[32:] == payload

    b = encode_pdu(R2T(cccid=3, ttag=9, r2to=4096, r2tl=8192), hdgst=True)
    assert CH.unpack_from(b) == (9, P.HDGSTF, 24, 0, 28)
    assert (le16(b, 8), le16(b, 10), le32(b, 12), le32(b, 16)) == (3, 9, 4096, 8192)


def test_encoders_do_not_copy_payloads():
    mv = memoryview(bytearray(b"abc" * 1000))
    bufs = C2HData(1, 0, mv, last=True).encode(ddgst=True)
    assert bufs[1] is mv and len(bufs) == 3
    bufs = H2CData(1, 2, 0, mv).encode()
    assert bufs[1] is mv


def test_c2h_success_requires_last():
    with pytest.raises(ValueError):
        C2HData(1, 0, b"x", last=False, success=True).encode()


# ------------------------------------------------------------------------------------------ digests
@pytest.mark.parametrize(
    "data, crc",
    [
        (b"123456789", 0xE3069283),  # the CRC32C check value
        (bytes(32), 0x8A9136AA),  # RFC 3720 B.4 vectors (iSCSI uses the same CRC32C)
        (b"\xff" * 32, 0x62A8AB43),
        (bytes(range(32)), 0x46DD794E),
        (bytes(range(31, -1, -1)), 0x113FDB5C),
    ],
)
def test_crc32c_vectors(data, crc):
    assert crc32c_of(data) == crc
    assert crc32c_of(data[:7], memoryview(data)[7:]) == crc  # incremental over several buffers


def test_header_digest_is_little_endian_crc32c_of_the_header():
    b = encode_pdu(R2T(1, 2, 0, 4), hdgst=True)
    assert b[24:28] == struct.pack("<I", crc32c_of(b[:24]))


# ------------------------------------------------------------------------------------------ round trips
u16 = st.integers(0, 0xFFFF)
u32 = st.integers(0, 0xFFFFFFFF)
pda = st.integers(0, P.MAX_PDA)
payload = st.binary(min_size=1, max_size=600)


@given(st.integers(0, 31), st.booleans(), st.booleans(), u32)
def test_icreq_roundtrip(hpda, h, d, maxr2t):
    p = IcReq(0, hpda, h, d, maxr2t)
    assert decode_pdu(encode_pdu(p), controller=True) == p


@given(st.integers(0, 31), st.booleans(), st.booleans(), st.integers(1024, 0x3FFFFFFF).map(lambda x: x * 4))
def test_icresp_roundtrip(cpda, h, d, maxh2cdata):
    p = IcResp(0, cpda, h, d, maxh2cdata)
    assert decode_pdu(encode_pdu(p), controller=False) == p


@given(st.integers(0, 0xFFFF), u32, st.binary(max_size=128), st.booleans())
def test_term_req_roundtrip(fes, fei, data, c2h):
    p = C2HTermReq(fes, fei, data) if c2h else H2CTermReq(fes, fei, data)
    assert decode_pdu(encode_pdu(p), controller=not c2h) == p


sqes = st.builds(
    SQE, opcode=st.integers(0, 255), flags=st.integers(0, 255), cid=u16, nsid=u32, cdw10=u32, cdw15=u32,
    mptr=st.integers(0, 2**64 - 1),
)


@given(sqes, st.binary(max_size=700), st.booleans(), st.booleans(), pda)
def test_capsule_cmd_roundtrip(sqe, data, h, d, cpda):
    sqe.prp1, sqe.prp2 = sgl_fields(len(data), P.SGL_ICD if data else P.SGL_TRANSPORT)
    b = encode_pdu(CapsuleCmd(sqe, data), hdgst=h, ddgst=d, pda=cpda)
    got = decode_pdu(b, controller=True, hdgst=h, ddgst=d, rxpda=cpda)
    assert isinstance(got, CapsuleCmd) and got.sqe == sqe and bytes(got.data) == data and got.data_digest_ok


@given(st.builds(CQE, dw0=u32, dw1=u32, sqhd=u16, sqid=u16, cid=u16, status=st.integers(0, 0x7FFF)), st.booleans())
def test_capsule_resp_roundtrip(cqe, h):
    assert decode_pdu(encode_pdu(CapsuleResp(cqe), hdgst=h), controller=False, hdgst=h) == CapsuleResp(cqe)


@given(u16, u16, u32, payload, st.booleans(), st.booleans(), st.booleans(), pda)
def test_h2c_data_roundtrip(cid, ttag, off, data, last, h, d, cpda):
    b = encode_pdu(H2CData(cid, ttag, off, data, last), hdgst=h, ddgst=d, pda=cpda)
    got = decode_pdu(b, controller=True, hdgst=h, ddgst=d, rxpda=cpda)
    assert isinstance(got, H2CData)
    assert (got.cccid, got.ttag, got.datao, bytes(got.data), got.last) == (cid, ttag, off, data, last)


@given(u16, u32, payload, st.sampled_from([(False, False), (True, False), (True, True)]), st.booleans(),
       st.booleans(), pda)
def test_c2h_data_roundtrip(cid, off, data, flags, h, d, hpda):
    last, success = flags
    b = encode_pdu(C2HData(cid, off, data, last, success), hdgst=h, ddgst=d, pda=hpda)
    got = decode_pdu(b, controller=False, hdgst=h, ddgst=d, rxpda=hpda)
    assert isinstance(got, C2HData)
    assert (got.cccid, got.datao, bytes(got.data), got.last, got.success) == (cid, off, data, last, success)


@given(u16, u16, u32, st.integers(1, 0xFFFFFFFF), st.booleans())
def test_r2t_roundtrip(cid, ttag, off, length, h):
    p = R2T(cid, ttag, off, length)
    assert decode_pdu(encode_pdu(p, hdgst=h), controller=False, hdgst=h) == p


# ------------------------------------------------------------------------------------------ decode errors
def mutate(b: bytes, **fields) -> bytes:
    """Rewrite common-header fields of an encoded PDU."""
    t, f, hl, pdo, plen = CH.unpack_from(b)
    vals = dict(type=t, flags=f, hlen=hl, pdo=pdo, plen=plen) | fields
    return CH.pack(vals["type"], vals["flags"], vals["hlen"], vals["pdo"], vals["plen"]) + b[8:]


def poke(b: bytes, off: int, fmt: str, value: int) -> bytes:
    out = bytearray(b)
    struct.pack_into(fmt, out, off, value)
    return bytes(out)


def expect(b: bytes, fes: int, fei: int, *, controller: bool = True, **kw) -> None:
    with pytest.raises(PduError) as ei:
        decode_pdu(b, controller=controller, **kw)
    assert (ei.value.fes, ei.value.fei) == (fes, fei), str(ei.value)


CMD = encode_pdu(CapsuleCmd(sqe_with_icd(8, opcode=1, cid=1), b"12345678"))
R2T_PDU = encode_pdu(R2T(1, 2, 0, 8))
H2C = encode_pdu(H2CData(1, 2, 0, b"abcd", last=True))


def test_type_errors():
    expect(mutate(CMD, type=8), Fes.INVALID_HEADER_FIELD, P.OFF_TYPE)
    expect(mutate(CMD, type=0x20), Fes.INVALID_HEADER_FIELD, P.OFF_TYPE)
    expect(CMD, Fes.INVALID_HEADER_FIELD, P.OFF_TYPE, controller=False)  # a host never receives a command
    expect(R2T_PDU, Fes.INVALID_HEADER_FIELD, P.OFF_TYPE, controller=True)


def test_flag_errors():
    expect(mutate(CMD, flags=P.LAST_PDU), Fes.INVALID_HEADER_FIELD, P.OFF_FLAGS)  # not a CapsuleCmd flag
    expect(mutate(CMD, flags=P.HDGSTF), Fes.INVALID_HEADER_FIELD, P.OFF_FLAGS)  # digest not negotiated
    expect(CMD, Fes.INVALID_HEADER_FIELD, P.OFF_FLAGS, hdgst=True)  # negotiated but absent
    expect(CMD, Fes.INVALID_HEADER_FIELD, P.OFF_FLAGS, ddgst=True)  # data without its digest
    expect(mutate(R2T_PDU, flags=P.DDGSTF), Fes.INVALID_HEADER_FIELD, P.OFF_FLAGS, controller=False)
    c2h = encode_pdu(C2HData(1, 0, b"x", last=True))
    expect(mutate(c2h, flags=P.SUCCESS), Fes.INVALID_HEADER_FIELD, P.OFF_FLAGS, controller=False)
    expect(mutate(encode_pdu(IcReq()), flags=P.HDGSTF), Fes.INVALID_HEADER_FIELD, P.OFF_FLAGS)
    no_data = encode_pdu(CapsuleCmd(SQE(cid=1)))
    expect(mutate(no_data, flags=P.DDGSTF), Fes.INVALID_HEADER_FIELD, P.OFF_FLAGS, ddgst=True)


def test_length_and_offset_errors():
    expect(mutate(CMD, hlen=71), Fes.INVALID_HEADER_FIELD, P.OFF_HLEN)
    expect(mutate(R2T_PDU, pdo=24), Fes.INVALID_HEADER_FIELD, P.OFF_PDO, controller=False)
    expect(mutate(CMD, pdo=68), Fes.INVALID_HEADER_FIELD, P.OFF_PDO)  # data inside the header
    expect(mutate(R2T_PDU, plen=28), Fes.INVALID_HEADER_FIELD, P.OFF_PLEN, controller=False)
    expect(mutate(encode_pdu(IcReq()), plen=129), Fes.INVALID_HEADER_FIELD, P.OFF_PLEN)
    no_data_h2c = mutate(H2C[:24], plen=24, pdo=0)
    expect(no_data_h2c, Fes.INVALID_HEADER_FIELD, P.OFF_PLEN)  # H2CData must carry data
    expect(mutate(CMD, plen=70, pdo=0), Fes.INVALID_HEADER_FIELD, P.OFF_PLEN)


def test_psh_field_errors():
    expect(poke(encode_pdu(IcReq()), 8, "<H", 1), Fes.INVALID_HEADER_FIELD, P.OFF_IC_PFV)
    expect(poke(encode_pdu(IcReq()), 10, "<B", 32), Fes.INVALID_HEADER_FIELD, P.OFF_IC_PDA)
    resp = encode_pdu(IcResp(maxh2cdata=8192))
    expect(poke(resp, 12, "<I", 4092), Fes.INVALID_HEADER_FIELD, P.OFF_IC_MAX, controller=False)
    expect(poke(resp, 12, "<I", 8190), Fes.INVALID_HEADER_FIELD, P.OFF_IC_MAX, controller=False)
    expect(poke(H2C, 16, "<I", 5), Fes.INVALID_HEADER_FIELD, P.OFF_DATAL)
    expect(poke(R2T_PDU, 16, "<I", 0), Fes.INVALID_HEADER_FIELD, P.OFF_DATAL, controller=False)


def test_sgl_errors():
    expect(poke(CMD, P.OFF_CMD_SGL_ADDR, "<Q", 16), Fes.UNSUPPORTED_PARAMETER, P.OFF_CMD_SGL_ADDR)
    expect(poke(CMD, P.OFF_CMD_SGL_LEN, "<I", 9), Fes.INVALID_HEADER_FIELD, P.OFF_PLEN)
    expect(poke(CMD, P.OFF_CMD_SGL_ID, "<B", 0x00), Fes.UNSUPPORTED_PARAMETER, P.OFF_CMD_SGL_ID)
    expect(poke(CMD, P.OFF_CMD_SGL_ID, "<B", P.SGL_TRANSPORT), Fes.INVALID_HEADER_FIELD, P.OFF_PLEN)
    promised = encode_pdu(CapsuleCmd(sqe_with_icd(512, cid=1)))  # ICD SGL, but no data in the capsule
    expect(promised, Fes.INVALID_HEADER_FIELD, P.OFF_PLEN)
    keyed = SQE(cid=1)
    keyed.prp1, keyed.prp2 = sgl_fields(512, 0x40)  # keyed SGL data block: RDMA only
    expect(encode_pdu(CapsuleCmd(keyed)), Fes.UNSUPPORTED_PARAMETER, P.OFF_CMD_SGL_ID)


def test_header_digest_error_reports_received_digest():
    b = bytearray(encode_pdu(CapsuleCmd(SQE(cid=1)), hdgst=True))
    b[20] ^= 1
    expect(bytes(b), Fes.HEADER_DIGEST_ERROR, le32(b, 72), hdgst=True)


def test_data_digest_error_is_not_fatal():
    b = bytearray(encode_pdu(H2CData(1, 2, 0, b"abcdef", True), ddgst=True))
    b[26] ^= 0x80
    got = decode_pdu(bytes(b), controller=True, ddgst=True)
    assert isinstance(got, H2CData) and not got.data_digest_ok


def test_term_req_with_bad_length_is_silent():
    b = encode_pdu(H2CTermReq(1, 0, bytes(16)))
    for plen in (8, 23, 153, 4096):
        with pytest.raises(PduError) as ei:
            decode_pdu(mutate(b, plen=plen)[:8] + bytes(max(0, plen - 8)), controller=True)
        assert ei.value.silent


def test_pdo_alignment_rules():
    # CPDA 0 -> 4-byte alignment: PDO 72 fine; CPDA 1 -> 8: 72 fine too; CPDA 3 -> 16: 72 is not aligned
    decode_pdu(CMD, controller=True, rxpda=1)
    expect(CMD, Fes.INVALID_HEADER_FIELD, P.OFF_PDO, rxpda=3)
    # a larger, aligned PDO is accepted (the sender padded more than it had to)
    padded = encode_pdu(CapsuleCmd(sqe_with_icd(8, opcode=1, cid=1), b"12345678"), pda=31)
    assert CH.unpack_from(padded)[3] == 128
    assert bytes(decode_pdu(padded, controller=True).data) == b"12345678"


@settings(max_examples=300)
@given(st.binary(max_size=300), st.booleans(), st.booleans(), st.booleans(), pda)
def test_decode_of_random_bytes_only_raises_pdu_error(data, controller, h, d, rxpda):
    try:
        decode_pdu(data, controller=controller, hdgst=h, ddgst=d, rxpda=rxpda)
    except PduError as e:
        assert e.silent or 1 <= e.fes <= 6
