"""End to end: host agents as real OS processes on loopback, driven the way an operator drives them —
`nvme-lm migrate` as a subprocess, the orchestrator's `run_scenario`, or the control API — with the
migration stream between the agents over mutual TLS.

What the in-process engine tests (test_migration.py) already prove is not repeated here; these tests
prove that the pieces hold together across process boundaries: the CLI's exit code and JSON report, an
A->B->A round trip, commands left unfetched at suspend crossing to another process and running there
once, a destination process killed mid-copy, the control API's refusals, and a TLS peer from another CA.
Sizes come from scenarios/small.toml (a few seconds per migration on a 2-core CI machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from nvme_lm.cli.report import check
from nvme_lm.hypervisor import transport
from nvme_lm.hypervisor.certs import ensure_pki
from nvme_lm.hypervisor.orchestrator import (
    AgentProcess,
    AgentRequestError,
    ControlClient,
    migration_options,
    run_scenario,
    start_agent,
    stop_agent,
    vm_spec,
)
from nvme_lm.hypervisor.scenario import HostSpec, Scenario, load_scenario
from nvme_lm.hypervisor.stream import MsgType, control

REPO = Path(__file__).resolve().parents[2]
SMALL = REPO / "scenarios" / "small.toml"
CLI = [sys.executable, "-m", "nvme_lm.cli.main"]
POLL_S = 0.02


# ------------------------------------------------------------------------------------------ helpers
def scenario(vm: dict | None = None, namespace: dict | None = None, workload: dict | None = None,
             migration: dict | None = None) -> Scenario:
    """scenarios/small.toml with some keys changed, validated as strictly as a file."""
    sc = load_scenario(SMALL)
    v = replace(sc.vm, namespace=replace(sc.vm.namespace, **(namespace or {})),
                workload=replace(sc.vm.workload, **(workload or {})), **(vm or {}))
    return replace(sc, vm=v, migration=replace(sc.migration, **(migration or {}))).validate("test")


def blocks(sc: Scenario) -> int:
    """Blocks the final read-back must verify: the whole namespace, in workload blocks."""
    return sc.capacity_bytes // sc.vm.workload.block_size


def agent_pids(workdir: Path) -> list[int]:
    """Live `host serve` processes started for `workdir` (what `pgrep -f WORKDIR` would find; zombies have
    no command line, so they do not count)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"serve" in argv and any(str(workdir).encode() in a for a in argv):
            found.append(int(entry.name))
    return found


def run_cli(*args: str, workdir: Path, timeout: float = 100) -> subprocess.CompletedProcess[str]:
    """`nvme-lm ARGS` in its own process group, so that a hung run is killed with the agents it started;
    agents of `workdir` still alive afterwards are killed (by pid) and fail the test."""
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"nvme-lm {' '.join(args)} did not finish in {timeout:.0f} s:\n{err[-3000:]}")
    finally:
        left = agent_pids(workdir)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    assert left == [], f"host agents left running: {left}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_guest_clean(g: dict[str, Any], sc: Scenario) -> None:
    """The guest's own figures: no error of any kind, identity checked and unchanged, every block verified."""
    assert g["errors"] == 0 and g["timeouts"] == 0 and g["spurious_completions"] == 0, g
    assert g["identity_checks"] > 0 and g["identity_changes"] == 0, g
    assert g["verify_failures"] == 0 and g.get("ram_verify_failures", 0) == 0, g["verify_failure_examples"]
    assert g["verified_reads"] > 0 and g["verified_blocks"] == blocks(sc), g


