"""Interrupt aggregation per MSI-X vector (Interrupt Coalescing, FID 08h/09h).

Completions posted during one pass of the controller are gathered per vector and signalled
once at the end of the pass. With coalescing on, a vector waits until THR+1 completions are
pending or TIME x 100 µs has passed since the first one; the admin CQ is never coalesced.
"""

from __future__ import annotations

import time

from nvme_lm.pcie.msix import MsixTable


class InterruptAggregator:
    def __init__(self, msix: MsixTable) -> None:
        self.msix = msix
        self.threshold = 0  # THR, 0's based
        self.time_100us = 0  # TIME
        self.coalescing_disabled: set[int] = {0}  # vectors with CD=1; vector 0 always
        self._count: dict[int, int] = {}
        self._since: dict[int, float] = {}

    @property
    def coalescing(self) -> bool:
        return self.threshold > 0 or self.time_100us > 0

    def add(self, vector: int) -> None:
        self._count[vector] = self._count.get(vector, 0) + 1
        self._since.setdefault(vector, time.monotonic())

    def flush(self) -> float | None:
        """Signals every vector that is due; returns seconds until the next deadline, or None."""
        if not self._count:
            return None
        now = time.monotonic()
        wait: float | None = None
        limit = self.time_100us * 1e-4
        for vector in list(self._count):
            n = self._count[vector]
            if (not self.coalescing or vector in self.coalescing_disabled or n > self.threshold
                    or now - self._since[vector] >= limit):
                del self._count[vector]
                del self._since[vector]
                self.msix.fire(vector)
            else:
                left = limit - (now - self._since[vector])
                wait = left if wait is None else min(wait, left)
        return wait

    def reset(self) -> None:
        self._count.clear()
        self._since.clear()
        self.threshold = 0
        self.time_100us = 0
        self.coalescing_disabled = {0}
