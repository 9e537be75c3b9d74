"""Runs a scenario end to end: host agents as real OS processes, the VM created on the first host,
migrated leg by leg over mutual TLS, the run ended with a full read-back, and one report assembled
from what the agents and the guest measured (schema: docs/scenarios.md, "The report").

The orchestrator only talks to the agents' control APIs; it never touches a device or a guest.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from nvme_lm.hypervisor.certs import ensure_pki
from nvme_lm.hypervisor.netns import MIGRATE_PORT, TestNetwork
from nvme_lm.hypervisor.scenario import HostSpec, Scenario
from nvme_lm.vm.machine import VmSpec

REPORT_VERSION = 1
AGENT_START_TIMEOUT = 60.0
POLL_S = 0.1

Event = Callable[[str, dict[str, Any]], None]  # (kind, data): "phase", "migration", "guest"


class OrchestrationError(RuntimeError):
    pass


class AgentRequestError(OrchestrationError):
    def __init__(self, host: str, path: str, status: int, error: str) -> None:
        super().__init__(f"{host} {path}: HTTP {status}: {error}")
        self.status = status
        self.error = error


@dataclass
class AgentProcess:
    name: str
    model: str
    proc: asyncio.subprocess.Process
    control: str
    migrate: str
    log: Path
    netns: str | None = None  # the network namespace it runs in (`run_scenario(..., netns=True)`)

    def tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


class ControlClient:
    """JSON over HTTP to one agent."""

    def __init__(self, session: aiohttp.ClientSession, agent: AgentProcess) -> None:
        self.session = session
        self.agent = agent
        self.base = f"http://{agent.control}/api/v1/"
        self._own: aiohttp.ClientSession | None = None
        if agent.control.startswith("unix:"):  # an agent in a network namespace: reached through the filesystem
            self.session = self._own = aiohttp.ClientSession(connector=aiohttp.UnixConnector(agent.control[5:]))
            self.base = "http://localhost/api/v1/"

    async def close(self) -> None:
        if self._own is not None:
            await self._own.close()

    async def _call(self, method: str, path: str, body: dict[str, Any] | None = None,
                    timeout: float = 600.0) -> Any:
        try:
            async with self.session.request(method, self.base + path, json=body,
                                            timeout=aiohttp.ClientTimeout(total=timeout)) as r:
                data = await r.json(content_type=None)
                if r.status >= 400:
                    raise AgentRequestError(self.agent.name, path, r.status, data.get("error", "?"))
                return data
        except aiohttp.ClientError as e:
            raise OrchestrationError(f"{self.agent.name} {path}: {e}; agent log:\n{self.agent.tail()}") from e

    async def get(self, path: str) -> Any:
        return await self._call("GET", path)

    async def put(self, path: str, body: dict[str, Any] | None = None, timeout: float = 600.0) -> Any:
        return await self._call("PUT", path, body or {}, timeout)


async def start_agent(host: HostSpec, workdir: Path, pki_dir: Path, prefix: list[str] | None = None,
                      control: str = "127.0.0.1:0", migrate_listen: str | None = None,
                      netns: str | None = None) -> AgentProcess:
    """`nvme-lm host serve` as a child process; returns once it wrote its ready file. `prefix` (e.g.
    `ip netns exec NS`), `control` and `migrate_listen` place it in a network namespace (`netns_placement`)."""
    ready = workdir / f"{host.name}.ready"
    log = workdir / f"{host.name}.log"
    ready.unlink(missing_ok=True)
    argv = [*(prefix or []), sys.executable, "-m", "nvme_lm.cli.main", "host", "serve", "--name", host.name,
            "--model", host.model, "--data-dir", str(workdir / host.name), "--listen", control,
            "--migrate-listen", migrate_listen or host.listen,
            "--pki", str(pki_dir), "--ready-file", str(ready)]
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(*argv, stdin=asyncio.subprocess.DEVNULL, stdout=out,
                                                    stderr=asyncio.subprocess.STDOUT)
    deadline = time.monotonic() + AGENT_START_TIMEOUT
    while not ready.exists():
        if proc.returncode is not None:
            raise OrchestrationError(f"host agent {host.name} exited with {proc.returncode}:\n"
                                     + log.read_text(errors="replace")[-2000:])
        if time.monotonic() > deadline:
            proc.kill()
            raise OrchestrationError(f"host agent {host.name} not ready after {AGENT_START_TIMEOUT:.0f} s")
        await asyncio.sleep(0.05)
    info = json.loads(ready.read_text())
    return AgentProcess(host.name, host.model, proc, info["control"], info["migrate"], log, netns)


def netns_placement(net: TestNetwork, host: HostSpec, workdir: Path) -> dict[str, Any]:
    """`start_agent` keywords for an agent in its namespace: the control API on a UNIX socket in the work dir
    (the filesystem is shared across network namespaces, so the orchestrator reaches it from the root
    namespace), the stream on the namespace's address at the scenario's port or MIGRATE_PORT."""
    sock = workdir.resolve() / f"{host.name}.sock"
    if len(str(sock).encode()) > 100:  # sun_path holds 108 bytes
        raise OrchestrationError(f"work dir {workdir} is too long a path for the agents' UNIX sockets")
    port = int(host.listen.rpartition(":")[2]) or MIGRATE_PORT
    return {"prefix": net.exec_prefix(host.name), "control": f"unix:{sock}",
            "migrate_listen": f"{net.addr(host.name)}:{port}", "netns": net.netns(host.name)}


async def stop_agent(agent: AgentProcess, client: ControlClient | None) -> None:
    if agent.proc.returncode is None and client is not None:
        with contextlib.suppress(Exception):
            await client.put("vmm.shutdown", timeout=10)
    try:
        await asyncio.wait_for(agent.proc.wait(), 30)
    except TimeoutError:
        agent.proc.kill()
        await agent.proc.wait()


def vm_spec(sc: Scenario) -> VmSpec:
    """The scenario's VM as the agents know it."""
    v, ns, w = sc.vm, sc.vm.namespace, sc.vm.workload
    return VmSpec(name=v.name, memory_bytes=sc.memory_bytes, queues=v.queues, lba_size=ns.lba_size,
                  capacity_bytes=ns.capacity_bytes, prefill_bytes=ns.prefill_bytes, pattern=w.pattern,
                  block_size=w.block_size, iodepth=w.iodepth, rwmixread=w.rwmixread, rate_iops=w.rate_iops,
                  hot_set=w.hot_set, hot_share=w.hot_share,
                  trim_percent=w.trim_percent if "trim" in (w.pattern, *w.queue_patterns.split(",")) else 0,
                  identity_check_s=w.identity_check_s, region_bytes=w.region_bytes, queue_patterns=w.queue_patterns)


