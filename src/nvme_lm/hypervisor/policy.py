"""When to switch over, when and how hard to throttle, when to give up.

After every pass the engine hands the policy what it measured (`PassFigures`) and gets a `Decision`.

`predictive` (the default, ours): switch when what is left would move within the downtime target at
the measured copy rate. Otherwise, if the guest dirties faster than a pass can shrink the rest (the
dirty rate is more than half the copy rate), throttle the guest's *writes* through the device's own
rate limit (TP4176 write bandwidth on the source VF) to just what lets each pass halve the rest.
Reads are left alone while the namespace is what is left to move, so the guest keeps most of its
throughput. They dirty guest RAM, though: the device DMAs every read into the guest's buffers, so a
guest with 16 reads of 16 KiB in flight rewrites 256 KiB of RAM in any pass, however short, and at a
slow link that alone is more than the target. When the namespace's part of the rest fits and RAM's
does not, the read side is limited too (the total-bandwidth bucket, reads + writes) for the few last
passes, to what lets each pass halve RAM's part. If the rest stops shrinking for
`stall_passes` passes while throttled as hard as allowed, or `give_up_s` passes, give up cleanly (the
VM keeps running at the source, the limit is released).

The simple policies users know, for comparison (`bench migrate`):
- `fixed`: always `max_passes` passes, then switch, whatever is left.
- `auto-converge`: QEMU's auto-converge steps: when a pass does not converge, throttle 20%, then 10%
  more per pass (here on guest writes, the only throttle a hypervisor has over a direct-assigned VF).
- `local-minimum`: switch at the first pass whose rest is larger than the previous pass's.

Only guest writes to the namespace can be throttled by the device; RAM the vCPUs dirty cannot. When RAM
alone outruns the copy, no write limit helps: the predictive policy says so and gives up.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

MIB = 1 << 20
CONVERGE = 0.5  # a pass must leave at most this share of what it moved: the rest halves each pass
MIN_WRITE_MIB_S = 1.0  # the finest TP4176 bandwidth unit (BWSF 0)
# What a switchover costs besides moving the rest (suspend, state both ways, VM rebuild, resume): about
# 25-35 ms measured on the 2-core machine (the blackout steps of `nvme-lm demo`); the policy budgets it.
SWITCHOVER_COST_MS = 25.0


@dataclass(frozen=True)
class PassFigures:
    """What one pass measured."""

    pass_no: int
    remaining_bytes: int  # dirty when the pass ended
    copy_rate: float  # bytes/s the pass moved
    lba_dirty_rate: float  # bytes/s of namespace blocks changed during the pass
    ram_dirty_rate: float  # bytes/s of guest pages changed during the pass
    elapsed_s: float  # since the migration started
    write_limit_mib_s: float | None = None  # the throttle in force during the pass (None: none)
    remaining_ram_bytes: int = 0  # the guest-RAM part of remaining_bytes
    read_limit_mib_s: float | None = None  # the read throttle in force during the pass (None: none)


@dataclass(frozen=True)
class Decision:
    switch: bool = False
    write_limit_mib_s: float | None = None  # None: leave the throttle as it is; 0: remove it
    read_limit_mib_s: float | None = None  # the same for reads (set only together with a write limit)
    give_up: bool = False
    why: str = ""


def expected_downtime_ms(remaining_bytes: int, copy_rate: float) -> float:
    if remaining_bytes <= 0:
        return 0.0
    return math.inf if copy_rate <= 0 else remaining_bytes / copy_rate * 1000.0


@dataclass
class ConvergencePolicy:
    """The predictive policy (see the module docstring)."""

    downtime_target_ms: float = 50.0
    max_passes: int = 8
    throttle: bool = True
    give_up_s: float = 0.0  # 0: never (the leg's timeout still applies)
    stall_passes: int = 3
    switchover_cost_ms: float = SWITCHOVER_COST_MS
    name: str = "predictive"
    _history: list[int] = field(default_factory=list)

    def decide(self, f: PassFigures) -> Decision:
        self._history.append(f.remaining_bytes)
        expect = expected_downtime_ms(f.remaining_bytes, f.copy_rate) + self.switchover_cost_ms
        # pass 0 copies long allocated runs; what is left is scattered and copies far slower: its rate
        # says nothing about the rest, so at least one delta pass measures that first
        if expect <= self.downtime_target_ms and (f.pass_no > 0 or f.remaining_bytes == 0):
            return Decision(switch=True, why=f"converged: {f.remaining_bytes} bytes left ~ {expect:.1f} ms")
        if self.give_up_s and f.elapsed_s >= self.give_up_s:
            return Decision(give_up=True, why=f"did not converge within {self.give_up_s:g} s "
                                             f"({f.remaining_bytes} bytes left ~ {expect:.0f} ms)")
        if f.pass_no + 1 >= self.max_passes:
            return Decision(switch=True, why=f"pass budget spent ({self.max_passes}); ~{expect:.1f} ms expected")
        limit = None
        if self.throttle and f.copy_rate > 0:
            budget = CONVERGE * f.copy_rate - f.ram_dirty_rate  # what guest writes may dirty per second
            if budget < MIN_WRITE_MIB_S * MIB:
                if self._stalled(f):
                    return Decision(give_up=True, why="guest RAM alone dirties faster than the copy: "
                                                      "a write limit cannot make it converge")
                limit = MIN_WRITE_MIB_S
            elif f.lba_dirty_rate + f.ram_dirty_rate > CONVERGE * f.copy_rate:
                limit = max(MIN_WRITE_MIB_S, math.floor(budget / MIB))
            elif f.write_limit_mib_s:
                limit = f.write_limit_mib_s  # it works: keep it
        reads = self._read_limit(f, limit) if self.throttle else None
        if reads is not None and limit is None:
            limit = f.write_limit_mib_s or max(MIN_WRITE_MIB_S, math.ceil(f.lba_dirty_rate / MIB))
        if self._stalled(f) and (limit == MIN_WRITE_MIB_S or not self.throttle) and (
                reads is None or reads == f.read_limit_mib_s):
            return Decision(give_up=True, why=f"stalled: {f.remaining_bytes} bytes left after "
                                              f"{self.stall_passes} passes without progress")
        why = f"{f.remaining_bytes} bytes left ~ {expect:.0f} ms > {self.downtime_target_ms:g} ms"
        if limit is not None and limit != f.write_limit_mib_s:
            why += f"; guest writes limited to {limit:g} MiB/s"
        if reads is not None and reads != f.read_limit_mib_s:
            why += f"; guest reads limited to {reads:g} MiB/s (RAM is what is left)"
        return Decision(write_limit_mib_s=limit, read_limit_mib_s=reads, why=why)

    def _read_limit(self, f: PassFigures, write_limit: float | None) -> float | None:
        """A limit on reads when guest RAM's part of the rest takes more than half the room the target leaves
        and the namespace's part alone would fit: reads DMA into RAM; a pass may dirty through them at most
        what halves RAM's part."""
        if f.read_limit_mib_s:
            return f.read_limit_mib_s  # once squeezing, keep it to the end
        if f.copy_rate <= 0 or f.pass_no == 0:
            return None
        room_ms = self.downtime_target_ms - self.switchover_cost_ms
        ram_ms = f.remaining_ram_bytes / f.copy_rate * 1000.0
        lba_ms = (f.remaining_bytes - f.remaining_ram_bytes) / f.copy_rate * 1000.0
        if ram_ms <= room_ms / 2 or lba_ms > room_ms:  # RAM's part is not the problem, or blocks still are
            return None
        writes = write_limit or f.write_limit_mib_s or 0.0
        return float(max(MIN_WRITE_MIB_S, math.floor(CONVERGE * f.copy_rate / MIB - writes)))

    def _stalled(self, f: PassFigures) -> bool:
        h = self._history
        n = self.stall_passes
        return len(h) > n and min(h[-n:]) >= h[-n - 1]


