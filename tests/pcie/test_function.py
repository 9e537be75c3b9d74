"""The PCIe function as a host sees it: config space IDs, BAR0 access rules, bus mastering
gating DMA, and Function Level Reset taking MSI-X and the controller back to reset state."""

from __future__ import annotations

import os
import time

import pytest

from nvme_lm.device.model import DeviceModel
from nvme_lm.host import commands as cmd
from nvme_lm.pcie.function import CLASS_NVME, CMD_BUS_MASTER, CMD_MEMORY_SPACE, PcieFunction, PcieIds
from nvme_lm.pcie.iommu import DmaFault
from nvme_lm.spec.registers import CSTS, Reg, sq_tail_doorbell
from tests.device.rawq import RawCq, RawSq


def _wait_reg(fn: PcieFunction, off: int, mask: int, want: int, timeout: float = 2.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        v = fn.bar0.read32(off)
        if v & mask == want:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"register {off:#x} = {v:#x}, wanted {want:#x} under mask {mask:#x}")
        time.sleep(0.0005)


def test_pf_config_space_ids(ssd):
    m: DeviceModel = ssd.model
    fn = ssd.pf
    assert fn.config_read(0x00, 2) == m.vendor_id
    assert fn.config_read(0x02, 2) == m.device_id
    assert fn.config_read(0x00, 4) == m.vendor_id | m.device_id << 16
    assert fn.config_read(0x2C, 2) == m.subsystem_vendor_id
    assert fn.config_read(0x2E, 2) == m.subsystem_id
    assert fn.config_read(0x09, 1) | fn.config_read(0x0A, 2) << 8 == CLASS_NVME
    assert fn.config_read(0x06, 2) & 0x10  # capabilities list (MSI-X lives there)
    with pytest.raises(ValueError):
        fn.config_read(0x40, 4)
    with pytest.raises(ValueError):
        fn.config_read(0x00, 3)


def test_vf_reads_ffff_vendor_and_device_id():
    vf = PcieFunction(PcieIds(0x1B36, 0x0010, 0x1AF4, 0x1100), msix_vectors=2, is_virtual=True)
    assert vf.config_read(0x00, 2) == 0xFFFF and vf.config_read(0x02, 2) == 0xFFFF
    assert vf.config_read(0x2C, 2) == 0x1AF4  # subsystem IDs are still real on a VF
    assert vf.config_read(0x09, 1) | vf.config_read(0x0A, 2) << 8 == CLASS_NVME


def test_command_register_keeps_only_modelled_bits(ssd):
    fn = ssd.pf
    fn.config_write(0x04, 2, 0xFFFF)
    assert fn.config_read(0x04, 2) == 0x0406  # memory space, bus master, INTx disable
    fn.config_write(0x04, 2, 0)
    assert not fn.bus_master


def test_bar0_accepts_only_aligned_4_or_8_byte_accesses(ssd):
    bar = ssd.pf.bar0
    for bad in (lambda: bar.read32(0x02), lambda: bar.read64(0x04), lambda: bar.write32(0x15, 0),
                lambda: bar.read32(bar.size), lambda: bar.write64(bar.size - 4, 0), lambda: bar.read32(-4)):
        with pytest.raises(ValueError):
            bad()


def test_bar0_without_a_device_reads_all_ones():
    fn = PcieFunction(PcieIds(1, 2, 3, 4), msix_vectors=1)
    assert fn.bar0.read32(0) == 0xFFFFFFFF and fn.bar0.read64(0) == (1 << 64) - 1
    fn.bar0.write32(0x14, 1)  # goes nowhere


def test_bus_master_disabled_faults_dma(ssd, mem):
    fn = ssd.pf
    addr = mem.alloc(4096)
    fn.enable()
    assert len(fn.dma_view(addr, 64)) == 64
    fn.config_write(0x04, 2, CMD_MEMORY_SPACE)
    with pytest.raises(DmaFault, match="bus mastering"):
        fn.dma_view(addr, 64)
    fn.config_write(0x04, 2, CMD_MEMORY_SPACE | CMD_BUS_MASTER)
    fn.dma_view(addr, 64, write=True)


