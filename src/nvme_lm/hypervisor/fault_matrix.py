"""One cell of issue 6's fault matrix, end to end: a scenario with `[faults]` armed, run by the orchestrator.

The agents are real processes, as in `run_scenario`. Before the faulted leg the orchestrator starts a
`FaultController` (faults.py) and, for the link faults, a `FaultProxy` in front of the destination's
migration port, and arms the cell's `FaultPlan` in both agents (`vm.inject-faults`). After the leg it
brings back what died (an agent started again on its data directory releases what the dead one left on
the device), resolves a source left in doubt (asks the destination, which fences the VM, then tells the
source to resume or release it), and checks the cell:

- the VM runs at exactly the expected place (or nowhere, where the fault killed its only copy);
- the faulted leg ended the expected way, for the expected reason;
- through each PF (`vmm.resources`): the host running the VM holds exactly its exported subsystem,
  namespace and VF, the VF neither suspended nor tracked and limited only by the VM's own QoS; the other
  host holds nothing; no UDMQ anywhere;
- a new migration afterwards succeeds (of the same VM, or of a new one where the VM was lost);
- the guest's final read-back: zero errors, zero verify failures, every block verified; and both devices
  empty once the VM is shut down.

Expected outcomes (`EXPECTED`) and why: docs/faults.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import shutil
import signal
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from nvme_lm.hypervisor.certs import ensure_pki
from nvme_lm.hypervisor.faults import (
    KINDS,
    PHASES,
    Ballast,
    FaultController,
    FaultPlan,
    FaultProxy,
    InjectedFault,
    Tmpfs,
    steps_for,
)
from nvme_lm.hypervisor.orchestrator import (
    POLL_S,
    AgentProcess,
    AgentRequestError,
    ControlClient,
    Event,
    OrchestrationError,
    _sleep_watching,
    build_report,
    migration_options,
    netns_placement,
    start_agent,
    stop_agent,
    vm_spec,
)
from nvme_lm.hypervisor.scenario import Scenario

SETTLE_S = 60.0  # how long the agents may take to end their halves of a failed migration


@dataclass(frozen=True)
class Expected:
    """What a cell must end with. `where`: source | destination | nowhere (the VM's only copy died);
    `leg_ok`: how the faulted leg reports; `error`: a pattern its error must match (why it failed);
    `resolution`: how a source left in doubt is resolved (resume | release), None if it must not be."""

    where: str
    outcome: str
    leg_ok: bool = False
    error: str = ""
    resolution: str | None = None


_ROLLED_BACK = {
    "cancel": ("rolled back: the operator's cancel", r"^cancelled \|"),
    "destination-killed": ("rolled back: the destination died", r"StreamClosed|Connection|closed|reset"),
    "network-cut": ("rolled back: both ends timed out on the cut link", r"TimeoutError|took nothing"),
    "stream-corruption": ("rolled back: TLS refused the damaged record and the connection died",
                          r"StreamClosed|SSL|closed|reset|DECRYPT|MAC"),
    "destination-out-of-space": ("rolled back: the destination's writes failed with Capacity Exceeded",
                                 r"Capacity Exceeded"),
}


def expected(kind: str, phase: str) -> Expected:
    """The defined outcome of every cell (docs/faults.md has the table and the reasons)."""
    if kind == "source-restarted-after-commit":
        if phase == "resume":
            return Expected("destination", "committed: the destination runs the VM; the restarted source released "
                            "its orphaned VF, exported subsystem and namespace", error=r"source agent killed")
        return Expected("nowhere", "VM lost with its host: the source died before the commit, with the VM's only "
                        "running copy; the destination discarded its half", error=r"source agent killed")
    if phase == "resume":
        if kind == "cancel":
            return Expected("destination", "cancel refused (the migration had committed): the VM moved", True)
        if kind == "destination-killed":
            return Expected("source", "in doubt, resolved: the restarted destination never resumed the VM, so the "
                            "source resumed it", error=r"StreamClosed|closed|reset", resolution="resume")
        if kind == "network-cut":
            return Expected("destination", "in doubt, resolved: the destination runs the VM (COMMIT crossed before "
                            "the cut), the source released its copy", error=r"TimeoutError|took nothing",
                            resolution="release")
        if kind == "stream-corruption":
            return Expected("destination", "in doubt, resolved: TLS refused the damaged COMMITTED; the destination "
                            "runs the VM, the source released its copy", error=r"StreamClosed|SSL|closed|reset",
                            resolution="release")
    if kind == "destination-out-of-space" and phase in ("state-transfer", "resume"):
        return Expected("destination", "committed: the migration writes nothing on the destination in this phase "
                        "(the space is back before the VM resumes)", True)
    outcome, error = _ROLLED_BACK[kind]
    return Expected("source", outcome, error=error)


EXPECTED = {(k, p): expected(k, p) for k in KINDS for p in PHASES}


# ============================================================================================ the run
class _Run:
    """The agents of one fault scenario and what happened to them."""

    def __init__(self, sc: Scenario, workdir: Path, session: aiohttp.ClientSession, emit: Event, net: Any) -> None:
        self.sc, self.workdir, self.session, self.emit, self.net = sc, workdir, session, emit, net
        self.pki = workdir / "pki"
        self.agents: dict[str, AgentProcess] = {}
        self.clients: dict[str, ControlClient] = {}
        self.restarted: list[str] = []
        self.orphans: dict[str, list[str]] = {}
        self.killed: dict[str, int] = {}

    async def start(self, name: str) -> None:
        host = self.sc.host(name)
        agent = await start_agent(host, self.workdir, self.pki, **(
            netns_placement(self.net, host, self.workdir) if self.net is not None else {}))
        if name in self.clients:
            await self.clients[name].close()
        self.agents[name] = agent
        self.clients[name] = ControlClient(self.session, agent)

    def alive(self, name: str) -> bool:
        return self.agents[name].proc.returncode is None

    async def revive(self) -> None:
        """Agents that died start again on their data directories (they release what the dead one left)."""
        for name, agent in list(self.agents.items()):
            if agent.proc.returncode is not None:
                self.killed[name] = agent.proc.returncode
                self.emit("phase", {"text": f"starting host agent {name} again (it exited with "
                                            f"{agent.proc.returncode})"})
                await self.start(name)
                self.restarted.append(name)
                self.orphans[name] = (await self.clients[name].get("vmm.ping"))["orphans_released"]

    async def stop(self) -> None:
        await asyncio.gather(*(stop_agent(a, self.clients.get(n)) for n, a in self.agents.items()))
        for c in self.clients.values():
            await c.close()


async def _until(what: str, predicate: Any, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = await predicate()
        if got:
            return got
        if time.monotonic() > deadline:
            raise OrchestrationError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(POLL_S)


async def _retry_409(client: ControlClient, method: str, path: str, body: dict[str, Any] | None = None,
                     timeout: float = SETTLE_S) -> Any:
    """A request an agent refuses with 409 while a migration is still ending: asked again until it answers."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await (client.get(path) if method == "GET" else client.put(path, body))
        except AgentRequestError as e:
            if e.status != 409 or time.monotonic() > deadline:
                raise
        await asyncio.sleep(POLL_S)


async def _ended(client: ControlClient) -> dict[str, Any] | None:
    """The agent's last migration once it is over (None while it runs); {} if it never had one."""
    try:
        m = await client.get("vm.migration")
    except AgentRequestError as e:
        if e.status == 404:
            return {"phase": None, "error": None}
        raise
    busy = m["phase"] in ("setup", "receiving", "preparing", "prepared") or (
        m["role"] == "source" and m["result"] is None)
    return None if busy else m


def _link_up(net: Any, host: str, names: list[str]) -> None:
    """The cable back in (TestNetwork.link_up also drops the neighbour entries that failed meanwhile)."""
    net.link_up(host)


def _dead_source_leg(status: dict[str, Any], t_start: float, why: str) -> dict[str, Any]:
    """A leg report for a source that died mid-way (what it last said, nothing measured after)."""
    nan = float("nan")
    return {"ok": False, "error": why, "total_s": time.monotonic() - t_start, "passes": len(status.get("passes", [])),
            "bytes_lba": status.get("bytes_lba", 0), "bytes_ram": status.get("bytes_ram", 0),
            "allocated_bytes": status.get("allocated_bytes", 0), "engine_pause_ms": nan, "unfetched_at_suspend": 0,
            "t_start": nan, "t_end": nan, "t_pause": nan, "t_resume": nan, "t_pause_ns": 0, "t_resume_ns": 0,
            "pass_table": status.get("passes", [])}


async def _leg(run: _Run, i: int, src: str, dst: str, destination: str | None = None) -> dict[str, Any]:
    """One leg from `src` to `dst` (through `destination`, e.g. a proxy, if given); survives a source that dies."""
    sc = run.sc
    s, d = run.clients[src], run.clients[dst]
    run.emit("phase", {"text": f"leg {i}: {src} -> {dst}"})
    await d.put("vm.receive-migration", {"vm": sc.vm.name, "reply_timeout_s": sc.migration.reply_timeout_s})
    await s.put("vm.send-migration", {"destination": destination or run.agents[dst].migrate, "server_name": dst,
                                      "options": migration_options(sc)})
    t_start, status = time.monotonic(), {}
    deadline = t_start + sc.migration.timeout_s + SETTLE_S
    while True:
        await asyncio.sleep(POLL_S)
        if not run.alive(src):
            leg = _dead_source_leg(status, t_start, f"source agent killed (exit {run.agents[src].proc.returncode})")
            break
        try:
            status = await s.get("vm.migration")
        except OrchestrationError:  # refused: the agent may be dying and not yet reaped
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.agents[src].proc.wait(), 5)
            if not run.alive(src):
                continue
            raise
        run.emit("migration", {"leg": i, **status})
        if status["result"] is not None:
            leg = dict(status["result"])
            leg["source_phase"] = status["phase"]
            break
        if time.monotonic() > deadline:
            raise OrchestrationError(f"leg {i} did not end within {deadline - t_start:.0f} s")
    leg.update({"leg": i, "from": src, "to": dst})
    return leg


