"""DMA through a per-function IOMMU: I/O virtual addresses mapped onto host memory.

A device reaches host memory only through `Iommu.view()`; an address outside every mapping,
or a write into a read-only mapping, raises `DmaFault`, which the controller turns into an
NVMe status. Views are memoryviews into the mapped buffer, so data moves with no copies.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable
from dataclasses import dataclass


class DmaFault(Exception):
    """A DMA access outside the function's IOMMU mappings (an IOMMU fault, never a crash)."""

    def __init__(self, iova: int, length: int, write: bool, reason: str = "unmapped") -> None:
        super().__init__(f"DMA {'write' if write else 'read'} fault at {iova:#x}+{length:#x}: {reason}")
        self.iova = iova
        self.length = length
        self.write = write


@dataclass(slots=True)
class Mapping:
    iova: int
    size: int
    buf: memoryview
    writable: bool

    @property
    def end(self) -> int:
        return self.iova + self.size


class Iommu:
    """Sorted, non-overlapping IOVA mappings with a last-hit cache.

    `on_write` (optional) is told of every range the device is about to write; the memory
    change tracking of TP4159 (Track Send, Track Memory Changes) hooks in there. Because a
    tracker may be drained between that notice and the write itself, the device calls
    `landed()` once a command's writes are done (the controller, after each command's handler),
    and the ranges written since are announced again: a page a hypervisor copied too early is
    dirty once more.
    `generation` changes on every unmap so holders of cached views know to translate again.
    Mapping lists are replaced, never edited in place, so a device thread translating while
    the host maps or unmaps sees either the old or the new table, never a torn one.
    """

    def __init__(self) -> None:
        self._table: tuple[list[int], list[Mapping]] = ([], [])  # (sorted starts, mappings), swapped whole
        self._last: tuple[int, Mapping] | None = None  # (generation, mapping) of the last hit
        self._lock = threading.Lock()
        self.generation = 0
        self.on_write: Callable[[int, int], None] | None = None
        self.faults = 0
        self._recent = threading.local()  # per device thread: write ranges handed out since `landed()`

    def map(self, iova: int, buf: memoryview | bytearray, writable: bool = True) -> None:
        mv = memoryview(buf).cast("B")
        if iova < 0 or len(mv) == 0:
            raise ValueError("mapping must have a non-negative IOVA and non-zero size")
        with self._lock:
            starts, maps = list(self._table[0]), list(self._table[1])
            i = bisect.bisect_right(starts, iova)
            if i > 0 and maps[i - 1].end > iova:
                raise ValueError(f"IOVA {iova:#x} overlaps an existing mapping")
            if i < len(maps) and maps[i].iova < iova + len(mv):
                raise ValueError(f"IOVA range {iova:#x}+{len(mv):#x} overlaps an existing mapping")
            starts.insert(i, iova)
            maps.insert(i, Mapping(iova, len(mv), mv, writable and not mv.readonly))
            self._table = (starts, maps)

    def unmap(self, iova: int) -> None:
        with self._lock:
            starts, maps = self._table
            i = bisect.bisect_left(starts, iova)
            if i == len(starts) or starts[i] != iova:
                raise KeyError(f"no mapping starts at {iova:#x}")
            self._table = (starts[:i] + starts[i + 1 :], maps[:i] + maps[i + 1 :])
            self.generation += 1
            self._last = None

    def clear(self) -> None:
        with self._lock:
            self._table = ([], [])
            self.generation += 1
            self._last = None

    def invalidate(self) -> None:
        """Tells holders of cached views to translate again (e.g. bus mastering was switched)."""
        with self._lock:
            self.generation += 1
            self._last = None

    def mappings(self) -> list[Mapping]:
        return list(self._table[1])

    def _find(self, iova: int, length: int, write: bool) -> Mapping:
        hit = self._last
        gen = self.generation
        if hit is not None and hit[0] == gen and hit[1].iova <= iova and length >= 0 and iova + length <= hit[1].end:
            m = hit[1]
        else:
            starts, maps = self._table
            i = bisect.bisect_right(starts, iova) - 1
            if i < 0 or length < 0 or iova + length > maps[i].end:
                self.faults += 1
                raise DmaFault(iova, length, write)
            m = maps[i]
            self._last = (gen, m)
        if write and not m.writable:
            self.faults += 1
            raise DmaFault(iova, length, write, "read-only mapping")
        return m

    def view(self, iova: int, length: int, write: bool = False) -> memoryview:
        """The host memory at [iova, iova+length) as a memoryview; raises DmaFault."""
        m = self._find(iova, length, write)
        if write and self.on_write is not None:
            self.on_write(iova, length)
            recent = getattr(self._recent, "ranges", None)
            if recent is None:
                recent = self._recent.ranges = []
            recent.append((iova, length))
        off = iova - m.iova
        return m.buf[off : off + length]

    def landed(self) -> None:
        """This thread's device writes since the last call are done: tell the tracker again."""
        recent = getattr(self._recent, "ranges", None)
        if recent:
            on_write = self.on_write
            if on_write is not None:
                for iova, length in recent:
                    on_write(iova, length)
            recent.clear()

    def read(self, iova: int, length: int) -> bytes:
        return bytes(self.view(iova, length))

    def write(self, iova: int, data: bytes | memoryview) -> None:
        self.view(iova, len(data), write=True)[:] = data
