"""Host side of TP4159 controller migration (spec notes §9-12): Migration Send / Receive builders,
CNS 20h parser, and the get/set-state loops a migration host runs on the PF (the MMC).

The dwords follow libvfn's `examples/migrate.c` (spec notes §12.2): CNTLID in CDW11[15:0], CSVI in
CDW10[23:16] for Get and CDW11[23:16] for Set, NUMDL 0's based for Get, NUMD 1's based for Set.
"""

from __future__ import annotations

import struct
import uuid
from dataclasses import dataclass

from nvme_lm.host.driver import NvmeDriver
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.controller_state import HEADER_SIZE, ControllerState, NvmeState
from nvme_lm.spec.identify import CNS
from nvme_lm.spec.opcodes import AdminOpcode

SEL_SUSPEND, SEL_RESUME, SEL_SET_STATE = 0, 1, 2
STYPE_NOTIFICATION, STYPE_SUSPEND = 0, 1
SEQ_MIDDLE, SEQ_FIRST, SEQ_LAST, SEQ_ONLY = 0b00, 0b01, 0b10, 0b11


# ----------------------------------------------------------------------------- builders
def suspend(cntlid: int, *, stype: int = STYPE_SUSPEND, dudmq: bool = False) -> SQE:
    return SQE(opcode=AdminOpcode.MIGRATION_SEND, cdw10=SEL_SUSPEND,
               cdw11=int(dudmq) << 31 | (stype & 0xFF) << 16 | cntlid & 0xFFFF)


def resume(cntlid: int) -> SQE:
    return SQE(opcode=AdminOpcode.MIGRATION_SEND, cdw10=SEL_RESUME, cdw11=cntlid & 0xFFFF)


def set_state(cntlid: int, nbytes: int, *, seqind: int = SEQ_ONLY, offset: int = 0, csvi: int = 1,
              csuuidi: int = 1) -> SQE:
    """Set Controller State segment of `nbytes` (a dword multiple) at `offset`."""
    return SQE(opcode=AdminOpcode.MIGRATION_SEND, cdw10=(seqind & 3) << 16 | SEL_SET_STATE,
               cdw11=(csuuidi & 0xFF) << 24 | (csvi & 0xFF) << 16 | cntlid & 0xFFFF,
               cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32, cdw15=nbytes // 4)


def get_state(cntlid: int, nbytes: int, *, offset: int = 0, csvi: int = 1, csuuidi: int = 1, csuidxp: int = 0) -> SQE:
    return SQE(opcode=AdminOpcode.MIGRATION_RECEIVE, cdw10=(csvi & 0xFF) << 16,
               cdw11=(csuidxp & 0xFF) << 24 | (csuuidi & 0xFF) << 16 | cntlid & 0xFFFF,
               cdw12=offset & 0xFFFFFFFF, cdw13=offset >> 32, cdw15=nbytes // 4 - 1)


# ----------------------------------------------------------------------------- parsers
@dataclass(frozen=True)
class SupportedStateFormats:
    versions: list[int]
    uuids: list[uuid.UUID]

    @classmethod
    def decode(cls, buf: bytes) -> SupportedStateFormats:
        nv, nuuid = buf[0], buf[1]
        versions = list(struct.unpack_from(f"<{nv}H", buf, 2))
        off = 2 + 2 * nv
        return cls(versions, [uuid.UUID(bytes=bytes(buf[off + 16 * i : off + 16 * (i + 1)])) for i in range(nuuid)])


def supported_state_formats(pf: NvmeDriver) -> SupportedStateFormats:
    return SupportedStateFormats.decode(pf.identify(CNS.SUPPORTED_CTRL_STATE_FORMATS))


def parse_state(blob: bytes) -> tuple[ControllerState, NvmeState | None]:
    cs = ControllerState.decode(blob)
    return cs, (NvmeState.decode(cs.nvme) if cs.nvme else None)


# ----------------------------------------------------------------------------- flows
def suspend_controller(pf: NvmeDriver, cntlid: int, *, dudmq: bool = False) -> None:
    pf.admin(suspend(cntlid, dudmq=dudmq))


def resume_controller(pf: NvmeDriver, cntlid: int) -> None:
    pf.admin(resume(cntlid))


def read_state(pf: NvmeDriver, cntlid: int, *, chunk: int = 4096, csvi: int = 1,
               csuuidi: int = 1) -> tuple[bytes, bool]:
    """Reads the whole Controller State with offset paging; returns (state, CSUP of every chunk)."""
    comp, head = pf.admin(get_state(cntlid, chunk, csvi=csvi, csuuidi=csuuidi), read=chunk)
    csup = bool(comp.dw0 & 1)
    nvmecss, vss = struct.unpack_from("<Q8xQ", head, 16)
    total = HEADER_SIZE + 4 * (nvmecss + vss)
    out = bytearray(head[:total])
    while len(out) < total:
        comp, data = pf.admin(get_state(cntlid, chunk, offset=len(out), csvi=csvi, csuuidi=csuuidi), read=chunk)
        csup &= bool(comp.dw0 & 1)
        out += data[: total - len(out)]
    return bytes(out), csup


def write_state(pf: NvmeDriver, cntlid: int, state: bytes, *, chunk: int = 4096, csvi: int = 1,
                csuuidi: int = 1) -> None:
    """Sends `state` with SEQIND segments of `chunk` bytes (one 11b command if it fits)."""
    if len(state) <= chunk:
        pf.admin(set_state(cntlid, len(state), csvi=csvi, csuuidi=csuuidi), data=state)
        return
    for off in range(0, len(state), chunk):
        part = state[off : off + chunk]
        seq = SEQ_FIRST if off == 0 else SEQ_LAST if off + chunk >= len(state) else SEQ_MIDDLE
        pf.admin(set_state(cntlid, len(part), seqind=seq, offset=off, csvi=csvi, csuuidi=csuuidi), data=part)
