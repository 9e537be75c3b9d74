"""The speed of the media: a device model's latency and bandwidth applied to command completions.

A real SSD overlaps the commands it has fetched: each is serviced in its own latency while all of
them share the media's bandwidth. So a command that moves `nbytes` completes at

    max(start + latency, the moment the media has moved its bytes after everything before it)

where the second term is a "media busy until" clock advanced by `nbytes / bandwidth` per command.
Under load throughput converges to the bandwidth; at queue depth 1 every command sees its latency.
Idle time gives no credit (a busy clock behind `now` restarts at `now`), so no burst beats the model;
the same holds when the emulator itself is descheduled for longer than the queue keeps the media busy.

One pacer per subsystem, because the media is shared by every controller (PF and VFs), and one
timer thread posts completions as they come due: no thread per command, no sleeping in a
controller engine. A model with all speeds 0 has no pacer, and `nvm_io.finish` completes at once.

Deferred commands and queue life: a deferred completion whose SQ was deleted or reset meanwhile is
dropped by `Controller.complete` (the SQ object is gone). Delete I/O SQ takes the SQ's outstanding
commands first (`abort_queue`) and completes them with Command Aborted due to SQ Deletion. Whoever
completes a command first claims it, under the controller's engine lock, so each gets one CQE.
"""

from __future__ import annotations

import contextlib
import ctypes
import heapq
import logging
import threading
import time
from typing import TYPE_CHECKING

from nvme_lm.device.request import DEFERRED, Request
from nvme_lm.spec import status as st

if TYPE_CHECKING:
    from nvme_lm.device.controller import Controller
    from nvme_lm.device.model import DeviceModel
    from nvme_lm.device.queues import SubmissionQueue

log = logging.getLogger(__name__)

MIB = 1 << 20
PR_SET_TIMERSLACK = 29
# A thread's timed wait wakes tens of µs late (more from a deep CPU idle state), as much as a fast SSD's
# whole latency. The timer measures its own lateness and releases a completion that much before its due
# time (at most MAX_LAG, and at most half the command's service time), so completions land on their due
# time on average instead of always after it.
MAX_LAG = 100e-6
LAG_GAIN = 0.125


class _Pending:
    """One deferred command; `claimed` once the timer or an SQ deletion has taken it."""

    __slots__ = ("claimed", "req", "seq")

    def __init__(self, req: Request, seq: int) -> None:
        self.req = req
        self.seq = seq
        self.claimed = False


