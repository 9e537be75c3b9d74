"""Scenario files: the default file is the default scenario, every shipped file loads, and bad input is
refused with messages that name the file, the table, the key, the value and what is allowed."""

from __future__ import annotations

import copy
import dataclasses
import tomllib
from pathlib import Path
from typing import Any

import pytest

from nvme_lm.device.model import DeviceModel
from nvme_lm.device.template import Template
from nvme_lm.hypervisor.orchestrator import vm_spec
from nvme_lm.hypervisor.scenario import (
    GIB,
    MIB,
    Scenario,
    ScenarioError,
    default_scenario,
    load_scenario,
    parse_scenario,
)
from nvme_lm.vm.machine import VmSpec

SCENARIOS = Path(__file__).resolve().parents[2] / "scenarios"
DROP = object()


def edited(changes: dict[str, Any], base: dict[str, Any] | None = None) -> dict[str, Any]:
    """The default scenario's data with dotted keys set (or removed with DROP)."""
    data = copy.deepcopy(base if base is not None else default_scenario().to_dict())
    for path, value in changes.items():
        *tables, key = path.split(".")
        t = data
        for name in tables:
            t = t.setdefault(name, {})
        if value is DROP:
            del t[key]
        else:
            t[key] = value
    return data


def problems(changes: dict[str, Any], **kw: Any) -> list[str]:
    with pytest.raises(ScenarioError) as e:
        parse_scenario(edited(changes), "t.toml", **kw)
    assert str(e.value) == "\n".join(e.value.problems)
    return e.value.problems


def problem(changes: dict[str, Any], **kw: Any) -> str:
    found = problems(changes, **kw)
    assert len(found) == 1, found
    return found[0]


def keys_of(table: dict[str, Any], prefix: str = "") -> set[str]:
    out = set()
    for k, v in table.items():
        out.add(prefix + k)
        if isinstance(v, dict):
            out |= keys_of(v, f"{prefix}{k}.")
    return out


# ------------------------------------------------------------------------------------------ shipped files
def test_default_file_is_the_default_scenario_and_spells_out_every_key():
    path = SCENARIOS / "default.toml"
    assert load_scenario(path) == default_scenario() == Scenario()
    raw = tomllib.loads(path.read_text())
    assert keys_of(raw) == keys_of(default_scenario().to_dict())


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.toml")), ids=lambda p: p.name)
def test_every_shipped_scenario_loads_and_round_trips(path):
    s = load_scenario(path)
    assert parse_scenario(s.to_dict(), "again") == s
    assert s.validate() == s
    assert s.name == path.stem


def test_shipped_examples():
    assert len(list(SCENARIOS.glob("*.toml"))) >= 4
    small = load_scenario(SCENARIOS / "small.toml")
    assert small.capacity_bytes == 64 * MIB and small.memory_bytes == 32 * MIB
    assert small.migration.verify_ram
    assert load_scenario(SCENARIOS / "round-trip.toml").legs == [("a", "b"), ("b", "a")]


def test_defaults_are_the_issue_5_demo():
    s = default_scenario()
    assert [(h.name, h.model, h.listen) for h in s.hosts.nodes] == [("a", "vendor-a", "127.0.0.1:0"),
                                                                     ("b", "vendor-b", "127.0.0.1:0")]
    assert s.capacity_bytes == GIB and s.prefill_bytes == GIB // 4 and s.memory_bytes == 256 * MIB
    assert (s.vm.workload.pattern, s.vm.workload.iodepth) == ("randrw", 16)
    assert s.legs == [("a", "b")] and s.host("b").model == "vendor-b"


# ------------------------------------------------------------------------------------------ derived values
def test_legs_alternate():
    s = parse_scenario(edited({"migration.repeat": 3}))
    assert s.legs == [("a", "b"), ("b", "a"), ("a", "b")]


