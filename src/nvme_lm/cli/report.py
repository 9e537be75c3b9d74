"""A migration report (schema in issue 5's design notes) as rich tables, plain summary lines and a timeline plot.

The engine produces the report as a plain dict (it also goes out as `--json`); this module only reads it.
`check` is the schema gate the CLI runs before rendering, so that a report from another version of the engine
fails with a message naming the key instead of a KeyError deep in a table. The plot uses Agg only (no GUI, safe
in CI and in agents without a display), and matplotlib is imported lazily: `migrate` without `--plot` stays quick.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

REPORT_VERSION = 1
FIGSIZE = (11.0, 6.5)  # inches; the PNG is FIGSIZE * DPI pixels
DPI = 120
MIB = 1 << 20
MAX_EXAMPLES = 20  # verify-failure examples shown by render()


# ------------------------------------------------------------------------------------------ schema
# A spec is: a Python type (int: int but not bool; float: any number but not bool; str; bool), None (the value
# None), a tuple of alternatives, a dict (a record: every key required, extra keys allowed so that a newer
# engine's additions do not break an older renderer), or one of the wrappers below.
@dataclass(frozen=True)
class _ListOf:
    item: Any


@dataclass(frozen=True)
class _MapOf:
    value: Any


@dataclass(frozen=True)
class _OneOf:
    values: tuple[str, ...]


_PASS = {
    "pass": int, "kind": _OneOf(("full", "delta", "final")), "t_start": float, "duration_s": float,
    "lba_bytes": int, "ram_bytes": int, "remaining_bytes": int, "dirty_rate_mib_s": float, "copy_rate_mib_s": float,
}
_LEG = {
    "leg": int, "from": str, "to": str, "ok": bool, "error": (str, None),
    "total_s": float, "passes": int, "bytes_lba": int, "bytes_ram": int, "allocated_bytes": int,
    "engine_pause_ms": float, "blackout_ms": float, "unfetched_at_suspend": int,
    "t_start": float, "t_pause": float, "t_resume": float, "t_end": float,
    "pass_table": _ListOf(_PASS),
}
_GUEST = {
    "ios": int, "reads": int, "writes": int, "trims": int, "errors": int, "timeouts": int,
    "spurious_completions": int, "identity_checks": int, "identity_changes": int,
    "verified_reads": int, "verified_blocks": int, "verify_failures": int,
    "verify_failure_examples": _ListOf(str), "iops": float,
    "latency_us": {"p50": float, "p99": float, "p99.9": float, "max": float},
}
SCHEMA: dict[str, Any] = {
    "version": int, "scenario": str, "hosts": _MapOf({"model": str, "addr": str}),
    "ok": bool, "error": (str, None),
    "blackout_ms": float, "engine_pause_ms": float, "total_s": float, "passes": int,
    "bytes_lba": int, "bytes_ram": int, "allocated_bytes": int,
    "guest_errors": int, "identity_changes": int, "verified_blocks": int, "verify_failures": int,
    "legs": _ListOf(_LEG),
    "guest": _GUEST,
    "timeline": {"bin_s": float, "iops": _ListOf(float), "lat_mean_us": _ListOf(float), "lat_max_us": _ListOf(float)},
}
_LIST_PROBLEMS = 5  # per list; a timeline of 100k bad bins should not produce 100k lines


def _type_name(v: Any) -> str:
    return "None" if v is None else type(v).__name__


def _spec_name(spec: Any) -> str:
    if isinstance(spec, tuple):
        return " or ".join(_spec_name(s) for s in spec)
    if spec is None:
        return "None"
    if spec is float:
        return "number"
    if isinstance(spec, dict):
        return "dict"
    if isinstance(spec, _ListOf):
        return "list"
    if isinstance(spec, _MapOf):
        return "dict"
    return spec.__name__


def _scalar_ok(v: Any, spec: Any) -> bool:
    if spec is None:
        return v is None
    if spec is int:
        return isinstance(v, int) and not isinstance(v, bool)
    if spec is float:
        return isinstance(v, int | float) and not isinstance(v, bool)
    return isinstance(v, spec)


def _check(v: Any, spec: Any, path: str, out: list[str]) -> None:
    where = path or "report"
    if isinstance(spec, dict):
        if not isinstance(v, dict):
            out.append(f"{where}: expected dict, got {_type_name(v)}")
            return
        for key, sub in spec.items():
            p = f"{path}.{key}" if path else key
            if key not in v:
                out.append(f"{p}: missing")
            else:
                _check(v[key], sub, p, out)
    elif isinstance(spec, _ListOf):
        if not isinstance(v, list):
            out.append(f"{where}: expected list, got {_type_name(v)}")
            return
        sub_out: list[str] = []
        for i, item in enumerate(v):
            _check(item, spec.item, f"{path}[{i}]", sub_out)
        out.extend(sub_out[:_LIST_PROBLEMS])
        if len(sub_out) > _LIST_PROBLEMS:
            out.append(f"{where}: {len(sub_out) - _LIST_PROBLEMS} more problems")
    elif isinstance(spec, _MapOf):
        if not isinstance(v, dict):
            out.append(f"{where}: expected dict, got {_type_name(v)}")
            return
        for key, item in v.items():
            _check(item, spec.value, f"{path}.{key}", out)
    elif isinstance(spec, _OneOf):
        if v not in spec.values:
            out.append(f"{where}: expected one of {', '.join(map(repr, spec.values))}, got {v!r}")
    else:
        alternatives = spec if isinstance(spec, tuple) else (spec,)
        if not any(_scalar_ok(v, s) for s in alternatives):
            out.append(f"{where}: expected {_spec_name(spec)}, got {_type_name(v)}")


def check(report: Any) -> list[str]:
    """Problems with a report dict ("path: what is wrong"), empty if it matches the schema.

    Beyond key presence and types: the version must be ours, the timeline's series must be as long as each
    other with a positive bin width, and each leg must name hosts of the report (the plot and the tables
    rely on all three).
    """
    out: list[str] = []
    _check(report, SCHEMA, "", out)
    if not isinstance(report, dict):
        return out
    if _scalar_ok(report.get("version"), int) and report["version"] != REPORT_VERSION:
        out.append(f"version: {report['version']} is not supported (this renderer reads {REPORT_VERSION})")
    tl = report.get("timeline")
    if isinstance(tl, dict):
        if _scalar_ok(tl.get("bin_s"), float) and not tl["bin_s"] > 0:
            out.append(f"timeline.bin_s: must be positive, got {tl['bin_s']!r}")
        lengths = {k: len(tl[k]) for k in ("iops", "lat_mean_us", "lat_max_us") if isinstance(tl.get(k), list)}
        if len(set(lengths.values())) > 1:
            out.append("timeline: series of different lengths (" +
                       ", ".join(f"{k} {n}" for k, n in lengths.items()) + ")")
    hosts, legs = report.get("hosts"), report.get("legs")
    if isinstance(hosts, dict) and isinstance(legs, list):
        for i, leg in enumerate(legs):
            if not isinstance(leg, dict):
                continue
            for end in ("from", "to"):
                name = leg.get(end)
                if isinstance(name, str) and name not in hosts:
                    out.append(f"legs[{i}].{end}: host {name!r} is not in hosts ({', '.join(map(str, hosts))})")
    return out


# ------------------------------------------------------------------------------------------ formatting
def _mib(n: float) -> str:
    return f"{n / MIB:,.1f}"


def _ms(v: float) -> str:
    return f"{v:,.1f} ms" if math.isfinite(v) else "-"


def _us(v: float) -> str:
    """Latencies span 50 µs to whole blackouts: one decimal only where it means something."""
    if not math.isfinite(v):
        return "-"
    return f"{v:,.0f}" if v >= 100 else f"{v:.1f}"


def _passes(n: int) -> str:
    return f"{n} pass" if n == 1 else f"{n} passes"


def _route(report: dict[str, Any], arrow: str) -> str:
    """'a → b → a (a: vendor-a, b: vendor-b)': the hosts in the order the VM visits them, then their models."""
    legs = report["legs"]
    hosts = report["hosts"]
    names = [legs[0]["from"], *(leg["to"] for leg in legs)] if legs else list(hosts)
    models = ", ".join(f"{name}: {h['model']}" for name, h in hosts.items())
    return f"{f' {arrow} '.join(names) if legs else ', '.join(names)} ({models})"


def _zero_cell(n: int) -> Text:
    """A count that must be zero: green when it is, red when not, so a glance at the table is enough."""
    return Text(f"{n:,}", style="green" if n == 0 else "bold red")


def _result(ok: bool, error: str | None) -> Text:
    if ok:
        return Text("OK", style="bold green")
    t = Text("FAILED", style="bold red")
    if error:
        t.append(f": {error}", style="red")
    return t


# ------------------------------------------------------------------------------------------ render
def _migration_table(r: dict[str, Any]) -> Table:
    g = r["guest"]
    lat = g["latency_us"]
    t = Table(title=Text(f"Migration {r['scenario']}: {_route(r, '→')}"), title_justify="left",
              show_header=False, box=box.SIMPLE)
    t.add_column("figure", style="bold")
    t.add_column("value")
    t.add_row("result", _result(r["ok"], r["error"]))
    t.add_row("blackout (guest-seen)", _ms(r["blackout_ms"]))
    t.add_row("engine pause → resume", _ms(r["engine_pause_ms"]))
    t.add_row("total", f"{r['total_s']:,.2f} s")
    t.add_row("passes", f"{r['passes']:,}")
    t.add_row("LBA copied", f"{_mib(r['bytes_lba'])} MiB")
    t.add_row("RAM copied", f"{_mib(r['bytes_ram'])} MiB")
    t.add_row("allocated", f"{_mib(r['allocated_bytes'])} MiB")
    t.add_row("guest I/Os", f"{g['ios']:,} ({g['reads']:,} reads, {g['writes']:,} writes, {g['trims']:,} trims)")
    t.add_row("guest IOPS", f"{g['iops']:,.0f}")
    t.add_row("latency p50 / p99 / p99.9 / max",
              f"{_us(lat['p50'])} / {_us(lat['p99'])} / {_us(lat['p99.9'])} / {_us(lat['max'])} µs")
    t.add_row("guest errors", _zero_cell(r["guest_errors"]))
    t.add_row("timeouts", _zero_cell(g["timeouts"]))
    t.add_row("spurious completions", _zero_cell(g["spurious_completions"]))
    t.add_row("identity checks", f"{g['identity_checks']:,}")
    t.add_row("identity changes", _zero_cell(r["identity_changes"]))
    t.add_row("verified blocks", f"{r['verified_blocks']:,} (in {g['verified_reads']:,} reads)")
    t.add_row("verify failures", _zero_cell(r["verify_failures"]))
    return t


def _leg_title(r: dict[str, Any], leg: dict[str, Any]) -> Text:
    hosts = r["hosts"]

    def host(name: str) -> str:
        return f"{name} ({hosts[name]['model']})" if name in hosts else name

    t = Text(f"Leg {leg['leg']}: {host(leg['from'])} → {host(leg['to'])}: ")
    t.append_text(Text("OK", style="bold green") if leg["ok"] else Text("FAILED", style="bold red"))
    t.append(f", blackout {_ms(leg['blackout_ms'])}, engine pause {_ms(leg['engine_pause_ms'])}")
    return t


def _pass_table(r: dict[str, Any], leg: dict[str, Any]) -> Table:
    # a title wraps at the table's width: the short figures go there, the rest in the caption
    t = Table(title=_leg_title(r, leg), title_justify="left", box=box.SIMPLE_HEAD, caption_justify="left",
              caption=Text(f"{leg['unfetched_at_suspend']:,} commands queued but unfetched at suspend"))
    for col in ("pass", "kind", "start s", "duration s", "LBA MiB", "RAM MiB", "remaining MiB",
                "dirty MiB/s", "copy MiB/s"):
        t.add_column(col, justify="left" if col == "kind" else "right")
    for p in leg["pass_table"]:
        t.add_row(str(p["pass"]), p["kind"], f"{p['t_start']:.3f}", f"{p['duration_s']:.3f}", _mib(p["lba_bytes"]),
                  _mib(p["ram_bytes"]), _mib(p["remaining_bytes"]), f"{p['dirty_rate_mib_s']:,.1f}",
                  f"{p['copy_rate_mib_s']:,.1f}")
    t.add_section()
    t.add_row("total", "", f"{leg['t_start']:.3f}", f"{leg['total_s']:.3f}", _mib(leg["bytes_lba"]),
              _mib(leg["bytes_ram"]), "", "", "", style="bold")
    return t


def _steps_table(leg: dict[str, Any]) -> Table | None:
    """Where a leg's pause went, step by step (source steps, then the destination's, indented)."""
    steps = leg.get("blackout_steps_ms") or {}
    if not steps:
        return None
    t = Table(title=Text(f"Leg {leg['leg']} blackout, step by step"), title_justify="left", box=box.SIMPLE_HEAD)
    t.add_column("step")
    t.add_column("ms", justify="right")
    for name, ms in steps.items():
        t.add_row(Text(name), f"{ms:,.1f}")
    return t


def render(report: dict[str, Any], console: Console) -> None:
    """The headline table, one pass table per leg, then any verify-failure examples.

    Every string from the report goes in as `Text`, never as markup: an error message such as
    "[template generic-v1] refused" must print as written, not be parsed as a style tag.
    """
    console.print(_migration_table(report))
    for leg in report["legs"]:
        console.print(_pass_table(report, leg))
        steps = _steps_table(leg)
        if steps is not None:
            console.print(steps)
        if not leg["ok"] and leg["error"]:
            console.print(Text(f"leg {leg['leg']} error: {leg['error']}", style="red"))
    examples = report["guest"]["verify_failure_examples"]
    if examples:
        shown = examples[:MAX_EXAMPLES]
        console.print(Text(f"Verify failures: {report['verify_failures']:,} "
                           f"(showing {len(shown)} example{'s' if len(shown) != 1 else ''})", style="bold red"))
        for e in shown:
            console.print(Text(f"  • {e}"))
        if len(examples) > len(shown):
            console.print(Text(f"  … and {len(examples) - len(shown):,} more examples in the JSON report"))


def summary_lines(report: dict[str, Any]) -> list[str]:
    """Plain-text lines for logs and closing notes: the headline, one line per leg, the guest's view."""

    def status(ok: bool, error: str | None) -> str:
        return "OK" if ok else f"FAILED ({error})" if error else "FAILED"

    r = report
    lines = [f"{r['scenario']}: {_route(r, '->')}: {status(r['ok'], r['error'])}, "
             f"blackout {_ms(r['blackout_ms'])} (engine pause {_ms(r['engine_pause_ms'])}), {_passes(r['passes'])}, "
             f"{_mib(r['bytes_lba'])} MiB LBA + {_mib(r['bytes_ram'])} MiB RAM in {r['total_s']:.2f} s"]
    for leg in r["legs"]:
        lines.append(f"leg {leg['leg']} {leg['from']} -> {leg['to']}: {status(leg['ok'], leg['error'])}, "
                     f"blackout {_ms(leg['blackout_ms'])} (engine pause {_ms(leg['engine_pause_ms'])}), "
                     f"{_passes(leg['passes'])}, {_mib(leg['bytes_lba'])} MiB LBA + {_mib(leg['bytes_ram'])} MiB RAM "
                     f"in {leg['total_s']:.2f} s")
    g = r["guest"]
    lat = g["latency_us"]
    lines.append(f"guest: {g['ios']:,} I/Os at {g['iops']:,.0f} IOPS (latency p50 {_us(lat['p50'])} / "
                 f"p99 {_us(lat['p99'])} / p99.9 {_us(lat['p99.9'])} / max {_us(lat['max'])} µs), "
                 f"{r['guest_errors']:,} errors, {g['timeouts']:,} timeouts, "
                 f"{g['spurious_completions']:,} spurious completions, {r['identity_changes']:,} identity changes "
                 f"in {g['identity_checks']:,} checks, {r['verified_blocks']:,} blocks verified, "
                 f"{r['verify_failures']:,} verify failures")
    return lines


