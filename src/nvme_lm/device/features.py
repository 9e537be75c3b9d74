"""Feature values of one controller: current, saved and default, per FID.

Values are the CDW11 dword of Set Features (and DW0 of Get Features). Handlers in
`admin/features.py` validate; this module only keeps the numbers and knows which FIDs are
saveable, changeable and namespace specific.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
    timestamp_ms_base: int = 0  # FID 0Eh: host-set time minus monotonic time at Set
    timestamp_origin: int = 0

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Controller reset: current values revert to saved ones, else to defaults."""
        self.current = {fid: self.saved.get(fid, s.default) for fid, s in self.specs.items()}

    def get(self, fid: int) -> int:
        return self.current[fid]

    def set(self, fid: int, value: int, save: bool = False) -> None:
        self.current[fid] = value
        if save:
            self.saved[fid] = value
