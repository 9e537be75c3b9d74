"""Log page structures against QEMU 7.2 data decoded by nvme-cli 2.3, plus spec-offset checks."""

from __future__ import annotations

import struct

import pytest

from nvme_lm.spec.logs import (
    FID_CDQSCP,
    FID_FSUPP,
    FID_UDCC,
    LID_IOS,
    LID_LSUPP,
    CmdEffect,
    CommandEffectsLog,
    ErrorLogEntry,
    FidSupportedEffectsLog,
    FirmwareSlotLog,
    LogId,
    SmartLog,
    SupportedLogPages,
    cmd_effect,
    decode_changed_ns_list,
    decode_error_log,
    encode_changed_ns_list,
    encode_error_log,
    fid_effect,
    lid_support,
)

from .fixtures import FieldTable, assert_matches, fixture_bytes, fixture_json, render, requires_fixtures

# --------------------------------------------------------------------------------------------- tables
ERROR_ENTRY_TABLE: FieldTable = {
    "error_count": "error_count",
    "sqid": "sqid",
    "cmdid": "cid",
    "status_field": "status_field",  # STATUS 15:1
    "phase_tag": "phase_tag",  # STATUS bit 0
    "parm_error_location": "pel",
    "lba": "lba",
    "nsid": "nsid",
    "vs": "vsia",
    "trtype": "trtype",
    "cs": "cs",
    "trtype_spec_info": "ttsi",
}
ERROR_LOG_TABLE: FieldTable = {"errors": lambda entries: [render(e, ERROR_ENTRY_TABLE) for e in entries]}

SMART_TABLE: FieldTable = {
    "critical_warning": "critical_warning",
    "temperature": "temperature",  # Kelvin
    "avail_spare": "avail_spare",
    "spare_thresh": "spare_thresh",
    "percent_used": "percent_used",
    "endurance_grp_critical_warning_summary": "endu_grp_crit_warn_sumry",
    # 128-bit counters are printed as decimal strings
    "data_units_read": lambda s: str(s.data_units_read),
    "data_units_written": lambda s: str(s.data_units_written),
    "host_read_commands": lambda s: str(s.host_read_commands),
    "host_write_commands": lambda s: str(s.host_write_commands),
    "controller_busy_time": lambda s: str(s.controller_busy_time),
    "power_cycles": lambda s: str(s.power_cycles),
    "power_on_hours": lambda s: str(s.power_on_hours),
    "unsafe_shutdowns": lambda s: str(s.unsafe_shutdowns),
    "media_errors": lambda s: str(s.media_errors),
    "num_err_log_entries": lambda s: str(s.num_err_log_entries),
    "warning_temp_time": "warning_temp_time",
    "critical_comp_time": "critical_comp_time",
    "thm_temp1_trans_count": "thm_temp1_trans_count",
    "thm_temp2_trans_count": "thm_temp2_trans_count",
    "thm_temp1_total_time": "thm_temp1_total_time",
    "thm_temp2_total_time": "thm_temp2_total_time",
}
# nvme-cli prints "temperature_sensor_N" only for non-zero sensors; all are zero here, see the test.


def _fw_slot_json(log: FirmwareSlotLog) -> dict[str, object]:
    """nvme-cli 2.3: AFI, then each non-empty slot as '<le64 of the 8 bytes> (<text, non-graphic as .>)'."""
    out: dict[str, object] = {"Active Firmware Slot (afi)": log.afi}
    for i, rev in enumerate(log.frs):
        if rev:
            raw = rev.ljust(8).encode("ascii")
            text = "".join(c if c.isprintable() and c != " " else "." for c in raw.decode())
            out[f"Firmware Rev Slot {i + 1}"] = f"{int.from_bytes(raw, 'little')} ({text})"
    return out


# --------------------------------------------------------------------------------------------- fixtures
@requires_fixtures
def test_error_log_matches_nvme_cli_and_round_trips() -> None:
    raw = fixture_bytes("log-01-error.bin")
    entries = decode_error_log(raw)
    assert len(entries) == 1  # ELPE = 0 in id-ctrl: one entry
    assert_matches(fixture_json("log-01-error.json"), entries, ERROR_LOG_TABLE, {}, "error-log")
    assert encode_error_log(entries) == raw


