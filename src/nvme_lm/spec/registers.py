"""Controller properties (BAR0 registers) of NVMe over PCIe: offsets and bit fields.

Plain helpers that pack and unpack the register values; the device and the host driver
both use them so that neither hard-codes bit positions.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum


class Reg(IntEnum):
    CAP = 0x00
    VS = 0x08
    INTMS = 0x0C
    INTMC = 0x10
    CC = 0x14
    CSTS = 0x1C
    NSSR = 0x20
    AQA = 0x24
    ASQ = 0x28
    ACQ = 0x30
    CMBLOC = 0x38
    CMBSZ = 0x3C
    BPINFO = 0x40
    CRTO = 0x68


DOORBELL_BASE = 0x1000
NSSR_MAGIC = 0x4E564D65  # "NVMe"
VS_2_1 = 0x00020100


def sq_tail_doorbell(qid: int, dstrd: int) -> int:
    return DOORBELL_BASE + (2 * qid) * (4 << dstrd)


def cq_head_doorbell(qid: int, dstrd: int) -> int:
    return DOORBELL_BASE + (2 * qid + 1) * (4 << dstrd)


@dataclass(frozen=True, slots=True)
class Cap:
    """CAP (offset 00h). MQES is 0's based; TO in 500 ms units; page size = 2^(12+MPS)."""

    mqes: int = 1023
    cqr: bool = True
    ams: int = 0
    to: int = 20
    dstrd: int = 0
    nssrs: bool = False
    css: int = 0x41  # bit0 NVM, bit6 "one or more I/O command sets"
    mpsmin: int = 0
    mpsmax: int = 4
    cmbs: bool = False

    def encode(self) -> int:
        return (
            (self.mqes & 0xFFFF)
            | (int(self.cqr) << 16)
            | ((self.ams & 0x3) << 17)
            | ((self.to & 0xFF) << 24)
            | ((self.dstrd & 0xF) << 32)
            | (int(self.nssrs) << 36)
            | ((self.css & 0xFF) << 37)
            | ((self.mpsmin & 0xF) << 48)
            | ((self.mpsmax & 0xF) << 52)
            | (int(self.cmbs) << 57)
        )

    @classmethod
    def decode(cls, v: int) -> Cap:
        return cls(
            mqes=v & 0xFFFF, cqr=bool(v >> 16 & 1), ams=v >> 17 & 0x3, to=v >> 24 & 0xFF, dstrd=v >> 32 & 0xF,
            nssrs=bool(v >> 36 & 1), css=v >> 37 & 0xFF, mpsmin=v >> 48 & 0xF, mpsmax=v >> 52 & 0xF,
            cmbs=bool(v >> 57 & 1),
        )


class CC:
    """CC (offset 14h) bit fields."""

    EN = 1 << 0

    @staticmethod
    def css(v: int) -> int:
        return v >> 4 & 0x7

    @staticmethod
    def mps(v: int) -> int:
        return v >> 7 & 0xF

    @staticmethod
    def ams(v: int) -> int:
        return v >> 11 & 0x7

    @staticmethod
    def shn(v: int) -> int:
        return v >> 14 & 0x3

    @staticmethod
    def iosqes(v: int) -> int:
        return v >> 16 & 0xF

    @staticmethod
    def iocqes(v: int) -> int:
        return v >> 20 & 0xF

    @staticmethod
    def make(en: bool = True, css: int = 0, mps: int = 0, ams: int = 0, shn: int = 0,
             iosqes: int = 6, iocqes: int = 4) -> int:
        return (int(en) | (css & 7) << 4 | (mps & 0xF) << 7 | (ams & 7) << 11 | (shn & 3) << 14
                | (iosqes & 0xF) << 16 | (iocqes & 0xF) << 20)


def cc_enable_problem(cc: int, cap: Cap) -> str | None:
    """Why a controller with `cap` cannot enable with CC = `cc` (page size, command set, arbitration), or None.
    The rules every controller shares; each adds its own (admin queues for PCIe, entry sizes for fabrics)."""
    mps, css, ams = CC.mps(cc), CC.css(cc), CC.ams(cc)
    if not cap.mpsmin <= mps <= cap.mpsmax:
        return f"CC.MPS {mps} outside CAP.MPSMIN..MPSMAX"
    if not (css == 0 and cap.css & 0x01) and not (css == 6 and cap.css & 0x40):
        return f"CC.CSS {css} not supported by CAP.CSS {cap.css:#x}"
    if ams != 0 and not cap.ams & (1 << (ams - 1)):
        return f"CC.AMS {ams} not supported"
    return None


class Shn(IntEnum):
    NONE = 0
    NORMAL = 1
    ABRUPT = 2


class CSTS:
    """CSTS (offset 1Ch) bit fields."""

    RDY = 1 << 0
    CFS = 1 << 1
    SHST_MASK = 0x3 << 2
    SHST_NORMAL = 0 << 2
    SHST_OCCURRING = 1 << 2
    SHST_COMPLETE = 2 << 2
    NSSRO = 1 << 4
    PP = 1 << 5

    @staticmethod
    def shst(v: int) -> int:
        return v >> 2 & 0x3


def aqa(asqs: int, acqs: int) -> int:
    """AQA from 0's based admin SQ and CQ sizes."""
    return (asqs & 0xFFF) | (acqs & 0xFFF) << 16


def aqa_decode(v: int) -> tuple[int, int]:
    return v & 0xFFF, v >> 16 & 0xFFF
