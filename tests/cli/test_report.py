"""cli/report.py: a migration report as rich tables, summary lines and a PNG timeline, and its schema check."""

from __future__ import annotations

import copy
import io
import json
import re
from typing import Any

import numpy as np
import pytest
from matplotlib.image import imread
from rich.console import Console

from nvme_lm.cli import report as rep

MIB = 1 << 20
GREEN, RED = "#008000", "#800000"  # rich's "green" / "red" in export_html with the default terminal theme


def _leg(n: int, src: str, dst: str, t_start: float, durations: list[float], blackout_ms: float,
         pause_ms: float) -> dict[str, Any]:
    """A leg whose passes follow each other from t_start; the last one is the final pass the VM is paused in."""
    passes, t = [], t_start
    for i, d in enumerate(durations):
        kind = "full" if i == 0 else "final" if i == len(durations) - 1 else "delta"
        lba = (256 * MIB) if kind == "full" else (4 * MIB) >> (i - 1)
        ram = (64 * MIB) if kind == "full" else (2 * MIB) >> (i - 1)
        passes.append({"pass": i, "kind": kind, "t_start": t, "duration_s": d, "lba_bytes": lba, "ram_bytes": ram,
                       "remaining_bytes": 0, "dirty_rate_mib_s": 12.5 / (i + 1),
                       "copy_rate_mib_s": (lba + ram) / MIB / d})
        t += d
    for i, p in enumerate(passes):  # what was left to copy when the pass ended: the later passes' bytes
        p["remaining_bytes"] = sum(q["lba_bytes"] + q["ram_bytes"] for q in passes[i + 1:])
    t_pause = passes[-1]["t_start"]
    return {"leg": n, "from": src, "to": dst, "ok": True, "error": None, "total_s": t + 0.05 - t_start,
            "passes": len(passes), "bytes_lba": sum(p["lba_bytes"] for p in passes),
            "bytes_ram": sum(p["ram_bytes"] for p in passes), "allocated_bytes": 256 * MIB,
            "engine_pause_ms": pause_ms, "blackout_ms": blackout_ms, "unfetched_at_suspend": 3,
            "t_start": t_start, "t_pause": t_pause, "t_resume": t_pause + pause_ms / 1e3, "t_end": t + 0.05,
            "pass_table": passes}


def make_report() -> dict[str, Any]:
    """A round trip a -> b -> a under load: 500 bins of 10 ms, IOPS dropping to zero in each blackout."""
    legs = [_leg(1, "a", "b", 1.0, [1.2, 0.3, 0.08, 0.015], blackout_ms=12.3, pause_ms=9.8),
            _leg(2, "b", "a", 3.0, [1.0, 0.25, 0.012], blackout_ms=11.0, pause_ms=8.7)]
    bin_s, n = 0.01, 500
    rng = np.random.default_rng(5)
    iops = 20_000 + rng.normal(0, 800, n)
    lat_mean = 780 + rng.normal(0, 40, n)
    lat_max = 2_500 + rng.normal(0, 200, n)
    for leg in legs:
        a, b = int(leg["t_pause"] / bin_s), int(leg["t_resume"] / bin_s)
        iops[a:b + 1] = 0.0
        lat_mean[a:b + 1] = 0.0
        lat_max[a:b + 1] = 0.0
        lat_max[b + 1] = leg["blackout_ms"] * 1e3  # the I/O held across the blackout completes after it
    r = {
        "version": 1, "scenario": "demo",
        "hosts": {"a": {"model": "vendor-a", "addr": "127.0.0.1:40001"},
                  "b": {"model": "vendor-b", "addr": "127.0.0.1:40002"}},
        "ok": True, "error": None,
        "blackout_ms": 12.3, "engine_pause_ms": 9.8,
        "total_s": sum(leg["total_s"] for leg in legs), "passes": sum(leg["passes"] for leg in legs),
        "bytes_lba": sum(leg["bytes_lba"] for leg in legs), "bytes_ram": sum(leg["bytes_ram"] for leg in legs),
        "allocated_bytes": 256 * MIB,
        "guest_errors": 0, "identity_changes": 0, "verified_blocks": 1_234_567, "verify_failures": 0,
        "legs": legs,
        "guest": {"ios": 98_765, "reads": 49_000, "writes": 48_000, "trims": 1_765, "errors": 0, "timeouts": 0,
                  "spurious_completions": 0, "identity_checks": 42, "identity_changes": 0,
                  "verified_reads": 49_000, "verified_blocks": 1_234_567, "verify_failures": 0,
                  "verify_failure_examples": [], "iops": 19_753.0,
                  "latency_us": {"p50": 85.5, "p99": 310.2, "p99.9": 1_204.0, "max": 12_345.0}},
        "timeline": {"bin_s": bin_s, "iops": iops.tolist(), "lat_mean_us": lat_mean.tolist(),
                     "lat_max_us": lat_max.tolist()},
    }
    return r