@requires_fixtures
def test_smart_log_matches_nvme_cli_and_round_trips() -> None:
    raw = fixture_bytes("log-02-smart.bin")
    smart = SmartLog.decode(raw)
    assert_matches(fixture_json("log-02-smart.json"), smart, SMART_TABLE, {}, "smart-log")
    assert smart.temperature_sensor == [0] * 8  # hence no temperature_sensor_N keys in the JSON
    assert smart.encode() == raw


@requires_fixtures
def test_fw_slot_log_matches_nvme_cli_and_round_trips() -> None:
    raw = fixture_bytes("log-03-fw.bin")
    fw = FirmwareSlotLog.decode(raw)
    printed = fixture_json("log-03-fw.json")
    assert list(printed) == ["nvme0"]  # keyed by the device name
    assert _fw_slot_json(fw) == printed["nvme0"]
    assert fw.frs == ["1.0", "", "", "", "", "", ""] and fw.active_slot == 1
    assert fw.encode() == raw


# QEMU 7.2's nvme_cse_acs / nvme_cse_iocs_nvm tables (hw/nvme/ctrl.c) for a controller with SR-IOV,
# as {opcode: effects}. There is no nvme-cli JSON for this log in the fixtures.
QEMU_ADMIN_EFFECTS = {
    0x00: CmdEffect.CSUPP,  # Delete I/O SQ
    0x01: CmdEffect.CSUPP,  # Create I/O SQ
    0x02: CmdEffect.CSUPP,  # Get Log Page
    0x04: CmdEffect.CSUPP,  # Delete I/O CQ
    0x05: CmdEffect.CSUPP,  # Create I/O CQ
    0x06: CmdEffect.CSUPP,  # Identify
    0x08: CmdEffect.CSUPP,  # Abort
    0x09: CmdEffect.CSUPP,  # Set Features
    0x0A: CmdEffect.CSUPP,  # Get Features
    0x0C: CmdEffect.CSUPP,  # Asynchronous Event Request
    0x15: CmdEffect.CSUPP | CmdEffect.NIC,  # Namespace Attachment
    0x1C: CmdEffect.CSUPP,  # Virtualization Management (although OACS.VMS is clear, see test_identify)
    0x7C: CmdEffect.CSUPP,  # Doorbell Buffer Config
    0x80: CmdEffect.CSUPP | CmdEffect.LBCC,  # Format NVM
}
QEMU_IO_EFFECTS = {
    0x00: CmdEffect.CSUPP | CmdEffect.LBCC,  # Flush
    0x01: CmdEffect.CSUPP | CmdEffect.LBCC,  # Write
    0x02: CmdEffect.CSUPP,  # Read
    0x05: CmdEffect.CSUPP,  # Compare
    0x08: CmdEffect.CSUPP | CmdEffect.LBCC,  # Write Zeroes
    0x09: CmdEffect.CSUPP | CmdEffect.LBCC,  # Dataset Management
    0x0C: CmdEffect.CSUPP,  # Verify
    0x19: CmdEffect.CSUPP | CmdEffect.LBCC,  # Copy
}


@requires_fixtures
def test_cmd_effects_log_matches_qemu_and_round_trips() -> None:
    raw = fixture_bytes("log-05-effects.bin")
    log = CommandEffectsLog.decode(raw)
    assert {op: v for op, v in enumerate(log.acs) if v} == QEMU_ADMIN_EFFECTS
    assert {op: v for op, v in enumerate(log.iocs) if v} == QEMU_IO_EFFECTS
    assert log.admin_supported(0x06) and not log.admin_supported(0x03) and log.io_supported(0x02)
    assert log.encode() == raw


# --------------------------------------------------------------------------------------------- layouts
def test_error_entry_layout() -> None:
    e = ErrorLogEntry(error_count=7, sqid=1, cid=0x1234, status=(0x0B << 1) | 1, pel=0x0204, lba=99, nsid=1,
                      vsia=0xC0, trtype=3, csi=0, opc=0x02, cs=0x55, ttsi=0x66, log_page_version=1)
    b = e.encode()
    assert struct.unpack("<QHHHHQIBBBBQH21xB", b) == (7, 1, 0x1234, 0x17, 0x0204, 99, 1, 0xC0, 3, 0, 2, 0x55,
                                                      0x66, 1)
    assert (e.phase_tag, e.status_field) == (1, 0x0B)
    assert decode_error_log(b * 3) == [e] * 3
    with pytest.raises(ValueError, match="multiple of 64"):
        decode_error_log(b + b"\0")


