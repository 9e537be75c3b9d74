"""The whole TP4159 flow of spec notes §12 in one device-level test, everything through the PFs' admin commands.

Source and destination are two vendor-a SSDs. A guest driver on the source VF keeps writing while the migration
host (the source PF) pre-copies the allocated LBAs (Get LBA Status ATYPE 02h) and then the changed LBAs logged in
a UDMQ, pass by pass, to the destination VF's namespace through the two PF drivers' I/O queues. The VF is then
suspended, a guest write is queued (doorbell recorded, never fetched), the UDMQ drained a last time, the controller
state moved to the destination VF together with the guest memory, and the destination resumed. Device internals
are looked at only in the final assertions.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from nvme_lm.device.ssd import EmulatedSsd
from nvme_lm.host import commands as cmd
from nvme_lm.host import migration as hm
from nvme_lm.host import tracking as ht
from nvme_lm.host import virtualization as hv
from nvme_lm.host.driver import IoQueue, NvmeDriver
from nvme_lm.host.lba_status import allocated_ranges
from nvme_lm.spec import cdq as c
from nvme_lm.spec.registers import sq_tail_doorbell
from tests.device.lm_setup import GUEST_BASE, GUEST_MB, LBA, driver_on, guest_on, migrate_guest_ram

NS_BLOCKS = (16 << 20) // LBA  # 16 MiB namespace
CHUNK = 256  # LBAs per PF copy command (128 KiB, within MDTS)
UDMQ_SLOTS = 1024


def side(dev: EmulatedSsd) -> tuple[NvmeDriver, IoQueue, int, int]:
    """PF driver with its own I/O queue, a 16 MiB namespace attached to VF 1 and to the PF (so that the
    migration host can read / write it); returns (pf, pf io queue, nsid, vf cntlid)."""
    pf = driver_on(dev.pf)
    nsid = pf.create_namespace(NS_BLOCKS, shared=True)  # NMIC shared: the PF and the VF both attach it
    entry = hv.bring_up_vf(pf, 1, 3, 3)
    pf.attach_namespace(nsid, [entry.scid, 0])
    pf.set_number_of_queues(1, 1)
    return pf, pf.create_io_queue(1, 16), nsid, entry.scid


def copy_ranges(pq_s: IoQueue, pq_d: IoQueue, nsid: int, ranges: list[tuple[int, int]]) -> int:
    """Reads each (slba, nlb) range through the source PF and writes it through the destination PF."""
    copied = 0
    for slba, nlb in ranges:
        for lba in range(slba, slba + nlb, CHUNK):
            n = min(CHUNK, slba + nlb - lba)
            assert pq_d.write(nsid, lba, pq_s.read(nsid, lba, n, LBA), LBA).ok
            copied += n
    return copied


def drain(pf: NvmeDriver, cdqid: int, reader: ht.CdqReader) -> tuple[list[tuple[int, int]], list[int]]:
    """Posts held entries (Get Features 21h), consumes them, hands the head back (Set Features 21h);
    returns the changed (slba, nlb) ranges and the ESA of every entry."""
    pf.admin(ht.cdq_get(cdqid), read=512)
    entries = reader.poll()
    pf.admin(ht.cdq_set_head(cdqid, reader.head))
    ranges = [(e["slba"], e["nlb"] + 1) for e in entries if e["nsid"] and e["lbacir"] == c.LBACIR_RANGE]
    return ranges, [e["esa"] for e in entries]


def dirty_memory(pf: NvmeDriver, cntlid: int) -> tuple[list[tuple[int, int]], bool]:
    """Track Receive until MTR clears: guest memory the VF wrote by DMA since the last call, and SUSP."""
    out: list[tuple[int, int]] = []
    while True:
        _, data = pf.admin(ht.track_receive(cntlid, 4096), read=4096)
        t = ht.parse_track_receive(data)
        out += t.ranges
        if not t.more:
            return out, t.suspended


def covered(ranges: list[tuple[int, int]], addr: int, length: int) -> bool:
    return any(a <= addr and addr + length <= a + n for a, n in ranges)


class GuestWorkload(threading.Thread):
    """The guest keeps writing (and now and then deallocating) random LBA runs on its own I/O queue."""

    def __init__(self, q: IoQueue, nsid: int, seed: int) -> None:
        super().__init__(daemon=True)
        self.q, self.nsid, self.rng = q, nsid, np.random.default_rng(seed)
        self.stop = threading.Event()
        self.ops = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                nlb = int(self.rng.integers(1, 33))
                slba = int(self.rng.integers(0, NS_BLOCKS - nlb))
                if self.ops % 17 == 16:
                    assert self.q.run(cmd.write_zeroes(self.nsid, slba, nlb, deallocate=True))[0].ok
                else:
                    assert self.q.write(self.nsid, slba, self.rng.bytes(nlb * LBA), LBA).ok
                self.ops += 1
        except BaseException as e:  # reported by the test thread
            self.error = e


def run_workload_while(q: IoQueue, nsid: int, seed: int, work) -> int:
    """Runs `work()` while the guest writes in the background; returns the guest operations done."""
    w = GuestWorkload(q, nsid, seed)
    w.start()
    try:
        while w.ops < 20 and w.is_alive():  # make sure the guest really overlaps the copy
            time.sleep(0.001)
        work()
    finally:
        w.stop.set()
        w.join(10)
    assert not w.is_alive() and w.error is None, w.error
    return w.ops


def lba_digests(dev: EmulatedSsd, nsid: int) -> np.ndarray:
    """One 64-bit sum-of-words digest per LBA (final check only: the namespace file, read in big chunks)."""
    fd = dev.subsystem.namespaces[nsid].fd
    out = np.empty(NS_BLOCKS, dtype=np.uint64)
    step = 8192  # LBAs per pread (4 MiB)
    for lba in range(0, NS_BLOCKS, step):
        raw = os.pread(fd, step * LBA, lba * LBA).ljust(step * LBA, b"\0")
        words = np.frombuffer(raw, dtype=np.uint64).reshape(step, LBA // 8)
        weights = np.arange(1, LBA // 8 + 1, dtype=np.uint64)
        out[lba : lba + step] = (words * weights).sum(axis=1)  # position-weighted: swaps inside an LBA show
    return out


def test_tp4159_flow_moves_a_running_guest_between_devices(devices):
    src, dst = devices
    pf_s, pq_s, nsid, cntlid_s = side(src)
    pf_d, pq_d, nsid_d, cntlid_d = side(dst)
    assert nsid_d == nsid

    # the guest on the source VF: I/O queue, some initial data, an outstanding AER
    g, mem_s = guest_on(src.vf(1))
    g.set_number_of_queues(2, 2)
    q = g.create_io_queue(1, 16)
    rng = np.random.default_rng(1)
    for slba in (0, 1000, 5000, 20000, NS_BLOCKS - 64):
        assert q.write(nsid, slba, rng.bytes(64 * LBA), LBA).ok
    aer_cid = g.submit_aer()

    # UDMQ in the source PF's memory, logging started before the first copy pass
    udmq = pf_s.mem.alloc(UDMQ_SLOTS * c.LBA_ENTRY_SIZE)
    cdqid = pf_s.admin(ht.cdq_create(udmq, UDMQ_SLOTS * c.LBA_ENTRY_SIZE, cntlid_s))[0].dw0
    reader = ht.CdqReader(lambda off, n: pf_s.mem.view(udmq + off, n), UDMQ_SLOTS)
    pf_s.admin(ht.log_user_data_changes(cdqid, True))
    # Track Memory Changes over the guest RAM at 4 KiB: what the VF writes by DMA (CQEs, read data)
    pf_s.admin(ht.track_memory_changes(cntlid_s, True), data=ht.track_memory_data(12, [(mem_s.base, GUEST_MB)]))

    # pass 0: the allocated LBAs (TP4165), while the guest writes
    copied: list[int] = []

    def copy_allocated() -> None:
        ranges = allocated_ranges(pf_s, nsid)
        assert ranges and sum(n for _, n in ranges) < NS_BLOCKS  # sparse: only in-use data moves
        copied.append(copy_ranges(pq_s, pq_d, nsid, ranges))

    ops = run_workload_while(q, nsid, 2, copy_allocated)

    # passes 1 and 2: the changed LBAs, while the guest keeps writing
    esas: list[int] = []
    for p in (1, 2):
        def copy_changes() -> None:
            ranges, e = drain(pf_s, cdqid, reader)
            esas.extend(e)
            dirty, susp = dirty_memory(pf_s, cntlid_s)
            assert covered(dirty, q.qp.cq_addr & ~0xFFF, 4096) and not susp  # the guest's CQ page
            copied.append(copy_ranges(pq_s, pq_d, nsid, ranges))

        ops += run_workload_while(q, nsid, 2 + p, copy_changes)
    assert esas and esas[0] == c.ESA_FIRST and ops > 40

    # suspend with a guest command queued but not fetched, and the AER outstanding
    hm.suspend_controller(pf_s, cntlid_s)
    late_buf = g.mem.alloc(8 * LBA)
    late_data = rng.bytes(8 * LBA)
    g.mem.view(late_buf, 8 * LBA)[:] = late_data
    late: list = []
    q.submit(cmd.write(nsid, 3000, 8), late_buf, 8 * LBA, late.append)  # SQE in guest memory + doorbell
    time.sleep(0.02)
    assert late == []

    # last pass: the remaining changes, ending with the last-suspended entry
    ranges, e = drain(pf_s, cdqid, reader)
    assert e and e[-1] == c.ESA_LAST_SUSPENDED
    copy_ranges(pq_s, pq_d, nsid, ranges)
    pf_s.admin(ht.log_user_data_changes(cdqid, False))
    dirty, susp = dirty_memory(pf_s, cntlid_s)  # final Track Receive: CQEs posted since the last pass
    assert susp and covered(dirty, q.qp.cq_addr & ~0xFFF, 4096)
    pf_s.admin(ht.track_memory_changes(cntlid_s, False))

    sq = src.secondary(1).sqs[1]
    assert (sq.tail - sq.head) % sq.size == 1  # recorded at the source, not fetched
    blob, csup = hm.read_state(pf_s, cntlid_s, chunk=512)
    assert csup

    # destination: guest memory at the same IOVAs behind the destination VF, state set, resume
    hm.suspend_controller(pf_d, cntlid_d)
    mem_d = migrate_guest_ram(g, mem_s, dst.vf(1))
    assert mem_d.base == GUEST_BASE == mem_s.base and mem_d.size == GUEST_MB
    hm.write_state(pf_d, cntlid_d, blob, chunk=256)
    completed_at_source = src.secondary(1).commands_completed
    hm.resume_controller(pf_d, cntlid_d)

    # the queued write completes exactly once, at the destination
    deadline = time.monotonic() + 5
    while not late and time.monotonic() < deadline:
        q.qp.wait_any(1.0) if q.qp.outstanding else time.sleep(0.005)
    time.sleep(0.05)
    q.qp.reap()
    assert len(late) == 1 and late[0].ok
    assert src.secondary(1).commands_completed == completed_at_source

    # every LBA matches; the late write landed only at the destination (the source VF stays suspended, torn down)
    s, d = lba_digests(src, nsid), lba_digests(dst, nsid)
    late_lbas = np.arange(3000, 3008)
    assert pq_d.read(nsid, 3000, 8, LBA) == late_data
    assert pq_s.read(nsid, 3000, 8, LBA) != late_data
    same = np.ones(NS_BLOCKS, dtype=bool)
    same[late_lbas] = False
    mismatched = np.flatnonzero((s != d) & same)
    assert mismatched.size == 0, f"{mismatched.size} LBAs differ, first {mismatched[:10].tolist()}"

    # the guest goes on at the destination: more verified I/O across CQ phase wraps
    for i in range(40):
        data = rng.bytes(4 * LBA)
        assert q.write(nsid, 6000 + 4 * i, data, LBA).ok
        assert q.read(nsid, 6000 + 4 * i, 4, LBA) == data
    assert src.secondary(1).commands_completed == completed_at_source

    # no AER lost: the one outstanding at suspend completes on an event at the destination
    assert len(dst.secondary(1).aers) == 1
    g.fn.bar0.write32(sq_tail_doorbell(1, g.cap.dstrd), 0xFFFF)  # invalid doorbell value -> error event
    comp = g.admin_q.wait(aer_cid, 5.0)
    assert comp.ok and comp.dw0 & 0x7 == 0
    assert len(late) == 1 and len(src.secondary(1).aers) == 1  # never completed at the source
