"""MSI-X: a table of interrupt vectors with per-vector and function-wide masking.

A masked vector that fires sets its pending bit; unmasking delivers it. Delivery calls the
sink the host connected (its interrupt controller), with the vector number.
"""

from __future__ import annotations

import threading
from collections.abc import Callable


class MsixTable:
    def __init__(self, nvectors: int) -> None:
        if nvectors < 1:
            raise ValueError("an MSI-X capability has at least one vector")
        self.nvectors = nvectors
        self.enabled = False
        self.function_mask = False
        self._masked = [True] * nvectors  # vectors come out of reset masked
        self._pending = [False] * nvectors
        self._sink: Callable[[int], None] | None = None
        self._lock = threading.Lock()
        self.delivered = [0] * nvectors

    def connect(self, sink: Callable[[int], None] | None) -> None:
        """The host's interrupt controller: called with the vector number on each interrupt."""
        with self._lock:
            self._sink = sink
        self._flush()

    def enable(self, on: bool = True) -> None:
        with self._lock:
            self.enabled = on
        if on:
            self._flush()

    def mask(self, vector: int, masked: bool) -> None:
        self._check(vector)
        with self._lock:
            self._masked[vector] = masked
        if not masked:
            self._flush()

    def set_function_mask(self, masked: bool) -> None:
        with self._lock:
            self.function_mask = masked
        if not masked:
            self._flush()

    def is_masked(self, vector: int) -> bool:
        self._check(vector)
        return self._masked[vector]

    def is_pending(self, vector: int) -> bool:
        self._check(vector)
        return self._pending[vector]

    def fire(self, vector: int) -> None:
        """The device signals `vector`; delivered now, or left pending while masked."""
        if not 0 <= vector < self.nvectors:
            return  # a vector beyond the table is dropped, as the PCIe spec leaves it undefined
        with self._lock:
            if not self.enabled or self.function_mask or self._masked[vector] or self._sink is None:
                self._pending[vector] = True
                return
            self.delivered[vector] += 1
            sink = self._sink
        sink(vector)

    def reset(self) -> None:
        """FLR: back to masked, nothing pending, disabled."""
        with self._lock:
            self.enabled = False
            self.function_mask = False
            self._masked = [True] * self.nvectors
            self._pending = [False] * self.nvectors

    def resize(self, nvectors: int) -> None:
        """New Table Size (an SR-IOV VF's follows the VI resources assigned to it); every entry
        comes back masked with nothing pending, as after a reset."""
        if nvectors < 1:
            raise ValueError("an MSI-X capability has at least one vector")
        with self._lock:
            self.nvectors = nvectors
            self._masked = [True] * nvectors
            self._pending = [False] * nvectors
            self.delivered = [0] * nvectors

    def _flush(self) -> None:
        """Delivers pending vectors that are now unmasked (under the lock, so none is lost)."""
        with self._lock:
            if not self.enabled or self.function_mask or self._sink is None:
                return
            due = [v for v in range(self.nvectors) if self._pending[v] and not self._masked[v]]
            for v in due:
                self._pending[v] = False
                self.delivered[v] += 1
            sink = self._sink
        for v in due:
            sink(v)

    def _check(self, vector: int) -> None:
        if not 0 <= vector < self.nvectors:
            raise IndexError(f"MSI-X vector {vector} outside a table of {self.nvectors}")
