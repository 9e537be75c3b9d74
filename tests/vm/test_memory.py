"""Guest memory: a page allocator that hands out physically contiguous, zeroed runs, merges
what is freed, fails cleanly when full, and logs CPU writes per page for pre-copy."""

from __future__ import annotations

import numpy as np
import pytest

from nvme_lm.vm.memory import GuestMemory, OutOfGuestMemory

PAGE = 4096


@pytest.fixture
def mem():
    m = GuestMemory(64 * PAGE)
    yield m
    m.close()


def test_construction_rules():
    with pytest.raises(ValueError):
        GuestMemory(PAGE + 1)
    with pytest.raises(ValueError):
        GuestMemory(PAGE, base=123)
    with pytest.raises(ValueError):
        GuestMemory(0)
    m = GuestMemory(4 * PAGE, base=0x7000_0000)
    assert m.base == 0x7000_0000 and m.end == 0x7000_0000 + 4 * PAGE
    m.close()


def test_alloc_is_page_aligned_contiguous_and_zeroed(mem):
    a = mem.alloc(3 * PAGE - 7)
    assert (a - mem.base) % PAGE == 0
    mem.view(a, 3 * PAGE)[:] = b"\xFF" * 3 * PAGE  # the whole run is usable
    mem.free(a)
    b = mem.alloc(3 * PAGE)
    assert b == a  # first fit reuses it
    assert bytes(mem.view(b, 3 * PAGE)) == bytes(3 * PAGE)  # and it comes back zeroed


def test_alloc_sizes_round_up_to_pages(mem):
    before = mem.free_bytes
    a = mem.alloc(0)
    b = mem.alloc(1)
    c = mem.alloc(PAGE + 1)
    assert mem.free_bytes == before - 4 * PAGE
    assert b == a + PAGE and c == b + PAGE
    for x in (a, b, c):
        mem.free(x)
    assert mem.free_bytes == before


def test_free_merges_neighbours(mem):
    a, b, c, d = (mem.alloc(4 * PAGE) for _ in range(4))
    rest = mem.alloc(mem.free_bytes)  # everything else
    with pytest.raises(OutOfGuestMemory):
        mem.alloc(1)
    mem.free(b)
    mem.free(d)
    with pytest.raises(OutOfGuestMemory):
        mem.alloc(8 * PAGE)  # 8 pages free, but not contiguous
    mem.free(c)  # merges b + c + d
    assert mem.alloc(12 * PAGE) == b
    mem.free(b)
    mem.free(a)  # merges with the run after it
    assert mem.alloc(16 * PAGE) == a
    mem.free(a)
    mem.free(rest)
    assert mem.free_bytes == 64 * PAGE
    assert mem.alloc(64 * PAGE) == mem.base  # fully merged back into one run


def test_exhaustion_is_an_error_not_a_crash(mem):
    held = [mem.alloc(PAGE) for _ in range(64)]
    with pytest.raises(OutOfGuestMemory):
        mem.alloc(PAGE)
    with pytest.raises(MemoryError):  # OutOfGuestMemory is a MemoryError
        mem.alloc(1)
    mem.free(held[10])
    assert mem.alloc(PAGE) == held[10]
    with pytest.raises(OutOfGuestMemory):
        GuestMemory(4 * PAGE).alloc(5 * PAGE)


def test_bad_frees(mem):
    a = mem.alloc(2 * PAGE)
    with pytest.raises(ValueError):
        mem.free(a + PAGE)  # inside the allocation, not its start
    with pytest.raises(ValueError):
        mem.free(a + 8)  # not page aligned
    with pytest.raises(ValueError):
        mem.free(mem.base + 40 * PAGE)  # never allocated
    mem.free(a)
    with pytest.raises(ValueError):
        mem.free(a)  # double free
    assert mem.free_bytes == 64 * PAGE


def test_view_bounds(mem):
    assert len(mem.view(mem.base, 64 * PAGE)) == 64 * PAGE
    for addr, n in [(mem.base - 1, 2), (mem.end - 4, 8), (mem.end, 1), (mem.base, -1)]:
        with pytest.raises(ValueError):
            mem.view(addr, n)


def test_read_write(mem):
    a = mem.alloc(PAGE)
    mem.write(a + 10, b"hello")
    assert mem.read(a + 10, 5) == b"hello"


def test_dirty_log(mem):
    a = mem.alloc(8 * PAGE)
    first = (a - mem.base) // PAGE
    mem.write(a, b"x")  # not logging yet
    assert len(mem.take_dirty()) == 0
    mem.log_dirty = True
    mem.write(a + PAGE - 1, b"xy")  # straddles pages 0 and 1 of the run
    mem.write(a + 5 * PAGE, b"z" * (PAGE + 1))  # pages 5 and 6
    mem.mark_dirty(a + 3 * PAGE, 0)  # nothing
    got = mem.take_dirty()
    assert list(got) == [first, first + 1, first + 5, first + 6]
    assert len(mem.take_dirty()) == 0  # taking clears the log
    mem.mark_dirty(a + 7 * PAGE, PAGE)
    assert list(mem.take_dirty()) == [first + 7]
    mem.log_dirty = False
    mem.write(a, b"q")
    assert len(mem.take_dirty()) == 0


def test_device_writes_are_not_in_the_cpu_dirty_log(mem):
    """DMA goes straight to the mapped buffer; only CPU writes through the guest are logged."""
    a = mem.alloc(PAGE)
    mem.log_dirty = True
    mem.buf[a - mem.base : a - mem.base + 4] = b"dma!"
    assert mem.read(a, 4) == b"dma!"
    assert len(mem.take_dirty()) == 0
    assert isinstance(mem.dirty, np.ndarray) and mem.dirty.dtype == bool


def test_allocation_zeroing_is_a_cpu_write(mem):
    """alloc() clears the pages with the CPU, so a pre-copy must resend them."""
    mem.log_dirty = True
    a = mem.alloc(2 * PAGE)
    first = (a - mem.base) // PAGE
    assert mem.take_dirty().tolist() == [first, first + 1]
