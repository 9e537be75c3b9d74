"""The guest's I/O timeline: per-bin IOPS and latency, completion gaps, and an HDR latency histogram.

One `Timeline` serves a whole VM: every vCPU thread (one per I/O queue) calls `record(t_done_ns,
latency_ns)` for each completion, so the VM-wide view is what the guest saw, whatever queue an I/O
used. The longest completion gap across a switchover is the guest-seen blackout.

Recording sits on the measured I/O path, so it only appends the (time, latency) pair to an
`array('q')` under one small lock (~0.5 µs). Everything else is folded in bulk with numpy
(`fold()`): bins (count, latency sum and max), gaps between consecutive completions on any queue
longer than `gap_ns`, and the HDR histogram (`hdrh`, µs, 1 µs .. 100 s, 3 significant digits).
`HdrHistogram.record_value` costs ~2.5 µs per call in pure Python, too much per I/O, so samples
reach it as one `record_value(v, count)` per distinct µs value of a folded chunk. Queries fold
first; a recording thread folds when `FOLD_AT` pairs have piled up, unless someone else (the VM's
monitor, calling `fold()` every so often) keeps the pile short.

Times are `time.monotonic_ns()` (the guest clock). The object moves with the VM across a migration
(`state()` / `restore()`), so the gap spanning the switchover runs from the last completion before
the pause (recorded at the source) to the first after the resume (recorded at the destination).
"""

from __future__ import annotations

import threading
from array import array
from typing import Any

import numpy as np
from hdrh.histogram import HdrHistogram

TIMELINE_STATE_VERSION = 1
HDR_LOWEST_US = 1
HDR_HIGHEST_US = 100_000_000  # 100 s
HDR_DIGITS = 3
FOLD_AT = 1 << 16  # (time, latency) pairs a recording thread lets pile up before it folds them (1 MiB)
_FOLD_AT_2 = 2 * FOLD_AT
_BINCOUNT_LIMIT_US = 1 << 16  # distinct µs values below this are counted with bincount, above with unique
_PERCENTILES = (("p50", 50.0), ("p99", 99.0), ("p99.9", 99.9))


def _new_hdr() -> HdrHistogram:
    return HdrHistogram(HDR_LOWEST_US, HDR_HIGHEST_US, HDR_DIGITS)


def _from_bytes(b: bytes) -> np.ndarray:
    return np.frombuffer(b, dtype=np.int64).copy()


