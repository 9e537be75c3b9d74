"""Set/Get Features through the host driver: values, SEL, SV, NSID rules, side effects."""

from __future__ import annotations

import time

import pytest

from nvme_lm.host import commands as cmd
from nvme_lm.spec import status as st
from nvme_lm.spec.features import Timestamp
from nvme_lm.spec.registers import CSTS, Reg

ARB, PM, TEMP, VWC, NQ, IC, IVC, WA, AEC, TS, KATO = 0x01, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x0A, 0x0B, 0x0E, 0x0F
CD = 1 << 16


def set_status(driver, fid, cdw11=0, *, save=False, nsid=0, data=None):
    comp, _ = driver.admin(cmd.set_features(fid, cdw11, save=save, nsid=nsid), data=data, check=False)
    return comp.st


def get(driver, fid, sel=0, *, cdw11=0, nsid=0):
    return driver.get_features(fid, sel, cdw11=cdw11, nsid=nsid)


def get_status(driver, fid, sel=0, *, cdw11=0, nsid=0):
    comp, _ = driver.admin(cmd.get_features(fid, sel, nsid=nsid, cdw11=cdw11), check=False)
    return comp.st


def temp_sel(tmpsel, thsel, tmpth=0):
    return tmpth | tmpsel << 16 | thsel << 20


def get_timestamp(driver, sel=0) -> Timestamp:
    _, data = driver.admin(cmd.get_features(TS, sel), read=8)
    return Timestamp.from_bytes(data)


# --------------------------------------------------------------------------------- SEL and SV
def test_arbitration_current_default_saved_and_capabilities(driver):
    assert get(driver, ARB) == 0x3
    driver.set_features(ARB, 0x010203FA)  # AB 2, weights, reserved bits 7:3 set
    assert get(driver, ARB) == 0x01020302
    assert get(driver, ARB, sel=1) == 0x3  # default
    assert get(driver, ARB, sel=2) == 0x3  # nothing saved yet: the default
    assert get(driver, ARB, sel=3) == 0b101  # saveable, changeable, not namespace specific
    driver.set_features(ARB, 0x5, save=True)
    assert get(driver, ARB, sel=2) == 0x5
    driver.set_features(ARB, 0x6)
    assert get(driver, ARB, sel=2) == 0x5
    driver.start()  # controller reset: current reverts to the saved value
    assert get(driver, ARB) == 0x5


def test_reserved_select_and_unknown_fid_are_refused(driver):
    assert get_status(driver, ARB, sel=4) == st.INVALID_FIELD
    for fid in (0x03, 0x7F, 0xFF):
        assert set_status(driver, fid, 1) == st.INVALID_FIELD
        assert get_status(driver, fid) == st.INVALID_FIELD


@pytest.mark.parametrize("fid", [NQ, TS, KATO])
def test_save_of_a_feature_that_is_not_saveable(driver, fid):
    before = get(driver, fid) if fid != TS else None
    data = Timestamp(123).to_bytes() if fid == TS else None
    assert set_status(driver, fid, 0x00010001, save=True, data=data) == st.FEATURE_NOT_SAVEABLE
    assert get(driver, fid, sel=3) & 1 == 0
    if fid != TS:
        assert get(driver, fid) == before
    else:
        assert get_timestamp(driver).origin == 0  # not set


def test_nsid_rules_for_controller_wide_features(driver, ns1):
    driver.set_features(ARB, 0x2, nsid=0xFFFFFFFF)
    assert set_status(driver, ARB, 0x4, nsid=ns1.nsid) == st.FEATURE_NOT_NS_SPECIFIC
    assert set_status(driver, ARB, 0x4, nsid=0x10000) == st.INVALID_NAMESPACE
    assert get(driver, ARB) == 0x2
    assert get(driver, ARB, nsid=ns1.nsid) == 0x2  # Get ignores the NSID of a controller-wide feature


