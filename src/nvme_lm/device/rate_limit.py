"""Rate Limiting (TP4176): per-controller token buckets, checked when the controller fetches a command.

Why at fetch: a command the limiter refuses simply stays in its submission queue, as on a device whose
front end is busy. Nothing is failed or queued twice, the guest sees only a slower device, and changing
a limit needs no pause: the next fetch uses the new buckets (docs/rate-limiting.md).

One `ControllerLimiter` per target controller holds up to four buckets: total IOPS, write IOPS, total
bandwidth, write bandwidth (a zero value in Feature 28h = no bucket of that kind). A bucket holds
`BURST_S` (10 ms) of tokens and refills from the monotonic clock, so over any 1 s window the admitted
rate is the limit within ~1%. A command passes when every bucket it draws from holds `min(cost, depth)`
tokens; it then takes its whole cost, so a bucket may go into debt and a command larger than the
bucket (128 KiB against a 10 MiB/s limit) is paced exactly instead of never passing. A refused fetch
records when the tokens will be there (`retry_at`); the engine sleeps until then (`engine_wait`)
instead of spinning.

What counts: every I/O command is one IOP; Write (01h), Write Uncorrectable (04h) and Write Zeroes
(08h) are writes for write IOPS; bandwidth counts the data each command moves over PCIe, i.e. Read
(02h), Write (01h) and Compare (05h), NLB x LBA size; Write alone is write bandwidth. Admin commands are
never limited.

Hard limits always bind. A soft limit binds only while the subsystem is *contended* for that controller:
over the last measurement window (WINDOW_S, 100 ms) the load of all *other* controllers plus the soft
limit itself reaches CONTENTION_LOAD (90%) of the device's capability, in IOPS or in bandwidth
(`DeviceModel.rated_iops`, else `bandwidth_mib_s` in 4 KiB commands; `bandwidth_mib_s`). In words: a soft
limit may be exceeded only with capacity the others leave idle. The controller's own load is left out,
so binding does not switch itself off again (no oscillation). On an unrated device (both capabilities 0)
any I/O from another controller in the window counts as contention. While any soft limit is enabled,
every controller of the subsystem counts its admitted commands so the others' load is known.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from time import monotonic
from typing import TYPE_CHECKING

from nvme_lm.device.features import FeatureSpec
from nvme_lm.spec.opcodes import IoOpcode
from nvme_lm.spec.rate_limit import RLA_HLS, RLA_SLS, RateLimitData

if TYPE_CHECKING:
    from nvme_lm.device.controller import Controller
    from nvme_lm.device.subsystem import NvmSubsystem
    from nvme_lm.spec.commands import SQE

FID_RATE_LIMITING = 0x28
OAES_RLCC = 1 << 22  # Identify Controller OAES: Rate Limiting Configuration Change notices supported
BURST_S = 0.010  # bucket depth, in seconds of the limit
WINDOW_S = 0.100  # load measurement window for soft-limit contention
CONTENTION_LOAD = 0.90
MIN_WAIT_S = 0.0005  # a held engine sleeps at least this long (the bucket depth absorbs the slack)
MAX_WAIT_S = 0.050  # ... and at most this long, so a soft limit that stops binding is noticed soon
MIB = 1 << 20

_WRITE = int(IoOpcode.WRITE)
_WRITE_OPCODES = frozenset({_WRITE, int(IoOpcode.WRITE_UNCORRECTABLE), int(IoOpcode.WRITE_ZEROES)})
_DATA_OPCODES = frozenset({_WRITE, int(IoOpcode.READ), int(IoOpcode.COMPARE)})
# bucket kinds: which cost of a command a bucket draws
_IOPS, _WRITE_IOPS, _BYTES, _WRITE_BYTES = range(4)


class TokenBucket:
    """Tokens per second with a small depth; the owner (one engine thread) refills and takes."""

    __slots__ = ("depth", "rate", "stamp", "tokens")

    def __init__(self, rate: float, now: float) -> None:
        self.rate = float(rate)
        self.depth = max(self.rate * BURST_S, 1.0)
        self.tokens = self.depth
        self.stamp = now

    def shortfall(self, cost: float, now: float) -> float:
        """Refills, then returns the seconds until `cost` may pass (0.0: it may pass now)."""
        t = self.tokens + (now - self.stamp) * self.rate
        self.tokens = t if t < self.depth else self.depth
        self.stamp = now
        need = (cost if cost < self.depth else self.depth) - self.tokens
        return need / self.rate if need > 0 else 0.0


@dataclass(frozen=True, slots=True)
class Limits:
    """A Feature 28h configuration in absolute units (0 = no limit of that kind)."""

    enabled: bool = False
    soft: bool = False
    iops: float = 0.0
    write_iops: float = 0.0
    bytes_s: float = 0.0
    write_bytes_s: float = 0.0

    @classmethod
    def of(cls, data: RateLimitData) -> Limits:
        return cls(data.enabled, data.soft, data.tiops, data.wiops, data.total_bytes_s, data.write_bytes_s)


class ControllerLimiter:
    """The limiter of one target controller; `admit` runs on that controller's engine thread."""

    def __init__(self, domain: RateLimits, cntlid: int) -> None:
        self.domain = domain
        self.cntlid = cntlid
        self.config = RateLimitData()
        self.limits = Limits()
        self._checks: tuple[tuple[TokenBucket, int], ...] = ()
        self._namespaces = domain.subsystem.namespaces
        self.contended = False  # for a soft limit: set by the domain every window
        self.ios = 0  # admitted commands / data bytes since the limiter was attached (owner thread only)
        self.nbytes = 0
        self.held = 0  # commands whose fetch was deferred (each counted once)
        self.refusals = 0  # admission checks that said "not yet" (engine passes while holding)
        self._holding = False
        self.retry_at = 0.0  # monotonic time the held command's tokens will be there (0: none held)

    def configure(self, data: RateLimitData) -> None:
        """New limits at once: fresh buckets (full), swapped in with one assignment each."""
        limits = Limits.of(data)
        now = monotonic()
        checks = [(TokenBucket(rate, now), kind) for rate, kind in (
            (limits.iops, _IOPS), (limits.write_iops, _WRITE_IOPS), (limits.bytes_s, _BYTES),
            (limits.write_bytes_s, _WRITE_BYTES)) if rate]
        self.config = data
        self._checks = tuple(checks)
        self.limits = limits
        self.retry_at = 0.0

    @property
    def binding(self) -> bool:
        lim = self.limits
        return lim.enabled and (not lim.soft or self.contended)

    def admit(self, sqe: SQE) -> bool:
        """Whether the command at the SQ head may be fetched now; counts it if so."""
        op = sqe.opcode
        nbytes = 0
        if op in _DATA_OPCODES:
            ns = self._namespaces.get(sqe.nsid)
            if ns is not None:
                nbytes = ((sqe.cdw12 & 0xFFFF) + 1) << ns.lba_shift
        lim = self.limits
        if lim.enabled:
            now = monotonic()
            if lim.soft:
                self.domain.refresh(now)
            if not lim.soft or self.contended:
                checks = self._checks
                write = op in _WRITE_OPCODES
                costs = (1, 1 if write else 0, nbytes, nbytes if op == _WRITE else 0)
                wait = 0.0
                for bucket, kind in checks:
                    cost = costs[kind]
                    if cost:
                        w = bucket.shortfall(cost, now)
                        if w > wait:
                            wait = w
                if wait:
                    self.retry_at = now + wait
                    self.refusals += 1
                    if not self._holding:
                        self._holding = True
                        self.held += 1
                    return False
                self._holding = False
                for bucket, kind in checks:
                    bucket.tokens -= costs[kind]
        self.ios += 1
        self.nbytes += nbytes
        return True

    def engine_wait(self, wait: float | None) -> float | None:
        """The engine's next sleep: no longer than until the held command's tokens are there."""
        if not self.retry_at:
            return wait
        t = min(max(self.retry_at - monotonic(), MIN_WAIT_S), MAX_WAIT_S)
        self.retry_at = 0.0
        return t if wait is None or t < wait else wait


