"""Abort: outstanding AERs, commands still waiting in an SQ behind a full CQ, the abort limit."""

from __future__ import annotations

import os

import pytest

from nvme_lm.host import commands as cmd
from nvme_lm.spec import status as st
from tests.device.rawq import RawCq, RawSq

LBA = 512


@pytest.fixture
def stalled(ssd, driver, mem, ns1):
    """SQ 1 (16 entries) feeding CQ 1 of two entries, which holds a single CQE: once one
    command completed and the host does not consume it, the rest wait in the SQ unfetched.
    Each command is a one-block Write of its own data to LBA = CID - 100."""
    driver.set_number_of_queues(1, 1)
    cq = RawCq(ssd.pf, mem, 1, 2)
    sq = RawSq(ssd.pf, mem, 1, 16)
    driver.admin(cmd.create_io_cq(1, 2, cq.addr, vector=1))
    driver.admin(cmd.create_io_sq(1, 16, sq.addr, 1))
    payloads = {}
    for cid in range(100, 106):
        data = os.urandom(LBA)
        buf = mem.alloc(LBA)
        mem.write(buf, data)
        sqe = cmd.write(ns1.nsid, cid - 100, 1)
        sqe.prp1 = buf
        sq.put(sqe, cid)
        payloads[cid] = data
    sq.ring_doorbell()
    cq.wait_available(1)
    return sq, cq, payloads


def abort(driver, sqid, cid):
    comp, _ = driver.admin(cmd.abort(sqid, cid), check=False)
    return comp


def read_lba(ns, lba):
    buf = bytearray(LBA)
    ns.read_into(lba, [memoryview(buf)])
    return bytes(buf)


def test_abort_commands_waiting_in_the_sq(ssd, driver, ns1, stalled):
    _sq, cq, payloads = stalled
    assert abort(driver, 1, 100).dw0 & 1 == 1  # already completed: not aborted
    for cid in (101, 103):
        c = abort(driver, 1, cid)
        assert c.ok and c.dw0 & 1 == 0
    assert abort(driver, 1, 103).dw0 & 1 == 0  # asking twice is fine
    entries = cq.wait(6)
    status = {e.cid: e.st for e in entries}
    assert status == {100: st.SUCCESS, 101: st.ABORT_REQUESTED, 102: st.SUCCESS, 103: st.ABORT_REQUESTED,
                      104: st.SUCCESS, 105: st.SUCCESS}
    for cid, data in payloads.items():
        expect = bytes(LBA) if cid in (101, 103) else data  # aborted writes never ran
        assert read_lba(ns1, cid - 100) == expect
    assert not ssd.primary.abort_marks


def test_abort_limit(ssd, driver, stalled):
    _sq, cq, _ = stalled
    limit = ssd.model.acl + 1
    for cid in range(101, 101 + limit):
        assert abort(driver, 1, cid).dw0 & 1 == 0
    marks = dict(ssd.primary.abort_marks)
    c = abort(driver, 1, 105)
    assert c.st == st.ABORT_LIMIT_EXCEEDED and c.dw0 & 1 == 1
    assert ssd.primary.abort_marks == marks
    status = {e.cid: e.st for e in cq.wait(6)}
    assert [cid for cid, s in status.items() if s == st.ABORT_REQUESTED] == list(range(101, 101 + limit))
    assert status[105] == st.SUCCESS
    assert abort(driver, 1, 0x7777).dw0 & 1 == 1  # marks released: Abort works again


def test_abort_marks_die_with_their_queue(ssd, driver, stalled):
    assert abort(driver, 1, 104).dw0 & 1 == 0
    driver.admin(cmd.delete_io_sq(1))
    for cid in range(ssd.model.acl + 1):  # the deleted queue's mark no longer counts
        assert abort(driver, 0, 0x4000 + cid).ok


def test_abort_an_outstanding_aer(ssd, driver):
    aer = driver.submit_aer()
    assert driver.abort(0, aer)
    c = driver.admin_q.wait(aer, 2.0)
    assert c.st == st.ABORT_REQUESTED
    assert not ssd.primary.aers


def test_abort_refusals(ssd, driver):
    aer = driver.submit_aer()
    assert abort(driver, 3, aer).st == st.INVALID_FIELD  # no SQ 3
    assert not driver.abort(0, 0x1234)  # nothing with that CID
    assert [r.sqe.cid for r in ssd.primary.aers] == [aer]
