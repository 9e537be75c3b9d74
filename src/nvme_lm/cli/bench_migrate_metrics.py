"""The figures of `nvme-lm bench migrate`, computed from migration reports alone (pure functions, so the
tests can check each against synthetic reports)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable
from typing import Any

import numpy as np

MIB = 1 << 20
KEYS = ("precopy_ratio", "bytes_ratio", "blackout_p50_ms", "blackout_p99_ms", "capacity_ratio",
        "converged_with_throttle", "converged_without_throttle", "throughput_kept")
GOALS: dict[str, tuple[str, float | bool]] = {  # key -> (comparison, goal)
    "precopy_ratio": ("<=", 1.5), "bytes_ratio": ("<=", 1.05), "blackout_p50_ms": ("<=", 50.0),
    "blackout_p99_ms": ("<=", 150.0), "capacity_ratio": ("<=", 1.2), "converged_with_throttle": ("==", True),
    "converged_without_throttle": ("==", False), "throughput_kept": (">=", 0.5),
}
WARMUP_S = 0.5  # guest time left out of the "before the migration" rate (the vCPUs ramping up)



def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def window_ios(timeline: dict[str, Any], a: float, b: float) -> float:
    """Guest completions between guest times `a` and `b` (seconds since its t0), from the report's
    timeline bins (the edge bins counted pro rata)."""
    bin_s = float(timeline["bin_s"])
    counts = np.asarray(timeline["iops"], dtype=np.float64) * bin_s
    if not len(counts) or b <= a:
        return 0.0
    cum = np.concatenate(([0.0], np.cumsum(counts)))

    def at(t: float) -> float:
        x = max(t, 0.0) / bin_s
        i = min(int(x), len(counts))
        return float(cum[i] + (counts[i] * (x - i) if i < len(counts) else 0.0))

    return at(b) - at(a)


def window_iops(timeline: dict[str, Any], a: float, b: float) -> float:
    return window_ios(timeline, a, b) / (b - a) if b > a else 0.0


def _leg_end(leg: dict[str, Any]) -> float:
    """Until when the VM ran at the source during this leg: the pause, or the end of a failed leg."""
    return leg["t_pause"] if _finite(leg.get("t_pause")) else leg["t_end"]


def write_share(report: dict[str, Any]) -> float:
    g = report["guest"]
    return g["writes"] / g["ios"] if g["ios"] else 0.0


def switch_expectation_ms(leg: dict[str, Any]) -> float:
    """What the pass that decided to switch over predicted for the rest (remaining / copy rate), in ms;
    inf when no pass decided (a failed leg)."""
    deciding = [p for p in leg["pass_table"] if p["kind"] != "final" and p.get("decision")]
    if not deciding or not leg["ok"]:
        return math.inf
    p = deciding[-1]
    rate = p["copy_rate_mib_s"] * MIB
    return p["remaining_bytes"] / rate * 1000.0 if rate > 0 else math.inf


def leg_summary(leg: dict[str, Any]) -> dict[str, Any]:
    table = leg["pass_table"]
    decisions = [p.get("decision", "") for p in table if p.get("decision")]
    return {
        "leg": leg["leg"], "ok": leg["ok"], "error": leg["error"], "total_s": leg["total_s"],
        "passes": leg["passes"], "bytes_lba": leg["bytes_lba"], "bytes_ram": leg["bytes_ram"],
        "allocated_bytes": leg["allocated_bytes"], "blackout_ms": leg["blackout_ms"],
        "engine_pause_ms": leg["engine_pause_ms"],
        "pass0_s": table[0]["duration_s"] if table else math.nan,
        "max_write_limit_mib_s": max((p.get("write_limit_mib_s", 0.0) for p in table), default=0.0),
        "min_write_limit_mib_s": min((p.get("write_limit_mib_s", 0.0) for p in table
                                      if p.get("write_limit_mib_s")), default=0.0),
        "last_decision": decisions[-1] if decisions else "",
    }


def _fastest(reports: list[dict[str, Any]], key: Callable[[dict[str, Any]], float]) -> dict[str, Any]:
    """The first leg of the report whose leg `key` is smallest (of the runs whose leg succeeded, if any)."""
    legs = [r["legs"][0] for r in reports if r["legs"]]
    good = [leg for leg in legs if leg["ok"]] or legs
    return min(good, key=key)


def precopy_metrics(reports: list[dict[str, Any]], baseline: dict[str, Any]) -> dict[str, Any]:
    """Pass 0 of the idle VM (the fastest of `reports`: the one least disturbed by the rest of the machine)
    against the baseline copy."""
    leg = _fastest(reports, lambda leg: leg["pass_table"][0]["duration_s"])
    p0 = leg["pass_table"][0]
    secs = p0["duration_s"]
    return {
        "precopy_ratio": secs / baseline["seconds"],
        "pass0_s": secs, "pass0_lba_bytes": p0["lba_bytes"], "pass0_ram_bytes": p0["ram_bytes"],
        "pass0_mib_s": (p0["lba_bytes"] + p0["ram_bytes"]) / MIB / secs if secs else 0.0,
        "leg_s": leg["total_s"], "leg_ratio": leg["total_s"] / baseline["seconds"],
        "allocated_bytes": leg["allocated_bytes"], "baseline_s": baseline["seconds"],
        "baseline_min_s": baseline["min_s"], "baseline_max_s": baseline["max_s"],
        "baseline_mib_s": baseline["bytes"] / MIB / baseline["seconds"],
        "userspace_s": baseline["userspace_seconds"],
        "userspace_ratio": secs / baseline["userspace_seconds"], "baseline": baseline["what"], "ok": leg["ok"],
        "runs": len(reports),
        "pass0_s_all": [r["legs"][0]["pass_table"][0]["duration_s"] for r in reports if r["legs"]],
    }


def bytes_metrics(reports: list[dict[str, Any]], block_size: int) -> dict[str, Any]:
    """Engine LBA bytes over allocated + re-dirtied bytes, summed over the successful legs of `reports`."""
    moved = allocated = redirtied = 0.0
    per_leg = []
    for report in reports:
        share = write_share(report)
        for leg in report["legs"]:
            if not leg["ok"] or not leg["pass_table"]:
                continue
            writes = window_ios(report["timeline"], leg["pass_table"][0]["t_start"], leg["t_pause"]) * share
            r = writes * block_size
            moved += leg["bytes_lba"]
            allocated += leg["allocated_bytes"]
            redirtied += r
            per_leg.append(leg["bytes_lba"] / (leg["allocated_bytes"] + r) if leg["allocated_bytes"] + r else math.nan)
    denom = allocated + redirtied
    return {"bytes_ratio": moved / denom if denom else math.nan, "bytes_lba": int(moved),
            "allocated_bytes": int(allocated), "redirtied_bytes": int(redirtied),
            "write_share": statistics.fmean(write_share(r) for r in reports) if reports else math.nan,
            "legs": len(per_leg), "per_leg_min": min(per_leg, default=math.nan),
            "per_leg_max": max(per_leg, default=math.nan)}


def blackout_metrics(reports: list[dict[str, Any]]) -> dict[str, Any]:
    """Percentiles of the guest-seen blackout (and the engine's pause) over the successful legs of `reports`."""
    every = [leg for report in reports for leg in report["legs"]]
    legs = [leg for leg in every if leg["ok"] and _finite(leg["blackout_ms"])]
    b = np.asarray([leg["blackout_ms"] for leg in legs], dtype=np.float64)
    e = np.asarray([leg["engine_pause_ms"] for leg in legs], dtype=np.float64)
    steps: dict[str, list[float]] = {}
    for leg in legs:
        for k, v in leg.get("blackout_steps_ms", {}).items():
            steps.setdefault(k.strip(), []).append(v)

    def pct(a: np.ndarray, q: float) -> float:
        return float(np.percentile(a, q)) if len(a) else math.nan

    return {"blackout_p50_ms": pct(b, 50), "blackout_p99_ms": pct(b, 99), "blackout_max_ms": pct(b, 100),
            "engine_pause_p50_ms": pct(e, 50), "engine_pause_p99_ms": pct(e, 99), "legs_ok": len(legs),
            "legs": len(every), "blackouts_ms": [round(float(x), 1) for x in b],
            "steps_mean_ms": {k: round(statistics.fmean(v), 2) for k, v in steps.items()},
            "leg_s_mean": statistics.fmean(leg["total_s"] for leg in legs) if legs else math.nan,
            "failed_legs": [leg["error"] for leg in every if not leg["ok"]], "runs": len(reports),
            "guest_errors": sum(r["guest_errors"] for r in reports),
            "verify_failures": sum(r["verify_failures"] for r in reports)}


def capacity_metrics(bigs: list[dict[str, Any]], smalls: list[dict[str, Any]]) -> dict[str, Any]:
    """Leg time, the fastest run of each (HELLO to DONE: provisioning, Get LBA Status, pre-copy, switchover)."""
    b = _fastest(bigs, lambda leg: leg["total_s"])
    s = _fastest(smalls, lambda leg: leg["total_s"])
    return {"big_leg_s_all": [r["legs"][0]["total_s"] for r in bigs if r["legs"]],
            "small_leg_s_all": [r["legs"][0]["total_s"] for r in smalls if r["legs"]],
            "capacity_ratio": b["total_s"] / s["total_s"], "big_leg_s": b["total_s"], "small_leg_s": s["total_s"],
            "big_pass0_s": b["pass_table"][0]["duration_s"], "small_pass0_s": s["pass_table"][0]["duration_s"],
            "pass0_ratio": b["pass_table"][0]["duration_s"] / s["pass_table"][0]["duration_s"],
            "big_allocated_bytes": b["allocated_bytes"], "small_allocated_bytes": s["allocated_bytes"],
            "ok": b["ok"] and s["ok"]}


def throttle_metrics(report: dict[str, Any], *, target_ms: float, block_size: int,
                     link_mib_s: float) -> dict[str, Any]:
    """One throttling-case run: converged (leg ok, guest blackout <= target), throughput kept, the guest's
    write rate before the migration against the link."""
    legs = report["legs"]
    tl = report["timeline"]
    if not legs:
        return {"ok": False, "converged": False, "precopy_converged": False, "error": report["error"],
                "throughput_kept": math.nan, "passes": 0, "blackout_ms": math.nan, "engine_pause_ms": math.nan}
    leg = legs[0]
    before = window_iops(tl, WARMUP_S, leg["t_start"])
    during = window_iops(tl, leg["t_start"], _leg_end(leg))
    limited = [p["t_start"] for p in leg["pass_table"] if p.get("write_limit_mib_s") and p["kind"] != "final"]
    throttled = window_iops(tl, limited[0], _leg_end(leg)) if limited else math.nan
    start = leg.get("guest_at_start") or {}
    share = start["writes"] / start["ios"] if start.get("ios") else write_share(report)  # the mix before any throttle
    writes_mib_s = before * share * block_size / MIB
    blackout = leg["blackout_ms"]
    within = leg["ok"] and _finite(blackout) and blackout <= target_ms
    return {
        **leg_summary(leg),
        "converged": bool(within),
        "precopy_converged": switch_expectation_ms(leg) <= target_ms,  # the rest fit the target when it switched
        "switch_expected_ms": switch_expectation_ms(leg),
        "iops_before": before, "iops_during": during,
        "throughput_kept": during / before if before else math.nan,
        "throttled_s": _leg_end(leg) - limited[0] if limited else 0.0,
        "throughput_kept_throttled": throttled / before if before and limited else math.nan,
        "guest_write_mib_s": writes_mib_s, "link_mib_s": link_mib_s,
        "write_to_link": writes_mib_s / link_mib_s if link_mib_s else math.nan,
        "guest_errors": report["guest_errors"], "verify_failures": report["verify_failures"],
        "report_ok": report["ok"],
    }


def infrastructure_failure(report: dict[str, Any]) -> str | None:
    """Why a run failed for the test bed's sake rather than the engine's measured behaviour (no leg ran,
    the agents failed, a PF copy command timed out), or None (it succeeded, or its policy gave up / timed out)."""
    if not report["legs"]:
        return report["error"] or "no leg ran"
    for leg in report["legs"]:
        if not leg["ok"] and leg["error"] and ("NvmeTimeout" in leg["error"] or "StreamClosed" in leg["error"]):
            return leg["error"]
    if report["error"] and "OrchestrationError" in report["error"]:
        return report["error"]
    return None


def goals_met(result: dict[str, Any]) -> dict[str, bool]:
    out = {}
    for key, (op, goal) in GOALS.items():
        v = result.get(key)
        if op == "==":
            out[key] = v is goal
        elif not _finite(v):
            out[key] = False
        else:
            out[key] = v <= goal if op == "<=" else v >= goal  # type: ignore[operator]
    return out
