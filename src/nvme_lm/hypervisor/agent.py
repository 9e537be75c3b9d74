"""The host agent: one OS process per host. It owns the host's SSD through the PF (`Node`), runs the
VM placed on it, answers the control API (HTTP/JSON, `control.py`) and speaks the migration stream
(mutual TLS) both ways: it sends its VM away when told to, and accepts a VM it was told to expect.

Blocking device work (PF admin commands, guest boot, copies) runs in worker threads so that the event
loop keeps serving control requests and stream traffic while a migration is under way.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nvme_lm.hypervisor import certs, transport
from nvme_lm.hypervisor.faults import EnospcInjection, FaultPlan
from nvme_lm.hypervisor.migration import (
    NO_FAULTS,
    REPLY_TIMEOUT,
    FaultHooks,
    HostedVm,
    Incoming,
    MigrationOptions,
    Progress,
    receive_vm,
    requirements,
    send_vm,
)
from nvme_lm.hypervisor.node import Node
from nvme_lm.hypervisor.rollback import SourceRollback
from nvme_lm.hypervisor.transport import Channel
from nvme_lm.vm.machine import Vm, VmSpec

READY_VERSION = 1


class AgentError(Exception):
    """A control request that cannot be carried out; `status` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 409) -> None:
        super().__init__(message)
        self.status = status


def split_addr(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"address {addr!r} is not HOST:PORT (port 0..65535)")
    return host.strip("[]"), int(port)


