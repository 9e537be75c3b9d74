"""A small NVMe/TCP host in Python: asyncio TCP under connection.py's `HostConnection`.

Enough host to drive the target in tests and benchmarks, never a replacement for the kernel's
nvme-tcp: `TcpQueue` is one queue (one TCP connection): ICReq, then commands with their data
(in-capsule, R2T/H2CData, C2HData); `HostController` brings a controller up the way a fabrics host
does (admin Connect, Property Get CAP, Property Set CC.EN, wait for CSTS.RDY, I/O queue Connects).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from nvme_lm.fabrics.connection import (
    C2HDataReceived,
    IcRespReceived,
    ProtocolError,
    R2TReceived,
    ResponseReceived,
    TermReqReceived,
    icd_limit,
)
from nvme_lm.fabrics.host_connection import HostConnection
from nvme_lm.fabrics.pdu import FABRICS_ICD_MAX, Buffer
from nvme_lm.spec import fabrics as fab
from nvme_lm.spec.commands import CQE, SQE
from nvme_lm.spec.identify import IdentifyController
from nvme_lm.spec.opcodes import AdminOpcode, IoOpcode
from nvme_lm.spec.registers import CC, CSTS, Cap, Reg

DEFAULT_TIMEOUT = 10.0


class FabricsCommandError(Exception):
    """A command completed with an error status (`cqe` holds it)."""

    def __init__(self, what: str, cqe: CQE) -> None:
        super().__init__(f"{what}: {cqe.st} (DW0 {cqe.dw0:#x})")
        self.cqe = cqe


@dataclass(slots=True)
class _Pending:
    future: asyncio.Future[CQE] | None  # `submit`: awaited; `start`: None, `callback` instead
    data: bytearray | memoryview | None  # where the command's read data lands
    callback: Callable[[CQE | None], None] | None = None


class _QueueProtocol(asyncio.Protocol):
    """asyncio's callbacks for one TcpQueue: received bytes go straight to the state machine, with no
    reader task to wake and no stream buffer to copy through."""

    __slots__ = ("queue",)

    def __init__(self, queue: TcpQueue) -> None:
        self.queue = queue

    def data_received(self, data: bytes) -> None:
        self.queue._received(data)

    def eof_received(self) -> bool:
        return False  # close: connection_lost fails what is outstanding

    def connection_lost(self, exc: Exception | None) -> None:
        self.queue._lost(exc)


class TcpQueue:
    """One host-side queue: a TCP connection to the target with its own ICReq/ICResp.

    `submit()` awaits one command; `start()` sends one and returns at once (a callback takes the
    completion), so a caller keeps many in flight. PDUs sent while received PDUs are handled (a
    callback starting the next command, H2CData answering an R2T) leave in one write afterwards.
    """

    def __init__(self, conn: HostConnection, timeout: float) -> None:
        self.transport: asyncio.Transport | None = None
        self.conn = conn
        self.timeout = timeout
        self.qid = 0
        self.term_req: TermReqReceived | None = None  # a C2HTermReq the target ended the connection with
        self.error: BaseException | None = None  # why the connection ended
        self.closed = asyncio.Event()
        self._pending: dict[int, _Pending] = {}
        self._cids = itertools.cycle(range(1, 0xFFFF))
        self._icresp = asyncio.Event()
        self._out: list[Buffer] | None = None  # gathered while received events are handled

    @classmethod
    async def open(cls, host: str, port: int, *, hdgst: bool = False, ddgst: bool = False,
                   timeout: float = DEFAULT_TIMEOUT) -> TcpQueue:
        q = cls(HostConnection(hdgst=hdgst, ddgst=ddgst), timeout)
        loop = asyncio.get_running_loop()
        transport, _ = await asyncio.wait_for(loop.create_connection(lambda: _QueueProtocol(q), host, port), timeout)
        q.transport = transport  # type: ignore[assignment]
        q._send([q.conn.send_icreq()])
        await asyncio.wait_for(q._icresp.wait(), timeout)
        return q

    def write_raw(self, data: bytes) -> None:
        """Bytes straight onto the wire (tests of malformed PDUs)."""
        if self.transport is not None:
            self.transport.write(data)

    def _send(self, bufs: list[Buffer]) -> None:
        if self._out is not None:
            self._out += bufs
        elif self.transport is None or self.transport.is_closing():
            raise ConnectionError("queue closed")
        else:
            self.transport.writelines(bufs)  # type: ignore[arg-type]

    # ---- receive side (asyncio callbacks)
    def _received(self, data: bytes) -> None:
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as e:
            self.error = e
            if e.term_req and self.transport is not None:
                self.transport.write(e.term_req)
            self._close_transport()
            return
        out: list[Buffer] = []
        self._out = out
        try:
            for ev in events:
                self._on_event(ev)
        finally:
            self._out = None
            if out and self.transport is not None and not self.transport.is_closing():
                self.transport.writelines(out)  # type: ignore[arg-type]
        if self.term_req is not None:
            self.error = ConnectionError(f"target terminated the connection (FES {self.term_req.fes:#x})")
            self._close_transport()

    def _lost(self, exc: Exception | None) -> None:
        err = self.error or exc or ConnectionError("connection closed")
        self.error = err
        with contextlib.suppress(ProtocolError):
            self.conn.receive_data(b"")
        pending, self._pending = self._pending, {}
        for p in pending.values():
            if p.future is not None:
                if not p.future.done():
                    p.future.set_exception(err)
            elif p.callback is not None:
                p.callback(None)
        self._icresp.set()
        self.closed.set()

    def _close_transport(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def _complete(self, p: _Pending, cqe: CQE) -> None:
        if p.future is not None:
            if not p.future.done():
                p.future.set_result(cqe)
        elif p.callback is not None:
            p.callback(cqe)

    def _on_event(self, ev: object) -> None:
        if type(ev) is C2HDataReceived:
            p = self._pending[ev.cid]
            if p.data is not None:
                p.data[ev.offset : ev.offset + len(ev.data)] = ev.data
            if ev.success:  # completed without a CapsuleResp: status Successful, no SQHD
                del self._pending[ev.cid]
                self._complete(p, CQE(0, 0, 0xFFFF, self.qid, ev.cid, 0))
        elif type(ev) is ResponseReceived:
            p = self._pending.pop(ev.cqe.cid, None)
            if p is not None:
                self._complete(p, ev.cqe)
        elif isinstance(ev, R2TReceived):
            self._send(self.conn.send_h2c_data(ev.ttag))
        elif isinstance(ev, IcRespReceived):
            self._icresp.set()
        elif isinstance(ev, TermReqReceived):
            self.term_req = ev

    # ---- commands
    def _next_cid(self) -> int:
        if self.closed.is_set():
            raise ConnectionError("queue closed") from self.error
        if len(self._pending) >= 0xFFFE:
            raise RuntimeError("every command identifier is in use")
        cid = next(self._cids)
        while cid in self._pending:
            cid = next(self._cids)
        return cid

    def start(self, sqe: SQE, callback: Callable[[CQE | None], None], *, data: Buffer | None = None,
              read_into: bytearray | memoryview | None = None, in_capsule: bool | None = None) -> int:
        """Sends one command (its CID chosen here, `sqe.cid` ignored) and returns the CID at once.

        `callback(cqe)` runs on the event loop when it completes (`None`: the connection ended first,
        `error` says why); read data lands in `read_into` (its length is the transfer's). No future
        and no timer per command: a caller that wants a deadline keeps its own.
        """
        cid = self._next_cid()
        n = len(read_into) if read_into is not None else 0
        self._pending[cid] = _Pending(None, read_into, callback)
        try:
            self._send(self.conn.send_command(sqe, cid=cid, data=data, read_len=n, in_capsule=in_capsule))
        except BaseException:
            del self._pending[cid]
            raise
        return cid

    async def submit(self, sqe: SQE, *, data: Buffer | None = None, read_len: int = 0,
                     in_capsule: bool | None = None, timeout: float | None = None) -> tuple[CQE, bytes]:
        """Sends one command (its CID is chosen here) and waits for its completion and read data."""
        cid = self._next_cid()
        p = _Pending(asyncio.get_running_loop().create_future(), bytearray(read_len))
        self._pending[cid] = p
        try:
            self._send(self.conn.send_command(sqe, cid=cid, data=data, read_len=read_len, in_capsule=in_capsule))
        except BaseException:
            del self._pending[cid]
            raise
        assert p.future is not None
        cqe = await asyncio.wait_for(p.future, timeout or self.timeout)
        return cqe, bytes(p.data)  # type: ignore[arg-type]

    async def command(self, sqe: SQE, what: str = "", **kw: object) -> tuple[CQE, bytes]:
        """`submit`, raising FabricsCommandError when the status is not Successful."""
        cqe, data = await self.submit(sqe, **kw)  # type: ignore[arg-type]
        if not cqe.ok:
            raise FabricsCommandError(what or f"opcode {sqe.opcode:#x}", cqe)
        return cqe, data

    # ---- Fabrics commands
    async def connect(self, subnqn: str, hostnqn: str, *, qid: int = 0, cntlid: int = fab.CNTLID_DYNAMIC,
                      sqsize: int = 31, kato: int = 0, hostid: bytes = bytes(16), cattr: int = 0,
                      recfmt: int = 0) -> CQE:
        """Connect (returns the completion: DW0 is the CNTLID, or IPO/IATTR when refused)."""
        data = fab.ConnectData(hostid=hostid, cntlid=cntlid, subnqn=subnqn, hostnqn=hostnqn).encode()
        sqe = fab.connect_sqe(0, qid, sqsize, kato=kato, cattr=cattr, recfmt=recfmt)
        cqe, _ = await self.submit(sqe, data=data)
        if cqe.ok:
            self.qid = qid
        return cqe

    async def property_get(self, offset: int, size: int = 4) -> int:
        cqe, _ = await self.command(fab.property_get_sqe(0, offset, size), f"Property Get {offset:#x}")
        return cqe.dw0 | (cqe.dw1 << 32 if size == 8 else 0)

    async def property_set(self, offset: int, value: int, size: int = 4) -> None:
        await self.command(fab.property_set_sqe(0, offset, value, size), f"Property Set {offset:#x}")

    async def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.closed.wait(), self.timeout)


def identify_sqe(cns: int, nsid: int = 0, cntid: int = 0, csi: int = 0) -> SQE:
    return SQE(opcode=AdminOpcode.IDENTIFY, nsid=nsid, cdw10=cns | cntid << 16, cdw11=csi << 24)


def get_log_sqe(lid: int, length: int, *, nsid: int = 0xFFFFFFFF, offset: int = 0, rae: bool = False,
                lsp: int = 0) -> SQE:
    numd = length // 4 - 1
    return SQE(opcode=AdminOpcode.GET_LOG_PAGE, nsid=nsid,
               cdw10=lid | lsp << 8 | (int(rae) << 15) | (numd & 0xFFFF) << 16, cdw11=numd >> 16,
               cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32)


def rw_sqe(opcode: int, nsid: int, slba: int, nlb: int) -> SQE:
    return SQE(opcode=opcode, nsid=nsid, cdw10=slba & 0xFFFFFFFF, cdw11=slba >> 32, cdw12=(nlb - 1) & 0xFFFF)


@dataclass
class HostController:
    """A controller as a fabrics host brings it up: admin queue, enable, I/O queues."""

    admin: TcpQueue
    cntlid: int
    subnqn: str
    hostnqn: str
    hostid: bytes
    host: str
    port: int
    io: list[TcpQueue] = field(default_factory=list)
    cap: Cap | None = None

    @classmethod
    async def connect(cls, host: str, port: int, subnqn: str, hostnqn: str, *, kato: int = 0, io_queues: int = 1,
                      io_entries: int = 128, enable: bool = True, hdgst: bool = False, ddgst: bool = False,
                      hostid: bytes | None = None, disable_sqflow: bool = False,
                      timeout: float = DEFAULT_TIMEOUT) -> HostController:
        admin = await TcpQueue.open(host, port, hdgst=hdgst, ddgst=ddgst, timeout=timeout)
        hostid = hostid if hostid is not None else os.urandom(16)
        cqe = await admin.connect(subnqn, hostnqn, kato=kato, hostid=hostid)
        if not cqe.ok:
            await admin.close()
            raise FabricsCommandError("admin Connect", cqe)
        ctrl = cls(admin, cqe.dw0 & 0xFFFF, subnqn, hostnqn, hostid, host, port)
        ctrl.cap = Cap.decode(await admin.property_get(Reg.CAP, 8))
        if enable:
            await ctrl.enable()
            if io_queues and subnqn != fab.DISCOVERY_NQN:
                await ctrl.add_io_queues(io_queues, io_entries, hdgst=hdgst, ddgst=ddgst,
                                         disable_sqflow=disable_sqflow)
        return ctrl

    async def enable(self) -> None:
        await self.admin.property_set(Reg.CC, CC.make(en=True))
        deadline = time.monotonic() + self.admin.timeout
        while True:
            csts = await self.admin.property_get(Reg.CSTS)
            if csts & CSTS.CFS:
                raise RuntimeError(f"controller {self.cntlid} failed to enable (CSTS {csts:#x})")
            if csts & CSTS.RDY:
                return
            if time.monotonic() > deadline:
                raise TimeoutError("CSTS.RDY not set")
            await asyncio.sleep(0.001)

    async def add_io_queues(self, n: int, entries: int = 128, *, disable_sqflow: bool = False, **kw: bool) -> None:
        """`disable_sqflow` asks for no SQ flow control (Connect CATTR bit 2, as `nvme connect
        --disable-sqflow`): the target may then end a successful read with its last C2HData alone."""
        ident = await self.identify_controller()
        nq = n - 1
        await self.admin.command(SQE(opcode=AdminOpcode.SET_FEATURES, cdw10=0x07, cdw11=nq | nq << 16),
                                 "Set Features Number of Queues")
        for qid in range(len(self.io) + 1, len(self.io) + n + 1):
            q = await TcpQueue.open(self.host, self.port, timeout=self.admin.timeout, **kw)
            q.conn.max_icd = icd_limit(ident.ioccsz)
            cqe = await q.connect(self.subnqn, self.hostnqn, qid=qid, cntlid=self.cntlid, sqsize=entries - 1,
                                  hostid=self.hostid, cattr=fab.CATTR_DISABLE_SQ_FLOW if disable_sqflow else 0)
            if not cqe.ok:
                await q.close()
                raise FabricsCommandError(f"I/O Connect QID {qid}", cqe)
            self.io.append(q)

    async def identify_controller(self) -> IdentifyController:
        _, data = await self.admin.command(identify_sqe(0x01), "Identify Controller", read_len=4096)
        return IdentifyController.decode(data)

    async def get_log(self, lid: int, length: int, **kw: int | bool) -> bytes:
        _, data = await self.admin.command(get_log_sqe(lid, length, **kw), f"Get Log Page {lid:#x}",  # type: ignore[arg-type]
                                           read_len=length)
        return data

    async def keep_alive(self) -> None:
        await self.admin.command(SQE(opcode=AdminOpcode.KEEP_ALIVE), "Keep Alive")

    async def write(self, nsid: int, slba: int, data: Buffer, lba_size: int, *, queue: int = 0,
                    in_capsule: bool | None = None) -> CQE:
        nlb = len(data) // lba_size
        cqe, _ = await self.io[queue].command(rw_sqe(IoOpcode.WRITE, nsid, slba, nlb), "Write", data=data,
                                              in_capsule=in_capsule)
        return cqe

    async def read(self, nsid: int, slba: int, nlb: int, lba_size: int, *, queue: int = 0) -> bytes:
        _, data = await self.io[queue].command(rw_sqe(IoOpcode.READ, nsid, slba, nlb), "Read",
                                               read_len=nlb * lba_size)
        return data

    async def shutdown(self) -> None:
        """CC.SHN normal, then wait for SHST complete (the target flushes its write cache)."""
        cc = await self.admin.property_get(Reg.CC)
        await self.admin.property_set(Reg.CC, cc | 1 << 14)
        deadline = time.monotonic() + self.admin.timeout
        while CSTS.shst(await self.admin.property_get(Reg.CSTS)) != 2:
            if time.monotonic() > deadline:
                raise TimeoutError("shutdown did not complete")
            await asyncio.sleep(0.001)

    async def close(self) -> None:
        for q in self.io:
            await q.close()
        await self.admin.close()


__all__ = ["FABRICS_ICD_MAX", "FabricsCommandError", "HostController", "TcpQueue", "get_log_sqe", "identify_sqe",
           "rw_sqe"]
