"""`nvme-lm bench lba-status` end to end, on a small namespace so it stays fast."""

from __future__ import annotations

import json

from click.testing import CliRunner

from nvme_lm.cli.main import cli

KEYS = {"capacity_bytes", "allocated_bytes", "ranges", "seconds", "baseline_seconds"}


def test_bench_lba_status_json():
    args = ["bench", "lba-status", "--json", "--capacity-gib", "1", "--extents", "300", "--max-extent-kib", "32",
            "--buffer-kib", "1"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert set(d) >= KEYS
    assert d["capacity_bytes"] == 1 << 30
    assert d["match"] is True
    assert d["ranges"] == d["baseline_ranges"] == 300  # extents never touch, so none coalesce
    assert d["allocated_bytes"] == d["baseline_allocated_bytes"] == d["bytes_written"]
    assert d["commands"] > 1  # 1 KiB buffers: 63 descriptors per command, paged with CMPC
    assert d["seconds"] > 0 and d["baseline_seconds"] > 0


def test_bench_lba_status_table(tmp_path):
    args = ["bench", "lba-status", "--capacity-gib", "1", "--extents", "50", "--lba-size", "4096",
            "--data-dir", str(tmp_path / "d")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "match: True" in result.stdout
    assert (tmp_path / "d" / "ssd" / "subsystem.json").exists()
