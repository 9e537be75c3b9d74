"""Which logical blocks of a namespace may be allocated, at TP4165's Tracked LBA Allocation Granularity.

Get LBA Status with ATYPE 02h (admin/lba_status.py) answers from this map instead of asking the file
system, so a migration host can scan a multi-TiB namespace for the few ranges it must copy.

Granularity (TLBAAG, Identify CNS 05h)
    One *unit* is TLBAAG logical blocks, aligned to multiples of TLBAAG from LBA 0: 4 KiB worth of
    blocks (8 for 512-byte LBAs, 1 for 4 KiB or larger), the size the spec recommends and the file
    system's block size, so the file's own extents line up with units. The map is a 32-bit roaring
    bitmap of unit numbers (pyroaring), so TLBAAG doubles for namespaces beyond 2^32 units (16 TiB at
    4 KiB units). Memory follows the allocation pattern, not the capacity: an empty 4 TiB namespace
    costs nothing, 10k scattered extents cost ~130 KiB, and the worst case (every other 4 KiB unit
    allocated) is one 8 KiB bitmap container per 256 MiB, 128 MiB for 4 TiB.

Never under-report
    Write and Write Zeroes without DEAC set every unit they touch. Deallocation (DSM AD, Write Zeroes
    with DEAC, both through `Namespace.deallocate`) clears only units it covers completely; a unit
    that is deallocated in pieces stays allocated (over-reporting is allowed, under-reporting is not).
    The file agrees: ext4 zeroes a partly punched 4 KiB block but keeps it, so a rebuild sees the same.
    Ordering makes concurrent commands on a shared namespace safe without a lock: writers change the
    file first and set units after, deallocation clears units first and punches the file after. If a
    deallocation clears a unit after a write set it, the punch comes after the write's data too, so
    the unit really is empty. Every pyroaring call holds the GIL for its whole duration (the
    extension never releases it), so each call is atomic with respect to the other engine threads.

Rebuild and persistence
    On open the map is rebuilt from the file (SEEK_DATA/SEEK_HOLE extents rounded out to units).
    Write Zeroes without DEAC is the exception: `FALLOC_FL_ZERO_RANGE` leaves unwritten extents that
    ext4 and XFS report as holes. Units written that way are kept in a second bitmap, `zeroed`, that is
    saved as a small sidecar (`ns<N>.alloc`) when the namespace's write cache is flushed (Flush, FUA,
    WCE=0, shutdown) and merged into the map on open. It is written before the data's `fdatasync`, so
    a crash can only leave it claiming too much. The sidecar names the namespace (NGUID), LBA size and
    TLBAAG; one that does not match is ignored (a Format deallocates everything anyway).
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from pyroaring import BitMap

from nvme_lm.device import persist

if TYPE_CHECKING:
    from nvme_lm.device.namespace import Namespace

UNIT_BYTES = 4096  # the smallest unit; TLBAAG x LBA size >= 4 KiB as TP4165 recommends
MAX_UNITS = 1 << 32  # a pyroaring BitMap holds 32-bit values
SIDECAR_SUFFIX = ".alloc"
_MAGIC = b"NVLMALC1"
_HEADER = struct.Struct("<8s16sII")  # magic, NGUID, LBA size, TLBAAG


def granularity(nsze: int, lba_size: int) -> int:
    """TLBAAG in logical blocks: 4 KiB worth of blocks (at least one), doubled until the units fit in 32 bits."""
    g = max(1, UNIT_BYTES // lba_size)
    while -(-nsze // g) > MAX_UNITS:
        g <<= 1
    return g


class AllocationMap:
    """Allocated units of one namespace (see the module docstring for the rules)."""

    __slots__ = ("_persist_lock", "key", "nsze", "path", "tlbaag", "unit_shift", "units", "zeroed", "zeroed_dirty")

    def __init__(self, nsze: int, lba_size: int, path: Path | None = None, key: bytes = bytes(16)) -> None:
        self.nsze = nsze
        self.tlbaag = granularity(nsze, lba_size)
        self.unit_shift = self.tlbaag.bit_length() - 1
        self.units = BitMap()
        self.zeroed = BitMap()  # units allocated by Write Zeroes without DEAC: the file shows them as holes
        self.zeroed_dirty = False
        self._persist_lock = threading.Lock()  # two controllers may flush a shared namespace at once
        self.path = path
        self.key = _HEADER.pack(_MAGIC, key, lba_size, self.tlbaag)

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def for_namespace(cls, ns: Namespace, *, scan: bool = True) -> AllocationMap:
        """The map of `ns`, rebuilt from its file and sidecar (`scan=False`: empty, as after a Format)."""
        amap = cls(ns.nsze, ns.lba_size, ns.path.with_suffix(SIDECAR_SUFFIX), bytes.fromhex(ns.info.nguid))
        if scan:
            amap.add_extents(ns.allocated_extents(), ns.lba_shift)
            amap.load_sidecar()
        return amap

    def add_extents(self, extents: Iterable[tuple[int, int]], lba_shift: int) -> None:
        """Sets the units of byte extents (offset, length), rounded outwards."""
        shift = lba_shift + self.unit_shift
        mask = (1 << shift) - 1
        add = self.units.add_range
        for off, n in extents:
            add(off >> shift, (off + n + mask) >> shift)

    def load_sidecar(self) -> None:
        if self.path is None:
            return
        try:
            blob = self.path.read_bytes()
        except FileNotFoundError:
            return
        if blob[: _HEADER.size] != self.key:
            return  # another namespace's, or from before a Format: nothing of it is allocated now
        self.zeroed = BitMap.deserialize(blob[_HEADER.size :])
        self.units |= self.zeroed

    # --- the I/O path ---------------------------------------------------------------------------
    def mark(self, slba: int, nlb: int) -> None:
        """Write: every unit the blocks touch is allocated (one add_range on the hot path)."""
        s = self.unit_shift
        self.units.add_range(slba >> s, ((slba + nlb - 1) >> s) + 1)

    def mark_zeroed(self, slba: int, nlb: int) -> None:
        """Write Zeroes without DEAC: allocated, and remembered for the sidecar (the file shows holes)."""
        s = self.unit_shift
        first, stop = slba >> s, ((slba + nlb - 1) >> s) + 1
        self.units.add_range(first, stop)
        self.zeroed.add_range(first, stop)
        self.zeroed_dirty = True

    def unmark(self, slba: int, nlb: int) -> None:
        """Deallocation: clears the units the range covers completely (call it before punching the file).

        The last unit of a namespace whose size is not a multiple of TLBAAG counts as covered when the
        range reaches NSZE."""
        g, s = self.tlbaag, self.unit_shift
        first = (slba + g - 1) >> s
        end = slba + nlb
        stop = end >> s if end < self.nsze else (self.nsze + g - 1) >> s
        if first >= stop:
            return
        self.units.remove_range(first, stop)
        if self.zeroed.range_cardinality(first, stop):
            self.zeroed.remove_range(first, stop)
            self.zeroed_dirty = True

    # --- persistence --------------------------------------------------------------------------------
    def persist(self) -> None:
        """Saves the zeroed units if they changed (an empty set removes the sidecar). Called on flush."""
        if not self.zeroed_dirty or self.path is None:
            return
        with self._persist_lock:
            self.zeroed_dirty = False  # a Write Zeroes from now on sets it again and is saved next time
            blob = self.zeroed.serialize() if self.zeroed else b""
            if not blob:
                self.path.unlink(missing_ok=True)
                return
            tmp = self.path.with_suffix(SIDECAR_SUFFIX + ".tmp")

            def write() -> None:
                with open(tmp, "wb") as f:
                    f.write(self.key)
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())

            persist.with_reserve(tmp.parent, write)
            os.replace(tmp, self.path)
            dfd = os.open(self.path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)

    # --- queries ------------------------------------------------------------------------------------
    def ranges(self, slba: int, end: int) -> Iterator[tuple[int, int]]:
        """Maximal runs of allocated units within LBAs [slba, end), as (first LBA, end LBA) clipped to
        the window, ascending. Cost per run: O(log run length) bitmap calls, none per unit."""
        s = self.unit_shift
        pos = slba >> s
        uend = (end + self.tlbaag - 1) >> s
        next_set = self.units.next_set_bit
        full = self.units.contains_range
        while pos < uend:
            try:
                first = next_set(pos)
            except ValueError:  # no set unit at or after pos
                return
            if first >= uend:
                return
            lo, step, hi = first + 1, 1, 0  # [first, lo) is all set
            while lo < uend:  # gallop: double the probe while the units stay set
                probe = min(lo + step, uend)
                if not full(lo, probe):
                    hi = probe
                    break
                lo, step = probe, step << 1
            if hi:  # [lo, hi) holds the first clear unit: bisect for it
                while hi - lo > 1:
                    mid = (lo + hi) >> 1
                    if full(lo, mid):
                        lo = mid
                    else:
                        hi = mid
            yield max(first << s, slba), min(lo << s, end)
            pos = lo

    def is_allocated(self, lba: int) -> bool:
        return (lba >> self.unit_shift) in self.units

    @property
    def allocated_units(self) -> int:
        return len(self.units)

    def memory_bytes(self) -> int:
        """Serialized size of the bitmap: a close measure of what it holds in memory."""
        return len(self.units.serialize())
