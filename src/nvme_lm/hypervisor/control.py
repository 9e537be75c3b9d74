"""The agent's control API: HTTP/JSON in the spirit of Cloud Hypervisor's (`/api/v1/vm.create`, ...).

Over TCP (HOST:PORT) or a UNIX socket (`unix:/path`). Every error is a JSON body `{"error": ...}` with
a 4xx status for requests the agent refuses and 500 for its own failures, never a dropped connection.

| Method | Path | Body | Answer |
|---|---|---|---|
| GET | /api/v1/vmm.ping | | agent info |
| PUT | /api/v1/vmm.shutdown | | {} (the agent exits) |
| PUT | /api/v1/vm.create | {spec, template, device_rate_iops} | agent info (the VM runs) |
| GET | /api/v1/vm.info | | agent info |
| GET | /api/v1/vm.counters | | the guest's figures |
| PUT | /api/v1/vm.receive-migration | {vm} | agent info (expects that VM) |
| PUT | /api/v1/vm.send-migration | {destination, server_name, options} | {started} |
| GET | /api/v1/vm.migration | | progress of the last migration |
| PUT | /api/v1/vm.cancel-migration | | {cancelling} (refused once committed) |
| PUT | /api/v1/vm.shutdown | {windows: [[start_ns, end_ns]...]} | the guest's final report |
| PUT | /api/v1/vm.inject-faults | {plan: FaultPlan dict or {}, enospc: bool} | the armed plan (faults.py) |
| GET | /api/v1/vm.inject-faults | | the armed plan and what fired |
| PUT | /api/v1/vm.resolve-in-doubt | {decision: "resume" or "release"} | agent info (source in doubt only) |
| PUT | /api/v1/vm.fence-incoming | {vm} | {runs, ran_here} (destination: no late COMMIT will start it) |
| GET | /api/v1/vmm.resources | | exported subsystems, namespaces, VFs, UDMQs seen through the PF |
"""

from __future__ import annotations

import json
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from aiohttp import web

if TYPE_CHECKING:
    from nvme_lm.hypervisor.agent import Agent

API = "/api/v1/"


def json_safe(obj: Any) -> Any:
    """NaN/inf are not JSON: they become null (reports carry NaN for figures a failed leg never had)."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(v) for v in obj]
    return obj


def _reply(data: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(json_safe(data)), status=status, content_type="application/json")


def _handler(fn: Callable[[web.Request], Awaitable[Any]]) -> Callable[[web.Request], Awaitable[web.Response]]:
    async def handle(request: web.Request) -> web.Response:
        from nvme_lm.hypervisor.agent import AgentError

        try:
            return _reply(await fn(request))
        except AgentError as e:
            return _reply({"error": str(e)}, e.status)
        except json.JSONDecodeError as e:
            return _reply({"error": f"request body is not JSON: {e}"}, 400)
        except Exception as e:  # the agent's own failure: say what, keep serving
            return _reply({"error": f"{type(e).__name__}: {e}"}, 500)
    return handle


async def _body(request: web.Request) -> dict[str, Any]:
    if not request.can_read_body:
        return {}
    data = json.loads(await request.text() or "{}")
    if not isinstance(data, dict):
        raise json.JSONDecodeError("the body must be a JSON object", "", 0)
    return data


def build_app(agent: Agent) -> web.Application:
    async def ping(_r: web.Request) -> Any:
        return agent.info()

    async def shutdown(_r: web.Request) -> Any:
        agent.request_shutdown()
        return {}

    async def create(r: web.Request) -> Any:
        return await agent.create_vm(await _body(r))

    async def counters(_r: web.Request) -> Any:
        return agent.counters()

    async def receive(r: web.Request) -> Any:
        return agent.expect(await _body(r))

    async def send(r: web.Request) -> Any:
        return await agent.send_migration(await _body(r))

    async def migration(_r: web.Request) -> Any:
        return agent.migration_status()

    async def cancel(_r: web.Request) -> Any:
        return agent.cancel_migration()

    async def vm_shutdown(r: web.Request) -> Any:
        return await agent.shutdown_vm(await _body(r))

    async def inject_faults(r: web.Request) -> Any:
        return agent.inject_faults(await _body(r))

    async def faults_status(_r: web.Request) -> Any:
        return agent.faults_status()

    async def resolve_in_doubt(r: web.Request) -> Any:
        return await agent.resolve_in_doubt(await _body(r))

    async def fence_incoming(r: web.Request) -> Any:
        return await agent.fence_incoming(await _body(r))

    async def resources(_r: web.Request) -> Any:
        return await agent.resources()

    @web.middleware
    async def json_errors(request: web.Request, handler: Any) -> web.StreamResponse:
        """aiohttp's own refusals (unknown path, wrong method, body too large) as JSON too."""
        try:
            return await handler(request)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            return _reply({"error": f"{e.status} {e.reason}: {request.method} {request.path}"}, e.status)

    app = web.Application(client_max_size=16 << 20, middlewares=[json_errors])
    app.add_routes([
        web.get(API + "vmm.ping", _handler(ping)),
        web.put(API + "vmm.shutdown", _handler(shutdown)),
        web.put(API + "vm.create", _handler(create)),
        web.get(API + "vm.info", _handler(ping)),
        web.get(API + "vm.counters", _handler(counters)),
        web.put(API + "vm.receive-migration", _handler(receive)),
        web.put(API + "vm.send-migration", _handler(send)),
        web.get(API + "vm.migration", _handler(migration)),
        web.put(API + "vm.cancel-migration", _handler(cancel)),
        web.put(API + "vm.shutdown", _handler(vm_shutdown)),
        web.put(API + "vm.inject-faults", _handler(inject_faults)),
        web.get(API + "vm.inject-faults", _handler(faults_status)),
        web.put(API + "vm.resolve-in-doubt", _handler(resolve_in_doubt)),
        web.put(API + "vm.fence-incoming", _handler(fence_incoming)),
        web.get(API + "vmm.resources", _handler(resources)),
    ])
    return app


async def start_control(agent: Agent, listen: str) -> tuple[web.AppRunner, str]:
    """Serves the API on `listen` (HOST:PORT or unix:PATH); returns the runner and the bound address."""
    from nvme_lm.hypervisor.agent import split_addr

    runner = web.AppRunner(build_app(agent), access_log=None)
    await runner.setup()
    if listen.startswith("unix:"):
        path = listen[5:]
        site: web.BaseSite = web.UnixSite(runner, path)
        await site.start()
        return runner, listen
    host, port = split_addr(listen)
    site = web.TCPSite(runner, host, port)
    await site.start()
    sock = site._server.sockets[0]  # type: ignore[union-attr]  # the port when 0 was asked for
    bound_host, bound_port = sock.getsockname()[:2]
    return runner, f"{bound_host}:{bound_port}"
