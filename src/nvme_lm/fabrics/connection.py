"""Sans-I/O NVMe/TCP connections: the shared machinery and the target (controller) side; the host side
is host_connection.py.

In the style of h11: `receive_data(bytes)` turns received bytes into events, `send_*()` turns what
the local side wants to say into buffers to write. Neither touches a socket; the asyncio server
(and the Python initiator) move the bytes. States: AWAIT_ICREQ (target) / IDLE -> AWAIT_ICRESP
(host) -> READY -> TERMINATED.

Anything the peer does wrong ends the connection: `receive_data` raises :class:`ProtocolError`,
which carries the termination request the state machine built (`term_req`: bytes to send before
closing; empty when the protocol says to close without one) and the events decoded before the bad
PDU in the same call. No other exception escapes `receive_data` for any input. Misuse by the local
caller (an R2T for an unknown command, say) raises :class:`LocalProtocolError`.

Payloads are never copied on the send side (the caller's buffer is one of the returned buffers);
on the receive side an event's data is a memoryview of the received `bytes` when the PDU arrived in
one piece, or of one private copy when it was split across `receive_data` calls.

Wire formats: pdu.py. Decisions and sources: docs/nvme-tcp.md.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

from nvme_lm.fabrics.pdu import (
    CH_LEN,
    FABRICS_ICD_MAX,
    FABRICS_OPCODE,
    HDGSTF,
    MAX_PDA,
    MIN_MAXH2CDATA,
    OFF_CCCID,
    OFF_CMD_CID,
    OFF_TTAG,
    SGL_TRANSPORT,
    TERM_MAX_DATA,
    Buffer,
    C2HData,
    C2HTermReq,
    CapsuleCmd,
    CapsuleResp,
    CommonHeader,
    Fes,
    H2CData,
    H2CTermReq,
    IcReq,
    IcResp,
    Pdu,
    PduError,
    PduType,
    SglDescriptor,
    attach_data,
    check_common_header,
    check_header_digest,
    decode_header,
    encode_pdu,
    receives,
    split,
)
from nvme_lm.fabrics.pdu import (
    R2T as R2TPdu,
)
from nvme_lm.spec.commands import CQE, SQE

DEFAULT_MAXH2CDATA = 128 << 10
DEFAULT_MAX_C2H_DATA = 128 << 10
_PSDT_SGL = 0x40  # SQE byte 1 bits 7:6 = 01b: SGLs for data (what Fabrics commands use)


class ConnState(Enum):
    IDLE = "IDLE"  # host, before send_icreq()
    AWAIT_ICREQ = "AWAIT_ICREQ"  # target
    AWAIT_ICRESP = "AWAIT_ICRESP"  # host
    READY = "READY"
    TERMINATED = "TERMINATED"


class ProtocolError(Exception):
    """The peer broke the protocol; the connection is over.

    Send `term_req` (a C2HTermReq from a target, an H2CTermReq from a host; empty means send
    nothing), then close. `events` are the valid events decoded before the bad PDU in the same
    `receive_data` call.
    """

    def __init__(self, fes: int, fei: int, message: str, term_req: bytes, events: list[Event]) -> None:
        super().__init__(message)
        self.fes = fes
        self.fei = fei
        self.term_req = term_req
        self.events = events


class LocalProtocolError(Exception):
    """The local caller asked for something the protocol (or the connection's state) does not allow."""


# ------------------------------------------------------------------------------------------ events
@dataclass(frozen=True, slots=True)
class IcReqReceived:
    """The host's ICReq; the target answers with `send_icresp()` (digests are already negotiated)."""

    pfv: int
    hpda: int
    hdgst: bool
    ddgst: bool
    maxr2t: int


@dataclass(frozen=True, slots=True)
class IcRespReceived:
    pfv: int
    cpda: int
    hdgst: bool
    ddgst: bool
    maxh2cdata: int


@dataclass(frozen=True, slots=True)
class CommandReceived:
    """A command capsule. `data` is the in-capsule data (None when there is none); data moved by the
    transport later (SGL identifier 5Ah) is `sgl.length` bytes, asked for with R2Ts (a write) or
    sent with C2HData (a read). A data digest error means: complete the command with Transient
    Transport Error."""

    sqe: SQE
    sgl: SglDescriptor
    data: memoryview | None
    data_digest_ok: bool = True

    @property
    def cid(self) -> int:
        return self.sqe.cid


@dataclass(frozen=True, slots=True)
class H2CDataReceived:
    """Data for an R2T. `last`: the R2T's window is complete (its tag is free again); `complete`:
    all of the command's data has arrived."""

    cid: int
    ttag: int
    offset: int
    data: memoryview
    last: bool
    complete: bool
    data_digest_ok: bool = True


@dataclass(frozen=True, slots=True)
class R2TReceived:
    cid: int
    ttag: int
    offset: int
    length: int


@dataclass(frozen=True, slots=True)
class C2HDataReceived:
    """Read data. `success` also completes the command (status Successful, no CapsuleResp follows)."""

    cid: int
    offset: int
    data: memoryview
    last: bool
    success: bool
    data_digest_ok: bool = True


@dataclass(frozen=True, slots=True)
class ResponseReceived:
    cqe: CQE


@dataclass(frozen=True, slots=True)
class TermReqReceived:
    """The peer terminated the connection (close it; send nothing back)."""

    fes: int
    fei: int
    header: bytes


@dataclass(frozen=True, slots=True)
class ConnectionClosed:
    """`receive_data(b"")`: the peer closed. `mid_pdu` when it did so in the middle of a PDU."""

    mid_pdu: bool


Event = (
    IcReqReceived
    | IcRespReceived
    | CommandReceived
    | H2CDataReceived
    | R2TReceived
    | C2HDataReceived
    | ResponseReceived
    | TermReqReceived
    | ConnectionClosed
)


# ------------------------------------------------------------------------------------------ receive buffer
class _RxBuffer:
    """Received bytes as a queue of chunks: a PDU inside one chunk is sliced, not copied."""

    __slots__ = ("_chunks", "_len")

    def __init__(self) -> None:
        self._chunks: deque[memoryview] = deque()
        self._len = 0

    def __len__(self) -> int:
        return self._len

    def append(self, data: Buffer) -> None:
        # Keep only immutable bytes: the caller may reuse a bytearray it handed us.
        mv = memoryview(data if isinstance(data, bytes) else bytes(data))
        if mv.format != "B" or mv.ndim != 1:
            mv = mv.cast("B")
        if len(mv):
            self._chunks.append(mv)
            self._len += len(mv)

    def clear(self) -> None:
        self._chunks.clear()
        self._len = 0

    def peek(self, n: int) -> memoryview:
        """The first `n` bytes (n <= len), contiguous; consecutive chunks are merged to do so."""
        first = self._chunks[0]
        if len(first) >= n:
            return first[:n]
        joined = bytearray()
        while len(joined) < n:
            joined += self._chunks.popleft()
        self._chunks.appendleft(memoryview(bytes(joined)))
        return self._chunks[0][:n]

    def take(self, n: int) -> memoryview:
        """Consume the first `n` bytes (n <= len)."""
        chunks = self._chunks
        first = chunks[0]
        self._len -= n
        if len(first) >= n:
            if len(first) == n:
                chunks.popleft()
            else:
                chunks[0] = first[n:]
            return first[:n]
        out = bytearray(n)
        pos = 0
        while pos < n:
            c = chunks[0]
            k = min(len(c), n - pos)
            out[pos : pos + k] = c[:k]
            pos += k
            if k == len(c):
                chunks.popleft()
            else:
                chunks[0] = c[k:]
        return memoryview(out)


_NEED_MORE = object()


# ------------------------------------------------------------------------------------------ shared machinery
class _Connection:
    """Framing, validation order and termination shared by both sides."""

    _controller: ClassVar[bool]

    def __init__(self, state: ConnState, rxpda: int) -> None:
        self.state = state
        self.hdgst = False
        self.ddgst = False
        self._rxpda = rxpda  # alignment we asked the peer for, on data it sends us
        self._txpda = 0  # alignment the peer asked for, on data we send
        self._rx = _RxBuffer()
        self._ch: CommonHeader | None = None
        self._data_len = 0
        self._hdr: Pdu | None = None
        self._err_copy = CH_LEN
        self.term_req: bytes | None = None  # the termination request that ended the connection, if any

    # ---- receive
    def receive_data(self, data: Buffer) -> list[Event]:
        """Feed received bytes; `b""` means the peer closed. Raises only ProtocolError."""
        if self.state is ConnState.TERMINATED:
            return []
        if not len(data):
            mid = bool(len(self._rx)) or self._ch is not None
            self._terminate()
            return [ConnectionClosed(mid)]
        self._rx.append(data)
        events: list[Event] = []
        try:
            while self.state is not ConnState.TERMINATED:
                ev = self._step()
                if ev is _NEED_MORE:
                    break
                events.append(ev)  # type: ignore[arg-type]
        except PduError as e:
            raise self._fail(e, events) from None
        return events

    def _step(self) -> Event | object:
        rx = self._rx
        ch = self._ch
        if ch is None:
            if len(rx) < CH_LEN:
                return _NEED_MORE
            self._err_copy = CH_LEN
            ch = CommonHeader.unpack(rx.peek(CH_LEN))
            if receives(ch.type, controller=self._controller):
                self._check_sequence(ch.type)
            data_len = check_common_header(
                ch, controller=self._controller, hdgst=self.hdgst, ddgst=self.ddgst, rxpda=self._rxpda
            )
            self._check_limits(ch, data_len)
            self._ch, self._data_len = ch, data_len
            self._err_copy = min(ch.hlen, TERM_MAX_DATA)
        if self._hdr is None:
            need = ch.full_hlen
            if len(rx) < need:
                return _NEED_MORE
            head = rx.peek(need)
            if ch.flags & HDGSTF:
                check_header_digest(head, ch.hlen)
            pdu = decode_header(head, ch, self._data_len)
            self._check_pdu(pdu)
            self._hdr = pdu
        if len(rx) < ch.plen:
            return _NEED_MORE
        buf = rx.take(ch.plen)
        pdu = self._hdr
        self._ch = self._hdr = None
        attach_data(pdu, ch, buf, self._data_len)
        return self._handle(pdu)

    def _fail(self, e: PduError, events: list[Event]) -> ProtocolError:
        if e.silent:
            term = b""
        else:
            header = bytes(self._rx.peek(min(len(self._rx), self._err_copy))) if len(self._rx) else b""
            term = encode_pdu(self._term_pdu(e.fes, e.fei, header))
        self._terminate()
        self.term_req = term
        return ProtocolError(e.fes, e.fei, str(e), term, events)

    def _terminate(self) -> None:
        self.state = ConnState.TERMINATED
        self._rx.clear()
        self._ch = self._hdr = None

    @staticmethod
    def _seq(message: str) -> PduError:
        return PduError(Fes.PDU_SEQUENCE_ERROR, 0, message)

    # ---- send helpers
    def _encode(self, pdu: Pdu) -> list[Buffer]:
        return pdu.encode(hdgst=self.hdgst, ddgst=self.ddgst, pda=self._txpda)

    def _require_ready(self) -> None:
        if self.state is not ConnState.READY:
            raise LocalProtocolError(f"connection is {self.state.value}")

    def send_term_req(self, fes: int, fei: int = 0, header: Buffer = b"") -> bytes:
        """End the connection from this side (e.g. a transport error found above this layer)."""
        if self.state is ConnState.TERMINATED:
            raise LocalProtocolError("connection already terminated")
        term = encode_pdu(self._term_pdu(fes, fei, bytes(header)))
        self._terminate()
        self.term_req = term
        return term

    # ---- per side
    def _term_pdu(self, fes: int, fei: int, header: bytes) -> Pdu:
        raise NotImplementedError

    def _check_sequence(self, ptype: int) -> None:
        raise NotImplementedError

    def _check_limits(self, ch: CommonHeader, data_len: int) -> None:
        """Limits known from the common header alone (so a huge PLEN is refused before buffering)."""

    def _check_pdu(self, pdu: Pdu) -> None:
        raise NotImplementedError

    def _handle(self, pdu: Pdu) -> Event:
        raise NotImplementedError


# ------------------------------------------------------------------------------------------ target
@dataclass(slots=True)
class _TargetCmd:
    cid: int
    length: int  # SGL1 length
    transport: bool  # data moves in R2T/H2CData (write) or C2HData (read)
    direction: int = 0  # 0 not yet known, _H2C after the first R2T, _C2H after the first C2HData
    r2t_next: int = 0
    active_r2ts: int = 0
    h2c_received: int = 0
    c2h_sent: int = 0


@dataclass(slots=True)
class _R2TWindow:
    cid: int
    offset: int
    length: int
    received: int = 0


_H2C, _C2H = 1, 2


class TargetConnection(_Connection):
    """The controller side of one NVMe/TCP connection (one queue pair).

    `maxh2cdata`: most data one H2CData PDU may carry (advertised in ICResp). `cpda`: alignment of
    host data (0's based dwords; Linux hosts refuse anything but 0). `max_icd`: in-capsule data
    accepted for non-Fabrics commands; set it from IOCCSZ once Connect says this is an I/O queue
    (`icd_limit(ioccsz)`); the default 8192 is the admin queue's. Fabrics commands may always carry
    8192 bytes. `max_c2h_data`: default split of C2HData.
    """

    _controller = True

    def __init__(
        self,
        *,
        maxh2cdata: int = DEFAULT_MAXH2CDATA,
        cpda: int = 0,
        max_icd: int = FABRICS_ICD_MAX,
        allow_hdgst: bool = True,
        allow_ddgst: bool = True,
        max_c2h_data: int = DEFAULT_MAX_C2H_DATA,
    ) -> None:
        if maxh2cdata < MIN_MAXH2CDATA or maxh2cdata % 4 or maxh2cdata > 0xFFFFFFFF:
            raise ValueError(f"MAXH2CDATA {maxh2cdata}: at least {MIN_MAXH2CDATA} and a multiple of 4")
        if not 0 <= cpda <= MAX_PDA:
            raise ValueError(f"CPDA {cpda} outside 0..{MAX_PDA}")
        if max_icd < 0 or max_c2h_data <= 0:
            raise ValueError("max_icd must be >= 0 and max_c2h_data > 0")
        super().__init__(ConnState.AWAIT_ICREQ, cpda)
        self.maxh2cdata = maxh2cdata
        self.cpda = cpda
        self.max_icd = max_icd
        self.max_c2h_data = max_c2h_data
        self.allow_hdgst = allow_hdgst
        self.allow_ddgst = allow_ddgst
        self.hpda = 0
        self.maxr2t = 0  # 0's based, from the ICReq
        self._icresp_sent = False
        self._cmds: dict[int, _TargetCmd] = {}
        self._r2ts: dict[int, _R2TWindow] = {}
        self._next_ttag = 0

    # ---- receive side
    def _term_pdu(self, fes: int, fei: int, header: bytes) -> Pdu:
        return C2HTermReq(fes, fei, header)

    def _check_sequence(self, ptype: int) -> None:
        if self.state is ConnState.AWAIT_ICREQ:
            if ptype not in (PduType.ICREQ, PduType.H2C_TERM_REQ):
                raise self._seq(f"PDU type {ptype:#x} before ICReq")
        elif ptype == PduType.ICREQ:
            raise self._seq("second ICReq")

    def _check_limits(self, ch: CommonHeader, data_len: int) -> None:
        if ch.type == PduType.CAPSULE_CMD and data_len > max(self.max_icd, FABRICS_ICD_MAX):
            raise PduError(Fes.DATA_LIMIT_EXCEEDED, 0, f"{data_len} bytes of in-capsule data")
        if ch.type == PduType.H2C_DATA and data_len > self.maxh2cdata:
            raise PduError(Fes.DATA_LIMIT_EXCEEDED, 0, f"H2CData of {data_len} bytes > MAXH2CDATA {self.maxh2cdata}")

    def _check_pdu(self, pdu: Pdu) -> None:
        if isinstance(pdu, CapsuleCmd):
            if pdu.sqe.cid in self._cmds:
                raise PduError(Fes.INVALID_HEADER_FIELD, OFF_CMD_CID, f"CID {pdu.sqe.cid:#x} already outstanding")
            limit = FABRICS_ICD_MAX if pdu.sqe.opcode == FABRICS_OPCODE else self.max_icd
            if self._data_len > limit:
                raise PduError(Fes.DATA_LIMIT_EXCEEDED, 0, f"{self._data_len} bytes in capsule > {limit}")
        elif isinstance(pdu, H2CData):
            if pdu.cccid not in self._cmds:
                raise PduError(Fes.INVALID_HEADER_FIELD, OFF_CCCID, f"H2CData for unknown CID {pdu.cccid:#x}")
            w = self._r2ts.get(pdu.ttag)
            if w is None or w.cid != pdu.cccid:
                raise PduError(Fes.INVALID_HEADER_FIELD, OFF_TTAG, f"H2CData for unknown TTAG {pdu.ttag:#x}")
            datal = self._data_len
            if pdu.datao < w.offset or pdu.datao + datal > w.offset + w.length:
                raise PduError(Fes.DATA_OUT_OF_RANGE, 0, "H2CData outside the R2T window")
            if pdu.datao != w.offset + w.received:
                raise self._seq(f"H2CData at offset {pdu.datao}, expected {w.offset + w.received}")
            if pdu.last != (w.received + datal == w.length):
                raise self._seq("LAST_PDU does not mark the end of the R2T window")

    def _handle(self, pdu: Pdu) -> Event:
        if isinstance(pdu, CapsuleCmd):
            sgl = pdu.sgl
            data = pdu.data if self._data_len else None
            self._cmds[pdu.sqe.cid] = _TargetCmd(
                pdu.sqe.cid, sgl.length, sgl.identifier == SGL_TRANSPORT and sgl.length > 0
            )
            return CommandReceived(pdu.sqe, sgl, data, pdu.data_digest_ok)  # type: ignore[arg-type]
        if isinstance(pdu, H2CData):
            w = self._r2ts[pdu.ttag]
            cmd = self._cmds[pdu.cccid]
            n = self._data_len
            w.received += n
            cmd.h2c_received += n
            if pdu.last:
                del self._r2ts[pdu.ttag]
                cmd.active_r2ts -= 1
            return H2CDataReceived(
                pdu.cccid, pdu.ttag, pdu.datao, pdu.data, pdu.last,  # type: ignore[arg-type]
                cmd.h2c_received == cmd.length, pdu.data_digest_ok,
            )
        if isinstance(pdu, IcReq):
            self.hdgst = pdu.hdgst and self.allow_hdgst
            self.ddgst = pdu.ddgst and self.allow_ddgst
            self.hpda = self._txpda = pdu.hpda
            self.maxr2t = pdu.maxr2t
            self.state = ConnState.READY
            return IcReqReceived(pdu.pfv, pdu.hpda, pdu.hdgst, pdu.ddgst, pdu.maxr2t)
        assert isinstance(pdu, H2CTermReq)
        self._terminate()
        return TermReqReceived(pdu.fes, pdu.fei, bytes(pdu.data))

    # ---- send side
    def send_icresp(self) -> bytes:
        """The ICResp answering the ICReq (exactly once, before anything else)."""
        if self.state is not ConnState.READY or self._icresp_sent:
            raise LocalProtocolError("ICResp only once, after the ICReq")
        self._icresp_sent = True
        return encode_pdu(IcResp(0, self.cpda, self.hdgst, self.ddgst, self.maxh2cdata))

    def _ready_cmd(self, cid: int) -> _TargetCmd:
        self._require_ready()
        if not self._icresp_sent:
            raise LocalProtocolError("send_icresp() first")
        cmd = self._cmds.get(cid)
        if cmd is None:
            raise LocalProtocolError(f"no outstanding command with CID {cid:#x}")
        return cmd

    def can_send_r2t(self, cid: int) -> bool:
        """Whether an R2T may go out now for this command (data left to ask for, MAXR2T not reached)."""
        cmd = self._cmds.get(cid)
        return (
            cmd is not None
            and self.state is ConnState.READY
            and self._icresp_sent
            and cmd.transport
            and cmd.direction != _C2H
            and cmd.r2t_next < cmd.length
            and cmd.active_r2ts <= self.maxr2t
        )

    def send_r2t(self, cid: int, length: int | None = None) -> bytes:
        """Ask for the next (at most `length`; default all remaining) bytes of a command's data.

        R2Ts of a command cover its data in order without gaps; at most MAXR2T + 1 are outstanding.
        """
        cmd = self._ready_cmd(cid)
        if not cmd.transport or cmd.direction == _C2H:
            raise LocalProtocolError(f"CID {cid:#x} has no host-to-controller transport data")
        remaining = cmd.length - cmd.r2t_next
        length = remaining if length is None else min(length, remaining)
        if length <= 0:
            raise LocalProtocolError(f"CID {cid:#x}: nothing left to request")
        if cmd.active_r2ts > self.maxr2t:
            raise LocalProtocolError(f"MAXR2T: {cmd.active_r2ts} R2Ts already outstanding for CID {cid:#x}")
        ttag = self._alloc_ttag()
        offset = cmd.r2t_next
        self._r2ts[ttag] = _R2TWindow(cid, offset, length)
        cmd.direction = _H2C
        cmd.r2t_next += length
        cmd.active_r2ts += 1
        return encode_pdu(R2TPdu(cid, ttag, offset, length), hdgst=self.hdgst)

    def _alloc_ttag(self) -> int:
        if len(self._r2ts) >= 0x10000:
            raise LocalProtocolError("all 65536 transfer tags in use")
        ttag = self._next_ttag
        while ttag in self._r2ts:
            ttag = (ttag + 1) & 0xFFFF
        self._next_ttag = (ttag + 1) & 0xFFFF
        return ttag

    def send_c2h_data(
        self, cid: int, data: Buffer, *, success: bool = False, max_pdu_data: int | None = None
    ) -> list[Buffer]:
        """Send the next part of a command's read data, split into PDUs of at most `max_pdu_data` bytes.

        LAST_PDU goes on the PDU that ends the command's data. `success` (only with that final part)
        also completes the command: no CapsuleResp may follow. Linux targets use it only when SQ flow
        control is disabled, because it carries no SQHD.
        """
        cmd = self._ready_cmd(cid)
        if not cmd.transport or cmd.direction == _H2C:
            raise LocalProtocolError(f"CID {cid:#x} has no controller-to-host transport data")
        mv = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
        n = len(mv)
        end = cmd.c2h_sent + n
        if n == 0 or end > cmd.length:
            raise LocalProtocolError(f"{n} bytes at offset {cmd.c2h_sent} of a {cmd.length}-byte transfer")
        last = end == cmd.length
        if success and not last:
            raise LocalProtocolError("SUCCESS only with the data that completes the transfer")
        out: list[Buffer] = []
        for chunk in split(mv, max_pdu_data or self.max_c2h_data):
            offset = cmd.c2h_sent
            cmd.c2h_sent += len(chunk)
            final = last and cmd.c2h_sent == end
            out += self._encode(C2HData(cid, offset, chunk, final, success and final))
        cmd.direction = _C2H
        if success:
            del self._cmds[cid]
        return out

    def send_capsule_resp(self, cqe: CQE) -> bytes:
        """Complete a command. Not while one of its R2T windows is still open (the host may be sending)."""
        cmd = self._ready_cmd(cqe.cid)
        if cmd.active_r2ts:
            raise LocalProtocolError(f"CID {cqe.cid:#x} has R2T data outstanding")
        del self._cmds[cqe.cid]
        return encode_pdu(CapsuleResp(cqe), hdgst=self.hdgst)

    @property
    def outstanding(self) -> int:
        """Commands received and not yet completed."""
        return len(self._cmds)


def icd_limit(ioccsz: int) -> int:
    """In-capsule data bytes an I/O command may carry given IOCCSZ (16-byte units, SQE included)."""
    return max(0, ioccsz * 16 - 64)

__all__ = [
    "DEFAULT_MAXH2CDATA",
    "C2HDataReceived",
    "CommandReceived",
    "ConnState",
    "ConnectionClosed",
    "Event",
    "H2CDataReceived",
    "IcReqReceived",
    "IcRespReceived",
    "LocalProtocolError",
    "ProtocolError",
    "R2TReceived",
    "ResponseReceived",
    "TargetConnection",
    "TermReqReceived",
    "icd_limit",
]
