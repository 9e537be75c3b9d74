"""The NVM I/O command set through the real host driver: BAR0 doorbells, PRPs in guest memory, DMA, MSI-X.

Device internals are only looked at to check the state a refusal left behind (nothing written,
no extents allocated) and to count fdatasync calls for the write-cache rules.
"""

from __future__ import annotations

import os
import random

import numpy as np
import pytest

from nvme_lm.device.model import DeviceModel
from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.host import commands as cmd
from nvme_lm.host.driver import NvmeDriver
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.logs import SmartLog
from nvme_lm.spec.opcodes import IoOpcode
from nvme_lm.vm.memory import GuestMemory

PAGE = 4096
MDTS_BYTES = PAGE << DeviceModel().mdts  # 512 KiB with the default model
FID_VWC = 0x06


# ----------------------------------------------------------------------------- fixtures and helpers
@pytest.fixture
def q(driver):
    driver.set_number_of_queues(2, 2)
    return driver.create_io_queue(1, 64)


@pytest.fixture
def ns4k(ssd):
    """A 16 MiB namespace with 4096-byte blocks attached to the primary controller."""
    ns = ssd.subsystem.create_namespace((16 << 20) // 4096, 4096)
    ssd.subsystem.attach(ns.nsid, ssd.primary.cntlid)
    return ns


@pytest.fixture
def syncs(monkeypatch):
    """Records the fds that fdatasync is called on (the emulator's write-cache flush)."""
    seen: list[int] = []
    real = os.fdatasync

    def fake(fd: int) -> None:
        seen.append(fd)
        real(fd)

    monkeypatch.setattr(os, "fdatasync", fake)
    return seen


def run(q, sqe: SQE, *, data: bytes | None = None, read: int = 0):
    """Runs one command with a driver-built buffer; returns (Completion, bytes read)."""
    return q.run(sqe, data=data, read=read, check=False)


def submit_raw(q, sqe: SQE):
    """Submits an SQE whose PRP1/PRP2 the test built by hand."""
    cid = q.qp.submit(sqe)
    return q.qp.wait(cid, 5.0)


def place(mem: GuestMemory, data: bytes, offset: int, *, scatter: bool = True) -> tuple[int, list[int]]:
    """Copies `data` into freshly allocated pages, the first starting at `offset`.

    Returns (PRP1, the following page addresses). With `scatter` the pages are in descending
    address order, so no two neighbours in the transfer are physically adjacent."""
    npages = -(-(offset + len(data)) // PAGE)
    pages = [mem.alloc(PAGE) for _ in range(npages)]
    if scatter:
        pages.reverse()
    first = pages[0] + offset
    n0 = min(len(data), PAGE - offset)
    mem.view(first, n0)[:] = data[:n0]
    pos = n0
    for p in pages[1:]:
        n = min(PAGE, len(data) - pos)
        mem.view(p, n)[:] = data[pos : pos + n]
        pos += n
    return first, pages[1:]


def gather(mem: GuestMemory, first: int, pages: list[int], length: int) -> bytes:
    n0 = min(length, PAGE - first % PAGE)
    out = [mem.read(first, n0)]
    pos = n0
    for p in pages:
        n = min(PAGE, length - pos)
        out.append(mem.read(p, n))
        pos += n
    return b"".join(out)


def prp_list(mem: GuestMemory, pages: list[int], list_offset: int = 0) -> int:
    """Writes `pages` as a PRP list starting `list_offset` bytes into a list page, chaining
    through the last slot of each full list page. Returns the list pointer (PRP2)."""
    addr = mem.alloc(PAGE) + list_offset
    head = addr
    i = 0
    while True:
        slots = (PAGE - addr % PAGE) // 8
        left = len(pages) - i
        view = np.frombuffer(mem.view(addr, slots * 8), dtype="<u8")
        if left <= slots:
            view[:left] = pages[i:]
            return head
        view[: slots - 1] = pages[i : i + slots - 1]
        i += slots - 1
        nxt = mem.alloc(PAGE)
        view[slots - 1] = nxt
        addr = nxt


def prps(mem: GuestMemory, first: int, pages: list[int], list_offset: int = 0) -> tuple[int, int]:
    if not pages:
        return first, 0
    if len(pages) == 1:
        return first, pages[0]
    return first, prp_list(mem, pages, list_offset)


def with_prps(sqe: SQE, prp1: int, prp2: int) -> SQE:
    sqe.prp1, sqe.prp2 = prp1, prp2
    return sqe


def ranges_buf(*ranges: tuple[int, int]) -> bytes:
    """DSM range list from (slba, nlb) pairs; context attributes zero."""
    arr = np.zeros(len(ranges), dtype=[("cattr", "<u4"), ("nlb", "<u4"), ("slba", "<u8")])
    for i, (slba, nlb) in enumerate(ranges):
        arr[i] = (0, nlb, slba)
    return arr.tobytes()


def smart(driver) -> SmartLog:
    return SmartLog.decode(driver.get_log(0x02, 512))


def has_data(ns, lba: int, nlb: int) -> bool:
    start = lba * ns.lba_size
    return any(True for _ in ns.allocated_extents(start, start + nlb * ns.lba_size))


# ----------------------------------------------------------------------------- Read / Write
@pytest.mark.parametrize("fmt", [512, 4096])
@pytest.mark.parametrize("nbytes", [512, PAGE, 2 * PAGE, 3 * PAGE, 17 * PAGE + 512, MDTS_BYTES])
def test_write_read_roundtrip(q, ns1, ns4k, fmt, nbytes):
    ns = ns1 if fmt == 512 else ns4k
    nbytes = max(nbytes - nbytes % fmt, fmt)
    data = os.urandom(nbytes)
    slba = 7
    assert q.write(ns.nsid, slba, data, fmt).ok
    assert q.read(ns.nsid, slba, nbytes // fmt, fmt) == data
    with open(ns.path, "rb") as f:  # the bytes are where the LBA says, in the backing file
        f.seek(slba * fmt)
        assert f.read(nbytes) == data


@pytest.mark.parametrize("offset", [0, 4, 512, PAGE - 512])
@pytest.mark.parametrize("nblocks", [1, 8, 9, 16, 24, 200, MDTS_BYTES // 512])
@pytest.mark.parametrize("scatter", [True, False])
def test_hand_built_prps_with_offset_and_list(mem, q, ns1, offset, nblocks, scatter):
    """PRP1 with an offset, PRP2 as data pointer or PRP list, pages scattered or contiguous."""
    data = os.urandom(nblocks * 512)
    first, pages = place(mem, data, offset, scatter=scatter)
    comp = submit_raw(q, with_prps(cmd.write(ns1.nsid, 100, nblocks), *prps(mem, first, pages)))
    assert comp.ok, comp.st
    assert q.read(ns1.nsid, 100, nblocks, 512) == data
    # and back out through a different scattered buffer
    first2, pages2 = place(mem, bytes(len(data)), (offset + 256) % PAGE, scatter=not scatter)
    comp = submit_raw(q, with_prps(cmd.read(ns1.nsid, 100, nblocks), *prps(mem, first2, pages2)))
    assert comp.ok, comp.st
    assert gather(mem, first2, pages2, len(data)) == data


@pytest.mark.parametrize("list_offset", [PAGE - 2 * 8, PAGE - 3 * 8, 8, 2048])
def test_prp_list_pointer_with_offset_chains_to_next_list_page(mem, q, ns4k, list_offset):
    """A list that starts near the end of its page must chain after a few entries."""
    data = os.urandom(40 * PAGE)
    first, pages = place(mem, data, 1024)
    prp1, prp2 = first, prp_list(mem, pages, list_offset)
    # 40 pages of data starting at 1 KiB into PRP1 -> 40 more page entries
    comp = submit_raw(q, with_prps(cmd.write(ns4k.nsid, 3, 40), prp1, prp2))
    assert comp.ok, comp.st
    assert q.read(ns4k.nsid, 3, 40, 4096) == data[: 40 * PAGE]


def test_deep_queue_of_writes_then_reads(mem, q, ns4k):
    """Many outstanding commands at once, each with its own buffer, complete with correct data."""
    n = 48
    blobs = [os.urandom(PAGE * (1 + i % 5)) for i in range(n)]
    done: list = []
    bufs = []
    for i, blob in enumerate(blobs):
        buf = mem.alloc(len(blob))
        mem.write(buf, blob)
        bufs.append(buf)
        q.submit(cmd.write(ns4k.nsid, i * 8, len(blob) // PAGE), buf, len(blob), done.append, ring=False)
    q.qp.ring()
    while len(done) < n:
        q.qp.wait_any(5.0)
    assert all(c.ok for c in done)
    for i, blob in enumerate(blobs):
        assert q.read(ns4k.nsid, i * 8, len(blob) // PAGE, 4096) == blob
    for b in bufs:
        mem.free(b)


def test_limited_read_ignores_lr_and_prinfo_bits(q, ns1):
    data = os.urandom(1024)
    sqe = cmd.write(ns1.nsid, 0, 2)
    sqe.cdw12 |= 1 << 31  # Limited Retry
    assert run(q, sqe, data=data)[0].ok
    sqe = cmd.read(ns1.nsid, 0, 2)
    sqe.cdw12 |= 1 << 31
    comp, out = run(q, sqe, read=1024)
    assert comp.ok and out == data


def test_unwritten_blocks_read_as_zeroes(q, ns4k):
    assert q.read(ns4k.nsid, 1000, 4, 4096) == bytes(4 * PAGE)


# ----------------------------------------------------------------------------- chained lists beyond one list page
@pytest.fixture
def big(tmp_path):
    """A device whose MDTS (4 MiB) allows transfers needing more than 512 PRP list entries."""
    dev = EmulatedSsd(tmp_path / "big", DeviceModel(mdts=10))
    mem = GuestMemory(32 << 20)
    dev.pf.iommu.map(mem.base, mem.buf)
    drv = NvmeDriver(dev.pf, mem, timeout=10.0)
    drv.start()
    ns = dev.subsystem.create_namespace((64 << 20) // 4096, 4096)
    dev.subsystem.attach(ns.nsid, dev.primary.cntlid)
    drv.set_number_of_queues(1, 1)
    yield dev, mem, drv.create_io_queue(1, 16), ns
    dev.power_off()


def test_chained_prp_list_over_512_entries_by_driver(big):
    _, _, q, ns = big
    data = os.urandom(4 << 20)  # 1024 pages: PRP1 + 1023 list entries over two list pages
    assert q.write(ns.nsid, 10, data, 4096).ok
    assert q.read(ns.nsid, 10, len(data) // 4096, 4096) == data


def test_chained_prp_list_over_512_entries_by_hand(big):
    _, mem, q, ns = big
    nblocks = 700
    data = os.urandom(nblocks * 4096)
    first, pages = place(mem, data, 2048)  # offset PRP1: 701 pages -> 700 list entries
    prp1, prp2 = first, prp_list(mem, pages, list_offset=64)
    comp = submit_raw(q, with_prps(cmd.write(ns.nsid, 0, nblocks), prp1, prp2))
    assert comp.ok, comp.st
    assert q.read(ns.nsid, 0, nblocks, 4096) == data
    rfirst, rpages = place(mem, bytes(len(data)), 512)
    comp = submit_raw(q, with_prps(cmd.read(ns.nsid, 0, nblocks), rfirst, prp_list(mem, rpages, 8)))
    assert comp.ok, comp.st
    assert gather(mem, rfirst, rpages, len(data)) == data


# ----------------------------------------------------------------------------- PRP and DMA errors
def _assert_untouched(q, ns, slba: int, nlb: int) -> None:
    assert not has_data(ns, slba, nlb)
    assert q.read(ns.nsid, slba, nlb, ns.lba_size) == bytes(nlb * ns.lba_size)


def test_prp1_not_dword_aligned(mem, q, ns1):
    page = mem.alloc(PAGE)
    comp = submit_raw(q, with_prps(cmd.write(ns1.nsid, 0, 1), page + 2, 0))
    assert comp.st == st.PRP_OFFSET_INVALID
    _assert_untouched(q, ns1, 0, 1)


def test_prp2_data_pointer_with_offset(mem, q, ns1):
    first, pages = place(mem, os.urandom(2 * PAGE), 0)
    comp = submit_raw(q, with_prps(cmd.write(ns1.nsid, 0, 16), first, pages[0] + 512))
    assert comp.st == st.PRP_OFFSET_INVALID
    _assert_untouched(q, ns1, 0, 16)


def test_prp_list_entry_with_offset(mem, q, ns1):
    first, pages = place(mem, os.urandom(4 * PAGE), 0)
    pages[2] += 0x200
    comp = submit_raw(q, with_prps(cmd.write(ns1.nsid, 0, 32), first, prp_list(mem, pages)))
    assert comp.st == st.PRP_OFFSET_INVALID
    _assert_untouched(q, ns1, 0, 32)


def test_prp_list_pointer_not_qword_aligned(mem, q, ns1):
    first, pages = place(mem, os.urandom(3 * PAGE), 0)
    lst = prp_list(mem, pages, list_offset=8)
    comp = submit_raw(q, with_prps(cmd.write(ns1.nsid, 0, 24), first, lst - 4))
    assert comp.st == st.PRP_OFFSET_INVALID
    _assert_untouched(q, ns1, 0, 24)


def test_chained_list_pointer_with_offset(mem, q, ns4k):
    first, pages = place(mem, os.urandom(6 * PAGE), 0)
    lst = prp_list(mem, pages, list_offset=PAGE - 2 * 8)  # one entry, then the chain pointer
    chain = int(np.frombuffer(mem.view(lst + 8, 8), dtype="<u8")[0])
    mem.view(lst + 8, 8)[:] = (chain + 0x100).to_bytes(8, "little")
    comp = submit_raw(q, with_prps(cmd.write(ns4k.nsid, 0, 6), first, lst))
    assert comp.st == st.PRP_OFFSET_INVALID
    _assert_untouched(q, ns4k, 0, 6)


@pytest.mark.parametrize("where", ["prp1", "prp2", "list-entry", "list-pointer", "chain-pointer"])
def test_dma_outside_mapped_memory_is_data_transfer_error_and_writes_nothing(mem, q, ns4k, where):
    outside = mem.end + 64 * PAGE
    nblocks = 2 if where == "prp2" else 6
    first, pages = place(mem, os.urandom(nblocks * PAGE), 0)
    if where == "prp1":
        first = outside
    if where in ("prp2", "list-pointer"):
        prp1, prp2 = first, outside
    else:
        if where == "list-entry":
            pages[-1] = outside
        lst = prp_list(mem, pages, list_offset=PAGE - 3 * 8 if where == "chain-pointer" else 0)
        if where == "chain-pointer":
            mem.view(lst + 16, 8)[:] = outside.to_bytes(8, "little")
        prp1, prp2 = first, lst
    comp = submit_raw(q, with_prps(cmd.write(ns4k.nsid, 0, nblocks), prp1, prp2))
    assert comp.st == st.DATA_TRANSFER_ERROR
    _assert_untouched(q, ns4k, 0, nblocks)


def test_read_into_unmapped_memory_is_data_transfer_error(mem, q, ns1):
    assert q.write(ns1.nsid, 0, os.urandom(PAGE), 512).ok
    comp = submit_raw(q, with_prps(cmd.read(ns1.nsid, 0, 8), mem.base - PAGE, 0))
    assert comp.st == st.DATA_TRANSFER_ERROR
    assert q.read(ns1.nsid, 0, 8, 512)  # the queue keeps working


def test_transfer_across_adjacent_iommu_mappings(tmp_path):
    """Two mappings adjacent in IOVA space: a transfer straddling them is legal DMA."""
    dev = EmulatedSsd(tmp_path / "adj")
    try:
        low = GuestMemory(4 << 20)
        high = GuestMemory(1 << 20, base=low.end)
        dev.pf.iommu.map(low.base, low.buf)
        dev.pf.iommu.map(high.base, high.buf)
        drv = NvmeDriver(dev.pf, low)
        drv.start()
        ns = dev.subsystem.create_namespace(4096, 4096)
        dev.subsystem.attach(ns.nsid, dev.primary.cntlid)
        drv.set_number_of_queues(1, 1)
        q = drv.create_io_queue(1, 8)
        data = os.urandom(3 * PAGE)
        first = low.end - PAGE  # last page of the low mapping, then two pages of the high one
        low.view(first, PAGE)[:] = data[:PAGE]
        high.view(high.base, 2 * PAGE)[:] = data[PAGE:]
        lst = low.alloc(PAGE)
        low.view(lst, 16)[:] = np.array([high.base, high.base + PAGE], dtype="<u8").tobytes()
        comp = submit_raw(q, with_prps(cmd.write(ns.nsid, 5, 3), first, lst))
        assert comp.ok, comp.st
        assert q.read(ns.nsid, 5, 3, 4096) == data
    finally:
        dev.power_off()


def test_sgl_descriptors_are_refused(q, ns1):
    sqe = cmd.write(ns1.nsid, 0, 1)
    sqe.flags |= 1 << 6  # PSDT 01b: SGL
    comp, _ = run(q, sqe, data=os.urandom(512))
    assert comp.st == st.INVALID_FIELD
    _assert_untouched(q, ns1, 0, 1)


# ----------------------------------------------------------------------------- MDTS and LBA range
@pytest.mark.parametrize("builder", [cmd.read, cmd.write, cmd.compare])
def test_mdts_exceeded_is_invalid_field(q, ns1, builder):
    nlb = MDTS_BYTES // 512 + 1
    data = os.urandom(nlb * 512) if builder is not cmd.read else None
    comp, _ = run(q, builder(ns1.nsid, 0, nlb), data=data, read=0 if data else nlb * 512)
    assert comp.st == st.INVALID_FIELD
    if builder is cmd.write:
        _assert_untouched(q, ns1, 0, 64)


def test_exactly_mdts_is_accepted(q, ns4k):
    data = os.urandom(MDTS_BYTES)
    assert q.write(ns4k.nsid, 0, data, 4096).ok
    comp, _ = run(q, cmd.compare(ns4k.nsid, 0, MDTS_BYTES // 4096), data=data)
    assert comp.ok


def test_commands_without_data_are_not_limited_by_mdts(q, ns1):
    # 65536 blocks (32 MiB) is far beyond MDTS, but Write Zeroes and Verify move no data
    assert run(q, cmd.write_zeroes(ns1.nsid, 0, 65536))[0].ok
    assert run(q, cmd.verify(ns1.nsid, 0, 65536))[0].ok


@pytest.mark.parametrize("builder", [cmd.read, cmd.write, cmd.compare, cmd.verify, cmd.write_zeroes])
@pytest.mark.parametrize("where", ["straddles-end", "past-end", "huge"])
def test_lba_out_of_range(q, ns4k, builder, where):
    slba, nlb = {"straddles-end": (ns4k.nsze - 1, 2), "past-end": (ns4k.nsze, 1),
                 "huge": ((1 << 64) - 1, 1)}[where]
    has_data_out = builder in (cmd.write, cmd.compare)
    data = os.urandom(nlb * 4096) if has_data_out else None
    read = nlb * 4096 if builder is cmd.read else 0
    comp, _ = run(q, builder(ns4k.nsid, slba, nlb), data=data, read=read)
    assert comp.st == st.LBA_OUT_OF_RANGE
    assert ns4k.allocated_bytes() == 0


@pytest.mark.parametrize("builder", [cmd.read, cmd.write, cmd.compare, cmd.verify, cmd.write_zeroes])
def test_last_block_is_in_range(q, ns4k, builder):
    data = bytes(4096) if builder in (cmd.write, cmd.compare) else None
    comp, _ = run(q, builder(ns4k.nsid, ns4k.nsze - 1, 1), data=data, read=4096 if builder is cmd.read else 0)
    assert comp.ok, comp.st


# ----------------------------------------------------------------------------- namespaces and opcodes
def _every_command(nsid: int) -> list[tuple[SQE, bytes | None, int]]:
    return [
        (cmd.read(nsid, 0, 1), None, 512),
        (cmd.write(nsid, 0, 1), os.urandom(512), 0),
        (cmd.compare(nsid, 0, 1), bytes(512), 0),
        (cmd.verify(nsid, 0, 1), None, 0),
        (cmd.write_zeroes(nsid, 0, 1), None, 0),
        (cmd.write_zeroes(nsid, 0, 1, deallocate=True), None, 0),
        (cmd.dataset_management(nsid, 1), ranges_buf((0, 1)), 0),
        (cmd.flush(nsid), None, 0),
    ]


@pytest.mark.parametrize("which", ["zero", "detached", "unknown", "broadcast"])
def test_invalid_namespace(ssd, q, ns1, which):
    detached = ssd.subsystem.create_namespace(1024, 512)
    nsid = {"zero": 0, "detached": detached.nsid, "unknown": 200, "broadcast": 0xFFFFFFFF}[which]
    for sqe, data, read in _every_command(nsid):
        if which == "broadcast" and sqe.opcode == IoOpcode.FLUSH:
            continue  # Flush is the one I/O command that accepts FFFFFFFFh
        comp, _ = run(q, sqe, data=data, read=read)
        assert comp.st == st.INVALID_NAMESPACE, (IoOpcode(sqe.opcode).name, comp.st)
    assert detached.allocated_bytes() == 0


def test_detach_stops_io_and_reattach_restores_it(ssd, q, ns1):
    data = os.urandom(512)
    assert q.write(ns1.nsid, 3, data, 512).ok
    ssd.subsystem.detach(ns1.nsid, ssd.primary.cntlid)
    assert run(q, cmd.read(ns1.nsid, 3, 1), read=512)[0].st == st.INVALID_NAMESPACE
    ssd.subsystem.attach(ns1.nsid, ssd.primary.cntlid)
    assert q.read(ns1.nsid, 3, 1, 512) == data


@pytest.mark.parametrize("opcode", [IoOpcode.WRITE_UNCORRECTABLE, IoOpcode.RESERVATION_REGISTER,
                                    IoOpcode.RESERVATION_REPORT, IoOpcode.CANCEL, IoOpcode.COPY, 0x7F, 0xC0])
def test_unsupported_opcodes_are_invalid_opcode(q, ns1, opcode):
    comp, _ = run(q, SQE(opcode=opcode, nsid=ns1.nsid, cdw12=0))
    assert comp.st == st.INVALID_OPCODE


# ----------------------------------------------------------------------------- Flush and the write cache
def test_flush_one_namespace(q, ns1, ns4k, syncs):
    assert q.write(ns1.nsid, 0, os.urandom(512), 512).ok
    assert syncs == []  # the write stays in the volatile cache
    assert run(q, cmd.flush(ns1.nsid))[0].ok
    assert syncs == [ns1.fd]
    assert not ns1.dirty


def test_flush_broadcast_flushes_every_attached_namespace(ssd, q, ns1, ns4k, syncs):
    detached = ssd.subsystem.create_namespace(1024, 512)
    assert run(q, cmd.flush(0xFFFFFFFF))[0].ok
    assert sorted(syncs) == sorted([ns1.fd, ns4k.fd])
    assert detached.fd not in syncs


def test_fua_write_is_durable_at_completion(q, ns1, syncs):
    assert q.write(ns1.nsid, 0, os.urandom(512), 512, fua=True).ok
    assert syncs == [ns1.fd]
    assert not ns1.dirty


def test_fua_read_commits_cached_writes_first(q, ns1, syncs):
    data = os.urandom(512)
    assert q.write(ns1.nsid, 0, data, 512).ok
    comp, out = run(q, cmd.read(ns1.nsid, 0, 1, fua=True), read=512)
    assert comp.ok and out == data
    assert syncs == [ns1.fd]
    comp, _ = run(q, cmd.read(ns1.nsid, 0, 1, fua=True), read=512)
    assert syncs == [ns1.fd]  # nothing dirty: no second sync


def test_write_cache_disabled_makes_every_modification_durable(driver, q, ns1, syncs):
    driver.set_features(FID_VWC, 0)
    assert driver.get_features(FID_VWC) == 0
    assert q.write(ns1.nsid, 0, os.urandom(4096), 512).ok
    assert syncs == [ns1.fd]
    assert run(q, cmd.write_zeroes(ns1.nsid, 0, 1))[0].ok
    assert run(q, cmd.write_zeroes(ns1.nsid, 1, 1, deallocate=True))[0].ok
    assert run(q, cmd.dataset_management(ns1.nsid, 1), data=ranges_buf((2, 1)))[0].ok
    assert syncs == [ns1.fd] * 4
    driver.set_features(FID_VWC, 1)
    assert q.write(ns1.nsid, 0, os.urandom(4096), 512).ok
    assert syncs == [ns1.fd] * 4


# ----------------------------------------------------------------------------- Write Zeroes
def test_write_zeroes_keeps_blocks_allocated(q, ns4k):
    data = os.urandom(8 * PAGE)
    assert q.write(ns4k.nsid, 0, data, 4096).ok
    ns4k.flush()
    blocks = os.fstat(ns4k.fd).st_blocks
    assert run(q, cmd.write_zeroes(ns4k.nsid, 2, 3))[0].ok
    assert q.read(ns4k.nsid, 0, 8, 4096) == data[: 2 * PAGE] + bytes(3 * PAGE) + data[5 * PAGE :]
    assert os.fstat(ns4k.fd).st_blocks == blocks  # zeroed in place, nothing given back


def test_write_zeroes_with_deac_punches_a_hole(q, ns4k):
    data = os.urandom(8 * PAGE)
    assert q.write(ns4k.nsid, 0, data, 4096).ok
    blocks = os.fstat(ns4k.fd).st_blocks
    assert run(q, cmd.write_zeroes(ns4k.nsid, 2, 3, deallocate=True))[0].ok
    assert q.read(ns4k.nsid, 0, 8, 4096) == data[: 2 * PAGE] + bytes(3 * PAGE) + data[5 * PAGE :]
    assert os.fstat(ns4k.fd).st_blocks == blocks - 3 * PAGE // 512
    assert os.lseek(ns4k.fd, 2 * PAGE, os.SEEK_DATA) == 5 * PAGE
    assert list(ns4k.allocated_extents()) == [(0, 2 * PAGE), (5 * PAGE, 3 * PAGE)]


def test_write_zeroes_on_part_of_a_filesystem_block(q, ns1):
    """512-byte LBAs share 4 KiB file blocks: neighbours keep their data either way."""
    data = os.urandom(16 * 512)
    assert q.write(ns1.nsid, 0, data, 512).ok
    assert run(q, cmd.write_zeroes(ns1.nsid, 3, 2, deallocate=True))[0].ok
    assert run(q, cmd.write_zeroes(ns1.nsid, 10, 1))[0].ok
    expect = bytearray(data)
    expect[3 * 512 : 5 * 512] = bytes(1024)
    expect[10 * 512 : 11 * 512] = bytes(512)
    assert q.read(ns1.nsid, 0, 16, 512) == bytes(expect)


def test_write_zeroes_transfers_no_data(mem, q, ns4k):
    assert q.write(ns4k.nsid, 0, os.urandom(PAGE), 4096).ok
    sqe = with_prps(cmd.write_zeroes(ns4k.nsid, 0, 1), mem.end + PAGE, mem.end + 2 * PAGE)  # never touched
    assert submit_raw(q, sqe).ok
    assert q.read(ns4k.nsid, 0, 1, 4096) == bytes(PAGE)


# ----------------------------------------------------------------------------- Dataset Management
def test_dsm_deallocate_reads_back_zero_and_leaves_holes(q, ns4k):
    data = os.urandom(32 * PAGE)
    assert q.write(ns4k.nsid, 0, data, 4096).ok
    ranges = ranges_buf((4, 4), (20, 2), (0, 0), (ns4k.nsze + 5, 0), (8, 2))  # zero-length ranges are skipped
    comp, _ = run(q, cmd.dataset_management(ns4k.nsid, 5), data=ranges)
    assert comp.ok, comp.st
    expect = bytearray(data)
    for s, n in ((4, 6), (20, 2)):
        expect[s * PAGE : (s + n) * PAGE] = bytes(n * PAGE)
    assert q.read(ns4k.nsid, 0, 32, 4096) == bytes(expect)
    assert list(ns4k.allocated_extents()) == [(0, 4 * PAGE), (10 * PAGE, 10 * PAGE), (22 * PAGE, 10 * PAGE)]
    assert os.lseek(ns4k.fd, 4 * PAGE, os.SEEK_DATA) == 10 * PAGE


def test_dsm_overlapping_ranges(q, ns4k):
    data = os.urandom(16 * PAGE)
    assert q.write(ns4k.nsid, 0, data, 4096).ok
    comp, _ = run(q, cmd.dataset_management(ns4k.nsid, 3), data=ranges_buf((6, 4), (2, 6), (3, 1)))
    assert comp.ok
    assert q.read(ns4k.nsid, 0, 16, 4096) == data[: 2 * PAGE] + bytes(8 * PAGE) + data[10 * PAGE :]


@pytest.mark.parametrize("bad", [(10**6, 1), (4095, 2), ((1 << 64) - 1, 2), (4096, 1)])
def test_dsm_bad_range_fails_whole_command_and_changes_nothing(q, ns4k, bad):
    assert ns4k.nsze == 4096
    data = os.urandom(16 * PAGE)
    assert q.write(ns4k.nsid, 0, data, 4096).ok
    extents = list(ns4k.allocated_extents())
    comp, _ = run(q, cmd.dataset_management(ns4k.nsid, 3), data=ranges_buf((0, 4), bad, (8, 4)))
    assert comp.st == st.LBA_OUT_OF_RANGE
    assert q.read(ns4k.nsid, 0, 16, 4096) == data
    assert list(ns4k.allocated_extents()) == extents


def test_dsm_without_deallocate_is_a_hint(q, ns4k):
    data = os.urandom(4 * PAGE)
    assert q.write(ns4k.nsid, 0, data, 4096).ok
    sqe = cmd.dataset_management(ns4k.nsid, 1, deallocate=False)
    sqe.cdw11 |= 0x3  # IDR, IDW
    assert run(q, sqe, data=ranges_buf((0, 4)))[0].ok
    assert q.read(ns4k.nsid, 0, 4, 4096) == data
    assert run(q, sqe, data=ranges_buf((ns4k.nsze, 1)))[0].st == st.LBA_OUT_OF_RANGE


def test_dsm_256_ranges(q, ns1):
    data = os.urandom(1024 * 512)
    for i in range(0, 1024, 512):
        assert q.write(ns1.nsid, i, data[i * 512 : (i + 512) * 512], 512).ok
    ranges = [(i * 4, 1) for i in range(256)]  # every fourth block
    comp, _ = run(q, cmd.dataset_management(ns1.nsid, 256), data=ranges_buf(*ranges))
    assert comp.ok, comp.st
    got = q.read(ns1.nsid, 0, 1024, 512)
    expect = bytearray(data)
    for s, _ in ranges:
        expect[s * 512 : (s + 1) * 512] = bytes(512)
    assert got == bytes(expect)


def test_dsm_range_list_outside_memory(mem, q, ns4k):
    assert q.write(ns4k.nsid, 0, os.urandom(PAGE), 4096).ok
    comp = submit_raw(q, with_prps(cmd.dataset_management(ns4k.nsid, 1), mem.end + PAGE, 0))
    assert comp.st == st.DATA_TRANSFER_ERROR
    assert has_data(ns4k, 0, 1)


# ----------------------------------------------------------------------------- Compare and Verify
def test_compare_success_and_failure(mem, q, ns1):
    data = os.urandom(40 * 512)
    assert q.write(ns1.nsid, 50, data, 512).ok
    first, pages = place(mem, data, 1536)  # offset PRP1 and a scattered list
    assert submit_raw(q, with_prps(cmd.compare(ns1.nsid, 50, 40), *prps(mem, first, pages))).ok
    for flip in (0, 5000, len(data) - 1):
        wrong = bytearray(data)
        wrong[flip] ^= 0x01
        comp, _ = run(q, cmd.compare(ns1.nsid, 50, 40), data=bytes(wrong))
        assert comp.st == st.COMPARE_FAILURE
        assert (comp.st.sct, comp.st.sc) == (2, 0x85)
    assert q.read(ns1.nsid, 50, 40, 512) == data  # compare never writes


def test_compare_against_unwritten_blocks(q, ns4k):
    assert run(q, cmd.compare(ns4k.nsid, 9, 2), data=bytes(2 * PAGE))[0].ok
    assert run(q, cmd.compare(ns4k.nsid, 9, 2), data=b"\x01" + bytes(2 * PAGE - 1))[0].st == st.COMPARE_FAILURE


def test_compare_dma_fault(mem, q, ns1):
    comp = submit_raw(q, with_prps(cmd.compare(ns1.nsid, 0, 1), mem.end, 0))
    assert comp.st == st.DATA_TRANSFER_ERROR


def test_verify(mem, q, ns4k):
    assert q.write(ns4k.nsid, 0, os.urandom(8 * PAGE), 4096).ok
    sqe = with_prps(cmd.verify(ns4k.nsid, 0, 600), mem.end + PAGE, 0)  # no data pointer is used
    assert submit_raw(q, sqe).ok
    assert run(q, cmd.verify(ns4k.nsid, ns4k.nsze - 600, 600))[0].ok


# ----------------------------------------------------------------------------- SMART counters
def test_smart_counts_reads_compares_writes_and_verify_data(driver, q, ns4k):
    before = smart(driver)
    data = os.urandom(250 * PAGE)  # 2000 units of 512 bytes
    assert q.write(ns4k.nsid, 0, data[: 125 * PAGE], 4096).ok
    assert q.write(ns4k.nsid, 125, data[125 * PAGE :], 4096).ok
    mid = smart(driver)
    assert mid.host_write_commands - before.host_write_commands == 2
    assert mid.data_units_written - before.data_units_written in (2, 3)
    assert mid.host_read_commands == before.host_read_commands

    q.read(ns4k.nsid, 0, 125, 4096)
    assert run(q, cmd.compare(ns4k.nsid, 125, 125), data=data[125 * PAGE :])[0].ok
    after_reads = smart(driver)
    assert after_reads.host_read_commands - mid.host_read_commands == 2  # Read + Compare
    assert after_reads.data_units_read - mid.data_units_read in (2, 3)

    assert run(q, cmd.verify(ns4k.nsid, 0, 250))[0].ok
    assert run(q, cmd.write_zeroes(ns4k.nsid, 0, 250))[0].ok
    assert run(q, cmd.dataset_management(ns4k.nsid, 1), data=ranges_buf((0, 250)))[0].ok
    assert run(q, cmd.flush(ns4k.nsid))[0].ok
    end = smart(driver)
    assert end.host_read_commands == after_reads.host_read_commands  # Verify is not a host read command
    assert end.data_units_read - after_reads.data_units_read in (2, 3)  # but its blocks are data units read
    assert end.host_write_commands == mid.host_write_commands
    assert end.data_units_written == mid.data_units_written  # Write Zeroes and DSM are not data written


def test_failed_commands_do_not_count(driver, q, ns4k):
    before = smart(driver)
    run(q, cmd.read(ns4k.nsid, ns4k.nsze, 1), read=4096)
    run(q, cmd.write(ns4k.nsid, ns4k.nsze, 1), data=bytes(4096))
    after = smart(driver)
    assert (after.host_read_commands, after.host_write_commands) == (before.host_read_commands,
                                                                      before.host_write_commands)


# ----------------------------------------------------------------------------- persistence
def _bring_up(dev: EmulatedSsd) -> tuple[GuestMemory, NvmeDriver, object]:
    mem = GuestMemory(8 << 20)
    dev.pf.iommu.map(mem.base, mem.buf)
    drv = NvmeDriver(dev.pf, mem, timeout=5.0)
    drv.start()
    drv.set_number_of_queues(1, 1)
    return mem, drv, drv.create_io_queue(1, 32)


@pytest.mark.parametrize("shutdown", [True, False])
def test_data_survives_device_restart(tmp_path, shutdown):
    root = tmp_path / "dev"
    dev = EmulatedSsd(root)
    a = dev.subsystem.create_namespace(8192, 512)
    b = dev.subsystem.create_namespace(2048, 4096)
    for ns in (a, b):
        dev.subsystem.attach(ns.nsid, dev.primary.cntlid)
    _, drv, q = _bring_up(dev)
    rng = random.Random(7)
    written: dict[tuple[int, int], bytes] = {}
    for ns in (a, b):
        for _ in range(12):
            nlb = rng.randint(1, 16)
            slba = rng.randrange(0, ns.nsze - nlb)
            data = os.urandom(nlb * ns.lba_size)
            assert q.write(ns.nsid, slba, data, ns.lba_size).ok
            for i in range(nlb):
                written[(ns.nsid, slba + i)] = data[i * ns.lba_size : (i + 1) * ns.lba_size]
    # deallocate a range in each, which must stay deallocated
    for ns in (a, b):
        assert q.write(ns.nsid, 100, os.urandom(8 * ns.lba_size), ns.lba_size).ok
        assert run(q, cmd.write_zeroes(ns.nsid, 100, 8, deallocate=True))[0].ok
        for i in range(8):
            written[(ns.nsid, 100 + i)] = bytes(ns.lba_size)
    if shutdown:
        drv.shutdown()
    dev.power_off()

    dev2 = EmulatedSsd(root)
    try:
        assert sorted(dev2.subsystem.namespaces) == [a.nsid, b.nsid]
        _, _, q2 = _bring_up(dev2)
        for ns in (a, b):
            ns2 = dev2.subsystem.namespaces[ns.nsid]
            assert (ns2.nsze, ns2.lba_size, ns2.info.nguid) == (ns.nsze, ns.lba_size, ns.info.nguid)
            per = MDTS_BYTES // ns.lba_size
            whole = b"".join(q2.read(ns.nsid, s, per, ns.lba_size) for s in range(0, ns.nsze, per))
            for (nsid, lba), blk in written.items():
                if nsid == ns.nsid:
                    assert whole[lba * ns.lba_size : (lba + 1) * ns.lba_size] == blk, (nsid, lba)
            if ns.lba_size == 4096:
                assert not has_data(ns2, 100, 8)
    finally:
        dev2.power_off()
