"""Fault injection for migrations (issue 6's fault matrix): what fails, where, and the tools that make it fail.

A cell of the matrix is a fault kind at a phase of the migration. `steps_for(kind, phase)` turns it into
plain-data `FaultStep`s, each bound to one of the engine's fault points (`migration.SOURCE_POINTS` /
`DESTINATION_POINTS`, awaited by `send_vm` / `receive_vm`): which end, which point, and what to do there.
A `FaultPlan` (the engine's `FaultHooks`) carries the steps into an agent process (`PUT vm.inject-faults`)
and runs them when the engine reaches their point:

- `kill`: SIGKILL this agent process (a host that dies at that instant; nothing is cleaned up);
- `raise`: a local failure at that point (`InjectedFault`);
- `notify`: ask the run's `FaultController` (in the orchestrator, on a UNIX socket, so an agent in a network
  namespace reaches it too) to act on the world — cancel through the control API, kill the other agent,
  cut the link, flip bits in the stream, fill the destination's disk — and hold the engine at the point
  until it has. The engine therefore meets the fault exactly at the point, not "about then".

The world the controller acts on: `FaultProxy`, a TCP relay between the source and the destination's
migration port (TLS stays end to end: it only moves bytes) that can cut the link (stops forwarding and keeps
the sockets open, as a dead link does: the peers must notice by their timeouts) or flip a bit (TLS refuses
the record and the connection dies); `Ballast`, a file that takes every free byte of the destination's
data filesystem (a small tmpfs mounted for the run), so that the device's writes really fail with ENOSPC.
Expected outcomes of every cell: docs/faults.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from nvme_lm.hypervisor.migration import DESTINATION_POINTS, SOURCE_POINTS, FaultHooks

KINDS = ("cancel", "destination-killed", "source-restarted-after-commit", "network-cut", "stream-corruption",
         "destination-out-of-space")
PHASES = ("setup", "pre-copy", "stop-and-copy", "state-transfer", "resume")
POINT = {"setup": "setup", "pre-copy": "precopy", "stop-and-copy": "stop-and-copy",
         "state-transfer": "state-transfer", "resume": "resume"}  # phase -> engine fault point
ACTIONS = ("kill", "raise", "notify")
EVENTS = ("cancel", "kill-destination", "cut", "corrupt", "fill", "release")
PLAN_VERSION = 1
NOTIFY_TIMEOUT = 30.0


class InjectedFault(RuntimeError):
    """The failure a `raise` step injects (or a fault that could not be injected)."""


@dataclass(frozen=True)
class FaultStep:
    """At `role`'s `point`, do `action` (`notify`: ask the controller for `event`). With `after_s` > 0 the
    step fires that long after the point in the background and the engine goes on meanwhile."""

    role: str
    point: str
    action: str
    event: str = ""
    after_s: float = 0.0

    def __post_init__(self) -> None:
        points = SOURCE_POINTS if self.role == "source" else DESTINATION_POINTS if self.role == "destination" else ()
        if self.point not in points:
            raise ValueError(f"{self.role!r} has no fault point {self.point!r} (points: {', '.join(points)})")
        if self.action not in ACTIONS:
            raise ValueError(f"unknown fault action {self.action!r} (actions: {', '.join(ACTIONS)})")
        if (self.action == "notify") != bool(self.event) or (self.event and self.event not in EVENTS):
            raise ValueError(f"a notify step names one event of {', '.join(EVENTS)}; got {self.event!r}")
        if not self.after_s >= 0:
            raise ValueError("after_s must be >= 0")


def steps_for(kind: str, phase: str, after_s: float = 0.0) -> list[FaultStep]:
    """The steps that make `kind` happen at `phase` (docs/faults.md, "Where each fault is injected")."""
    if kind not in KINDS:
        raise ValueError(f"unknown fault kind {kind!r} (kinds: {', '.join(KINDS)})")
    if phase not in PHASES:
        raise ValueError(f"unknown phase {phase!r} (phases: {', '.join(PHASES)})")
    p = POINT[phase]
    if kind == "cancel":  # the operator's cancel (vm.cancel-migration) while the source is at the point
        return [FaultStep("source", p, "notify", "cancel", after_s)]
    if kind == "destination-killed":  # the destination has no stop-and-copy point: it learns of the blackout
        if phase == "stop-and-copy":  # only from the final deltas, so the source's point has it killed
            return [FaultStep("source", p, "notify", "kill-destination", after_s)]
        return [FaultStep("destination", p, "kill", after_s=after_s)]
    if kind == "source-restarted-after-commit":  # the orchestrator starts the agent again afterwards
        return [FaultStep("source", p, "kill", after_s=after_s)]
    if kind in ("network-cut", "stream-corruption"):
        event = "cut" if kind == "network-cut" else "corrupt"
        # at resume the destination's point (COMMIT received): the COMMIT has certainly crossed, the answer not
        role = "destination" if phase == "resume" else "source"
        return [FaultStep(role, p, "notify", event, after_s)]
    # destination-out-of-space: the disk is full from the point on; where the migration still writes in that
    # phase (pass 0, deltas, the final delta) it must fail. The space is given back when the phase's writes
    # are over at the latest (for the last three phases: before the VM could resume there, so the guest's own
    # writes on a full disk are never the cell's subject)
    if phase == "stop-and-copy":
        return [FaultStep("source", p, "notify", "fill", after_s),
                FaultStep("destination", "state-transfer", "notify", "release")]
    if phase == "state-transfer":
        return [FaultStep("destination", p, "notify", "fill", after_s),
                FaultStep("destination", "resume", "notify", "release")]
    if phase == "resume":
        return [FaultStep("destination", p, "notify", "fill", after_s),
                FaultStep("destination", p, "notify", "release", after_s)]
    return [FaultStep("destination", p, "notify", "fill", after_s)]


class FaultPlan(FaultHooks):
    """The engine's hooks with a fault armed: runs each step once, at its point. Plain data both ways
    (`to_dict` / `from_dict`), so the orchestrator arms it in an agent process with `PUT vm.inject-faults`."""

    def __init__(self, steps: list[FaultStep], controller: str = "", fault: str = "", phase: str = "") -> None:
        self.steps = list(steps)
        self.controller = controller  # "unix:PATH" of the FaultController
        self.fault, self.phase = fault, phase
        self.fired: list[dict[str, Any]] = []  # what ran, for vm.inject-faults GET and the cell's report
        self._done: set[int] = set()
        self._background: set[asyncio.Task] = set()
        if any(s.action == "notify" for s in self.steps) and not controller.startswith("unix:"):
            raise ValueError("notify steps need a controller address (unix:PATH)")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FaultPlan:
        if not isinstance(d, dict) or d.get("version", PLAN_VERSION) != PLAN_VERSION:
            raise ValueError(f"a fault plan is a map with version {PLAN_VERSION}")
        steps = d.get("steps")
        if not isinstance(steps, list) or not all(isinstance(s, dict) for s in steps):
            raise ValueError("a fault plan needs steps: a list of {role, point, action, event, after_s}")
        return cls([FaultStep(**s) for s in steps], str(d.get("controller", "")), str(d.get("fault", "")),
                   str(d.get("phase", "")))

    def to_dict(self) -> dict[str, Any]:
        return {"version": PLAN_VERSION, "fault": self.fault, "phase": self.phase, "controller": self.controller,
                "steps": [asdict(s) for s in self.steps], "fired": self.fired}

    async def at(self, role: str, point: str) -> None:
        for i, step in enumerate(self.steps):
            if i in self._done or step.role != role or step.point != point:
                continue
            self._done.add(i)
            if step.after_s > 0:
                task = asyncio.create_task(self._later(step))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            else:
                await self._fire(step)

    async def _later(self, step: FaultStep) -> None:
        await asyncio.sleep(step.after_s)
        with contextlib.suppress(Exception):  # nobody awaits a background step: its outcome is in `fired`
            await self._fire(step)

    async def _fire(self, step: FaultStep) -> None:
        rec = {"role": step.role, "point": step.point, "action": step.action, "event": step.event,
               "t_ns": time.monotonic_ns()}
        self.fired.append(rec)
        if step.action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)  # a host dying: no handler, no clean-up, no flush
        if step.action == "raise":
            raise InjectedFault(f"injected failure at the {step.role}'s {step.point} point")
        try:
            answer = await notify(self.controller, {"fault": self.fault, "phase": self.phase, **rec})
        except Exception as e:
            rec["error"] = f"{type(e).__name__}: {e}"
            raise InjectedFault(f"fault controller unreachable for {step.event}: {rec['error']}") from e
        rec["answer"] = answer


async def notify(controller: str, body: dict[str, Any], timeout: float = NOTIFY_TIMEOUT) -> dict[str, Any]:
    """One request to a FaultController (`unix:PATH`); its answer, or an exception if it failed."""
    import aiohttp  # the agent's control API needs aiohttp anyway; imported late to keep this module light

    async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=controller[5:])) as s, \
            s.put("http://faults/v1/event", json=body, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
        data = await r.json(content_type=None)
        if r.status >= 400:
            raise InjectedFault(str(data.get("error", r.status)))
        return data


# ============================================================================================ the controller
Action = Callable[[dict[str, Any]], Awaitable[str]]


@dataclass
class FaultController:
    """The orchestrator's end of `notify`: an HTTP server on a UNIX socket that runs `actions[event]` and
    answers with what it observed. `events` is the log of every request, for the cell's report."""

    path: Path
    actions: dict[str, Action]
    events: list[dict[str, Any]] = field(default_factory=list)
    _runner: Any = None

    @property
    def address(self) -> str:
        return f"unix:{self.path}"

    async def start(self) -> FaultController:
        from aiohttp import web

        async def event(request: web.Request) -> web.Response:
            body = await request.json()
            rec = {"event": body.get("event"), "role": body.get("role"), "point": body.get("point"),
                   "t": time.monotonic()}
            self.events.append(rec)
            action = self.actions.get(str(body.get("event")))
            if action is None:
                rec["error"] = f"no action for {body.get('event')!r}"
                return web.json_response({"error": rec["error"]}, status=400)
            try:
                rec["observed"] = await action(body)
            except Exception as e:
                rec["error"] = f"{type(e).__name__}: {e}"
                return web.json_response({"error": rec["error"]}, status=500)
            return web.json_response({"observed": rec["observed"]})

        self.path.unlink(missing_ok=True)
        app = web.Application()
        app.add_routes([web.put("/v1/event", event)])
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.UnixSite(self._runner, str(self.path)).start()
        return self

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        self.path.unlink(missing_ok=True)