def test_smart_log_layout() -> None:
    s = SmartLog(critical_warning=1, temperature=0x0102, avail_spare=3, spare_thresh=4, percent_used=5,
                 endu_grp_crit_warn_sumry=6, data_units_read=2**100, data_units_written=8, host_read_commands=9,
                 host_write_commands=10, controller_busy_time=11, power_cycles=12, power_on_hours=13,
                 unsafe_shutdowns=14, media_errors=15, num_err_log_entries=16, warning_temp_time=17,
                 critical_comp_time=18, temperature_sensor=[300 + i for i in range(8)], thm_temp1_trans_count=19,
                 thm_temp2_trans_count=20, thm_temp1_total_time=21, thm_temp2_total_time=22)
    b = s.encode()
    assert struct.unpack_from("<BHBBBB", b, 0) == (1, 0x0102, 3, 4, 5, 6)
    assert int.from_bytes(b[32:48], "little") == 2**100
    assert [int.from_bytes(b[o : o + 16], "little") for o in range(48, 192, 16)] == list(range(8, 17))
    assert struct.unpack_from("<II8HIIII", b, 192) == (17, 18, *range(300, 308), 19, 20, 21, 22)
    assert SmartLog.decode(b) == s


def test_fw_slot_layout() -> None:
    fw = FirmwareSlotLog(afi=0x21, frs=["A", "", "", "", "", "", "SEVEN-7"])
    b = fw.encode()
    assert b[8:16] == b"A       " and b[16:56] == bytes(40) and b[56:64] == b"SEVEN-7 "
    assert (fw.active_slot, fw.next_slot) == (1, 2)
    assert FirmwareSlotLog.decode(b) == fw


def test_supported_log_pages() -> None:
    assert lid_support() == LID_LSUPP and lid_support(ios=True, lidsp=0xABCD) == 0xABCD0003
    log = SupportedLogPages(lids=[lid_support()] * 6)
    b = log.encode()
    assert len(b) == 1024 and struct.unpack_from("<7I", b) == (1, 1, 1, 1, 1, 1, 0)
    assert LID_IOS == 2
    with pytest.raises(ValueError):
        lid_support(lidsp=1 << 16)


def test_cmd_effect_fields() -> None:
    v = cmd_effect(CmdEffect.CSUPP | CmdEffect.CCC | CmdEffect.USS, cse=2, scope=0x801, cser=1)
    assert v == 0x1 | 0x10 | (1 << 19) | (1 << 14) | (2 << 16) | (0x801 << 20)
    log = CommandEffectsLog(acs=[0] * 0x41 + [v])
    b = log.encode()
    assert struct.unpack_from("<I", b, 0x41 * 4)[0] == v and len(b) == 4096
    with pytest.raises(ValueError):
        cmd_effect(cse=8)


def test_fid_effects_log() -> None:
    v = fid_effect(FID_FSUPP | FID_UDCC, scope=1 << 6)
    assert v & FID_CDQSCP  # scope bit 6 is dword bit 26
    b = FidSupportedEffectsLog(fids=[0] * 0x21 + [v]).encode()
    assert len(b) == 1024 and struct.unpack_from("<I", b, 0x21 * 4)[0] == v
    with pytest.raises(ValueError):
        fid_effect(scope=1 << 12)


def test_changed_ns_list() -> None:
    assert decode_changed_ns_list(encode_changed_ns_list([3, 1])) == [3, 1]
    assert decode_changed_ns_list(encode_changed_ns_list(list(range(1, 2000)))) == [0xFFFFFFFF]


def test_log_ids() -> None:
    assert (LogId.ERROR, LogId.SMART, LogId.FW_SLOT, LogId.CHANGED_NS, LogId.CMD_EFFECTS) == (1, 2, 3, 4, 5)
    assert (LogId.FID_SUPPORTED_EFFECTS, LogId.RESERVATION, LogId.SANITIZE) == (0x12, 0x80, 0x81)