class RateLimits:
    """The subsystem's rate limits: one limiter per target controller, the configuration generation
    (log page 28h GC) and the load measurement that decides when soft limits bind."""

    def __init__(self, subsystem: NvmSubsystem) -> None:
        self.subsystem = subsystem
        m = subsystem.model
        self.capacity_bytes_s = m.bandwidth_mib_s * MIB
        self.capacity_iops = m.rated_iops or m.bandwidth_mib_s * 256  # 256 4-KiB commands per MiB
        self.limiters: dict[int, ControllerLimiter] = {}
        self.generation = 0
        self.rates: dict[int, tuple[float, float]] = {}  # cntlid -> (IOPS, bytes/s) over the last window
        self._snapshot: dict[int, tuple[int, int]] = {}
        self._window_start = monotonic()
        self._next_roll = 0.0
        self._lock = threading.Lock()

    # --- configuration (Set Features 28h, on the managing controller's engine thread) -----------------
    def limiter(self, cntlid: int) -> ControllerLimiter:
        lim = self.limiters.get(cntlid)
        if lim is None:
            lim = self.limiters[cntlid] = ControllerLimiter(self, cntlid)
        return lim

    def config(self, cntlid: int) -> RateLimitData:
        lim = self.limiters.get(cntlid)
        return lim.config if lim is not None else RateLimitData()

    def soft_limited(self) -> list[int]:
        return [c for c, lim in list(self.limiters.items()) if lim.limits.enabled and lim.limits.soft]

    def configure(self, cntlid: int, data: RateLimitData) -> bool:
        """Applies `data` to controller `cntlid` now; returns whether the configuration changed."""
        lim = self.limiter(cntlid)
        changed = lim.config.encode() != data.encode()
        lim.configure(data)
        if changed:
            self.generation = (self.generation + 1) & 0xFFFFFFFF
        self._attach()
        ctrl = self.subsystem.controllers.get(cntlid)
        if ctrl is not None:
            ctrl.kick()  # an engine asleep on the old limit's refill time re-checks at once
        return changed

    def _attach(self) -> None:
        """Gives each controller's engine its limiter, or None when nothing needs checking or counting."""
        counting = bool(self.soft_limited())
        for cntlid, ctrl in list(self.subsystem.controllers.items()):
            lim = self.limiter(cntlid) if counting else self.limiters.get(cntlid)
            ctrl.rate_limiter = lim if lim is not None and (counting or lim.limits.enabled) else None

    # --- load measurement (any engine thread holding a soft limit) ----------------------------------
    def refresh(self, now: float) -> None:
        """Once per window: per-controller rates, then whether each soft limit is contended."""
        if now < self._next_roll or not self._lock.acquire(blocking=False):
            return
        try:
            dt = now - self._window_start
            if dt <= 0:
                return
            rates: dict[int, tuple[float, float]] = {}
            for cntlid, lim in list(self.limiters.items()):
                ios, nbytes = lim.ios, lim.nbytes
                pi, pb = self._snapshot.get(cntlid, (ios, nbytes))
                rates[cntlid] = ((ios - pi) / dt, (nbytes - pb) / dt)
                self._snapshot[cntlid] = (ios, nbytes)
            self.rates = rates
            total_iops = sum(r[0] for r in rates.values())
            total_bps = sum(r[1] for r in rates.values())
            for cntlid in self.soft_limited():
                own = rates.get(cntlid, (0.0, 0.0))
                self.limiters[cntlid].contended = self._contended(
                    self.limiters[cntlid].limits, total_iops - own[0], total_bps - own[1])
            self._window_start = now
            self._next_roll = now + WINDOW_S
        finally:
            self._lock.release()

    def _contended(self, lim: Limits, others_iops: float, others_bps: float) -> bool:
        cap_i, cap_b = self.capacity_iops, self.capacity_bytes_s
        if cap_i <= 0 and cap_b <= 0:
            return others_iops > 0
        if cap_i > 0 and others_iops + (lim.iops or lim.write_iops) >= CONTENTION_LOAD * cap_i:
            return True
        return cap_b > 0 and others_bps + (lim.bytes_s or lim.write_bytes_s) >= CONTENTION_LOAD * cap_b

    # --- what the managing controller reports --------------------------------------------------------
    def hard_allocated(self) -> tuple[float, float]:
        """(IOPS, bytes/s) promised away by enabled hard limits (total values), for 'available' fields."""
        iops = sum(lim.limits.iops for lim in self.limiters.values() if lim.limits.enabled and not lim.limits.soft)
        bps = sum(lim.limits.bytes_s for lim in self.limiters.values()
                  if lim.limits.enabled and not lim.limits.soft)
        return iops, bps