def _precise_wakeups() -> None:
    """Linux pads a thread's timed waits by its timer slack (50 µs by default), as much as a fast
    SSD's whole latency; the timer thread asks for 1 ns so completions come due on time."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: coarser wake-ups, still correct
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_TIMERSLACK, 1, 0, 0, 0)


class MediaPacer:
    def __init__(self, read_latency_us: float, write_latency_us: float, bandwidth_mib_s: float) -> None:
        self.read_latency = read_latency_us * 1e-6
        self.write_latency = write_latency_us * 1e-6
        self.byte_time = 1.0 / (bandwidth_mib_s * MIB) if bandwidth_mib_s > 0 else 0.0
        self._busy_until = 0.0
        self._heap: list[tuple[float, int, _Pending]] = []  # (release time, seq, command)
        self._lag = 0.0  # how late the timer's timed waits wake up (moving average)
        self._by_sq: dict[SubmissionQueue, dict[int, _Pending]] = {}
        self._seq = 0
        self._cv = threading.Condition(threading.Lock())
        self._stopped = False
        self.deferred = 0  # commands deferred so far (for tests and statistics)
        self._thread = threading.Thread(target=self._run, name="nvme-media", daemon=True)
        self._thread.start()

    @classmethod
    def for_model(cls, model: DeviceModel) -> MediaPacer | None:
        """A pacer for `model`, or None when it asks for no delay at all (the fast path)."""
        if model.read_latency_us <= 0 and model.write_latency_us <= 0 and model.bandwidth_mib_s <= 0:
            return None
        return cls(model.read_latency_us, model.write_latency_us, model.bandwidth_mib_s)

    # ------------------------------------------------------------------------------ engine side
    def schedule(self, req: Request, nbytes: int, write: bool) -> st.Status:
        """Called by a handler (under its controller's engine lock) once the command's data has
        moved: SUCCESS if it is due already, else DEFERRED with the completion queued."""
        now = time.monotonic()
        due = now + (self.write_latency if write else self.read_latency)
        with self._cv:
            if nbytes and self.byte_time:
                busy = max(now, self._busy_until) + nbytes * self.byte_time
                self._busy_until = busy
                due = max(due, busy)
            if due <= now:
                return st.SUCCESS
            release = due - min(self._lag, (due - now) * 0.5)
            self._seq += 1
            pending = _Pending(req, self._seq)
            heapq.heappush(self._heap, (release, self._seq, pending))
            self._by_sq.setdefault(req.sq, {})[self._seq] = pending
            self.deferred += 1
            if self._heap[0][2] is pending:
                self._cv.notify()  # the timer sleeps towards a later deadline
        return DEFERRED

    def abort_queue(self, sq: SubmissionQueue) -> list[Request]:
        """Claims every command of `sq` still waiting, oldest first, for Delete I/O SQ to abort.
        Call with the SQ's controller engine lock held (admin handlers run under it)."""
        with self._cv:
            pending = self._by_sq.pop(sq, {})
            for p in pending.values():
                p.claimed = True  # the heap entry stays; the timer skips it
        return [pending[seq].req for seq in sorted(pending)]

    def outstanding(self) -> int:
        """Commands deferred and not yet completed (stale ones of reset queues included)."""
        with self._cv:
            return sum(len(v) for v in self._by_sq.values())

    # ------------------------------------------------------------------------------ timer side
    def _run(self) -> None:
        _precise_wakeups()
        heap = self._heap
        while True:
            with self._cv:
                while True:
                    if self._stopped:
                        return
                    now = time.monotonic()
                    if heap and heap[0][0] <= now:
                        break
                    target = heap[0][0] if heap else None
                    if not self._cv.wait(target - now if target is not None else None) and target is not None:
                        late = time.monotonic() - target  # timed out: a wake-up, not a new command
                        self._lag += (min(max(late, 0.0), MAX_LAG) - self._lag) * LAG_GAIN
                batch: list[_Pending] = []
                while heap and heap[0][0] <= now:
                    p = heapq.heappop(heap)[2]
                    if not p.claimed:
                        batch.append(p)
            try:
                self._deliver(batch)
            except Exception:  # the timer must never die: record and go on
                log.exception("media pacer delivery failed")

    def _deliver(self, batch: list[_Pending]) -> None:
        """Completes a batch, one engine-lock hold per controller, and signals its interrupts here:
        what `complete_deferred` does, without waking the engine for them (a thread hop, tens of
        µs, on every paced command). The engine is woken only when it has something to do: a vector
        held back by coalescing, CQEs waiting for CQ slots, or shadow doorbells to re-read."""
        by_ctrl: dict[Controller, list[_Pending]] = {}
        for p in batch:
            by_ctrl.setdefault(p.req.ctrl, []).append(p)
        for ctrl, items in by_ctrl.items():
            # the engine lock orders this against Delete I/O SQ, resets and FLR (see module doc)
            with ctrl._lock:
                for p in items:
                    if self._claim(p):
                        p.req.sq.inflight -= 1
                        ctrl.complete(p.req, st.SUCCESS)
                if ctrl.irq.flush() is not None or ctrl.overflow or ctrl.shadow is not None:
                    ctrl.kick()

    def _claim(self, p: _Pending) -> bool:
        with self._cv:
            if p.claimed:
                return False
            p.claimed = True
            sq = p.req.sq
            mine = self._by_sq.get(sq)
            if mine is not None:
                mine.pop(p.seq, None)
                if not mine:
                    del self._by_sq[sq]
            return True

    def stop(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=5)
