"""Declarative fixed-layout little-endian structures (NVMe data structures are all of this kind).

A structure is a dataclass subclassing :class:`Layout` whose fields say where they live::

    @layout(size=32)
    class PowerState(Layout):
        mp: int = u16(0)
        flags: int = u8(3)
        enlat: int = u32(4)

``@layout`` compiles ONE ``struct.Struct`` for the whole structure (undeclared bytes become ``x`` pad
bytes, i.e. reserved: ignored on decode, zero on encode; arrays of nested layouts are expanded inline)
and generates straight-line ``_from_flat`` / ``_to_flat`` functions, so decode and encode are a single
``unpack_from`` / ``pack`` plus one constructor call: no per-field Python loop on the hot path.
"""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterable, Sequence
from itertools import chain
from typing import Any, ClassVar, Self, TypeVar, cast, dataclass_transform

__all__ = [
    "Ascii",
    "Kind",
    "Layout",
    "array",
    "ascii_field",
    "bit",
    "bits",
    "layout",
    "raw",
    "set_bits",
    "u8",
    "u16",
    "u32",
    "u64",
    "u128",
    "uint",
]

_META = "nvme_lm.spec.layout"


# --------------------------------------------------------------------------------------------- bit fields
def bits(value: int, lo: int, hi: int | None = None) -> int:
    """Bits ``hi:lo`` (inclusive, as the spec writes them) of ``value``; ``hi`` defaults to ``lo``."""
    if hi is None:
        hi = lo
    return (value >> lo) & ((1 << (hi - lo + 1)) - 1)


def bit(value: int, n: int) -> bool:
    """Whether bit ``n`` of ``value`` is set."""
    return bool((value >> n) & 1)


def set_bits(value: int, lo: int, hi: int, field: int) -> int:
    """``value`` with bits ``hi:lo`` replaced by ``field``; raises ValueError if ``field`` does not fit."""
    mask = (1 << (hi - lo + 1)) - 1
    if not 0 <= field <= mask:
        raise ValueError(f"{field:#x} does not fit in bits {hi}:{lo}")
    return (value & ~(mask << lo)) | (int(field) << lo)


# --------------------------------------------------------------------------------------------- kinds
@dataclasses.dataclass(frozen=True, slots=True)
class Kind:
    """How one scalar item is stored: its ``struct`` format, size, default and optional converters.

    ``dec`` turns the unpacked item into the Python value; ``enc(label)`` builds the reverse converter
    (given a field label for error messages). Both are None for native integers.
    """

    fmt: str
    size: int
    default: Any
    dec: Callable[[Any], Any] | None = None
    enc: Callable[[str], Callable[[Any], Any]] | None = None

    def __call__(self, offset: int) -> Any:
        """Declare a dataclass field of this kind at byte ``offset``."""
        return _field(offset, self, None)

    @property
    def native(self) -> bool:
        """A plain integer ``struct`` handles by itself (no converter, range checked by ``pack``)."""
        return len(self.fmt) == 1


def _le_int(b: bytes) -> int:
    return int.from_bytes(b, "little")


def _uint_enc(size: int) -> Callable[[str], Callable[[Any], bytes]]:
    def make(label: str) -> Callable[[Any], bytes]:
        def enc(v: int) -> bytes:
            try:
                return v.to_bytes(size, "little")
            except OverflowError:
                raise ValueError(f"{label}={v!r} does not fit in {size} bytes") from None

        return enc

    return make


def _uint_kind(size: int) -> Kind:
    return Kind(f"{size}s", size, 0, _le_int, _uint_enc(size))


def _ascii_dec(b: bytes) -> str:
    # latin-1 maps every byte 1:1, so junk from a foreign device decodes, and re-encodes unchanged.
    return b.rstrip(b" \x00").decode("latin-1")