# ----------------------------------------------------------------------------- single features
def test_power_management_has_one_power_state(driver):
    driver.set_features(PM, 0x0 | 3 << 5)  # PS 0, workload hint 3
    assert get(driver, PM) == 3 << 5
    assert set_status(driver, PM, 1) == st.INVALID_FIELD
    assert get(driver, PM) == 3 << 5


def test_temperature_thresholds_per_sensor_and_kind(driver):
    assert get(driver, TEMP, cdw11=temp_sel(0, 0)) == temp_sel(0, 0, 343)
    assert get(driver, TEMP, cdw11=temp_sel(0, 1)) == temp_sel(0, 1, 0)
    assert get(driver, TEMP, cdw11=temp_sel(1, 0)) == temp_sel(1, 0, 0xFFFF)
    driver.set_features(TEMP, temp_sel(0, 0, 350))
    driver.set_features(TEMP, temp_sel(1, 1, 270))
    assert get(driver, TEMP, cdw11=temp_sel(0, 0)) & 0xFFFF == 350
    assert get(driver, TEMP, cdw11=temp_sel(0, 1)) & 0xFFFF == 0
    assert get(driver, TEMP, cdw11=temp_sel(1, 1)) & 0xFFFF == 270
    assert get(driver, TEMP, sel=1, cdw11=temp_sel(1, 1)) & 0xFFFF == 0  # default
    driver.set_features(TEMP, temp_sel(0xF, 0, 360))  # all sensors
    assert get(driver, TEMP, cdw11=temp_sel(0, 0)) & 0xFFFF == 360
    assert get(driver, TEMP, cdw11=temp_sel(1, 0)) & 0xFFFF == 360


def test_temperature_thresholds_are_saved_per_sensor(driver):
    driver.set_features(TEMP, temp_sel(1, 0, 330), save=True)
    driver.set_features(TEMP, temp_sel(0, 0, 350))  # not saved
    assert get(driver, TEMP, sel=2, cdw11=temp_sel(1, 0)) & 0xFFFF == 330
    assert get(driver, TEMP, sel=2, cdw11=temp_sel(0, 0)) & 0xFFFF == 343
    driver.start()
    assert get(driver, TEMP, cdw11=temp_sel(1, 0)) & 0xFFFF == 330
    assert get(driver, TEMP, cdw11=temp_sel(0, 0)) & 0xFFFF == 343


def test_temperature_threshold_refusals_change_nothing(driver):
    driver.set_features(TEMP, temp_sel(0, 0, 350))
    assert set_status(driver, TEMP, temp_sel(5, 0, 300)) == st.INVALID_FIELD  # no sensor 5
    assert set_status(driver, TEMP, temp_sel(0, 2, 300)) == st.INVALID_FIELD  # THSEL reserved
    assert get_status(driver, TEMP, cdw11=temp_sel(0xF, 0)) == st.INVALID_FIELD
    assert get(driver, TEMP, cdw11=temp_sel(0, 0)) & 0xFFFF == 350


def test_temperature_over_threshold_raises_smart_event_when_enabled(driver):
    aer = driver.submit_aer()
    driver.set_features(TEMP, temp_sel(0, 0, 300))  # the drive is at 313 K: over, but masked
    time.sleep(0.05)
    driver.admin_q.reap()
    assert aer not in driver.admin_q.done
    driver.set_features(TEMP, temp_sel(0, 0, 343))
    driver.set_features(AEC, 0x02)  # temperature critical warnings
    driver.set_features(TEMP, temp_sel(0, 1, 320))  # under threshold above the temperature
    c = driver.admin_q.wait(aer, 2.0)
    assert (c.dw0 & 7, (c.dw0 >> 8) & 0xFF, (c.dw0 >> 16) & 0xFF) == (1, 0x01, 0x02)


def test_volatile_write_cache_disable_flushes(driver, ns1):
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 16)
    q.write(ns1.nsid, 0, b"\xab" * 512, 512)
    assert ns1.dirty
    driver.set_features(VWC, 0)
    assert get(driver, VWC) == 0
    assert not ns1.dirty
    driver.set_features(VWC, 0xFFFFFFFF)
    assert get(driver, VWC) == 1


