"""Log pages (Get Log Page, admin opcode 02h): identifiers and wire formats, no behaviour.

Offsets follow NVMe Base 2.1 (spec notes §20.9) cross-checked against libnvme's ``struct nvme_smart_log``,
``nvme_error_log_page`` and ``nvme_firmware_slot``.
"""

from __future__ import annotations

from collections.abc import Sequence
from enum import IntEnum, IntFlag

from .identify import decode_nsid_list, encode_nsid_list
from .layout import Ascii, Layout, array, bit, bits, layout, u8, u16, u32, u64, u128

__all__ = [
    "CMD_EFFECTS_SIZE",
    "CSER_MASK",
    "CSER_SHIFT",
    "CSE_MASK",
    "CSE_SHIFT",
    "ERROR_LOG_ENTRY_SIZE",
    "FID_CCC",
    "FID_CDQSCP",
    "FID_FSUPP",
    "FID_NCC",
    "FID_NIC",
    "FID_UDCC",
    "FID_USS",
    "LIDSP_SHIFT",
    "LID_IOS",
    "LID_LSUPP",
    "SCOPE_MASK",
    "SCOPE_SHIFT",
    "CmdEffect",
    "CommandEffectsLog",
    "ErrorLogEntry",
    "FidSupportedEffectsLog",
    "FirmwareSlotLog",
    "LogId",
    "SmartLog",
    "SupportedLogPages",
    "cmd_effect",
    "decode_changed_ns_list",
    "decode_error_log",
    "encode_changed_ns_list",
    "encode_error_log",
    "fid_effect",
    "lid_support",
]


class LogId(IntEnum):
    """Log Page Identifiers (spec notes §20.9)."""

    SUPPORTED_LOG_PAGES = 0x00
    ERROR = 0x01
    SMART = 0x02
    FW_SLOT = 0x03
    CHANGED_NS = 0x04
    CMD_EFFECTS = 0x05
    DEVICE_SELF_TEST = 0x06
    TELEMETRY_HOST = 0x07
    TELEMETRY_CTRL = 0x08
    ENDURANCE_GROUP = 0x09
    PREDICTABLE_LAT_NVMSET = 0x0A
    PREDICTABLE_LAT_AGG = 0x0B
    ANA = 0x0C
    PERSISTENT_EVENT = 0x0D
    LBA_STATUS = 0x0E
    ENDURANCE_GROUP_EVENT = 0x0F
    MEDIA_UNIT_STATUS = 0x10
    SUPPORTED_CAP_CONFIG_LIST = 0x11
    FID_SUPPORTED_EFFECTS = 0x12
    MI_CMD_SUPPORTED_EFFECTS = 0x13
    CMD_AND_FEAT_LOCKDOWN = 0x14
    BOOT_PARTITION = 0x15
    ROTATIONAL_MEDIA_INFO = 0x16
    DISPERSED_NS_PARTICIPATING_NSS = 0x17
    MGMT_ADDR_LIST = 0x18
    PHY_RX_EOM = 0x19
    REACHABILITY_GROUPS = 0x1A
    REACHABILITY_ASSOCIATIONS = 0x1B
    CHANGED_ALLOC_NS = 0x1C
    LOST_HOST_COMMUNICATION = 0x1F
    FDP_CONFIGS = 0x20
    FDP_RUH_USAGE = 0x21
    FDP_STATS = 0x22
    FDP_EVENTS = 0x23
    POWER_MEASUREMENT = 0x25
    VOLTAGE = 0x27
    RATE_LIMITING = 0x28  # Base 2.4 draft (TP4176)
    DISCOVERY = 0x70
    HOST_DISCOVERY = 0x71
    AVE_DISCOVERY = 0x72
    PULL_MODEL_DDC_REQ = 0x73
    RESERVATION = 0x80
    SANITIZE = 0x81


# --------------------------------------------------------------------------------------------- 00h
LID_LSUPP = 1 << 0  # LID supported
LID_IOS = 1 << 1  # index offset supported
LIDSP_SHIFT = 16  # 31:16 LID specific parameter


