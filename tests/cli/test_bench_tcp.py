"""`nvme-lm bench tcp`: its parts (figures from measured values, the headline, arguments, rendering) and one
tiny real run (a target process, a 2 MiB namespace, 50 ms per measurement)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from nvme_lm.cli import bench_tcp
from nvme_lm.cli.bench_tcp import Case, case_result, cases_for, headline, process_cpu_seconds, target_process
from nvme_lm.cli.main import cli
from nvme_lm.vm.latency import LatencyRecorder

HEADLINE = {"iops", "raw_iops", "ratio", "iops_qd1", "raw_iops_qd1", "ratio_qd1", "mib_s", "raw_mib_s", "mib_s_ratio",
            "digests", "cases", "meta"}
CASE_KEYS = {"name", "block_size", "qd", "queues", "digests", "iops", "mib_s", "raw_iops", "raw_mib_s", "ratio",
             "p50_us", "p99_us", "raw_p50_us", "raw_p99_us", "raw_iops_1t", "raw_iops_nt", "raw_mode", "ios", "errors",
             "seconds", "target_cpu_us", "host_cpu_us", "target_cpu_pct"}


def _lat(*us: float) -> LatencyRecorder:
    r = LatencyRecorder()
    r.extend(int(u * 1000) for u in us)
    return r


def _case(c: Case, iops: float, raw_1t: float, raw_nt: float | None = None) -> dict[str, Any]:
    return case_result(c, queues=2, ios=int(iops), elapsed=1.0, errors=0, lat=_lat(100, 200),
                       raw_1t=raw_1t, raw_nt=raw_nt, raw_lat=_lat(2, 3))


def test_case_result_ratio_is_iops_over_the_higher_raw_mode() -> None:
    q32 = Case("randread-4k-qd32", 4096, 32, False)
    r = _case(q32, 10_000, 400_000, 500_000)
    assert r["raw_iops"] == 500_000 and r["raw_mode"] == "32 threads"
    assert r["ratio"] == 0.02
    assert r["mib_s"] == round(10_000 * 4096 / (1 << 20), 2)
    assert r["queues"] == 2 and r["p50_us"] == 150.0
    r = _case(q32, 10_000, 400_000, 300_000)
    assert r["raw_iops"] == 400_000 and r["raw_mode"] == "1 thread" and r["ratio"] == 0.025
    q1 = _case(Case("randread-4k-qd1", 4096, 1, False), 3_000, 300_000)
    assert q1["queues"] == 1 and q1["raw_iops_nt"] is None and q1["ratio"] == 0.01
    seq = _case(Case("seqread-128k-qd8", 128 << 10, 8, True), 4_000, 100_000, 80_000)
    assert seq["mib_s"] == 500.0 and seq["raw_mib_s"] == 12_500.0 and seq["ratio"] == 0.04
    assert seq["target_cpu_us"] is None  # not measured here
    r = case_result(q32, queues=2, ios=20_000, elapsed=2.0, errors=0, lat=_lat(1), raw_1t=1.0, raw_nt=None,
                    raw_lat=_lat(1), target_cpu_s=1.0, host_cpu_s=0.5)
    assert (r["target_cpu_us"], r["host_cpu_us"], r["target_cpu_pct"]) == (50.0, 25.0, 50.0)


def test_process_cpu_seconds_reads_proc() -> None:
    before = process_cpu_seconds(os.getpid())
    assert before is not None and before >= 0
    sum(i * i for i in range(300_000))  # burn a little CPU
    after = process_cpu_seconds(os.getpid())
    assert after is not None and after >= before
    assert process_cpu_seconds(2**22 + 12345) is None  # no such process


def test_headline_figures_come_from_their_cases() -> None:
    cs = cases_for(False)
    assert [c.name for c in cs] == ["randread-4k-qd1", "randread-4k-qd32", "seqread-128k-qd8"]
    results = [_case(cs[0], 3_000, 300_000), _case(cs[1], 10_000, 400_000, 500_000),
               _case(cs[2], 4_000, 100_000, 80_000)]
    h = headline(results)
    assert (h["iops"], h["raw_iops"], h["ratio"]) == (10_000, 500_000, 0.02)
    assert (h["iops_qd1"], h["ratio_qd1"]) == (3_000, 0.01)
    assert (h["mib_s"], h["raw_mib_s"], h["mib_s_ratio"]) == (500.0, 12_500.0, 0.04)
    assert h["digests"] is None
    dg = cases_for(True)[3:]
    assert all(c.digests for c in dg)
    h = headline([*results, _case(dg[0], 9_000, 400_000), _case(dg[1], 3_000, 100_000)])
    assert h["digests"] == {"iops": 9_000, "mib_s": 375.0, "iops_kept": 0.9, "mib_s_kept": 0.75}


@pytest.mark.parametrize("args", [["--queues", "0"], ["--queues", "33"], ["--seconds", "0"], ["--size-mib", "0"],
                                  ["--pin-cpu", "-1"]])
def test_bad_arguments_are_refused(args: list[str]) -> None:
    result = CliRunner().invoke(cli, ["bench", "tcp", *args])
    assert result.exit_code == 2, result.output


def _fake_result(quick: bool) -> dict[str, Any]:
    cs = cases_for(True)
    results = [_case(cs[0], 3_000, 300_000), _case(cs[1], 10_000, 400_000, 500_000),
               _case(cs[2], 4_000, 100_000, 80_000), _case(cs[3], 9_000, 400_000), _case(cs[4], 3_000, 100_000)]
    return {**headline(results), "cases": results,
            "meta": {"baseline": bench_tcp.BASELINE_DOC, "quick": quick, "io_queues": 2, "loadavg_start": [1.0] * 3,
                     "loadavg_end": [1.5] * 3, "cpus": 2, "prefill_mib_s": 100.0}}


def test_quick_defaults_and_table(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}

    def fake(**kw: Any) -> dict[str, Any]:
        seen.update(kw)
        kw["progress"]("measuring")
        return _fake_result(kw["quick"])

    monkeypatch.setattr(bench_tcp, "run_tcp_bench", fake)
    result = CliRunner().invoke(cli, ["bench", "tcp", "--quick"])
    assert result.exit_code == 0, result.output
    assert (seen["seconds"], seen["size_mib"], seen["queues"], seen["digests"]) == (0.5, 16, 2, True)
    out = result.stdout
    assert "randread-4k-qd32-digests" in out and "(--quick)" in out
    assert "10,000 IOPS vs raw 500,000 (ratio 0.020)" in out
    assert "500.0 MiB/s vs raw 12,500.0 (ratio 0.040)" in out
    assert seen["pin_cpu"] is None
    result = CliRunner().invoke(cli, ["bench", "tcp", "--seconds", "3", "--size-mib", "8", "--queues", "4",
                                      "--no-digests", "--pin-cpu", "0", "--json"])
    assert result.exit_code == 0, result.output
    assert (seen["seconds"], seen["size_mib"], seen["queues"], seen["digests"]) == (3.0, 8, 4, False)
    assert seen["pin_cpu"] == 0
    assert json.loads(result.stdout)["ratio"] == 0.02


def test_pinned_restores_the_affinity() -> None:
    before = os.sched_getaffinity(0)
    with bench_tcp.pinned(min(before)):
        assert os.sched_getaffinity(0) == {min(before)}
    assert os.sched_getaffinity(0) == before
    with bench_tcp.pinned(None):
        assert os.sched_getaffinity(0) == before


def test_a_target_that_fails_to_start_is_reported(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="exited with status 2"), target_process(tmp_path, size_mib=0):
        pass
    assert "size-mib" in (tmp_path / "target.log").read_text()


def test_tiny_real_run_json(tmp_path: Path) -> None:
    args = ["bench", "tcp", "--json", "--seconds", "0.05", "--size-mib", "2", "--data-dir", str(tmp_path / "w")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert set(d) == HEADLINE
    names = [c["name"] for c in d["cases"]]
    assert names == [c.name for c in cases_for(True)]
    for c in d["cases"]:
        assert set(c) >= CASE_KEYS
        assert c["errors"] == 0 and c["ios"] > 0 and c["iops"] > 0 and c["raw_iops"] > 0
        assert c["raw_iops"] == max(c["raw_iops_1t"], c["raw_iops_nt"] or 0.0)
        assert c["ratio"] == round(c["iops"] / c["raw_iops"], 4)
        assert c["mib_s"] == pytest.approx(c["iops"] * c["block_size"] / (1 << 20), abs=0.01)
        assert c["target_cpu_us"] is not None and c["host_cpu_us"] is not None and c["host_cpu_us"] > 0
    by = {c["name"]: c for c in d["cases"]}
    assert by["randread-4k-qd32"]["queues"] == 2 and by["randread-4k-qd1"]["queues"] == 1
    assert d["iops"] == by["randread-4k-qd32"]["iops"] and d["mib_s"] == by["seqread-128k-qd8"]["mib_s"]
    assert d["digests"]["iops"] == by["randread-4k-qd32-digests"]["iops"]
    m = d["meta"]
    assert m["target_exit"] == 0 and m["prefill_mib_s"] > 0 and m["size_mib"] == 2
    assert (tmp_path / "w" / "ssd" / "ns1.img").stat().st_size == 2 << 20
