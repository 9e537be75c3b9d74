"""The NVMe/TCP target over real asyncio TCP on 127.0.0.1, driven by the Python initiator (the host side
of connection.py): Connect and the dynamic controller model, properties, Identify's fabrics fields, R2T
and in-capsule writes, C2HData reads, discovery, Connect refusals, Keep Alive expiry, malformed PDUs,
Disconnect, exported-subsystem identity, digests, and a restart on the same data directory."""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nvme_lm.device.admin.exported import capabilities_for
from nvme_lm.device.exported import ExportedSubsystems
from nvme_lm.device.fabrics_controller import FabricsSubsystem
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.request import NvmeError, Request
from nvme_lm.device.subsystem import NvmSubsystem
from nvme_lm.fabrics import pdu as P
from nvme_lm.fabrics.initiator import FabricsCommandError, HostController, TcpQueue, get_log_sqe, identify_sqe, rw_sqe
from nvme_lm.fabrics.server import NvmeTcpTarget, parse_listen
from nvme_lm.spec import fabrics as fab
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import CQE, SQE
from nvme_lm.spec.identify import CMIC, OACS, IdentifyNamespace, NidType, decode_ns_descs, decode_nsid_list
from nvme_lm.spec.opcodes import AdminOpcode, IoOpcode
from nvme_lm.spec.registers import CC, CSTS, VS_2_1, Cap, Reg

HOST_A = "nqn.2014-08.org.example:host-a"
HOST_B = "nqn.2014-08.org.example:host-b"
LBA = 512
NSZE = (16 << 20) // LBA  # 16 MiB namespace


def run(coro: object) -> object:
    return asyncio.run(asyncio.wait_for(coro, 20))  # type: ignore[arg-type]


def code(cqe: CQE) -> tuple[int, int]:
    s = cqe.st
    return s.sct, s.sc


def status_code(s: st.Status) -> tuple[int, int]:
    return s.sct, s.sc


