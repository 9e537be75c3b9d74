"""The migration stream: framing, versioning, checksums and the two protocol state machines.

Sans-I/O in the style of h11: a session turns messages into buffers to write (`send`) and received
bytes into messages (`receive_data`); it never touches a socket, so the same code runs over TLS in
the agents and over a byte string in tests. Wire format and decisions: docs/migration-stream.md.

Bulk data (LBA ranges, guest pages) is never copied on the send side (the caller's memoryview is
one of the returned buffers) and at most once on the receive side (into the frame's own buffer).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum
from typing import ClassVar

import crc32c
import msgpack
import numpy as np

STREAM_VERSION = 2  # what this end sends by default (the newest it speaks)
SUPPORTED_VERSIONS = (1, 2)  # what it accepts from a peer (the peer's HELLO frame picks one)
MAGIC = b"NVLM"
MAX_PAYLOAD = 16 << 20

# magic, version, type, payload length, sequence number | CRC32C of (everything before it + payload)
_PREFIX = struct.Struct("<4sHHIQ")
_CRC = struct.Struct("<I")
HEADER_SIZE = _PREFIX.size + _CRC.size  # 24
_HEADER = struct.Struct("<4sHHIQI")
assert _HEADER.size == HEADER_SIZE

_LBA = struct.Struct("<IQI")  # nsid, slba, nlb
_DEALLOC = struct.Struct("<II")  # nsid, count
_DEALLOC_RANGE = struct.Struct("<QI")  # slba, nlb
_RAM = struct.Struct("<I")  # count
_RAM_DESC = struct.Struct("<QI")  # guest address, length
_RANGES = struct.Struct("<II")  # nsid, count (LBA_RANGES, stream version 2)
_RANGE_DT = np.dtype([("slba", "<u8"), ("nlb", "<u4")])  # 12 bytes, packed: the LBA_RANGES range table
assert _RANGE_DT.itemsize == 12

# what callers may pass as data: anything with a contiguous buffer (bytes, bytearray, memoryview, mmap, numpy)
Buffer = bytes | bytearray | memoryview

SNAPSHOT_PIECE = 64 << 10  # snapshots are made of pieces this big (heap-sized: no page faults per frame)
MIN_LBA_SIZE = 512
MAX_LBA_SIZE = 64 << 10


class ProtocolError(Exception):
    """The peer (or the local caller) broke the stream protocol.

    `messages` holds the messages that were parsed, in the same `receive_data` call, before the
    bad frame: they are valid and the caller may still act on them (an ABORT, say).
    """

    def __init__(self, message: str, messages: list[Message] | None = None) -> None:
        super().__init__(message)
        self.messages: list[Message] = messages or []


class MsgType(IntEnum):
    HELLO = 1
    ACCEPT = 2
    REFUSE = 3
    PASS_END = 4
    PASS_ACK = 5
    SWITCHOVER = 6
    COMMITTED = 7
    FAILED = 8
    ABORT = 9
    DONE = 10
    PREPARED = 11
    COMMIT = 12
    LBA_DATA = 32
    LBA_DEALLOCATE = 33
    RAM_DATA = 34
    LBA_RANGES = 35  # stream version 2


BULK_TYPES = frozenset({MsgType.LBA_DATA, MsgType.LBA_DEALLOCATE, MsgType.RAM_DATA, MsgType.LBA_RANGES})
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


def _as_bytes_view(buf: Buffer) -> memoryview:
    """A flat unsigned-byte view of any contiguous buffer (no copy)."""
    mv = memoryview(buf)
    if mv.format != "B" or mv.ndim != 1:
        mv = mv.cast("B")
    return mv


def regroup(buffers: Iterable[Buffer], piece: int, copy: bool = False) -> list[Buffer]:
    """The same bytes as buffers of `piece` bytes (the last may be shorter).

    Small buffers are joined (a copy of at most `piece` bytes), large ones sliced (no copy) unless
    `copy` is set, in which case every piece is a private `bytes`. TLS makes one record per write and
    big writes make big ciphertext allocations, so pieces of tens of KiB are what it handles best.
    """
    out: list[Buffer] = []
    run: list[memoryview] = []
    run_bytes = 0
    for buf in buffers:
        mv = _as_bytes_view(buf)
        off, n = 0, len(mv)
        if n < piece - run_bytes:  # the common small case (a page): no slicing
            run.append(mv)
            run_bytes += n
            continue
        while off < n:
            take = min(piece - run_bytes, n - off)
            if not run and take == piece and not copy:
                out.append(mv[off : off + take])
            else:
                run.append(mv[off : off + take])
                run_bytes += take
                if run_bytes == piece:
                    out.append(b"".join(run) if copy or len(run) > 1 else run[0])
                    run, run_bytes = [], 0
            off += take
    if run:
        out.append(b"".join(run) if copy or len(run) > 1 else run[0])
    return out


def _new_payload(length: int) -> memoryview:
    """A frame's own buffer, every byte of which is written before it is read: not zero-filled (`bytearray(n)`
    zeroes it, a memset of every received byte) and usually recycled heap memory (no page faults)."""
    return memoryview(np.empty(length, dtype=np.uint8))


def _is_pow2(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


# --- bulk bodies -----------------------------------------------------------------------------------


@dataclass(slots=True, frozen=True)
class LbaData:
    """`nlb` logical blocks starting at `slba` of namespace `nsid`; the LBA size is len(data) / nlb."""

    TYPE: ClassVar[MsgType] = MsgType.LBA_DATA
    nsid: int
    slba: int
    nlb: int
    data: memoryview

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", _as_bytes_view(self.data))

    @property
    def lba_size(self) -> int:
        return len(self.data) // self.nlb

    def validate(self) -> None:
        n = len(self.data)
        if not 0 < self.nlb <= 0xFFFFFFFF:
            raise ProtocolError(f"LBA_DATA: nlb {self.nlb} out of range (1..2^32-1)")
        if n % self.nlb or not (_is_pow2(n // self.nlb) and MIN_LBA_SIZE <= n // self.nlb <= MAX_LBA_SIZE):
            raise ProtocolError(
                f"LBA_DATA: {n} data bytes for nlb {self.nlb} is not nlb x a power-of-two LBA size "
                f"({MIN_LBA_SIZE}..{MAX_LBA_SIZE})"
            )
        if not 0 <= self.slba <= 0xFFFFFFFFFFFFFFFF or self.slba + self.nlb > 1 << 64:
            raise ProtocolError(f"LBA_DATA: slba {self.slba} + nlb {self.nlb} out of range")
        if not 0 <= self.nsid <= 0xFFFFFFFF:
            raise ProtocolError(f"LBA_DATA: nsid {self.nsid} out of range")

    def encode(self) -> list[Buffer]:
        return [_LBA.pack(self.nsid, self.slba, self.nlb), self.data]

    @classmethod
    def decode(cls, payload: memoryview) -> LbaData:
        if len(payload) < _LBA.size:
            raise ProtocolError(f"LBA_DATA: truncated body ({len(payload)} bytes, header needs {_LBA.size})")
        nsid, slba, nlb = _LBA.unpack_from(payload)
        msg = cls(nsid, slba, nlb, payload[_LBA.size :])
        msg.validate()
        return msg


@dataclass(slots=True, frozen=True)
class LbaDeallocate:
    """Ranges (slba, nlb) that read as zeroes at the source: the destination deallocates them."""

    TYPE: ClassVar[MsgType] = MsgType.LBA_DEALLOCATE
    nsid: int
    ranges: Sequence[tuple[int, int]]

    def validate(self) -> None:
        if not 0 <= self.nsid <= 0xFFFFFFFF:
            raise ProtocolError(f"LBA_DEALLOCATE: nsid {self.nsid} out of range")
        if _DEALLOC.size + len(self.ranges) * _DEALLOC_RANGE.size > MAX_PAYLOAD:
            raise ProtocolError(f"LBA_DEALLOCATE: {len(self.ranges)} ranges do not fit in one frame")
        for slba, nlb in self.ranges:
            if not 0 < nlb <= 0xFFFFFFFF or slba < 0 or slba + nlb > 1 << 64:
                raise ProtocolError(f"LBA_DEALLOCATE: bad range (slba {slba}, nlb {nlb})")

    def encode(self) -> list[Buffer]:
        out = bytearray(_DEALLOC.size + len(self.ranges) * _DEALLOC_RANGE.size)
        _DEALLOC.pack_into(out, 0, self.nsid, len(self.ranges))
        off = _DEALLOC.size
        for slba, nlb in self.ranges:
            _DEALLOC_RANGE.pack_into(out, off, slba, nlb)
            off += _DEALLOC_RANGE.size
        return [out]

    @classmethod
    def decode(cls, payload: memoryview) -> LbaDeallocate:
        if len(payload) < _DEALLOC.size:
            raise ProtocolError(f"LBA_DEALLOCATE: truncated body ({len(payload)} bytes)")
        nsid, count = _DEALLOC.unpack_from(payload)
        want = _DEALLOC.size + count * _DEALLOC_RANGE.size
        if len(payload) != want:
            raise ProtocolError(f"LBA_DEALLOCATE: {count} ranges need {want} body bytes, got {len(payload)}")
        msg = cls(nsid, list(_DEALLOC_RANGE.iter_unpack(payload[_DEALLOC.size :])))
        msg.validate()
        return msg


@dataclass(slots=True, frozen=True)
class RamData:
    """Guest memory: `ranges` of (guest address, length) whose bytes follow each other in `data`."""

    TYPE: ClassVar[MsgType] = MsgType.RAM_DATA
    ranges: Sequence[tuple[int, int]]
    data: memoryview | None = None  # received: one view of all bytes
    parts: Sequence[Buffer] = ()  # to send: one buffer per range (not copied)

    def __post_init__(self) -> None:
        if self.data is not None:
            object.__setattr__(self, "data", _as_bytes_view(self.data))

    @classmethod
    def from_pages(cls, pages: Iterable[tuple[int, Buffer]], snapshot: bool = False) -> RamData:
        """Build from (guest address, buffer) pairs.

        With `snapshot=False` the buffers are referenced, not copied: they must not change until the
        frame is written, or the CRC will not match what went out. Memory that running vCPUs may
        write (pre-copy passes) must use `snapshot=True`, which gathers the bytes into one private
        buffer (a single memcpy).
        """
        ranges: list[tuple[int, int]] = []
        views: list[memoryview] = []
        for addr, buf in pages:
            mv = _as_bytes_view(buf)
            ranges.append((addr, len(mv)))
            views.append(mv)
        return cls(ranges, parts=regroup(views, SNAPSHOT_PIECE, copy=True) if snapshot else views)

    def chunks(self) -> Iterator[tuple[int, memoryview]]:
        """(guest address, view of its bytes) for every range of a received message."""
        if self.data is None:
            raise ValueError("chunks() is for received RAM_DATA; this one has send-side parts")
        off = 0
        for addr, n in self.ranges:
            yield addr, self.data[off : off + n]
            off += n

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self.ranges)

    def validate(self) -> None:
        if not self.ranges:
            raise ProtocolError("RAM_DATA: no ranges")
        for addr, n in self.ranges:
            if not 0 < n <= 0xFFFFFFFF or addr < 0 or addr + n > 1 << 64:
                raise ProtocolError(f"RAM_DATA: bad range (address {addr:#x}, length {n})")
        data_len = len(self.data) if self.data is not None else sum(memoryview(p).nbytes for p in self.parts)
        if data_len != self.nbytes:
            raise ProtocolError(f"RAM_DATA: ranges cover {self.nbytes} bytes but {data_len} data bytes follow")

    def encode(self) -> list[Buffer]:
        head = bytearray(_RAM.size + len(self.ranges) * _RAM_DESC.size)
        _RAM.pack_into(head, 0, len(self.ranges))
        off = _RAM.size
        for addr, n in self.ranges:
            _RAM_DESC.pack_into(head, off, addr, n)
            off += _RAM_DESC.size
        return [head, *(self.parts if self.data is None else (self.data,))]

    @classmethod
    def decode(cls, payload: memoryview) -> RamData:
        if len(payload) < _RAM.size:
            raise ProtocolError(f"RAM_DATA: truncated body ({len(payload)} bytes)")
        (count,) = _RAM.unpack_from(payload)
        head = _RAM.size + count * _RAM_DESC.size
        if len(payload) < head:
            raise ProtocolError(f"RAM_DATA: {count} descriptors need {head} bytes, body has {len(payload)}")
        msg = cls(list(_RAM_DESC.iter_unpack(payload[_RAM.size : head])), data=payload[head:])
        msg.validate()
        return msg


@dataclass(slots=True, frozen=True)
class LbaRanges:
    """Stream version 2: many (slba, nlb) ranges of namespace `nsid` and their blocks, back to back.

    Scattered small ranges (a fragmented namespace, the deltas of later passes) then cost one frame per
    ~1 MiB instead of one per range, and the destination writes a whole frame with one batch of
    commands. Ranges are strictly ascending and do not overlap (what the sender's merged range lists
    are anyway), so a frame's effect does not depend on the order its ranges are written in. The LBA
    size is not sent: it is len(data) / (sum of nlb), a power of two from 512 to 64 KiB.
    """

    TYPE: ClassVar[MsgType] = MsgType.LBA_RANGES
    nsid: int
    ranges: Sequence[tuple[int, int]]
    data: memoryview | None = None  # received: one view of all blocks
    parts: Sequence[Buffer] = ()  # to send: buffers holding the blocks in range order (not copied)

    def __post_init__(self) -> None:
        if self.data is not None:
            object.__setattr__(self, "data", _as_bytes_view(self.data))

    @property
    def nlb(self) -> int:
        """Blocks in all ranges."""
        return sum(n for _, n in self.ranges)

    @property
    def nbytes(self) -> int:
        return len(self.data) if self.data is not None else sum(memoryview(p).nbytes for p in self.parts)

    @property
    def lba_size(self) -> int:
        return self.nbytes // self.nlb

    def chunks(self) -> Iterator[tuple[int, int, memoryview]]:
        """(slba, nlb, view of its blocks) for every range of a received message."""
        if self.data is None:
            raise ValueError("chunks() is for received LBA_RANGES; this one has send-side parts")
        lba = self.lba_size
        off = 0
        for slba, nlb in self.ranges:
            yield slba, nlb, self.data[off : off + nlb * lba]
            off += nlb * lba

    def validate(self) -> None:
        count = len(self.ranges)
        if not 0 <= self.nsid <= 0xFFFFFFFF:
            raise ProtocolError(f"LBA_RANGES: nsid {self.nsid} out of range")
        if not count:
            raise ProtocolError("LBA_RANGES: no ranges")
        if _RANGES.size + count * _RANGE_DT.itemsize > MAX_PAYLOAD:
            raise ProtocolError(f"LBA_RANGES: {count} ranges do not fit in one frame")
        try:
            table = np.array(self.ranges, dtype=np.uint64).reshape(count, 2)
        except (OverflowError, ValueError, TypeError):
            raise ProtocolError("LBA_RANGES: ranges must be (slba, nlb) pairs of unsigned 64-bit integers") from None
        _check_range_table(table[:, 0], table[:, 1])
        nlb = int(table[:, 1].sum(dtype=object))
        _check_lba_bytes("LBA_RANGES", self.nbytes, nlb)

    def encode(self) -> list[Buffer]:
        head = bytearray(_RANGES.size + len(self.ranges) * _RANGE_DT.itemsize)
        _RANGES.pack_into(head, 0, self.nsid, len(self.ranges))
        table = np.frombuffer(head, dtype=_RANGE_DT, offset=_RANGES.size)
        arr = np.array(self.ranges, dtype=np.uint64).reshape(-1, 2)
        table["slba"], table["nlb"] = arr[:, 0], arr[:, 1]
        return [head, *(self.parts if self.data is None else (self.data,))]

    @classmethod
    def decode(cls, payload: memoryview) -> LbaRanges:
        if len(payload) < _RANGES.size:
            raise ProtocolError(f"LBA_RANGES: truncated body ({len(payload)} bytes, header needs {_RANGES.size})")
        nsid, count = _RANGES.unpack_from(payload)
        head = _RANGES.size + count * _RANGE_DT.itemsize
        if not count:
            raise ProtocolError("LBA_RANGES: no ranges")
        if len(payload) < head:
            raise ProtocolError(f"LBA_RANGES: {count} ranges need {head} body bytes, the body has {len(payload)}")
        table = np.frombuffer(payload, dtype=_RANGE_DT, count=count, offset=_RANGES.size)
        slba, nlb = table["slba"], table["nlb"].astype(np.uint64)
        _check_range_table(slba, nlb)
        _check_lba_bytes("LBA_RANGES", len(payload) - head, int(nlb.sum(dtype=object)))
        ranges = list(zip(slba.tolist(), nlb.tolist(), strict=True))
        return cls(nsid, ranges, data=payload[head:])


def _check_range_table(slba: np.ndarray, nlb: np.ndarray) -> None:
    """Every nlb in 1..2^32-1, slba + nlb <= 2^64, ranges strictly ascending without overlap (uint64 arrays)."""
    if (nlb == 0).any() or (nlb > 0xFFFFFFFF).any():
        i = int(np.flatnonzero((nlb == 0) | (nlb > 0xFFFFFFFF))[0])
        raise ProtocolError(f"LBA_RANGES: range #{i} has nlb {int(nlb[i])} (1..2^32-1)")
    last = slba + (nlb - np.uint64(1))  # the last block of each range: no wrap-around while slba + nlb <= 2^64
    wrapped = last < slba
    if wrapped.any():
        i = int(np.flatnonzero(wrapped)[0])
        raise ProtocolError(f"LBA_RANGES: range #{i} (slba {int(slba[i])}, nlb {int(nlb[i])}) ends beyond 2^64")
    bad = slba[1:] <= last[:-1]
    if bad.any():
        i = int(np.flatnonzero(bad)[0]) + 1
        raise ProtocolError(f"LBA_RANGES: range #{i} (slba {int(slba[i])}) overlaps or precedes range #{i - 1} "
                            f"(slba {int(slba[i - 1])}, nlb {int(nlb[i - 1])}): ranges must be strictly ascending")


def _check_lba_bytes(name: str, nbytes: int, nlb: int) -> None:
    """`nbytes` of data must be `nlb` blocks of one power-of-two LBA size."""
    if nbytes % nlb or not (_is_pow2(nbytes // nlb) and MIN_LBA_SIZE <= nbytes // nlb <= MAX_LBA_SIZE):
        raise ProtocolError(
            f"{name}: {nbytes} data bytes for {nlb} blocks is not blocks x a power-of-two LBA size "
            f"({MIN_LBA_SIZE}..{MAX_LBA_SIZE})"
        )


BulkBody = LbaData | LbaDeallocate | RamData | LbaRanges
_BULK_CLASSES: dict[MsgType, type[LbaData] | type[LbaDeallocate] | type[RamData] | type[LbaRanges]] = {
    MsgType.LBA_DATA: LbaData,
    MsgType.LBA_DEALLOCATE: LbaDeallocate,
    MsgType.RAM_DATA: RamData,
    MsgType.LBA_RANGES: LbaRanges,
}


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
        self._payload: memoryview | None = None  # the payload being filled (`_new_payload`)
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
            if not isinstance(body, _BULK_CLASSES[mtype]):
                raise ProtocolError(f"{mtype.name}: body must be {_BULK_CLASSES[mtype].__name__}")
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
        mv = _as_bytes_view(data)
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
                    self._payload = _new_payload(length)
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
            body: dict | BulkBody = _BULK_CLASSES[mtype].decode(payload)
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
