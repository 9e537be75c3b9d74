"""Controller Data Queue (45h), LBA Migration Queue entries, Track Send/Receive wire formats (TP4159).

Spec notes §4-8; encodings the sources leave open are decided in docs/tracking.md.
"""

from __future__ import annotations

import struct

from nvme_lm.spec import status as st

# Controller Data Queue command (45h): CDW10 SEL 7:0, MOS 31:16 (QT = MOS 7:0 for create)
CDQ_SEL_CREATE = 0x0
CDQ_SEL_DELETE = 0x1
QT_USER_DATA_MIGRATION = 0x0
CDW11_PC = 1 << 0

# Track Send (3Dh) / Track Receive (3Eh)
TS_SEL_LOG_USER_DATA_CHANGES = 0x0
TS_SEL_TRACK_MEMORY_CHANGES = 0x1
TR_SEL_TRACKED_MEMORY_CHANGES = 0x0

FID_CDQ = 0x21  # Set/Get Features: CDQ head pointer / tail-pointer trigger
FID_CDQ_BUFFER_SIZE = 512
CDW11_ETPT = 1 << 31

# One-shot async event information (type 4), CQE DW1[15:0] = CDQID
AEI_CDQ_TAIL_POINTER = 0x00
AEI_CDQ_FULL = 0x01

# Command-specific status codes (spec notes §13), named in spec/status.py; kept here for the CDQ code
INVALID_CDQ = st.INVALID_CDQ
NOT_ENOUGH_RESOURCES = st.NOT_ENOUGH_RESOURCES
CDQ_FULL = st.CDQ_FULL

# LBA Migration Queue Entry Type 0 (32 bytes, NVM CS 1.2 Fig 177)
LBA_ENTRY_SIZE = 32
LBA_ENTRY_DWORDS = LBA_ENTRY_SIZE // 4
LBA_ENTRY = struct.Struct("<IIQ15x")  # bytes 30:0; byte 31 (LBAMQA, with the phase) is written last
ESA_NONE = 0b000
ESA_FIRST = 0b001
ESA_LAST_STOPPED = 0b010
ESA_LAST_SUSPENDED = 0b011
ESA_LAST_FULL = 0b111
LBACIR_RANGE = 0b00
LBACIR_ALL = 0b01
LBACIR_NONE = 0b10
DLBA = 1 << 5


def lbamqa(phase: int, esa: int, dlba: bool, lbacir: int) -> int:
    return (phase & 1) | (esa & 7) << 1 | (DLBA if dlba else 0) | (lbacir & 3) << 6


def decode_lba_entry(raw: bytes | memoryview) -> dict[str, int]:
    """One Type-0 entry as a dict (host side and tests)."""
    nsid, nlb, slba = LBA_ENTRY.unpack_from(raw, 0)
    a = raw[31]
    return {"nsid": nsid, "nlb": nlb, "slba": slba, "phase": a & 1, "esa": (a >> 1) & 7,
            "dlba": (a >> 5) & 1, "lbacir": (a >> 6) & 3}


# Track Memory Changes data (Track Send SEL 1 start): VER, rsvd, RMRTG, RNMRTD (1's based), descriptors
TMC_HEADER = struct.Struct("<B2xBI")
TMC_DESCRIPTOR = struct.Struct("<QI")  # SADDR, LEN in granularity units (12 bytes, packed)
# Track Receive response: VER, ATTRB (MTR bit0, SUSP bit1), CNTLID, NTMCD, RPMPG, rsvd; 16-byte descriptors
TR_HEADER = struct.Struct("<BBHIH6x")
TR_DESCRIPTOR = struct.Struct("<QI4x")
TR_MTR = 1 << 0
TR_SUSP = 1 << 1

# Granularity encoding (decided, docs/tracking.md): log2 of bytes; 12 = 4 KiB
MINMRTG = 12
MAXMRTG = 21
# Limits reported in Identify Controller (kept here so identity and the handlers agree)
MCUDMQ = 2
MNSUDMQ = 16
MCMR = 64  # memory ranges (pages) in one CDQ create (PC=0)
NMCMR = 1024
MCDQPC = 64  # PRP entries in a CDQ create PRP list
CMMRTD = 64
NMMRTD = 128