def test_from_and_to_default_to_the_first_two_hosts_in_file_order():
    data = edited({"hosts": {"z": {"model": "vendor-b"}, "m": {"model": "vendor-a"}, "q": {"model": "vendor-a"}},
                   "migration.from": DROP, "migration.to": DROP})
    s = parse_scenario(data)
    assert s.hosts.names == ["z", "m", "q"] and s.legs == [("z", "m")]
    assert parse_scenario(s.to_dict()) == s


def test_minimal_file_takes_every_default():
    assert parse_scenario({}) == default_scenario()
    assert parse_scenario({"faults": {}}) == default_scenario()


def test_prefill_rounds_down_to_whole_lbas_and_read_fraction():
    s = parse_scenario(edited({"vm.namespace.prefill_gib": 0.3}))
    assert s.prefill_bytes % 4096 == 0 and 0 <= int(0.3 * GIB) - s.prefill_bytes < 4096
    fractions = {p: parse_scenario(edited({"vm.workload.pattern": p})).vm.workload.read_fraction
                 for p in ("randread", "randwrite", "randrw", "write", "trim")}
    assert fractions == {"randread": 1.0, "randwrite": 0.0, "randrw": 0.7, "write": 0.0, "trim": 0.7}


def test_types_int_for_float_is_fine_bool_is_not_an_int():
    s = parse_scenario(edited({"vm.namespace.capacity_gib": 2, "migration.timeout_s": 5}))
    assert s.vm.namespace.capacity_gib == 2.0 and isinstance(s.vm.namespace.capacity_gib, float)
    assert problem({"vm.queues": True}) == "t.toml: [vm] queues = true: must be an integer"
    assert problem({"vm.queues": 2.0}) == "t.toml: [vm] queues = 2: must be an integer"
    assert problem({"migration.verify_ram": 1}) == "t.toml: [migration] verify_ram = 1: must be true or false"
    assert problem({"vm.name": 3}) == "t.toml: [vm] name = 3: must be a string"
    assert "must be a finite number" in problem({"migration.timeout_s": float("inf")})
    assert "must be a finite number" in problem({"hosts.link_delay_ms": float("nan")})


# ------------------------------------------------------------------------------------------ refusals
def test_messages_name_file_table_key_value_and_what_is_allowed():
    assert problem({"vm.workload.pattern": "randx"}) == (
        "t.toml: [vm.workload] pattern = 'randx': must be one of randread, randwrite, randrw, write, trim")
    assert problem({"vm.namespace.prefill_gib": 2}) == (
        "t.toml: [vm.namespace] prefill_gib = 2: larger than capacity_gib (1)")
    assert problem({"vm.memory_mib": 8}) == "t.toml: [vm] memory_mib = 8: must be in 16..65536"
    assert problem({"migration.copy_chunk_kib": 48}) == (
        "t.toml: [migration] copy_chunk_kib = 48: must be a power of two in 4..4096")
    assert problem({"vm.workload.hot_set": 0}) == "t.toml: [vm.workload] hot_set = 0: must be a number > 0 and <= 1"


def test_every_problem_is_reported_at_once():
    found = problems({"vm.workload.pattern": "randx", "vm.namespace.prefill_gib": 2, "vm.memroy_mib": 3,
                      "migration.repeat": 0, "bogus": 1, "hosts.b.model": "vendor-z"})
    assert len(found) == 6
    assert all(line.startswith("t.toml: ") for line in found)


@pytest.mark.parametrize("path, table", [
    ("colour", ""), ("hosts.speed", "[hosts]"), ("hosts.a.modle", "[hosts.a]"), ("vm.cpus", "[vm]"),
    ("vm.namespace.size", "[vm.namespace]"), ("vm.workload.rw", "[vm.workload]"), ("migration.passes", "[migration]"),
])
def test_unknown_keys_are_refused_everywhere(path, table):
    msg = problem({path: 1})
    key = path.rsplit(".", 1)[-1]
    where = f"{table} {key}" if table else key
    assert msg.startswith(f"t.toml: {where}: unknown key (allowed: ")


