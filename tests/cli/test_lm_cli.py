"""`nvme-lm lm ...` (cli/lm.py): each subcommand builds a device with one VF online and prints its result as JSON."""

from __future__ import annotations

import json

from click.testing import CliRunner

from nvme_lm.cli.main import cli
from nvme_lm.spec.cdq import ESA_FIRST


def run_json(*args: str) -> dict:
    res = CliRunner().invoke(cli, ["lm", *args, "--model", "vendor-a", "--json"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    return json.loads(res.output)


def test_cdq_prints_the_guest_writes_as_udmq_entries():
    d = run_json("cdq")
    entries = d["entries"]
    assert len(entries) == len(d["guest_writes"]) > 0
    assert all(e["nsid"] == d["nsid"] for e in entries)
    assert [(e["slba"], e["nlb"] + 1) for e in entries] == [(w["slba"], w["nlb"]) for w in d["guest_writes"]]
    assert entries[0]["esa"] == ESA_FIRST


def test_track_send_starts_tracking_at_the_granularity_asked():
    d = run_json("track-send")
    assert d["tracking"] and d["granularity"] == 12 and d["ranges"]


def test_track_recv_reports_page_aligned_dirty_ranges():
    d = run_json("track-recv")
    assert d["ranges"] and d["dirty_bytes"] > 0 and not d["more"] and not d["suspended"]
    assert all(r["address"] % 4096 == 0 and r["bytes"] % 4096 == 0 for r in d["ranges"])


def test_migration_send_suspend_and_resume():
    d = run_json("migration-send", "--suspend")
    assert d["suspended"] and "resumed" not in d
    d = run_json("migration-send", "--resume")
    assert d["suspended"] and d["resumed"] and d["guest_io_after_resume"]


def test_migration_recv_and_state_decode_the_controller_state():
    for sub in ("migration-recv", "state"):
        d = run_json(sub)
        assert d["header"]["suspended"] and d["csup"]
        assert d["bytes"] == 48 + d["header"]["nvme_bytes"] + d["header"]["vendor_bytes"]
        assert [s["qid"] for s in d["sqs"]] == [1] and [c["qid"] for c in d["cqs"]] == [1]
        assert d["sqs"][0]["head"] == d["sqs"][0]["tail"] > 0  # the guest writes were fetched before the Suspend
        assert {"registers", "admin_queues"} <= d["vendor"].keys()
    assert d["resumed"]


def test_a_model_without_vfs_is_refused(tmp_path):
    model = tmp_path / "novf.toml"
    model.write_text("")
    res = CliRunner().invoke(cli, ["lm", "state", "--model", str(model), "--json"])
    assert res.exit_code == 1 and "no VFs" in res.output
