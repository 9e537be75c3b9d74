"""The NVMe/TCP target: an asyncio server between TCP connections and fabrics controllers.

Each TCP connection is one queue. A `TargetConnection` (connection.py) turns its bytes into events;
this module answers the ICReq, runs Connect (device/fabrics_controller.py `connect`: dynamic
controllers, host and subsystem NQN checks, the allow-list), gathers each command's data (in the
capsule, or asked for with R2T and received as H2CData), runs the command on the controller with the
PCIe controllers' handlers, and sends the read data as C2HData and the completion as a CapsuleResp.
A discovery controller (the well-known NQN) answers the discovery log page (70h) with our subsystems
on the port the host came in through, at a configurable advertised address.

Handlers run on the event loop thread, straight from `data_received`: they are short (namespace I/O is
one preadv/pwritev). Completions the media pacer defers arrive from its thread and are handed to the
loop. A malformed PDU ends that connection with the C2HTermReq connection.py built; nothing a peer
sends stops the server. A host that lets KATO pass without a Keep Alive loses its controller (every
queue's connection is closed). `close()` ends every association and flushes the namespaces.
Formats and decisions: docs/nvme-tcp.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from nvme_lm.device.fabrics_controller import (
    ADMIN_QUEUE_ENTRIES,
    ConnectError,
    FabricsController,
    FabricsQueue,
    FabricsSubsystem,
    basic_refusal,
    connect,
    writes_data,
)
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.request import NvmeError, Request
from nvme_lm.fabrics.connection import (
    DEFAULT_MAXH2CDATA,
    CommandReceived,
    ConnectionClosed,
    H2CDataReceived,
    IcReqReceived,
    ProtocolError,
    TargetConnection,
    TermReqReceived,
    icd_limit,
)
from nvme_lm.fabrics.pdu import DEFAULT_PORT, FABRICS_ICD_MAX, Buffer
from nvme_lm.spec import fabrics as fab
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import CQE, SQE
from nvme_lm.spec.status import Status

log = logging.getLogger(__name__)

FORMAT_VERSION = 1  # version of the target's decisions (docs/nvme-tcp.md section 7), not a wire field
KEEP_ALIVE_TICK = 0.1  # s between Keep Alive deadline checks (KAS granularity is 100 ms)
_WILDCARDS = frozenset({"", "0.0.0.0", "::"})


@dataclass
class TcpPort:
    """A listening port: PORTID in discovery log entries, the address as configured, the bound port."""

    portid: int
    host: str
    port: int


def parse_listen(text: str) -> tuple[str, int]:
    """`HOST:PORT`, `[V6]:PORT` or `HOST` (port 4420)."""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else DEFAULT_PORT
    host, sep, port = text.rpartition(":")
    if not sep or ":" in host:
        return text, DEFAULT_PORT
    return host, int(port)


@dataclass(slots=True)
class _Cmd:
    """A command between its capsule and its completion."""

    sqe: SQE
    req: Request | None  # None: a Connect (no controller yet)
    length: int = 0  # SGL length of transport data
    buffer: Buffer | None = None
    to_host: bool = False  # the buffer goes back as C2HData when the command succeeds
    digest_ok: bool = True


class _TcpConnection(asyncio.Protocol):
    """One TCP connection = one NVMe queue (admin or I/O) of one controller, once connected."""

    def __init__(self, target: NvmeTcpTarget, port: TcpPort) -> None:
        self.target = target
        self.port = port
        self.conn = TargetConnection(maxh2cdata=target.maxh2cdata)
        self.transport: asyncio.Transport | None = None
        self.peer = "?"
        self.local_addr = ""
        self.queue: FabricsQueue | None = None
        self.cmds: dict[int, _Cmd] = {}
        self.closed = False
        self._out: list[Buffer] | None = None  # responses gathered while one received chunk is handled

    @property
    def name(self) -> str:
        q = self.queue
        if q is None:
            return f"{self.peer}"
        return f"{self.peer} [{q.ctrl.subsystem.nqn} ctrl {q.ctrl.cntlid} q{q.qid}]"

    # ---- asyncio callbacks
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        self.peer = f"{peer[0]}:{peer[1]}" if peer else "?"
        self.local_addr = local[0] if local else ""
        self.target._conns.add(self)
        log.debug("%s: connection accepted on port %d", self.peer, self.port.port)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            events = self.conn.receive_data(data)
        except ProtocolError as e:
            log.warning("%s: %s (FES %#x, FEI %#x): terminating the connection", self.name, e, e.fes, e.fei)
            self.abort(e.term_req)
            return
        self._out = []  # the responses to every command in this chunk leave in one write (one syscall)
        try:
            for ev in events:
                if self.closed:
                    break
                self._on_event(ev)
        except Exception:  # a bug here must cost one connection, never the server
            log.exception("%s: internal error; closing the connection", self.name)
            self.close()
        finally:
            self._flush()

    def eof_received(self) -> bool:
        return False  # let the transport close; connection_lost cleans up

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.target._conns.discard(self)
        q, self.queue = self.queue, None
        self.cmds.clear()
        if q is not None:
            log.info("%s: connection closed%s", f"{self.peer} [{q.ctrl.subsystem.nqn} ctrl {q.ctrl.cntlid} q{q.qid}]",
                     f" ({exc})" if exc else "")
            q.ctrl.remove_queue(q)

    def pause_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.pause_reading()  # the host does not read its responses: stop taking commands

    def resume_writing(self) -> None:
        if self.transport is not None and not self.closed:
            self.transport.resume_reading()

    # ---- output
    def _write(self, data: bytes) -> None:
        if self._out is not None:
            self._out.append(data)
        elif not self.closed and self.transport is not None:
            self.transport.write(data)

    def _writelines(self, bufs: list[Buffer]) -> None:
        if self._out is not None:
            self._out += bufs
        elif not self.closed and self.transport is not None:
            self.transport.writelines(bufs)  # type: ignore[arg-type]

    def _flush(self) -> None:
        out, self._out = self._out, None
        if out:
            self._writelines(out)

    def close(self) -> None:
        if self.closed:
            return
        self._flush()
        self.closed = True
        if self.transport is not None:
            self.transport.close()  # sends what is buffered, then closes

    def abort(self, term_req: bytes) -> None:
        self._flush()
        if term_req and self.transport is not None and not self.closed:
            self.transport.write(term_req)
        self.close()

    # ---- events
    def _on_event(self, ev: object) -> None:
        if isinstance(ev, CommandReceived):
            self._on_command(ev)
        elif isinstance(ev, H2CDataReceived):
            self._on_h2c(ev)
        elif isinstance(ev, IcReqReceived):
            self._write(self.conn.send_icresp())
        elif isinstance(ev, TermReqReceived):
            log.warning("%s: host terminated the connection (FES %#x, FEI %#x)", self.name, ev.fes, ev.fei)
            self.close()
        elif isinstance(ev, ConnectionClosed):
            self.close()

    def _on_command(self, ev: CommandReceived) -> None:
        sqe = ev.sqe
        q = self.queue
        if q is None:  # only a Connect may come first
            err = basic_refusal(sqe)
            if err is None and not (sqe.opcode == fab.FABRICS_OPCODE and fab.fctype(sqe) == fab.FabricsType.CONNECT):
                pel = fab.OFF_FCTYPE if sqe.opcode == fab.FABRICS_OPCODE else 0
                err = NvmeError(st.INVALID_OPCODE, "only Connect on a queue that is not connected", pel)
            if err is not None:
                log.warning("%s: %s", self.name, err)
                self._respond_raw(sqe, err.status)
                return
            self._gather(_Cmd(sqe, None), ev, FABRICS_ICD_MAX)
            return
        q.consumed()
        ctrl = q.ctrl
        req = Request(ctrl, q, sqe)  # type: ignore[arg-type]
        err = ctrl.refusal(req)
        if err is not None:
            self.cmds[sqe.cid] = _Cmd(sqe, req)
            ctrl.complete(req, err.status, err.pel)
            return
        self._gather(_Cmd(sqe, req), ev, ctrl.max_transfer)

    def _gather(self, cmd: _Cmd, ev: CommandReceived, limit: int) -> None:
        """The command's data: in the capsule, asked for with an R2T, or a buffer to fill and send back."""
        sqe = cmd.sqe
        self.cmds[sqe.cid] = cmd
        if not ev.data_digest_ok:
            self._fail(cmd, st.TRANSIENT_TRANSPORT_ERROR, 0xFFFF)  # in-capsule data damaged in transit
            return
        write = writes_data(sqe)
        if ev.data is not None:
            if not write:
                self._fail(cmd, st.INVALID_FIELD, 24)  # in-capsule data for a command that moves none in
                return
            cmd.buffer = ev.data
            self._run(cmd)
            return
        n = ev.sgl.length
        if n > limit:
            self._fail(cmd, st.DATA_SGL_LENGTH_INVALID, 24)
            return
        cmd.length = n
        if n and write:
            self._write(self.conn.send_r2t(sqe.cid))  # one R2T for all of it; the host splits by MAXH2CDATA
            return
        cmd.buffer = bytearray(n)
        cmd.to_host = n > 0
        self._run(cmd)

    def _on_h2c(self, ev: H2CDataReceived) -> None:
        cmd = self.cmds[ev.cid]  # connection.py checked the CID, TTAG and window
        if cmd.buffer is None:
            if ev.offset == 0 and len(ev.data) == cmd.length:
                cmd.buffer = ev.data  # all in one PDU: no copy
            else:
                cmd.buffer = bytearray(cmd.length)
        if cmd.buffer is not ev.data:
            memoryview(cmd.buffer)[ev.offset : ev.offset + len(ev.data)] = ev.data  # type: ignore[index]
        if not ev.data_digest_ok:
            cmd.digest_ok = False
        if ev.complete:
            if not cmd.digest_ok:
                self._fail(cmd, st.TRANSIENT_TRANSPORT_ERROR, 0xFFFF)
            else:
                self._run(cmd)
        elif ev.last and self.conn.can_send_r2t(ev.cid):
            self._write(self.conn.send_r2t(ev.cid))

    def _run(self, cmd: _Cmd) -> None:
        buf = cmd.buffer if cmd.buffer is not None else b""
        mv = buf if isinstance(buf, memoryview) else memoryview(buf)
        if cmd.req is None:
            self._connect(cmd, mv)
            return
        cmd.req.buffer = mv
        cmd.req.ctrl.execute(cmd.req, checked=True)  # type: ignore[attr-defined]

    def _fail(self, cmd: _Cmd, status: Status, pel: int) -> None:
        if cmd.req is None:
            self.cmds.pop(cmd.sqe.cid, None)
            self._respond_raw(cmd.sqe, status)
        else:
            cmd.req.ctrl.complete(cmd.req, status, pel)  # type: ignore[attr-defined]

    # ---- completions
    def _sink(self, req: Request, field: int) -> None:
        """FabricsQueue.sink: from the controller, on any thread."""
        t = self.target
        if threading.get_ident() != t._loop_thread and t._loop is not None:
            t._loop.call_soon_threadsafe(self._respond, req, field)
        else:
            self._respond(req, field)

    def _respond(self, req: Request, field: int) -> None:
        if self.closed:
            return
        q: FabricsQueue = req.sq  # type: ignore[assignment]
        cid = req.sqe.cid
        cmd = self.cmds.pop(cid, None)
        if field == 0 and cmd is not None and cmd.to_host and cmd.buffer is not None:
            # SUCCESS on the last C2HData saves the CapsuleResp, but it carries no SQHD: only without SQ
            # flow control, and only when the CQE would say nothing else (DW0, DW1 zero), as Linux does
            success = not q.sq_flow_control and req.dw0 == 0 and req.dw1 == 0
            self._writelines(self.conn.send_c2h_data(cid, cmd.buffer, success=success))
            if success:
                self._after_response(q)
                return
        self._write(self.conn.send_capsule_resp(CQE(req.dw0, req.dw1, q.sqhd, q.qid, cid, field)))
        self._after_response(q)

    def _after_response(self, q: FabricsQueue) -> None:
        if q.disconnect:
            log.info("%s: Disconnect: queue deleted", self.name)
            self.queue = None
            q.ctrl.remove_queue(q)
            self.close()

    def _respond_raw(self, sqe: SQE, status: Status, dw0: int = 0, sqid: int = 0) -> None:
        """A completion outside any controller (a refused Connect, a command on an unconnected queue)."""
        self.cmds.pop(sqe.cid, None)
        self._write(self.conn.send_capsule_resp(CQE(dw0, 0, 0, sqid, sqe.cid, status.field)))

    def _deleted(self) -> None:
        """FabricsQueue.on_delete: the controller deleted this queue (reset, teardown, Keep Alive expiry)."""
        t = self.target
        if threading.get_ident() != t._loop_thread and t._loop is not None:
            t._loop.call_soon_threadsafe(self._deleted)
            return
        self.queue = None
        self.close()

    # ---- Connect
    def _connect(self, cmd: _Cmd, data: memoryview) -> None:
        sqe = cmd.sqe
        f = fab.ConnectFields.of(sqe)

        def make_queue(ctrl: FabricsController, qid: int, entries: int, flow: bool) -> FabricsQueue:
            return FabricsQueue(ctrl, qid, entries, sq_flow_control=flow, sink=self._sink, on_delete=self._deleted,
                                owner=self)

        try:
            q = connect(self.target.find_subsystem, sqe, data, make_queue)
        except ConnectError as e:
            log.warning("%s: Connect (QID %d) refused: %s: %s", self.name, f.qid, fab.status_text(e.status), e)
            self._respond_raw(sqe, e.status, e.dw0, f.qid)
            return
        self.queue = q
        q.consumed()  # the Connect is the queue's first command
        ctrl = q.ctrl
        if q.qid:
            self.conn.max_icd = icd_limit(ctrl.subsystem.ioccsz)
        self.cmds.pop(sqe.cid, None)
        log.info("%s: host %s connected %s queue %d (%d entries%s) of controller %d, subsystem %s", self.peer,
                 ctrl.hostnqn, "admin" if q.qid == 0 else "I/O", q.qid, q.size,
                 ("" if q.sq_flow_control else ", no SQ flow control") + (", header digest" if self.conn.hdgst else "")
                 + (", data digest" if self.conn.ddgst else ""), ctrl.cntlid, ctrl.subsystem.nqn)
        self._write(self.conn.send_capsule_resp(CQE(ctrl.cntlid, 0, q.sqhd, q.qid, sqe.cid, 0)))


