"""Controller registers (BAR0) as NVMe Base §3.1 defines them: capability fields, 32-bit
halves of 64-bit registers, reserved bits, interrupt mask set/clear, enable/disable/shutdown
transitions of CSTS, and writes to read-only registers being ignored."""

from __future__ import annotations

import os
import threading
import time

import pytest

from nvme_lm.device.model import DeviceModel
from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.host import commands as cmd
from nvme_lm.host.driver import NvmeDriver
from nvme_lm.spec.registers import CC, CSTS, NSSR_MAGIC, VS_2_1, Cap, Reg, Shn, aqa, sq_tail_doorbell
from nvme_lm.vm.memory import GuestMemory
from tests.device.rawq import RawCq, RawSq


def wait_csts(fn, mask: int, want: int, timeout: float = 2.0) -> int:
    deadline = time.monotonic() + timeout
    while True:
        v = fn.bar0.read32(Reg.CSTS)
        if v & mask == want:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"CSTS {v:#x}: wanted {want:#x} under {mask:#x}")
        time.sleep(0.0002)


def manual_enable(fn, mem, cc: int, *, depth: int = 8, asq: int | None = None, acq: int | None = None,
                  aqa_value: int | None = None) -> tuple[RawSq, RawCq]:
    """Programs the admin queues and writes CC as given (no waiting); returns the admin rings."""
    fn.enable()
    if fn.bar0.read32(Reg.CC) & CC.EN:
        fn.bar0.write32(Reg.CC, 0)
        wait_csts(fn, CSTS.RDY, 0)
    sq, cq = RawSq(fn, mem, 0, depth), RawCq(fn, mem, 0, depth)
    fn.bar0.write32(Reg.AQA, aqa(depth - 1, depth - 1) if aqa_value is None else aqa_value)
    fn.bar0.write64(Reg.ASQ, sq.addr if asq is None else asq)
    fn.bar0.write64(Reg.ACQ, cq.addr if acq is None else acq)
    fn.bar0.write32(Reg.CC, cc)
    return sq, cq


# ----------------------------------------------------------------------------------- CAP, VS
def test_cap_fields(ssd):
    m = ssd.model
    raw = ssd.pf.bar0.read64(Reg.CAP)
    cap = Cap.decode(raw)
    assert cap.mqes == m.max_queue_entries - 1 == 1023
    assert not cap.cqr  # PC=0 queues are supported
    assert cap.dstrd == m.doorbell_stride == 0
    assert cap.to == m.timeout_500ms and cap.to > 0
    assert cap.css & 0x01 and cap.css & 0x40  # NVM command set; I/O command set selection
    assert not cap.css & 0x80
    assert cap.mpsmin == 0 and cap.mpsmax >= cap.mpsmin
    assert not cap.nssrs
    # the same value through two 32-bit reads
    assert ssd.pf.bar0.read32(Reg.CAP) | ssd.pf.bar0.read32(Reg.CAP + 4) << 32 == raw


def test_version_is_2_1(ssd):
    assert ssd.pf.bar0.read32(Reg.VS) == VS_2_1 == 0x00020100


def test_read_only_registers_ignore_writes(ssd, driver):
    bar = ssd.pf.bar0
    cap, vs, csts = bar.read64(Reg.CAP), bar.read32(Reg.VS), bar.read32(Reg.CSTS)
    bar.write64(Reg.CAP, 0)
    bar.write32(Reg.CAP + 4, 0xFFFFFFFF)
    bar.write32(Reg.VS, 0x00010000)
    bar.write32(Reg.CSTS, 0xFFFFFFFF)
    bar.write32(0x18, 0xFFFFFFFF)  # reserved
    assert bar.read64(Reg.CAP) == cap and bar.read32(Reg.VS) == vs and bar.read32(Reg.CSTS) == csts
    assert bar.read32(0x18) == 0
    assert driver.get_features(0x07) is not None  # still working


def test_doorbells_read_as_zero(ssd, driver):
    assert ssd.pf.bar0.read32(0x1000) == 0
    assert ssd.pf.bar0.read32(0x1004) == 0


def test_nssr_is_ignored_when_not_supported(ssd, driver, ns1):
    bar = ssd.pf.bar0
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 8)
    bar.write32(Reg.NSSR, NSSR_MAGIC)
    assert bar.read32(Reg.NSSR) == 0
    csts = bar.read32(Reg.CSTS)
    assert csts & CSTS.RDY and not csts & CSTS.NSSRO
    data = os.urandom(512)
    q.write(ns1.nsid, 1, data, 512)  # the I/O queue survived
    assert q.read(ns1.nsid, 1, 1, 512) == data