# ============================================================================================ the link
class FaultProxy:
    """A TCP relay standing in for the link between two hosts on loopback. `cut()` stops forwarding in both
    directions and stops reading, with every socket left open (a pulled cable: nothing arrives, nothing is
    refused, the senders' buffers fill); `restore()` forwards again. `corrupt()` flips one bit in the next
    chunk forwarded either way (a TLS record then fails its authentication and the connection dies)."""

    def __init__(self, target_host: str, target_port: int, listen_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.listen_host = listen_host
        self.address = ""
        self.connections = 0
        self.bytes = {"to-destination": 0, "to-source": 0}
        self.flipped: list[tuple[str, int]] = []  # (direction, offset in that direction's byte stream)
        self.cut_at: float | None = None
        self._up = asyncio.Event()
        self._up.set()
        self._corrupt = False
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._accept, self.listen_host, 0)
        host, port = self._server.sockets[0].getsockname()[:2]
        self.address = f"{host}:{port}"
        return self.address

    def cut(self) -> None:
        self.cut_at = time.monotonic()
        self._up.clear()

    def restore(self) -> None:
        self._up.set()

    def corrupt(self) -> None:
        self._corrupt = True

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for t in list(self._tasks):
            t.cancel()
        for w in self._writers:
            w.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.append(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.append(up_writer)
        for args in ((reader, up_writer, "to-destination"), (up_reader, writer, "to-source")):
            task = asyncio.create_task(self._pump(*args))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str) -> None:
        try:
            while True:
                await self._up.wait()  # a cut link reads nothing: the sender's socket buffers fill
                data = await reader.read(1 << 16)
                await self._up.wait()  # what was read just before the cut waits for the link too
                if not data:
                    writer.write_eof()
                    return
                if self._corrupt:
                    self._corrupt = False
                    buf = bytearray(data)
                    at = len(buf) // 2
                    buf[at] ^= 0x10
                    data = bytes(buf)
                    self.flipped.append((direction, self.bytes[direction] + at))
                self.bytes[direction] += len(data)
                writer.write(data)
                await writer.drain()
        except (OSError, RuntimeError):
            writer.transport.abort()