def lid_support(lsupp: bool = True, ios: bool = False, lidsp: int = 0) -> int:
    """One Supported Log Pages dword."""
    if not 0 <= lidsp <= 0xFFFF:
        raise ValueError(f"LIDSP {lidsp:#x} does not fit in 16 bits")
    return (LID_LSUPP if lsupp else 0) | (LID_IOS if ios else 0) | (lidsp << LIDSP_SHIFT)


@layout(size=1024)
class SupportedLogPages(Layout):
    """Supported Log Pages (LID 00h): one dword per LID."""

    lids: list[int] = array(0, u32, 256)


# --------------------------------------------------------------------------------------------- 01h
ERROR_LOG_ENTRY_SIZE = 64


@layout(size=ERROR_LOG_ENTRY_SIZE)
class ErrorLogEntry(Layout):
    """Error Information log entry (LID 01h returns ELPE+1 of these, newest first)."""

    error_count: int = u64(0)  # 0 = invalid (unused) entry
    sqid: int = u16(8)
    cid: int = u16(10)
    status: int = u16(12)  # bit 0 phase tag, 15:1 status field (as in CQE DW3 31:16)
    pel: int = u16(14)  # parameter error location: 7:0 byte, 10:8 bit
    lba: int = u64(16)
    nsid: int = u32(24)
    vsia: int = u8(28)  # vendor specific information available (a log page id)
    trtype: int = u8(29)
    csi: int = u8(30)
    opc: int = u8(31)
    cs: int = u64(32)  # command specific information
    ttsi: int = u16(40)  # transport type specific information
    log_page_version: int = u8(63)  # 1h: csi and opc are valid

    @property
    def phase_tag(self) -> int:
        return bits(self.status, 0)

    @property
    def status_field(self) -> int:
        """Status field without the phase tag (bits 15:1)."""
        return bits(self.status, 1, 15)


def decode_error_log(buf: bytes | bytearray | memoryview) -> list[ErrorLogEntry]:
    """All complete 64-byte entries in ``buf``."""
    if len(buf) % ERROR_LOG_ENTRY_SIZE:
        raise ValueError(f"error log length {len(buf)} is not a multiple of {ERROR_LOG_ENTRY_SIZE}")
    return [ErrorLogEntry.decode(buf, off) for off in range(0, len(buf), ERROR_LOG_ENTRY_SIZE)]


def encode_error_log(entries: Sequence[ErrorLogEntry]) -> bytes:
    return b"".join(e.encode() for e in entries)


# --------------------------------------------------------------------------------------------- 02h
@layout(size=512)
class SmartLog(Layout):
    """SMART / Health Information (LID 02h). Temperatures are in Kelvin."""

    critical_warning: int = u8(0)
    temperature: int = u16(1)
    avail_spare: int = u8(3)
    spare_thresh: int = u8(4)
    percent_used: int = u8(5)
    endu_grp_crit_warn_sumry: int = u8(6)
    informative_warning: int = u8(7)
    data_units_read: int = u128(32)  # thousands of 512-byte units, rounded up
    data_units_written: int = u128(48)
    host_read_commands: int = u128(64)
    host_write_commands: int = u128(80)
    controller_busy_time: int = u128(96)  # minutes
    power_cycles: int = u128(112)
    power_on_hours: int = u128(128)
    unsafe_shutdowns: int = u128(144)
    media_errors: int = u128(160)
    num_err_log_entries: int = u128(176)
    warning_temp_time: int = u32(192)
    critical_comp_time: int = u32(196)
    temperature_sensor: list[int] = array(200, u16, 8)
    thm_temp1_trans_count: int = u32(216)
    thm_temp2_trans_count: int = u32(220)
    thm_temp1_total_time: int = u32(224)
    thm_temp2_total_time: int = u32(228)
    op_lifetime_energy_consumed: int = u64(232)
    interval_power_measurement: int = u32(240)