# ----------------------------------------------------------------------------------- 64-bit registers
@pytest.mark.parametrize("reg", [Reg.ASQ, Reg.ACQ])
def test_queue_base_halves_and_reserved_bits(ssd, reg):
    bar = ssd.pf.bar0
    bar.write64(reg, 0x1234_5678_9ABC_DFFF)
    assert bar.read64(reg) == 0x1234_5678_9ABC_D000  # bits 11:0 reserved
    assert bar.read32(reg) == 0x9ABC_D000 and bar.read32(reg + 4) == 0x1234_5678
    bar.write32(reg + 4, 0xAAAA_BBBB)  # high half only
    assert bar.read64(reg) == 0xAAAA_BBBB_9ABC_D000
    bar.write32(reg, 0x0000_1FFF)  # low half only
    assert bar.read64(reg) == 0xAAAA_BBBB_0000_1000


def test_aqa_reserved_bits(ssd):
    bar = ssd.pf.bar0
    bar.write32(Reg.AQA, 0xFFFF_FFFF)
    assert bar.read32(Reg.AQA) == 0x0FFF_0FFF


def test_64bit_access_to_32bit_registers_splits(ssd, driver):
    bar = ssd.pf.bar0
    cc, csts = bar.read32(Reg.CC), bar.read32(Reg.CSTS)
    assert bar.read64(0x18) == csts << 32  # reserved 18h, then CSTS
    assert bar.read64(Reg.VS) == VS_2_1 | bar.read32(Reg.INTMS) << 32
    assert bar.read64(Reg.INTMC) >> 32 == cc
    bar.write64(Reg.INTMC, 0)  # INTMC, then CC: a 64-bit write of zero disables the controller
    wait_csts(ssd.pf, CSTS.RDY, 0)


def test_cc_reserved_bits_read_zero(ssd):
    bar = ssd.pf.bar0
    bar.write32(Reg.CC, 0xFF00_000E)  # reserved 3:1 and 31:25, CRIME (unsupported) - EN stays 0
    assert bar.read32(Reg.CC) == 0


# ----------------------------------------------------------------------------------- INTMS / INTMC
def test_intms_intmc_set_and_clear(ssd):
    bar = ssd.pf.bar0
    assert bar.read32(Reg.INTMS) == 0
    bar.write32(Reg.INTMS, 0b0101)
    assert bar.read32(Reg.INTMS) == bar.read32(Reg.INTMC) == 0b0101
    bar.write32(Reg.INTMS, 0b0010)  # writing 1 sets, 0 leaves alone
    assert bar.read32(Reg.INTMS) == 0b0111
    bar.write32(Reg.INTMC, 0b0001)  # writing 1 clears
    assert bar.read32(Reg.INTMS) == bar.read32(Reg.INTMC) == 0b0110
    bar.write32(Reg.INTMC, 0)
    assert bar.read32(Reg.INTMS) == 0b0110


# ----------------------------------------------------------------------------------- enable
@pytest.mark.parametrize("what", ["mps", "css", "ams", "aqa-sq", "aqa-cq", "asq-unmapped", "acq-unmapped",
                                  "asq-zero"])
def test_enable_with_bad_configuration_sets_cfs_not_rdy(ssd, mem, what):
    fn = ssd.pf
    cc = CC.make(en=True)
    kw: dict = {}
    if what == "mps":
        cc = CC.make(en=True, mps=Cap.decode(fn.bar0.read64(Reg.CAP)).mpsmax + 1)
    elif what == "css":
        cc = CC.make(en=True, css=7)  # admin only: CAP.CSS bit 7 is clear
    elif what == "ams":
        cc = CC.make(en=True, ams=1)  # weighted round robin: CAP.AMS is 0
    elif what == "aqa-sq":
        kw["aqa_value"] = aqa(0, 7)  # a one-entry admin SQ
    elif what == "aqa-cq":
        kw["aqa_value"] = aqa(7, 0)
    elif what == "asq-unmapped":
        kw["asq"] = 0x7F00_0000_0000
    elif what == "acq-unmapped":
        kw["acq"] = mem.end  # just past guest memory
    elif what == "asq-zero":
        kw["asq"] = 0
    manual_enable(fn, mem, cc, **kw)
    csts = wait_csts(fn, CSTS.CFS, CSTS.CFS)
    assert not csts & CSTS.RDY
    # a reset clears it and a correct bring-up then works
    d = NvmeDriver(fn, mem, timeout=5.0)
    d.start()
    assert d.get_features(0x07) >= 0


