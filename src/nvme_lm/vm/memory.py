"""Guest memory: one `mmap` region with guest-physical addresses and a page allocator.

Queues, PRP lists, data buffers and CDQs all live here, so migrating this region plus the
controller state migrates everything a guest can see. CPU writes made through `write()` or
`mark_dirty()` are logged per page (the dirty log a hypervisor reads during pre-copy).
"""

from __future__ import annotations

import bisect
import mmap

import numpy as np

PAGE_SIZE = 4096


class OutOfGuestMemory(MemoryError):
    pass


class GuestMemory:
    def __init__(self, size: int, base: int = 0x10_0000, page_size: int = PAGE_SIZE) -> None:
        if size <= 0 or size % page_size or base % page_size:
            raise ValueError("guest memory size and base must be positive multiples of the page size")
        self.size = size
        self.base = base
        self.page_size = page_size
        self._mmap = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.buf = memoryview(self._mmap)
        self.npages = size // page_size
        self._free: list[tuple[int, int]] = [(0, self.npages)]  # sorted (first page, count)
        self._allocated: dict[int, int] = {}  # first page -> count
        self.dirty = np.zeros(self.npages, dtype=bool)
        self.log_dirty = False

    # --- addresses ----------------------------------------------------------------------------
    @property
    def end(self) -> int:
        return self.base + self.size

    def view(self, addr: int, length: int) -> memoryview:
        off = addr - self.base
        if off < 0 or length < 0 or off + length > self.size:
            raise ValueError(f"guest address range {addr:#x}+{length:#x} is outside guest memory")
        return self.buf[off : off + length]

    def read(self, addr: int, length: int) -> bytes:
        return bytes(self.view(addr, length))

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        self.view(addr, len(data))[:] = data
        self.mark_dirty(addr, len(data))

    def mark_dirty(self, addr: int, length: int) -> None:
        if self.log_dirty and length > 0:
            first = (addr - self.base) // self.page_size
            last = (addr - self.base + length - 1) // self.page_size
            self.dirty[first : last + 1] = True

    def take_dirty(self) -> np.ndarray:
        """Page numbers written since the last call, and clears the log (KVM's get-dirty-log)."""
        pages = np.flatnonzero(self.dirty)
        self.dirty[pages] = False
        return pages

    def copy_from(self, other: GuestMemory) -> None:
        """Takes `other`'s contents and allocations (a stop-and-copy of guest RAM); same size and base."""
        if (other.size, other.base, other.page_size) != (self.size, self.base, self.page_size):
            raise ValueError("guest memory copies need the same size, base and page size")
        self.buf[:] = other.buf
        self._free = list(other._free)
        self._allocated = dict(other._allocated)

    def allocator_state(self) -> dict:
        """The allocator's bookkeeping as plain data (it lives outside the mapped pages, like a guest
        kernel's allocator would live inside them: a migration carries it with the VM state)."""
        return {"free": [list(r) for r in self._free], "allocated": [[p, n] for p, n in self._allocated.items()]}

    def restore_allocator(self, state: dict) -> None:
        self._free = [(int(a), int(b)) for a, b in state["free"]]
        self._allocated = {int(p): int(n) for p, n in state["allocated"]}

    # --- allocator ----------------------------------------------------------------------------
    def alloc(self, nbytes: int) -> int:
        """Allocates whole, physically contiguous pages; returns the guest-physical address."""
        n = max(1, -(-nbytes // self.page_size))
        for i, (start, count) in enumerate(self._free):
            if count >= n:
                if count == n:
                    del self._free[i]
                else:
                    self._free[i] = (start + n, count - n)
                self._allocated[start] = n
                addr = self.base + start * self.page_size
                self.view(addr, n * self.page_size)[:] = bytes(n * self.page_size)
                self.mark_dirty(addr, n * self.page_size)
                return addr
        raise OutOfGuestMemory(f"no {n} contiguous free pages in guest memory")

    def free(self, addr: int) -> None:
        page, rem = divmod(addr - self.base, self.page_size)
        n = self._allocated.pop(page, None) if rem == 0 else None
        if n is None:
            raise ValueError(f"{addr:#x} is not an allocation")
        i = bisect.bisect_left(self._free, (page, 0))
        self._free.insert(i, (page, n))
        # merge with neighbours
        if i + 1 < len(self._free) and page + n == self._free[i + 1][0]:
            self._free[i] = (page, n + self._free[i + 1][1])
            del self._free[i + 1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == page:
            self._free[i - 1] = (self._free[i - 1][0], self._free[i - 1][1] + self._free[i][1])
            del self._free[i]

    @property
    def free_bytes(self) -> int:
        return sum(c for _, c in self._free) * self.page_size

    def close(self) -> None:
        self.buf.release()
        self._mmap.close()