def _ascii_kind(length: int, pad: str) -> Kind:
    padb = pad.encode("ascii")
    if len(padb) != 1:
        raise ValueError("pad must be a single ASCII character")

    def make(label: str) -> Callable[[str], bytes]:
        def enc(v: str) -> bytes:
            b = v.encode("latin-1")  # byte-transparent; the spec asks for ASCII, the device model supplies it
            if len(b) > length:
                raise ValueError(f"{label}={v!r} is {len(b)} bytes, the field holds {length}")
            # An empty string means "not reported": all zero bytes, whatever the pad.
            return b.ljust(length, padb) if b else bytes(length)

        return enc

    return Kind(f"{length}s", length, "", _ascii_dec, make)


def _raw_kind(length: int) -> Kind:
    def make(label: str) -> Callable[[Any], bytes]:
        def enc(v: bytes) -> bytes:
            if not isinstance(v, bytes | bytearray | memoryview):  # bytes(5) would be five zeros
                raise TypeError(f"{label} must be bytes, got {type(v).__name__}")
            if len(v) > length:
                raise ValueError(f"{label} is {len(v)} bytes, the field holds {length}")
            return bytes(v)  # struct pads a short value with zero bytes

        return enc

    return Kind(f"{length}s", length, bytes(length), None, make)


u8 = Kind("B", 1, 0)
u16 = Kind("H", 2, 0)
u32 = Kind("I", 4, 0)
u64 = Kind("Q", 8, 0)
u128 = _uint_kind(16)  # 16-byte little-endian integer (capacities, SMART counters)


def uint(offset: int, size: int) -> Any:
    """An unsigned little-endian integer of ``size`` bytes (e.g. the 3-byte IEEE OUI)."""
    return _uint_kind(size)(offset)


def ascii_field(offset: int, length: int, pad: str = " ") -> Any:
    """ASCII text padded with ``pad``; decode strips trailing spaces and NULs, "" encodes as zeros.

    Bytes map 1:1 to characters U+0000-U+00FF (latin-1) so any decoded value re-encodes to the same
    bytes; characters above U+00FF raise ValueError.
    """
    return _ascii_kind(length, pad)(offset)


def Ascii(length: int, pad: str = " ") -> Kind:
    """The kind of an ASCII item, for arrays of strings."""
    return _ascii_kind(length, pad)


def raw(offset: int, length: int) -> Any:
    """Opaque bytes (GUIDs, vendor-specific areas); a shorter value is zero-padded on encode."""
    return _raw_kind(length)(offset)


def array(offset: int, elem: Kind | type[Layout], count: int) -> Any:
    """``count`` consecutive items of a scalar kind (``u32``) or of a nested layout class, as a list.

    Encoding accepts a shorter list and pads it with zero items; decoding always returns ``count``.
    """
    if count < 1:
        raise ValueError("array count must be >= 1")
    return _field(offset, elem, count)


@dataclasses.dataclass(frozen=True, slots=True)
class _Spec:
    offset: int
    elem: Any  # Kind | type[Layout]
    count: int | None


def _field(offset: int, elem: Any, count: int | None) -> Any:
    if offset < 0:
        raise ValueError("offset must be >= 0")
    meta = {_META: _Spec(offset, elem, count)}
    if count is None:  # scalar defaults (int, str, bytes) are immutable
        return dataclasses.field(default=elem.default, metadata=meta)
    if isinstance(elem, Kind):
        d = elem.default
        return dataclasses.field(default_factory=lambda: [d] * count, metadata=meta)
    return dataclasses.field(default_factory=lambda: [elem() for _ in range(count)], metadata=meta)


