"""Get Log Page through the admin queue: contents, windows, RAE and event masking."""

from __future__ import annotations

import os

from nvme_lm.host import commands as cmd
from nvme_lm.spec import status as st
from nvme_lm.spec.logs import CommandEffectsLog, FidSupportedEffectsLog, SmartLog, decode_error_log


def _log_status(driver, sqe, n):
    comp, _ = driver.admin(sqe, read=n, check=False)
    return comp.st


def test_supported_log_pages(driver):
    data = driver.get_log(0x00, 1024)
    lids = [i for i in range(256) if int.from_bytes(data[4 * i : 4 * i + 4], "little") & 1]
    assert lids == [0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x12, 0x28]  # 28h: rate limiting (TP4176)


def test_error_log_records_failed_commands(driver):
    comp, _ = driver.admin(cmd.identify(0x00, nsid=0), read=4096, check=False)
    entries = decode_error_log(driver.get_log(0x01, 64 * 4))
    assert entries[0].error_count >= 1
    assert entries[0].cid == comp.cid and entries[0].sqid == 0
    assert entries[0].status_field == st.INVALID_NAMESPACE.field
    assert entries[0].pel == 4  # NSID lives at byte 4 of the SQE


def test_smart_counts_host_io(driver, ns1):
    before = SmartLog.decode(driver.get_log(0x02, 512))
    driver.set_number_of_queues(1, 1)
    q = driver.create_io_queue(1, 16)
    for i in range(3):
        q.write(ns1.nsid, i * 8, os.urandom(4096), 512)
    q.read(ns1.nsid, 0, 8, 512)
    after = SmartLog.decode(driver.get_log(0x02, 512))
    assert after.host_write_commands - before.host_write_commands == 3
    assert after.host_read_commands - before.host_read_commands == 1
    assert after.data_units_written >= 1
    assert after.temperature > 273 and after.power_cycles >= 1
    assert _log_status(driver, cmd.get_log_page(0x02, 128, nsid=ns1.nsid), 512) == st.INVALID_FIELD


def test_offset_windows_match_the_whole_log(driver):
    whole = driver.get_log(0x05, 4096)
    assert driver.get_log(0x05, 512, offset=1024) == whole[1024:1536]
    assert _log_status(driver, cmd.get_log_page(0x05, 4, offset=2), 16) == st.INVALID_FIELD
    assert _log_status(driver, cmd.get_log_page(0x05, 4, offset=8192), 16) == st.INVALID_FIELD
    assert _log_status(driver, cmd.get_log_page(0x7E, 4), 16) == st.INVALID_LOG_PAGE


def test_effects_logs_follow_the_dispatch_tables(ssd, driver):
    eff = CommandEffectsLog.decode(driver.get_log(0x05, 4096))
    ctrl = ssd.primary
    assert {op for op in range(256) if eff.admin_supported(op)} == set(ctrl.admin_handlers)
    assert {op for op in range(256) if eff.io_supported(op)} == set(ctrl.io_handlers)
    assert eff.iocs[0x01] & 0x2  # Write changes logical block content
    fids = FidSupportedEffectsLog.decode(driver.get_log(0x12, 1024)).fids
    assert {f for f in range(256) if fids[f] & 1} == set(ctrl.features.specs)


def test_changed_namespace_list_clears_on_read_unless_rae(ssd, driver):
    ssd.primary.changed_namespaces = [3, 5]
    first = driver.get_log(0x04, 4096, rae=True)
    assert int.from_bytes(first[:4], "little") == 3
    second = driver.get_log(0x04, 4096)
    assert second == first
    assert driver.get_log(0x04, 4096) == bytes(4096)


def test_error_event_is_masked_until_error_log_is_read(ssd, driver):
    # two invalid doorbell writes: only one AER completes until the error log is read
    aer1 = driver.admin_q.submit(cmd.async_event_request())
    aer2 = driver.admin_q.submit(cmd.async_event_request())
    ssd.pf.bar0.write32(0x1000 + 8 * 9, 1)  # SQ 9 does not exist
    c1 = driver.admin_q.wait(aer1, 2.0)
    assert c1.dw0 & 0x7 == 0 and (c1.dw0 >> 16) & 0xFF == 0x01
    ssd.pf.bar0.write32(0x1000 + 8 * 9, 1)
    assert driver.admin_q.done.get(aer2) is None
    driver.admin_q.reap()
    assert aer2 not in driver.admin_q.done
    driver.get_log(0x01, 64)  # RAE=0 unmasks
    c2 = driver.admin_q.wait(aer2, 2.0)
    assert (c2.dw0 >> 8) & 0xFF == 0x00  # invalid doorbell register