def test_enable_with_8k_pages(ssd, mem):
    """CC.MPS=1: admin queues must be 8 KiB aligned; a misaligned ASQ fails the enable."""
    fn = ssd.pf
    region = mem.alloc(5 * 4096)
    base = -(-region // 8192) * 8192
    sq_addr, cq_addr = base, base + 8192
    fn.enable()
    fn.bar0.write32(Reg.AQA, aqa(3, 3))
    fn.bar0.write64(Reg.ASQ, sq_addr + 4096)  # 4 KiB but not 8 KiB aligned
    fn.bar0.write64(Reg.ACQ, cq_addr)
    fn.bar0.write32(Reg.CC, CC.make(en=True, mps=1))
    wait_csts(fn, CSTS.CFS, CSTS.CFS)
    fn.bar0.write32(Reg.CC, 0)
    wait_csts(fn, CSTS.RDY | CSTS.CFS, 0)
    fn.bar0.write64(Reg.ASQ, sq_addr)
    fn.bar0.write32(Reg.CC, CC.make(en=True, mps=1))
    wait_csts(fn, CSTS.RDY | CSTS.CFS, CSTS.RDY)
    # the admin queues work with 8 KiB pages
    mem.view(sq_addr, 64)[:] = cmd.get_features(0x07).encode()
    fn.bar0.write32(0x1000, 1)
    deadline = time.monotonic() + 2
    while mem.view(cq_addr + 14, 1)[0] & 1 == 0:
        assert time.monotonic() < deadline
        time.sleep(0.0002)
    assert int.from_bytes(mem.view(cq_addr + 14, 2), "little") >> 1 == 0


def test_disable_clears_rdy_and_deletes_io_queues(ssd, mem, driver, ns1):
    fn = ssd.pf
    driver.set_number_of_queues(2, 2)
    driver.create_io_queue(1, 8)
    driver.create_io_queue(2, 8)
    fn.bar0.write32(Reg.CC, fn.bar0.read32(Reg.CC) & ~CC.EN)
    wait_csts(fn, CSTS.RDY, 0)
    assert fn.bar0.read64(Reg.ASQ) == driver.admin_q.sq_addr  # AQA/ASQ/ACQ survive a controller reset
    # doorbells of a disabled controller are ignored (no event)
    fn.bar0.write32(sq_tail_doorbell(1, 0), 1)
    # re-enable: the I/O queues are gone (an SQ doorbell for them is an error), the QIDs are free
    driver.start()
    fn.bar0.write32(sq_tail_doorbell(1, 0), 1)
    assert ssd.primary.events.pending  # invalid doorbell register: queue 1 does not exist any more
    driver.set_number_of_queues(2, 2)
    q = driver.create_io_queue(1, 8)
    data = os.urandom(4096)
    q.write(ns1.nsid, 0, data, 512)
    assert q.read(ns1.nsid, 0, 8, 512) == data


def test_disable_with_commands_queued_runs_none_of_them(ssd, mem, driver, ns1):
    """CC.EN=0 while commands sit in an SQ (its CQ full): they are dropped, no CQE is written."""
    fn = ssd.pf
    driver.set_number_of_queues(1, 1)
    cq, sq = RawCq(fn, mem, 1, 2), RawSq(fn, mem, 1, 32)
    driver.admin(cmd.create_io_cq(1, 2, cq.addr, vector=1))
    driver.admin(cmd.create_io_sq(1, 32, sq.addr, 1))
    buf = mem.alloc(512)
    mem.view(buf, 512)[:] = b"\x5A" * 512
    for i in range(10):
        sqe = cmd.write(ns1.nsid, 50 + i, 1)
        sqe.prp1 = buf
        sq.put(sqe)
    sq.ring_doorbell()
    cq.wait_available(1)
    driver.get_features(0x07)
    driver.get_features(0x07)
    assert cq.available() == 1  # one slot of a two-entry CQ: the engine stopped there
    snapshot = bytes(mem.view(cq.addr, 32))
    fn.bar0.write32(Reg.CC, 0)
    wait_csts(fn, CSTS.RDY, 0)
    assert bytes(mem.view(cq.addr, 32)) == snapshot
    driver.start()
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 8)
    assert q.read(ns1.nsid, 50, 1, 512) == b"\x5A" * 512
    assert q.read(ns1.nsid, 51, 9, 512) == bytes(9 * 512)


def test_reenable_after_disable_keeps_working(ssd, driver, ns1):
    for _ in range(3):
        driver.start()
        driver.set_number_of_queues(1, 1)
        q = driver.create_io_queue(1, 4)
        assert q.write(ns1.nsid, 3, b"\x01" * 512, 512).ok


def test_outstanding_aers_vanish_on_reset(ssd, mem):
    """Admin commands left in the admin SQ at CC.EN=0 never get a CQE in the old ring."""
    fn = ssd.pf
    sq, cq = manual_enable(fn, mem, CC.make(en=True), depth=4)
    wait_csts(fn, CSTS.RDY, CSTS.RDY)
    sq.put(cmd.get_features(0x07))
    sq.ring_doorbell()
    assert cq.wait(1)[0].status == 0
    fn.bar0.write32(Reg.CC, 0)
    wait_csts(fn, CSTS.RDY, 0)
    sq.put(cmd.get_features(0x07))
    sq.ring_doorbell()  # ignored: not ready
    assert cq.available() == 0