# --------------------------------------------------------------------------------------------- layout
class Layout:
    """Base of every fixed-layout structure; ``@layout(size=N)`` fills in the class attributes."""

    __slots__ = ()

    SIZE: ClassVar[int]
    STRUCT: ClassVar[struct.Struct]
    _FMT: ClassVar[str]
    _NITEMS: ClassVar[int]
    _OFFSETS: ClassVar[dict[str, int]]
    _ZERO_FLAT: ClassVar[tuple[Any, ...]]
    _from_flat: ClassVar[Callable[[tuple[Any, ...], int], Any]]

    def _to_flat(self) -> tuple[Any, ...]:  # replaced by the generated function
        raise NotImplementedError(f"{type(self).__name__} is missing its @layout decorator")

    @classmethod
    def decode(cls, buf: bytes | bytearray | memoryview, offset: int = 0) -> Self:
        """Decode ``SIZE`` bytes of ``buf`` at ``offset`` (a longer buffer is fine, a shorter is not)."""
        have = len(buf) - offset
        if have < cls.SIZE:
            raise ValueError(
                f"{cls.__name__} needs {cls.SIZE} bytes at offset {offset}, the buffer has {max(have, 0)}"
            )
        return cast(Self, cls._from_flat(cls.STRUCT.unpack_from(buf, offset), 0))

    def encode(self) -> bytes:
        """Exactly ``SIZE`` bytes; reserved bytes are zero."""
        try:
            return self.STRUCT.pack(*self._to_flat())
        except (struct.error, OverflowError) as e:
            raise ValueError(f"{type(self).__name__}: {_diagnose(self) or e}") from e

    def encode_into(self, buf: bytearray | memoryview, offset: int = 0) -> None:
        """Encode straight into a writable buffer (e.g. a DMA-mapped guest page)."""
        try:
            self.STRUCT.pack_into(buf, offset, *self._to_flat())
        except (struct.error, OverflowError) as e:
            raise ValueError(f"{type(self).__name__}: {_diagnose(self) or e}") from e

    @classmethod
    def offset_of(cls, name: str) -> int:
        """Byte offset of field ``name``."""
        return cls._OFFSETS[name]


L = TypeVar("L", bound=Layout)


def _diagnose(obj: Layout) -> str | None:
    """Slow path, only after pack failed: name the native-integer field that is out of range."""
    for f in dataclasses.fields(obj):  # type: ignore[arg-type]
        spec: _Spec = f.metadata[_META]
        if not isinstance(spec.elem, Kind) or not spec.elem.native:
            continue
        limit = 1 << (8 * spec.elem.size)
        value = getattr(obj, f.name)
        for i, v in enumerate([value] if spec.count is None else value):
            if not isinstance(v, int) or not 0 <= v < limit:
                where = f.name if spec.count is None else f"{f.name}[{i}]"
                return f"{where}={v!r} does not fit in {spec.elem.size} byte(s)"
    return None


def _pad_list(label: str, seq: Sequence[Any], count: int, fill: Any) -> Sequence[Any]:
    n = len(seq)
    if n == count:
        return seq
    if n > count:
        raise ValueError(f"{label} has {n} items, the structure holds {count}")
    return [*seq, *([fill] * (count - n))]


def _scalar_array_encoder(label: str, count: int, kind: Kind) -> Callable[[Sequence[Any]], Iterable[Any]]:
    if kind.enc is None:
        return lambda seq: _pad_list(label, seq, count, kind.default)
    enc = kind.enc(label)
    return lambda seq: map(enc, _pad_list(label, seq, count, kind.default))


def _layout_array_encoder(label: str, count: int, elem: type[Layout]) -> Callable[[Sequence[Any]], Iterable[Any]]:
    def enc(seq: Sequence[Layout]) -> Iterable[Any]:
        n = len(seq)
        if n > count:
            raise ValueError(f"{label} has {n} items, the structure holds {count}")
        flat = chain.from_iterable([e._to_flat() for e in seq])
        if n == count:
            return flat
        return chain(flat, elem._ZERO_FLAT * (count - n))

    return enc


@dataclass_transform()  # so type checkers see the generated __init__ (fields default to their declaration)
def layout(size: int) -> Callable[[type[L]], type[L]]:
    """Class decorator: make ``cls`` a (slotted) dataclass if it is not one, and compile its layout."""

    def wrap(cls: type[L]) -> type[L]:
        if not issubclass(cls, Layout):
            raise TypeError(f"{cls.__name__} must subclass Layout")
        if "__dataclass_fields__" not in cls.__dict__:
            cls = dataclasses.dataclass(slots=True)(cls)
        _compile(cls, size)
        return cls

    return wrap