class NvmeTcpTarget:
    """Serves fabrics subsystems over NVMe/TCP, with a discovery controller, on one or more ports.

    `advertise_addr` is the TRADDR of discovery log entries (a guest behind user-mode networking reaches
    the host under another address); by default the address the host's discovery connection reached.
    """

    def __init__(self, subsystems: Iterable[FabricsSubsystem], *,
                 listen: Sequence[tuple[str, int]] = (("127.0.0.1", DEFAULT_PORT),),
                 advertise_addr: str | None = None, maxh2cdata: int = DEFAULT_MAXH2CDATA,
                 keep_alive_tick: float = KEEP_ALIVE_TICK, discovery_model: DeviceModel | None = None) -> None:
        self.subsystems: dict[str, FabricsSubsystem] = {}
        for sub in subsystems:
            if sub.nqn in self.subsystems or sub.nqn == fab.DISCOVERY_NQN:
                raise ValueError(f"subsystem NQN {sub.nqn} served twice")
            self.subsystems[sub.nqn] = sub
        first = next(iter(self.subsystems.values()), None)
        model = discovery_model or (first.model if first is not None else None)
        serial = f"{first.serial[:14]}-DISC" if first is not None else "NVMELM-DISC"
        self.discovery = FabricsSubsystem.for_discovery(self._discovery_log, model=model, serial=serial)
        self.listen = list(listen)
        self.advertise_addr = advertise_addr
        self.maxh2cdata = maxh2cdata
        self.keep_alive_tick = keep_alive_tick
        self.genctr = 1  # discovery log generation: the set of subsystems is fixed while serving
        self.ports: list[TcpPort] = []
        self._servers: list[asyncio.Server] = []
        self._conns: set[_TcpConnection] = set()
        self._watchdog: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0

    def find_subsystem(self, nqn: str) -> FabricsSubsystem | None:
        return self.discovery if nqn == fab.DISCOVERY_NQN else self.subsystems.get(nqn)

    def all_subsystems(self) -> list[FabricsSubsystem]:
        return [self.discovery, *self.subsystems.values()]

    @property
    def connections(self) -> int:
        return len(self._conns)

    # ---- lifecycle
    async def start(self) -> list[TcpPort]:
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        for portid, (host, port) in enumerate(self.listen, 1):
            tp = TcpPort(portid, host, port)
            server = await self._loop.create_server(lambda tp=tp: _TcpConnection(self, tp), host or None, port,
                                                    reuse_address=True)
            tp.port = server.sockets[0].getsockname()[1]  # the port bound (port 0: an ephemeral one)
            self._servers.append(server)
            self.ports.append(tp)
            log.info("NVMe/TCP target listening on %s:%d (port id %d)", host or "*", tp.port, portid)
        for sub in self.subsystems.values():
            log.info("serving %s: %d namespace(s)%s", sub.nqn, len(sub.namespaces),
                     f", hosts {sorted(sub.allowed_hosts)}" if sub.allowed_hosts else ", any host")
        self._watchdog = asyncio.create_task(self._keep_alive_watchdog())
        return list(self.ports)

    async def close(self) -> None:
        """Stops listening, ends every association (controllers torn down, connections closed) and
        flushes every namespace's write cache."""
        for server in self._servers:
            server.close()
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
        for sub in self.all_subsystems():
            for ctrl in list(sub.controllers.values()):
                ctrl.close()
        for conn in list(self._conns):
            conn.close()
        for _ in range(50):  # let the transports flush and report connection_lost
            if not self._conns:
                break
            await asyncio.sleep(0.01)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(server.wait_closed(), 1.0)
        self._servers.clear()
        for sub in self.subsystems.values():
            await asyncio.to_thread(sub.flush)
        log.info("NVMe/TCP target stopped; namespaces flushed")

    async def serve(self, stop: asyncio.Event) -> None:
        """start(), then serve until `stop` is set, then close()."""
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.close()

    async def _keep_alive_watchdog(self) -> None:
        while True:
            await asyncio.sleep(self.keep_alive_tick)
            now = time.monotonic()
            for sub in self.all_subsystems():
                for ctrl in list(sub.controllers.values()):
                    if ctrl.keep_alive_expired(now):
                        log.warning("controller %d of %s (host %s): no Keep Alive within KATO %d ms; tearing it "
                                    "down", ctrl.cntlid, sub.nqn, ctrl.hostnqn, ctrl.features.current.get(0x0F, 0))
                        ctrl.close()

    # ---- discovery
    def _discovery_log(self, req: Request) -> bytes:
        """Log page 70h: one entry per subsystem the host may reach, on the port it came in through."""
        conn = req.sq.owner  # type: ignore[attr-defined]
        port: TcpPort = conn.port
        traddr = self.advertise_addr or (port.host if port.host not in _WILDCARDS else conn.local_addr)
        try:
            adrfam = fab.AdrFam.IPV6 if ipaddress.ip_address(traddr).version == 6 else fab.AdrFam.IPV4
        except ValueError:
            adrfam = fab.AdrFam.IPV4  # a host name
        hostnqn = req.ctrl.hostnqn  # type: ignore[attr-defined]
        entries = [
            fab.DiscoveryLogEntry(
                trtype=fab.TrType.TCP, adrfam=adrfam, subtype=fab.SubType.NVME,
                # secure channel "not specified" (00b), as Linux's nvmet: libnvme 1.3 (nvme-cli 2.3) turns "not
                # required" into a `tls` option a 6.1 kernel refuses, so `nvme connect-all` failed (EINVAL)
                treq=fab.TREQ_DISABLE_SQ_FLOW_SUPPORTED,
                portid=port.portid, cntlid=fab.CNTLID_DYNAMIC, asqsz=ADMIN_QUEUE_ENTRIES, trsvcid=str(port.port),
                subnqn=sub.nqn, traddr=traddr,
            )
            for sub in self.subsystems.values() if sub.host_allowed(hostnqn)
        ]
        return fab.encode_discovery_log(self.genctr, entries)


__all__ = ["ADMIN_QUEUE_ENTRIES", "FORMAT_VERSION", "NvmeTcpTarget", "TcpPort", "parse_listen"]