# --------------------------------------------------------------------------------------------- wiring
def install(primary: Controller) -> RateLimits:
    """Makes `primary` (the PF, the only controller that may manage limits) support FID 28h, and gives the
    subsystem its RateLimits. A VF has no FID 28h in its feature table: Set/Get Features 28h on a VF is
    Invalid Field, as for any feature a controller does not support."""
    sub = primary.subsystem
    if sub.rate_limits is None:
        sub.rate_limits = RateLimits(sub)
    primary.features.specs[FID_RATE_LIMITING] = FeatureSpec(FID_RATE_LIMITING, 0, saveable=False)
    primary.features.current.setdefault(FID_RATE_LIMITING, 0)
    return sub.rate_limits


def manages_limits(ctrl: Controller) -> bool:
    return ctrl.subsystem.rate_limits is not None and FID_RATE_LIMITING in ctrl.features.specs


def oaes_bits(ctrl: Controller) -> int:
    """OAES bit 22 (RLCC): every controller of a subsystem with rate limiting can be told its limit changed."""
    return OAES_RLCC if ctrl.subsystem.rate_limits is not None else 0


def identify_fields(ctrl: Controller) -> dict[str, int]:
    """Identify NVM CNS 06h RLA/SLMC: hard and soft limits supported, on every controller (0's based SLMC)
    of the subsystem, reported by the controller that manages them; zero elsewhere."""
    if not manages_limits(ctrl):
        return {}
    return {"rla": RLA_HLS | RLA_SLS, "slmc": max(len(ctrl.subsystem.controllers), ctrl.model.max_vfs + 1) - 1}


__all__ = [
    "BURST_S",
    "CONTENTION_LOAD",
    "FID_RATE_LIMITING",
    "OAES_RLCC",
    "WINDOW_S",
    "ControllerLimiter",
    "Limits",
    "RateLimits",
    "TokenBucket",
    "identify_fields",
    "install",
    "manages_limits",
    "oaes_bits",
]
