"""The migration stream: framing, versioning, checksums and the two protocol state machines.

Sans-I/O in the style of h11: a session turns messages into buffers to write (`send`) and received
bytes into messages (`receive_data`); it never touches a socket, so the same code runs over TLS in
the agents and over a byte string in tests. Wire format and decisions: docs/migration-stream.md.

Bulk data (LBA ranges, guest pages) is never copied on the send side (the caller's memoryview is
one of the returned buffers) and at most once on the receive side (into the frame's own buffer).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import Enum
from typing import ClassVar

import crc32c
import msgpack

from nvme_lm.hypervisor.stream_bodies import (
    BULK_CLASSES,
    BULK_TYPES,
    MAX_LBA_SIZE,
    MAX_PAYLOAD,
    MIN_LBA_SIZE,
    SNAPSHOT_PIECE,
    Buffer,
    BulkBody,
    LbaData,
    LbaDeallocate,
    LbaRanges,
    MsgType,
    ProtocolError,
    RamData,
    as_bytes_view,
    new_payload,
    regroup,
)

STREAM_VERSION = 2  # what this end sends by default (the newest it speaks)
SUPPORTED_VERSIONS = (1, 2)  # what it accepts from a peer (the peer's HELLO frame picks one)
MAGIC = b"NVLM"

# magic, version, type, payload length, sequence number | CRC32C of (everything before it + payload)
_PREFIX = struct.Struct("<4sHHIQ")
_CRC = struct.Struct("<I")
HEADER_SIZE = _PREFIX.size + _CRC.size  # 24
_HEADER = struct.Struct("<4sHHIQI")
assert _HEADER.size == HEADER_SIZE

_TYPES = {int(t): t for t in MsgType}
MIN_VERSION = {MsgType.LBA_RANGES: 2}  # message types newer than version 1: the stream version they need
RECV_SCRATCH = 64 << 10  # `get_buffer` between frames: headers and small frames land here (parsed, then reused)


class Role(Enum):
    SOURCE = "source"
    DESTINATION = "destination"


class State(Enum):
    # source
    IDLE = "IDLE"
    HELLO_SENT = "HELLO_SENT"
    COPYING = "COPYING"
    # destination
    WAIT_HELLO = "WAIT_HELLO"
    HELLO_RECEIVED = "HELLO_RECEIVED"
    RECEIVING = "RECEIVING"
    # both
    SWITCHING = "SWITCHING"
    PREPARED = "PREPARED"
    COMMITTING = "COMMITTING"
    COMMITTED = "COMMITTED"
    DONE = "DONE"
    REFUSED = "REFUSED"
    ABORTED = "ABORTED"
    ERROR = "ERROR"


TERMINAL = frozenset({State.DONE, State.REFUSED, State.ABORTED, State.ERROR})



# --- control bodies --------------------------------------------------------------------------------

# Required keys and their types; extra keys are allowed (a newer peer may add fields).
_SCHEMA: dict[MsgType, dict[str, type]] = {
    MsgType.HELLO: {"stream_version": int, "vm": dict},
    MsgType.ACCEPT: {},
    MsgType.REFUSE: {"reasons": list},
    MsgType.PASS_END: {"pass": int, "kind": str},
    MsgType.PASS_ACK: {"pass": int},
    MsgType.SWITCHOVER: {"controller_state": bytes, "vm_state": bytes},
    MsgType.PREPARED: {},
    MsgType.COMMIT: {},
    MsgType.COMMITTED: {},
    MsgType.FAILED: {"reason": str},
    MsgType.ABORT: {"reason": str},
    MsgType.DONE: {},
}


def _validate_control(mtype: MsgType, body: object) -> dict:
    name = mtype.name
    if not isinstance(body, dict):
        raise ProtocolError(f"{name}: body must be a map, got {type(body).__name__}")
    for key in body:
        if not isinstance(key, str):
            raise ProtocolError(f"{name}: body key {key!r} is not a string")
    for key, typ in _SCHEMA[mtype].items():
        if key not in body:
            raise ProtocolError(f"{name}: missing field {key!r}")
        val = body[key]
        if not isinstance(val, typ) or (typ is int and isinstance(val, bool)):
            raise ProtocolError(f"{name}: field {key!r} must be {typ.__name__}, got {type(val).__name__}")
    if mtype is MsgType.REFUSE and (not body["reasons"] or not all(isinstance(r, str) for r in body["reasons"])):
        raise ProtocolError("REFUSE: 'reasons' must be a non-empty list of strings")
    if mtype in (MsgType.PASS_END, MsgType.PASS_ACK) and body["pass"] < 0:
        raise ProtocolError(f"{name}: negative pass number {body['pass']}")
    return body


@dataclass(slots=True, frozen=True)
class Message:
    """One stream message: a control message's body is a dict, a bulk message's a typed dataclass."""

    type: MsgType
    body: dict | LbaData | LbaDeallocate | RamData | LbaRanges

    @classmethod
    def of(cls, body: BulkBody) -> Message:
        return cls(body.TYPE, body)


# --- the state table -------------------------------------------------------------------------------

SEND, RECV = "send", "recv"
S, D = Role.SOURCE, Role.DESTINATION
_T = MsgType
_st = State

# (state, role, direction, type) -> next state. Anything absent is a protocol error.
TRANSITIONS: dict[tuple[State, Role, str, MsgType], State] = {
    # source
    (_st.IDLE, S, SEND, _T.HELLO): _st.HELLO_SENT,
    (_st.HELLO_SENT, S, RECV, _T.ACCEPT): _st.COPYING,
    (_st.HELLO_SENT, S, RECV, _T.REFUSE): _st.REFUSED,
    (_st.COPYING, S, SEND, _T.LBA_DATA): _st.COPYING,
    (_st.COPYING, S, SEND, _T.LBA_DEALLOCATE): _st.COPYING,
    (_st.COPYING, S, SEND, _T.RAM_DATA): _st.COPYING,
    (_st.COPYING, S, SEND, _T.LBA_RANGES): _st.COPYING,
    (_st.COPYING, S, SEND, _T.PASS_END): _st.COPYING,
    (_st.COPYING, S, RECV, _T.PASS_ACK): _st.COPYING,
    (_st.COPYING, S, SEND, _T.SWITCHOVER): _st.SWITCHING,
    (_st.SWITCHING, S, RECV, _T.PASS_ACK): _st.SWITCHING,  # the last PASS_ACK may cross SWITCHOVER
    (_st.SWITCHING, S, RECV, _T.PREPARED): _st.PREPARED,
    (_st.SWITCHING, S, RECV, _T.FAILED): _st.ABORTED,
    (_st.PREPARED, S, SEND, _T.COMMIT): _st.COMMITTING,  # the point of no return
    (_st.COMMITTING, S, RECV, _T.COMMITTED): _st.COMMITTED,
    (_st.COMMITTED, S, SEND, _T.DONE): _st.DONE,
    # destination
    (_st.WAIT_HELLO, D, RECV, _T.HELLO): _st.HELLO_RECEIVED,
    (_st.HELLO_RECEIVED, D, SEND, _T.ACCEPT): _st.RECEIVING,
    (_st.HELLO_RECEIVED, D, SEND, _T.REFUSE): _st.REFUSED,
    (_st.RECEIVING, D, RECV, _T.LBA_DATA): _st.RECEIVING,
    (_st.RECEIVING, D, RECV, _T.LBA_DEALLOCATE): _st.RECEIVING,
    (_st.RECEIVING, D, RECV, _T.RAM_DATA): _st.RECEIVING,
    (_st.RECEIVING, D, RECV, _T.LBA_RANGES): _st.RECEIVING,
    (_st.RECEIVING, D, RECV, _T.PASS_END): _st.RECEIVING,
    (_st.RECEIVING, D, SEND, _T.PASS_ACK): _st.RECEIVING,
    (_st.RECEIVING, D, RECV, _T.SWITCHOVER): _st.SWITCHING,
    (_st.SWITCHING, D, SEND, _T.PASS_ACK): _st.SWITCHING,
    (_st.SWITCHING, D, SEND, _T.PREPARED): _st.PREPARED,
    (_st.SWITCHING, D, SEND, _T.FAILED): _st.ABORTED,
    (_st.PREPARED, D, RECV, _T.COMMIT): _st.COMMITTING,
    (_st.COMMITTING, D, SEND, _T.COMMITTED): _st.COMMITTED,
    (_st.COMMITTED, D, RECV, _T.DONE): _st.DONE,
}
# ABORT, two-phase-commit style: the source may abort until it sends COMMIT; the destination only
# until it says PREPARED (after that it waits for the source's decision), so an ABORT can never
# cross a COMMIT on the wire.
for _role, _dir, _states in (
    (S, SEND, (_st.IDLE, _st.HELLO_SENT, _st.COPYING, _st.SWITCHING, _st.PREPARED)),
    (S, RECV, (_st.HELLO_SENT, _st.COPYING, _st.SWITCHING)),
    (D, SEND, (_st.WAIT_HELLO, _st.HELLO_RECEIVED, _st.RECEIVING, _st.SWITCHING)),
    (D, RECV, (_st.WAIT_HELLO, _st.HELLO_RECEIVED, _st.RECEIVING, _st.SWITCHING, _st.PREPARED)),
):
    for _state in _states:
        TRANSITIONS[(_state, _role, _dir, _T.ABORT)] = _st.ABORTED
del _role, _dir, _states, _state


# --- sessions --------------------------------------------------------------------------------------


class _Session:
    """Framing + the state table for one end of one migration stream."""

    role: ClassVar[Role]
    initial: ClassVar[State]

    def __init__(self, version: int | None = None) -> None:
        if version is not None and version not in SUPPORTED_VERSIONS:
            raise ValueError(f"stream version {version} is not one this end speaks ({_speaks()})")
        # the stream's version: every frame either way carries it; a destination learns it from HELLO
        self.version: int | None = version
        self.state: State = self.initial
        self.error: str | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self._send_seq = 0
        self._recv_seq = 0
        self._eof = False
        # receive side: header being assembled, then the payload being filled
        self._hdr = bytearray()
        self._frame: tuple[MsgType, int, int, int] | None = None  # type, length, seq, expected crc
        self._crc = 0  # running CRC of the header prefix
        self._payload: memoryview | None = None  # the payload being filled (`new_payload`)
        self._filled = 0
        self._outstanding_passes: list[int] = []  # PASS_END numbers not yet acknowledged
        self._last_pass = -1
        self._scratch = memoryview(bytearray(RECV_SCRATCH))  # get_buffer between frames
        self._direct = False  # the last get_buffer handed out the payload of the frame being received

    def __repr__(self) -> str:
        return (f"<{type(self).__name__} v{self.version} {self.state.name} sent#{self._send_seq} "
                f"recv#{self._recv_seq}>")

    def _check_version(self, mtype: MsgType, verb: str) -> None:
        need = MIN_VERSION.get(mtype, 1)
        if need > (self.version or STREAM_VERSION):
            raise ProtocolError(f"{mtype.name} needs stream version {need}: cannot {verb} it on a version "
                                f"{self.version} stream")

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame buffered so far (non-zero = a peer that stops now stopped mid-frame)."""
        return len(self._hdr) + (HEADER_SIZE + self._filled if self._frame is not None else 0)

    # -- sending

    def send(self, msg: Message | BulkBody) -> list[Buffer]:
        """Frame `msg`; return the buffers to write, in order. A refused send changes nothing."""
        if not isinstance(msg, Message):
            msg = Message.of(msg)
        mtype = MsgType(msg.type)
        next_state = self._next(mtype, SEND)
        self._check_version(mtype, "send")
        version = self.version or STREAM_VERSION  # a destination that has no HELLO yet: its own newest
        if mtype in BULK_TYPES:
            body = msg.body
            if not isinstance(body, BULK_CLASSES[mtype]):
                raise ProtocolError(f"{mtype.name}: body must be {BULK_CLASSES[mtype].__name__}")
            body.validate()
            parts = body.encode()
        else:
            body = msg.body
            if mtype is MsgType.HELLO and isinstance(body, dict) and "stream_version" not in body:
                body = {"stream_version": version, **body}
            _validate_control(mtype, body)
            if mtype is MsgType.HELLO and body["stream_version"] != version:
                raise ProtocolError(f"HELLO: stream_version {body['stream_version']} != {version} "
                                    f"(the version of this session)")
            try:
                parts = [msgpack.packb(body, use_bin_type=True)]
            except (TypeError, ValueError, OverflowError) as exc:
                raise ProtocolError(f"{mtype.name}: body cannot be packed: {exc}") from None
        self._check_pass(mtype, body)
        length = sum(memoryview(p).nbytes for p in parts)
        if length > MAX_PAYLOAD:
            raise ProtocolError(f"{mtype.name}: payload of {length} bytes exceeds the {MAX_PAYLOAD}-byte maximum")
        prefix = _PREFIX.pack(MAGIC, version, mtype, length, self._send_seq)
        crc = crc32c.crc32c(prefix)
        for p in parts:
            crc = crc32c.crc32c(p, crc)
        header = prefix + _CRC.pack(crc)
        self._send_seq += 1
        self.bytes_sent += HEADER_SIZE + length
        self._apply_pass(mtype, body)
        self.state = next_state
        if mtype not in BULK_TYPES:
            return [header + parts[0]]  # small: one write
        return [header, *parts]

    # -- receiving

    def receive_data(self, data: Buffer) -> list[Message]:
        """Feed received bytes; return the complete messages they finish. `b""` means end of stream."""
        if self.state is State.ERROR:
            raise ProtocolError(f"session is in ERROR ({self.error})")
        mv = as_bytes_view(data)
        if not len(mv):
            self._eof = True
            if self.pending:
                raise self._fail(ProtocolError(f"stream ended mid-frame ({self.pending} bytes of a frame received)"))
            return []
        # a bytes chunk is immutable, so a payload wholly inside it can be a view (no copy)
        return self._feed(mv, isinstance(data, bytes))

    def get_buffer(self) -> memoryview:
        """Where the transport should put the next bytes it receives (asyncio's BufferedProtocol), then
        call `buffer_updated(n)`. Inside a frame's payload it is the rest of that payload's own buffer, so
        bulk data is decrypted straight into the message (no copy); between frames a scratch buffer whose
        contents `buffer_updated` parses (and copies from) before handing it out again."""
        if self._payload is not None and self.state is not State.ERROR:
            self._direct = True
            return self._payload[self._filled :]
        self._direct = False
        return self._scratch

    def buffer_updated(self, nbytes: int) -> list[Message]:
        """`nbytes` were written at the start of the last `get_buffer`; returns the messages they finish."""
        if self.state is State.ERROR:
            raise ProtocolError(f"session is in ERROR ({self.error})")
        if nbytes <= 0:
            return []
        if not self._direct:
            return self._feed(self._scratch[:nbytes], False)
        self._direct = False
        assert self._payload is not None
        if self._eof:
            raise self._fail(ProtocolError("data received after end of stream"))
        self.bytes_received += nbytes
        self._filled += nbytes
        if self._filled < len(self._payload):
            return []
        payload = self._payload
        self._payload = None
        try:
            return [self._finish(payload)]
        except ProtocolError as exc:
            raise self._fail(exc) from None

    def _fail(self, exc: ProtocolError, parsed: list[Message] | None = None) -> ProtocolError:
        """Errors are final: the session goes to ERROR; `exc` (to raise) keeps the messages parsed before it."""
        self.state = State.ERROR
        self.error = str(exc)
        exc.messages = parsed or []
        return exc

    def _feed(self, mv: memoryview, immutable: bool) -> list[Message]:
        out: list[Message] = []
        try:
            if self._eof:
                raise ProtocolError("data received after end of stream")
            self.bytes_received += len(mv)
            pos, n = 0, len(mv)
            while pos < n:
                if self._frame is None:
                    if not self._hdr and n - pos >= HEADER_SIZE:
                        self._parse_header(mv[pos : pos + HEADER_SIZE])
                        pos += HEADER_SIZE
                    else:
                        take = min(HEADER_SIZE - len(self._hdr), n - pos)
                        self._hdr += mv[pos : pos + take]
                        pos += take
                        if len(self._hdr) < HEADER_SIZE:
                            break
                        self._parse_header(memoryview(self._hdr))
                        self._hdr = bytearray()
                    length = self._frame[1]
                    if immutable and n - pos >= length:
                        out.append(self._finish(mv[pos : pos + length]))
                        pos += length
                        continue
                    self._payload = new_payload(length)
                    self._filled = 0
                    if length == 0:
                        self._payload = None
                        out.append(self._finish(memoryview(b"")))
                        continue
                else:
                    assert self._payload is not None
                    take = min(len(self._payload) - self._filled, n - pos)
                    self._payload[self._filled : self._filled + take] = mv[pos : pos + take]
                    self._filled += take
                    pos += take
                    if self._filled == len(self._payload):
                        payload = self._payload
                        self._payload = None
                        out.append(self._finish(payload))
        except ProtocolError as exc:
            raise self._fail(exc, out) from None
        return out

    def _parse_header(self, hdr: memoryview) -> None:
        magic, version, mtype, length, seq, crc = _HEADER.unpack_from(hdr)
        if magic != MAGIC:
            raise ProtocolError(f"bad magic {bytes(magic)!r} (expected {MAGIC!r}) at frame #{self._recv_seq}")
        if version not in SUPPORTED_VERSIONS:
            raise ProtocolError(f"unknown stream version {version} (this end speaks {_speaks()})")
        if self.version is None:
            self.version = version  # a destination: the source's first frame (its HELLO) sets the version
        elif version != self.version:
            raise ProtocolError(f"frame #{self._recv_seq} has stream version {version}, this stream is version "
                                f"{self.version}")
        if mtype not in _TYPES:
            raise ProtocolError(f"unknown message type {mtype} in frame #{self._recv_seq}")
        self._check_version(_TYPES[mtype], "receive")
        if length > MAX_PAYLOAD:
            raise ProtocolError(f"{_TYPES[mtype].name}: payload length {length} exceeds the {MAX_PAYLOAD}-byte maximum")
        self._crc = crc32c.crc32c(hdr[: _PREFIX.size])
        self._frame = (_TYPES[mtype], length, seq, crc)

    def _finish(self, payload: memoryview) -> Message:
        assert self._frame is not None
        mtype, _length, seq, crc = self._frame
        self._frame = None
        actual = crc32c.crc32c(payload, self._crc)
        if actual != crc:
            raise ProtocolError(
                f"{mtype.name}: CRC32C mismatch in frame #{seq} (computed {actual:#010x}, header says {crc:#010x})"
            )
        if seq != self._recv_seq:
            kind = "repeat" if seq < self._recv_seq else "gap"
            raise ProtocolError(f"{mtype.name}: sequence {kind}: expected frame #{self._recv_seq}, got #{seq}")
        self._recv_seq += 1
        next_state = self._next(mtype, RECV)
        if mtype in BULK_TYPES:
            body: dict | BulkBody = BULK_CLASSES[mtype].decode(payload)
        else:
            try:
                raw = msgpack.unpackb(payload, raw=False, strict_map_key=True)
            except Exception as exc:  # msgpack raises many types (ExtraData, FormatError, ValueError, ...)
                raise ProtocolError(f"{mtype.name}: bad msgpack body: {type(exc).__name__}: {exc}") from None
            body = _validate_control(mtype, raw)
            if mtype is MsgType.HELLO and body["stream_version"] != self.version:
                raise ProtocolError(f"HELLO: stream_version {body['stream_version']} != {self.version} "
                                    f"(the version of its frame)")
        self._check_pass(mtype, body)
        self._apply_pass(mtype, body)
        self.state = next_state
        return Message(mtype, body)

    # -- the table

    def _next(self, mtype: MsgType, direction: str) -> State:
        if self.state is State.ERROR:
            raise ProtocolError(f"session is in ERROR ({self.error})")
        nxt = TRANSITIONS.get((self.state, self.role, direction, mtype))
        if nxt is None:
            verb = "send" if direction == SEND else "receive"
            raise ProtocolError(f"{self.role.value} may not {verb} {mtype.name} in state {self.state.name}")
        return nxt

    def _check_pass(self, mtype: MsgType, body: object) -> None:
        """Pass numbers increase; PASS_ACKs acknowledge PASS_ENDs in order. Else the two ends disagree."""
        if mtype is MsgType.PASS_END and body["pass"] <= self._last_pass:  # type: ignore[index]
            raise ProtocolError(f"PASS_END: pass {body['pass']} does not follow pass {self._last_pass}")  # type: ignore[index]
        if mtype is MsgType.PASS_ACK:
            want = self._outstanding_passes[0] if self._outstanding_passes else None
            if body["pass"] != want:
                raise ProtocolError(f"PASS_ACK: acknowledges pass {body['pass']}, outstanding pass is {want}")

    def _apply_pass(self, mtype: MsgType, body: object) -> None:
        if mtype is MsgType.PASS_END:
            self._last_pass = body["pass"]  # type: ignore[index]
            self._outstanding_passes.append(self._last_pass)
        elif mtype is MsgType.PASS_ACK:
            self._outstanding_passes.pop(0)


