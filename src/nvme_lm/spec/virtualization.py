"""Virtualization Management (admin 1Ch) command dwords: wire format only.

NVMe Base §8.2.6 / spec notes §18: CDW10 bits 3:0 ACT, 10:8 RT, 31:16 CNTLID; CDW11 bits 15:0 NR.
Completion DW0 carries the number of controller resources the action modified.
Both the device (to decode) and the host driver (to encode) use this, so neither hard-codes bits.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum

__all__ = ["ResourceType", "VirtAction", "VirtMgmt"]


class VirtAction(IntEnum):
    """CDW10.ACT."""

    PRIMARY_FLEXIBLE_ALLOCATION = 0x1
    SECONDARY_OFFLINE = 0x7
    SECONDARY_ASSIGN = 0x8
    SECONDARY_ONLINE = 0x9


class ResourceType(IntEnum):
    """CDW10.RT: VQ = one SQ + CQ pair (id = queue id), VI = one MSI-X vector (id = vector)."""

    VQ = 0x0
    VI = 0x1


@dataclass(frozen=True, slots=True)
class VirtMgmt:
    """The command-specific dwords of one Virtualization Management command (raw values, not validated)."""

    act: int
    rt: int = 0
    cntlid: int = 0
    nr: int = 0

    def encode(self) -> tuple[int, int]:
        """(CDW10, CDW11)."""
        return (self.act & 0xF) | (self.rt & 0x7) << 8 | (self.cntlid & 0xFFFF) << 16, self.nr & 0xFFFF

    @classmethod
    def decode(cls, cdw10: int, cdw11: int) -> VirtMgmt:
        return cls(act=cdw10 & 0xF, rt=(cdw10 >> 8) & 0x7, cntlid=cdw10 >> 16 & 0xFFFF, nr=cdw11 & 0xFFFF)
