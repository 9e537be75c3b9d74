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
from nvme_lm.hypervisor.migration import (
    NO_FAULTS,
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
        self._server: asyncio.Server | None = None
        self._runner: Any = None

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Installs the SSD, issues this host's certificate, opens the stream and control listeners."""
        from nvme_lm.hypervisor.control import start_control  # the HTTP layer sits on top of the agent

        cfg = self.cfg
        cfg.data_dir.mkdir(parents=True, exist_ok=True)
        self.node = await asyncio.to_thread(Node, cfg.name, cfg.data_dir, cfg.model)
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
                               "migrate": self.migrate_addr, "expecting": self.expecting, "vm": None}
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
        self.expecting = name
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
            return await transport.connect(host, port, ctx, server_hostname=server_name)

        def committed() -> None:
            self.hosted = None

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

        def admit(spec: VmSpec) -> list[str]:
            if self.hosted is not None:
                return [f"host {self.cfg.name} already runs VM {self.hosted.spec.name}"]
            if self.expecting != spec.name:
                return [f"host {self.cfg.name} was not told to expect VM {spec.name} (vm.receive-migration)"]
            return []

        def adopt(h: HostedVm) -> None:
            self.hosted = h
            self.expecting = None
            self.migration_t0 = h.vm.t0_ns

        await receive_vm(ch, Incoming(self.node, admit, adopt, progress), self.hooks)


GIL_SWITCH_S = 0.0005  # device engines, vCPUs and the event loop hand the GIL over often: short turns


def serve(cfg: AgentConfig) -> None:
    """`nvme-lm host serve`: runs until SIGTERM/SIGINT or vmm.shutdown."""
    sys.setswitchinterval(GIL_SWITCH_S)
    asyncio.run(Agent(cfg).run())
