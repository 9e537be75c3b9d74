"""Features (Set/Get Features, admin opcodes 09h/0Ah): identifiers and the value encodings.

Most features carry their whole value in Set Features CDW11 and Get Features completion DW0; those are
small frozen dataclasses with ``from_dword`` / ``to_dword``. Bit positions follow NVMe Base 2.1 as
captured in the project spec notes §20.9 and libnvme's ``NVME_FEAT_*`` shift/mask tables. Reserved bits
are dropped by ``from_dword`` (check ``dword & ~cls.MASK`` to reject them) and zero in ``to_dword``.
"""

from __future__ import annotations

import dataclasses
import struct
from enum import IntEnum, IntFlag
from typing import ClassVar, Self

from .layout import bits, set_bits

__all__ = [
    "FEATURE_CODECS",
    "Arbitration",
    "AsyncEventConfig",
    "DwordFeature",
    "FeatureCapability",
    "FeatureId",
    "FeatureSelect",
    "InterruptCoalescing",
    "InterruptVectorConfig",
    "KeepAliveTimer",
    "NumberOfQueues",
    "PowerManagement",
    "TemperatureThreshold",
    "Timestamp",
    "TimestampOrigin",
    "VolatileWriteCache",
    "WriteAtomicityNormal",
]


class FeatureId(IntEnum):
    """Feature Identifiers (spec notes §20.9)."""

    ARBITRATION = 0x01
    POWER_MGMT = 0x02
    LBA_RANGE_TYPE = 0x03
    TEMP_THRESHOLD = 0x04
    ERROR_RECOVERY = 0x05
    VOLATILE_WC = 0x06
    NUM_QUEUES = 0x07
    IRQ_COALESCE = 0x08
    IRQ_CONFIG = 0x09
    WRITE_ATOMIC = 0x0A
    ASYNC_EVENT = 0x0B
    AUTO_PST = 0x0C
    HOST_MEM_BUF = 0x0D
    TIMESTAMP = 0x0E
    KATO = 0x0F
    HCTM = 0x10
    NOPSC = 0x11
    RRL = 0x12
    PLM_CONFIG = 0x13
    PLM_WINDOW = 0x14
    LBA_STS_INTERVAL = 0x15
    HOST_BEHAVIOR = 0x16
    SANITIZE_CONFIG = 0x17
    ENDURANCE_EVT_CONFIG = 0x18
    IOCS_PROFILE = 0x19
    SPINUP_CONTROL = 0x1A
    POWER_LOSS_SIGNAL = 0x1B
    PERF_CHARACTERISTICS = 0x1C
    FDP = 0x1D
    FDP_EVENTS = 0x1E
    NS_ADMIN_LABEL = 0x1F
    KEY_VALUE_CONFIG = 0x20
    CTRL_DATA_QUEUE = 0x21  # TP4159
    DEVICE_PERSONALITY = 0x22
    POWER_LIMIT = 0x23
    POWER_THRESHOLD = 0x24
    POWER_MEASUREMENT = 0x25
    VOLTAGE_THRESHOLD = 0x26
    VOLTAGE_MEASUREMENT = 0x27
    RATE_LIMITING = 0x28  # Base 2.4 draft (TP4176)
    EMB_MGMT_CTRL_ADDR = 0x78
    HOST_MGMT_AGENT_ADDR = 0x79
    ENH_CTRL_METADATA = 0x7D
    CTRL_METADATA = 0x7E
    NS_METADATA = 0x7F
    SW_PROGRESS = 0x80
    HOST_ID = 0x81
    RESV_MASK = 0x82
    RESV_PERSIST = 0x83
    WRITE_PROTECT = 0x84
    BP_WRITE_PROTECT = 0x85


class FeatureSelect(IntEnum):
    """Get Features CDW10.SEL (bits 10:8)."""

    CURRENT = 0
    DEFAULT = 1
    SAVED = 2
    SUPPORTED_CAPABILITIES = 3


class FeatureCapability(IntFlag):
    """Completion DW0 of Get Features with SEL = supported capabilities."""

    SAVEABLE = 1 << 0
    NS_SPECIFIC = 1 << 1
    CHANGEABLE = 1 << 2


