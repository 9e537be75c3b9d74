"""Pre-copy: move a running VM's namespace and RAM while it keeps running, pass by pass.

Pass 0 copies what is allocated (Get LBA Status ATYPE 02h) and every guest page that holds data;
later passes copy what changed meanwhile: LBA ranges from the device's User Data Migration Queue
(Track Send "log user data changes"), guest pages the VF wrote by DMA (Track Receive) and guest
pages the vCPUs wrote (the VM's CPU dirty log). Each pass records QEMU-style figures.

The source half (`ChangeTracker`, `PrecopySender`) runs in the source agent, the destination half
(`PrecopyReceiver`) in the destination agent; the stream between them is `stream.py`.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from nvme_lm.host import tracking as ht
from nvme_lm.hypervisor.node import Node, VfSlot
from nvme_lm.hypervisor.stream import (
    MIN_VERSION,
    STREAM_VERSION,
    LbaData,
    LbaDeallocate,
    LbaRanges,
    Message,
    MsgType,
    RamData,
)
from nvme_lm.spec import cdq as c
from nvme_lm.vm.memory import GuestMemory

UDMQ_SLOTS = 1 << 16  # 2 MiB of host memory: a busy guest's changes between two drains
TRACK_RECEIVE_BYTES = 16 << 10
RAM_FRAME = 1 << 20  # guest bytes per RAM_DATA frame
LBA_FRAME = 1 << 20  # namespace bytes per LBA_RANGES (or LBA_DATA) frame
LBA_BATCH = 8 << 20  # bytes read through the PF per batch (several frames, many commands in flight)
PAGE_SHIFT = 12


@dataclass
class PassRecord:
    """One pre-copy pass, in the figures QEMU's `info migrate` shows."""

    pass_no: int
    kind: str  # "full" | "delta" | "final"
    t_start_ns: int
    duration_s: float = 0.0
    lba_bytes: int = 0
    ram_bytes: int = 0
    remaining_bytes: int = 0  # dirty when the pass ended (what the next pass must move)
    dirty_rate_mib_s: float = 0.0
    copy_rate_mib_s: float = 0.0
    remaining_lba_bytes: int = 0  # the namespace's part of remaining_bytes (the rest is RAM)
    write_limit_mib_s: float = 0.0  # the throttle on guest writes during this pass (0: none)
    read_limit_mib_s: float = 0.0  # the throttle on guest reads (DMA into RAM) during this pass (0: none)
    decision: str = ""  # what the policy concluded after it

    def finish(self, remaining: int, remaining_lba: int = 0) -> None:
        self.duration_s = (time.monotonic_ns() - self.t_start_ns) / 1e9
        self.remaining_bytes = remaining
        self.remaining_lba_bytes = remaining_lba
        d = max(self.duration_s, 1e-6)
        self.copy_rate_mib_s = (self.lba_bytes + self.ram_bytes) / d / (1 << 20)
        self.dirty_rate_mib_s = remaining / d / (1 << 20)

    def to_report(self, t0_ns: int) -> dict:
        d = asdict(self)
        d["pass"] = d.pop("pass_no")
        d["t_start"] = (d.pop("t_start_ns") - t0_ns) / 1e9
        return d


