"""TP4165: the allocation map kept by the I/O path and Get LBA Status (86h) on the primary controller.

Everything goes through host drivers; device files are looked at only to check what a restart finds.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from nvme_lm.device.admin.lba_status import allocated_descriptors
from nvme_lm.device.allocation import SIDECAR_SUFFIX, AllocationMap, granularity
from nvme_lm.device.model import DeviceModel
from nvme_lm.device.nvm_io import DSM_RANGE
from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.host import commands as cmd
from nvme_lm.host import virtualization as hv
from nvme_lm.host.driver import IoQueue, NvmeDriver
from nvme_lm.host.lba_status import allocated_ranges, get_lba_status
from nvme_lm.spec import status as st
from nvme_lm.spec.identify import CNS, OACS, IdentifyController, NvmIdentifyController, NvmIdentifyNamespace
from nvme_lm.spec.lba_status import (
    DESCRIPTOR_SIZE,
    HEADER_SIZE,
    LBARS_ALLOCATED,
    Atype,
    Cmpc,
    GetLbaStatus,
    LbaStatusDescriptor,
    LbaStatusHeader,
    decode_lba_status,
    encode_lba_status,
)
from nvme_lm.vm.memory import GuestMemory

NS_BLOCKS = 64 << 11  # 64 MiB of 512-byte blocks


def buf_for(n: int) -> int:
    """Buffer bytes that hold exactly `n` descriptors."""
    return HEADER_SIZE + n * DESCRIPTOR_SIZE


@pytest.fixture
def q(driver: NvmeDriver) -> IoQueue:
    driver.set_number_of_queues(1, 1)
    return driver.create_io_queue(1, 32)


def write(q: IoQueue, ns, slba: int, nlb: int) -> None:
    assert q.write(ns.nsid, slba, os.urandom(nlb * ns.lba_size), ns.lba_size).ok


def write_zeroes(q: IoQueue, ns, slba: int, nlb: int, *, deallocate: bool) -> None:
    assert q.run(cmd.write_zeroes(ns.nsid, slba, nlb, deallocate=deallocate))[0].ok


def dsm(q: IoQueue, ns, *ranges: tuple[int, int]) -> None:
    r = np.zeros(len(ranges), dtype=DSM_RANGE)
    r["slba"] = [s for s, _ in ranges]
    r["nlb"] = [n for _, n in ranges]
    assert q.run(cmd.dataset_management(ns.nsid, len(ranges)), data=r.tobytes())[0].ok


def lba_status(driver: NvmeDriver, nsid: int, slba: int = 0, *, mndw: int = 1023, rl: int = 0,
               atype: int = Atype.ALLOCATED):
    """(Completion, data) of one raw Get LBA Status, never raising on an error status."""
    return driver.admin(cmd.get_lba_status(nsid, slba, mndw, rl, atype), read=(mndw + 1) * 4, check=False)


# ----------------------------------------------------------------------------- wire format
def test_descriptor_list_layout_matches_the_spec():
    data = encode_lba_status(np.array([5, 1 << 40]), np.array([8, 1 << 32]), LBARS_ALLOCATED, Cmpc.INCOMPLETE)
    assert len(data) == 8 + 2 * 16
    assert data[:8] == LbaStatusHeader(nlsd=2, cmpc=1).encode() == bytes([2, 0, 0, 0, 1, 0, 0, 0])
    d0 = LbaStatusDescriptor.decode(data, 8)
    assert (d0.dslba, d0.nlb, d0.count, d0.lbars) == (5, 7, 8, 0b010)  # NLB is 0's based
    assert data[8:24] == (5).to_bytes(8, "little") + (7).to_bytes(4, "little") + bytes([0, 2, 0, 0])
    assert LbaStatusDescriptor.decode(data, 24).count == 1 << 32
    header, desc = decode_lba_status(data)
    assert header.nlsd == 2 and list(desc["dslba"]) == [5, 1 << 40]
    with pytest.raises(ValueError):
        decode_lba_status(data[:30])  # NLSD says more than the buffer holds


def test_command_dwords():
    c = GetLbaStatus(slba=(7 << 32) | 9, mndw=255, rl=1000, atype=Atype.ALLOCATED)
    assert c.dwords() == (9, 7, 255, 1000 | 2 << 24)
    sqe = cmd.get_lba_status(1, (7 << 32) | 9, 255, 1000, 2)
    back = GetLbaStatus.decode(sqe.cdw10, sqe.cdw11, sqe.cdw12, sqe.cdw13)
    assert (back.slba, back.mndw, back.rl, back.atype, back.buffer_bytes) == ((7 << 32) | 9, 255, 1000, 2, 1024)


def test_granularity_choice():
    assert granularity(NS_BLOCKS, 512) == 8  # 4 KiB units
    assert granularity(1 << 20, 4096) == 1
    assert granularity(1 << 10, 65536) == 1
    assert granularity(4 << 31, 512) == 8  # 4 TiB of 512-byte blocks: 2^30 units
    assert granularity(1 << 36, 512) == 16  # 32 TiB: units doubled to stay within 2^32
    assert granularity(1 << 33, 4096) == 2


def test_runs_longer_than_one_descriptor_are_split():
    """A run of 2^33 blocks (4 TiB at 512 B) needs two descriptors: NLB is a 0's based u32."""
    amap = AllocationMap(1 << 33, 512)
    amap.units.add_range(0, 1 << 30)
    ns = SimpleNamespace(alloc=amap)
    starts, counts, more = allocated_descriptors(ns, 0, 1 << 33, 10)  # type: ignore[arg-type]
    assert (list(starts), list(counts), more) == ([0, 1 << 32], [1 << 32, 1 << 32], False)
    starts, counts, more = allocated_descriptors(ns, 3, 1 << 33, 1)  # type: ignore[arg-type]
    assert (list(starts), list(counts), more) == ([3], [1 << 32], True)