class Timeline:
    """VM-wide completion timeline: bins of `bin_ns`, gaps longer than `gap_ns`, latency histogram."""

    def __init__(self, t0_ns: int, bin_ns: int = 10_000_000, gap_ns: int = 1_000_000) -> None:
        if bin_ns <= 0 or gap_ns <= 0:
            raise ValueError("bin_ns and gap_ns must be positive")
        self.t0_ns = int(t0_ns)
        self.bin_ns = int(bin_ns)
        self.gap_ns = int(gap_ns)
        self._lock = threading.Lock()  # guards `_raw` only: the recording path
        self._acquire, self._release = self._lock.acquire, self._lock.release
        self._raw = array("q")  # t_ns, latency_ns, t_ns, latency_ns, ... not folded yet
        self._fold_lock = threading.Lock()  # guards everything below; taken before `_lock`
        self._folded = 0  # completions folded
        self._count = np.zeros(0, np.int64)
        self._sum = np.zeros(0, np.int64)  # latency sum per bin, ns
        self._max = np.zeros(0, np.int64)  # latency max per bin, ns
        self._gap_start = np.zeros(0, np.int64)
        self._gap_end = np.zeros(0, np.int64)
        self.first_ns: int | None = None
        self.last_ns: int | None = None  # latest completion folded (any queue)
        self._hdr = _new_hdr()

    # ------------------------------------------------------------------------------ recording
    def record(self, t_ns: int, latency_ns: int) -> None:
        """One completion at guest time `t_ns` that took `latency_ns` (thread-safe)."""
        self._acquire()  # bound methods, not `with`: half the cost on this path
        try:
            raw = self._raw
            raw.append(t_ns)
            raw.append(latency_ns)
            n = len(raw)
        finally:
            self._release()
        if n >= _FOLD_AT_2 and self._fold_lock.acquire(blocking=False):  # rare; never two folders waiting
            try:
                self._fold_locked()
            finally:
                self._fold_lock.release()

    @property
    def completions(self) -> int:
        with self._lock:
            return self._folded + len(self._raw) // 2

    # ------------------------------------------------------------------------------ folding
    def fold(self) -> None:
        """Folds recorded pairs into bins, gaps and the histogram (call before a pause to keep `state()` short)."""
        with self._fold_lock:
            self._fold_locked()

    def _fold_locked(self) -> None:
        with self._lock:
            raw = self._raw
            if not raw:
                return
            self._raw = array("q")
        pairs = np.frombuffer(raw, dtype=np.int64).reshape(-1, 2)
        order = np.argsort(pairs[:, 0], kind="stable")  # recorders race for the lock: nearly sorted
        t = pairs[order, 0]
        lat = pairs[order, 1]
        self._folded += len(t)
        # bins
        bins = np.maximum((t - self.t0_ns) // self.bin_ns, 0)
        need = int(bins[-1]) + 1
        if need > len(self._count):
            size = max(need, 2 * len(self._count), 64)
            for name in ("_count", "_sum", "_max"):
                old = getattr(self, name)
                new = np.zeros(size, np.int64)
                new[: len(old)] = old
                setattr(self, name, new)
        lo = int(bins[0])
        rel = bins - lo
        self._count[lo:need] += np.bincount(rel, minlength=need - lo)
        self._sum[lo:need] += np.rint(np.bincount(rel, weights=lat, minlength=need - lo)).astype(np.int64)
        starts = np.concatenate(([0], np.flatnonzero(np.diff(bins)) + 1))
        seg_bins = bins[starts]
        self._max[seg_bins] = np.maximum(self._max[seg_bins], np.maximum.reduceat(lat, starts))
        # gaps between consecutive completions, against the latest one seen so far
        prev = np.maximum.accumulate(np.concatenate(([t[0] if self.last_ns is None else self.last_ns], t)))
        before = prev[:-1]
        is_gap = t - before > self.gap_ns
        if is_gap.any():
            self._gap_start = np.concatenate((self._gap_start, before[is_gap]))
            self._gap_end = np.concatenate((self._gap_end, t[is_gap]))
        self.last_ns = int(prev[-1])
        self.first_ns = int(t[0]) if self.first_ns is None else min(self.first_ns, int(t[0]))
        # histogram
        us = np.clip((lat + 500) // 1000, HDR_LOWEST_US, HDR_HIGHEST_US)
        small = us < _BINCOUNT_LIMIT_US
        counts = np.bincount(us[small])
        values = np.flatnonzero(counts)
        record = self._hdr.record_value
        for v, c in zip(values.tolist(), counts[values].tolist(), strict=True):
            record(v, c)
        if not small.all():
            big, big_counts = np.unique(us[~small], return_counts=True)
            for v, c in zip(big.tolist(), big_counts.tolist(), strict=True):
                record(v, c)

    # ------------------------------------------------------------------------------ queries
    def percentiles_us(self) -> dict[str, float]:
        """`{"p50", "p99", "p99.9", "max"}` in µs (HDR, 3 significant digits; max is exact); 0.0 if empty."""
        with self._fold_lock:
            self._fold_locked()
            hdr = self._hdr
            if hdr.get_total_count() == 0:
                return {"p50": 0.0, "p99": 0.0, "p99.9": 0.0, "max": 0.0}
            out = {k: float(hdr.get_value_at_percentile(p)) for k, p in _PERCENTILES}
            out["max"] = float(self._max.max()) / 1000.0
            return out

    @property
    def histogram(self) -> HdrHistogram:
        """The HDR histogram of latencies in µs, every sample recorded so far folded in."""
        with self._fold_lock:
            self._fold_locked()
            return self._hdr

    def longest_gap(self, start_ns: int | None = None, end_ns: int | None = None) -> tuple[int, int, int]:
        """(gap_ns, gap_start_ns, gap_end_ns) of the longest completion gap overlapping [start_ns, end_ns];
        (0, 0, 0) if no gap longer than `gap_ns` overlaps the window."""
        with self._fold_lock:
            self._fold_locked()
            gs, ge = self._gap_start, self._gap_end
        mask = np.ones(len(gs), dtype=bool)
        if start_ns is not None:
            mask &= ge > start_ns
        if end_ns is not None:
            mask &= gs < end_ns
        idx = np.flatnonzero(mask)
        if len(idx) == 0:
            return 0, 0, 0
        j = idx[int(np.argmax(ge[idx] - gs[idx]))]
        return int(ge[j] - gs[j]), int(gs[j]), int(ge[j])

    def gaps(self) -> list[tuple[int, int]]:
        """Every gap longer than `gap_ns` as (start_ns, end_ns), in time order."""
        with self._fold_lock:
            self._fold_locked()
            return list(zip(self._gap_start.tolist(), self._gap_end.tolist(), strict=True))

    def summary(self) -> dict[str, Any]:
        """Per-bin IOPS, mean and max latency (µs), bin 0 starting at t0 (the last bin may be partial)."""
        with self._fold_lock:
            self._fold_locked()
            used = np.flatnonzero(self._count)
            n = int(used[-1]) + 1 if len(used) else 0
            count = self._count[:n].astype(np.float64)
            total = self._sum[:n].astype(np.float64)
            mx = self._max[:n].astype(np.float64)
        bin_s = self.bin_ns / 1e9
        mean = np.divide(total, count, out=np.zeros(n), where=count > 0) / 1000.0
        return {"bin_s": bin_s,
                "iops": np.round(count / bin_s, 1).tolist(),
                "lat_mean_us": np.round(mean, 2).tolist(),
                "lat_max_us": np.round(mx / 1000.0, 2).tolist()}

    # ------------------------------------------------------------------------------ migration
    def state(self) -> dict[str, Any]:
        """Plain data (msgpack-able): bins and gaps as int64 bytes, the histogram in its HDR encoding."""
        with self._fold_lock:
            self._fold_locked()
            used = np.flatnonzero(self._count)
            n = int(used[-1]) + 1 if len(used) else 0
            return {"v": TIMELINE_STATE_VERSION, "t0_ns": self.t0_ns, "bin_ns": self.bin_ns, "gap_ns": self.gap_ns,
                    "completions": self._folded, "first_ns": self.first_ns, "last_ns": self.last_ns,
                    "count": self._count[:n].tobytes(), "sum": self._sum[:n].tobytes(),
                    "max": self._max[:n].tobytes(),
                    "gap_start": self._gap_start.tobytes(), "gap_end": self._gap_end.tobytes(),
                    "hdr": self._hdr.encode() if self._hdr.get_total_count() else b""}

    @classmethod
    def restore(cls, state: dict[str, Any]) -> Timeline:
        if state.get("v") != TIMELINE_STATE_VERSION:
            raise ValueError(f"timeline state version {state.get('v')!r} is not {TIMELINE_STATE_VERSION}")
        t = cls(state["t0_ns"], state["bin_ns"], state["gap_ns"])
        t._folded = state["completions"]
        t.first_ns, t.last_ns = state["first_ns"], state["last_ns"]
        t._count, t._sum, t._max = (_from_bytes(state[k]) for k in ("count", "sum", "max"))
        t._gap_start, t._gap_end = _from_bytes(state["gap_start"]), _from_bytes(state["gap_end"])
        if state["hdr"]:
            t._hdr.decode_and_add(state["hdr"])
        return t


__all__ = ["FOLD_AT", "TIMELINE_STATE_VERSION", "Timeline"]
