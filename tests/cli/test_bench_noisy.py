"""`nvme-lm bench noisy`: the noisy-neighbour benchmark runs end to end and reports its keys."""

from __future__ import annotations

import json

from click.testing import CliRunner

from nvme_lm.cli.bench_noisy import KEYS
from nvme_lm.cli.main import cli


def test_bench_noisy_json_reports_the_three_phases_and_the_limit_accuracy():
    result = CliRunner().invoke(cli, ["bench", "noisy", "--json", "--seconds", "0.5"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert set(d) >= set(KEYS) | {"aggressor_unlimited_iops", "aggressor_limited_iops", "goal_met", "meta"}
    assert d["victim_solo_iops"] > 0 and d["victim_vs_unlimited_iops"] > 0 and d["victim_vs_limited_iops"] > 0
    for phase in ("solo", "vs_unlimited", "vs_limited"):
        assert 0 < d[f"victim_{phase}_p50_us"] <= d[f"victim_{phase}_p99_us"]
    # the aggressor runs unlimited far above the limit, and at the limit (a ceiling: +5%) under it
    assert d["aggressor_unlimited_iops"] > d["aggressor_limit_iops"]
    assert 0.8 < d["limit_accuracy"] <= 1.05
    assert d["goal_met"] == (d["victim_vs_limited_iops"] >= 0.9 * d["victim_solo_iops"])