def test_bus_master_off_makes_the_controller_fail_not_crash(ssd, driver, ns1):
    """An SQE fetch with BME off cannot be reported in any CQ: CSTS.CFS, as QEMU does."""
    fn = ssd.pf
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 8)
    fn.config_write(0x04, 2, CMD_MEMORY_SPACE)
    q.qp.submit(cmd.flush(ns1.nsid))
    _wait_reg(fn, Reg.CSTS, CSTS.CFS, CSTS.CFS)
    driver.start()  # a reset clears it; the driver turns bus mastering back on
    assert not fn.bar0.read32(Reg.CSTS) & CSTS.CFS
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 8)
    data = os.urandom(512)
    q.write(ns1.nsid, 0, data, 512)
    assert q.read(ns1.nsid, 0, 1, 512) == data


def test_flr_resets_msix_and_controller(ssd, mem, driver, ns1):
    fn = ssd.pf
    driver.set_number_of_queues(2, 2)
    driver.create_io_queue(1, 16)
    assert fn.bar0.read32(Reg.CSTS) & CSTS.RDY
    assert fn.bar0.read64(Reg.ASQ) and fn.bar0.read32(Reg.AQA)
    fn.msix.set_function_mask(True)
    n0 = fn.flr_count
    fn.flr()
    assert fn.flr_count == n0 + 1
    # PCIe side: bus mastering and MSI-X back to reset
    assert fn.config_read(0x04, 2) == 0 and not fn.bus_master
    assert not fn.msix.enabled and not fn.msix.function_mask
    assert all(fn.msix.is_masked(v) and not fn.msix.is_pending(v) for v in range(fn.msix.nvectors))
    # NVMe side: not ready, every property reset, AQA/ASQ/ACQ included
    assert fn.bar0.read32(Reg.CSTS) == 0
    assert fn.bar0.read32(Reg.CC) == 0
    assert fn.bar0.read32(Reg.AQA) == 0 and fn.bar0.read64(Reg.ASQ) == 0 and fn.bar0.read64(Reg.ACQ) == 0
    assert fn.bar0.read32(Reg.INTMS) == 0
    # a doorbell while not ready does nothing (no event, no DMA)
    fn.bar0.write32(sq_tail_doorbell(1, 0), 1)
    assert not ssd.primary.events.pending
    # the I/O queues are gone: the same QID can be created again after bring-up
    driver.start()
    driver.set_number_of_queues(2, 2)
    q = driver.create_io_queue(1, 16)
    data = os.urandom(1024)
    q.write(ns1.nsid, 8, data, 512)
    assert q.read(ns1.nsid, 8, 2, 512) == data


def test_flr_while_commands_are_queued_completes_none_of_them(ssd, mem, driver, ns1):
    """Commands still in an SQ at FLR are dropped: no CQE is written, none runs afterwards."""
    fn = ssd.pf
    driver.set_number_of_queues(1, 1)
    cq = RawCq(fn, mem, 1, 4)  # a full CQ (3 entries) keeps the rest of the SQ unfetched
    sq = RawSq(fn, mem, 1, 16)
    driver.admin(cmd.create_io_cq(1, 4, cq.addr, vector=1))
    driver.admin(cmd.create_io_sq(1, 16, sq.addr, 1))
    buf = mem.alloc(512)
    mem.view(buf, 512)[:] = b"\xAB" * 512
    for i in range(8):
        sqe = cmd.write(ns1.nsid, 100 + i, 1)
        sqe.prp1 = buf
        sq.put(sqe)
    sq.ring_doorbell()
    cq.wait_available(3)
    driver.get_features(0x07)  # two admin round trips: the engine had passes to overrun the CQ
    driver.get_features(0x07)
    assert cq.available() == 3 and cq.peek(3).phase == 0
    before = bytes(mem.view(cq.addr, 4 * 16))
    fn.flr()
    assert bytes(mem.view(cq.addr, 4 * 16)) == before
    driver.start()
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 8)
    assert q.read(ns1.nsid, 100, 3, 512) == b"\xAB" * 1536
    assert q.read(ns1.nsid, 103, 5, 512) == bytes(5 * 512)  # never executed
