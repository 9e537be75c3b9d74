"""Feature values of one controller: current, saved and default, per FID.

Values are the CDW11 dword of Set Features (and DW0 of Get Features). Handlers in
`admin/features.py` validate; this module only keeps the numbers and knows which FIDs are
saveable, changeable and namespace specific.

Some features hold one value per selector rather than one per controller: Temperature
Threshold (per sensor and per over/under threshold) and Interrupt Vector Configuration (per
MSI-X vector). Those live in `indexed` / `indexed_saved`, keyed by (FID, selector), so that a
reset, a save and a controller-state snapshot treat them exactly like the plain ones.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nvme_lm.device.interrupts import InterruptAggregator

# FIDs this module gives meaning to (the full list is in feature_defaults.py)
_INTERRUPT_COALESCING = 0x08
_INTERRUPT_VECTOR_CONFIG = 0x09
_ASYNC_EVENT_CONFIG = 0x0B
_CD = 1 << 16  # Interrupt Vector Configuration: coalescing disable

# Asynchronous event type -> which Asynchronous Event Configuration bits enable it
_AER_SMART = 1
_AER_NOTICE = 2
_SMART_INFO_BITS = {
    0x00: 0x3C,  # NVM subsystem reliability: reliability degraded, read only, volatile backup, PMR
    0x01: 0x02,  # temperature threshold
    0x02: 0x01,  # available spare below threshold
}
# notices 00h-07h -> bits 8-15 (NAN, FAN, TLN, ANACN, PLEALCN, LSIAN, EGEALCN, NNSSHDN); F0h -> 31 (DLPCN)
_NOTICE_INFO_BITS = {info: 1 << (8 + info) for info in range(8)}
_NOTICE_INFO_BITS[0x0A] = 1 << 22  # RLCCN: rate limiting configuration change (TP4176)
_NOTICE_INFO_BITS[0xF0] = 1 << 31


def _monotonic_ms() -> int:
    return time.monotonic_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    fid: int
    default: int
    saveable: bool = True
    changeable: bool = True
    ns_specific: bool = False

    @property
    def capabilities(self) -> int:
        return int(self.saveable) | int(self.ns_specific) << 1 | int(self.changeable) << 2


@dataclass
class FeatureState:
    specs: dict[int, FeatureSpec]
    current: dict[int, int] = field(default_factory=dict)
    saved: dict[int, int] = field(default_factory=dict)
    indexed: dict[tuple[int, int], int] = field(default_factory=dict)  # (FID, selector) -> value
    indexed_saved: dict[tuple[int, int], int] = field(default_factory=dict)
    timestamp_ms_base: int = 0  # FID 0Eh: timestamp minus the monotonic clock (ms)
    timestamp_origin: int = 0  # 0: counting from a controller level reset, 1: set by the host

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Controller reset: current values revert to saved ones, else to defaults.

        The timestamp restarts at zero with origin 000b, as a Controller Level Reset requires.
        """
        self.current = {fid: self.saved.get(fid, s.default) for fid, s in self.specs.items()}
        self.indexed = dict(self.indexed_saved)
        self.timestamp_ms_base = -_monotonic_ms()
        self.timestamp_origin = 0

    def get(self, fid: int) -> int:
        return self.current[fid]

    def set(self, fid: int, value: int, save: bool = False) -> None:
        self.current[fid] = value
        if save:
            self.saved[fid] = value

    # --- per-selector values --------------------------------------------------------------------
    def get_indexed(self, fid: int, index: int, default: int) -> int:
        return self.indexed.get((fid, index), default)

    def saved_indexed(self, fid: int, index: int, default: int) -> int:
        return self.indexed_saved.get((fid, index), default)

    def set_indexed(self, fid: int, index: int, value: int, save: bool = False) -> None:
        self.indexed[(fid, index)] = value
        if save:
            self.indexed_saved[(fid, index)] = value

    # --- timestamp ------------------------------------------------------------------------------
    def set_timestamp(self, ms: int) -> None:
        self.timestamp_ms_base = ms - _monotonic_ms()
        self.timestamp_origin = 1

    def timestamp_now(self) -> int:
        """Milliseconds (48 bits) as the host set them, advanced by the time since."""
        return (self.timestamp_ms_base + _monotonic_ms()) & ((1 << 48) - 1)

    # --- effects on the rest of the controller -------------------------------------------------
    def apply_interrupts(self, irq: InterruptAggregator) -> None:
        """Derives interrupt coalescing (FID 08h) and per-vector CD (FID 09h) into `irq`.

        Called after Set Features and after a reset, so the aggregator never disagrees with
        what Get Features reports. Vector 0 (the admin CQ) is never coalesced.
        """
        ic = self.current.get(_INTERRUPT_COALESCING, 0)
        irq.threshold = ic & 0xFF
        irq.time_100us = (ic >> 8) & 0xFF
        irq.coalescing_disabled = {0} | {
            idx for (fid, idx), v in self.indexed.items() if fid == _INTERRUPT_VECTOR_CONFIG and v & _CD
        }

    def async_event_enabled(self, event_type: int, info: int) -> bool:
        """Whether Asynchronous Event Configuration (FID 0Bh) lets this event be reported.

        Only SMART/Health and Notice events are configurable; error, immediate, one-shot, I/O
        command set and vendor events are always reported.
        """
        aec = self.current.get(_ASYNC_EVENT_CONFIG, 0)
        if event_type == _AER_SMART:
            return bool(aec & _SMART_INFO_BITS.get(info, 0xFF))
        if event_type == _AER_NOTICE:
            bits = _NOTICE_INFO_BITS.get(info)
            return bits is None or bool(aec & bits)
        return True