# ----------------------------------------------------------------------------- Identify
def test_identify_advertises_tp4165_on_the_primary(driver, ns1):
    ctrl = IdentifyController.decode(driver.identify(CNS.CTRL))
    assert ctrl.oacs & OACS.GET_LBA_STATUS
    nvm = NvmIdentifyController.decode(driver.identify(CNS.CSI_CTRL, csi=0))
    assert nvm.aocs & 1  # RALBAS
    assert NvmIdentifyNamespace.decode(driver.identify(CNS.CSI_NS, nsid=ns1.nsid, csi=0)).tlbaag == 8
    driver.format_namespace(ns1.nsid, 1)  # 4 KiB blocks: one block per unit
    assert NvmIdentifyNamespace.decode(driver.identify(CNS.CSI_NS, nsid=ns1.nsid, csi=0)).tlbaag == 1


# ----------------------------------------------------------------------------- the allocation map
def test_writes_allocate_whole_units(driver, q, ns1):
    assert allocated_ranges(driver, ns1.nsid) == []
    write(q, ns1, 7, 1)  # last block of unit 0
    assert allocated_ranges(driver, ns1.nsid) == [(0, 8)]
    write(q, ns1, 8, 1)  # first block of unit 1: joins unit 0
    write(q, ns1, 31, 2)  # crosses units 3 and 4
    write(q, ns1, NS_BLOCKS - 1, 1)  # the very last block
    assert allocated_ranges(driver, ns1.nsid) == [(0, 16), (24, 16), (NS_BLOCKS - 8, 8)]


def test_partial_deallocation_keeps_the_unit(driver, q, ns1):
    write(q, ns1, 0, 32)  # units 0-3
    dsm(q, ns1, (0, 4), (9, 7), (20, 4))  # no unit wholly covered
    assert allocated_ranges(driver, ns1.nsid) == [(0, 32)]
    dsm(q, ns1, (8, 8))  # unit 1 wholly
    write_zeroes(q, ns1, 14, 12, deallocate=True)  # covers unit 2 (16-23) only partly 24-25 of unit 3
    assert allocated_ranges(driver, ns1.nsid) == [(0, 8), (24, 8)]
    write_zeroes(q, ns1, 24, 8, deallocate=True)
    dsm(q, ns1, (0, 8))
    assert allocated_ranges(driver, ns1.nsid) == []
    write(q, ns1, 64, 8)
    dsm(q, ns1, (64, 4))
    dsm(q, ns1, (68, 4))  # the unit deallocated in two pieces: over-reported (so is the file's 4 KiB block)
    assert allocated_ranges(driver, ns1.nsid) == [(64, 8)]


