"""Asynchronous Event Request and Keep Alive: delivery, limits, CID conflicts, masking."""

from __future__ import annotations

import time

from nvme_lm.host import commands as cmd
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import SQE_SIZE
from nvme_lm.spec.logs import decode_error_log
from nvme_lm.spec.registers import CSTS, Reg, cq_head_doorbell, sq_tail_doorbell

LOG_ERROR = 0x01


def fields(dw0: int) -> tuple[int, int, int]:
    """(type, info, log page) of an AER completion."""
    return dw0 & 0x7, (dw0 >> 8) & 0xFF, (dw0 >> 16) & 0xFF


def is_done(driver, cid: int, settle: float = 0.05) -> bool:
    time.sleep(settle)
    driver.admin_q.reap()
    return cid in driver.admin_q.done


def submit_with_cid(qp, sqe, cid: int) -> None:
    """What no sane driver does: places an SQE carrying a CID that is still outstanding."""
    with qp.lock:
        sqe.cid = cid
        sqe.pack_into(qp.sq, qp.sq_tail * SQE_SIZE)
        qp.sq_tail = (qp.sq_tail + 1) % qp.depth
        qp._unrung += 1
    qp.ring()


def test_write_to_a_missing_queue_doorbell_completes_an_aer(ssd, driver):
    aer = driver.submit_aer()
    assert not is_done(driver, aer)  # nothing to report yet
    ssd.pf.bar0.write32(sq_tail_doorbell(5, 0), 1)  # SQ 5 does not exist
    c = driver.admin_q.wait(aer, 2.0)
    assert c.ok and fields(c.dw0) == (0, 0x00, LOG_ERROR)  # error, invalid doorbell register
    entry = decode_error_log(driver.get_log(LOG_ERROR, 64))[0]
    assert entry.error_count >= 1 and entry.sqid == 5 and entry.cid == 0xFFFF


def test_sq_tail_beyond_the_queue_size_completes_an_aer(ssd, driver):
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 16)
    aer = driver.submit_aer()
    ssd.pf.bar0.write32(sq_tail_doorbell(1, 0), 16)  # a 16-entry queue has tails 0..15
    c = driver.admin_q.wait(aer, 2.0)
    assert fields(c.dw0) == (0, 0x01, LOG_ERROR)  # error, invalid doorbell write value
    entry = decode_error_log(driver.get_log(LOG_ERROR, 64))[0]
    assert entry.sqid == 1 and entry.cid == 0xFFFF
    assert q.qp.sq_tail == 0 and ssd.primary.sqs[1].tail == 0  # the bad value was not taken


def test_cq_head_beyond_posted_entries_is_an_invalid_doorbell_value(ssd, driver):
    driver.set_number_of_queues(1, 1)
    driver.create_io_queue(1, 16)
    aer = driver.submit_aer()
    ssd.pf.bar0.write32(cq_head_doorbell(1, 0), 3)  # nothing was posted to CQ 1
    assert fields(driver.admin_q.wait(aer, 2.0).dw0) == (0, 0x01, LOG_ERROR)
    assert ssd.primary.cqs[1].head == 0


def test_second_error_waits_until_the_error_log_is_read(ssd, driver):
    a1, a2 = driver.submit_aer(), driver.submit_aer()
    ssd.pf.bar0.write32(sq_tail_doorbell(7, 0), 1)
    assert driver.admin_q.wait(a1, 2.0).ok
    ssd.pf.bar0.write32(sq_tail_doorbell(8, 0), 1)  # same type: masked until the log is read
    assert not is_done(driver, a2)
    driver.get_log(LOG_ERROR, 64)  # RAE=0 unmasks
    assert driver.admin_q.wait(a2, 2.0).ok


def test_pending_event_is_delivered_to_the_next_aer_at_once(ssd, driver):
    ssd.pf.bar0.write32(sq_tail_doorbell(9, 0), 1)  # no AER outstanding: the event waits
    time.sleep(0.02)
    aer = driver.submit_aer()
    assert fields(driver.admin_q.wait(aer, 2.0).dw0) == (0, 0x00, LOG_ERROR)


def test_more_than_aerl_plus_one_aers_are_refused(ssd, driver):
    limit = ssd.model.aerl + 1
    aers = [driver.submit_aer() for _ in range(limit)]
    comp, _ = driver.admin(cmd.async_event_request(), check=False)
    assert comp.st == st.AER_LIMIT_EXCEEDED
    assert len(ssd.primary.aers) == limit  # the refused one did not replace any
    ssd.pf.bar0.write32(sq_tail_doorbell(9, 0), 1)
    assert driver.admin_q.wait(aers[0], 2.0).ok  # the oldest AER reports first
    assert not any(is_done(driver, a, 0) for a in aers[1:])


def test_command_with_the_cid_of_an_outstanding_aer_is_a_conflict(ssd, driver):
    aer = driver.submit_aer()
    qp = driver.admin_q
    submit_with_cid(qp, cmd.get_features(0x01), aer)
    c = qp.wait(aer, 2.0)  # the conflicting command's completion carries the same CID
    assert c.st == st.CID_CONFLICT
    assert [r.sqe.cid for r in ssd.primary.aers] == [aer]  # the AER is still outstanding
    entry = ssd.primary.error_log.newest_first()[0]  # the host's CID bookkeeping is now off: peek
    assert entry.cid == aer and entry.status_field == st.CID_CONFLICT.field


def test_controller_reset_drops_outstanding_aers(ssd, driver):
    driver.submit_aer()
    driver.start()
    assert not ssd.primary.aers
    aer = driver.submit_aer()  # and new ones work after the reset
    ssd.pf.bar0.write32(sq_tail_doorbell(6, 0), 1)
    assert driver.admin_q.wait(aer, 2.0).ok


def test_keep_alive_keeps_the_controller_alive(ssd, driver):
    driver.set_features(0x0F, 200)
    deadline = time.monotonic() + 0.5
    while time.monotonic() < deadline:
        driver.keep_alive()
        time.sleep(0.05)
    assert not ssd.pf.bar0.read32(Reg.CSTS) & CSTS.CFS
    time.sleep(0.4)  # the host goes quiet for twice KATO
    assert ssd.pf.bar0.read32(Reg.CSTS) & CSTS.CFS
    driver.start()  # a reset recovers, with keep alive disabled again
    assert driver.get_features(0x0F) == 0
    driver.keep_alive()  # KATO 0: nothing to restart, still succeeds
    assert not ssd.pf.bar0.read32(Reg.CSTS) & CSTS.CFS