def own_ips(host: str) -> list[str]:
    """The stream listener's IP for the certificate's SANs (a host in a network namespace has its own address);
    127.0.0.1 is always there, a wildcard or a name adds nothing."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return []
    return [] if ip.is_unspecified or str(ip) == "127.0.0.1" else [str(ip)]


@dataclass
class AgentConfig:
    name: str
    data_dir: Path
    model: str
    listen: str = "127.0.0.1:0"  # control API
    migrate_listen: str = "127.0.0.1:0"  # migration stream (mTLS)
    pki_dir: Path | None = None
    ready_file: Path | None = None


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.node: Node | None = None
        self.hosted: HostedVm | None = None
        self.expecting: str | None = None  # name of the VM announced by vm.receive-migration
        self.migration: Progress | None = None
        self.migration_t0 = 0
        self._task: asyncio.Task | None = None
        self._shutdown = asyncio.Event()
        self._pki: certs.Pki | None = None
        self.control_addr = ""
        self.migrate_addr = ""
        self.hooks: FaultHooks = NO_FAULTS  # fault injection (issue 6): where migrations fail on purpose
        self.incoming_timeout = REPLY_TIMEOUT  # how long an incoming migration waits for the source
        self.lost_vms: dict[str, dict[str, Any]] = {}  # VMs that ran here when the last agent died (placement)
        self.orphans_released: list[str] = []  # what the last agent left on the device, released at start
        self._incoming_task: asyncio.Task | None = None
        self._incoming_vm: str | None = None
        self._enospc: EnospcInjection | None = None
        self._server: asyncio.Server | None = None
        self._runner: Any = None

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Installs the SSD, issues this host's certificate, opens the stream and control listeners."""
        from nvme_lm.hypervisor.control import start_control  # the HTTP layer sits on top of the agent

        cfg = self.cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.node = await asyncio.to_thread(Node, cfg.name, cfg.data_dir, cfg.model)
        self.lost_vms = self._load_placements()
        self.orphans_released = await asyncio.to_thread(self.node.release_orphans)
        self._pki = certs.ensure_pki(cfg.pki_dir or cfg.data_dir / "pki")
        host, port = split_addr(cfg.migrate_listen)
        self._pki.issue(cfg.name, own_ips(host))
        self._server = await transport.serve(host, port, certs.server_context(self._pki, cfg.name, own_ips(host)),
                                             self._incoming)
        mhost, mport = self._server.sockets[0].getsockname()[:2]
        self.migrate_addr = f"{mhost}:{mport}"
        self._runner, self.control_addr = await start_control(self, cfg.listen)
        if cfg.ready_file is not None:
            tmp = cfg.ready_file.with_suffix(".tmp")
            tmp.write_text(json.dumps({"version": READY_VERSION, "name": cfg.name, "pid": os.getpid(),
                                       "model": cfg.model, "control": self.control_addr,
                                       "migrate": self.migrate_addr}))
            tmp.replace(cfg.ready_file)

    async def stop(self) -> None:
        """Closes the listeners, lets a running migration end, powers the host down."""
        if self._server is not None:
            self._server.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._task is not None and not self._task.done():
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._task, 60)
        await asyncio.to_thread(self._power_down)

    async def run(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._shutdown.set)
        try:
            await self._shutdown.wait()
        finally:
            await self.stop()

    def _power_down(self) -> None:
        if self.hosted is not None:
            self._unplace(self.hosted.spec.name)  # an orderly end: the VM does not count as lost
            self.hosted.vm.close()
            with contextlib.suppress(Exception):
                assert self.node is not None
                self.node.release(self.hosted.slot)
            self.hosted = None
        if self.node is not None:
            self.node.close()

    def request_shutdown(self) -> None:
        self._shutdown.set()

    # ------------------------------------------------------------------ control operations
    def info(self) -> dict[str, Any]:
        h = self.hosted
        out: dict[str, Any] = {"name": self.cfg.name, "model": self.cfg.model, "control": self.control_addr,
                               "migrate": self.migrate_addr, "expecting": self.expecting, "vm": None,
                               "lost_vms": sorted(self.lost_vms), "orphans_released": self.orphans_released}
        if h is not None:
            out["vm"] = {"name": h.spec.name, "running": h.vm.running, "paused": h.vm.gate.paused,
                         "t0_ns": h.vm.t0_ns, "spec": h.spec.to_dict(), "template": h.template,
                         "vf": h.slot.vfn, "cntlid": h.slot.cntlid, "nsid": h.slot.nsid}
        return out

    async def create_vm(self, body: dict[str, Any]) -> dict[str, Any]:
        if self.hosted is not None:
            raise AgentError(f"VM {self.hosted.spec.name} already runs here")
        assert self.node is not None
        try:
            spec = VmSpec.from_dict(body["spec"])
            template = str(body.get("template", "generic-v1"))
            rate = int(body.get("device_rate_iops", 0))
        except (KeyError, TypeError, ValueError) as e:
            raise AgentError(f"bad vm.create request: {e}", 400) from e
        hosted = await asyncio.to_thread(self._boot, spec, template, rate)
        hosted.vm.start()
        self.hosted = hosted
        self._place(spec.name, "running")
        return self.info()

    def _boot(self, spec: VmSpec, template: str, rate: int) -> HostedVm:
        node = self.node
        assert node is not None
        req = requirements(spec, template)
        problems = node.problems(req)
        if problems:
            raise AgentError("this host cannot run the VM: " + "; ".join(problems))
        slot = node.provision(req)
        try:
            mem = Vm.create_memory(spec)
            node.map_guest(slot, mem)
            if rate:
                node.set_rate_limit(slot, rate)
            vm = Vm.boot(spec, mem, slot.fn)
        except Exception:
            with contextlib.suppress(Exception):
                node.release(slot)
            raise
        return HostedVm(vm, slot, spec, template, rate)

    def counters(self) -> dict[str, Any]:
        h = self._need_vm()
        return h.vm.report()

    def expect(self, body: dict[str, Any]) -> dict[str, Any]:
        name = body.get("vm")
        if not isinstance(name, str) or not name:
            raise AgentError("vm.receive-migration needs {\"vm\": NAME}", 400)
        if self.hosted is not None:
            raise AgentError(f"VM {self.hosted.spec.name} already runs here")
        timeout = body.get("reply_timeout_s", REPLY_TIMEOUT)
        if not isinstance(timeout, int | float) or isinstance(timeout, bool) or not timeout > 0:
            raise AgentError("reply_timeout_s must be a number > 0", 400)
        self.expecting = name
        self.incoming_timeout = float(timeout)
        return self.info()

    async def send_migration(self, body: dict[str, Any]) -> dict[str, Any]:
        h = self._need_vm()
        if self._task is not None and not self._task.done():
            raise AgentError("a migration is already under way")
        try:
            host, port = split_addr(str(body["destination"]))
            server_name = str(body.get("server_name", "localhost"))
            opts = MigrationOptions.from_dict(body.get("options", {}))
        except (KeyError, ValueError, TypeError) as e:
            raise AgentError(f"bad vm.send-migration request: {e}", 400) from e
        assert self.node is not None and self._pki is not None
        ctx = certs.client_context(self._pki, self.cfg.name, own_ips(split_addr(self.cfg.migrate_listen)[0]))
        self.migration = progress = Progress("source")
        self.migration_t0 = h.vm.t0_ns

        async def connect() -> Channel:
            ch = await transport.connect(host, port, ctx, server_hostname=server_name)
            ch.send_timeout = opts.reply_timeout_s
            return ch

        def committed() -> None:
            self.hosted = None
            self._unplace(h.spec.name)

        self._task = asyncio.create_task(send_vm(h, self.node, connect, opts, progress, committed, self.hooks))
        return {"started": True}

    def cancel_migration(self) -> dict[str, Any]:
        """Stops the outgoing migration if it has not committed: the VM goes on here, nothing is kept there."""
        if self._task is None or self._task.done() or self.migration is None:
            raise AgentError("no migration is under way", 404)
        if self.migration.committed:
            raise AgentError("the migration committed: the VM belongs to the destination now")
        self._task.cancel()
        return {"cancelling": True}

    def migration_status(self) -> dict[str, Any]:
        if self.migration is None:
            raise AgentError("no migration has run here", 404)
        return self.migration.snapshot(self.migration_t0)

    async def shutdown_vm(self, body: dict[str, Any]) -> dict[str, Any]:
        """Ends the run: vCPUs drain and stop, every block is read back and verified, the guest's report
        (with the longest completion gap inside each window asked for) is returned, the VF released."""
        h = self._need_vm()
        windows = body.get("windows", [])

        def stop() -> dict[str, Any]:
            h.vm.stop()
            h.vm.final_verify()
            rep = h.vm.report()
            tl = h.vm.timeline
            rep["t0_ns"] = h.vm.t0_ns
            rep["timeline"] = tl.summary() if tl is not None else {"bin_s": 0.01, "iops": [], "lat_mean_us": [],
                                                                     "lat_max_us": []}
            gaps = []
            for start, end in windows:
                g = tl.longest_gap(int(start), int(end)) if tl is not None else (0, 0, 0)
                gaps.append({"gap_ms": g[0] / 1e6, "start_ns": g[1], "end_ns": g[2]})
            rep["gaps"] = gaps
            assert self.node is not None
            self.node.release(h.slot)
            h.vm.mem.log_dirty = False
            return rep

        rep = await asyncio.to_thread(stop)
        self.hosted = None
        self._unplace(h.spec.name)
        return rep

    def _need_vm(self) -> HostedVm:
        if self.hosted is None:
            raise AgentError("no VM runs here", 404)
        return self.hosted

    # ------------------------------------------------------------------ incoming streams
    async def _incoming(self, ch: Channel) -> None:
        assert self.node is not None
        progress = Progress("destination")
        self.migration = progress
        self.migration_t0 = time.monotonic_ns()
        self._incoming_task, self._incoming_vm = asyncio.current_task(), None
        ch.send_timeout = self.incoming_timeout

        def admit(spec: VmSpec) -> list[str]:
            self._incoming_vm = spec.name
            if self.hosted is not None:
                return [f"host {self.cfg.name} already runs VM {self.hosted.spec.name}"]
            if self.expecting != spec.name:
                return [f"host {self.cfg.name} was not told to expect VM {spec.name} (vm.receive-migration)"]
            return []

        def adopt(h: HostedVm) -> None:
            self.hosted = h
            self.expecting = None
            self.migration_t0 = h.vm.t0_ns

        await receive_vm(ch, Incoming(self.node, admit, adopt, progress, self.incoming_timeout,
                                      lambda spec: self._place(spec.name, "resumed", progress)), self.hooks)

    # ------------------------------------------------------------------ faults and their resolution (issue 6)
    def inject_faults(self, body: dict[str, Any]) -> dict[str, Any]:
        """Arms a fault plan for the next migrations (`{"plan": {...}}`, `{}` disarms) and/or turns the
        injected out-of-space on the namespaces on or off (`{"enospc": bool}`, for hosts without root)."""
        if "plan" in body:
            try:
                self.hooks = FaultPlan.from_dict(body["plan"]) if body["plan"] else NO_FAULTS
            except (TypeError, ValueError) as e:
                raise AgentError(f"bad fault plan: {e}", 400) from e
        if "enospc" in body:
            self._enospc = self._enospc or EnospcInjection()
            self._enospc.set(bool(body["enospc"]))
        return self.faults_status()

    def faults_status(self) -> dict[str, Any]:
        plan = self.hooks.to_dict() if isinstance(self.hooks, FaultPlan) else None
        return {"plan": plan, "enospc": bool(self._enospc and self._enospc.armed)}

    async def resources(self) -> dict[str, Any]:
        """What the device holds (vmm.resources), read through the PF; refused while a migration runs (the
        tracking probe would take changes from it)."""
        if (self._task is not None and not self._task.done()) or (
                self._incoming_task is not None and not self._incoming_task.done()):
            raise AgentError("a migration is under way: ask again when it has ended")
        assert self.node is not None
        return await asyncio.to_thread(self.node.resources)

    async def resolve_in_doubt(self, body: dict[str, Any]) -> dict[str, Any]:
        """Ends an in-doubt outgoing migration (lost the destination's answer after COMMIT; the VM is paused
        and its VF suspended here). `{"decision": "resume"}` only once the destination confirmed (fenced) it
        does not run the VM and never resumed it: the VM goes on here. `{"decision": "release"}` when the
        destination runs it (or ran it and died with it): this copy is stale and is torn down."""
        m, h = self.migration, self.hosted
        if (m is None or m.role != "source" or not m.committed or m.error is None or h is None
                or (self._task is not None and not self._task.done())):
            raise AgentError("no migration is in doubt here", 409)
        decision = body.get("decision")
        assert self.node is not None
        node = self.node
        if decision == "resume":
            rb = SourceRollback(node, h.slot, h.vm, qos_iops=h.device_rate_iops, paused=True, suspended=True,
                                throttled=True)
            problems = await asyncio.to_thread(rb.roll_back)
            m.phase = "resumed at the source (the destination confirmed it does not run the VM)"
            return {"resumed": True, "problems": problems, **self.info()}
        if decision == "release":
            await asyncio.to_thread(h.vm.kill)
            self.hosted = None
            self._unplace(h.spec.name)
            problem = None
            try:
                await asyncio.to_thread(node.release, h.slot)
            except Exception as e:
                problem = f"{type(e).__name__}: {e}"
            h.vm.mem.log_dirty = False
            m.phase = "released at the source (the VM is the destination's)"
            return {"released": True, "problem": problem, **self.info()}
        raise AgentError("decision must be \"resume\" or \"release\"", 400)

    async def fence_incoming(self, body: dict[str, Any]) -> dict[str, Any]:
        """The destination's answer to a source in doubt, made final: does VM `vm` run here (or is it committed
        and resuming)? If not, an incoming migration of it still waiting for COMMIT is ended now and the VM
        is no longer expected, so a late COMMIT can never start it. `ran_here`: it had resumed here when the
        last agent died (its placement record says so): the source's copy is stale."""
        name = body.get("vm")
        if not isinstance(name, str) or not name:
            raise AgentError("vm.fence-incoming needs {\"vm\": NAME}", 400)
        if self.hosted is not None and self.hosted.spec.name == name:
            return {"runs": True, "ran_here": True}
        task, m = self._incoming_task, self.migration
        if task is not None and not task.done() and self._incoming_vm == name and m is not None:
            if m.committed:
                return {"runs": True, "ran_here": True}  # committed: resuming now, whatever else happens
            if m.phase != "prepared":  # only waiting for COMMIT is safe to end: no device work in flight
                raise AgentError(f"the incoming migration is {m.phase}: ask again", 409)
            task.cancel()
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(asyncio.shield(task), 30)
        if self.expecting == name:
            self.expecting = None
        lost = self.lost_vms.get(name)
        return {"runs": False, "ran_here": bool(lost and lost.get("state") == "resumed")}

    # ------------------------------------------------------------------ placement records
    # Which VMs run (or are resuming) here, on disk: an agent that died leaves them behind, so the next one
    # can say which VMs died with it (`lost_vms`) and a source in doubt learns whether its VM ever resumed here.
    def _placement_dir(self) -> Path:
        return self.cfg.data_dir / "vms"

    def _place(self, name: str, state: str, progress: Progress | None = None) -> None:
        """Best effort and durable (written, fsynced, renamed): a full disk must not stop a VM from running."""
        d = self._placement_dir()
        try:
            d.mkdir(exist_ok=True)
            tmp = d / f".{name}.tmp"
            with open(tmp, "w") as f:
                json.dump({"vm": name, "state": state, "time": time.time()}, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, d / f"{name}.json")
            self.lost_vms.pop(name, None)
            (d / f"{name}.lost").unlink(missing_ok=True)
        except OSError as e:
            if progress is not None:
                progress.error = f"placement record of {name} not written: {e}"

    def _unplace(self, name: str) -> None:
        with contextlib.suppress(OSError):
            (self._placement_dir() / f"{name}.json").unlink(missing_ok=True)

    def _load_placements(self) -> dict[str, dict[str, Any]]:
        """At start no VM runs here yet: every record left is a VM that died with the last agent (`.lost`)."""
        d = self._placement_dir()
        if not d.is_dir():
            return {}
        for rec in d.glob("*.json"):
            with contextlib.suppress(OSError):
                os.replace(rec, rec.with_suffix(".lost"))
        lost = {}
        for rec in d.glob("*.lost"):
            with contextlib.suppress(OSError, ValueError):
                lost[rec.stem] = json.loads(rec.read_text())
        return lost


GIL_SWITCH_S = 0.0005  # device engines, vCPUs and the event loop hand the GIL over often: short turns


def serve(cfg: AgentConfig) -> None:
    """`nvme-lm host serve`: runs until SIGTERM/SIGINT or vmm.shutdown."""
    sys.setswitchinterval(GIL_SWITCH_S)
    asyncio.run(Agent(cfg).run())
