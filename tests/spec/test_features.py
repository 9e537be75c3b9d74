"""Feature value encodings against QEMU 7.2 current values read by nvme-cli 2.3 (get-feature)."""

from __future__ import annotations

import re

import pytest

from nvme_lm.spec.features import (
    FEATURE_CODECS,
    Arbitration,
    AsyncEventConfig,
    DwordFeature,
    FeatureCapability,
    FeatureId,
    FeatureSelect,
    InterruptCoalescing,
    InterruptVectorConfig,
    KeepAliveTimer,
    NumberOfQueues,
    PowerManagement,
    TemperatureThreshold,
    Timestamp,
    TimestampOrigin,
    VolatileWriteCache,
    WriteAtomicityNormal,
)

from .fixtures import FIXTURES, fixture_text, requires_fixtures

# nvme-cli prints "%#010x", which drops the 0x prefix for zero ("00000000").
_LINE = re.compile(r"get-feature:0x([0-9a-f]{2}) \((.+)\), Current value:(?:0x)?([0-9a-f]{8})\s*$")

# What each captured value means (nvme-cli printed only the dword): FID -> expected decoded value.
EXPECTED = {
    FeatureId.ARBITRATION: Arbitration(ab=7),  # burst: no limit; weights 0
    FeatureId.POWER_MGMT: PowerManagement(ps=0, wh=0),
    FeatureId.TEMP_THRESHOLD: TemperatureThreshold(tmpth=343),  # 343 K composite over-temp = WCTEMP
    FeatureId.VOLATILE_WC: VolatileWriteCache(wce=True),
    FeatureId.NUM_QUEUES: NumberOfQueues(nsqr=59, ncqr=59),  # 60 + 60 I/O queues (0's based)
    FeatureId.IRQ_COALESCE: InterruptCoalescing(thr=0, time=0),
    FeatureId.IRQ_CONFIG: InterruptVectorConfig(iv=0, cd=True),  # vector 0: coalescing disabled
    FeatureId.WRITE_ATOMIC: WriteAtomicityNormal(dn=False),
    FeatureId.ASYNC_EVENT: AsyncEventConfig(nan=True),  # the Linux host enabled NS attribute notices
}


def _fixture_fids() -> list[int]:
    if not FIXTURES.is_dir():
        return []
    return sorted(int(p.stem.split("-")[1]) for p in FIXTURES.glob("feature-*.txt"))


@requires_fixtures
def test_every_feature_fixture_is_covered() -> None:
    assert _fixture_fids() == sorted(int(f) for f in EXPECTED)


@requires_fixtures
@pytest.mark.parametrize("fid", _fixture_fids() or [0])
def test_feature_fixture_decodes_and_round_trips(fid: int) -> None:
    m = _LINE.match(fixture_text(f"feature-{fid}.txt").strip())
    assert m, f"feature-{fid}.txt: unexpected format"
    assert int(m.group(1), 16) == fid
    dword = int(m.group(3), 16)
    codec = FEATURE_CODECS[FeatureId(fid)]
    value = codec.from_dword(dword)
    assert value == EXPECTED[FeatureId(fid)], m.group(2)
    assert value.to_dword() == dword
    assert dword & ~codec.MASK == 0  # QEMU sets no bit we do not model


def test_number_of_queues_counts() -> None:
    q = NumberOfQueues.from_dword(0x003B003B)
    assert (q.num_sq, q.num_cq) == (60, 60)
    assert NumberOfQueues.of(2, 3).to_dword() == 0x0002_0001
    with pytest.raises(ValueError):
        NumberOfQueues.of(0, 1)


@pytest.mark.parametrize(
    ("value", "dword"),
    [
        (Arbitration(ab=3, lpw=0x11, mpw=0x22, hpw=0x33), 0x33221103),
        (PowerManagement(ps=31, wh=7), 0xFF),
        (TemperatureThreshold(tmpth=0xFFFF, tmpsel=0xF, thsel=1, tmpthh=7), 0x01DFFFFF),
        (VolatileWriteCache(wce=True), 1),
        (NumberOfQueues(nsqr=0xFFFE, ncqr=1), 0x0001FFFE),
        (InterruptCoalescing(thr=0x10, time=0x20), 0x2010),
        (InterruptVectorConfig(iv=0x1234, cd=True), 0x11234),
        (WriteAtomicityNormal(dn=True), 1),
        (AsyncEventConfig(smart=0xFF, fw_activation=True, normal_nss_shutdown=True), 0x82FF),
        (AsyncEventConfig(telemetry=True, ana_change=True, discovery_log_change=True), 0x80000C00),
        (AsyncEventConfig(ple_aggregate=True, lba_status=True, endurance_group=True), 0x7000),
        (KeepAliveTimer(kato=120_000), 120_000),
    ],
)
def test_bit_positions(value: DwordFeature, dword: int) -> None:
    assert value.to_dword() == dword
    assert type(value).from_dword(dword) == value


def test_reserved_bits_are_dropped_and_out_of_range_rejected() -> None:
    assert VolatileWriteCache.from_dword(0xFFFF_FFFE) == VolatileWriteCache(wce=False)
    assert InterruptVectorConfig.MASK == 0x1FFFF
    with pytest.raises(ValueError, match=r"PowerManagement\.ps"):
        PowerManagement(ps=32).to_dword()
    with pytest.raises(ValueError, match=r"KeepAliveTimer\.kato"):
        KeepAliveTimer(kato=1 << 32).to_dword()


def test_one_bit_fields_decode_as_bool() -> None:
    assert VolatileWriteCache.from_dword(1).wce is True
    assert InterruptVectorConfig.from_dword(0).cd is False


def test_timestamp_buffer() -> None:
    t = Timestamp(timestamp_ms=0x0102030405, synch=True, origin=TimestampOrigin.SET_FEATURES)
    b = t.to_bytes()
    assert b == bytes([0x05, 0x04, 0x03, 0x02, 0x01, 0x00, 0b0011, 0])
    assert Timestamp.from_bytes(b) == t
    assert Timestamp.from_bytes(bytes(6) + b"\xff\xff") == Timestamp(0, True, 7)  # reserved bits ignored
    with pytest.raises(ValueError, match="48 bits"):
        Timestamp(timestamp_ms=1 << 48).to_bytes()
    with pytest.raises(ValueError, match="8 bytes"):
        Timestamp.from_bytes(bytes(7))


def test_ids_select_and_capabilities() -> None:
    assert (FeatureId.ARBITRATION, FeatureId.TIMESTAMP, FeatureId.KATO) == (0x01, 0x0E, 0x0F)
    assert (FeatureId.CTRL_DATA_QUEUE, FeatureId.RATE_LIMITING, FeatureId.HOST_ID) == (0x21, 0x28, 0x81)
    assert [int(s) for s in FeatureSelect] == [0, 1, 2, 3]
    assert FeatureCapability(0b101) == FeatureCapability.SAVEABLE | FeatureCapability.CHANGEABLE
    assert FeatureCapability.NS_SPECIFIC == 2
