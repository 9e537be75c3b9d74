"""The IOMMU is the device's only path to host memory: faults outside mappings, on read-only
mappings and on unmapped ranges, never a crash or a stale view."""

from __future__ import annotations

import threading

import pytest

from nvme_lm.pcie.iommu import DmaFault, Iommu

PAGE = 4096


def test_map_view_roundtrip_is_zero_copy():
    io = Iommu()
    buf = bytearray(4 * PAGE)
    io.map(0x10000, buf)
    v = io.view(0x10000 + 100, 8, write=True)
    v[:] = b"abcdefgh"
    assert buf[100:108] == b"abcdefgh"  # the view is the host memory itself
    assert io.read(0x10000 + 100, 8) == b"abcdefgh"
    io.write(0x10000 + 4 * PAGE - 2, b"xy")
    assert buf[-2:] == b"xy"


@pytest.mark.parametrize("iova,size", [
    (0x10000, PAGE),              # same start
    (0x10000 + PAGE, PAGE),       # inside
    (0x10000 - PAGE, 2 * PAGE),   # overlaps the start
    (0x10000 + 3 * PAGE, 4 * PAGE),  # overlaps the end
    (0x8000, 0x20000),            # covers it entirely
])
def test_overlapping_mappings_are_refused(iova, size):
    io = Iommu()
    io.map(0x10000, bytearray(4 * PAGE))
    with pytest.raises(ValueError, match="overlap"):
        io.map(iova, bytearray(size))
    assert [m.iova for m in io.mappings()] == [0x10000]


def test_adjacent_mappings_are_allowed_and_invalid_ones_refused():
    io = Iommu()
    io.map(0x10000, bytearray(PAGE))
    io.map(0x10000 + PAGE, bytearray(PAGE))
    io.map(0x10000 - PAGE, bytearray(PAGE))
    assert [m.iova for m in io.mappings()] == [0xF000, 0x10000, 0x11000]
    with pytest.raises(ValueError):
        io.map(-PAGE, bytearray(PAGE))
    with pytest.raises(ValueError):
        io.map(0x40000, bytearray(0))


@pytest.mark.parametrize("iova,length", [
    (0x0, 8),                       # below every mapping
    (0x10000 - 1, 2),               # straddles the start
    (0x10000 + 2 * PAGE - 4, 8),    # straddles the end
    (0x10000 + 2 * PAGE, 1),        # just past the end
    (0x10000 + 3 * PAGE, 8),        # in the gap between mappings
    (0x10000, -1),                  # a negative length
])
def test_access_outside_mappings_faults(iova, length):
    io = Iommu()
    io.map(0x10000, bytearray(2 * PAGE))
    io.map(0x10000 + 4 * PAGE, bytearray(PAGE))
    io.view(0x10000, 8)  # warm the last-hit cache: it must not widen what is reachable
    with pytest.raises(DmaFault) as e:
        io.view(iova, length)
    assert e.value.iova == iova and not e.value.write
    assert io.faults == 1


def test_cached_mapping_does_not_hide_a_fault():
    io = Iommu()
    io.map(0x10000, bytearray(PAGE))
    assert len(io.view(0x10000, PAGE)) == PAGE
    with pytest.raises(DmaFault):
        io.view(0x10000 + 8, PAGE)  # starts inside the cached mapping, ends past it


def test_read_only_mapping_faults_on_device_writes():
    io = Iommu()
    buf = bytearray(b"\x11" * PAGE)
    io.map(0x20000, buf, writable=False)
    assert io.read(0x20000, 4) == b"\x11" * 4
    with pytest.raises(DmaFault, match="read-only"):
        io.view(0x20000, 4, write=True)
    with pytest.raises(DmaFault):
        io.write(0x20000, b"\x00")
    assert buf[:4] == b"\x11" * 4


def test_a_read_only_buffer_is_never_writable():
    io = Iommu()
    io.map(0x20000, memoryview(bytes(PAGE)))  # writable requested, but the memory is read-only
    with pytest.raises(DmaFault):
        io.view(0x20000, 4, write=True)


def test_unmap_faults_afterwards_and_bumps_generation():
    io = Iommu()
    io.map(0x10000, bytearray(PAGE))
    io.map(0x20000, bytearray(PAGE))
    gen = io.generation
    io.view(0x10000, 8)  # cached
    io.unmap(0x10000)
    assert io.generation == gen + 1
    with pytest.raises(DmaFault):
        io.view(0x10000, 8)
    io.view(0x20000, 8)  # the other mapping is untouched
    with pytest.raises(KeyError):
        io.unmap(0x10000)
    with pytest.raises(KeyError):
        io.unmap(0x20000 + 8)  # not the start of a mapping
    io.map(0x30000, bytearray(PAGE))
    assert io.generation == gen + 1  # adding a mapping invalidates nothing
    io.clear()
    assert io.generation == gen + 2 and io.mappings() == []
    with pytest.raises(DmaFault):
        io.view(0x20000, 8)


def test_on_write_hook_sees_device_writes_only():
    io = Iommu()
    io.map(0x10000, bytearray(PAGE))
    seen: list[tuple[int, int]] = []
    io.on_write = lambda a, n: seen.append((a, n))
    io.view(0x10000, 16)
    io.view(0x10000 + 64, 32, write=True)
    assert seen == [(0x10000 + 64, 32)]


def test_concurrent_map_unmap_never_tears_a_lookup():
    """A device thread translating while the host maps and unmaps sees a mapping or a fault."""
    io = Iommu()
    io.map(0x0, bytearray(PAGE))
    stop = threading.Event()
    errors: list[BaseException] = []

    def device() -> None:
        while not stop.is_set():
            for iova in (0x0, 0x10000, 0x20000):
                try:
                    v = io.view(iova + 8, 8)
                    assert len(v) == 8
                except DmaFault:
                    pass
                except BaseException as e:  # anything else is a torn table
                    errors.append(e)
                    return

    t = threading.Thread(target=device)
    t.start()
    try:
        for _ in range(2000):
            io.map(0x10000, bytearray(PAGE))
            io.map(0x20000, bytearray(PAGE))
            io.unmap(0x10000)
            io.unmap(0x20000)
    finally:
        stop.set()
        t.join()
    assert not errors


def test_writes_are_announced_again_once_they_landed():
    """A tracker drained between the device taking a write view and writing must see the page again."""
    mmu = Iommu()
    mmu.map(0x1000, bytearray(0x4000))
    seen: list[tuple[int, int]] = []
    mmu.on_write = lambda iova, n: seen.append((iova, n))
    view = mmu.view(0x2000, 512, write=True)
    mmu.view(0x3000, 64)  # reads are never announced
    assert seen == [(0x2000, 512)]
    seen.clear()  # the hypervisor drained the log here, then the device wrote
    view[:] = b"x" * 512
    mmu.landed()
    assert seen == [(0x2000, 512)]
    seen.clear()
    mmu.landed()  # announced once per write, not forever
    assert seen == []
