"""The migration stream's message types and bulk bodies: plain wire data, no state.

Bulk bodies (namespace blocks, deallocations, guest pages, multi-range blocks) are frozen dataclasses that
encode to a list of buffers (the caller's data is one of them: no copy on the send side) and decode from a
frame's payload with every field checked. Framing, checksums, versions and the state machines that carry
them are in stream.py; the wire format is in docs/migration-stream.md.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING, ClassVar

import numpy as np

MAX_PAYLOAD = 16 << 20  # the largest frame payload either end sends or accepts

if TYPE_CHECKING:
    from nvme_lm.hypervisor.stream import Message

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


def as_bytes_view(buf: Buffer) -> memoryview:
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
        mv = as_bytes_view(buf)
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


def new_payload(length: int) -> memoryview:
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
        object.__setattr__(self, "data", as_bytes_view(self.data))

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
            object.__setattr__(self, "data", as_bytes_view(self.data))

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
            mv = as_bytes_view(buf)
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
            object.__setattr__(self, "data", as_bytes_view(self.data))

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
BULK_CLASSES: dict[MsgType, type[LbaData] | type[LbaDeallocate] | type[RamData] | type[LbaRanges]] = {
    MsgType.LBA_DATA: LbaData,
    MsgType.LBA_DEALLOCATE: LbaDeallocate,
    MsgType.RAM_DATA: RamData,
    MsgType.LBA_RANGES: LbaRanges,
}