def assert_report_clean(report: dict[str, Any], sc: Scenario, legs: list[tuple[str, str]]) -> None:
    """A whole migration report: schema, success, every error figure zero, one measured blackout per leg.

    With `verify_lbas` on, the destination compares CRC32C digests of the whole namespace with the
    source's at switchover and fails the leg if they differ, so an ok leg means equal namespaces."""
    assert check(report) == [], check(report)
    assert report["ok"] is True and report["error"] is None, report["error"]
    assert report["guest_errors"] == 0 and report["identity_changes"] == 0 and report["verify_failures"] == 0
    assert report["verified_blocks"] == blocks(sc)
    assert_guest_clean(report["guest"], sc)
    assert [(leg["from"], leg["to"]) for leg in report["legs"]] == legs
    for leg in report["legs"]:
        assert leg["ok"] is True and leg["error"] is None, leg["error"]
        assert leg["passes"] >= 2 and leg["bytes_lba"] >= sc.prefill_bytes and leg["bytes_ram"] > 0
        assert leg["engine_pause_ms"] > 0 and leg["t_start"] < leg["t_pause"] < leg["t_resume"] < leg["t_end"]
        # the guest's I/O stops while its vCPUs are paused: the gap it sees covers the engine's pause
        assert math.isfinite(leg["blackout_ms"]) and leg["blackout_ms"] >= leg["engine_pause_ms"] * 0.9, leg
    assert report["blackout_ms"] == max(leg["blackout_ms"] for leg in report["legs"])
    assert report["blackout_ms"] > 0 and report["blackout_ms"] >= report["engine_pause_ms"] * 0.9
    models = {h["model"] for h in report["hosts"].values()}
    assert len(models) == len(report["hosts"]) == 2  # the VM crossed between different device models


class Cluster:
    """Agents started with the orchestrator's `start_agent` (real processes) for one test, with a
    control client each. `shutdown()` stops them gracefully and returns their exit codes; whatever is
    still running when the test leaves (a failure) is killed by `cluster()`."""

    def __init__(self, workdir: Path, session: aiohttp.ClientSession) -> None:
        self.workdir = workdir
        self.pki_dir = workdir / "pki"
        self.session = session
        self.agents: dict[str, AgentProcess] = {}
        self.clients: dict[str, ControlClient] = {}

    async def start(self, name: str, model: str) -> ControlClient:
        agent = await start_agent(HostSpec(name, model), self.workdir, self.pki_dir)
        self.agents[name] = agent
        self.clients[name] = client = ControlClient(self.session, agent)
        return client

    async def shutdown(self) -> dict[str, int | None]:
        await asyncio.gather(*(stop_agent(a, self.clients[n]) for n, a in self.agents.items()))
        return {n: a.proc.returncode for n, a in self.agents.items()}


@contextlib.asynccontextmanager
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    workdir = tmp_path / "run"
    workdir.mkdir()
    ensure_pki(workdir / "pki")
    async with aiohttp.ClientSession() as session:
        c = Cluster(workdir, session)
        try:
            yield c
        finally:
            for a in c.agents.values():
                if a.proc.returncode is None:
                    a.proc.kill()
                    await a.proc.wait()
    assert agent_pids(workdir) == []