def test_unknown_key_suggests_the_near_one_and_unknown_table():
    assert "did you mean 'memory_mib'?" in problem({"vm.memroy_mib": 64})
    assert problem({"vm.disk": {"x": 1}}).startswith("t.toml: [vm] disk: unknown table (allowed: ")


def test_tables_that_are_not_tables():
    assert problem({"vm": 5}) == "t.toml: vm = 5: must be a table ([vm])"
    assert problem({"vm.workload": "fast"}).startswith("t.toml: [vm] workload = 'fast': must be a table")


def test_faults_table():
    s = parse_scenario(edited({"faults.kind": "network-cut", "faults.phase": "resume", "migration.repeat": 2,
                               "faults.leg": 2, "faults.after_s": 0.5}))
    f = s.faults
    assert (f.kind, f.phase, f.leg, f.after_s, f.out_of_space, f.armed) == ("network-cut", "resume", 2, 0.5, "auto",
                                                                           True)
    assert parse_scenario(s.to_dict()) == s
    assert not default_scenario().faults.armed and default_scenario().migration.reply_timeout_s == 30.0
    assert problem({"faults.kill_destination": "precopy"}) == (
        "t.toml: [faults] kill_destination: unknown key (allowed: kind, phase, leg, after_s, out_of_space)")
    assert problem({"faults.phsae": "setup"}).endswith("did you mean 'phase'?")
    assert problem({"faults.kind": "crash"}).startswith(
        "t.toml: [faults] kind = 'crash': must be one of none, cancel, destination-killed, ")
    assert problem({"faults.phase": "precopy"}) == (
        "t.toml: [faults] phase = 'precopy': must be one of setup, pre-copy, stop-and-copy, state-transfer, resume")
    assert problem({"faults.leg": 2}) == "t.toml: [faults] leg = 2: must be at most [migration] repeat (1)"
    assert problem({"faults.after_s": -1}) == "t.toml: [faults] after_s = -1: must be a number >= 0"
    assert problem({"faults.out_of_space": "full"}) == (
        "t.toml: [faults] out_of_space = 'full': must be one of auto, tmpfs, inject")
    assert problem({"migration.reply_timeout_s": 0}) == (
        "t.toml: [migration] reply_timeout_s = 0: must be a number > 0")
    assert problem({"faults": 3}).startswith("t.toml: faults = 3: must be a table")


def test_hosts():
    assert problem({"hosts": {"a": {"model": "vendor-a"}}, "migration.from": DROP, "migration.to": DROP}) == (
        "t.toml: [hosts]: at least two hosts are needed, one [hosts.<name>] table each; found 1")
    assert problem({"hosts.Big_Host": {"model": "vendor-a"}}) == (
        "t.toml: [hosts] Big_Host: host name must be 1..32 characters from a-z, 0-9 and '-'")
    assert problem({"hosts.b.model": "vendor-z"}) == (
        "t.toml: [hosts.b] model = 'vendor-z': must be one of vendor-a, vendor-b (built-in device models)")
    assert problem({"hosts.c": "vendor-a"}).startswith("t.toml: [hosts] c: unknown key")


def test_a_model_without_vfs_is_refused(monkeypatch):
    builtin = DeviceModel.builtin.__func__
    monkeypatch.setattr(DeviceModel, "builtin", classmethod(
        lambda cls, name: DeviceModel(name="no-vfs") if name == "vendor-b" else builtin(cls, name)))
    assert problem({}) == "t.toml: [hosts.b] model = 'vendor-b': has no SR-IOV VFs to assign to a VM"


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "127.0.0.2:7000", "[::1]:0", "10.77.0.2:9000", "192.168.5.1:1"])
def test_listen_good(listen):
    assert parse_scenario(edited({"hosts.a.listen": listen})).host("a").listen == listen


