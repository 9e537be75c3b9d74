"""Unit tests of the declarative layout framework."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nvme_lm.spec.layout import (
    Ascii,
    Layout,
    array,
    ascii_field,
    bit,
    bits,
    layout,
    raw,
    set_bits,
    u8,
    u16,
    u32,
    u64,
    u128,
    uint,
)


@layout(size=8)
class Pair(Layout):
    a: int = u16(0)
    b: int = u8(4)  # bytes 2-3 and 5-7 are reserved


@layout(size=96)
class Sample(Layout):
    x: int = u8(1)
    y: int = u32(4)
    z: int = u64(8)
    name: str = ascii_field(16, 8)
    nqn: str = ascii_field(24, 8, pad="\0")
    big: int = u128(32)
    oui: int = uint(48, 3)
    blob: bytes = raw(52, 4)
    words: list[int] = array(56, u16, 4)
    pairs: list[Pair] = array(64, Pair, 3)
    tags: list[str] = array(88, Ascii(4), 2)


def test_sizes_and_single_struct() -> None:
    assert Pair.SIZE == Pair.STRUCT.size == 8
    assert Sample.SIZE == Sample.STRUCT.size == 96
    assert isinstance(Sample.STRUCT, struct.Struct)
    assert len(Sample().encode()) == 96
    assert Sample.offset_of("pairs") == 64


def test_default_encodes_to_zeros_and_round_trips() -> None:
    s = Sample()
    assert s.encode() == bytes(96)
    assert Sample.decode(bytes(96)) == s


def test_round_trip_all_kinds() -> None:
    s = Sample(
        x=0xFF, y=0xDEADBEEF, z=2**64 - 1, name="abc", nqn="nqn.x", big=2**128 - 1, oui=0x525400,
        blob=b"\x01\x02\x03\x04", words=[1, 2, 3, 4], pairs=[Pair(1, 2), Pair(3, 4), Pair(5, 6)],
        tags=["t1", "t2"],
    )
    b = s.encode()
    assert Sample.decode(b) == s
    assert b[48:51] == bytes.fromhex("005452")  # 24-bit little-endian
    assert b[32:48] == b"\xff" * 16


def test_gaps_are_zero_on_encode_and_ignored_on_decode() -> None:
    junk = bytes(range(1, 9))
    p = Pair.decode(junk)
    assert (p.a, p.b) == (0x0201, 5)
    assert p.encode() == bytes([1, 2, 0, 0, 5, 0, 0, 0])
    s = Sample.decode(b"\xaa" * 96)
    assert s.encode()[0] == 0 and s.encode()[2:4] == b"\0\0"


def test_strings_pad_and_strip() -> None:
    b = Sample(name="ab", nqn="cd").encode()
    assert b[16:24] == b"ab      "
    assert b[24:32] == b"cd\0\0\0\0\0\0"
    assert Sample.decode(b[:16] + b"xy \0 \0  " + b[24:]).name == "xy"
    assert Sample(name="").encode()[16:24] == bytes(8)  # "" = not reported: zeros, not spaces
    assert Sample(tags=["a"]).encode()[88:96] == b"a   " + bytes(4)


def test_string_errors() -> None:
    with pytest.raises(ValueError, match=r"Sample\.name"):
        Sample(name="123456789").encode()
    with pytest.raises(ValueError):
        Sample(name="\u20ac").encode()  # not representable in one byte


def test_u128_and_uint_range() -> None:
    with pytest.raises(ValueError, match=r"Sample\.big"):
        Sample(big=2**128).encode()
    with pytest.raises(ValueError, match=r"Sample\.big"):
        Sample(big=-1).encode()
    with pytest.raises(ValueError, match=r"Sample\.oui"):
        Sample(oui=1 << 24).encode()


def test_native_int_range_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"y=4294967296"):
        Sample(y=2**32).encode()
    with pytest.raises(ValueError, match=r"words\[1\]"):
        Sample(words=[0, -1]).encode()


def test_arrays_pad_short_and_reject_long() -> None:
    s = Sample(words=[7], pairs=[Pair(a=9)])
    d = Sample.decode(s.encode())
    assert d.words == [7, 0, 0, 0]
    assert d.pairs == [Pair(a=9), Pair(), Pair()]
    with pytest.raises(ValueError, match="holds 4"):
        Sample(words=[1, 2, 3, 4, 5]).encode()
    with pytest.raises(ValueError, match="holds 3"):
        Sample(pairs=[Pair()] * 4).encode()


def test_raw_length() -> None:
    assert Sample(blob=b"\x01").encode()[52:56] == b"\x01\0\0\0"
    with pytest.raises(ValueError, match="blob"):
        Sample(blob=b"12345").encode()
    with pytest.raises(TypeError, match="blob"):
        Sample(blob=4).encode()  # type: ignore[arg-type]


def test_decode_short_buffer_raises_clearly() -> None:
    with pytest.raises(ValueError, match=r"Sample needs 96 bytes at offset 0, the buffer has 95"):
        Sample.decode(bytes(95))
    with pytest.raises(ValueError, match=r"at offset 10, the buffer has 90"):
        Sample.decode(bytes(100), offset=10)


def test_decode_at_offset_and_longer_buffer() -> None:
    s = Sample(x=3, words=[1, 2, 3, 4])
    buf = b"\xee" * 5 + s.encode() + b"\xee" * 7
    assert Sample.decode(buf, 5) == s


def test_encode_into() -> None:
    buf = bytearray(b"\xff" * 20)
    Pair(a=0x1234, b=9).encode_into(buf, 4)
    assert buf[4:12] == bytes([0x34, 0x12, 0, 0, 9, 0, 0, 0]) and buf[:4] == b"\xff" * 4


def test_declaration_errors() -> None:
    with pytest.raises(ValueError, match="beyond size"):

        @layout(size=4)
        class TooBig(Layout):
            a: int = u32(2)

    with pytest.raises(ValueError, match="overlaps"):

        @layout(size=8)
        class Overlap(Layout):
            a: int = u32(0)
            b: int = u16(2)

    with pytest.raises(TypeError, match="no layout"):

        @layout(size=8)
        class Untyped(Layout):
            a: int = 0

    with pytest.raises(TypeError, match="subclass Layout"):

        class NotLayout:
            a: int = u8(0)

        layout(size=8)(NotLayout)  # type: ignore[type-var]


def test_bits_helpers() -> None:
    assert bits(0xABCD, 4, 7) == 0xC
    assert bits(0b100, 2) == 1
    assert bit(0b100, 2) and not bit(0b100, 1)
    assert set_bits(0xFFFF, 4, 7, 0) == 0xFF0F
    assert set_bits(0, 16, 31, 0xFFFF) == 0xFFFF0000
    with pytest.raises(ValueError, match="bits 7:4"):
        set_bits(0, 4, 7, 16)


@given(st.binary(min_size=96, max_size=96))
def test_decode_encode_is_identity_except_reserved_bytes(b: bytes) -> None:
    # Strings are the one lossy kind (trailing pad normalised), so compare through a second round.
    once = Sample.decode(b).encode()
    assert Sample.decode(once).encode() == once
    reserved = [0, 2, 3, 51, 66, 67, 69, 70, 71, 74, 75, 77, 78, 79, 82, 83, 85, 86, 87]
    assert all(once[i] == 0 for i in reserved)
    s = Sample.decode(b)
    assert (s.x, s.y, s.z) == (b[1], *struct.unpack_from("<IQ", b, 4))
    assert s.pairs[2] == Pair(a=b[80] | b[81] << 8, b=b[84])