@dataclasses.dataclass(frozen=True, slots=True)
class DwordFeature:
    """A feature value that fits one dword. Subclasses list ``FIELDS`` as ``(name, lo, hi)``.

    One-bit fields decode as ``bool``; ``to_dword`` raises ValueError if a field does not fit.
    """

    FIELDS: ClassVar[tuple[tuple[str, int, int], ...]] = ()
    MASK: ClassVar[int] = 0

    def __init_subclass__(cls) -> None:
        # No zero-argument super() here: dataclass(slots=True) re-creates the class.
        cls.MASK = 0
        for _, lo, hi in cls.FIELDS:
            cls.MASK |= ((1 << (hi - lo + 1)) - 1) << lo

    @classmethod
    def from_dword(cls, dword: int) -> Self:
        kw = {n: bool((dword >> lo) & 1) if lo == hi else bits(dword, lo, hi) for n, lo, hi in cls.FIELDS}
        return cls(**kw)

    def to_dword(self) -> int:
        dw = 0
        for name, lo, hi in self.FIELDS:
            try:
                dw = set_bits(dw, lo, hi, int(getattr(self, name)))
            except ValueError as e:
                raise ValueError(f"{type(self).__name__}.{name}: {e}") from None
        return dw


@dataclasses.dataclass(frozen=True, slots=True)
class Arbitration(DwordFeature):
    """FID 01h. AB = log2 of the arbitration burst (7 = no limit); weights are 0's based."""

    ab: int = 0
    lpw: int = 0
    mpw: int = 0
    hpw: int = 0
    FIELDS: ClassVar = (("ab", 0, 2), ("lpw", 8, 15), ("mpw", 16, 23), ("hpw", 24, 31))


@dataclasses.dataclass(frozen=True, slots=True)
class PowerManagement(DwordFeature):
    """FID 02h. PS = power state, WH = workload hint."""

    ps: int = 0
    wh: int = 0
    FIELDS: ClassVar = (("ps", 0, 4), ("wh", 5, 7))


@dataclasses.dataclass(frozen=True, slots=True)
class TemperatureThreshold(DwordFeature):
    """FID 04h. TMPTH in Kelvin; TMPSEL 0 = composite, 1-8 = sensors; THSEL 0 over, 1 under.

    TMPTHH (hysteresis, 24:22) is a Base 2.1 addition not yet confirmed against an implementation.
    """

    tmpth: int = 0
    tmpsel: int = 0
    thsel: int = 0
    tmpthh: int = 0
    FIELDS: ClassVar = (("tmpth", 0, 15), ("tmpsel", 16, 19), ("thsel", 20, 21), ("tmpthh", 22, 24))


@dataclasses.dataclass(frozen=True, slots=True)
class VolatileWriteCache(DwordFeature):
    """FID 06h."""

    wce: bool = False
    FIELDS: ClassVar = (("wce", 0, 0),)


@dataclasses.dataclass(frozen=True, slots=True)
class NumberOfQueues(DwordFeature):
    """FID 07h. NSQR/NCQR are 0's based (requested in CDW11, allocated in DW0)."""

    nsqr: int = 0
    ncqr: int = 0
    FIELDS: ClassVar = (("nsqr", 0, 15), ("ncqr", 16, 31))

    @classmethod
    def of(cls, num_sq: int, num_cq: int) -> NumberOfQueues:
        """From real queue counts (>= 1)."""
        if num_sq < 1 or num_cq < 1:
            raise ValueError("queue counts are at least 1")
        return cls(nsqr=num_sq - 1, ncqr=num_cq - 1)

    @property
    def num_sq(self) -> int:
        return self.nsqr + 1

    @property
    def num_cq(self) -> int:
        return self.ncqr + 1


@dataclasses.dataclass(frozen=True, slots=True)
class InterruptCoalescing(DwordFeature):
    """FID 08h. THR = aggregation threshold (0's based), TIME in 100 µs units."""

    thr: int = 0
    time: int = 0
    FIELDS: ClassVar = (("thr", 0, 7), ("time", 8, 15))


@dataclasses.dataclass(frozen=True, slots=True)
class InterruptVectorConfig(DwordFeature):
    """FID 09h. IV = interrupt vector, CD = coalescing disable."""

    iv: int = 0
    cd: bool = False
    FIELDS: ClassVar = (("iv", 0, 15), ("cd", 16, 16))