async def wait_for(predicate, what: str, timeout: float = 30.0) -> None:
    """Polls `await predicate()` until true; fails naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(POLL_S)


async def start_migration(src: ControlClient, dst: ControlClient, sc: Scenario,
                          options: dict[str, Any] | None = None) -> None:
    await dst.put("vm.receive-migration", {"vm": sc.vm.name})
    await src.put("vm.send-migration", {"destination": dst.agent.migrate, "server_name": dst.agent.name,
                                        "options": options or migration_options(sc)})


async def migration_result(src: ControlClient, timeout: float = 60.0) -> dict[str, Any]:
    status: dict[str, Any] = {}

    async def finished() -> bool:
        status.update(await src.get("vm.migration"))
        return status["result"] is not None

    await wait_for(finished, "the migration's result", timeout)
    return status["result"]


async def create_vm(client: ControlClient, sc: Scenario) -> dict[str, Any]:
    return await client.put("vm.create", {"spec": vm_spec(sc).__dict__, "template": sc.vm.template,
                                          "device_rate_iops": sc.vm.device_rate_iops})


# ------------------------------------------------------------------------------------------ the CLI
def test_nvme_lm_migrate_json_report_and_plot(tmp_path):
    """`nvme-lm migrate --scenario small.toml --json --plot`: agents started and stopped by the CLI, a
    clean report on stdout, a PNG, exit code 0, no agent process left."""
    sc = load_scenario(SMALL)
    assert sc.migration.verify_ram and sc.migration.verify_lbas
    workdir, png = tmp_path / "run", tmp_path / "timeline.png"
    proc = run_cli("migrate", "--scenario", str(SMALL), "--json", "--plot", str(png), "--workdir", str(workdir),
                   workdir=workdir)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert_report_clean(report, sc, [("a", "b")])
    assert report["scenario"] == "small"
    assert report["hosts"]["a"]["model"] == "vendor-a" and report["hosts"]["b"]["model"] == "vendor-b"
    assert report["allocated_bytes"] >= sc.prefill_bytes
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert (workdir / "a.ready").exists() and (workdir / "b.ready").exists()  # both agents did run


def test_a_bad_scenario_is_refused_naming_every_key_and_starts_nothing(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "bad"\n[vm]\nmemroy_mib = 32\n[vm.workload]\niodepth = 0\n')
    workdir = tmp_path / "run"
    proc = run_cli("migrate", "--scenario", str(bad), "--json", "--workdir", str(workdir), workdir=workdir)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "memroy_mib" in out and "iodepth" in out and "bad.toml" in out, out
    assert not list(workdir.glob("*.ready"))  # no agent was started (run_cli checked none is left)


# ------------------------------------------------------------------------------------------ the orchestrator
def test_round_trip_a_b_a_through_the_orchestrator(tmp_path):
    """repeat = 2: a -> b -> a, each leg's blackout measured by the guest, zero errors over both moves."""
    sc = scenario(migration={"repeat": 2})
    events: list[tuple[str, dict[str, Any]]] = []
    workdir = tmp_path / "run"
    report = asyncio.run(run_scenario(sc, workdir, lambda kind, data: events.append((kind, data))))
    assert_report_clean(report, sc, [("a", "b"), ("b", "a")])
    leg1, leg2 = report["legs"]
    assert leg1["t_end"] <= leg2["t_start"]  # one after the other, on the guest's clock
    assert {d["leg"] for k, d in events if k == "migration"} == {1, 2}
    assert any(k == "guest" and d["ios"] > 0 for k, d in events)
    assert agent_pids(workdir) == []


def test_commands_unfetched_at_suspend_run_exactly_once_in_the_other_process(tmp_path):
    """A device IOPS limit far below what the guest submits keeps commands waiting in its SQ; at suspend
    they stay there (in guest RAM), cross to the destination process and run there: every one completes
    once (no timeout = none lost, no spurious completion = none run twice), and all data verifies."""
    sc = scenario(vm={"device_rate_iops": 300}, workload={"iodepth": 16, "rate_iops": 0},
                  namespace={"capacity_gib": 16 / 1024, "prefill_gib": 4 / 1024})  # 16 MiB: a quick read-back
    report = asyncio.run(run_scenario(sc, tmp_path / "run"))
    (leg,) = report["legs"]
    assert leg["ok"], leg["error"]
    assert leg["unfetched_at_suspend"] > 0, leg
    assert_report_clean(report, sc, [("a", "b")])