def test_write_zeroes_without_deac_allocates(driver, q, ns1):
    write_zeroes(q, ns1, 100, 30, deallocate=False)
    assert allocated_ranges(driver, ns1.nsid) == [(96, 40)]
    write_zeroes(q, ns1, 96, 40, deallocate=True)
    assert allocated_ranges(driver, ns1.nsid) == []


def test_last_partial_unit_is_cleared_by_deallocating_to_the_end(ssd, driver, q):
    ns = ssd.subsystem.create_namespace(nsze=1001, lba_size=512)  # unit 125 holds only LBA 1000
    ssd.subsystem.attach(ns.nsid, 0)
    write(q, ns, 998, 3)
    assert allocated_ranges(driver, ns.nsid) == [(992, 9)]  # clipped to NSZE
    dsm(q, ns, (1000, 1))
    assert allocated_ranges(driver, ns.nsid) == [(992, 8)]


def test_format_deallocates_everything(ssd, driver, q, ns1):
    write(q, ns1, 0, 64)
    write_zeroes(q, ns1, 1000, 16, deallocate=False)
    assert q.run(cmd.flush(ns1.nsid))[0].ok
    sidecar = ns1.path.with_suffix(SIDECAR_SUFFIX)
    assert sidecar.exists()  # the Write Zeroes units were saved on the flush
    driver.format_namespace(ns1.nsid, 0)
    assert allocated_ranges(driver, ns1.nsid) == []
    assert not sidecar.exists()


def bring_up(dev: EmulatedSsd) -> tuple[GuestMemory, NvmeDriver, IoQueue]:
    mem = GuestMemory(16 << 20)
    dev.pf.iommu.map(mem.base, mem.buf)
    drv = NvmeDriver(dev.pf, mem, timeout=5.0)
    drv.start()
    drv.set_number_of_queues(1, 1)
    return mem, drv, drv.create_io_queue(1, 32)