def migration_options(sc: Scenario) -> dict[str, Any]:
    m = sc.migration
    return {"downtime_target_ms": m.downtime_target_ms, "max_passes": m.max_passes,
            "copy_chunk_bytes": m.copy_chunk_bytes, "verify_ram": m.verify_ram, "verify_lbas": m.verify_lbas,
            "policy": m.policy, "throttle": m.throttle, "give_up_s": m.give_up_s,
            "max_bandwidth_mib_s": m.max_bandwidth_mib_s, "timeout_s": m.timeout_s,
            "reply_timeout_s": m.reply_timeout_s}


async def _sleep_watching(client: ControlClient, seconds: float, on_event: Event) -> None:
    """Lets the VM run, reporting the guest's counters as it goes."""
    end = time.monotonic() + seconds
    while True:
        with contextlib.suppress(OrchestrationError):
            on_event("guest", await client.get("vm.counters"))
        left = end - time.monotonic()
        if left <= 0:
            return
        await asyncio.sleep(min(0.25, left))


async def run_scenario(sc: Scenario, workdir: Path, on_event: Event | None = None,
                       netns: bool = False) -> dict[str, Any]:
    """Runs `sc` with its agents under `workdir`; returns the report (also on failure, with ok False).
    `netns`: each agent in its own network namespace, the link shaped from `[hosts]` (hypervisor/netns.py).
    A scenario with a fault armed (`[faults]`) runs as a cell of the fault matrix (fault_matrix.py)."""
    if sc.faults.armed:
        from nvme_lm.hypervisor.fault_matrix import run_fault_scenario  # it builds on this module

        return await run_fault_scenario(sc, workdir, on_event, netns=netns)
    emit: Event = on_event or (lambda kind, data: None)
    workdir.mkdir(parents=True, exist_ok=True)
    pki_dir = workdir / "pki"
    ensure_pki(pki_dir)
    agents: dict[str, AgentProcess] = {}
    clients: dict[str, ControlClient] = {}
    legs: list[dict[str, Any]] = []
    guest: dict[str, Any] | None = None
    error: str | None = None
    net: TestNetwork | None = None
    t_begin = time.monotonic()
    async with aiohttp.ClientSession() as session:
        try:
            names = sorted({h for leg in sc.legs for h in leg}, key=sc.hosts.names.index)
            if netns:
                emit("phase", {"text": f"building the test network ({sc.hosts.link_mbit or 'unlimited'} Mbit/s, "
                                       f"{sc.hosts.link_delay_ms:g} ms)"})
                net = TestNetwork(names, sc.hosts.link_mbit, sc.hosts.link_delay_ms)
                await asyncio.to_thread(net.start)
            emit("phase", {"text": f"starting host agents {', '.join(names)}"})
            started = await asyncio.gather(*(start_agent(sc.host(n), workdir, pki_dir, **(
                netns_placement(net, sc.host(n), workdir) if net else {})) for n in names), return_exceptions=True)
            for n, a in zip(names, started, strict=True):
                if isinstance(a, BaseException):
                    raise a
                agents[n] = a
                clients[n] = ControlClient(session, a)
            where = sc.legs[0][0]
            emit("phase", {"text": f"creating {sc.vm.name} on {where} (prefill "
                                   f"{sc.prefill_bytes / (1 << 20):.0f} MiB)"})
            await clients[where].put("vm.create", {"spec": vm_spec(sc).__dict__, "template": sc.vm.template,
                                                   "device_rate_iops": sc.vm.device_rate_iops})
            emit("phase", {"text": f"{sc.vm.name} running on {where}"})
            await _sleep_watching(clients[where], sc.migration.start_after_s, emit)
            for i, (src, dst) in enumerate(sc.legs, start=1):
                leg = await _migrate_leg(i, clients[src], clients[dst], agents[dst], sc, emit)
                legs.append(leg)
                if not leg["ok"]:
                    error = f"leg {i} ({src} -> {dst}) failed: {leg['error']}"
                    break
                where = dst
            emit("phase", {"text": f"{sc.vm.name} running on {where}"})
            await _sleep_watching(clients[where], sc.vm.workload.run_after_s, emit)
            emit("phase", {"text": "stopping the guest and reading every block back"})
            windows = [[leg["t_pause_ns"], leg["t_resume_ns"]] for leg in legs if leg["ok"]]
            guest = await clients[where].put("vm.shutdown", {"windows": windows})
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
        finally:
            emit("phase", {"text": "stopping host agents"})
            await asyncio.gather(*(stop_agent(a, clients.get(n)) for n, a in agents.items()))
            for c in clients.values():
                await c.close()
            if net is not None:
                await asyncio.to_thread(net.close)
    return build_report(sc, agents, legs, guest, error, time.monotonic() - t_begin)


