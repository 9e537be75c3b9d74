"""Interrupt Coalescing (FID 08h) and Interrupt Vector Configuration (FID 09h), observed as MSI-X
deliveries. Commands are waited for by polling the CQ, so the host never depends on the very
interrupts being counted."""

from __future__ import annotations

import time

from nvme_lm.host import commands as cmd

IC, IVC = 0x08, 0x09
CD = 1 << 16
MAX_TIME = 255  # 25.5 ms


def coalescing(thr: int, time_100us: int) -> int:
    return thr | time_100us << 8


def wait_for(pred, timeout=2.0):
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.0002)
    return True


def flush_once(q, nsid):
    """Runs a Flush, waiting by polling the CQ with short sleeps (so the engine gets the GIL)."""
    qp = q.qp
    cid = qp.submit(cmd.flush(nsid))
    assert wait_for(lambda: qp.reap() >= 0 and cid in qp.done, timeout=5.0)
    assert qp.done.pop(cid).ok


def setup_queues(driver, n=2):
    driver.set_number_of_queues(n, n)
    return [driver.create_io_queue(qid, 16, vector=qid) for qid in range(1, n + 1)]


def test_threshold_gathers_four_completions_into_one_interrupt(ssd, driver, ns1):
    (q,) = setup_queues(driver, 1)
    delivered = ssd.pf.msix.delivered
    driver.set_features(IC, coalescing(3, MAX_TIME))  # THR is 0's based: 4 completions
    base = delivered[1]
    start = time.monotonic()
    for _ in range(4):
        flush_once(q, ns1.nsid)  # four separate engine passes
    elapsed = time.monotonic() - start
    assert wait_for(lambda: delivered[1] - base >= 1)
    time.sleep(0.05)
    if elapsed < 0.02:  # all four inside the aggregation time: only the threshold fired
        assert delivered[1] - base == 1
    else:  # a slow machine let the timer fire in between; still fewer interrupts than completions
        assert delivered[1] - base < 4


def test_without_coalescing_every_pass_interrupts(ssd, driver, ns1):
    (q,) = setup_queues(driver, 1)
    delivered = ssd.pf.msix.delivered
    base = delivered[1]
    for _ in range(4):
        flush_once(q, ns1.nsid)
    assert wait_for(lambda: delivered[1] - base == 4)


def test_aggregation_time_delays_a_lone_completion_but_never_loses_it(ssd, driver, ns1):
    (q,) = setup_queues(driver, 1)
    delivered = ssd.pf.msix.delivered
    driver.set_features(IC, coalescing(255, MAX_TIME))
    base = delivered[1]
    t0 = time.monotonic()
    flush_once(q, ns1.nsid)  # completion seen by polling the CQ
    assert delivered[1] == base  # held back
    assert wait_for(lambda: delivered[1] == base + 1)  # ...but delivered once TIME elapsed
    assert time.monotonic() - t0 >= 0.0255
    time.sleep(0.05)
    assert delivered[1] == base + 1


def test_coalescing_disable_exempts_one_vector(ssd, driver, ns1):
    q1, q2 = setup_queues(driver, 2)
    delivered = ssd.pf.msix.delivered
    driver.set_features(IC, coalescing(255, MAX_TIME))
    driver.set_features(IVC, 1 | CD)
    b1, b2 = delivered[1], delivered[2]
    for _ in range(4):
        flush_once(q1, ns1.nsid)
    assert wait_for(lambda: delivered[1] - b1 == 4)  # one interrupt per pass on the CD vector
    t0 = time.monotonic()
    flush_once(q2, ns1.nsid)
    assert delivered[2] == b2  # vector 2 is still coalesced
    assert wait_for(lambda: delivered[2] == b2 + 1)
    assert time.monotonic() - t0 >= 0.0255


def test_admin_vector_is_never_coalesced(ssd, driver):
    delivered = ssd.pf.msix.delivered
    driver.set_features(IC, coalescing(255, MAX_TIME))
    base = delivered[0]
    for _ in range(3):
        driver.get_features(IC)
    assert wait_for(lambda: delivered[0] - base >= 3)


def test_saved_coalescing_survives_a_controller_reset(ssd, driver, ns1):
    driver.set_features(IC, coalescing(255, MAX_TIME), save=True)
    driver.start()
    assert driver.get_features(IC) == coalescing(255, MAX_TIME)
    (q,) = setup_queues(driver, 1)
    delivered = ssd.pf.msix.delivered
    base = delivered[1]
    flush_once(q, ns1.nsid)
    assert delivered[1] == base  # still coalesced after the reset
    assert wait_for(lambda: delivered[1] == base + 1)


def test_unsaved_coalescing_is_forgotten_by_a_reset(ssd, driver, ns1):
    driver.set_features(IC, coalescing(255, MAX_TIME))
    driver.start()
    assert driver.get_features(IC) == 0
    (q,) = setup_queues(driver, 1)
    delivered = ssd.pf.msix.delivered
    base = delivered[1]
    for _ in range(3):
        flush_once(q, ns1.nsid)
    assert wait_for(lambda: delivered[1] - base == 3)