# ============================================================================================ the cell
def _check(checks: dict[str, dict[str, Any]], name: str, ok: bool, detail: Any = "") -> None:
    checks[name] = {"ok": bool(ok), "detail": detail if isinstance(detail, str) else repr(detail)}


def _holdings(res: dict[str, Any]) -> tuple[int, int, int]:
    return len(res["exported_subsystems"]), len(res["namespaces"]), len(res["vfs"])


async def run_fault_scenario(sc: Scenario, workdir: Path, on_event: Event | None = None,
                             netns: bool = False) -> dict[str, Any]:
    """Runs `sc` (with `[faults]` armed) as one cell; returns the migration report with a `faults` section
    (`ok` is the cell's verdict)."""
    from nvme_lm.hypervisor.netns import TestNetwork

    emit: Event = on_event or (lambda kind, data: None)
    f = sc.faults
    exp = expected(f.kind, f.phase)
    workdir.mkdir(parents=True, exist_ok=True)
    ensure_pki(workdir / "pki")
    t_begin = time.monotonic()
    leg_src, leg_dst = sc.legs[f.leg - 1]
    checks: dict[str, dict[str, Any]] = {}
    observed: dict[str, Any] = {}
    legs: list[dict[str, Any]] = []
    guest: dict[str, Any] | None = None
    error: str | None = None
    net: Any = None
    proxy: FaultProxy | None = None
    controller: FaultController | None = None
    tmpfs: Tmpfs | None = None
    ballast: Ballast | None = None
    enospc = f.kind == "destination-out-of-space" and (
        f.out_of_space == "inject" or (f.out_of_space == "auto" and not Tmpfs.possible()))
    if f.kind == "destination-out-of-space" and not enospc:
        tmpfs = Tmpfs(workdir / leg_dst, max(64 << 20, 2 * sc.capacity_bytes + (32 << 20)))
    async with aiohttp.ClientSession() as session:
        run: _Run | None = None
        try:
            if f.kind == "stream-corruption" and netns:
                raise OrchestrationError("stream corruption needs the loopback relay: not available with --netns")
            names = sorted({h for leg in sc.legs for h in leg}, key=sc.hosts.names.index)
            if netns:
                net = TestNetwork(names, sc.hosts.link_mbit, sc.hosts.link_delay_ms)
                await asyncio.to_thread(net.start)
            if tmpfs is not None:
                await tmpfs.mount()
                ballast = Ballast(tmpfs.path)
            run = _Run(sc, workdir, session, emit, net)
            emit("phase", {"text": f"fault {f.kind} at {f.phase} (leg {f.leg}); starting host agents"})
            await asyncio.gather(*(run.start(n) for n in names))
            sock = workdir.resolve() / "faults.sock"
            if len(str(sock).encode()) > 100:  # sun_path holds 108 bytes
                sock = Path(tempfile.mkdtemp(prefix="nvme-lm-faults-")) / "faults.sock"
            controller = await FaultController(sock, {}).start()
            controller.actions.update(_actions(run, leg_src, leg_dst, lambda: proxy, ballast, enospc))
            where = sc.legs[0][0]
            await run.clients[where].put("vm.create", {"spec": vm_spec(sc).__dict__, "template": sc.vm.template,
                                                       "device_rate_iops": sc.vm.device_rate_iops})
            await _sleep_watching(run.clients[where], sc.migration.start_after_s, emit)
            for i, (src, dst) in enumerate(sc.legs[: f.leg - 1], start=1):  # the legs before the fault
                leg = await _leg(run, i, src, dst)
                legs.append(leg)
                if not leg["ok"]:
                    raise OrchestrationError(f"leg {i} (before the fault) failed: {leg['error']}")
                where = dst

            # ---------------------------------------------------------------- the faulted leg
            destination = None
            if f.kind in ("network-cut", "stream-corruption") and net is None:
                host, _, port = run.agents[leg_dst].migrate.rpartition(":")
                proxy = FaultProxy(host.strip("[]"), int(port))
                destination = await proxy.start()
            plan = FaultPlan(steps_for(f.kind, f.phase, f.after_s), controller.address, f.kind, f.phase)
            for n in (leg_src, leg_dst):
                await run.clients[n].put("vm.inject-faults", {"plan": plan.to_dict()})
            leg = await _leg(run, f.leg, leg_src, leg_dst, destination)
            legs.append(leg)
            observed["leg_ok"], observed["leg_error"] = leg["ok"], leg["error"]
            observed["source_phase"] = leg.get("source_phase")
            in_doubt = str(leg.get("source_phase", "")).startswith("in doubt")
            observed["in_doubt"] = in_doubt

            # what fired where (before anything is restarted: a restarted agent knows nothing of it)
            fired: list[dict[str, Any]] = []
            for n in (leg_src, leg_dst):
                if run.alive(n):
                    with contextlib.suppress(OrchestrationError):
                        fired += (await run.clients[n].get("vm.inject-faults"))["plan"]["fired"]
            await run.revive()
            observed["restarted"], observed["exit_codes"] = run.restarted, run.killed
            observed["orphans_released"] = run.orphans

            # ---------------------------------------------------------------- in doubt: ask, fence, resolve
            if in_doubt:
                fence = await _retry_409(run.clients[leg_dst], "PUT", "vm.fence-incoming", {"vm": sc.vm.name})
                decision = "release" if fence["runs"] or fence["ran_here"] else "resume"
                await run.clients[leg_src].put("vm.resolve-in-doubt", {"decision": decision})
                observed["fence"], observed["resolution"] = fence, decision
            _check(checks, "in doubt only where expected, resolved as expected",
                   observed.get("resolution") == exp.resolution,
                   f"expected {exp.resolution}, got {observed.get('resolution')} (source phase: "
                   f"{observed['source_phase']})")

            with contextlib.suppress(OrchestrationError):  # the destination's own account (if it lived)
                theirs = await _until("the destination's half to end", lambda: _ended(run.clients[leg_dst]),
                                      SETTLE_S)
                observed["destination_phase"], observed["destination_error"] = theirs["phase"], theirs["error"]

            # ---------------------------------------------------------------- the fault happened, for its reason
            kills = [s for s in plan.steps if s.action == "kill"]
            events = controller.events
            observed["controller"] = [{k: v for k, v in e.items() if k != "t"} for e in events]
            observed["fired"] = fired
            if kills:
                victim = leg_src if kills[0].role == "source" else leg_dst
                fired_ok = run.killed.get(victim) == -signal.SIGKILL
                why = f"{victim} exit code {run.killed.get(victim)}"
            else:
                wanted = [s.event for s in plan.steps]
                got = [e["event"] for e in events if "observed" in e]
                # the first step is the fault; a later one (giving the space back) comes only if the phase ended
                fired_ok = bool(got) and got == wanted[: len(got)] and not any("error" in e for e in events)
                why = f"controller events {got}, expected {wanted}; errors: {[e.get('error') for e in events]}"
            if proxy is not None:
                observed["proxy"] = {"connections": proxy.connections, "bytes": proxy.bytes,
                                     "flipped": proxy.flipped, "cut": proxy.cut_at is not None}
                if f.kind == "stream-corruption":
                    fired_ok = fired_ok and bool(proxy.flipped)
            if ballast is not None or enospc:
                observed["out_of_space"] = "tmpfs filled" if ballast is not None else "ENOSPC injected"
            _check(checks, "fault injected at its point", fired_ok, why)
            final = [p for p in leg.get("pass_table", []) if p.get("kind") == "final"]
            observed["final_lba_bytes"] = final[0]["lba_bytes"] if final else None
            if (f.kind, f.phase) == ("destination-out-of-space", "stop-and-copy") and leg["ok"] and final and \
                    not final[0]["lba_bytes"]:  # the guest wrote nothing since the last pass: nothing could fail
                exp = Expected("destination", "committed: the final delta carried no namespace data", True)
                observed["expected_instead"] = exp.outcome
            why_failed = f"{leg['error']} | destination: {observed.get('destination_error')}"
            _check(checks, "faulted leg ended as expected", leg["ok"] == exp.leg_ok and (
                exp.leg_ok or bool(re.search(exp.error, why_failed))),
                f"ok={leg['ok']} error={leg['error']!r}; expected ok={exp.leg_ok}" +
                ("" if exp.leg_ok else f" with an error matching {exp.error!r}"))

            # ---------------------------------------------------------------- fault cleared, both settled
            for n in (leg_src, leg_dst):
                await run.clients[n].put("vm.inject-faults", {"plan": {}, "enospc": False})
            if ballast is not None:
                await asyncio.to_thread(ballast.release)
            if proxy is not None:
                proxy.restore()
            if net is not None:
                await asyncio.to_thread(_link_up, net, leg_dst, names)
            resources = {n: await _retry_409(run.clients[n], "GET", "vmm.resources") for n in (leg_src, leg_dst)}
            infos = {n: (await run.clients[n].get("vm.info"))["vm"] for n in (leg_src, leg_dst)}
            running = [n for n, vm in infos.items() if vm is not None and vm["running"] and not vm["paused"]]
            present = [n for n, vm in infos.items() if vm is not None]
            want = {"source": [leg_src], "destination": [leg_dst], "nowhere": []}[exp.where]
            observed["where"] = running
            observed["resources"] = resources
            _check(checks, f"VM runs at exactly the expected place ({exp.where})", running == want and present == want,
                   f"running at {running}, present at {present}; expected {want}")
            _check(checks, "no UDMQ left on either device", all(not r["udmqs"] for r in resources.values()),
                   {n: r["udmqs"] for n, r in resources.items()})
            qos = sc.vm.device_rate_iops
            for n, r in resources.items():
                if n in running:
                    vfs = r["vfs"]
                    vf = vfs[0] if len(vfs) == 1 else {}
                    rl = vf.get("rate_limit", {})
                    limited_as_qos = (not rl.get("enabled") and not qos) or (
                        rl.get("enabled") and rl.get("iops") == qos and not rl.get("write_bandwidth"))
                    _check(checks, f"{n} holds exactly the VM: one exported subsystem, namespace and VF",
                           _holdings(r) == (1, 1, 1), r)
                    _check(checks, f"{n}'s VF running: not suspended, not tracked, limited only by the VM's QoS",
                           vf.get("online") and vf.get("suspended") is False and vf.get("tracking") is False
                           and limited_as_qos, vf)
                else:
                    _check(checks, f"{n} holds nothing", _holdings(r) == (0, 0, 0), r)

            # ---------------------------------------------------------------- a new migration afterwards
            windows_from = len(legs)
            if running:
                here = running[0]
            else:  # the VM died with its host: a new one shows both hosts can take migrations again
                here = leg_src
                emit("phase", {"text": f"{sc.vm.name} was lost: creating a new one on {here}"})
                await run.clients[here].put("vm.create", {"spec": vm_spec(sc).__dict__, "template": sc.vm.template,
                                                          "device_rate_iops": sc.vm.device_rate_iops})
                windows_from = len(legs)  # only the new VM's legs count for its guest report
                await _sleep_watching(run.clients[here], sc.migration.start_after_s, emit)
            other = leg_dst if here == leg_src else leg_src
            after = await _leg(run, len(legs) + 1, here, other)
            legs.append(after)
            _check(checks, "a new migration afterwards succeeds", after["ok"], after["error"])
            if after["ok"]:
                here = other

            # ---------------------------------------------------------------- the guest's verdict
            await _sleep_watching(run.clients[here], sc.vm.workload.run_after_s, emit)
            emit("phase", {"text": "stopping the guest and reading every block back"})
            own = [leg for leg in legs[windows_from:] if leg["ok"]] if not running else [
                leg for leg in legs if leg["ok"]]
            guest = await run.clients[here].put("vm.shutdown", {"windows": [
                [leg["t_pause_ns"], leg["t_resume_ns"]] for leg in own]})
            blocks = sc.capacity_bytes // sc.vm.workload.block_size
            _check(checks, "guest: no error, no timeout, nothing lost, every block verified",
                   guest["errors"] == 0 and guest["timeouts"] == 0 and guest["spurious_completions"] == 0
                   and guest["verify_failures"] == 0 and guest.get("ram_verify_failures", 0) == 0
                   and guest["identity_changes"] == 0 and guest["verified_blocks"] == blocks
                   and not guest.get("fatal"),
                   {k: guest.get(k) for k in ("errors", "timeouts", "spurious_completions", "verify_failures",
                                               "ram_verify_failures", "identity_changes", "verified_blocks",
                                               "fatal", "verify_failure_examples")})
            final = {n: await _retry_409(run.clients[n], "GET", "vmm.resources") for n in (leg_src, leg_dst)}
            _check(checks, "both devices empty after the VM's shutdown",
                   all(_holdings(r) == (0, 0, 0) and not r["udmqs"] for r in final.values()), final)
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            _check(checks, "the run completed", False, error)
        finally:
            emit("phase", {"text": "stopping host agents"})
            if run is not None:
                await run.stop()
            if controller is not None:
                await controller.close()
                if controller.path.parent != workdir.resolve():
                    shutil.rmtree(controller.path.parent, ignore_errors=True)
            if proxy is not None:
                await proxy.close()
            if ballast is not None:
                with contextlib.suppress(OSError):
                    ballast.release()
            if tmpfs is not None:
                with contextlib.suppress(Exception):
                    await tmpfs.unmount()
            if net is not None:
                await asyncio.to_thread(net.close)
    agents = run.agents if run is not None else {}
    report = build_report(sc, agents, legs, guest, error, time.monotonic() - t_begin)
    ok = bool(checks) and all(c["ok"] for c in checks.values())
    report["faults"] = {"kind": f.kind, "phase": f.phase, "leg": f.leg, "after_s": f.after_s, "netns": netns,
                        "expected": {"where": exp.where, "outcome": exp.outcome, "leg_ok": exp.leg_ok,
                                     "resolution": exp.resolution},
                        "observed": observed, "checks": checks, "ok": ok,
                        "seconds": time.monotonic() - t_begin}
    report["ok"] = ok
    if not ok and report["error"] is None:
        report["error"] = "fault cell failed: " + "; ".join(n for n, c in checks.items() if not c["ok"])
    return report