# ------------------------------------------------------------------------------------ range helpers
def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted, non-overlapping (slba, nlb): overlapping and touching ranges joined."""
    if not ranges:
        return []
    a = np.asarray(ranges, dtype=np.int64)
    a = a[np.argsort(a[:, 0], kind="stable")]
    starts, ends = a[:, 0], a[:, 0] + a[:, 1]
    run_end = np.maximum.accumulate(ends)
    new = np.ones(len(a), dtype=bool)
    new[1:] = starts[1:] > run_end[:-1]
    first = np.flatnonzero(new)
    last = np.r_[first[1:], len(a)] - 1
    return [(int(s), int(e - s)) for s, e in zip(starts[first], run_end[last], strict=True)]


def page_runs(pages: np.ndarray) -> list[tuple[int, int]]:
    """(first page, count) runs of a sorted unique page-number array."""
    if not len(pages):
        return []
    brk = np.flatnonzero(np.diff(pages) != 1) + 1
    firsts = np.r_[0, brk]
    lasts = np.r_[brk, len(pages)]
    return [(int(pages[f]), int(n)) for f, n in zip(firsts, lasts - firsts, strict=True)]


def split_ranges(ranges: list[tuple[int, int]], max_blocks: int) -> list[tuple[int, int]]:
    out = []
    for s, n in ranges:
        for i in range(0, n, max_blocks):
            out.append((s + i, min(max_blocks, n - i)))
    return out


# ------------------------------------------------------------------------------------ source side
class ChangeTracker:
    """What changed on the source since the last look: the device logs LBA changes into a UDMQ in the
    hypervisor's memory and the guest pages its VF writes; the VM logs the pages its vCPUs write.
    Every call runs PF admin commands: call from a worker thread."""

    def __init__(self, node: Node, slot: VfSlot, mem: GuestMemory) -> None:
        self.node, self.slot, self.mem = node, slot, mem
        self.cdqid: int | None = None
        self.logging = False
        self.tracking_memory = False
        self._addr = 0
        self._reader: ht.CdqReader | None = None
        self.overflows = 0

    def start(self) -> None:
        pf, nmem = self.node.pf, self.node.mem
        size = UDMQ_SLOTS * c.LBA_ENTRY_SIZE
        self._addr = nmem.alloc(size)
        self.cdqid = pf.admin(ht.cdq_create(self._addr, size, self.slot.cntlid))[0].dw0
        self._reader = ht.CdqReader(lambda off, n: nmem.view(self._addr + off, n), UDMQ_SLOTS)
        pf.admin(ht.log_user_data_changes(self.cdqid, True))
        self.logging = True
        self.mem.take_dirty()
        self.mem.log_dirty = True
        pf.admin(ht.track_memory_changes(self.slot.cntlid, True),
                 data=ht.track_memory_data(PAGE_SHIFT, [(self.mem.base, self.mem.size)]))
        self.tracking_memory = True

    def lba_changes(self) -> tuple[list[tuple[int, int]], bool, bool]:
        """(changed ranges, overflowed, last entry posted because of a suspend). After an overflow the
        device stopped logging; it is restarted here and the caller must treat everything as changed."""
        pf = self.node.pf
        assert self.cdqid is not None and self._reader is not None
        pf.admin(ht.cdq_get(self.cdqid), read=512)  # posts held (coalesced) ranges
        entries = self._reader.poll()
        pf.admin(ht.cdq_set_head(self.cdqid, self._reader.head))
        ranges = [(e["slba"], e["nlb"] + 1) for e in entries if e["nsid"] and e["lbacir"] == c.LBACIR_RANGE]
        overflow = any(e["esa"] == c.ESA_LAST_FULL for e in entries)
        suspended = bool(entries) and entries[-1]["esa"] == c.ESA_LAST_SUSPENDED
        if overflow:
            self.overflows += 1
            pf.admin(ht.log_user_data_changes(self.cdqid, True))
        return merge_ranges(ranges), overflow, suspended

    def ram_changes(self) -> tuple[np.ndarray, bool]:
        """(sorted unique guest page numbers written since the last call by the VF or the vCPUs, SUSP)."""
        pf = self.node.pf
        parts = [self.mem.take_dirty()]
        suspended = False
        if self.tracking_memory:
            while True:
                _, data = pf.admin(ht.track_receive(self.slot.cntlid, TRACK_RECEIVE_BYTES), read=TRACK_RECEIVE_BYTES)
                t = ht.parse_track_receive(data)
                for addr, nbytes in t.ranges:
                    first = (addr - self.mem.base) >> PAGE_SHIFT
                    parts.append(np.arange(first, first + (-(-nbytes >> PAGE_SHIFT)), dtype=np.int64))
                suspended |= t.suspended
                if not t.more:
                    break
        pages = np.unique(np.concatenate(parts).astype(np.int64)) if parts else np.empty(0, np.int64)
        return pages[(pages >= 0) & (pages < self.mem.npages)], suspended

    def stop(self) -> list[str]:
        """Ends logging and tracking and deletes the UDMQ; best effort (rollback calls it too)."""
        pf = self.node.pf
        problems = []
        self.mem.log_dirty = False
        steps: list[tuple[str, Callable[[], object]]] = []
        if self.logging and self.cdqid is not None:
            steps.append(("stop change logging", lambda: pf.admin(ht.log_user_data_changes(self.cdqid, False))))
        if self.tracking_memory:
            steps.append(("stop memory tracking", lambda: pf.admin(ht.track_memory_changes(self.slot.cntlid, False))))
        if self.cdqid is not None:
            steps.append(("delete UDMQ", lambda: pf.admin(ht.cdq_delete(self.cdqid))))
        for what, step in steps:
            try:
                step()
            except Exception as e:
                problems.append(f"{what}: {e}")
        self.logging = self.tracking_memory = False
        if self.cdqid is not None:
            self.node.mem.free(self._addr)
            self.cdqid = None
        return problems


class PrecopySender:
    """Sends LBA ranges and guest pages over the stream. `send(msg)` is the channel's coroutine."""

    def __init__(self, send: Callable[[Message], object], node: Node, slot: VfSlot, mem: GuestMemory, *,
                 chunk_bytes: int = 128 << 10, max_bandwidth: float = 0.0, stream_version: int | None = None) -> None:
        self._send, self.node, self.slot, self.mem = send, node, slot, mem
        if stream_version is None:  # the channel's, when `send` is a Channel's method
            session = getattr(getattr(send, "__self__", None), "session", None)
            stream_version = getattr(session, "version", None) or STREAM_VERSION
        # version 2: LBA data in LBA_RANGES frames of up to LBA_FRAME bytes whatever the ranges' sizes
        self.multi_range = stream_version >= MIN_VERSION[MsgType.LBA_RANGES]
        self.max_bandwidth = max_bandwidth  # bytes/s; 0: as fast as the stream goes
        self._free_at = 0.0  # pacing: when the link (as capped) is free again, monotonic seconds
        self.lba = slot.lba_size
        self.chunk_blocks = max(1, chunk_bytes // self.lba)
        self._buffers = [node.host_buffer(LBA_BATCH), node.host_buffer(LBA_BATCH)]
        self.bytes_lba = 0
        self.bytes_ram = 0

    async def send(self, msg: Message) -> None:
        """Sends a message, paced to `max_bandwidth` (a token bucket of one message's worth)."""
        if self.max_bandwidth > 0:
            body = msg.body
            nbytes = (len(body.data) if isinstance(body, LbaData) else
                      body.nbytes if isinstance(body, RamData | LbaRanges) else 64)
            now = time.monotonic()
            self._free_at = max(self._free_at, now) + nbytes / self.max_bandwidth
            if self._free_at - now > 0.001:
                await asyncio.sleep(self._free_at - now)
        await self._send(msg)  # type: ignore[misc]

    def close(self) -> None:
        for b in self._buffers:
            self.node.free_host_buffer(b)
        self._buffers = []

    def _batches(self, ranges: list[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        per_frame = LBA_FRAME // self.lba
        pieces = split_ranges(ranges, per_frame)
        batches, cur, size = [], [], 0
        for s, n in pieces:
            if size + n * self.lba > LBA_BATCH and cur:
                batches.append(cur)
                cur, size = [], 0
            cur.append((s, n))
            size += n * self.lba
        if cur:
            batches.append(cur)
        return batches

    async def send_lbas(self, ranges: list[tuple[int, int]]) -> int:
        """Reads `ranges` through the PF (the next batch is read while this one is sent) and sends them;
        all-zero pieces go as deallocations (the destination punches holes instead of writing zeroes).
        Version 2 streams carry the blocks of many ranges per LBA_RANGES frame (a scattered set costs one
        frame per LBA_FRAME bytes, not one per range); version 1 one LBA_DATA frame per piece."""
        batches = self._batches(ranges)
        if not batches:
            return 0
        nsid = self.slot.nsid
        sent = 0

        def read(i: int) -> memoryview:
            batch = batches[i]
            out = self._buffers[i % 2][: sum(n for _, n in batch) * self.lba]
            self.node.read_lbas(nsid, batch, out)
            return out

        pending = asyncio.create_task(asyncio.to_thread(read, 0))
        try:
            for i, batch in enumerate(batches):
                data = await pending
                if i + 1 < len(batches):
                    pending = asyncio.create_task(asyncio.to_thread(read, i + 1))
                sent += await self._send_batch(batch, data)
        finally:
            if not pending.done():  # a failure mid-way: let the reader thread finish with the buffer first
                with contextlib.suppress(Exception):
                    await asyncio.shield(pending)
        self.bytes_lba += sent
        return sent

    async def _send_batch(self, batch: list[tuple[int, int]], data: memoryview) -> int:
        """Frames one batch read into `data` (the pieces back to back); returns the bytes it counts as sent."""
        lba, ensid = self.lba, self.slot.ensid
        nlbs = np.fromiter((n for _, n in batch), dtype=np.int64, count=len(batch))
        starts = np.r_[0, np.cumsum(nlbs)[:-1]] * (lba // 8)  # each piece's first 8-byte word
        nonzero = (np.maximum.reduceat(np.frombuffer(data, dtype=np.uint64), starts) != 0).tolist()
        sent = 0
        zeros: list[tuple[int, int]] = []
        frame: list[list[int]] = []  # [slba, nlb] of the frame being gathered (LBA-adjacent pieces joined)
        spans: list[list[int]] = []  # [start, end) offsets of its bytes in `data` (adjacent pieces joined)
        frame_bytes = 0

        async def flush() -> None:
            await self.send(Message.of(LbaRanges(ensid, [(a, b) for a, b in frame],
                                                 parts=[data[a:b] for a, b in spans])))
            frame.clear()
            spans.clear()

        off = 0
        for (s, n), keep in zip(batch, nonzero, strict=True):
            nbytes = n * lba
            off += nbytes
            if not keep:
                zeros.append((s, n))
                continue
            sent += nbytes
            if not self.multi_range:
                await self.send(Message.of(LbaData(ensid, s, n, data[off - nbytes : off])))
                continue
            if frame and (frame_bytes + nbytes > LBA_FRAME or s < frame[-1][0] + frame[-1][1]):
                await flush()
                frame_bytes = 0
            if frame and s == frame[-1][0] + frame[-1][1]:
                frame[-1][1] += n
            else:
                frame.append([s, n])
            if spans and spans[-1][1] == off - nbytes:
                spans[-1][1] = off
            else:
                spans.append([off - nbytes, off])
            frame_bytes += nbytes
        if frame:
            await flush()
        if zeros:
            await self.send(Message.of(LbaDeallocate(ensid, zeros)))
            sent += 12 * len(zeros)
        return sent

    async def send_pages(self, pages: np.ndarray, *, skip_zero: bool = False, paused: bool = False) -> int:
        """Sends the guest pages; with `skip_zero` (the first pass, to a zeroed destination) empty pages
        are left out, as QEMU does. While the guest runs (`paused` False) each frame's pages are
        snapshotted first, so that the frame's checksum covers exactly the bytes that go out."""
        ps = self.mem.page_size
        if skip_zero and len(pages):
            words = np.frombuffer(self.mem.buf, dtype=np.uint64).reshape(-1, ps // 8)
            keep = np.zeros(len(pages), dtype=bool)
            for i in range(0, len(pages), 8192):
                keep[i : i + 8192] = words[pages[i : i + 8192]].any(axis=1)
            pages = pages[keep]
        sent = 0
        per_frame = RAM_FRAME // ps
        batch: list[tuple[int, memoryview]] = []
        batch_pages = 0
        for first, count in page_runs(pages):
            for p in range(first, first + count, per_frame):
                n = min(per_frame, first + count - p)
                if batch_pages + n > per_frame and batch:
                    await self.send(Message.of(RamData.from_pages(batch, snapshot=not paused)))
                    batch, batch_pages = [], 0
                addr = self.mem.base + p * ps
                batch.append((addr, self.mem.view(addr, n * ps)))
                batch_pages += n
                sent += n * ps
        if batch:
            await self.send(Message.of(RamData.from_pages(batch, snapshot=not paused)))
        self.bytes_ram += sent
        return sent


# ------------------------------------------------------------------------------------ destination side
class PrecopyReceiver:
    """Applies what the source sends: LBAs through this host's PF into the new VF's namespace, pages
    straight into the VM's (not yet running) memory. LBA data (LBA_DATA, LBA_RANGES) is gathered into
    the hypervisor's DMA memory and written in batches (many commands in flight, one thread hop); two
    batch buffers, so the stream goes on filling one while the PF writes the other. One write is in
    flight at a time, in arrival order, so a later copy of a block always lands after an earlier one."""

    def __init__(self, node: Node, slot: VfSlot, mem: GuestMemory) -> None:
        self.node, self.slot, self.mem = node, slot, mem
        self.bytes_lba = 0
        self.bytes_ram = 0
        self._buffers = [node.host_buffer(LBA_BATCH), node.host_buffer(LBA_BATCH)]
        self._cur = 0  # the buffer being filled
        self._ranges: list[list[int]] = []  # [slba, nlb] of what it holds, back to back (adjacent ranges joined)
        self._fill = 0
        self._writing: asyncio.Future[None] | None = None  # the other buffer's write
        self._lock = threading.Lock()
        self._in_flight = False  # a PF write thread is using a buffer (close() must not free it under it)
        self._closed = False

    def close(self) -> None:
        """Frees the buffers now, or when a write still in flight (an aborted migration) has finished."""
        with self._lock:
            self._closed = True
            if not self._in_flight:
                self._free()
        if self._writing is not None:
            self._writing.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved: not logged

    def _free(self) -> None:
        for b in self._buffers:
            self.node.free_host_buffer(b)
        self._buffers = []

    async def apply(self, msg: Message) -> None:
        body = msg.body
        if msg.type is MsgType.LBA_DATA or msg.type is MsgType.LBA_RANGES:
            assert isinstance(body, LbaData | LbaRanges)
            ranges = [(body.slba, body.nlb)] if isinstance(body, LbaData) else body.ranges
            self._check_lbas(body.nsid, ranges)  # all of them before any is buffered: a bad frame leaves nothing
            if body.lba_size != self.slot.lba_size:
                raise ValueError(f"LBA data of {body.lba_size}-byte blocks for a {self.slot.lba_size}-byte namespace")
            data = body.data
            assert data is not None
            n = len(data)
            if self._fill + n > LBA_BATCH:
                await self._submit()
            if n > LBA_BATCH:  # bigger than a batch (a peer's choice): written from the frame itself
                await self.flush()
                await asyncio.to_thread(self.node.write_ranges, self.slot.nsid, list(ranges), data)
            else:
                self._buffers[self._cur][self._fill : self._fill + n] = data
                self._fill += n
                last = self._ranges[-1] if self._ranges else None
                for s, nlb in ranges:
                    if last is not None and last[0] + last[1] == s:
                        last[1] += nlb
                    else:
                        last = [s, nlb]
                        self._ranges.append(last)
            self.bytes_lba += n
            return
        if msg.type is MsgType.RAM_DATA:  # guest memory: independent of the namespace's writes
            assert isinstance(body, RamData)
            for addr, chunk in body.chunks():
                self.mem.view(addr, len(chunk))[:] = chunk  # outside guest RAM: ValueError, stream aborted
                self.bytes_ram += len(chunk)
            return
        await self.flush()  # anything else is ordered after the LBA data before it
        if msg.type is MsgType.LBA_DEALLOCATE:
            assert isinstance(body, LbaDeallocate)
            self._check_lbas(body.nsid, body.ranges)
            await asyncio.to_thread(self.node.deallocate, self.slot.nsid, list(body.ranges))
        else:
            raise ValueError(f"not a data message: {msg.type.name}")

    async def _submit(self) -> None:
        """Starts writing the gathered batch (after the previous write has finished) and switches buffers."""
        if not self._ranges:
            return
        await self._wait_write()
        ranges = [(s, n) for s, n in self._ranges]
        view = self._buffers[self._cur][: self._fill]
        self._cur ^= 1
        self._ranges, self._fill = [], 0
        self._in_flight = True
        self._writing = asyncio.ensure_future(asyncio.to_thread(self._write, ranges, view))

    def _write(self, ranges: list[tuple[int, int]], view: memoryview) -> None:
        try:
            self.node.write_ranges(self.slot.nsid, ranges, view)
        finally:
            with self._lock:
                self._in_flight = False
                if self._closed:
                    self._free()

    async def _wait_write(self) -> None:
        """Waits for the write in flight; its failure (the PF refused a write) is raised here."""
        w, self._writing = self._writing, None
        if w is not None:
            await w

    async def flush(self) -> None:
        """Writes everything gathered and waits for it (call before acknowledging a pass)."""
        await self._submit()
        await self._wait_write()

    def _check_lbas(self, ensid: int, ranges) -> None:
        if ensid != self.slot.ensid:
            raise ValueError(f"data for namespace {ensid}, the VM has {self.slot.ensid}")
        for s, n in ranges:
            if s < 0 or n <= 0 or s + n > self.slot.nlb:
                raise ValueError(f"LBA range {s}+{n} outside the namespace ({self.slot.nlb} blocks)")