async def _migrate_leg(i: int, src: ControlClient, dst: ControlClient, dst_agent: AgentProcess, sc: Scenario,
                       emit: Event) -> dict[str, Any]:
    emit("phase", {"text": f"leg {i}: {src.agent.name} -> {dst.agent.name}"})
    await dst.put("vm.receive-migration", {"vm": sc.vm.name, "reply_timeout_s": sc.migration.reply_timeout_s})
    await src.put("vm.send-migration", {"destination": dst_agent.migrate, "server_name": dst_agent.name,
                                        "options": migration_options(sc)})
    while True:
        await asyncio.sleep(POLL_S)
        status = await src.get("vm.migration")
        emit("migration", {"leg": i, **status})
        if status["result"] is not None:
            leg = dict(status["result"])
            break
    leg.update({"leg": i, "from": src.agent.name, "to": dst.agent.name})
    return leg


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def build_report(sc: Scenario, agents: dict[str, AgentProcess], legs: list[dict[str, Any]],
                 guest: dict[str, Any] | None, error: str | None, total_s: float) -> dict[str, Any]:
    """The report of docs/scenarios.md: headline figures, legs with their pass tables, the guest's view."""
    gaps = (guest or {}).get("gaps", [])
    ok_legs = [leg for leg in legs if leg["ok"]]
    for leg, gap in zip(ok_legs, gaps, strict=False):
        leg["blackout_ms"] = gap["gap_ms"]
    for leg in legs:
        leg.setdefault("blackout_ms", float("nan"))
        for k in ("engine_pause_ms", "t_pause", "t_resume"):
            leg[k] = _num(leg.get(k))
    g = guest or {}
    guest_out = {k: g.get(k, 0) for k in ("ios", "reads", "writes", "trims", "errors", "timeouts",
                                          "spurious_completions", "identity_checks", "identity_changes",
                                          "verified_reads", "verified_blocks", "verify_failures")}
    guest_out["verify_failure_examples"] = g.get("verify_failure_examples", [])
    guest_out["iops"] = float(g.get("iops", 0.0))
    lat = g.get("latency_us", {})
    guest_out["latency_us"] = {k: _num(lat.get(k)) for k in ("p50", "p99", "p99.9", "max")}
    guest_out["ram_verify_failures"] = g.get("ram_verify_failures", 0)
    guest_out["async_events"] = g.get("async_events", 0)
    timeline = g.get("timeline") or {"bin_s": 0.01, "iops": [], "lat_mean_us": [], "lat_max_us": []}
    ok = error is None and guest is not None and all(leg["ok"] for leg in legs) and bool(legs)
    if guest is None and error is None:
        error = "the guest's final report is missing"

    def worst(key: str) -> float:
        vals = [leg[key] for leg in legs if isinstance(leg.get(key), float) and math.isfinite(leg[key])]
        return max(vals) if vals else float("nan")

    return {
        "version": REPORT_VERSION, "scenario": sc.name,
        "hosts": {n: {"model": a.model, "addr": a.migrate, "netns": a.netns is not None, "namespace": a.netns,
                      "link_mbit": sc.hosts.link_mbit, "link_delay_ms": sc.hosts.link_delay_ms,
                      "link_shaped": a.netns is not None} for n, a in agents.items()},
        "ok": ok and guest_out["errors"] == 0 and guest_out["verify_failures"] == 0
        and guest_out["identity_changes"] == 0 and guest_out["timeouts"] == 0,
        "error": error,
        "blackout_ms": worst("blackout_ms"), "engine_pause_ms": worst("engine_pause_ms"),
        "total_s": total_s, "passes": sum(leg["passes"] for leg in legs),
        "bytes_lba": sum(leg["bytes_lba"] for leg in legs), "bytes_ram": sum(leg["bytes_ram"] for leg in legs),
        "allocated_bytes": legs[0]["allocated_bytes"] if legs else 0,
        "guest_errors": guest_out["errors"] + guest_out["timeouts"] + guest_out["spurious_completions"],
        "identity_changes": guest_out["identity_changes"], "verified_blocks": guest_out["verified_blocks"],
        "verify_failures": guest_out["verify_failures"],
        "legs": legs, "guest": guest_out, "timeline": timeline,
    }