# --------------------------------------------------------------------------------------------- 03h
@layout(size=512)
class FirmwareSlotLog(Layout):
    """Firmware Slot Information (LID 03h): active slot and the revision in each of 7 slots."""

    afi: int = u8(0)  # 2:0 active slot, 6:4 slot activated at next reset
    frs: list[str] = array(8, Ascii(8), 7)  # "" = empty slot

    @property
    def active_slot(self) -> int:
        return bits(self.afi, 0, 2)

    @property
    def next_slot(self) -> int:
        return bits(self.afi, 4, 6)


# --------------------------------------------------------------------------------------------- 04h
def encode_changed_ns_list(nsids: Sequence[int]) -> bytes:
    """Changed Namespace List (LID 04h). More than 1024 changes is reported as [0xFFFFFFFF]."""
    return encode_nsid_list([0xFFFFFFFF] if len(nsids) > 1024 else nsids)


def decode_changed_ns_list(buf: bytes | bytearray | memoryview) -> list[int]:
    return decode_nsid_list(buf)


# --------------------------------------------------------------------------------------------- 05h
CMD_EFFECTS_SIZE = 4096


class CmdEffect(IntFlag):
    """Commands Supported and Effects dword bits (LID 05h)."""

    CSUPP = 1 << 0  # command supported
    LBCC = 1 << 1  # logical block content change
    NCC = 1 << 2  # namespace capability change
    NIC = 1 << 3  # namespace inventory change
    CCC = 1 << 4  # controller capability change
    USS = 1 << 19  # UUID selection supported


CSER_SHIFT, CSER_MASK = 14, 0x3  # 15:14 command submission and execution relaxations
CSE_SHIFT, CSE_MASK = 16, 0x7  # 18:16 command submission and execution
SCOPE_SHIFT, SCOPE_MASK = 20, 0xFFF  # 31:20 scope


def cmd_effect(flags: int = CmdEffect.CSUPP, cse: int = 0, scope: int = 0, cser: int = 0) -> int:
    """One Commands Supported and Effects dword."""
    if not (0 <= cse <= CSE_MASK and 0 <= scope <= SCOPE_MASK and 0 <= cser <= CSER_MASK):
        raise ValueError("cse, scope or cser out of range")
    return int(flags) | (cser << CSER_SHIFT) | (cse << CSE_SHIFT) | (scope << SCOPE_SHIFT)


@layout(size=CMD_EFFECTS_SIZE)
class CommandEffectsLog(Layout):
    """Commands Supported and Effects (LID 05h): a dword per admin opcode, then per I/O opcode."""

    acs: list[int] = array(0, u32, 256)
    iocs: list[int] = array(1024, u32, 256)

    def admin_supported(self, opcode: int) -> bool:
        return bit(self.acs[opcode], 0)

    def io_supported(self, opcode: int) -> bool:
        return bit(self.iocs[opcode], 0)


# --------------------------------------------------------------------------------------------- 12h
FID_FSUPP = 1 << 0  # FID supported
FID_UDCC = 1 << 1  # user data content change
FID_NCC = 1 << 2  # namespace capability change
FID_NIC = 1 << 3  # namespace inventory change
FID_CCC = 1 << 4  # controller capability change
FID_USS = 1 << 19  # UUID selection supported
FID_CDQSCP = 1 << 26  # scope bit 6: FID scoped per Controller Data Queue (TP4159)


def fid_effect(flags: int = FID_FSUPP, scope: int = 0) -> int:
    """One FID Supported and Effects dword; ``scope`` is the 12-bit field at 31:20."""
    if not 0 <= scope <= SCOPE_MASK:
        raise ValueError(f"scope {scope:#x} does not fit in 12 bits")
    return int(flags) | (scope << SCOPE_SHIFT)


@layout(size=1024)
class FidSupportedEffectsLog(Layout):
    """Feature Identifiers Supported and Effects (LID 12h): a dword per FID."""

    fids: list[int] = array(0, u32, 256)