# ----------------------------------------------------------------------------------- shutdown
@pytest.mark.parametrize("shn", [Shn.NORMAL, Shn.ABRUPT])
def test_shutdown_reports_occurring_then_complete_and_flushes(ssd, driver, ns1, shn):
    fn = ssd.pf
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 8)
    data = os.urandom(2048)
    q.write(ns1.nsid, 40, data, 512)
    assert ns1.dirty
    # make the media flush slow (as a real write cache flush is) so SHST=01b is observable
    gate = threading.Event()
    real_flush = ns1.flush

    def slow_flush() -> None:
        gate.wait(5)
        real_flush()

    ns1.flush = slow_flush
    try:
        if shn == Shn.NORMAL:
            driver.delete_io_queue(1)
        cc = fn.bar0.read32(Reg.CC)
        fn.bar0.write32(Reg.CC, cc | shn << 14)  # the register write returns at once
        assert CSTS.shst(fn.bar0.read32(Reg.CSTS)) == 0b01
        assert ns1.dirty
        gate.set()
        csts = wait_csts(fn, CSTS.SHST_MASK, CSTS.SHST_COMPLETE)
    finally:
        gate.set()
        del ns1.flush
    assert csts & CSTS.RDY  # shutdown does not clear RDY
    assert not ns1.dirty
    # a reset is needed to use the controller again, and then it works
    driver.start()
    assert CSTS.shst(fn.bar0.read32(Reg.CSTS)) == 0
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 8)
    assert q.read(ns1.nsid, 40, 4, 512) == data


def test_driver_shutdown_sequence(ssd, driver, ns1):
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 8)
    q.write(ns1.nsid, 0, b"\x77" * 512, 512)
    driver.shutdown()
    assert not ns1.dirty
    assert not ssd.pf.bar0.read32(Reg.CSTS) & CSTS.RDY


def test_io_is_not_processed_after_shutdown(ssd, mem, driver, ns1):
    fn = ssd.pf
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 8)
    fn.bar0.write32(Reg.CC, fn.bar0.read32(Reg.CC) | Shn.ABRUPT << 14)
    wait_csts(fn, CSTS.SHST_MASK, CSTS.SHST_COMPLETE)
    cid = q.qp.submit(cmd.flush(ns1.nsid))
    driver.get_features(0x07)  # admin still answers; the I/O SQ is not fetched
    driver.get_features(0x07)
    with pytest.raises(TimeoutError):
        q.qp.wait(cid, 0.05)


def test_shutdown_then_reset_before_the_engine_ran_still_flushes(ssd, driver, ns1):
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 8)
    q.write(ns1.nsid, 0, b"\x33" * 512, 512)
    fn = ssd.pf
    cc = fn.bar0.read32(Reg.CC)
    fn.bar0.write32(Reg.CC, cc | Shn.NORMAL << 14)
    fn.bar0.write32(Reg.CC, 0)
    wait_csts(fn, CSTS.RDY, 0)
    assert CSTS.shst(fn.bar0.read32(Reg.CSTS)) == 0b10
    assert not ns1.dirty


# ----------------------------------------------------------------------------------- doorbell stride
def test_doorbell_stride_1(tmp_path):
    dev = EmulatedSsd(tmp_path / "ssd", DeviceModel(doorbell_stride=1))
    try:
        mem = GuestMemory(4 << 20)
        dev.pf.iommu.map(mem.base, mem.buf)
        assert Cap.decode(dev.pf.bar0.read64(Reg.CAP)).dstrd == 1
        ns = dev.subsystem.create_namespace(nsze=2048, lba_size=512)
        dev.subsystem.attach(ns.nsid, 0)
        d = NvmeDriver(dev.pf, mem, timeout=5.0)
        d.start()
        d.set_number_of_queues(3, 3)
        qs = [d.create_io_queue(i, 8) for i in (1, 2, 3)]
        for i, q in enumerate(qs):
            for j in range(20):  # wraps the 8-entry rings
                q.write(ns.nsid, i * 100 + j, bytes([i + j]) * 512, 512)
        for i, q in enumerate(qs):
            assert q.read(ns.nsid, i * 100 + 19, 1, 512) == bytes([i + 19]) * 512
        # a write between two strided doorbells (the stride-0 location of CQ 0) is ignored
        dev.pf.bar0.write32(0x1004, 5)
        assert not dev.primary.events.pending
        assert d.get_features(0x07) == (2 | 2 << 16)
    finally:
        dev.power_off()