@pytest.mark.parametrize("listen", ["0.0.0.0:80", "8.8.8.8:1", "localhost:1", "127.0.0.1", "127.0.0.1:70000",
                                    "[::]:1", "::1:80", ""])
def test_listen_bad(listen):
    assert "must be IP:PORT with a loopback or private IP address" in problem({"hosts.a.listen": listen})


def test_two_hosts_cannot_listen_on_one_port():
    assert problem({"hosts.a.listen": "127.0.0.1:7001", "hosts.b.listen": "127.0.0.1:7001"}) == (
        "t.toml: [hosts.b] listen = '127.0.0.1:7001': another host listens there already")


def test_migration_hosts():
    assert problem({"migration.to": "c"}) == "t.toml: [migration] to = 'c': no such host (hosts: a, b)"
    assert problem({"migration.to": "a"}) == "t.toml: [migration] to = 'a': must differ from 'from'"


def test_namespace_geometry():
    assert problem({"vm.namespace.capacity_gib": 0.1}) == (
        "t.toml: [vm.namespace] capacity_gib = 0.1: 107374182.4 bytes is not a whole number of 4096-byte LBAs")
    assert "at least 1 MiB" in problem({"vm.namespace.capacity_gib": 1 / 2048, "vm.namespace.prefill_gib": 0})
    assert problem({"vm.namespace.lba_size": 1024}) == "t.toml: [vm.namespace] lba_size = 1024: must be 512 or 4096"
    assert problem({"vm.workload.block_size": 6144}) == (
        "t.toml: [vm.workload] block_size = 6144: must be a multiple of lba_size (4096)")
    # 512-byte LBAs allow 512-byte blocks
    s = parse_scenario(edited({"vm.namespace.lba_size": 512, "vm.workload.block_size": 512}))
    assert s.vm.namespace.nlbas == 2 * 1024 * 1024


def test_workload_must_fit_the_namespace_and_guest_ram():
    tiny = {"vm.namespace.capacity_gib": 1 / 1024, "vm.namespace.prefill_gib": 0, "vm.workload.block_size": 32768}
    assert problem({**tiny, "vm.workload.iodepth": 32}) == (
        "t.toml: [vm.namespace] capacity_gib = 0.0009765625: holds 32 blocks of 32768 B; the workload needs at "
        "least 2 x iodepth x queues = 64")
    parse_scenario(edited({**tiny, "vm.workload.iodepth": 16}))
    msg = problem({"vm.memory_mib": 16, "vm.queues": 2, "vm.workload.iodepth": 128, "vm.workload.block_size": 65536})
    assert msg.startswith("t.toml: [vm] memory_mib = 16: too small: the I/O buffers in flight")


def test_one_bad_key_does_not_cause_noise_in_cross_checks():
    # lba_size is bad: block_size is not also reported as "not a multiple of lba_size"
    assert len(problems({"vm.namespace.lba_size": 1000, "vm.workload.block_size": 512})) == 1


def test_trim_needs_trim_percent():
    assert problem({"vm.workload.pattern": "trim", "vm.workload.trim_percent": 0}) == (
        "t.toml: [vm.workload] trim_percent = 0: pattern 'trim' needs trim_percent > 0")


def test_iodepth_must_fit_the_template_queues(monkeypatch):
    builtin = Template.builtin.__func__
    monkeypatch.setattr(Template, "builtin", classmethod(lambda cls, n: dataclasses.replace(builtin(cls, n), mqes=31)))
    parse_scenario(edited({"vm.workload.iodepth": 31}), check_hosts=False)
    assert problem({"vm.workload.iodepth": 32}, check_hosts=False) == (
        "t.toml: [vm.workload] iodepth = 32: must be below the 32-entry queues of template 'generic-v1'")