# ============================================================================================ the disk
class Ballast:
    """Takes every free byte of the filesystem holding `directory` (a file allocated, then written to the
    last page), so that the next write there fails with ENOSPC; `release()` gives it back. Refuses a
    filesystem that is not a dedicated mount of at most `max_bytes` (it must never fill a real disk)."""

    NAME = ".ballast"

    def __init__(self, directory: Path, max_bytes: int = 2 << 30) -> None:
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.path = self.directory / self.NAME
        self.taken = 0

    def check(self) -> None:
        st = os.statvfs(self.directory)
        total = st.f_blocks * st.f_frsize
        if not os.path.ismount(self.directory) or total > self.max_bytes:
            raise InjectedFault(f"{self.directory} is not a dedicated filesystem of at most "
                                f"{self.max_bytes >> 20} MiB: refusing to fill it")

    def fill(self) -> int:
        """Returns the bytes taken; afterwards the filesystem has no free block left."""
        self.check()
        st = os.statvfs(self.directory)
        free = st.f_bavail * st.f_frsize
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            size = os.fstat(fd).st_size
            with contextlib.suppress(OSError):
                os.posix_fallocate(fd, size, free)
            size = os.fstat(fd).st_size
            page = b"\xa5" * st.f_frsize
            while True:  # whatever fallocate left (rounding, metadata): page by page until ENOSPC
                try:
                    n = os.pwrite(fd, page, size)
                except OSError as e:
                    if e.errno != errno.ENOSPC:
                        raise
                    break
                if n < len(page):
                    break
                size += n
            self.taken = size
        finally:
            os.close(fd)
        return self.taken

    def release(self) -> None:
        self.path.unlink(missing_ok=True)
        self.taken = 0

    def free_bytes(self) -> int:
        st = os.statvfs(self.directory)
        return st.f_bavail * st.f_frsize


