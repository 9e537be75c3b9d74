"""Latency recording: one int64 nanosecond sample per I/O, percentiles on demand.

Samples go into an `array('q')` (a C append, no Python object per sample kept alive) and are
viewed as a numpy array only when a summary is asked for, so recording stays off the profile
of the I/O path it measures.
"""

from __future__ import annotations

from array import array
from collections.abc import Iterable

import numpy as np

DEFAULT_PERCENTILES: tuple[float, ...] = (50.0, 90.0, 99.0, 99.9)


def percentile_key(p: float) -> str:
    """`50.0 -> "p50"`, `99.9 -> "p99.9"`: the names used in reports and JSON."""
    return f"p{p:g}"


class LatencyRecorder:
    """Per-I/O latencies in nanoseconds."""

    def __init__(self) -> None:
        self._ns = array("q")
        self.record = self._ns.append  # hot path: a bound C method, no Python frame per sample

    def __len__(self) -> int:
        return len(self._ns)

    def extend(self, samples_ns: Iterable[int]) -> None:
        self._ns.extend(samples_ns)

    def merge(self, other: LatencyRecorder) -> None:
        self._ns.extend(other._ns)

    def clear(self) -> None:
        del self._ns[:]

    @property
    def values(self) -> np.ndarray:
        """A copy of the samples as an int64 numpy array (ns)."""
        return np.frombuffer(self._ns, dtype=np.int64).copy() if len(self._ns) else np.empty(0, np.int64)

    def percentiles_us(self, ps: Iterable[float] = DEFAULT_PERCENTILES) -> dict[str, float]:
        """`{"p50": µs, ...}`; NaN when there are no samples."""
        ps = tuple(ps)
        if not len(self._ns):
            return {percentile_key(p): float("nan") for p in ps}
        v = np.frombuffer(self._ns, dtype=np.int64)
        q = np.percentile(v, ps) / 1000.0
        return {percentile_key(p): float(x) for p, x in zip(ps, q, strict=True)}

    def summary_us(self, ps: Iterable[float] = DEFAULT_PERCENTILES) -> dict[str, float]:
        """Count, mean, min, max and percentiles, in µs (count is a plain number)."""
        out: dict[str, float] = {"count": len(self._ns)}
        if len(self._ns):
            v = np.frombuffer(self._ns, dtype=np.int64)
            out.update(mean=float(v.mean()) / 1000.0, min=float(v.min()) / 1000.0, max=float(v.max()) / 1000.0)
        out.update(self.percentiles_us(ps))
        return out
