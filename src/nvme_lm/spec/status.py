"""NVMe status codes: (SCT, SC) pairs with names, and the 15-bit status field of a CQE.

A handler returns a `Status`; the controller packs it into the CQE. Keeping the pairs here
means every refusal in the device names a code from the specification, not an ad-hoc number.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple


class SCT(IntEnum):
    GENERIC = 0
    COMMAND_SPECIFIC = 1
    MEDIA = 2
    PATH = 3
    VENDOR = 7


class Status(NamedTuple):
    sct: int
    sc: int
    dnr: bool = True

    @property
    def ok(self) -> bool:
        return self.sct == 0 and self.sc == 0

    @property
    def field(self) -> int:
        """CQE DW3 bits 31:17 as a 15-bit value (SC 7:0, SCT 10:8, CRD 12:11, M 13, DNR 14)."""
        return (self.sc & 0xFF) | ((self.sct & 0x7) << 8) | (int(self.dnr) << 14)

    @classmethod
    def from_field(cls, field: int) -> Status:
        return cls((field >> 8) & 0x7, field & 0xFF, bool(field & (1 << 14)))

    @property
    def name(self) -> str:
        return status_name(self.sct, self.sc)

    def __str__(self) -> str:
        return f"{self.name} (SCT {self.sct:x}h SC {self.sc:02x}h)"


def _g(sc: int) -> Status:
    return Status(SCT.GENERIC, sc)


def _c(sc: int) -> Status:
    return Status(SCT.COMMAND_SPECIFIC, sc)


SUCCESS = Status(0, 0, False)

# Generic command status (SCT 0)
INVALID_OPCODE = _g(0x01)
INVALID_FIELD = _g(0x02)
CID_CONFLICT = _g(0x03)
DATA_TRANSFER_ERROR = _g(0x04)
POWER_LOSS_ABORT = _g(0x05)
INTERNAL_ERROR = _g(0x06)
ABORT_REQUESTED = _g(0x07)
ABORTED_SQ_DELETION = _g(0x08)
FUSED_FAILED = _g(0x09)
FUSED_MISSING = _g(0x0A)
INVALID_NAMESPACE = _g(0x0B)
COMMAND_SEQUENCE_ERROR = _g(0x0C)
INVALID_SGL_DESCRIPTOR = _g(0x0D)
INVALID_SGL_COUNT = _g(0x0E)
DATA_SGL_LENGTH_INVALID = _g(0x0F)
INVALID_USE_OF_CMB = _g(0x12)
PRP_OFFSET_INVALID = _g(0x13)
OPERATION_DENIED = _g(0x15)
SGL_OFFSET_INVALID = _g(0x16)
HOST_ID_INCONSISTENT = _g(0x18)
KEEP_ALIVE_EXPIRED = _g(0x19)
KEEP_ALIVE_INVALID = _g(0x1A)
NS_WRITE_PROTECTED = _g(0x20)
COMMAND_INTERRUPTED = _g(0x21)
TRANSIENT_TRANSPORT_ERROR = _g(0x22)
LBA_OUT_OF_RANGE = _g(0x80)
CAPACITY_EXCEEDED = _g(0x81)
NS_NOT_READY = _g(0x82)
RESERVATION_CONFLICT = _g(0x83)
FORMAT_IN_PROGRESS = _g(0x84)

# Command specific status (SCT 1)
INVALID_CQ = _c(0x00)
INVALID_QID = _c(0x01)
INVALID_QUEUE_SIZE = _c(0x02)
ABORT_LIMIT_EXCEEDED = _c(0x03)
AER_LIMIT_EXCEEDED = _c(0x05)
INVALID_FIRMWARE_SLOT = _c(0x06)
INVALID_FIRMWARE_IMAGE = _c(0x07)
INVALID_INTERRUPT_VECTOR = _c(0x08)
INVALID_LOG_PAGE = _c(0x09)
INVALID_FORMAT = _c(0x0A)
INVALID_QUEUE_DELETION = _c(0x0C)
FEATURE_NOT_SAVEABLE = _c(0x0D)
FEATURE_NOT_CHANGEABLE = _c(0x0E)
FEATURE_NOT_NS_SPECIFIC = _c(0x0F)
NS_INSUFFICIENT_CAPACITY = _c(0x15)
NSID_UNAVAILABLE = _c(0x16)
NS_ALREADY_ATTACHED = _c(0x18)
NS_IS_PRIVATE = _c(0x19)
NS_NOT_ATTACHED = _c(0x1A)
THIN_PROVISIONING_NOT_SUPPORTED = _c(0x1B)
CONTROLLER_LIST_INVALID = _c(0x1C)
INVALID_CONTROLLER_IDENTIFIER = _c(0x1F)
INVALID_SECONDARY_CONTROLLER_STATE = _c(0x20)
INVALID_NUMBER_OF_CONTROLLER_RESOURCES = _c(0x21)
INVALID_RESOURCE_IDENTIFIER = _c(0x22)
ANA_ATTACH_FAILED = _c(0x25)
IO_CMD_SET_NOT_SUPPORTED = _c(0x29)
IO_CMD_SET_NOT_ENABLED = _c(0x2A)
IO_CMD_SET_COMBINATION_REJECTED = _c(0x2B)
INVALID_IO_CMD_SET = _c(0x2C)
# Exported NVM subsystems (Base 2.4, TP4193; spec notes §17.2)
INVALID_HOST = _c(0x35)
INVALID_NVM_SUBSYSTEM = _c(0x36)
# Live migration (TP4159; spec notes §13)
INVALID_CDQ = _c(0x37)
NOT_ENOUGH_RESOURCES = _c(0x38)
CONTROLLER_SUSPENDED = _c(0x39)
CONTROLLER_NOT_SUSPENDED = _c(0x3A)
CDQ_FULL = _c(0x3B)
CONTROLLER_ACTIVE = _c(0x42)
INVALID_EXPORTED_ASSOCIATION = _c(0x43)
INVALID_EXPORTED_CONFIGURATION_STATE = _c(0x44)
# NVM command set specific (SCT 1, I/O commands)
CONFLICTING_ATTRIBUTES = _c(0x80)
INVALID_PROTECTION_INFORMATION = _c(0x81)
ATTEMPTED_WRITE_TO_READ_ONLY_RANGE = _c(0x82)

# Media and data integrity errors (SCT 2)
WRITE_FAULT = Status(SCT.MEDIA, 0x80)
UNRECOVERED_READ_ERROR = Status(SCT.MEDIA, 0x81)
COMPARE_FAILURE = Status(SCT.MEDIA, 0x85)
DEALLOCATED_OR_UNWRITTEN = Status(SCT.MEDIA, 0x87)

_GENERIC_NAMES = {
    0x00: "Successful Completion", 0x01: "Invalid Command Opcode", 0x02: "Invalid Field in Command",
    0x03: "Command ID Conflict", 0x04: "Data Transfer Error", 0x05: "Commands Aborted due to Power Loss",
    0x06: "Internal Error", 0x07: "Command Abort Requested", 0x08: "Command Aborted due to SQ Deletion",
    0x09: "Command Aborted due to Failed Fused Command", 0x0A: "Command Aborted due to Missing Fused Command",
    0x0B: "Invalid Namespace or Format", 0x0C: "Command Sequence Error", 0x0D: "Invalid SGL Segment Descriptor",
    0x0E: "Invalid Number of SGL Descriptors", 0x0F: "Data SGL Length Invalid",
    0x12: "Invalid Use of Controller Memory Buffer", 0x13: "PRP Offset Invalid", 0x15: "Operation Denied",
    0x16: "SGL Offset Invalid", 0x18: "Host Identifier Inconsistent Format", 0x19: "Keep Alive Timer Expired",
    0x1A: "Keep Alive Timeout Invalid", 0x20: "Namespace is Write Protected", 0x21: "Command Interrupted",
    0x22: "Transient Transport Error", 0x80: "LBA Out of Range", 0x81: "Capacity Exceeded",
    0x82: "Namespace Not Ready", 0x83: "Reservation Conflict", 0x84: "Format In Progress",
}
_SPECIFIC_NAMES = {
    0x00: "Completion Queue Invalid", 0x01: "Invalid Queue Identifier", 0x02: "Invalid Queue Size",
    0x03: "Abort Command Limit Exceeded", 0x05: "Asynchronous Event Request Limit Exceeded",
    0x06: "Invalid Firmware Slot", 0x07: "Invalid Firmware Image", 0x08: "Invalid Interrupt Vector",
    0x09: "Invalid Log Page", 0x0A: "Invalid Format", 0x0C: "Invalid Queue Deletion",
    0x0D: "Feature Identifier Not Saveable", 0x0E: "Feature Not Changeable", 0x0F: "Feature Not Namespace Specific",
    0x15: "Namespace Insufficient Capacity", 0x16: "Namespace Identifier Unavailable",
    0x18: "Namespace Already Attached", 0x19: "Namespace Is Private", 0x1A: "Namespace Not Attached",
    0x1B: "Thin Provisioning Not Supported", 0x1C: "Controller List Invalid",
    0x1F: "Invalid Controller Identifier", 0x20: "Invalid Secondary Controller State",
    0x21: "Invalid Number of Controller Resources", 0x22: "Invalid Resource Identifier",
    0x25: "ANA Attach Failed", 0x29: "I/O Command Set Not Supported", 0x2A: "I/O Command Set Not Enabled",
    0x2B: "I/O Command Set Combination Rejected", 0x2C: "Invalid I/O Command Set",
    0x35: "Invalid Host", 0x36: "Invalid NVM Subsystem", 0x37: "Invalid Controller Data Queue",
    0x38: "Not Enough Resources", 0x39: "Controller Suspended", 0x3A: "Controller Not Suspended",
    0x3B: "Controller Data Queue Full", 0x42: "Controller Active",
    0x43: "Invalid Exported Association", 0x44: "Invalid Exported Configuration State",
    0x80: "Conflicting Attributes", 0x81: "Invalid Protection Information",
    0x82: "Attempted Write to Read Only Range",
}
_MEDIA_NAMES = {
    0x80: "Write Fault", 0x81: "Unrecovered Read Error", 0x85: "Compare Failure", 0x86: "Access Denied",
    0x87: "Deallocated or Unwritten Logical Block",
}
_BY_SCT = {SCT.GENERIC: _GENERIC_NAMES, SCT.COMMAND_SPECIFIC: _SPECIFIC_NAMES, SCT.MEDIA: _MEDIA_NAMES}


def status_name(sct: int, sc: int) -> str:
    names = _BY_SCT.get(sct, {})  # type: ignore[call-overload]
    return names.get(sc, f"Unknown status (SCT {sct:x}h SC {sc:02x}h)")