def failed_report() -> dict[str, Any]:
    """The destination refused after the first pass: the VM stayed at the source, nothing switched over."""
    r = make_report()
    err = "destination b refused: [template generic-v1] cannot host the VM"
    r.update(ok=False, error=err, legs=r["legs"][:1])
    leg = r["legs"][0]
    first = leg["pass_table"][0]
    leg.update(ok=False, error=err, pass_table=[first], passes=1, bytes_lba=first["lba_bytes"],
               bytes_ram=first["ram_bytes"], total_s=first["duration_s"] + 0.02, t_pause=float("nan"),
               t_resume=float("nan"), t_end=first["t_start"] + first["duration_s"] + 0.02, blackout_ms=0.0,
               engine_pause_ms=0.0)
    r.update({k: leg[k] for k in ("passes", "bytes_lba", "bytes_ram", "total_s", "blackout_ms", "engine_pause_ms")})
    return r


def rendered(r: dict[str, Any]) -> Console:
    console = Console(record=True, width=140, file=io.StringIO())
    rep.render(r, console)
    return console


def html_line(console: Console, label: str) -> str:
    """The HTML of the one table line whose text contains `label` (export_html keeps the lines)."""
    lines = [line for line in console.export_html(inline_styles=True, clear=False).splitlines()
             if label in re.sub(r"<[^>]+>", "", line)]
    assert len(lines) == 1, lines
    return lines[0]


def test_the_report_is_valid_and_survives_json():
    r = make_report()
    assert rep.check(r) == []
    assert rep.check(json.loads(json.dumps(r))) == []
    assert rep.check(failed_report()) == []


def test_render_shows_the_headline_figures_and_a_pass_table_per_leg():
    r = make_report()
    text = rendered(r).export_text(clear=False)
    assert "Migration demo: a → b → a (a: vendor-a, b: vendor-b)" in text
    for figure in ("OK", "12.3 ms", "9.8 ms", f"{r['total_s']:,.2f} s", f"{_mib(r['bytes_lba'])} MiB",
                   f"{_mib(r['bytes_ram'])} MiB", "256.0 MiB", "1,234,567", "19,753",
                   "85.5 / 310 / 1,204 / 12,345 µs", "98,765 (49,000 reads, 48,000 writes, 1,765 trims)"):
        assert figure in text, figure
    assert "Leg 1: a (vendor-a) → b (vendor-b): OK, blackout 12.3 ms, engine pause 9.8 ms" in text
    assert "3 commands queued but unfetched at suspend" in text
    assert "Leg 2: b (vendor-b) → a (vendor-a): OK, blackout 11.0 ms, engine pause 8.7 ms" in text
    for col in ("remaining MiB", "dirty MiB/s", "copy MiB/s"):
        assert col in text
    # one row per pass, kinds in order, and the leg's total row
    for leg in r["legs"]:
        for p in leg["pass_table"]:
            row = f"{p['t_start']:.3f}"
            assert any(row in line and p["kind"] in line for line in text.splitlines()), (leg["leg"], p)
    assert text.count("total") >= 3  # the headline's and each leg's
    assert "Verify failures" not in text


def test_must_be_zero_counts_are_green_at_zero_and_red_otherwise():
    c = rendered(make_report())
    for label in ("guest errors", "timeouts", "spurious completions", "identity changes", "verify failures"):
        line = html_line(c, label)
        assert GREEN in line and RED not in line, label

    r = make_report()
    r["verify_failures"] = r["guest"]["verify_failures"] = 3
    r["guest"]["verify_failure_examples"] = [f"LBA {lba:#x}: generation {g} expected, read {g - 1}"
                                             for lba, g in ((0x1200, 7), (0x88, 3), (0x4_0000, 12))]
    r["guest"]["timeouts"] = 1
    c = rendered(r)
    for label in ("verify failures", "timeouts"):
        line = html_line(c, label)
        assert RED in line and GREEN not in line, label
    assert GREEN in html_line(c, "guest errors")
    text = c.export_text(clear=False)
    assert "Verify failures: 3 (showing 3 examples)" in text
    assert "LBA 0x1200: generation 7 expected, read 6" in text


