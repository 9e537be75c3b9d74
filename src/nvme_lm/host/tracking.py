"""Host side of TP4159 tracking: SQE builders for Controller Data Queue, Track Send/Receive and FID 21h,
and parsers for LBA Migration Queue entries and Track Receive data (docs/tracking.md)."""

from __future__ import annotations

from dataclasses import dataclass

from nvme_lm.spec.cdq import (
    CDQ_SEL_CREATE,
    CDQ_SEL_DELETE,
    CDW11_ETPT,
    CDW11_PC,
    FID_CDQ,
    LBA_ENTRY_SIZE,
    QT_USER_DATA_MIGRATION,
    TMC_DESCRIPTOR,
    TMC_HEADER,
    TR_DESCRIPTOR,
    TR_HEADER,
    TR_MTR,
    TR_SEL_TRACKED_MEMORY_CHANGES,
    TR_SUSP,
    TS_SEL_LOG_USER_DATA_CHANGES,
    TS_SEL_TRACK_MEMORY_CHANGES,
    decode_lba_entry,
)
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.opcodes import AdminOpcode as A


def cdq_create(addr: int, size_bytes: int, cntlid: int, *, contiguous: bool = True,
               qt: int = QT_USER_DATA_MIGRATION) -> SQE:
    """Create a UDMQ for migratable controller `cntlid`; PRP1 = queue memory (or a PRP list when not PC)."""
    return SQE(opcode=A.CONTROLLER_DATA_QUEUE, prp1=addr, cdw10=CDQ_SEL_CREATE | (qt & 0xFF) << 16,
               cdw11=(CDW11_PC if contiguous else 0) | (cntlid & 0xFFFF) << 16, cdw12=size_bytes // 4)


def cdq_delete(cdqid: int) -> SQE:
    return SQE(opcode=A.CONTROLLER_DATA_QUEUE, cdw10=CDQ_SEL_DELETE, cdw11=cdqid & 0xFFFF)


def cdq_set_head(cdqid: int, head: int, *, tpt: int | None = None) -> SQE:
    """Set Features FID 21h: HP = next unconsumed slot; a TPT arms the one-shot tail-pointer event."""
    return SQE(opcode=A.SET_FEATURES, cdw10=FID_CDQ, cdw11=(cdqid & 0xFFFF) | (CDW11_ETPT if tpt is not None else 0),
               cdw12=head, cdw13=tpt or 0)


def cdq_get(cdqid: int) -> SQE:
    """Get Features FID 21h (512-byte buffer: HP, TPT)."""
    return SQE(opcode=A.GET_FEATURES, cdw10=FID_CDQ, cdw11=cdqid & 0xFFFF)


def log_user_data_changes(cdqid: int, start: bool) -> SQE:
    return SQE(opcode=A.TRACK_SEND, cdw10=TS_SEL_LOG_USER_DATA_CHANGES | int(start) << 16, cdw11=cdqid & 0xFFFF)


def track_memory_changes(cntlid: int, start: bool) -> SQE:
    """Track Send SEL 1; on start send `track_memory_data(...)` as the data."""
    return SQE(opcode=A.TRACK_SEND, cdw10=TS_SEL_TRACK_MEMORY_CHANGES | int(start) << 16, cdw11=cntlid & 0xFFFF)


def track_memory_data(granularity: int, ranges: list[tuple[int, int]]) -> bytes:
    """Track Memory Changes structure: granularity = log2(bytes); ranges = (address, bytes)."""
    out = bytearray(TMC_HEADER.pack(0, granularity, len(ranges)))
    for addr, nbytes in ranges:
        out += TMC_DESCRIPTOR.pack(addr, -(-nbytes >> granularity))
    return bytes(out)


def track_receive(cntlid: int, nbytes: int) -> SQE:
    return SQE(opcode=A.TRACK_RECEIVE, cdw10=TR_SEL_TRACKED_MEMORY_CHANGES, cdw11=cntlid & 0xFFFF,
               cdw12=nbytes // 4 - 1)


@dataclass(frozen=True)
class TrackedChanges:
    cntlid: int
    granularity: int
    more: bool
    suspended: bool
    ranges: list[tuple[int, int]]  # (address, bytes)


def parse_track_receive(data: bytes) -> TrackedChanges:
    _ver, attrs, cntlid, n, gran = TR_HEADER.unpack_from(data, 0)
    ranges = [(saddr, length << gran) for saddr, length in
              TR_DESCRIPTOR.iter_unpack(data[TR_HEADER.size : TR_HEADER.size + n * TR_DESCRIPTOR.size])]
    return TrackedChanges(cntlid, gran, bool(attrs & TR_MTR), bool(attrs & TR_SUSP), ranges)


class CdqReader:
    """Consumes a CDQ in host memory the libvfn way: expected phase starts at 1 (entries differ from the
    zeroed memory), head advances, phase flips on wrap. `view(slot)` returns the slot's 32 bytes."""

    def __init__(self, view, nslots: int) -> None:
        self.view = view
        self.nslots = nslots
        self.head = 0
        self.phase = 1

    def poll(self) -> list[dict[str, int]]:
        out = []
        while True:
            raw = bytes(self.view(self.head * LBA_ENTRY_SIZE, LBA_ENTRY_SIZE))
            if raw[31] & 1 != self.phase:
                return out
            out.append(decode_lba_entry(raw))
            self.head = (self.head + 1) % self.nslots
            if self.head == 0:
                self.phase ^= 1