@dataclasses.dataclass(frozen=True, slots=True)
class WriteAtomicityNormal(DwordFeature):
    """FID 0Ah. DN = disable normal (only AWUPF applies)."""

    dn: bool = False
    FIELDS: ClassVar = (("dn", 0, 0),)


@dataclasses.dataclass(frozen=True, slots=True)
class AsyncEventConfig(DwordFeature):
    """FID 0Bh: which asynchronous events the host wants reported."""

    smart: int = 0  # 7:0, one bit per SMART critical warning bit
    nan: bool = False  # 8 namespace attribute notices
    fw_activation: bool = False  # 9
    telemetry: bool = False  # 10 telemetry log notices
    ana_change: bool = False  # 11
    ple_aggregate: bool = False  # 12 predictable latency event aggregate log change
    lba_status: bool = False  # 13 LBA status information
    endurance_group: bool = False  # 14 endurance group event aggregate log change
    normal_nss_shutdown: bool = False  # 15
    rate_limit_change: bool = False  # 22 RLCCN: rate limiting configuration change (TP4176, Base 2.4 draft)
    discovery_log_change: bool = False  # 31 (fabrics discovery controllers)
    FIELDS: ClassVar = (
        ("smart", 0, 7),
        ("nan", 8, 8),
        ("fw_activation", 9, 9),
        ("telemetry", 10, 10),
        ("ana_change", 11, 11),
        ("ple_aggregate", 12, 12),
        ("lba_status", 13, 13),
        ("endurance_group", 14, 14),
        ("normal_nss_shutdown", 15, 15),
        ("rate_limit_change", 22, 22),
        ("discovery_log_change", 31, 31),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class KeepAliveTimer(DwordFeature):
    """FID 0Fh. KATO in milliseconds (0 = disabled)."""

    kato: int = 0
    FIELDS: ClassVar = (("kato", 0, 31),)


FEATURE_CODECS: dict[FeatureId, type[DwordFeature]] = {
    FeatureId.ARBITRATION: Arbitration,
    FeatureId.POWER_MGMT: PowerManagement,
    FeatureId.TEMP_THRESHOLD: TemperatureThreshold,
    FeatureId.VOLATILE_WC: VolatileWriteCache,
    FeatureId.NUM_QUEUES: NumberOfQueues,
    FeatureId.IRQ_COALESCE: InterruptCoalescing,
    FeatureId.IRQ_CONFIG: InterruptVectorConfig,
    FeatureId.WRITE_ATOMIC: WriteAtomicityNormal,
    FeatureId.ASYNC_EVENT: AsyncEventConfig,
    FeatureId.KATO: KeepAliveTimer,
}


# --------------------------------------------------------------------------------------------- 0Eh
class TimestampOrigin(IntEnum):
    """Timestamp attribute bits 3:1."""

    RESET = 0  # counting from zero since the last controller level reset
    SET_FEATURES = 1  # set by a host with Set Features


_TIMESTAMP = struct.Struct("<6sBx")


@dataclasses.dataclass(frozen=True, slots=True)
class Timestamp:
    """FID 0Eh data buffer (8 bytes): milliseconds since 1970-01-01 UTC, 48 bits, plus attributes."""

    SIZE: ClassVar[int] = 8

    timestamp_ms: int = 0
    synch: bool = False  # the count may have skipped (controller slept)
    origin: int = TimestampOrigin.RESET

    @classmethod
    def from_bytes(cls, buf: bytes | bytearray | memoryview) -> Timestamp:
        if len(buf) < cls.SIZE:
            raise ValueError(f"a timestamp is {cls.SIZE} bytes, got {len(buf)}")
        ts, attr = _TIMESTAMP.unpack_from(buf)
        return cls(int.from_bytes(ts, "little"), bool(attr & 1), bits(attr, 1, 3))

    def to_bytes(self) -> bytes:
        if not 0 <= self.timestamp_ms < 1 << 48:
            raise ValueError(f"timestamp {self.timestamp_ms} does not fit in 48 bits")
        attr = set_bits(int(bool(self.synch)), 1, 3, int(self.origin))
        return _TIMESTAMP.pack(self.timestamp_ms.to_bytes(6, "little"), attr)