def test_number_of_queues_after_io_queues_is_a_sequence_error(driver):
    assert driver.set_number_of_queues(8, 4) == (8, 4)
    assert get(driver, NQ) == 7 | 3 << 16
    driver.create_io_queue(1, 16)
    assert set_status(driver, NQ, 1 | 1 << 16) == st.COMMAND_SEQUENCE_ERROR
    assert get(driver, NQ) == 7 | 3 << 16
    assert set_status(driver, NQ, 0xFFFF) == st.INVALID_FIELD


def test_interrupt_coalescing_and_vector_configuration(ssd, driver):
    driver.set_features(IC, 0xFFFF_0203)  # reserved bits dropped
    assert get(driver, IC) == 0x0203
    assert (ssd.primary.irq.threshold, ssd.primary.irq.time_100us) == (3, 2)
    driver.set_number_of_queues(4, 4)
    driver.create_io_queue(1, 16, vector=1)
    assert get(driver, IVC, cdw11=0) == CD  # the admin vector is never coalesced
    assert get(driver, IVC, cdw11=1) == 1
    driver.set_features(IVC, 1 | CD)
    assert get(driver, IVC, cdw11=1) == 1 | CD
    assert get(driver, IVC, sel=1, cdw11=1) == 1
    driver.set_features(IVC, 1)
    assert get(driver, IVC, cdw11=1) == 1


def test_interrupt_vector_configuration_refusals(ssd, driver):
    driver.set_number_of_queues(4, 4)
    driver.create_io_queue(1, 16, vector=1)
    assert set_status(driver, IVC, 0) == st.INVALID_FIELD  # vector 0 cannot clear CD
    assert set_status(driver, IVC, 7 | CD) == st.INVALID_FIELD  # no CQ uses vector 7
    assert set_status(driver, IVC, ssd.pf.msix.nvectors | CD) == st.INVALID_FIELD
    assert get_status(driver, IVC, cdw11=7) == st.INVALID_FIELD
    assert get(driver, IVC, cdw11=0) == CD and get(driver, IVC, cdw11=1) == 1
    assert ssd.primary.irq.coalescing_disabled == {0}


def test_write_atomicity_and_async_event_configuration(driver):
    driver.set_features(WA, 0xFFFFFFFF)
    assert get(driver, WA) == 1
    driver.set_features(AEC, 0xFFFFFFFF)
    assert get(driver, AEC) == 0x8040FFFF  # SMART bits, notices 8-15, 22 rate limit change, discovery log change
    assert get(driver, AEC, sel=1) == 0


def test_timestamp_follows_the_host_clock(driver):
    ts0 = get_timestamp(driver)
    assert ts0.origin == 0 and not ts0.synch and ts0.timestamp_ms < 60_000  # counting since reset
    host_ms = 1_700_000_000_000
    driver.set_features(TS, data=Timestamp(host_ms).to_bytes())
    time.sleep(0.05)
    ts = get_timestamp(driver)
    assert ts.origin == 1 and not ts.synch
    assert host_ms + 40 <= ts.timestamp_ms < host_ms + 5_000
    driver.start()  # a Controller Level Reset restarts the count at zero
    ts2 = get_timestamp(driver)
    assert ts2.origin == 0 and ts2.timestamp_ms < ts.timestamp_ms


def test_keep_alive_timeout_is_rounded_up_to_the_granularity(ssd, driver):
    assert get(driver, KATO) == 0
    driver.set_features(KATO, 250)
    assert get(driver, KATO) == 300  # KAS is 100 ms
    assert ssd.primary.keep_alive_deadline is not None
    driver.set_features(KATO, 0)
    assert ssd.primary.keep_alive_deadline is None
    assert not ssd.pf.bar0.read32(Reg.CSTS) & CSTS.CFS