@dataclass
class FixedPasses:
    downtime_target_ms: float = 50.0
    max_passes: int = 8
    name: str = "fixed"

    def decide(self, f: PassFigures) -> Decision:
        if f.pass_no + 1 >= self.max_passes:
            return Decision(switch=True, why=f"pass {f.pass_no + 1} of {self.max_passes}")
        return Decision(why="fixed pass count")


@dataclass
class AutoConverge:
    """QEMU's auto-converge: a first throttle of 20%, then 10% more per non-converging pass."""

    downtime_target_ms: float = 50.0
    max_passes: int = 8
    initial: float = 0.2
    step: float = 0.1
    name: str = "auto-converge"
    _pct: float = 0.0
    _base_mib_s: float = 0.0

    def decide(self, f: PassFigures) -> Decision:
        expect = expected_downtime_ms(f.remaining_bytes, f.copy_rate)
        if expect <= self.downtime_target_ms or f.pass_no + 1 >= self.max_passes:
            return Decision(switch=True, why=f"~{expect:.1f} ms expected")
        if not self._base_mib_s:
            self._base_mib_s = max(f.lba_dirty_rate / MIB, MIN_WRITE_MIB_S)  # the unthrottled write rate
        self._pct = self.initial if not self._pct else min(0.99, self._pct + self.step)
        limit = max(MIN_WRITE_MIB_S, math.floor(self._base_mib_s * (1 - self._pct)))
        return Decision(write_limit_mib_s=limit, why=f"throttle {self._pct:.0%}")


@dataclass
class LocalMinimum:
    """Switch as soon as the rest grows again (or the budget is spent)."""

    downtime_target_ms: float = 50.0
    max_passes: int = 8
    name: str = "local-minimum"
    _last: int | None = None

    def decide(self, f: PassFigures) -> Decision:
        expect = expected_downtime_ms(f.remaining_bytes, f.copy_rate)
        grew = self._last is not None and f.remaining_bytes >= self._last
        self._last = f.remaining_bytes
        if expect <= self.downtime_target_ms or grew or f.pass_no + 1 >= self.max_passes:
            return Decision(switch=True, why="local minimum" if grew else f"~{expect:.1f} ms expected")
        return Decision(why="still shrinking")


POLICIES = ("predictive", "fixed", "auto-converge", "local-minimum")


def make_policy(name: str, *, downtime_target_ms: float, max_passes: int, throttle: bool = True,
                give_up_s: float = 0.0) -> ConvergencePolicy | FixedPasses | AutoConverge | LocalMinimum:
    if name == "predictive":
        return ConvergencePolicy(downtime_target_ms, max_passes, throttle=throttle, give_up_s=give_up_s,
                                 switchover_cost_ms=min(SWITCHOVER_COST_MS, downtime_target_ms / 2))
    if name == "fixed":
        return FixedPasses(downtime_target_ms, max_passes)
    if name == "auto-converge":
        return AutoConverge(downtime_target_ms, max_passes)
    if name == "local-minimum":
        return LocalMinimum(downtime_target_ms, max_passes)
    raise ValueError(f"policy {name!r} is not one of {', '.join(POLICIES)}")
