"""The verified block format: what every block the guest writes holds, and how a read-back is judged.

A block is a header (its LBA, its write generation, the CRC-32 of the rest) and a payload taken from a
seeded random pool at an offset derived from (LBA, generation): a misdirected, stale, torn or corrupted
block is told apart from the right one by the header alone, with no copy of the data kept anywhere.
"""

from __future__ import annotations

import functools
import struct
import zlib

import numpy as np

HEADER = struct.Struct("<QQI")  # LBA, generation, crc32 of bytes [HEADER_SIZE:block_size]
HEADER_SIZE = HEADER.size
_POOL_SIZE = 1 << 20


def _payload_offset(lba: int, generation: int, span: int) -> int:
    return ((lba * 0x9E3779B1) ^ (generation * 0x85EBCA77)) % span


@functools.lru_cache(maxsize=16)
def payload_pool(seed: int) -> memoryview:
    """The random bytes writes take their payload from: a pure function of the seed, shared read-only by the
    workloads of a process. Making it costs a few ms (more on first use of numpy's generator), so the
    destination of a migration makes it while pre-copy runs, not in the blackout (`Vm.prepare_for`)."""
    return memoryview(np.random.default_rng([seed, 1]).bytes(_POOL_SIZE)).toreadonly()


def fill_block(view: memoryview, lba: int, generation: int, pool: bytes | memoryview) -> None:
    """Writes header + payload for (`lba`, `generation`) into `view` (one whole block)."""
    n = len(view) - HEADER_SIZE
    off = _payload_offset(lba, generation, len(pool) - n)
    body = view[HEADER_SIZE:]
    body[:] = pool[off : off + n]
    HEADER.pack_into(view, 0, lba, generation, zlib.crc32(body))


def check_block(view: memoryview, lba: int, generation: int) -> str | None:
    """Why `view` is not the block written at `lba` with `generation` (0 = never written), or None."""
    if generation == 0:
        if view.tobytes().count(0) != len(view):
            return "block never written but not zero"
        return None
    h_lba, h_gen, h_crc = HEADER.unpack_from(view, 0)
    if h_lba != lba:
        return f"header LBA {h_lba} != {lba} (misdirected or foreign block)"
    if h_gen != generation:
        return f"generation {h_gen} != expected {generation} ({'stale' if h_gen < generation else 'future'} data)"
    crc = zlib.crc32(view[HEADER_SIZE:])
    if crc != h_crc:
        return f"CRC-32 {crc:#010x} != header {h_crc:#010x} (corrupted data)"
    return None


def check_trimmed(view: memoryview, lba: int, generation: int) -> str | None:
    """Why `view` is not the zeroes a block deallocated after `generation` must read as, or None."""
    data = view.tobytes()
    if data.count(0) == len(data):
        return None
    h_lba, h_gen, _ = HEADER.unpack_from(data, 0)
    if h_lba == lba and h_gen == generation and generation:
        return f"non-zero after trim: generation {generation} still readable (deallocate lost)"
    return f"non-zero after trim of generation {generation} (header LBA {h_lba}, generation {h_gen})"


__all__ = ["HEADER", "HEADER_SIZE", "check_block", "check_trimmed", "fill_block", "payload_pool"]