def test_summary_lines():
    lines = rep.summary_lines(make_report())
    assert len(lines) == 4  # headline, two legs, guest
    assert lines[0].startswith("demo: a -> b -> a (a: vendor-a, b: vendor-b): OK, blackout 12.3 ms "
                               "(engine pause 9.8 ms), 7 passes, ")
    r = make_report()
    leg = r["legs"][0]
    assert lines[1] == (f"leg 1 a -> b: OK, blackout 12.3 ms (engine pause 9.8 ms), 4 passes, "
                        f"{_mib(leg['bytes_lba'])} MiB LBA + {_mib(leg['bytes_ram'])} MiB RAM in "
                        f"{leg['total_s']:.2f} s")
    assert lines[2].startswith("leg 2 b -> a: OK, blackout 11.0 ms (engine pause 8.7 ms), 3 passes, ")
    assert lines[3].startswith("guest: 98,765 I/Os at 19,753 IOPS (latency p50 85.5 / p99 310 / ")
    assert "0 errors, 0 timeouts, 0 spurious completions, 0 identity changes in 42 checks, " \
           "1,234,567 blocks verified, 0 verify failures" in lines[3]


@pytest.mark.parametrize("make", [make_report, failed_report], ids=["ok", "failed"])
def test_plot_writes_a_png_of_the_figure_size(tmp_path, make):
    out = rep.plot(make(), tmp_path / "lm.png")
    assert out == tmp_path / "lm.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    h, w = imread(out).shape[:2]
    assert (w, h) == (round(rep.FIGSIZE[0] * rep.DPI), round(rep.FIGSIZE[1] * rep.DPI))


def test_plot_of_a_report_with_an_empty_timeline_and_no_legs(tmp_path):
    r = failed_report()
    r.update(legs=[], timeline={"bin_s": 0.01, "iops": [], "lat_mean_us": [], "lat_max_us": []})
    assert rep.check(r) == []
    assert rep.plot(r, tmp_path / "empty.png").stat().st_size > 0


def test_check_names_missing_keys_and_wrong_types():
    r = make_report()
    del r["blackout_ms"]
    del r["legs"][1]["t_pause"]
    r["passes"] = "7"
    r["ok"] = 1
    r["guest"]["timeouts"] = True  # a bool is not a count
    r["guest"]["latency_us"]["p99.9"] = None
    r["legs"][0]["pass_table"][2]["kind"] = "warm"
    r["hosts"]["b"]["model"] = 2
    problems = rep.check(r)
    assert set(problems) == {
        "blackout_ms: missing",
        "legs[1].t_pause: missing",
        "passes: expected int, got str",
        "ok: expected bool, got int",
        "guest.timeouts: expected int, got bool",
        "guest.latency_us.p99.9: expected number, got None",
        "legs[0].pass_table[2].kind: expected one of 'full', 'delta', 'final', got 'warm'",
        "hosts.b.model: expected str, got int",
    }, problems


def test_check_consistency_and_bad_containers():
    assert rep.check([]) == ["report: expected dict, got list"]
    r = make_report()
    r["version"] = 2
    r["timeline"]["lat_max_us"] = r["timeline"]["lat_max_us"][:-1]
    r["timeline"]["bin_s"] = 0
    r["legs"][1]["to"] = "c"
    r["guest"]["verify_failure_examples"] = "none"
    problems = rep.check(r)
    assert any(p.startswith("version: 2 is not supported") for p in problems)
    assert "timeline: series of different lengths (iops 500, lat_mean_us 500, lat_max_us 499)" in problems
    assert "timeline.bin_s: must be positive, got 0" in problems
    assert "legs[1].to: host 'c' is not in hosts (a, b)" in problems
    assert "guest.verify_failure_examples: expected list, got str" in problems
    # a long bad series is summarised, not listed bin by bin
    r = make_report()
    r["timeline"]["iops"] = ["x"] * 500
    problems = rep.check(r)
    assert len(problems) == 6 and problems[-1] == "timeline.iops: 495 more problems"


def test_a_failed_report_renders_and_shows_the_error():
    r = failed_report()
    c = rendered(r)
    text = c.export_text(clear=False)
    assert "FAILED: destination b refused: [template generic-v1] cannot host the VM" in text  # not eaten as markup
    assert "Leg 1: a (vendor-a) → b (vendor-b): FAILED" in text
    assert "leg 1 error: destination b refused" in text
    assert RED in html_line(c, "result")
    lines = rep.summary_lines(r)
    assert lines[0].startswith("demo: a -> b (a: vendor-a, b: vendor-b): FAILED (destination b refused: ")
    assert lines[1].startswith("leg 1 a -> b: FAILED (destination b refused: ")


def test_render_does_not_touch_the_report():
    r = make_report()
    before = copy.deepcopy(r)
    rendered(r)
    rep.summary_lines(r)
    assert r == before


def _mib(n: int) -> str:
    return f"{n / MIB:,.1f}"