def _compile(cls: type[Layout], size: int) -> None:
    name = cls.__name__
    specs: list[tuple[int, str, _Spec]] = []
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        spec = f.metadata.get(_META)
        if spec is None:
            raise TypeError(f"{name}.{f.name} has no layout: declare it with u8()/u16()/.../array()")
        specs.append((spec.offset, f.name, spec))
    specs.sort(key=lambda t: t[0])

    fmt: list[str] = []
    ns: dict[str, Any] = {"cls": cls}
    dec: list[str] = []
    enc: list[str] = []
    offsets: dict[str, int] = {}
    pos = slot = 0
    for off, fname, spec in specs:
        label = f"{name}.{fname}"
        if off < pos:
            raise ValueError(f"{label} at offset {off} overlaps the previous field (ends at {pos})")
        if off > pos:
            fmt.append(f"{off - pos}x")
        elem, count = spec.elem, spec.count
        reps = count or 1
        if isinstance(elem, Kind):
            nitems, esize = 1, elem.size
            fmt.append(f"{reps}{elem.fmt}" if reps > 1 and len(elem.fmt) == 1 else elem.fmt * reps)
        elif isinstance(elem, type) and issubclass(elem, Layout) and hasattr(elem, "STRUCT"):
            nitems, esize = elem._NITEMS, elem.SIZE
            fmt.append(elem._FMT * reps)
        else:
            raise TypeError(f"{label}: array element must be a Kind or a @layout class, got {elem!r}")
        a, b = slot, slot + nitems * reps
        d, e = f"_d_{fname}", f"_e_{fname}"
        if count is None:
            if elem.dec is None:
                dec.append(f"{fname}=v[i+{a}]")
            else:
                ns[d] = elem.dec
                dec.append(f"{fname}={d}(v[i+{a}])")
            if elem.enc is None:
                enc.append(f"s.{fname}")
            else:
                ns[e] = elem.enc(label)
                enc.append(f"{e}(s.{fname})")
        elif isinstance(elem, Kind):
            ns[e] = _scalar_array_encoder(label, count, elem)
            if elem.dec is None:
                dec.append(f"{fname}=list(v[i+{a}:i+{b}])")
            else:
                ns[d] = elem.dec
                dec.append(f"{fname}=[{d}(x) for x in v[i+{a}:i+{b}]]")
            enc.append(f"*{e}(s.{fname})")
        else:
            ns[d], ns[e] = elem._from_flat, _layout_array_encoder(label, count, elem)
            dec.append(f"{fname}=[{d}(v, j) for j in range(i+{a}, i+{b}, {nitems})]")
            enc.append(f"*{e}(s.{fname})")
        offsets[fname] = off
        pos, slot = off + esize * reps, b
    if pos > size:
        raise ValueError(f"{name}: fields end at byte {pos}, beyond size {size}")
    if pos < size:
        fmt.append(f"{size - pos}x")

    src = (
        f"def _from_flat(v, i):\n    return cls({', '.join(dec)})\n"
        f"def _to_flat(s):\n    return ({''.join(x + ', ' for x in enc)})\n"
    )
    exec(compile(src, f"<layout {name}>", "exec"), ns)

    body = "".join(fmt)
    st = struct.Struct("<" + body)
    if st.size != size:  # cannot happen unless a Kind lies about its size
        raise AssertionError(f"{name}: struct size {st.size} != {size}")
    cls.SIZE = size
    cls.STRUCT = st
    cls._FMT = body
    cls._NITEMS = slot
    cls._OFFSETS = offsets
    cls._from_flat = staticmethod(ns["_from_flat"])
    cls._to_flat = ns["_to_flat"]  # type: ignore[method-assign]
    cls._ZERO_FLAT = cls()._to_flat()