def _actions(run: _Run, src: str, dst: str, proxy: Any, ballast: Ballast | None, enospc: bool) -> dict[str, Any]:
    """What the FaultController does for each event a FaultPlan asks for."""

    async def cancel(_body: dict[str, Any]) -> str:
        try:
            await run.clients[src].put("vm.cancel-migration")
        except AgentRequestError as e:
            return f"cancel refused: HTTP {e.status}: {e.error}"
        return "cancel accepted"

    async def kill_destination(_body: dict[str, Any]) -> str:
        proc = run.agents[dst].proc
        proc.send_signal(signal.SIGKILL)
        return f"destination agent killed (exit {await proc.wait()})"

    async def cut(_body: dict[str, Any]) -> str:
        if run.net is not None:
            await asyncio.to_thread(run.net.link_down, dst)
            return f"link of {dst} down"
        proxy().cut()
        return "link cut (the relay stopped forwarding, sockets left open)"

    async def corrupt(_body: dict[str, Any]) -> str:
        proxy().corrupt()
        return "one bit of the next chunk flipped"

    async def fill(_body: dict[str, Any]) -> str:
        if enospc:
            await run.clients[dst].put("vm.inject-faults", {"enospc": True})
            return "ENOSPC injected on the destination's namespace writes"
        assert ballast is not None
        taken = await asyncio.to_thread(ballast.fill)
        return f"destination filesystem filled ({taken >> 20} MiB taken, {ballast.free_bytes()} bytes free)"

    async def release(_body: dict[str, Any]) -> str:
        if enospc:
            await run.clients[dst].put("vm.inject-faults", {"enospc": False})
            return "ENOSPC injection off"
        assert ballast is not None
        await asyncio.to_thread(ballast.release)
        return "space given back"

    return {"cancel": cancel, "kill-destination": kill_destination, "cut": cut, "corrupt": corrupt, "fill": fill,
            "release": release}


