"""The host's PRP builder against the rules of NVMe Base §4.1 and against the device's own PRP
walker: whatever the host builds, the controller must resolve to exactly the host's buffer."""

from __future__ import annotations

import numpy as np
import pytest

from nvme_lm.device.prp import prp_views
from nvme_lm.host.prp import PrpBuilder
from nvme_lm.pcie.function import PcieFunction, PcieIds
from nvme_lm.vm.memory import GuestMemory

PAGE = 4096
PER_LIST = PAGE // 8


@pytest.fixture
def env():
    mem = GuestMemory(32 << 20)
    fn = PcieFunction(PcieIds(1, 2, 3, 4), msix_vectors=1)
    fn.iommu.map(mem.base, mem.buf)
    fn.enable()
    return mem, fn, PrpBuilder(mem)


def _list_entries(mem: GuestMemory, addr: int, n: int) -> np.ndarray:
    return np.frombuffer(mem.view(addr, n * 8), dtype="<u8")


def _resolved(fn, mem, prp1, prp2, length) -> bytes:
    return b"".join(bytes(v) for v in prp_views(fn, prp1, prp2, length, PAGE, write=False))


def test_within_one_page(env):
    mem, _, b = env
    buf = mem.alloc(PAGE)
    assert b.build(buf, PAGE) == (buf, 0, [])
    assert b.build(buf + 100, 200) == (buf + 100, 0, [])
    assert b.build(buf + PAGE - 4, 4) == (buf + PAGE - 4, 0, [])


def test_two_pages_use_prp2_as_a_pointer(env):
    mem, _, b = env
    buf = mem.alloc(3 * PAGE)
    assert b.build(buf, 2 * PAGE) == (buf, buf + PAGE, [])
    assert b.build(buf + 512, PAGE) == (buf + 512, buf + PAGE, [])  # crosses one boundary
    assert b.build(buf + PAGE - 8, 16) == (buf + PAGE - 8, buf + PAGE, [])


def test_three_pages_need_a_list(env):
    mem, _fn, b = env
    buf = mem.alloc(4 * PAGE)
    prp1, prp2, lists = b.build(buf + 8, 3 * PAGE)
    assert prp1 == buf + 8 and lists == [prp2]
    assert prp2 % PAGE == 0  # list entries start at offset 0 of the list page
    assert list(_list_entries(mem, prp2, 3)) == [buf + PAGE, buf + 2 * PAGE, buf + 3 * PAGE]
    for a in lists:
        mem.free(a)


@pytest.mark.parametrize("npages,list_pages", [
    (PER_LIST, 1),              # exactly fills one list page: no chaining
    (PER_LIST + 1, 2),          # one more: the last slot becomes a chain pointer
    (2 * PER_LIST - 1, 2),
    (2 * PER_LIST, 3),          # 511 + 511 + 2
    (3 * (PER_LIST - 1) + 1, 3),
])
def test_list_chaining(env, npages, list_pages):
    mem, fn, b = env
    length = PAGE + npages * PAGE  # a first page plus `npages` more through the list
    buf = mem.alloc(length)
    mem.view(buf, length)[:] = np.random.default_rng(npages).integers(0, 256, length, dtype=np.uint8).tobytes()
    prp1, prp2, lists = b.build(buf, length)
    assert prp1 == buf and len(lists) == list_pages and prp2 == lists[0]
    # walk by hand: every list page but the last has 511 entries and a pointer to the next
    got: list[int] = []
    for i, lp in enumerate(lists):
        entries = _list_entries(mem, lp, PER_LIST)
        if i < len(lists) - 1:
            assert entries[-1] == lists[i + 1]
            got += list(entries[:-1])
        else:
            got += list(entries[: npages - len(got)])
    assert got == [buf + PAGE * (k + 1) for k in range(npages)]
    # and the device's walker agrees, byte for byte
    assert _resolved(fn, mem, prp1, prp2, length) == bytes(mem.view(buf, length))
    for a in lists:
        mem.free(a)


@pytest.mark.parametrize("offset,length", [(0, 1), (4, 4093), (2048, 8192), (4092, 3 * PAGE + 4), (512, 300_000)])
def test_device_walker_resolves_exactly_the_buffer(env, offset, length):
    mem, fn, b = env
    base = mem.alloc(offset + length)
    buf = base + offset
    mem.view(buf, length)[:] = np.random.default_rng(length).integers(0, 256, length, dtype=np.uint8).tobytes()
    prp1, prp2, lists = b.build(buf, length)
    assert _resolved(fn, mem, prp1, prp2, length) == bytes(mem.view(buf, length))
    for a in lists:
        mem.free(a)


def test_scattered_pages(env):
    mem, fn, b = env
    pages = [mem.alloc(PAGE) for _ in range(8)]
    order = pages[::-2] + pages[::2]  # non-adjacent, out of order
    first = mem.alloc(PAGE)
    data = bytes(range(256)) * (PAGE // 256)
    mem.view(first + 1024, PAGE - 1024)[:] = data[: PAGE - 1024]
    for i, p in enumerate(order):
        mem.view(p, PAGE)[:] = bytes([i]) * PAGE
    prp1, prp2, lists = b.build_pages(first + 1024, PAGE - 1024, order)
    assert prp1 == first + 1024 and len(lists) == 1
    length = PAGE - 1024 + len(order) * PAGE
    want = data[: PAGE - 1024] + b"".join(bytes([i]) * PAGE for i in range(len(order)))
    assert _resolved(fn, mem, prp1, prp2, length) == want
    # one or no extra page needs no list
    assert b.build_pages(first, PAGE, []) == (first, 0, [])
    assert b.build_pages(first, PAGE, [pages[3]]) == (first, pages[3], [])


def test_walker_splits_runs_across_separate_mappings():
    """Two IOVA-adjacent mappings backed by different buffers: one transfer may span both."""
    fn = PcieFunction(PcieIds(1, 2, 3, 4), msix_vectors=1)
    fn.enable()
    a, c = bytearray(b"A" * PAGE), bytearray(b"C" * 2 * PAGE)
    fn.iommu.map(0x10000, a)
    fn.iommu.map(0x11000, c)
    views = prp_views(fn, 0x10000, 0x11000, 2 * PAGE, PAGE, write=False)
    assert b"".join(bytes(v) for v in views) == b"A" * PAGE + b"C" * PAGE