def test_template_must_exist_and_be_presentable_on_every_host_the_vm_visits():
    assert problem({"vm.template": "nope"}) == (
        "t.toml: [vm] template = 'nope': must be one of dc-large-v1, generic-v1 (built-in templates)")
    msg = problem({"vm.template": "dc-large-v1"})
    assert msg.startswith("t.toml: [vm] template = 'dc-large-v1': host 'b' (vendor-b) cannot present it: MDTS 8")
    parse_scenario(edited({"vm.template": "dc-large-v1"}), check_hosts=False)
    parse_scenario(edited({"vm.template": "dc-large-v1", "hosts.b.model": "vendor-a"}))


def test_limits_of_the_host_devices():
    assert problem({"vm.queues": 8}) == (
        "t.toml: [vm] queues = 8: host 'b' (vendor-b) gives a VF at most 8 queues, the admin queue included: "
        "at most 7 I/O queues")
    parse_scenario(edited({"vm.queues": 8, "hosts.b.model": "vendor-a"}))
    assert problem({"migration.copy_chunk_kib": 1024}) == (
        "t.toml: [migration] copy_chunk_kib = 1024: larger than the 128 KiB one command may move through the PF of "
        "host 'b' (vendor-b, MDTS 5)")
    parse_scenario(edited({"migration.copy_chunk_kib": 1024, "hosts.b.model": "vendor-a"}))
    assert "vendor-a, MDTS 8" in problem({"migration.copy_chunk_kib": 2048, "hosts.b.model": "vendor-a"})
    assert problem({"vm.namespace.capacity_gib": 2048}) == (
        "t.toml: [vm.namespace] capacity_gib = 2048: larger than the 1788 GiB SSD of host 'b' (vendor-b)")
    parse_scenario(edited({"vm.queues": 8, "migration.copy_chunk_kib": 1024}), check_hosts=False)


def test_hosts_the_vm_never_visits_are_not_held_to_its_needs():
    parse_scenario(edited({"vm.queues": 8, "hosts.b.model": "vendor-a", "hosts.c": {"model": "vendor-b"}}))


def test_validate_checks_a_scenario_built_in_code():
    s = default_scenario()
    bad = dataclasses.replace(s, vm=dataclasses.replace(s.vm, queues=0))
    with pytest.raises(ScenarioError, match=r"^x: \[vm\] queues = 0: must be in 1..8$"):
        bad.validate("x")


# ------------------------------------------------------------------------------------------ files
def test_load_names_the_file(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text('[vm.workload]\npattern = "randx"\n')
    with pytest.raises(ScenarioError, match=r"bad\.toml: \[vm\.workload\] pattern = 'randx'"):
        load_scenario(f)
    f.write_text("[vm\n")
    with pytest.raises(ScenarioError, match=r"bad\.toml: not valid TOML"):
        load_scenario(f)
    with pytest.raises(ScenarioError, match=r"missing\.toml: cannot read"):
        load_scenario(tmp_path / "missing.toml")


def test_queue_patterns_give_each_queue_its_job():
    s = parse_scenario(edited({"vm.queues": 2, "vm.workload.queue_patterns": "randread,randwrite"}))
    spec = vm_spec(s)
    assert [spec.workload_config(i).pattern for i in range(2)] == ["randread", "randwrite"]
    assert [spec.workload_config(i).effective_read_fraction for i in range(2)] == [1.0, 0.0]
    assert problem({"vm.queues": 3, "vm.workload.queue_patterns": "randread,randwrite"}) == (
        "t.toml: [vm.workload] queue_patterns = 'randread,randwrite': names 2 patterns for 3 queues ([vm] queues)")
    assert problem({"vm.workload.queue_patterns": "randread,scan"}) == (
        "t.toml: [vm.workload] queue_patterns = 'randread,scan': must be comma-separated patterns, each one of "
        "randread, randwrite, randrw, write, trim")
    with pytest.raises(ValueError, match="queue_patterns"):  # a peer's VM spec is checked the same way
        VmSpec(queues=2, queue_patterns="randread", capacity_bytes=1 << 20)