def pattern(n: int, seed: int) -> bytes:
    return bytes((i * 7 + seed) & 0xFF for i in range(256)) * (n // 256)


@contextlib.asynccontextmanager
async def serving(data_dir: Path, *, allowed: tuple[str, ...] = (), advertise: str | None = None,
                  model: DeviceModel | None = None) -> AsyncIterator[tuple[NvmeTcpTarget, FabricsSubsystem, int]]:
    nvm = NvmSubsystem(data_dir, model)
    if 1 not in nvm.namespaces:
        nvm.create_namespace(NSZE, LBA, nsid=1)
    sub = FabricsSubsystem.of_device(nvm, allowed_hosts=allowed)
    tgt = NvmeTcpTarget([sub], listen=[("127.0.0.1", 0)], advertise_addr=advertise, keep_alive_tick=0.02)
    ports = await tgt.start()
    try:
        yield tgt, sub, ports[0].port
    finally:
        await tgt.close()
        nvm.close()


async def admin_queue(port: int, subnqn: str, host: str = HOST_A, **kw: int) -> tuple[TcpQueue, int]:
    q = await TcpQueue.open("127.0.0.1", port)
    cqe = await q.connect(subnqn, host, **kw)
    assert cqe.ok, cqe.st
    return q, cqe.dw0 & 0xFFFF


# ------------------------------------------------------------------------------------------ admin queue
def test_admin_connect_properties_enable_and_identify(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (_, sub, port):
            q = await TcpQueue.open("127.0.0.1", port)
            before = await q.submit(identify_sqe(0x01), read_len=4096)  # nothing but Connect on a new queue
            assert code(before[0]) == status_code(st.INVALID_OPCODE)
            cqe = await q.connect(sub.nqn, HOST_A, sqsize=31)
            assert cqe.ok and cqe.sqhd == 1
            cntlid = cqe.dw0 & 0xFFFF
            assert 1 <= cntlid <= 0xFFEF and list(sub.controllers) == [cntlid]

            cap = Cap.decode(await q.property_get(Reg.CAP, 8))
            model = sub.model
            assert (cap.mqes, cap.to, cap.dstrd, cap.mpsmin, cap.mpsmax) == (
                model.max_queue_entries - 1, model.timeout_500ms, 0, 0, 0)
            assert cap.css & 0x01
            assert await q.property_get(Reg.VS) == VS_2_1
            assert await q.property_get(Reg.CSTS) == 0
            for sqe in (fab.property_get_sqe(0, Reg.CAP, 4), fab.property_get_sqe(0, Reg.AQA, 4),
                        fab.property_set_sqe(0, Reg.VS, 1), fab.property_get_sqe(0, Reg.CC, 8)):
                assert code((await q.submit(sqe))[0]) == status_code(st.INVALID_FIELD)
            # admin commands wait for CC.EN / CSTS.RDY
            assert code((await q.submit(identify_sqe(0x01), read_len=4096))[0]) == status_code(
                st.COMMAND_SEQUENCE_ERROR)

            await q.property_set(Reg.CC, CC.make(en=True))
            assert await q.property_get(Reg.CSTS) & CSTS.RDY
            assert await q.property_get(Reg.CC) == CC.make(en=True)

            from nvme_lm.spec.identify import IdentifyController
            _, data = await q.command(identify_sqe(0x01), read_len=4096)
            idc = IdentifyController.decode(data)
            assert idc.cntrltype == 1 and idc.cntlid == cntlid and idc.subnqn == sub.nqn
            assert (idc.ioccsz, idc.iorcsz, idc.icdoff, idc.fcatt, idc.msdbd) == ((64 + 8192) // 16, 1, 0, 0, 1)
            assert idc.sgls & 0x3 == 1 and idc.ofcs & 1 and idc.kas >= 1 and idc.maxcmd == cap.mqes + 1
            assert idc.cmic & CMIC.MULTI_CTRL and not idc.cmic & CMIC.SRIOV_VF
            assert idc.sn == sub.serial and idc.mn == model.model_number and idc.mdts == model.mdts
            # OACS follows the fabrics table: no Format, Namespace Management or Doorbell Buffer Config
            assert not idc.oacs & (OACS.FORMAT | OACS.NS_MGMT | OACS.DBBUF)

            _, logs = await q.command(get_log_sqe(0x00, 1024), read_len=1024)
            lids = [int.from_bytes(logs[4 * i : 4 * i + 4], "little") & 1 for i in range(256)]
            assert lids[0x02] and lids[0x05] and not lids[0x28]  # no rate limiting behind a fabric
            # no interrupts over a fabric; PCIe queue creation is not a fabrics command
            assert code((await q.submit(SQE(opcode=AdminOpcode.GET_FEATURES, cdw10=0x08)))[0]) == status_code(
                st.INVALID_FIELD)
            assert (await q.submit(SQE(opcode=AdminOpcode.GET_FEATURES, cdw10=0x07)))[0].ok
            assert code((await q.submit(SQE(opcode=AdminOpcode.CREATE_IO_CQ, cdw10=1 | 15 << 16)))[0]) == \
                status_code(st.INVALID_OPCODE)
            assert code((await q.submit(fab.connect_sqe(0, 0, 31)))[0]) == status_code(st.COMMAND_SEQUENCE_ERROR)
            await q.close()
    run(body())


def test_async_event_completes_from_the_loop(tmp_path: Path) -> None:
    """An AER stays outstanding until an event: a temperature threshold below the drive's temperature."""
    async def body() -> None:
        async with serving(tmp_path) as (_, sub, port):
            h = await HostController.connect("127.0.0.1", port, sub.nqn, HOST_A, io_queues=0)
            await h.admin.command(SQE(opcode=AdminOpcode.SET_FEATURES, cdw10=0x0B, cdw11=0x02))  # SMART temp.
            aer = asyncio.create_task(h.admin.submit(SQE(opcode=AdminOpcode.ASYNC_EVENT_REQUEST)))
            await asyncio.sleep(0.05)
            assert not aer.done()
            await h.admin.command(SQE(opcode=AdminOpcode.SET_FEATURES, cdw10=0x04, cdw11=300))  # 300 K
            cqe, _ = await aer
            assert cqe.ok and cqe.dw0 & 0x7 == 1 and (cqe.dw0 >> 16) & 0xFF == 0x02  # SMART, log 02h
            await h.close()
    run(body())


# ------------------------------------------------------------------------------------------ I/O
def test_io_write_read_r2t_in_capsule_and_pipelined(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (_, sub, port):
            h = await HostController.connect("127.0.0.1", port, sub.nqn, HOST_A, io_queues=2)
            assert [q.qid for q in h.io] == [1, 2]
            big = pattern(200 << 10, 1)  # R2T, then two H2CData PDUs (MAXH2CDATA 128 KiB)
            small = pattern(4096, 2)
            assert (await h.write(1, 0, big, LBA)).ok
            assert (await h.write(1, 1000, small, LBA, queue=1, in_capsule=True)).ok
            assert await h.read(1, 0, len(big) // LBA, LBA, queue=1) == big
            assert await h.read(1, 1000, 8, LBA) == small
            # many commands in flight on one queue at once, writes through R2T and in the capsule
            blocks = [pattern(8192, 10 + i) for i in range(16)]
            await asyncio.gather(*(h.write(1, 4096 + 16 * i, b, LBA, in_capsule=i % 2 == 0)
                                   for i, b in enumerate(blocks)))
            got = await asyncio.gather(*(h.read(1, 4096 + 16 * i, 16, LBA, queue=i % 2) for i in range(16)))
            assert got == blocks
            assert (await h.io[0].submit(SQE(opcode=IoOpcode.FLUSH, nsid=1)))[0].ok

            io = h.io[0]
            cqe, _ = await io.submit(rw_sqe(IoOpcode.READ, 1, NSZE - 1, 2), read_len=2 * LBA)
            assert code(cqe) == status_code(st.LBA_OUT_OF_RANGE)
            cqe, _ = await io.submit(rw_sqe(IoOpcode.READ, 1, 0, 8), read_len=LBA)  # SGL shorter than the read
            assert code(cqe) == status_code(st.DATA_SGL_LENGTH_INVALID)
            cqe, _ = await io.submit(rw_sqe(IoOpcode.READ, 2, 0, 1), read_len=LBA)
            assert code(cqe) == status_code(st.INVALID_NAMESPACE)
            # a command failing before its data moved: no R2T, just the error
            cqe, _ = await io.submit(SQE(opcode=0x7E, nsid=1), data=bytes(65536))
            assert code(cqe) == status_code(st.INVALID_OPCODE)
            errors = await h.get_log(0x01, 64)
            assert int.from_bytes(errors[0:8], "little") >= 4  # the newest error entry's count
            await h.close()
    run(body())


def test_request_transport_buffer() -> None:
    """Request.buffer: SGLs only, and the SGL must cover what the command moves."""
    buf = memoryview(bytearray(16))
    with pytest.raises(NvmeError) as e:
        Request(None, None, SQE(flags=0), buffer=buf).data_views(8, True)  # type: ignore[arg-type]
    assert e.value.status == st.INVALID_FIELD and e.value.pel == 1
    with pytest.raises(NvmeError) as e:
        Request(None, None, SQE(flags=0x40), buffer=buf).data_views(32, True)  # type: ignore[arg-type]
    assert e.value.status == st.DATA_SGL_LENGTH_INVALID
    views = Request(None, None, SQE(flags=0x40), buffer=buf).data_views(8, True)  # type: ignore[arg-type]
    assert len(views) == 1 and len(views[0]) == 8


# ------------------------------------------------------------------------------------------ discovery
def test_discovery_log_lists_the_subsystem(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, allowed=(HOST_A,), advertise="10.0.2.100") as (tgt, sub, port):
            d = await HostController.connect("127.0.0.1", port, fab.DISCOVERY_NQN, HOST_A)
            idc = await d.identify_controller()
            assert idc.cntrltype == 2 and idc.subnqn == fab.DISCOVERY_NQN and idc.cntlid == d.cntlid
            head = fab.DiscoveryLogHeader.decode(await d.get_log(0x70, 1024))
            assert head.numrec == 1 and head.recfmt == 0
            _, entries = fab.decode_discovery_log(await d.get_log(0x70, 1024 * (1 + head.numrec)))
            (e,) = entries
            assert (e.trtype, e.adrfam, e.subtype, e.portid, e.cntlid) == (3, 1, 2, 1, 0xFFFF)
            assert (e.subnqn, e.traddr, e.trsvcid) == (sub.nqn, "10.0.2.100", str(port))
            assert e.treq == 0x4 and e.asqsz == 32  # secure channel not specified (as nvmet), SQ flow disable
            # a discovery controller has no I/O queues
            q = await TcpQueue.open("127.0.0.1", port)
            cqe = await q.connect(fab.DISCOVERY_NQN, HOST_A, qid=1, cntlid=d.cntlid, hostid=d.hostid)
            assert code(cqe) == status_code(fab.CONNECT_INVALID_PARAMETERS) and cqe.dw0 == fab.OFF_QID
            await q.close()
            # any host may discover, but sees only what it may connect to
            other = await HostController.connect("127.0.0.1", port, fab.DISCOVERY_NQN, HOST_B)
            assert fab.DiscoveryLogHeader.decode(await other.get_log(0x70, 1024)).numrec == 0
            assert tgt.discovery.controllers  # both discovery controllers are live
            await d.close()
            await other.close()
    run(body())


# ------------------------------------------------------------------------------------------ Connect refusals
def test_connect_refusals(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path, allowed=(HOST_A,)) as (_, sub, port):
            q = await TcpQueue.open("127.0.0.1", port)
            cqe = await q.connect("nqn.2014-08.org.example:nobody", HOST_A)
            assert code(cqe) == status_code(fab.CONNECT_INVALID_PARAMETERS) and cqe.dw0 == 1 << 16 | 256
            cqe = await q.connect(sub.nqn, HOST_B)
            assert code(cqe) == status_code(fab.CONNECT_INVALID_HOST) and cqe.dw0 == 1 << 16 | 512
            cqe = await q.connect(sub.nqn, HOST_A, cntlid=1)
            assert code(cqe) == status_code(fab.CONNECT_INVALID_PARAMETERS) and cqe.dw0 == 1 << 16 | 16
            cqe = await q.connect(sub.nqn, HOST_A, recfmt=1)
            assert code(cqe) == status_code(fab.CONNECT_INCOMPATIBLE_FORMAT)
            for sqsize in (0, 32):
                cqe = await q.connect(sub.nqn, HOST_A, sqsize=sqsize)
                assert code(cqe) == status_code(fab.CONNECT_INVALID_PARAMETERS) and cqe.dw0 == fab.OFF_SQSIZE
            cqe, _ = await q.submit(fab.connect_sqe(0, 0, 31), data=bytes(512))  # Connect data is 1024 bytes
            assert code(cqe) == status_code(st.DATA_SGL_LENGTH_INVALID)
            assert not sub.controllers
            cqe = await q.connect(sub.nqn, HOST_A, hostid=b"A" * 16)  # refusals leave the queue connectable
            assert cqe.ok
            cntlid = cqe.dw0

            io = await TcpQueue.open("127.0.0.1", port)
            cqe = await io.connect(sub.nqn, HOST_A, qid=1, cntlid=cntlid, hostid=b"A" * 16)
            assert code(cqe) == status_code(st.COMMAND_SEQUENCE_ERROR)  # not enabled yet
            await q.property_set(Reg.CC, CC.make(en=True))
            for kw, ipo in ((dict(cntlid=cntlid + 1, hostid=b"A" * 16), 1 << 16 | 16),
                            (dict(cntlid=cntlid, hostid=b"B" * 16), 1 << 16 | 16),
                            (dict(cntlid=cntlid, hostid=b"A" * 16, qid=sub.model.max_io_queues + 1), fab.OFF_QID),
                            (dict(cntlid=cntlid, hostid=b"A" * 16, sqsize=0), fab.OFF_SQSIZE)):
                cqe = await io.connect(sub.nqn, HOST_A, **{"qid": 1, **kw})  # type: ignore[arg-type]
                assert code(cqe) == status_code(fab.CONNECT_INVALID_PARAMETERS) and cqe.dw0 == ipo, kw
            assert (await io.connect(sub.nqn, HOST_A, qid=1, cntlid=cntlid, hostid=b"A" * 16)).ok
            io2 = await TcpQueue.open("127.0.0.1", port)
            cqe = await io2.connect(sub.nqn, HOST_A, qid=1, cntlid=cntlid, hostid=b"A" * 16)
            assert code(cqe) == status_code(st.COMMAND_SEQUENCE_ERROR)  # QID 1 is taken
            for x in (q, io, io2):
                await x.close()
    run(body())


# ------------------------------------------------------------------------------------------ Keep Alive
def test_keep_alive_timeout_tears_the_controller_down(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (_, sub, port):
            h = await HostController.connect("127.0.0.1", port, sub.nqn, HOST_A, kato=300)
            kato = (await h.admin.command(SQE(opcode=AdminOpcode.GET_FEATURES, cdw10=0x0F)))[0].dw0
            assert kato == 300
            for _ in range(6):  # Keep Alive every 100 ms keeps it alive well past KATO
                await asyncio.sleep(0.1)
                await h.keep_alive()
            assert await h.read(1, 0, 1, LBA) == bytes(LBA)
            t0 = time.monotonic()
            await asyncio.wait_for(asyncio.gather(h.admin.closed.wait(), h.io[0].closed.wait()), 3)
            assert time.monotonic() - t0 >= 0.2
            assert h.cntlid not in sub.controllers
            q = await TcpQueue.open("127.0.0.1", port)  # the controller is gone for good
            cqe = await q.connect(sub.nqn, HOST_A, qid=1, cntlid=h.cntlid, hostid=h.hostid)
            assert code(cqe) == status_code(fab.CONNECT_INVALID_PARAMETERS)
            await q.close()
            await h.close()
    run(body())


# ------------------------------------------------------------------------------------------ bad input
def test_malformed_pdu_ends_only_that_connection(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (tgt, sub, port):
            a = await HostController.connect("127.0.0.1", port, sub.nqn, HOST_A)
            b = await HostController.connect("127.0.0.1", port, sub.nqn, HOST_B)
            data = pattern(8192, 3)
            await a.write(1, 0, data, LBA)
            # a host-bound PDU type (CapsuleResp) sent to the target: FES 01h at the type field
            b.io[0].write_raw(P.encode_pdu(P.CapsuleResp(CQE(cid=1))))
            await asyncio.wait_for(b.io[0].closed.wait(), 3)
            term = b.io[0].term_req
            assert term is not None and (term.fes, term.fei) == (P.Fes.INVALID_HEADER_FIELD, 0)
            # everything else goes on: the other association, and B's own admin queue
            assert await a.read(1, 0, 16, LBA) == data
            assert (await b.identify_controller()).cntlid == b.cntlid
            b.io.pop()
            await b.add_io_queues(1)  # QID 1 was deleted with its connection: B connects it again
            assert await b.read(1, 0, 16, LBA) == data
            # garbage before any ICReq, and a PLEN that would make us buffer 4 GiB
            raw = await TcpQueue.open("127.0.0.1", port)
            raw.write_raw(bytes([P.PduType.CAPSULE_CMD, 0, 72, 0]) + (0xFFFFFFFF).to_bytes(4, "little"))
            await asyncio.wait_for(raw.closed.wait(), 3)
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(os.urandom(64))
            assert len(await asyncio.wait_for(reader.read(1 << 16), 3)) in (0, 24 + 8)  # C2HTermReq or nothing
            writer.close()
            assert await a.read(1, 0, 16, LBA) == data
            await a.close()
            await b.close()
            await raw.close()
            assert tgt.connections <= 3
    run(body())


def test_disconnect_deletes_an_io_queue(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (_, sub, port):
            h = await HostController.connect("127.0.0.1", port, sub.nqn, HOST_A)
            cqe, _ = await h.admin.submit(fab.disconnect_sqe(0))
            assert code(cqe) == status_code(fab.INVALID_QUEUE_TYPE)  # not on the admin queue
            io = h.io.pop()
            assert (await io.submit(fab.disconnect_sqe(0)))[0].ok
            await asyncio.wait_for(io.closed.wait(), 3)
            assert 1 not in sub.controllers[h.cntlid].sqs
            await h.add_io_queues(1)
            assert await h.read(1, 0, 1, LBA) == bytes(LBA)
            await h.close()
    run(body())


# ------------------------------------------------------------------------------------------ transport options
def test_header_and_data_digests(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (_, sub, port):
            h = await HostController.connect("127.0.0.1", port, sub.nqn, HOST_A, hdgst=True, ddgst=True)
            assert h.admin.conn.hdgst and h.admin.conn.ddgst and h.io[0].conn.ddgst
            data = pattern(64 << 10, 5)
            await h.write(1, 64, data, LBA)
            await h.write(1, 0, data[:4096], LBA, in_capsule=True)
            assert await h.read(1, 64, len(data) // LBA, LBA) == data
            assert await h.read(1, 0, 8, LBA) == data[:4096]
            # Number of Queues granted one I/O queue: QID 2 is refused, and the grant cannot change now
            q = await TcpQueue.open("127.0.0.1", port)
            cqe = await q.connect(sub.nqn, HOST_A, qid=2, cntlid=h.cntlid, hostid=h.hostid)
            assert code(cqe) == status_code(fab.CONNECT_INVALID_PARAMETERS) and cqe.dw0 == fab.OFF_QID
            cqe, _ = await h.admin.submit(SQE(opcode=AdminOpcode.SET_FEATURES, cdw10=0x07, cdw11=1 | 1 << 16))
            assert code(cqe) == status_code(st.COMMAND_SEQUENCE_ERROR)
            await h.close()
            await q.close()
    run(body())


def test_read_with_sq_flow_control_disabled(tmp_path: Path) -> None:
    async def body() -> None:
        async with serving(tmp_path) as (_, sub, port):
            h = await HostController.connect("127.0.0.1", port, sub.nqn, HOST_A, io_queues=0)
            await h.admin.command(SQE(opcode=AdminOpcode.SET_FEATURES, cdw10=0x07, cdw11=0))
            q = await TcpQueue.open("127.0.0.1", port)
            cqe = await q.connect(sub.nqn, HOST_A, qid=1, cntlid=h.cntlid, hostid=h.hostid,
                                  cattr=fab.CATTR_DISABLE_SQ_FLOW)
            assert cqe.ok and cqe.sqhd == 0xFFFF
            data = pattern(4096, 6)
            wcqe, _ = await q.command(rw_sqe(IoOpcode.WRITE, 1, 8, 8), data=data)
            assert wcqe.sqhd == 0xFFFF
            before = q.conn.outstanding
            rcqe, got = await q.command(rw_sqe(IoOpcode.READ, 1, 8, 8), read_len=4096)
            assert got == data and rcqe.sqhd == 0xFFFF and q.conn.outstanding == before  # SUCCESS, no response
            await q.close()
            await h.close()
    run(body())


# ------------------------------------------------------------------------------------------ identities
def test_exported_subsystem_identity_over_tcp(tmp_path: Path) -> None:
    """An exported NVM subsystem served over TCP shows its template's identity, its NQN and serial, its
    ENSID and exported namespace identifiers, with the template's limits (vendor-a's media pacing on)."""
    async def body() -> None:
        model = DeviceModel.builtin("vendor-a")
        nvm = NvmSubsystem(tmp_path / "ssd", model)
        nvm.create_namespace(NSZE, LBA, nsid=7)
        ex = ExportedSubsystems(nvm, capabilities_for(model), state_file=None)
        index = [t.name for t in ex.templates].index("generic-v1")
        esub = ex.create(index)
        ex.associate_namespace(esub.esubid, 1, 7)
        sub = FabricsSubsystem.of_exported(nvm, ex, esub)
        tgt = NvmeTcpTarget([sub], listen=[("127.0.0.1", 0)])
        port = (await tgt.start())[0].port
        try:
            h = await HostController.connect("127.0.0.1", port, esub.nqn, HOST_A)
            idc = await h.identify_controller()
            t = esub.template
            assert idc.mn == t.identify_controller["mn"] and idc.sn == esub.serial and idc.subnqn == esub.nqn
            assert idc.cntlid == h.cntlid and idc.mdts == t.ctrl("mdts") and idc.nn == t.ctrl("nn")
            assert idc.cntrltype == 1 and not idc.cmic & CMIC.SRIOV_VF and idc.ioccsz == (64 + 8192) // 16
            _, active = await h.admin.command(identify_sqe(0x02), read_len=4096)
            assert decode_nsid_list(active) == [1]
            _, nsd = await h.admin.command(identify_sqe(0x00, nsid=1), read_len=4096)
            assert IdentifyNamespace.decode(nsd).nsze == NSZE
            _, descs = await h.admin.command(identify_sqe(0x03, nsid=1), read_len=4096)
            assert (NidType.NGUID, esub.namespaces[1].nguid) in decode_ns_descs(descs)
            data = pattern(8192, 9)
            await h.write(1, 0, data, LBA)  # ENSID 1 is the underlying namespace 7
            assert await h.read(1, 0, 16, LBA) == data
            # the template's MDTS is enforced, not vendor-a's: a longer SGL is refused before anything moves,
            # and a command asking for more than MDTS within a shorter SGL fails as on PCIe
            mdts_blocks = (4096 << t.ctrl("mdts")) // LBA
            cqe, _ = await h.io[0].submit(rw_sqe(IoOpcode.READ, 1, 0, mdts_blocks + 1),
                                          read_len=(mdts_blocks + 1) * LBA)
            assert code(cqe) == status_code(st.DATA_SGL_LENGTH_INVALID)
            cqe, _ = await h.io[0].submit(rw_sqe(IoOpcode.READ, 1, 0, mdts_blocks + 1), read_len=LBA)
            assert code(cqe) == status_code(st.INVALID_FIELD)
            assert len(await h.read(1, 0, mdts_blocks, LBA)) == mdts_blocks * LBA
            await h.close()
        finally:
            await tgt.close()
            nvm.close()
    run(body())


def test_restart_on_the_same_data_dir_keeps_the_data(tmp_path: Path) -> None:
    async def body() -> None:
        data = pattern(32 << 10, 11)
        async with serving(tmp_path) as (_, sub, port):
            nqn = sub.nqn
            h = await HostController.connect("127.0.0.1", port, nqn, HOST_A)
            await h.write(1, 100, data, LBA)
            await h.shutdown()  # CC.SHN: the write cache reaches the file, SHST complete
            assert CSTS.shst(await h.admin.property_get(Reg.CSTS)) == 2
            await h.close()
        async with serving(tmp_path) as (_, sub, port):
            assert sub.nqn == nqn
            h = await HostController.connect("127.0.0.1", port, nqn, HOST_A)
            assert await h.read(1, 100, len(data) // LBA, LBA) == data
            await h.close()
    run(body())


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:4420") == ("127.0.0.1", 4420)
    assert parse_listen("0.0.0.0") == ("0.0.0.0", 4420)
    assert parse_listen("[::1]:8009") == ("::1", 8009)
    assert parse_listen("::1") == ("::1", 4420)
    with pytest.raises(FabricsCommandError):
        raise FabricsCommandError("x", CQE(status=st.INVALID_FIELD.field))


def test_pcie_and_tcp_hosts_share_the_namespace(ssd, driver, ns1) -> None:  # type: ignore[no-untyped-def]
    """The same namespace, the same handlers: what the PF's host writes through BAR0/DMA, a fabrics host
    reads over TCP, and the other way round."""
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 16)
    via_pcie = pattern(8192, 21)
    q.write(ns1.nsid, 32, via_pcie, LBA)

    async def body() -> None:
        sub = FabricsSubsystem.of_device(ssd.subsystem)
        tgt = NvmeTcpTarget([sub], listen=[("127.0.0.1", 0)])
        port = (await tgt.start())[0].port
        try:
            h = await HostController.connect("127.0.0.1", port, sub.nqn, HOST_A)
            assert await h.read(ns1.nsid, 32, 16, LBA) == via_pcie
            await h.write(ns1.nsid, 64, pattern(4096, 22), LBA)
            idc = await h.identify_controller()
            assert idc.sn == ssd.subsystem.serial and idc.cntlid == h.cntlid and idc.cntlid in sub.controllers
            await h.close()
        finally:
            await tgt.close()
    run(body())
    assert q.read(ns1.nsid, 64, 8, LBA) == pattern(4096, 22)


def test_mutated_command_streams_never_hurt_the_server(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Valid streams (ICReq, Connect, Property Set, Identify, a write) with random bytes changed, each on its
    own connection: every one ends in responses or a termination, never in an internal error, and the
    target keeps serving."""
    import random

    from nvme_lm.fabrics.host_connection import HostConnection

    async def body() -> None:
        async with serving(tmp_path) as (_, sub, port):
            host = HostConnection()
            stream = bytearray(host.send_icreq())
            host.receive_data(P.encode_pdu(P.IcResp()))
            data = fab.ConnectData(hostid=bytes(16), cntlid=0xFFFF, subnqn=sub.nqn, hostnqn=HOST_A).encode()
            for cid, (sqe, kw) in enumerate(((fab.connect_sqe(0, 0, 31, kato=1000), {"data": data}),
                                             (fab.property_set_sqe(0, Reg.CC, CC.make(en=True)), {}),
                                             (identify_sqe(0x01), {"read_len": 4096}),
                                             (rw_sqe(IoOpcode.WRITE, 1, 0, 8), {"data": bytes(4096)})), 1):
                sqe.cid = cid
                stream += b"".join(bytes(b) for b in host.send_command(sqe, **kw))  # type: ignore[arg-type]
            rng = random.Random(7)
            for _ in range(40):
                mutated = bytearray(stream)
                for _ in range(rng.randint(1, 4)):
                    mutated[rng.randrange(len(mutated))] = rng.randrange(256)
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(bytes(mutated))
                with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                    await asyncio.wait_for(reader.read(1 << 16), 0.05)
                writer.close()
            for _ in range(100):  # every association ended with its connection
                if not sub.controllers:
                    break
                await asyncio.sleep(0.01)
            assert not sub.controllers
            h = await HostController.connect("127.0.0.1", port, sub.nqn, HOST_B)
            assert len(await h.read(1, 0, 1, LBA)) == LBA
            await h.close()
    run(body())
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")], caplog.text


def test_cli_target_serve_restarts_on_its_data_dir(tmp_path: Path) -> None:
    """`nvme-lm target serve` as a process: ready file, a host writes, SIGTERM stops it cleanly, a new
    process on the same data directory serves the same subsystem with the data."""
    import json
    import signal
    import subprocess
    import sys

    def start(ready: Path) -> subprocess.Popen[bytes]:
        cmd = [sys.executable, "-m", "nvme_lm.cli.main", "target", "serve", "--listen", "127.0.0.1:0",
               "--data-dir", str(tmp_path / "d"), "--size-mib", "4", "--allow-host", HOST_A,
               "--ready-file", str(ready)]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while not ready.exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read() if proc.stderr else ""
            time.sleep(0.05)
        return proc

    def stop(proc: subprocess.Popen[bytes]) -> str:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=15)
        assert proc.returncode == 0, err.decode()
        return err.decode()

    data = pattern(16 << 10, 31)
    info: dict[str, object] = {}
    for round_ in range(2):
        ready = tmp_path / f"ready{round_}.json"
        proc = start(ready)
        try:
            r = json.loads(ready.read_text())
            port, (nqn,) = r["ports"][0]["port"], r["subsystems"]
            info.setdefault("nqn", nqn)
            assert nqn == info["nqn"]

            async def body(first: bool = round_ == 0, port: int = port, nqn: str = nqn) -> None:
                h = await HostController.connect("127.0.0.1", port, nqn, HOST_A)
                if first:
                    await h.write(1, 8, data, LBA)  # no shutdown: SIGTERM must flush it
                else:
                    assert await h.read(1, 8, len(data) // LBA, LBA) == data
                await h.close()
                q = await TcpQueue.open("127.0.0.1", port)
                assert code(await q.connect(nqn, HOST_B)) == status_code(fab.CONNECT_INVALID_HOST)
                await q.close()

            run(body())
        finally:
            log = stop(proc)
        assert "connected admin queue" in log and "Connect Invalid Host" in log and "namespaces flushed" in log