class Tmpfs:
    """A small tmpfs mounted at `path` for a destination's data directory (root only)."""

    def __init__(self, path: Path, size_bytes: int) -> None:
        self.path = Path(path)
        self.size = size_bytes
        self.mounted = False

    @staticmethod
    def possible() -> bool:
        return os.geteuid() == 0 and Path("/proc/filesystems").read_text().find("tmpfs") >= 0

    async def mount(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        await _run("mount", "-t", "tmpfs", "-o", f"size={self.size},mode=0700", "tmpfs", str(self.path))
        self.mounted = True

    async def unmount(self) -> None:
        if self.mounted:
            await _run("umount", "-l", str(self.path))
            self.mounted = False


async def _run(*argv: str) -> None:
    proc = await asyncio.create_subprocess_exec(*argv, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    if proc.returncode:
        raise InjectedFault(f"`{' '.join(argv)}` failed ({proc.returncode}): {out.decode(errors='replace').strip()}")


# ============================================================================================ no root: ENOSPC
class EnospcInjection:
    """Without root there is no small filesystem to fill: the destination's namespace writes are made to fail
    with the same ENOSPC instead, in that agent's process (`PUT vm.inject-faults {"enospc": true}`)."""

    def __init__(self) -> None:
        self.armed = False
        self._orig: Any = None

    def set(self, on: bool) -> None:
        from nvme_lm.device.namespace import Namespace

        if on and self._orig is None:
            orig = self._orig = Namespace.write_from
            injection = self

            def write_from(ns: Namespace, slba: int, views: list[memoryview]) -> None:
                if injection.armed:
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
                orig(ns, slba, views)

            Namespace.write_from = write_from  # type: ignore[method-assign]
        self.armed = on
