"""NVMe/TCP connections: a host and a target talking in memory (R2T writes with MAXR2T, multi-PDU reads
with SUCCESS, in-capsule writes, digests, padding), every protocol violation's termination request,
and fuzzing of the target's receive_data with random and mutated byte streams."""

from __future__ import annotations

import random
import struct

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nvme_lm.fabrics import pdu as P
from nvme_lm.fabrics.connection import (
    C2HDataReceived,
    CommandReceived,
    ConnectionClosed,
    ConnState,
    H2CDataReceived,
    IcReqReceived,
    LocalProtocolError,
    ProtocolError,
    R2TReceived,
    ResponseReceived,
    TargetConnection,
    TermReqReceived,
    icd_limit,
)
from nvme_lm.fabrics.host_connection import HostConnection
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
    decode_pdu,
    encode_pdu,
    sgl_fields,
)
from nvme_lm.spec.commands import CQE, SQE

WRITE, READ, FABRICS = 0x01, 0x02, 0x7F


def join(bufs) -> bytes:
    return bytes(bufs) if isinstance(bufs, bytes | bytearray) else b"".join(bytes(b) for b in bufs)


def feed(conn, data: bytes, chunk: int | None = None) -> list:
    """Deliver bytes whole or in pieces of `chunk` bytes; the events must not depend on the split."""
    if not chunk:
        return conn.receive_data(data)
    events = []
    for i in range(0, len(data), chunk):
        events += conn.receive_data(data[i : i + chunk])
    return events


def connect(chunk=None, *, host=None, target=None):
    h = HostConnection(**(host or {}))
    t = TargetConnection(**(target or {}))
    evs = feed(t, h.send_icreq(), chunk)
    assert len(evs) == 1 and isinstance(evs[0], IcReqReceived)
    assert [type(e).__name__ for e in feed(h, t.send_icresp(), chunk)] == ["IcRespReceived"]
    assert h.state is t.state is ConnState.READY
    return h, t


def host_term(err: ProtocolError) -> C2HTermReq:
    """The target's termination request, decoded as the host would."""
    got = decode_pdu(err.term_req, controller=False)
    assert isinstance(got, C2HTermReq) and (got.fes, got.fei) == (err.fes, err.fei)
    return got


MODES = [
    dict(),
    dict(host=dict(hdgst=True)),
    dict(host=dict(hdgst=True, ddgst=True)),
    dict(host=dict(ddgst=True, hpda=3), target=dict(cpda=1)),
    dict(host=dict(hdgst=True, ddgst=True, hpda=31), target=dict(cpda=31)),
]


# ------------------------------------------------------------------------------------------ handshake
def test_handshake_negotiates_digests_and_alignment():
    h, t = connect(host=dict(hdgst=True, ddgst=True, hpda=2, maxr2t=3), target=dict(cpda=1, maxh2cdata=8192))
    assert (t.hdgst, t.ddgst, t.hpda, t.maxr2t) == (True, True, 2, 3)
    assert (h.hdgst, h.ddgst, h.cpda, h.maxh2cdata) == (True, True, 1, 8192)


def test_target_may_refuse_a_digest_and_the_host_then_terminates():
    h = HostConnection(ddgst=True)
    t = TargetConnection(allow_ddgst=False)
    t.receive_data(h.send_icreq())
    assert not t.ddgst
    with pytest.raises(ProtocolError) as ei:
        h.receive_data(t.send_icresp())
    assert (ei.value.fes, ei.value.fei) == (Fes.UNSUPPORTED_PARAMETER, P.OFF_IC_DGST)
    assert isinstance(decode_pdu(ei.value.term_req, controller=True), H2CTermReq)


def test_sends_before_the_handshake_are_refused():
    t = TargetConnection()
    with pytest.raises(LocalProtocolError):
        t.send_icresp()
    h = HostConnection()
    with pytest.raises(LocalProtocolError):
        h.send_command(SQE(cid=1))
    t.receive_data(h.send_icreq())
    with pytest.raises(LocalProtocolError):  # the ICResp goes out first
        t.send_capsule_resp(CQE(cid=1))
    t.send_icresp()
    with pytest.raises(LocalProtocolError):
        t.send_icresp()