def table(cells: list[dict[str, Any]]) -> str:
    """The matrix as text: one line per cell with its verdict, where the VM ended and what was observed."""
    lines = [f"{'fault':<30} {'phase':<14} {'result':<6} {'VM at':<7} {'s':>5}  observed"]
    for c in cells:
        f = c.get("faults", c)
        obs = f["observed"]
        where = ",".join(obs.get("where", [])) or "nowhere"
        seen = ["in network namespaces"] if f.get("netns") else []
        seen += [e.get("observed") or e.get("error") for e in obs.get("controller", [])]
        seen += [f"{n} killed" for n in obs.get("exit_codes", {})]
        seen.append("leg ok" if obs.get("leg_ok") else f"leg failed: {_short(obs.get('leg_error'))}")
        if obs.get("destination_error") and not obs.get("leg_ok"):
            seen.append(f"destination: {_short(obs['destination_error'])}")
        if obs.get("resolution"):
            seen.append(f"in doubt -> {obs['resolution']}")
        if obs.get("restarted"):
            seen.append(f"restarted {','.join(obs['restarted'])}")
        bad = [n for n, chk in f["checks"].items() if not chk["ok"]]
        if bad:
            seen.append("FAILED: " + "; ".join(f"{n}: {f['checks'][n]['detail'][:300]}" for n in bad))
        secs = f.get("seconds", math.nan)
        lines.append(f"{f['kind']:<30} {f['phase']:<14} {'pass' if f['ok'] else 'FAIL':<6} {where:<7} "
                     f"{secs:5.1f}  {'; '.join(str(x) for x in seen)}")
    return "\n".join(lines)


def _short(error: Any, n: int = 70) -> str:
    s = str(error)
    return s if len(s) <= n else s[: n - 3] + "..."


__all__ = ["EXPECTED", "Expected", "InjectedFault", "expected", "run_fault_scenario", "table"]