@pytest.mark.parametrize("lba_size", [512, 4096])
def test_restart_rebuilds_the_same_map(tmp_path, lba_size):
    root = tmp_path / "dev"
    dev = EmulatedSsd(root)
    rng = np.random.default_rng(lba_size)
    try:
        _, drv, q = bring_up(dev)
        ns = dev.subsystem.create_namespace(nsze=(32 << 20) // lba_size, lba_size=lba_size)
        dev.subsystem.attach(ns.nsid, 0)
        g = ns.alloc.tlbaag
        for _ in range(40):
            write(q, ns, int(rng.integers(0, ns.nsze - 64)), int(rng.integers(1, 64)))
        for _ in range(10):  # whole-unit deallocations: the file then says exactly what the map says
            first = int(rng.integers(0, ns.nsze // g - 8))
            dsm(q, ns, (first * g, int(rng.integers(1, 8)) * g))
        write_zeroes(q, ns, 3 * g, 2 * g, deallocate=False)  # ext4 shows these as holes: the sidecar keeps them
        write_zeroes(q, ns, ns.nsze - 5 * g, 3 * g, deallocate=False)
        write_zeroes(q, ns, ns.nsze - 4 * g, g, deallocate=True)
        before = allocated_ranges(drv, ns.nsid)
        assert (3 * g, 2 * g) in before or any(s <= 3 * g and 5 * g <= s + n for s, n in before)
        drv.shutdown()
    finally:
        dev.power_off()
    dev = EmulatedSsd(root)
    try:
        _, drv, _ = bring_up(dev)
        assert allocated_ranges(drv, ns.nsid) == before
    finally:
        dev.power_off()


def test_stale_sidecar_is_ignored(tmp_path):
    """A sidecar of a deleted namespace does not allocate anything in a new one with the same NSID."""
    root = tmp_path / "dev"
    dev = EmulatedSsd(root)
    try:
        _, drv, q = bring_up(dev)
        ns = dev.subsystem.create_namespace(nsze=4096, lba_size=512)
        dev.subsystem.attach(ns.nsid, 0)
        write_zeroes(q, ns, 0, 64, deallocate=False)
        assert q.run(cmd.flush(ns.nsid))[0].ok
        sidecar = ns.path.with_suffix(SIDECAR_SUFFIX)
        blob = sidecar.read_bytes()
        drv.delete_namespace(ns.nsid)
        assert not sidecar.exists()
        nsid = drv.create_namespace(4096)
        drv.attach_namespace(nsid, [0])
        sidecar.write_bytes(blob)  # as if left behind by a crash
    finally:
        dev.power_off()
    dev = EmulatedSsd(root)
    try:
        _, drv, _ = bring_up(dev)
        assert allocated_ranges(drv, nsid) == []
    finally:
        dev.power_off()


# ----------------------------------------------------------------------------- Get LBA Status
def scattered(q: IoQueue, ns, n: int = 10) -> list[tuple[int, int]]:
    """`n` one-unit extents 16 blocks apart."""
    for i in range(n):
        write(q, ns, 16 * i, 8)
    return [(16 * i, 8) for i in range(n)]


def test_descriptors_carry_allocated_status(driver, q, ns1):
    scattered(q, ns1, 3)
    header, desc = get_lba_status(driver, ns1.nsid, 0)
    assert (header.nlsd, header.cmpc) == (3, Cmpc.COMPLETE)
    assert list(desc["dslba"]) == [0, 16, 32] and list(desc["nlb"]) == [7, 7, 7]
    assert all(s & 0x7 == LBARS_ALLOCATED for s in desc["status"])


def test_mndw_paging_with_cmpc(driver, q, ns1):
    want = scattered(q, ns1, 10)
    header, desc = get_lba_status(driver, ns1.nsid, 0, buffer_bytes=buf_for(3))
    assert (header.nlsd, header.cmpc, list(desc["dslba"])) == (3, Cmpc.INCOMPLETE, [0, 16, 32])
    header, desc = get_lba_status(driver, ns1.nsid, 40, buffer_bytes=buf_for(3))  # last DSLBA + NLB + 1
    assert (header.nlsd, header.cmpc, list(desc["dslba"])) == (3, Cmpc.INCOMPLETE, [48, 64, 80])
    header, desc = get_lba_status(driver, ns1.nsid, 136, buffer_bytes=buf_for(3))
    assert (header.nlsd, header.cmpc, list(desc["dslba"])) == (1, Cmpc.COMPLETE, [144])
    assert get_lba_status(driver, ns1.nsid, 0, buffer_bytes=buf_for(10))[0].cmpc == Cmpc.COMPLETE  # exact fit
    assert get_lba_status(driver, ns1.nsid, 0, buffer_bytes=buf_for(9))[0].cmpc == Cmpc.INCOMPLETE
    for room in (1, 2, 3, 7):
        assert allocated_ranges(driver, ns1.nsid, buffer_bytes=buf_for(room)) == want


def test_a_short_answer_in_a_large_buffer_follows_the_prp_list(driver, q, ns1):
    """A 16 KiB buffer needs a PRP list; an answer of two pages must land in the buffer's second page,
    not in the list page PRP2 points to (PRP2's meaning depends on the buffer, not on the bytes moved)."""
    want = scattered(q, ns1, 300)  # 16 + 300 * 16 bytes: more than one page, less than two
    header, desc = get_lba_status(driver, ns1.nsid, 0, buffer_bytes=16 << 10)
    assert (header.nlsd, header.cmpc) == (300, Cmpc.COMPLETE)
    assert [(int(a), int(n) + 1) for a, n in zip(desc["dslba"], desc["nlb"], strict=True)] == want


def test_mndw_smaller_than_a_descriptor(driver, q, ns1):
    comp, data = lba_status(driver, ns1.nsid, mndw=1)  # 8 bytes: the header alone
    assert comp.ok and (data[:4], data[4]) == (bytes(4), Cmpc.COMPLETE)  # nothing allocated yet
    write(q, ns1, 0, 1)
    comp, data = lba_status(driver, ns1.nsid, mndw=4)  # 20 bytes: still no room for a descriptor
    assert comp.ok and (data[:4], data[4]) == (bytes(4), Cmpc.INCOMPLETE)
    comp, data = lba_status(driver, ns1.nsid, mndw=0)  # 4 bytes: NLSD only
    assert comp.ok and data == bytes(4)
    with pytest.raises(RuntimeError):
        allocated_ranges(driver, ns1.nsid, buffer_bytes=16)


def test_range_length_windows(driver, q, ns1):
    write(q, ns1, 0, 8)
    write(q, ns1, 16, 8)
    write(q, ns1, 40, 24)
    assert allocated_ranges(driver, ns1.nsid, 4, 30) == [(4, 4), (16, 8)]
    header, desc = get_lba_status(driver, ns1.nsid, 4, rl=30)
    assert header.cmpc == Cmpc.COMPLETE
    assert [(int(a), int(n) + 1) for a, n in zip(desc["dslba"], desc["nlb"], strict=True)] == [(4, 4), (16, 8)]
    assert allocated_ranges(driver, ns1.nsid, 20) == [(20, 4), (40, 24)]  # RL 0: to the end
    assert allocated_ranges(driver, ns1.nsid, 44, 10) == [(44, 10)]
    assert allocated_ranges(driver, ns1.nsid, 24, 16) == []
    # a window longer than RL can say is asked with RL 0 and clipped by the host
    write(q, ns1, 70000, 8)
    write(q, ns1, 80000, 8)
    assert allocated_ranges(driver, ns1.nsid, 30, 70004 - 30) == [(40, 24), (70000, 4)]
    header, _ = get_lba_status(driver, ns1.nsid, NS_BLOCKS - 2, rl=100)  # past the end: clipped
    assert (header.nlsd, header.cmpc) == (0, Cmpc.COMPLETE)


@pytest.mark.parametrize("atype", [Atype.SCAN_UNTRACKED, Atype.TRACKED])
def test_unrecoverable_lba_actions_find_nothing(driver, q, ns1, atype):
    write(q, ns1, 0, 64)
    header, desc = get_lba_status(driver, ns1.nsid, 0, atype=atype)
    assert (header.nlsd, header.cmpc, len(desc)) == (0, Cmpc.COMPLETE, 0)
    comp, _ = lba_status(driver, ns1.nsid, NS_BLOCKS, atype=atype)
    assert comp.st == st.LBA_OUT_OF_RANGE


def test_refusals(ssd, driver, ns1):
    for atype in (0x00, 0x01, 0x03, 0x12, 0xFF):
        comp, _ = lba_status(driver, ns1.nsid, atype=atype)
        assert comp.st == st.INVALID_FIELD, atype
    for slba in (NS_BLOCKS, NS_BLOCKS + 1, (1 << 64) - 1):
        assert lba_status(driver, ns1.nsid, slba)[0].st == st.LBA_OUT_OF_RANGE
    for nsid in (0, 0xFFFFFFFF, ssd.model.max_namespaces + 1, ns1.nsid + 1):  # the last is valid, not allocated
        assert lba_status(driver, nsid)[0].st == st.INVALID_NAMESPACE, nsid
    mdts_bytes = 4096 << ssd.model.mdts
    assert lba_status(driver, ns1.nsid, mndw=mdts_bytes // 4)[0].st == st.INVALID_FIELD  # one dword over MDTS
    assert lba_status(driver, ns1.nsid, mndw=mdts_bytes // 4 - 1)[0].ok


def test_primary_reads_a_namespace_it_has_not_attached(ssd, driver, q):
    ns = ssd.subsystem.create_namespace(nsze=4096, lba_size=512)  # attached to nobody
    assert allocated_ranges(driver, ns.nsid) == []


# ----------------------------------------------------------------------------- roles (SR-IOV)
SRIOV = DeviceModel(max_vfs=2, vq_flexible=8, vi_flexible=4, vq_max_per_vf=4, vi_max_per_vf=2, max_io_queues=4,
                    msix_vectors=5)


def test_vf_has_no_get_lba_status_and_the_pf_answers_for_its_namespace(tmp_path):
    dev = EmulatedSsd(tmp_path / "ssd", SRIOV)
    try:
        _, pf, _ = bring_up(dev)
        hv.bring_up_vf(pf, 1, 2, 1)
        nsid = pf.create_namespace(NS_BLOCKS)
        pf.attach_namespace(nsid, [1])  # the VF's secondary controller only
        gmem = GuestMemory(4 << 20, base=0x10_0000)
        dev.vf(1).iommu.map(gmem.base, gmem.buf)
        guest = NvmeDriver(dev.vf(1), gmem, timeout=5.0)
        guest.start()
        assert guest.admin(cmd.get_lba_status(nsid, 0, 255, 0, 2), read=1024, check=False)[0].st == st.INVALID_OPCODE
        assert not IdentifyController.decode(guest.identify(CNS.CTRL)).oacs & OACS.GET_LBA_STATUS
        assert NvmIdentifyController.decode(guest.identify(CNS.CSI_CTRL, csi=0)).aocs == 0
        assert NvmIdentifyNamespace.decode(guest.identify(CNS.CSI_NS, nsid=nsid, csi=0)).tlbaag == 0
        guest.set_number_of_queues(1, 1)
        gq = guest.create_io_queue(1, 8)
        assert gq.write(nsid, 100, os.urandom(4096), 512).ok
        assert allocated_ranges(pf, nsid) == [(96, 16)]  # the migration host sees the guest's writes
    finally:
        dev.power_off()


# ----------------------------------------------------------------------------- never under-report
OPS = hs.lists(hs.tuples(hs.sampled_from(["write", "wz", "wz_deac", "dsm"]), hs.integers(0, 251),
                         hs.integers(1, 24)), min_size=1, max_size=12)


class PropertyRig:
    def __init__(self, dev, drv, q, ns) -> None:
        self.dev, self.drv, self.q, self.ns = dev, drv, q, ns

    def __repr__(self) -> str:
        return "PropertyRig()"


@pytest.fixture(scope="module")
def prig(tmp_path_factory) -> Iterator[PropertyRig]:
    dev = EmulatedSsd(tmp_path_factory.mktemp("prop") / "ssd")
    try:
        _, drv, q = bring_up(dev)
        ns = dev.subsystem.create_namespace(nsze=252, lba_size=512)  # 31.5 units: a partial last unit
        dev.subsystem.attach(ns.nsid, 0)
        yield PropertyRig(dev, drv, q, ns)
    finally:
        dev.power_off()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=OPS, room=hs.integers(1, 6))
def test_never_under_reports(prig, ops, room):
    """After random writes and deallocations, the reported ranges are exactly the units some write touched
    and no later deallocation covered whole, and they cover every block that holds non-zero data."""
    drv, q, ns = prig.drv, prig.q, prig.ns
    drv.format_namespace(ns.nsid, 0)
    nsze, units = ns.nsze, set()
    for kind, slba, nlb in ops:
        nlb = min(nlb, nsze - slba)
        if kind == "write":
            write(q, ns, slba, nlb)
        elif kind == "wz":
            write_zeroes(q, ns, slba, nlb, deallocate=False)
        elif kind == "wz_deac":
            write_zeroes(q, ns, slba, nlb, deallocate=True)
        else:
            dsm(q, ns, (slba, nlb))
        first, last = slba // 8, (slba + nlb - 1) // 8
        if kind in ("write", "wz"):
            units.update(range(first, last + 1))
        else:
            end = slba + nlb
            stop = end // 8 if end < nsze else last + 1
            units.difference_update(range(-(-slba // 8), stop))
    got = allocated_ranges(drv, ns.nsid, buffer_bytes=buf_for(room))
    reported = np.zeros(nsze, dtype=bool)
    for s, n in got:
        reported[s : s + n] = True
    model = np.zeros(nsze, dtype=bool)
    for u in units:
        model[u * 8 : min(u * 8 + 8, nsze)] = True
    assert (reported == model).all(), (got, sorted(units))
    data = np.frombuffer(q.read(ns.nsid, 0, nsze, 512), dtype=np.uint8).reshape(nsze, 512)
    nonzero = data.any(axis=1)
    assert not (nonzero & ~reported).any(), np.flatnonzero(nonzero & ~reported)


def test_racing_write_and_deallocation_never_under_report(ns1):
    """A write and a whole-unit deallocation of the same unit from two threads (as two controllers sharing a
    namespace would): whatever the interleaving, a unit whose file blocks hold data is in the map."""
    import threading

    block = memoryview(os.urandom(512))
    for round_ in range(300):
        unit = round_ % 16
        barrier = threading.Barrier(2)

        def writer(lba=unit * 8 + round_ % 8, barrier=barrier):
            barrier.wait()
            ns1.write_from(lba, [block])

        def deallocator(unit=unit, barrier=barrier):
            barrier.wait()
            ns1.deallocate(unit * 8, 8)

        threads = [threading.Thread(target=writer), threading.Thread(target=deallocator)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        has_data = any(True for _ in ns1.allocated_extents(unit * 4096, unit * 4096 + 4096))
        assert not has_data or ns1.alloc.is_allocated(unit * 8), round_
