"""Doorbell Buffer Config: shadow doorbells and EventIdx, as Linux's nvme driver and QEMU use them."""

from __future__ import annotations

import os
import struct
import threading
import time

from nvme_lm.host import commands as cmd
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import SQE_SIZE

U32 = struct.Struct("<I")
LBA = 512


def shadow_value(pages, qid, is_cq):
    return U32.unpack_from(pages.shadow, pages.offset(qid, is_cq))[0]


def eventidx(pages, qid, is_cq):
    return U32.unpack_from(pages.eventidx, pages.offset(qid, is_cq))[0]


def wait_for(pred, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.001)
    return True


def run_many(q, ns, count):
    """`count` one-block writes, each submitted (and its doorbell updated) on its own, then
    checked by reading back; returns the MMIO doorbell writes of the write phase."""
    mem = q.driver.mem
    mmio_before = q.qp.mmio_doorbells
    done = threading.Semaphore(0)
    results = []
    payloads = [os.urandom(LBA) for _ in range(count)]
    bufs = []
    for i, data in enumerate(payloads):
        buf = mem.alloc(LBA)
        mem.write(buf, data)
        bufs.append(buf)

        def cb(c, _results=results):
            _results.append(c)
            done.release()

        while q.qp.free == 0:  # deeper than the queue: make room
            q.qp.reap()
            time.sleep(0.0002)
        q.submit(cmd.write(ns.nsid, i, 1), buf, LBA, cb)
    for _ in range(count):
        while not done.acquire(timeout=0.01):
            q.qp.reap()
    mmio = q.qp.mmio_doorbells - mmio_before
    for buf in bufs:
        mem.free(buf)
    assert all(c.ok for c in results)
    for i, data in enumerate(payloads):
        assert q.read(ns.nsid, i, 1, LBA) == data
    return mmio


def test_io_through_shadow_doorbells_saves_mmio_writes(ssd, driver, ns1):
    driver.set_number_of_queues(1, 1)
    driver.enable_shadow_doorbells()
    q = driver.create_io_queue(1, 256)
    assert q.qp.shadow is driver.shadow
    mmio = run_many(q, ns1, 200)
    # 200 tail updates plus the head updates of the reaps: the controller asked for a ring only
    # when it had caught up, which a burst of submissions rarely lets it do
    assert mmio < 100, mmio
    assert shadow_value(driver.shadow, 1, False) == q.qp.sq_tail
    assert shadow_value(driver.shadow, 1, True) == q.qp.cq_head


def test_controller_reads_the_shadow_without_any_mmio(ssd, driver, ns1):
    driver.set_number_of_queues(1, 1)
    driver.enable_shadow_doorbells()
    q = driver.create_io_queue(1, 16)
    pages = driver.shadow
    q.write(ns1.nsid, 0, b"\x11" * LBA, LBA)
    assert wait_for(lambda: eventidx(pages, 1, False) == q.qp.sq_tail)  # idle: EventIdx = tail
    # place a Flush and publish the tail only in the shadow page: no MMIO at all
    qp = q.qp
    cid = 0x3F
    sqe = cmd.flush(ns1.nsid)
    sqe.cid = cid
    with qp.lock:
        qp.outstanding[cid] = (None, [])
        sqe.pack_into(qp.sq, qp.sq_tail * SQE_SIZE)
        qp.sq_tail = (qp.sq_tail + 1) % qp.depth
        U32.pack_into(pages.shadow, pages.offset(1, False), qp.sq_tail)
    assert qp.wait(cid, 2.0).ok  # picked up by the engine's periodic pass
    assert ssd.primary.sqs[1].tail == qp.sq_tail


def test_admin_queue_keeps_ringing_mmio_and_the_shadow_follows(ssd, driver):
    driver.enable_shadow_doorbells()
    for _ in range(5):
        driver.get_features(0x01)
    assert driver.admin_q.shadow is None
    assert shadow_value(driver.shadow, 0, False) == driver.admin_q.sq_tail
    assert shadow_value(driver.shadow, 0, True) == driver.admin_q.cq_head


def test_config_seeds_the_buffers_with_existing_queues(ssd, driver, ns1):
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 16)
    for i in range(5):
        q.write(ns1.nsid, i, os.urandom(LBA), LBA)
    driver.enable_shadow_doorbells()
    pages = driver.shadow
    assert shadow_value(pages, 1, False) == q.qp.sq_tail == 5
    assert eventidx(pages, 1, False) == 5
    run_many(q, ns1, 20)


def test_a_new_queue_starts_from_zero_whatever_the_page_held(ssd, driver, ns1):
    driver.set_number_of_queues(2, 2)
    driver.enable_shadow_doorbells()
    pages = driver.shadow
    U32.pack_into(pages.shadow, pages.offset(2, False), 9)  # stale junk from an earlier queue 2
    U32.pack_into(pages.shadow, pages.offset(2, True), 7)
    q = driver.create_io_queue(2, 16)
    assert shadow_value(pages, 2, False) == 0 and shadow_value(pages, 2, True) == 0
    run_many(q, ns1, 10)


def test_misaligned_or_unreachable_buffers_are_refused(ssd, driver, mem):
    a, b = mem.alloc(4096), mem.alloc(4096)
    for prp1, prp2 in ((a + 8, b), (a, b + 0x800), (0, b), (a, a), (a, 0x7FFF_0000_0000)):
        comp, _ = driver.admin(cmd.doorbell_buffer_config(prp1, prp2), check=False)
        assert comp.st == st.INVALID_FIELD
        assert ssd.primary.shadow is None
    driver.admin(cmd.doorbell_buffer_config(a, b))
    first = ssd.primary.shadow
    comp, _ = driver.admin(cmd.doorbell_buffer_config(a + 4, b), check=False)
    assert comp.st == st.INVALID_FIELD and ssd.primary.shadow is first  # the old buffers stay


def test_controller_reset_ends_the_shadow_buffers(ssd, driver, ns1):
    driver.enable_shadow_doorbells()
    assert ssd.primary.shadow is not None
    driver.start()
    assert ssd.primary.shadow is None and driver.shadow is None
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 16)
    assert q.qp.shadow is None
    data = os.urandom(4 * LBA)
    q.write(ns1.nsid, 0, data, LBA)
    assert q.read(ns1.nsid, 0, 4, LBA) == data