@pytest.mark.parametrize("bad", [0, 4095, 4098, 1 << 33])
def test_maxh2cdata_must_be_acceptable_to_hosts(bad):
    with pytest.raises(ValueError):
        TargetConnection(maxh2cdata=bad)


# ------------------------------------------------------------------------------------------ data flows
def run_write(h, t, cid, data, r2t_len, chunk=None):
    """A write through R2Ts: the target keeps as many R2Ts out as MAXR2T allows."""
    cmd = feed(t, join(h.send_command(SQE(opcode=WRITE, cid=cid, nsid=1), data=data, in_capsule=False)), chunk)
    assert len(cmd) == 1 and cmd[0].data is None
    assert cmd[0].sgl == P.SglDescriptor(0, len(data), P.SGL_TRANSPORT)
    got = bytearray(len(data))
    pending: list[R2TReceived] = []
    max_seen = 0
    done = False
    while not done:
        while t.can_send_r2t(cid):
            pending += feed(h, t.send_r2t(cid, r2t_len), chunk)
        max_seen = max(max_seen, len(pending))
        r2t = pending.pop(0)
        assert isinstance(r2t, R2TReceived) and r2t.cid == cid
        evs = feed(t, join(h.send_h2c_data(r2t.ttag)), chunk)
        assert all(isinstance(e, H2CDataReceived) and e.ttag == r2t.ttag and e.data_digest_ok for e in evs)
        assert [e.last for e in evs] == [False] * (len(evs) - 1) + [True]
        assert all(len(e.data) <= h.maxh2cdata for e in evs)
        for e in evs:
            got[e.offset : e.offset + len(e.data)] = e.data
        done = evs[-1].complete
    assert bytes(got) == data
    assert max_seen == min(h.maxr2t + 1, -(-len(data) // r2t_len))
    evs = feed(h, t.send_capsule_resp(CQE(cid=cid, dw0=7)), chunk)
    assert evs == [ResponseReceived(CQE(cid=cid, dw0=7))]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [None, 1, 13, 4000])
def test_write_through_r2ts(mode, chunk):
    mode = {k: dict(v) for k, v in mode.items()}
    mode.setdefault("host", {})["maxr2t"] = 1  # two R2Ts outstanding per command
    mode.setdefault("target", {})["maxh2cdata"] = 4096
    h, t = connect(chunk, **mode)
    data = random.Random(1).randbytes(40000 if chunk != 1 else 13000)  # byte by byte is slow
    run_write(h, t, 5, data, r2t_len=12288 if chunk != 1 else 4096, chunk=chunk)
    run_write(h, t, 6, data[:5000], r2t_len=4096, chunk=chunk)
    assert h.outstanding == t.outstanding == 0


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("chunk", [None, 1, 4000])
@pytest.mark.parametrize("success", [True, False])
def test_read_in_several_pdus(mode, chunk, success):
    h, t = connect(chunk, **mode)
    data = random.Random(2).randbytes(20000)
    evs = feed(t, join(h.send_command(SQE(opcode=READ, cid=9, nsid=1), read_len=len(data))), chunk)
    assert evs[0].sgl.length == len(data) and evs[0].sgl.identifier == P.SGL_TRANSPORT
    # the read data in two calls (as a backend might produce it), each split into 4 KiB PDUs
    evs = feed(h, join(t.send_c2h_data(9, memoryview(data)[:9000], max_pdu_data=4096)), chunk)
    evs += feed(h, join(t.send_c2h_data(9, memoryview(data)[9000:], success=success, max_pdu_data=4096)), chunk)
    assert all(isinstance(e, C2HDataReceived) and e.data_digest_ok for e in evs)
    assert [len(e.data) for e in evs] == [4096, 4096, 808, 4096, 4096, 2808]
    assert [e.last for e in evs] == [False] * 5 + [True]
    assert [e.success for e in evs] == [False] * 5 + [success]
    assert b"".join(e.data for e in evs) == data
    if success:
        assert t.outstanding == h.outstanding == 0
        with pytest.raises(LocalProtocolError):
            t.send_capsule_resp(CQE(cid=9))
    else:
        assert feed(h, t.send_capsule_resp(CQE(cid=9)), chunk) == [ResponseReceived(CQE(cid=9))]
    assert t.outstanding == h.outstanding == 0


def test_c2h_data_honours_the_hosts_alignment():
    h, t = connect(host=dict(hpda=7))  # 32-byte alignment
    t.receive_data(join(h.send_command(SQE(opcode=READ, cid=1), read_len=10)))
    b = join(t.send_c2h_data(1, b"0123456789", success=True))
    assert b[3] == 32 and b[24:32] == bytes(8)
    assert h.receive_data(b)[0].data == b"0123456789"


@pytest.mark.parametrize("mode", MODES)
def test_in_capsule_write(mode):
    h, t = connect(**mode)
    data = bytes(range(256)) * 16
    sent = join(h.send_command(SQE(opcode=WRITE, cid=3, nsid=1, cdw12=7), data=data))
    (ev,) = t.receive_data(sent)
    assert isinstance(ev, CommandReceived) and ev.cid == 3 and ev.sqe.cdw12 == 7
    assert ev.sgl == P.SglDescriptor(0, len(data), P.SGL_ICD)
    assert ev.sqe.psdt == 1  # the host marks the command as using SGLs
    assert bytes(ev.data) == data and ev.data_digest_ok
    with pytest.raises(LocalProtocolError):
        t.send_r2t(3)  # nothing left to ask for
    assert h.receive_data(t.send_capsule_resp(CQE(cid=3))) == [ResponseReceived(CQE(cid=3))]


def test_received_data_is_not_copied_when_a_pdu_arrives_whole():
    h, t = connect()
    wire = join(h.send_command(SQE(opcode=WRITE, cid=1), data=b"z" * 4096))
    (ev,) = t.receive_data(wire)
    assert ev.data.obj is wire


def test_command_without_data_and_outstanding_accounting():
    h, t = connect()
    for cid in range(5):
        (ev,) = t.receive_data(join(h.send_command(SQE(opcode=0, cid=cid))))
        assert ev.data is None and ev.sgl.length == 0
    assert t.outstanding == h.outstanding == 5
    for cid in range(5):
        h.receive_data(t.send_capsule_resp(CQE(cid=cid)))
    assert t.outstanding == h.outstanding == 0


def test_fabrics_commands_may_carry_8k_in_capsule_whatever_ioccsz_says():
    h, t = connect(host=dict(max_icd=icd_limit(4)), target=dict(max_icd=icd_limit(4)))  # IOCCSZ 4: no ICD
    assert icd_limit(4) == 0 and icd_limit(260) == 4096
    connect_data = bytes(1024)
    (ev,) = t.receive_data(join(h.send_command(SQE(opcode=FABRICS, cid=1, cdw10=1), data=connect_data)))
    assert ev.sgl.identifier == P.SGL_ICD and len(ev.data) == 1024
    # an I/O write of the same size does not fit: the host uses R2T
    (ev,) = t.receive_data(join(h.send_command(SQE(opcode=WRITE, cid=2), data=connect_data)))
    assert ev.data is None and ev.sgl.identifier == P.SGL_TRANSPORT


def test_r2t_rules_for_the_caller():
    h, t = connect(host=dict(maxr2t=0))
    t.receive_data(join(h.send_command(SQE(opcode=WRITE, cid=1), data=bytes(10000), in_capsule=False)))
    with pytest.raises(LocalProtocolError):
        t.send_r2t(2)  # unknown command
    assert decode_pdu(t.send_r2t(1, 20000), controller=False).r2tl == 10000  # "at most"
    assert not t.can_send_r2t(1)
    h, t = connect(host=dict(maxr2t=0))
    t.receive_data(join(h.send_command(SQE(opcode=WRITE, cid=1), data=bytes(10000), in_capsule=False)))
    t.send_r2t(1, 4000)
    assert not t.can_send_r2t(1)
    with pytest.raises(LocalProtocolError):
        t.send_r2t(1)  # MAXR2T 0: one at a time
    with pytest.raises(LocalProtocolError):
        t.send_capsule_resp(CQE(cid=1))  # the host may be sending: wait for the window
    with pytest.raises(LocalProtocolError):
        t.send_c2h_data(1, b"x")  # a write does not return data


def test_term_req_from_the_host_ends_the_connection():
    h, t = connect()
    wire = join(h.send_command(SQE(cid=1))) + encode_pdu(H2CTermReq(Fes.PDU_SEQUENCE_ERROR, 0, b"hdr"))
    evs = t.receive_data(wire + b"trailing junk that is ignored")
    assert isinstance(evs[0], CommandReceived)
    assert evs[1] == TermReqReceived(Fes.PDU_SEQUENCE_ERROR, 0, b"hdr")
    assert t.state is ConnState.TERMINATED
    assert t.receive_data(b"more") == []
    with pytest.raises(LocalProtocolError):
        t.send_capsule_resp(CQE(cid=1))


def test_local_termination():
    h, t = connect()
    term = t.send_term_req(Fes.DATA_OUT_OF_RANGE)
    assert t.state is ConnState.TERMINATED
    assert h.receive_data(term) == [TermReqReceived(Fes.DATA_OUT_OF_RANGE, 0, b"")]
    assert h.state is ConnState.TERMINATED


def test_eof():
    h, t = connect()
    assert t.receive_data(b"") == [ConnectionClosed(False)]
    h, t = connect()
    t.receive_data(join(h.send_command(SQE(cid=1)))[:30])
    assert t.receive_data(b"") == [ConnectionClosed(True)]
    assert t.state is ConnState.TERMINATED


# ------------------------------------------------------------------------------------------ violations
def violation(t: TargetConnection, wire: bytes, fes: int, fei: int) -> ProtocolError:
    with pytest.raises(ProtocolError) as ei:
        t.receive_data(wire)
    err = ei.value
    assert (err.fes, err.fei) == (fes, fei), str(err)
    assert t.state is ConnState.TERMINATED and t.term_req == err.term_req
    assert t.receive_data(b"anything") == []
    return err


def poke(b: bytes, off: int, fmt: str, value: int) -> bytes:
    out = bytearray(b)
    struct.pack_into(fmt, out, off, value)
    return bytes(out)


def test_command_before_icreq_is_a_sequence_error():
    t = TargetConnection()
    wire = encode_pdu(CapsuleCmd(SQE(cid=1)))
    err = violation(t, wire, Fes.PDU_SEQUENCE_ERROR, 0)
    assert host_term(err).data == wire[:8]  # found from the common header: that is what is copied


def test_second_icreq_is_a_sequence_error():
    _h, t = connect()
    violation(t, encode_pdu(IcReq()), Fes.PDU_SEQUENCE_ERROR, 0)


def test_bad_icreq_fields():
    err = violation(TargetConnection(), poke(encode_pdu(IcReq()), 8, "<H", 1), Fes.INVALID_HEADER_FIELD, 8)
    term = host_term(err)
    assert len(term.data) == 128 and len(err.term_req) == 152  # the whole ICReq header is copied
    violation(TargetConnection(), poke(encode_pdu(IcReq()), 10, "<B", 40), Fes.INVALID_HEADER_FIELD, 10)
    violation(TargetConnection(), poke(encode_pdu(IcReq()), 4, "<I", 127), Fes.INVALID_HEADER_FIELD, 4)


def test_controller_bound_only():
    _h, t = connect()
    violation(t, encode_pdu(IcResp()), Fes.INVALID_HEADER_FIELD, 0)
    _h, t = connect()
    violation(t, bytes([8]) + bytes(23), Fes.INVALID_HEADER_FIELD, 0)


def test_in_capsule_data_limits():
    _h, t = connect(target=dict(max_icd=4096))
    sqe = SQE(opcode=WRITE, cid=1)
    sqe.prp1, sqe.prp2 = sgl_fields(5000, P.SGL_ICD)
    violation(t, encode_pdu(CapsuleCmd(sqe, bytes(5000))), Fes.DATA_LIMIT_EXCEEDED, 0)
    _h, t = connect(target=dict(max_icd=4096))
    sqe.prp2 = sgl_fields(9000, P.SGL_ICD)[1]
    big = encode_pdu(CapsuleCmd(sqe, bytes(9000)))
    violation(t, big[:100], Fes.DATA_LIMIT_EXCEEDED, 0)  # refused from the header, before the data arrives


def test_duplicate_cid():
    _h, t = connect()
    wire = encode_pdu(CapsuleCmd(SQE(cid=7)))
    t.receive_data(wire)
    violation(t, wire, Fes.INVALID_HEADER_FIELD, P.OFF_CMD_CID)


def test_header_digest_error():
    h, t = connect(host=dict(hdgst=True))
    wire = bytearray(join(h.send_command(SQE(cid=1, nsid=5))))
    wire[12] ^= 0x01
    err = violation(t, bytes(wire), Fes.HEADER_DIGEST_ERROR, struct.unpack_from("<I", wire, 72)[0])
    assert host_term(err).data == bytes(wire[:72])


def test_data_digest_error_fails_the_command_not_the_connection():
    h, t = connect(host=dict(ddgst=True))
    wire = bytearray(join(h.send_command(SQE(opcode=WRITE, cid=1), data=b"a" * 64)))
    wire[80] ^= 0xFF
    (ev,) = t.receive_data(bytes(wire))
    assert isinstance(ev, CommandReceived) and not ev.data_digest_ok
    assert t.state is ConnState.READY


def write_with_r2t(maxh2cdata=4096, total=16384, r2t_len=8192):
    h, t = connect(target=dict(maxh2cdata=maxh2cdata), host=dict(maxr2t=1))
    t.receive_data(join(h.send_command(SQE(opcode=WRITE, cid=1), data=bytes(total), in_capsule=False)))
    t.receive_data(join(h.send_command(SQE(opcode=WRITE, cid=2), data=bytes(total), in_capsule=False)))
    r2ts = h.receive_data(t.send_r2t(1, r2t_len))
    return h, t, r2ts[0]


def test_h2c_data_beyond_maxh2cdata():
    _h, t, r2t = write_with_r2t()
    violation(t, encode_pdu(H2CData(1, r2t.ttag, 0, bytes(8192), True)), Fes.DATA_LIMIT_EXCEEDED, 0)


def test_h2c_data_for_unknown_ttag_or_cid():
    _h, t, r2t = write_with_r2t()
    violation(t, encode_pdu(H2CData(1, r2t.ttag + 1, 0, bytes(4096))), Fes.INVALID_HEADER_FIELD, P.OFF_TTAG)
    _h, t, r2t = write_with_r2t()
    violation(t, encode_pdu(H2CData(9, r2t.ttag, 0, bytes(4096))), Fes.INVALID_HEADER_FIELD, P.OFF_CCCID)
    _h, t, r2t = write_with_r2t()  # the tag belongs to command 1, not 2
    violation(t, encode_pdu(H2CData(2, r2t.ttag, 0, bytes(4096))), Fes.INVALID_HEADER_FIELD, P.OFF_TTAG)


def test_h2c_data_outside_the_window_or_out_of_order():
    h, t, r2t = write_with_r2t()
    violation(t, encode_pdu(H2CData(1, r2t.ttag, 8192, bytes(4096))), Fes.DATA_OUT_OF_RANGE, 0)
    h, t, r2t = write_with_r2t()
    violation(t, encode_pdu(H2CData(1, r2t.ttag, 4096, bytes(4096), True)), Fes.PDU_SEQUENCE_ERROR, 0)
    h, t, r2t = write_with_r2t()  # LAST_PDU too early
    violation(t, encode_pdu(H2CData(1, r2t.ttag, 0, bytes(4096), True)), Fes.PDU_SEQUENCE_ERROR, 0)
    h, t, r2t = write_with_r2t()  # LAST_PDU missing at the end of the window
    t.receive_data(encode_pdu(H2CData(1, r2t.ttag, 0, bytes(4096))))
    violation(t, encode_pdu(H2CData(1, r2t.ttag, 4096, bytes(4096))), Fes.PDU_SEQUENCE_ERROR, 0)
    h, t, r2t = write_with_r2t()  # a finished window's tag is dead
    t.receive_data(join(h.send_h2c_data(r2t.ttag)))
    violation(t, encode_pdu(H2CData(1, r2t.ttag, 0, bytes(4096))), Fes.INVALID_HEADER_FIELD, P.OFF_TTAG)


def test_term_req_with_invalid_length_closes_silently():
    _h, t = connect()
    bad = bytearray(encode_pdu(H2CTermReq(1, 0, bytes(8))))
    struct.pack_into("<I", bad, 4, 400)
    err = violation(t, bytes(bad), 0, P.OFF_PLEN)
    assert err.term_req == b""


def test_events_before_the_bad_pdu_are_kept():
    h, t = connect()
    good = join(h.send_command(SQE(cid=1))) + join(h.send_command(SQE(cid=2)))
    with pytest.raises(ProtocolError) as ei:
        t.receive_data(good + encode_pdu(IcReq()))
    assert [e.cid for e in ei.value.events] == [1, 2]


# ------------------------------------------------------------------------------------------ host side checks
def host_violation(h, wire, fes, fei):
    with pytest.raises(ProtocolError) as ei:
        h.receive_data(wire)
    assert (ei.value.fes, ei.value.fei) == (fes, fei), str(ei.value)
    term = decode_pdu(ei.value.term_req, controller=True)
    assert isinstance(term, H2CTermReq) and term.fes == fes


def test_host_checks_what_the_target_sends():
    h, _ = connect(host=dict(maxr2t=0))
    h.send_command(SQE(opcode=READ, cid=1), read_len=100)
    host_violation(h, encode_pdu(C2HData(2, 0, b"x" * 100, True)), Fes.INVALID_HEADER_FIELD, P.OFF_CCCID)
    h, _ = connect()
    h.send_command(SQE(opcode=READ, cid=1), read_len=100)
    host_violation(h, encode_pdu(C2HData(1, 50, b"x" * 100, True)), Fes.DATA_OUT_OF_RANGE, 0)
    h, _ = connect()
    h.send_command(SQE(opcode=READ, cid=1), read_len=100)
    host_violation(h, encode_pdu(C2HData(1, 10, b"x" * 10)), Fes.PDU_SEQUENCE_ERROR, 0)
    h, _ = connect()
    host_violation(h, encode_pdu(CapsuleResp(CQE(cid=4))), Fes.INVALID_HEADER_FIELD, P.OFF_RSP_CID)
    h, _ = connect(host=dict(maxr2t=0))
    h.send_command(SQE(opcode=WRITE, cid=1), data=bytes(10000), in_capsule=False)
    h.receive_data(encode_pdu(R2T(1, 0, 0, 4096)))
    host_violation(h, encode_pdu(R2T(1, 1, 4096, 4096)), Fes.R2T_LIMIT_EXCEEDED, 0)
    h, _ = connect()
    h.send_command(SQE(opcode=WRITE, cid=1), data=bytes(100), in_capsule=False)
    host_violation(h, encode_pdu(R2T(1, 0, 0, 200)), Fes.DATA_OUT_OF_RANGE, 0)


# ------------------------------------------------------------------------------------------ fuzzing
class FakeServer:
    """Plays the layer above a TargetConnection: answers the ICReq and asks for write data."""

    def __init__(self, t: TargetConnection) -> None:
        self.t = t
        self.writes: set[int] = set()

    def react(self, events) -> None:
        for ev in events:
            if isinstance(ev, IcReqReceived):
                self.t.send_icresp()
                continue
            if isinstance(ev, CommandReceived) and ev.sqe.opcode & 3 == 1:  # host-to-controller data
                self.writes.add(ev.cid)
            if isinstance(ev, CommandReceived | H2CDataReceived) and ev.cid in self.writes:
                for _ in range(4):  # a few at a time: a mutated ICReq may allow 2**32 of them
                    if not self.t.can_send_r2t(ev.cid):
                        break
                    self.t.send_r2t(ev.cid, 4096)


def drive(t: TargetConnection, pieces: list[bytes]) -> None:
    """Feed pieces; only events or a ProtocolError with a well-formed C2HTermReq may come out."""
    server = FakeServer(t)
    for piece in pieces:
        try:
            server.react(t.receive_data(piece))
        except ProtocolError as err:
            assert t.state is ConnState.TERMINATED
            if err.term_req:
                term = decode_pdu(err.term_req, controller=False)
                assert isinstance(term, C2HTermReq) and 1 <= term.fes <= 6
                assert len(err.term_req) <= P.TERM_MAX_PLEN
            else:
                assert err.fes == 0  # only a malformed termination request is answered by silence
            return
        if t.state is ConnState.TERMINATED:
            return


def valid_stream(hdgst: bool, ddgst: bool) -> list[bytes]:
    """What a correct host sends on one connection, in the pieces it sends them: in-capsule and R2T
    writes, a read, a no-data command. Replays must keep the pieces apart, since H2CData may only
    follow the R2T the target sends in reaction to an earlier piece."""
    h = HostConnection(hdgst=hdgst, ddgst=ddgst, maxr2t=1)
    t = TargetConnection(maxh2cdata=4096)
    out = [h.send_icreq()]
    t.receive_data(out[-1])
    h.receive_data(t.send_icresp())
    out.append(join(h.send_command(SQE(opcode=WRITE, cid=1, nsid=1), data=b"\x5a" * 700)))
    out.append(join(h.send_command(SQE(opcode=READ, cid=2, nsid=1), read_len=8192)))
    out.append(join(h.send_command(SQE(opcode=0, cid=3))))
    out.append(join(h.send_command(SQE(opcode=WRITE, cid=4), data=bytes(range(256)) * 40, in_capsule=False)))
    server = FakeServer(t)
    for piece in out[1:]:
        server.react(t.receive_data(piece))
    delivered: set[int] = set()
    while t._r2ts:  # answer every R2T the target sends, as a host would
        for ttag, w in list(t._r2ts.items()):
            if ttag not in delivered:
                delivered.add(ttag)
                h.receive_data(encode_pdu(R2T(w.cid, ttag, w.offset, w.length), hdgst=hdgst))
        for ttag in list(h._r2ts):
            piece = join(h.send_h2c_data(ttag))
            out.append(piece)
            server.react(t.receive_data(piece))
    return out


STREAMS = {(hd, dd): valid_stream(hd, dd) for hd in (False, True) for dd in (False, True)}


def chunks(piece: bytes, size: int | None) -> list[bytes]:
    return [piece] if not size else [piece[i : i + size] for i in range(0, len(piece), size)]


def test_valid_streams_are_accepted_whole_and_byte_by_byte():
    for (hd, dd), pieces in STREAMS.items():
        assert len(pieces) > 6  # ICReq, four commands, H2CData answering several R2Ts
        for size in (None, 1, 7):
            t = TargetConnection(maxh2cdata=4096)
            server = FakeServer(t)
            for piece in pieces:
                for c in chunks(piece, size):
                    server.react(t.receive_data(c))
            assert t.state is ConnState.READY and (t.hdgst, t.ddgst) == (hd, dd)
            assert not t._r2ts and t.outstanding == 4


def split_randomly(data: bytes, cuts: list[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    pieces, last = [], 0
    for p in [*points, len(data)]:
        pieces.append(data[last:p])
        last = p
    return [p for p in pieces if p]


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=8))
def test_fuzz_random_bytes_on_a_fresh_target(data, cuts):
    drive(TargetConnection(), split_randomly(data, cuts))


@FUZZ
@given(st.booleans(), st.booleans(), st.binary(max_size=400), st.lists(st.integers(0, 400), max_size=8))
def test_fuzz_random_bytes_after_a_valid_icreq(hd, dd, data, cuts):
    icreq = encode_pdu(IcReq(hdgst=hd, ddgst=dd))
    drive(TargetConnection(), [icreq, *split_randomly(data, cuts)])


mutations = st.lists(
    st.tuples(st.integers(0, 100), st.sampled_from(["flip", "set", "insert", "delete", "truncate", "drop"]),
              st.integers(0, 1 << 20), st.integers(0, 255)),
    min_size=1, max_size=6,
)


@FUZZ
@given(st.sampled_from(sorted(STREAMS)), mutations, st.lists(st.integers(0, 1 << 20), max_size=10))
def test_fuzz_mutated_valid_streams(key, muts, cuts):
    pieces = [bytearray(p) for p in STREAMS[key]]
    for which, op, pos, val in muts:
        if not pieces:
            break
        data = pieces[which % len(pieces)]
        i = pos % len(data) if data else 0
        if op == "flip" and data:
            data[i] ^= 1 << (val % 8)
        elif op == "set" and data:
            data[i] = val
        elif op == "insert":
            data[i:i] = bytes([val]) * (1 + val % 9)
        elif op == "delete" and data:
            del data[i : i + 1 + val % 9]
        elif op == "truncate":
            del data[i:]
        elif op == "drop":
            pieces.remove(data)
    drive(TargetConnection(maxh2cdata=4096), [c for p in pieces for c in split_randomly(bytes(p), cuts)])


@FUZZ
@given(st.sampled_from(sorted(STREAMS)), st.integers(0, 100), st.integers(0, 1 << 20), st.integers(0, 0xFFFFFFFF))
def test_fuzz_header_fields_of_valid_streams(key, which, pos, value):
    """Rewrite one 1, 2 or 4-byte little-endian value in the header part of one piece of a valid stream."""
    pieces = [bytearray(p) for p in STREAMS[key]]
    data = pieces[which % len(pieces)]
    i = pos % min(len(data) - 4, 80)  # the headers: common header, PDU header, header digest
    fmt = ("<B", "<H", "<I")[value % 3]
    struct.pack_into(fmt, data, i, value & {"<B": 0xFF, "<H": 0xFFFF, "<I": 0xFFFFFFFF}[fmt])
    drive(TargetConnection(maxh2cdata=4096), [bytes(p) for p in pieces])


def test_c2h_term_req_events_on_the_host():
    h, _t = connect()
    evs = h.receive_data(encode_pdu(C2HTermReq(Fes.HEADER_DIGEST_ERROR, 0xABCD, b"x" * 24)))
    assert evs == [TermReqReceived(Fes.HEADER_DIGEST_ERROR, 0xABCD, b"x" * 24)]
    assert h.state is ConnState.TERMINATED


def test_r2t_tags_are_unique_and_recycled():
    h, t = connect(host=dict(maxr2t=200))
    t.receive_data(join(h.send_command(SQE(opcode=WRITE, cid=1), data=bytes(4096 * 100), in_capsule=False)))
    tags = []
    while t.can_send_r2t(1):
        r2t = decode_pdu(t.send_r2t(1, 4096), controller=False)
        assert isinstance(r2t, R2T)
        tags.append(r2t.ttag)
    assert len(set(tags)) == len(tags) == 100