# ------------------------------------------------------------------------------------------ plot
def _finite(*values: float) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) for v in values)


def plot(report: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Guest IOPS and latency per timeline bin, with each leg's passes, blackout and start/end marked; a PNG.

    A Figure with its own Agg canvas rather than pyplot: no global state, no GUI backend, nothing to close.
    """
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    path = Path(path)
    r = report
    tl = r["timeline"]
    bin_s = float(tl["bin_s"])
    iops = np.asarray(tl["iops"], dtype=float)
    lat_mean = np.asarray(tl["lat_mean_us"], dtype=float)
    lat_max = np.asarray(tl["lat_max_us"], dtype=float)
    # a bin without completions has no latency: NaN leaves a gap on the log axis instead of a dive to zero
    lat_mean[~(lat_mean > 0)] = np.nan
    lat_max[~(lat_max > 0)] = np.nan

    fig = Figure(figsize=FIGSIZE, dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    ax_iops, ax_lat = fig.subplots(2, 1, sharex=True)
    iops_color, mean_color, max_color, pass_color = "#1f5fa8", "#2a8a3e", "#d9822b", "#4c72b0"

    def edges(n: int) -> np.ndarray:
        return np.arange(n + 1) * bin_s

    if len(iops):
        ax_iops.stairs(iops, edges(len(iops)), baseline=None, color=iops_color, lw=0.9)
    if len(lat_max):
        ax_lat.stairs(lat_max, edges(len(lat_max)), baseline=None, color=max_color, lw=0.8)
    if len(lat_mean):
        ax_lat.stairs(lat_mean, edges(len(lat_mean)), baseline=None, color=mean_color, lw=0.9)
    if np.isfinite(lat_max).any() or np.isfinite(lat_mean).any():
        ax_lat.set_yscale("log")

    legs = r["legs"]
    x_end = max([len(iops) * bin_s, *(leg["t_end"] for leg in legs if _finite(leg["t_end"]))], default=0.0)
    x_end = x_end if x_end > 0 else 1.0
    ax_iops.set_xlim(0, x_end)
    ax_iops.set_ylim(bottom=0)

    for k, leg in enumerate(legs):
        for p in leg["pass_table"]:
            x0, x1 = p["t_start"], p["t_start"] + p["duration_s"]
            if not _finite(x0, x1):
                continue
            alpha = 0.08 if p["pass"] % 2 == 0 else 0.18
            for ax in (ax_iops, ax_lat):
                ax.axvspan(x0, x1, color=pass_color, alpha=alpha, lw=0, zorder=0)
            if (x1 - x0) / x_end >= 0.035:  # room for the label
                ax_iops.text((x0 + x1) / 2, 0.98, f"pass {p['pass']}", transform=ax_iops.get_xaxis_transform(),
                             ha="center", va="top", fontsize=7, color="#1f3f6e")
        for key in ("t_start", "t_end"):
            if _finite(leg[key]):
                for ax in (ax_iops, ax_lat):
                    ax.axvline(leg[key], color="0.35", lw=0.7, ls="--", zorder=1)
        if _finite(leg["t_start"]):
            label = f" leg {leg['leg']}: {leg['from']} → {leg['to']}" + ("" if leg["ok"] else " (failed)")
            ax_lat.text(leg["t_start"], 0.02, label, transform=ax_lat.get_xaxis_transform(), ha="left",
                        va="bottom", fontsize=7, color="0.2" if leg["ok"] else "#b00000")
        t0, t1 = leg["t_pause"], leg["t_resume"]
        if _finite(t0, t1) and t1 > t0:
            for ax in (ax_iops, ax_lat):
                # an edge line keeps a 10 ms blackout visible on a minutes-long axis
                ax.axvspan(t0, t1, facecolor="red", edgecolor="red", alpha=0.35, lw=0.6, zorder=2)
            mid = (t0 + t1) / 2
            left = mid > 0.6 * x_end  # near the right edge the label goes to the left of the span
            ax_iops.annotate(f"blackout {_ms(leg['blackout_ms'])}", xy=(mid, 0.12),
                             xycoords=ax_iops.get_xaxis_transform(), xytext=(-14 if left else 14, 26 + 14 * (k % 3)),
                             textcoords="offset points", ha="right" if left else "left", fontsize=8,
                             color="#a00000", bbox={"boxstyle": "round,pad=0.2", "fc": "white", "ec": "none",
                                                    "alpha": 0.85},
                             arrowprops={"arrowstyle": "-", "color": "#a00000", "lw": 0.7})

    ax_iops.set_ylabel("guest IOPS")
    ax_lat.set_ylabel("latency per bin (µs)")
    ax_lat.set_xlabel("seconds since guest t0")
    for ax in (ax_iops, ax_lat):
        ax.grid(True, which="major", lw=0.4, alpha=0.5)
    fig.suptitle(f"{r['scenario']}: {_route(r, '→')}", fontsize=11)
    result = ("OK" if r["ok"] else f"FAILED: {r['error'] or 'no error given'}") + (
        f"   blackout {_ms(r['blackout_ms'])} (engine pause {_ms(r['engine_pause_ms'])}), {_passes(r['passes'])}, "
        f"{r['total_s']:.2f} s, bin {bin_s * 1e3:g} ms")
    ax_iops.set_title(result, fontsize=9, loc="left", color="0.15" if r["ok"] else "#b00000")
    handles = [
        Line2D([], [], color=iops_color, lw=1, label="guest IOPS"),
        Line2D([], [], color=mean_color, lw=1, label="latency mean"),
        Line2D([], [], color=max_color, lw=1, label="latency max"),
        Patch(color=pass_color, alpha=0.25, lw=0, label="pre-copy passes"),
        Patch(facecolor="red", edgecolor="red", alpha=0.35, label="pause → resume"),
        Line2D([], [], color="0.35", lw=0.7, ls="--", label="leg start / end"),
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=8, frameon=False)
    fig.savefig(path, dpi=DPI, format="png")
    return path
