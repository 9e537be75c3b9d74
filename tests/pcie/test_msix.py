"""MSI-X: vectors come out of reset masked; a masked or function-masked vector that fires is
left pending and delivered once on unmask; nothing is ever lost between fire and unmask."""

from __future__ import annotations

import threading

import pytest

from nvme_lm.pcie.msix import MsixTable


def _table(n: int = 4) -> tuple[MsixTable, list[int]]:
    t = MsixTable(n)
    got: list[int] = []
    t.connect(got.append)
    return t, got


def test_needs_a_vector():
    with pytest.raises(ValueError):
        MsixTable(0)


def test_vectors_come_out_of_reset_masked_and_disabled():
    t, got = _table()
    assert not t.enabled and all(t.is_masked(v) for v in range(4))
    t.fire(1)
    assert got == [] and t.is_pending(1)


def test_unmasked_enabled_vector_is_delivered_at_once():
    t, got = _table()
    t.enable()
    t.mask(2, False)
    t.fire(2)
    t.fire(2)
    assert got == [2, 2] and t.delivered[2] == 2 and not t.is_pending(2)


def test_masked_vector_pends_and_unmask_delivers_once():
    t, got = _table()
    t.enable()
    t.fire(3)
    t.fire(3)
    assert got == [] and t.is_pending(3)
    t.mask(3, False)
    assert got == [3]  # one message for however many fires while masked
    assert not t.is_pending(3)
    t.mask(3, False)
    assert got == [3]


def test_pending_vector_stays_pending_while_function_masked():
    t, got = _table()
    t.enable()
    for v in range(4):
        t.mask(v, False)
    t.set_function_mask(True)
    t.fire(0)
    t.fire(1)
    assert got == [] and t.is_pending(0) and t.is_pending(1)
    t.mask(0, True)  # per-vector mask still applies after the function mask is lifted
    t.set_function_mask(False)
    assert got == [1] and t.is_pending(0)
    t.mask(0, False)
    assert got == [1, 0]


def test_disabled_capability_holds_messages_until_enabled():
    t, got = _table()
    t.mask(0, False)
    t.fire(0)
    assert got == [] and t.is_pending(0)
    t.enable()
    assert got == [0]


def test_no_sink_keeps_it_pending_until_connected():
    t = MsixTable(2)
    t.enable()
    t.mask(1, False)
    t.fire(1)
    assert t.is_pending(1)
    got: list[int] = []
    t.connect(got.append)
    assert got == [1]


def test_out_of_range_vectors():
    t, got = _table(2)
    t.enable()
    t.fire(5)  # beyond the table: dropped
    t.fire(-1)
    assert got == []
    with pytest.raises(IndexError):
        t.mask(2, False)
    with pytest.raises(IndexError):
        t.is_pending(7)


def test_reset_masks_clears_pending_and_disables():
    t, got = _table()
    t.enable()
    t.mask(1, False)
    t.fire(0)
    t.set_function_mask(True)
    t.reset()
    assert not t.enabled and not t.function_mask
    assert all(t.is_masked(v) and not t.is_pending(v) for v in range(4))
    t.enable()
    t.mask(0, False)
    assert got == []  # the pending bit did not survive the reset


def test_no_interrupt_lost_between_fire_and_unmask():
    """Fire from a device thread while the host toggles the mask: every burst ends delivered."""
    t = MsixTable(1)
    t.enable()
    delivered = threading.Event()
    t.connect(lambda v: delivered.set())
    for _ in range(300):
        t.mask(0, True)
        delivered.clear()
        f = threading.Thread(target=t.fire, args=(0,))
        f.start()
        t.mask(0, False)
        f.join()
        assert delivered.wait(2.0)