class SourceSession(_Session):
    """The sending host's end: HELLO, bulk data and passes, SWITCHOVER, COMMIT after PREPARED, DONE after COMMITTED.
    It speaks `version` (default the newest); a destination that does not speak it refuses the HELLO frame."""

    role = Role.SOURCE
    initial = State.IDLE

    def __init__(self, version: int = STREAM_VERSION) -> None:
        super().__init__(version)


class DestinationSession(_Session):
    """The receiving host's end: answers HELLO, acknowledges passes, PREPARED (or FAILED), COMMITTED after COMMIT."""

    role = Role.DESTINATION
    initial = State.WAIT_HELLO


def _speaks() -> str:
    return ", ".join(map(str, SUPPORTED_VERSIONS))


def control(mtype: MsgType, **body: object) -> Message:
    """Shorthand: `control(MsgType.ABORT, reason="...")`."""
    return Message(mtype, body)


__all__ = [  # the stream's whole vocabulary, message types and bodies included (defined in stream_bodies.py)
    "BULK_TYPES", "HEADER_SIZE", "MAGIC", "MAX_LBA_SIZE", "MAX_PAYLOAD", "MIN_LBA_SIZE", "MIN_VERSION",
    "SNAPSHOT_PIECE", "STREAM_VERSION", "SUPPORTED_VERSIONS", "TERMINAL", "TRANSITIONS", "Buffer", "BulkBody",
    "DestinationSession", "LbaData", "LbaDeallocate", "LbaRanges", "Message", "MsgType", "ProtocolError",
    "RamData", "Role", "SourceSession", "State", "control", "regroup",
]