# ------------------------------------------------------------------------------------------ failures
def test_destination_killed_during_precopy_leaves_the_vm_running_at_the_source(tmp_path):
    """SIGKILL the destination agent while pre-copy runs: the source rolls back and its guest keeps
    going; a new destination process then takes the VM, and the guest saw no error at all."""
    sc = load_scenario(SMALL)
    # a downtime target nothing can meet: pre-copy runs until max_passes, a window of several seconds
    slow = {**migration_options(sc), "downtime_target_ms": 0.001, "max_passes": 100}

    async def run() -> None:
        async with cluster(tmp_path) as c:
            a, b = await asyncio.gather(c.start("a", "vendor-a"), c.start("b", "vendor-b"))
            await create_vm(a, sc)
            await asyncio.sleep(0.3)
            await start_migration(a, b, sc, slow)

            async def copying() -> bool:
                s = await a.get("vm.migration")
                assert s["result"] is None, f"the migration ended before the kill: {s['result']}"
                return s["phase"] == "precopy" and s["bytes_lba"] > 0

            await wait_for(copying, "pre-copy with bytes moved")
            b.agent.proc.send_signal(signal.SIGKILL)
            assert await b.agent.proc.wait() == -signal.SIGKILL

            leg1 = await migration_result(a, timeout=40)
            assert leg1["ok"] is False and leg1["error"], leg1
            assert leg1["t_pause_ns"] == 0 and leg1["engine_pause_ms"] is None  # never paused (NaN -> null)
            status = await a.get("vm.migration")
            assert status["phase"].startswith("failed"), status["phase"]
            vm = (await a.get("vm.info"))["vm"]
            assert vm is not None and vm["running"] and not vm["paused"], vm
            before = (await a.get("vm.counters"))["ios"]

            async def guest_moves() -> bool:
                return (await a.get("vm.counters"))["ios"] > before + 50

            await wait_for(guest_moves, "the guest's I/O at the source after the rollback", timeout=10)

            b2 = await c.start("b2", "vendor-b")  # a new destination process
            await start_migration(a, b2, sc)
            leg2 = await migration_result(a)
            assert leg2["ok"], leg2["error"]
            assert (await a.get("vm.info"))["vm"] is None
            assert (await b2.get("vm.info"))["vm"]["running"]
            await asyncio.sleep(0.3)
            guest = await b2.put("vm.shutdown", {"windows": [[leg2["t_pause_ns"], leg2["t_resume_ns"]]]})
            assert_guest_clean(guest, sc)
            assert guest["gaps"][0]["gap_ms"] > 0
            codes = await c.shutdown()
            assert codes == {"a": 0, "b": -signal.SIGKILL, "b2": 0}

    asyncio.run(run())


async def _raw(session: aiohttp.ClientSession, method: str, url: str, **kw: Any) -> tuple[int, Any]:
    async with session.request(method, url, **kw) as r:
        assert r.content_type == "application/json", (url, r.status, await r.text())
        return r.status, await r.json()


def test_control_api_refuses_bad_requests_precisely_and_keeps_serving(tmp_path):
    sc = scenario(vm={"memory_mib": 16}, namespace={"capacity_gib": 4 / 1024, "prefill_gib": 1 / 1024})

    async def run() -> None:
        async with cluster(tmp_path) as c:
            a = await c.start("a", "vendor-b")  # 8 VFs
            s, base = c.session, a.base

            async def expect(method: str, path: str, status: int, **kw: Any) -> Any:
                got, body = await _raw(s, method, base + path, **kw)
                assert got == status, (method, path, got, body)
                if status >= 400:
                    assert isinstance(body["error"], str) and body["error"], body
                return body

            assert (await expect("GET", "vmm.ping", 200))["name"] == "a"
            # refused requests
            await expect("PUT", "vm.create", 400, data=b"{not json", headers={"Content-Type": "application/json"})
            await expect("PUT", "vm.create", 400, json=[1, 2])  # JSON, but not an object
            await expect("PUT", "vm.create", 400, json={"template": "generic-v1"})  # no spec
            await expect("PUT", "vm.create", 400, json={"spec": {"name": "vm1", "bogus": 1}})
            for method, path in (("GET", "vm.counters"), ("GET", "vm.migration"), ("PUT", "vm.shutdown"),
                                 ("PUT", "vm.send-migration")):
                await expect(method, path, 404, json={} if method == "PUT" else None)
            await expect("PUT", "vm.receive-migration", 400, json={})
            # impossible VMs (RAM not a whole number of pages, wrong types, out of range): more attempts
            # than the SSD has VFs, each refused with 400 naming the key, and no VF is left behind
            spec = vm_spec(sc).__dict__
            for key, value in (("memory_bytes", (16 << 20) + 1), ("memory_bytes", "lots"), ("iodepth", 100000),
                               ("queues", 0), ("pattern", "randx"), ("rate_iops", -5), ("lba_size", 1000),
                               ("block_size", 4097), ("hot_set", 0.0)):
                got, body = await _raw(s, "PUT", base + "vm.create", json={"spec": {**spec, key: value}})
                assert got == 400 and key in body["error"], (key, got, body)
            got, body = await _raw(s, "PUT", base + "vm.create", json={"spec": "x"})
            assert got == 400 and "mapping" in body["error"], body
            await expect("GET", "no.such.call", 404)  # aiohttp's own refusals are JSON errors too
            await expect("GET", "vm.create", 405)
            assert (await expect("GET", "vm.info", 200))["vm"] is None  # nothing was provisioned

            await create_vm(a, sc)
            for bad in ({}, {"destination": "nowhere"}, {"destination": "127.0.0.1:http"}):
                await expect("PUT", "vm.send-migration", 400, json=bad)
            await expect("PUT", "vm.create", 409, json={"spec": vm_spec(sc).__dict__})
            await expect("PUT", "vm.receive-migration", 409, json={"vm": "vm2"})
            with pytest.raises(AgentRequestError) as exc:  # the orchestrator's client says what went wrong
                await a.put("vm.create", {"spec": vm_spec(sc).__dict__})
            assert exc.value.status == 409 and "already runs" in exc.value.error

            # still serving, and the VM unharmed
            info = await expect("GET", "vmm.ping", 200)
            assert info["vm"]["running"] and not info["vm"]["paused"]
            await expect("GET", "vm.migration", 404)  # the refused send-migrations never started one

            async def identity_checked() -> bool:
                return (await a.get("vm.counters"))["identity_checks"] > 0

            await wait_for(identity_checked, "the guest's first identity check", timeout=10)
            guest = await expect("PUT", "vm.shutdown", 200, json={"windows": []})
            assert_guest_clean(guest, sc)
            assert (await c.shutdown()) == {"a": 0}

    asyncio.run(run())


