"""`nvme-lm bench migrate`: its parts on their own (a full `--quick` run takes about a minute or more, too long
for the suite): the sparse-copy baseline, every figure computed from a synthetic report, the scenarios it
runs, and `[vm.workload] region_gib`."""

from __future__ import annotations

import dataclasses
import math
import os

import pytest
from click.testing import CliRunner

from nvme_lm.cli import bench_migrate as bm
from nvme_lm.cli import bench_migrate_metrics as bmm
from nvme_lm.cli.main import cli
from nvme_lm.hypervisor.orchestrator import vm_spec
from nvme_lm.hypervisor.scenario import ScenarioError, default_scenario

MIB, GIB = 1 << 20, 1 << 30


# ------------------------------------------------------------------------------------------ baseline
def _sparse(path, size, extents):
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for off, n in extents:
            os.pwrite(fd, bytes((off // 4096 + i) % 251 + 1 for i in range(n)), off)
    finally:
        os.close(fd)


@pytest.mark.parametrize("userspace", [False, True])
def test_sparse_copy_copies_the_data_extents_and_keeps_the_holes(tmp_path, userspace):
    src, dst = tmp_path / "src", tmp_path / "dst"
    extents = [(0, 8192), (1 * MIB, 4096), (3 * MIB, 3 * MIB // 2)]  # the last one longer than the 1 MiB buffer
    _sparse(src, 8 * MIB, extents)
    copied = bm.sparse_copy(src, dst, userspace=userspace)
    assert copied == sum(n for _, n in extents)
    assert src.read_bytes() == dst.read_bytes()
    assert dst.stat().st_size == 8 * MIB
    fd = os.open(dst, os.O_RDONLY)
    try:
        assert bm.data_extents(fd) == extents  # nothing written between the extents: still holes
    finally:
        os.close(fd)


def test_measure_baseline_times_the_copy_of_the_allocated_bytes(tmp_path):
    b = bm.measure_baseline(tmp_path, 16 * MIB, 2 * MIB, reps=3)
    assert b["bytes"] == 2 * MIB and b["runs"] == 3
    assert 0 < b["min_s"] <= b["seconds"] <= b["max_s"] and b["userspace_seconds"] > 0
    assert "copy_file_range" in b["what"] and "no TLS" in b["what"]
    assert list(tmp_path.iterdir()) == []  # its files are gone


# ------------------------------------------------------------------------------------------ figures
def _pass(n, kind, t_start, duration, lba, ram=0, remaining=0, rate=100.0, limit=0.0, decision=""):
    return {"pass": n, "kind": kind, "t_start": t_start, "duration_s": duration, "lba_bytes": lba,
            "ram_bytes": ram, "remaining_bytes": remaining, "dirty_rate_mib_s": 0.0, "copy_rate_mib_s": rate,
            "remaining_lba_bytes": remaining, "write_limit_mib_s": limit, "decision": decision}


def _leg(i, *, ok=True, t_start, t_pause, total, allocated, lba, passes, blackout=40.0, pause=30.0):
    return {"leg": i, "from": "a", "to": "b", "ok": ok, "error": None if ok else "gave up", "total_s": total,
            "passes": len(passes), "bytes_lba": lba, "bytes_ram": 0, "allocated_bytes": allocated,
            "engine_pause_ms": pause if ok else math.nan, "blackout_ms": blackout if ok else math.nan,
            "unfetched_at_suspend": 0, "t_start": t_start, "t_pause": t_pause if ok else math.nan,
            "t_resume": t_pause + 0.05 if ok else math.nan, "t_end": t_pause + 0.1, "pass_table": passes,
            "blackout_steps_ms": {"suspend": 1.0, "  destination: VM restore": 20.0}}


def _report(legs, iops, *, ios=1000, writes=300):
    """A run whose guest completed `iops[i]` I/Os per second in second i (10 ms bins)."""
    bins = [float(x) for x in iops for _ in range(100)]
    return {"ok": all(leg["ok"] for leg in legs), "error": None, "legs": legs, "guest_errors": 0,
            "verify_failures": 0, "guest": {"ios": ios, "writes": writes},
            "timeline": {"bin_s": 0.01, "iops": bins, "lat_mean_us": [], "lat_max_us": []}}


def test_window_ios_counts_bins_pro_rata():
    tl = {"bin_s": 0.01, "iops": [100.0] * 100 + [300.0] * 100}  # 1 I/O per bin, then 3
    assert bmm.window_ios(tl, 0.0, 1.0) == pytest.approx(100)
    assert bmm.window_ios(tl, 0.5, 1.5) == pytest.approx(50 + 150)
    assert bmm.window_ios(tl, 0.005, 0.015) == pytest.approx(1.0)  # half of two bins
    assert bmm.window_ios(tl, 1.5, 9.0) == pytest.approx(150)  # past the end: nothing more
    assert bmm.window_iops(tl, 1.0, 2.0) == pytest.approx(300)
    assert bmm.window_ios(tl, 1.0, 1.0) == 0.0


def test_precopy_and_capacity_ratios():
    leg = _leg(1, t_start=0.5, t_pause=2.5, total=2.2, allocated=256 * MIB, lba=256 * MIB,
               passes=[_pass(0, "full", 0.6, 1.6, 256 * MIB, 4 * MIB), _pass(1, "final", 2.5, 0.01, 0)])
    base = {"seconds": 0.2, "min_s": 0.15, "max_s": 0.3, "bytes": 256 * MIB, "userspace_seconds": 0.4, "what": "x"}
    slower = dict(leg, pass_table=[dict(leg["pass_table"][0], duration_s=3.0)])
    p = bmm.precopy_metrics([_report([slower], [10]), _report([leg], [10])], base)  # the fastest run counts
    assert p["precopy_ratio"] == pytest.approx(8.0) and p["leg_ratio"] == pytest.approx(11.0)
    assert p["userspace_ratio"] == pytest.approx(4.0) and p["pass0_mib_s"] == pytest.approx(260 / 1.6)
    assert p["runs"] == 2 and p["pass0_s_all"] == [3.0, 1.6]
    small = _leg(1, t_start=0.5, t_pause=2.0, total=2.0, allocated=GIB, lba=GIB,
                 passes=[_pass(0, "full", 0.6, 1.0, GIB)])
    big = _leg(1, t_start=0.5, t_pause=2.0, total=2.3, allocated=GIB, lba=GIB,
               passes=[_pass(0, "full", 0.6, 1.1, GIB)])
    c = bmm.capacity_metrics([_report([big], [10]), _report([dict(big, total_s=5.0)], [10])],
                            [_report([dict(small, ok=False, total_s=1.0)], [10]), _report([small], [10])])
    assert c["big_leg_s_all"] == [2.3, 5.0] and c["small_leg_s_all"] == [1.0, 2.0]  # a failed leg does not count
    assert c["capacity_ratio"] == pytest.approx(1.15) and c["pass0_ratio"] == pytest.approx(1.1) and c["ok"]


def test_bytes_ratio_counts_guest_writes_between_pass_0_and_the_pause():
    # 1000 IOPS, 30% writes, 4 KiB: pass 0 starts at 1.0 s, pause at 3.0 s -> 600 writes re-dirty 600 blocks
    legs = [_leg(1, t_start=0.9, t_pause=3.0, total=2.5, allocated=100 * MIB, lba=100 * MIB + 600 * 4096,
                 passes=[_pass(0, "full", 1.0, 1.0, 100 * MIB)]),
            _leg(2, ok=False, t_start=3.5, t_pause=4.0, total=1.0, allocated=100 * MIB, lba=5 * MIB,
                 passes=[_pass(0, "full", 3.6, 1.0, 5 * MIB)])]  # a failed leg does not count
    b = bmm.bytes_metrics([_report(legs, [1000] * 5, ios=1000, writes=300)], 4096)
    assert b["legs"] == 1 and b["write_share"] == pytest.approx(0.3)
    assert b["redirtied_bytes"] == pytest.approx(600 * 4096, rel=1e-6)
    assert b["bytes_ratio"] == pytest.approx(1.0)
    assert b["per_leg_min"] == pytest.approx(1.0)


def test_blackout_percentiles_over_the_successful_legs():
    legs = [_leg(i, t_start=i, t_pause=i + 0.5, total=0.6, allocated=MIB, lba=MIB,
                 passes=[_pass(0, "full", i, 0.1, MIB)], blackout=float(10 * i), pause=float(5 * i))
            for i in range(1, 21)]
    legs.append(_leg(21, ok=False, t_start=30, t_pause=31, total=1, allocated=MIB, lba=0, passes=[]))
    b = bmm.blackout_metrics([_report(legs[:10], [10]), _report(legs[10:], [10])])
    assert b["legs_ok"] == 20 and b["legs"] == 21 and b["runs"] == 2 and b["failed_legs"] == ["gave up"]
    assert b["blackout_p50_ms"] == pytest.approx(105.0) and b["blackout_max_ms"] == 200.0
    assert b["blackout_p99_ms"] == pytest.approx(198.1)  # numpy's linear interpolation between 190 and 200
    assert b["engine_pause_p50_ms"] == pytest.approx(52.5)
    assert b["steps_mean_ms"] == {"suspend": 1.0, "destination: VM restore": 20.0}


def test_throttle_figures_converged_means_ok_and_blackout_within_target():
    passes = [_pass(0, "full", 1.6, 2.0, 16 * MIB, remaining=8 * MIB, rate=6.0, decision="throttle"),
              _pass(1, "delta", 3.6, 1.0, 8 * MIB, remaining=200_000, rate=6.0, limit=2.0,
                    decision="converged: 200000 bytes left"),
              _pass(2, "delta", 4.6, 0.4, 200_000, remaining=100_000, rate=6.0, limit=2.0),
              _pass(3, "final", 5.0, 0.02, 100_000)]
    leg = _leg(1, t_start=1.5, t_pause=5.0, total=3.7, allocated=16 * MIB, lba=25 * MIB, passes=passes, blackout=45.0)
    # 1600 IOPS before the migration, 800 while it runs unthrottled, 400 once writes are limited
    r = _report([leg], [1600, 1600, 800, 800, 400, 400], ios=1000, writes=500)
    assert bmm.WARMUP_S < 1.5
    t = bmm.throttle_metrics(r, target_ms=50.0, block_size=16384, link_mib_s=6.25)
    assert t["converged"] and t["precopy_converged"] and t["ok"]
    assert t["switch_expected_ms"] == pytest.approx(200_000 / (6 * MIB) * 1000)
    assert t["iops_before"] == pytest.approx(1600)
    assert t["throughput_kept"] == pytest.approx((0.5 * 1600 + 2 * 800 + 1 * 400) / 3.5 / 1600)
    assert t["throughput_kept_throttled"] == pytest.approx((0.4 * 800 + 1 * 400) / 1.4 / 1600)
    assert t["guest_write_mib_s"] == pytest.approx(1600 * 0.5 * 16384 / MIB) and t["write_to_link"] == pytest.approx(2)
    assert t["max_write_limit_mib_s"] == 2.0 and t["last_decision"].startswith("converged")
    # the guest's mix before the migration, when the leg says it: a throttled writer job shrinks the whole run's
    r2 = _report([dict(leg, guest_at_start={"ios": 800, "reads": 400, "writes": 400})], [1600] * 6, ios=1000,
                 writes=300)
    assert bmm.throttle_metrics(r2, target_ms=50.0, block_size=16384, link_mib_s=6.25)["write_to_link"] == (
        pytest.approx(2))
    slow = bmm.throttle_metrics(_report([dict(leg, blackout_ms=80.0)], [1600] * 6), target_ms=50.0,
                               block_size=16384, link_mib_s=6.25)
    assert not slow["converged"] and slow["precopy_converged"]  # pre-copy converged, the blackout did not fit
    failed = _leg(1, ok=False, t_start=1.5, t_pause=0, total=10.0, allocated=16 * MIB, lba=40 * MIB,
                  passes=passes[:2])
    f = bmm.throttle_metrics(_report([failed], [1600] * 12), target_ms=50.0, block_size=16384, link_mib_s=6.25)
    assert not f["converged"] and not f["precopy_converged"] and f["switch_expected_ms"] == math.inf
    none = bmm.throttle_metrics({**_report([], [1600]), "error": "agents did not start"}, target_ms=50.0,
                               block_size=16384, link_mib_s=6.25)
    assert not none["converged"] and none["passes"] == 0


def test_infrastructure_failures_are_told_from_measured_ones():
    ok = _report([_leg(1, t_start=1, t_pause=2, total=1, allocated=MIB, lba=MIB, passes=[])], [10])
    assert bmm.infrastructure_failure(ok) is None
    gave_up = _report([_leg(1, ok=False, t_start=1, t_pause=2, total=1, allocated=MIB, lba=MIB, passes=[])], [10])
    assert bmm.infrastructure_failure(gave_up) is None  # the policy's doing: that is what is measured
    pf = _report([dict(gave_up["legs"][0], error="NvmeTimeout: no PF copy command completed within 10.0s")], [10])
    assert "NvmeTimeout" in bmm.infrastructure_failure(pf)
    failed_run = {**_report([], [10]), "error": "OrchestrationError: x"}
    assert bmm.infrastructure_failure(failed_run) == "OrchestrationError: x"


def test_goals_met():
    good = {"precopy_ratio": 1.4, "bytes_ratio": 1.0, "blackout_p50_ms": 40.0, "blackout_p99_ms": 150.0,
            "capacity_ratio": 1.1, "converged_with_throttle": True, "converged_without_throttle": False,
            "throughput_kept": 0.5}
    assert all(bmm.goals_met(good).values()) and set(bmm.goals_met(good)) == set(bmm.KEYS)
    bad = {**good, "precopy_ratio": 12.0, "throughput_kept": math.nan, "converged_without_throttle": True}
    met = bmm.goals_met(bad)
    assert not met["precopy_ratio"] and not met["throughput_kept"] and not met["converged_without_throttle"]
    assert met["bytes_ratio"]


def test_json_safe_turns_nan_and_inf_into_null():
    assert bm.json_safe({"a": [math.nan, 1.0, {"b": math.inf}], "c": (1, "x")}) == {"a": [None, 1.0, {"b": None}],
                                                                                    "c": [1, "x"]}


# ------------------------------------------------------------------------------------------ scenarios
def test_the_scenarios_it_runs():
    idle = bm.idle_scenario(1024.0, 1.0)
    assert idle.capacity_bytes == 1 << 40 and idle.prefill_bytes == GIB and idle.vm.workload.region_bytes == GIB
    assert vm_spec(idle).region_bytes == GIB and idle.vm.workload.pattern == "randread"
    full = bm.idle_scenario(1.0, 1.0)
    assert full.capacity_bytes == full.prefill_bytes == GIB and full.vm.workload.region_bytes == 0
    load = bm.load_scenario_for(bm.BenchConfig.full())
    d = default_scenario()
    assert load.vm.workload.region_bytes == d.prefill_bytes  # writes stay in the allocated quarter
    assert dataclasses.replace(load, name="default", description=d.description,
                               vm=dataclasses.replace(load.vm, workload=d.vm.workload),
                               migration=dataclasses.replace(load.migration, repeat=1)) == d
    assert len(load.legs) == 20
    quick = bm.load_scenario_for(bm.BenchConfig.quick_())
    assert len(quick.legs) == 4 and quick.capacity_bytes < GIB and quick.vm.workload.region_bytes == quick.prefill_bytes
    t = bm.throttle_scenario("auto-converge", throttle=True)
    w = t.vm.workload
    spec = vm_spec(t)  # a reader and a writer job, each paced at rate_iops on its own queue
    assert [spec.workload_config(i).pattern for i in range(spec.queues)] == ["randread", "randwrite"]
    writes_mib_s = sum(w.rate_iops * (1 - spec.workload_config(i).effective_read_fraction) * w.block_size / MIB
                       for i in range(spec.queues))
    assert t.migration.max_bandwidth_mib_s == pytest.approx(writes_mib_s / 2) == bm.throttle_link_mib_s()
    assert t.migration.policy == "auto-converge" and t.prefill_bytes == w.region_bytes
    off = bm.throttle_scenario("predictive", throttle=False, give_up_s=10.0)
    assert not off.migration.throttle and off.migration.give_up_s == 10.0


def _with(**workload):
    s = default_scenario()
    ns = workload.pop("ns", {})
    vm = dataclasses.replace(s.vm, workload=dataclasses.replace(s.vm.workload, **workload),
                             namespace=dataclasses.replace(s.vm.namespace, **ns))
    return dataclasses.replace(s, vm=vm).validate("t.toml")


def test_region_gib_is_checked_against_the_namespace_and_the_prefill():
    assert _with(region_gib=0.5).vm.workload.region_bytes == GIB // 2
    assert default_scenario().vm.workload.region_bytes == 0
    for kw, why in (({"region_gib": 2.0}, "region_gib = 2: larger than capacity_gib (1)"),
                    ({"region_gib": 0.1}, "not a whole number of 4096-byte blocks"),
                    ({"region_gib": 0.125}, "prefill_gib = 0.25: larger than [vm.workload] region_gib (0.125)"),
                    ({"region_gib": 1 / 16384, "ns": {"prefill_gib": 0.0}},  # 64 KiB: 16 blocks
                     "[vm.workload] region_gib = 6.103515625e-05: holds 16 blocks of 4096 B; the workload needs at "
                     "least 2 x iodepth x queues = 32")):
        with pytest.raises(ScenarioError) as e:
            _with(**kw)
        assert why in str(e.value)
    assert _with(region_gib=1 / 8192, ns={"prefill_gib": 0.0}).vm.workload.region_bytes == 128 << 10  # 32 blocks


def test_bench_migrate_is_a_bench_command():
    r = CliRunner().invoke(cli, ["bench", "migrate", "--help"])
    assert r.exit_code == 0 and "--quick" in r.output and "--json" in r.output
