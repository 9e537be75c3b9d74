"""Namespaces on real sparse files.

One file per namespace. Reads and writes go straight between the file and DMA-mapped
memoryviews with `os.preadv` / `os.pwritev`; deallocation punches holes, so the file's own
extent map (SEEK_DATA / SEEK_HOLE) is the ground truth for what is allocated.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import json
import os
import uuid as uuidlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from nvme_lm.device import persist
from nvme_lm.device.allocation import SIDECAR_SUFFIX, AllocationMap

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
IOV_MAX = 1024


def fallocate(fd: int, mode: int, offset: int, length: int) -> None:
    if length <= 0:
        return
    if _libc.fallocate(fd, mode, offset, length) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def _after(views: list[memoryview], skip: int) -> list[memoryview]:
    """The buffers that follow the first `skip` bytes of `views`."""
    for i, v in enumerate(views):
        if skip < len(v):
            return [v[skip:], *views[i + 1 :]]
        skip -= len(v)
    return []


def file_extents(fd: int, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """(offset, length) of an open file's data extents within [start, end), by SEEK_DATA/SEEK_HOLE
    (end: the file's size). Namespaces, and the benchmarks' baselines, read allocation this way."""
    end = os.fstat(fd).st_size if end is None else end
    pos = start
    while pos < end:
        try:
            data = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:
                return
            raise
        if data >= end:
            return
        hole = min(os.lseek(fd, data, os.SEEK_HOLE), end)
        yield data, hole - data
        pos = hole


@dataclass
class NamespaceInfo:
    """What is persisted next to the data file, so a restarted device sees the same namespace."""

    nsid: int
    nsze: int  # size in logical blocks
    lba_size: int
    nguid: str  # 32 hex digits
    eui64: str  # 16 hex digits
    uuid: str
    nmic: int = 1  # bit 0: shared, may be attached to several controllers (NMIC)

    @classmethod
    def new(cls, nsid: int, nsze: int, lba_size: int) -> NamespaceInfo:
        u = uuidlib.uuid4()
        return cls(nsid, nsze, lba_size, u.hex, u.hex[:16], str(u))


class Namespace:
    def __init__(self, info: NamespaceInfo, path: Path) -> None:
        if info.lba_size < 512 or info.lba_size & (info.lba_size - 1):  # LBADS is a power of two >= 9
            raise ValueError(f"unsupported LBA size {info.lba_size}")
        self.info = info
        self.path = path
        self.lba_shift = info.lba_size.bit_length() - 1
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        size = info.nsze << self.lba_shift
        if os.fstat(self.fd).st_size != size:
            os.ftruncate(self.fd, size)
        self.dirty = False  # data in the volatile write cache (page cache) since the last flush
        self.alloc = AllocationMap.for_namespace(self)  # TP4165 allocation map (device/allocation.py)
        self.change_loggers: list = []  # TP4159 UDMQs logging changes here (device/cdq.py Cdq.on_change)

    # --- identity -------------------------------------------------------------------------------
    @property
    def nsid(self) -> int:
        return self.info.nsid

    @property
    def nsze(self) -> int:
        return self.info.nsze

    @property
    def lba_size(self) -> int:
        return self.info.lba_size

    # --- persistence ----------------------------------------------------------------------------
    @classmethod
    def create(cls, data_dir: Path, info: NamespaceInfo) -> Namespace:
        data_dir.mkdir(parents=True, exist_ok=True)
        path = data_dir / f"ns{info.nsid}.img"
        if path.exists():
            path.unlink()
        ns = cls(info, path)
        ns.save_info()
        return ns

    @classmethod
    def open(cls, data_dir: Path, nsid: int) -> Namespace:
        info = NamespaceInfo(**json.loads((data_dir / f"ns{nsid}.json").read_text()))
        return cls(info, data_dir / f"ns{nsid}.img")

    def save_info(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        data = asdict(self.info)
        if data["nmic"] == 1:
            del data["nmic"]  # written only for private namespaces: older files stay the same
        persist.with_reserve(tmp.parent, lambda: tmp.write_text(json.dumps(data, indent=2)))
        os.replace(tmp, self.path.with_suffix(".json"))

    def reformat(self, lba_size: int) -> None:
        """Format NVM: a new LBA size over the same capacity in bytes; every block deallocated."""
        nbytes = self.info.nsze << self.lba_shift
        self.info.lba_size = lba_size
        self.info.nsze = nbytes // lba_size
        self.lba_shift = lba_size.bit_length() - 1
        self.alloc = AllocationMap.for_namespace(self, scan=False)  # emptied before the file: allocation.py
        os.ftruncate(self.fd, 0)  # drops every extent: the whole namespace reads as zeroes
        os.ftruncate(self.fd, self.info.nsze << self.lba_shift)
        os.fsync(self.fd)
        self.alloc.zeroed_dirty = True
        self.alloc.persist()  # removes the Write Zeroes sidecar
        self.dirty = False
        self.save_info()

    def destroy(self) -> None:
        self.close()
        for p in (self.path, self.path.with_suffix(".json"), self.path.with_suffix(SIDECAR_SUFFIX)):
            p.unlink(missing_ok=True)

    def close(self) -> None:
        if self.fd >= 0:
            self.alloc.persist()
            os.close(self.fd)
            self.fd = -1

    # --- data -----------------------------------------------------------------------------------
    def in_range(self, slba: int, nlb: int) -> bool:
        return slba + nlb <= self.info.nsze

    def read_into(self, slba: int, views: list[memoryview]) -> None:
        off = slba << self.lba_shift
        for i in range(0, len(views), IOV_MAX):
            chunk = views[i : i + IOV_MAX]
            want = sum(len(v) for v in chunk)
            n = os.preadv(self.fd, chunk, off)
            if n != want:
                raise OSError(errno.EIO, f"short read of {n}/{want} bytes at {off}")
            off += n

    def write_from(self, slba: int, views: list[memoryview]) -> None:
        off = slba << self.lba_shift
        nlb = sum(len(v) for v in views) >> self.lba_shift
        try:
            for i in range(0, len(views), IOV_MAX):
                chunk = views[i : i + IOV_MAX]
                want = sum(len(v) for v in chunk)
                n = os.pwritev(self.fd, chunk, off)
                while n < want:  # short (e.g. the disk filled up): go on, so the error says why (ENOSPC)
                    m = os.pwritev(self.fd, _after(chunk, n), off + n)
                    if m <= 0:
                        raise OSError(errno.EIO, f"short write of {n}/{want} bytes at {off}")
                    n += m
                off += n
            self.dirty = True
        finally:
            # after the data (allocation.py: ordering); on a failure part of it may be written, so
            # the whole range is marked and logged either way
            self.alloc.mark(slba, nlb)
            if self.change_loggers:
                self._log_change(slba, nlb, False)

    def deallocate(self, slba: int, nlb: int) -> None:
        """Punches a hole: the blocks read back as zeroes and stop counting as allocated."""
        self.alloc.unmark(slba, nlb)  # before the punch (allocation.py: ordering)
        try:
            fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, slba << self.lba_shift,
                      nlb << self.lba_shift)
        except BaseException:
            self.alloc.mark_zeroed(slba, nlb)  # the punch may have done nothing: never under-report
            if self.change_loggers:
                self._log_change(slba, nlb, False)  # part of it may have changed
            raise
        self.dirty = True
        if self.change_loggers:
            self._log_change(slba, nlb, True)

    def write_zeroes(self, slba: int, nlb: int) -> None:
        """Zeroes that stay allocated (Write Zeroes without DEAC)."""
        try:
            fallocate(self.fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, slba << self.lba_shift,
                      nlb << self.lba_shift)
        finally:
            self.alloc.mark_zeroed(slba, nlb)  # ext4 shows these as holes: the map (and sidecar) keeps them
            if self.change_loggers:
                self._log_change(slba, nlb, False)  # also on failure: part of it may have changed
        self.dirty = True

    def _log_change(self, slba: int, nlb: int, dlba: bool) -> None:
        """Tells the UDMQs logging this namespace (after the change took effect, NVM CS §5.6)."""
        for logger in list(self.change_loggers):
            logger.on_change(self.nsid, slba, nlb, dlba)

    def flush(self) -> None:
        if self.alloc.zeroed_dirty:
            self.alloc.persist()  # before the data, so a crash can only over-report
        os.fdatasync(self.fd)
        self.dirty = False

    # --- allocation -----------------------------------------------------------------------------
    def allocated_extents(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """(offset, length) in bytes of the file's data extents within [start, end)."""
        size = self.info.nsze << self.lba_shift
        return file_extents(self.fd, start, size if end is None else min(end, size))

    def allocated_bytes(self) -> int:
        return sum(n for _, n in self.allocated_extents())

    @property
    def nuse(self) -> int:
        """Blocks allocated, rounded up to whole logical blocks (Identify Namespace NUSE)."""
        mask = self.info.lba_size - 1
        total = 0
        for off, n in self.allocated_extents():
            first = off >> self.lba_shift
            last = (off + n + mask) >> self.lba_shift
            total += last - first
        return total
