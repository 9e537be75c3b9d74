"""DMA through a per-function IOMMU: I/O virtual addresses mapped onto host memory.

A device reaches host memory only through `Iommu.view()`; an address outside every mapping,
or a write into a read-only mapping, raises `DmaFault`, which the controller turns into an
NVMe status. Views are memoryviews into the mapped buffer, so data moves with no copies.
"""

from __future__ import annotations

import bisect
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
    change tracking of TP4159 (Track Send, Track Memory Changes) hooks in there.
    `generation` changes on every unmap so holders of cached views know to translate again.
    """

    def __init__(self) -> None:
        self._starts: list[int] = []
        self._maps: list[Mapping] = []
        self._last: Mapping | None = None
        self.generation = 0
        self.on_write: Callable[[int, int], None] | None = None
        self.faults = 0

    def map(self, iova: int, buf: memoryview | bytearray, writable: bool = True) -> None:
        mv = memoryview(buf).cast("B")
        if iova < 0 or len(mv) == 0:
            raise ValueError("mapping must have a non-negative IOVA and non-zero size")
        i = bisect.bisect_right(self._starts, iova)
        if i > 0 and self._maps[i - 1].end > iova:
            raise ValueError(f"IOVA {iova:#x} overlaps an existing mapping")
        if i < len(self._maps) and self._maps[i].iova < iova + len(mv):
            raise ValueError(f"IOVA range {iova:#x}+{len(mv):#x} overlaps an existing mapping")
        self._starts.insert(i, iova)
        self._maps.insert(i, Mapping(iova, len(mv), mv, writable))

    def unmap(self, iova: int) -> None:
        i = bisect.bisect_left(self._starts, iova)
        if i == len(self._starts) or self._starts[i] != iova:
            raise KeyError(f"no mapping starts at {iova:#x}")
        del self._starts[i]
        del self._maps[i]
        self._last = None
        self.generation += 1

    def clear(self) -> None:
        self._starts.clear()
        self._maps.clear()
        self._last = None
        self.generation += 1

    def mappings(self) -> list[Mapping]:
        return list(self._maps)

    def _find(self, iova: int, length: int, write: bool) -> Mapping:
        m = self._last
        if m is None or not (m.iova <= iova and iova + length <= m.end):
            i = bisect.bisect_right(self._starts, iova) - 1
            if i < 0 or iova + length > self._maps[i].end or length < 0:
                self.faults += 1
                raise DmaFault(iova, length, write)
            m = self._maps[i]
            self._last = m
        if write and not m.writable:
            self.faults += 1
            raise DmaFault(iova, length, write, "read-only mapping")
        return m

    def view(self, iova: int, length: int, write: bool = False) -> memoryview:
        """The host memory at [iova, iova+length) as a memoryview; raises DmaFault."""
        m = self._find(iova, length, write)
        if write and self.on_write is not None:
            self.on_write(iova, length)
        off = iova - m.iova
        return m.buf[off : off + length]

    def read(self, iova: int, length: int) -> bytes:
        return bytes(self.view(iova, length))

    def write(self, iova: int, data: bytes | memoryview) -> None:
        self.view(iova, len(data), write=True)[:] = data