def test_a_peer_from_another_ca_cannot_open_a_migration_into_an_agent(tmp_path):
    """The stream's TLS refusal itself is proven in test_transport.py; here: an agent told to expect a VM
    meets a client whose certificate (named like a real host) comes from another CA. It provisions
    nothing, never starts a migration, keeps serving, and then accepts the real one."""
    sc = load_scenario(SMALL)

    async def run() -> None:
        async with cluster(tmp_path) as c:
            a, b = await asyncio.gather(c.start("a", "vendor-a"), c.start("b", "vendor-b"))
            assert sorted(agent_pids(c.workdir)) == sorted(ag.proc.pid for ag in c.agents.values())
            await create_vm(a, sc)
            await b.put("vm.receive-migration", {"vm": sc.vm.name})

            other = ensure_pki(tmp_path / "other-ca")
            cert, key = other.issue("a")
            rogue = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            rogue.load_verify_locations(cafile=str(c.pki_dir / "ca.pem"))  # trusts b: only b can refuse
            rogue.load_cert_chain(str(cert), str(key))
            host, _, port = b.agent.migrate.rpartition(":")
            with pytest.raises(OSError) as refused:
                async with asyncio.timeout(20):
                    ch = await transport.connect(host, int(port), rogue, server_hostname="b")
                    try:
                        await ch.send(control(MsgType.HELLO, vm=vm_spec(sc).__dict__, template="generic-v1"))
                        await ch.recv(10)  # TLS 1.3: the server's verdict on our certificate arrives here
                    finally:
                        await ch.close()
            # refused by b (reset / TLS alert): not a timeout, and not our side distrusting b
            assert not isinstance(refused.value, TimeoutError | ssl.SSLCertVerificationError), refused.value

            info = await b.get("vm.info")
            assert info["vm"] is None and info["expecting"] == sc.vm.name, info
            with pytest.raises(AgentRequestError) as exc:
                await b.get("vm.migration")
            assert exc.value.status == 404  # no stream ever reached the agent

            await start_migration(a, b, sc)
            leg = await migration_result(a)
            assert leg["ok"], leg["error"]
            await asyncio.sleep(0.2)
            guest = await b.put("vm.shutdown", {"windows": [[leg["t_pause_ns"], leg["t_resume_ns"]]]})
            assert_guest_clean(guest, sc)
            assert (await c.shutdown()) == {"a": 0, "b": 0}

    asyncio.run(run())
