"""Real network hosts (issue 6): the test network of hypervisor/netns.py and a migration across it.

Everything is measured from inside the namespaces with small Python programs run through
`ip netns exec` (no ping or iperf needed): TCP connects, echo round trips, a ~1 s bulk transfer. The
tests that need namespaces are skipped, with the reason, where they are not available (not root, no
iproute2, a container without CAP_SYS_ADMIN); the CLI's refusal is tested everywhere.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from nvme_lm.cli import migrate as migrate_cli
from nvme_lm.hypervisor import netns
from nvme_lm.hypervisor.netns import NetnsError, TestNetwork, available, list_namespaces, netem_available
from nvme_lm.hypervisor.orchestrator import run_scenario
from nvme_lm.hypervisor.scenario import load_scenario

REPO = Path(__file__).resolve().parents[2]
SMALL = REPO / "scenarios" / "small.toml"
OK, WHY = available()
needs_netns = pytest.mark.skipif(not OK, reason=f"network namespaces not available: {WHY}")
BACKENDS = ["wire", pytest.param("netem", marks=pytest.mark.skipif(
    not netem_available(), reason="this kernel has no netem qdisc (the userspace wire delays instead)"))]

# --------------------------------------------------------------------------- programs run in a namespace
CONNECT = r"""
import socket, sys, time
end = time.monotonic() + float(sys.argv[3])
while True:
    try:
        socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=0.5).close()
        print("connected"); break
    except OSError as e:
        if time.monotonic() > end:
            print(f"failed: {e}"); break
        time.sleep(0.05)
"""
SERVE = r"""
import socket, sys
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], 5001)); s.listen(8); print("ready", flush=True)
mode = sys.argv[2]
while True:
    c, _ = s.accept()
    if mode == "echo":
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while (b := c.recv(1)):
            c.sendall(b)
        break
    if mode == "sink":
        import time
        buf = bytearray(1 << 20); n = 0; t0 = None
        while (k := c.recv_into(buf)):
            t0 = t0 or time.monotonic(); n += k
        print(n * 8 / (time.monotonic() - t0) / 1e6, flush=True)
        break
    c.close()
"""
ECHO_RTT = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5001)); c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
rtts = []
for _ in range(9):
    t = time.monotonic(); c.sendall(b"x"); c.recv(1); rtts.append(time.monotonic() - t)
print(sorted(rtts)[4] * 1000)
"""
BULK = r"""
import socket, sys, time
c = socket.create_connection((sys.argv[1], 5001)); data = bytes(1 << 16); end = time.monotonic() + float(sys.argv[2])
while time.monotonic() < end:
    c.sendall(data)
c.close()
"""


def in_ns(net: TestNetwork, host: str, code: str, *args: object, timeout: float = 20) -> str:
    r = subprocess.run([*net.exec_prefix(host), sys.executable, "-c", code, *map(str, args)],
                       capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip()


class Server:
    """SERVE running in `host`'s namespace until the block ends."""

    def __init__(self, net: TestNetwork, host: str, mode: str) -> None:
        self.proc = subprocess.Popen([*net.exec_prefix(host), sys.executable, "-c", SERVE, net.addr(host), mode],
                                     stdout=subprocess.PIPE, text=True)

    def __enter__(self) -> Server:
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        return self

    def result(self) -> str:
        assert self.proc.stdout is not None
        return self.proc.stdout.readline().strip()

    def __exit__(self, *exc: object) -> None:
        self.proc.kill()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def ours(net: TestNetwork) -> list[str]:
    run_id = net.wire_ns.removesuffix("-wire")
    return [n for n in list_namespaces() if n.startswith(run_id + "-")]


# --------------------------------------------------------------------------- the network
@needs_netns
def test_three_hosts_reach_each_other_and_cleanup_removes_everything() -> None:
    with TestNetwork(["a", "b", "c"]) as net:
        assert sorted(ours(net)) == sorted(net.namespaces) and len(net.namespaces) == 4  # 3 hosts + the wire
        assert [net.addr(h) for h in "abc"] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]
        assert net.exec_prefix("b") == ["ip", "netns", "exec", net.netns("b")]
        with Server(net, "b", "accept"), Server(net, "c", "accept"):
            assert in_ns(net, "a", CONNECT, net.addr("b"), 5001, 3) == "connected"
            assert in_ns(net, "a", CONNECT, net.addr("c"), 5001, 3) == "connected"
        with Server(net, "a", "accept"):
            assert in_ns(net, "c", CONNECT, net.addr("a"), 5001, 3) == "connected"
        # the root namespace has no route into the test network
        assert "10.77." not in subprocess.run(["ip", "route"], capture_output=True, text=True).stdout
        with pytest.raises(KeyError, match="no host 'x'"):
            net.addr("x")
    assert ours(net) == []
    net.close()  # idempotent


@needs_netns
def test_rate_is_shaped() -> None:
    with TestNetwork(["a", "b"], link_mbit=80) as net, Server(net, "b", "sink") as sink:
        in_ns(net, "a", BULK, net.addr("b"), 1.0)
        mbit = float(sink.result())
    print(f"measured {mbit:.1f} Mbit/s on an 80 Mbit/s link")
    assert 0.5 * 80 <= mbit <= 1.1 * 80


@needs_netns
@pytest.mark.parametrize("backend", BACKENDS)
def test_delay_shows_in_round_trip_and_rate_still_holds(backend: str) -> None:
    with TestNetwork(["a", "b"], link_mbit=80, delay_ms=10.0, delay_backend=backend) as net:
        assert net.delay_by == backend
        with Server(net, "b", "echo"):
            rtt = float(in_ns(net, "a", ECHO_RTT, net.addr("b")))
        with Server(net, "b", "sink") as sink:
            in_ns(net, "a", BULK, net.addr("b"), 1.0)
            mbit = float(sink.result())
    print(f"{backend}: rtt {rtt:.2f} ms for 2 x 10 ms; {mbit:.1f} Mbit/s on an 80 Mbit/s link")
    assert 19.5 <= rtt <= 35.0
    assert 0.5 * 80 <= mbit <= 1.1 * 80


@needs_netns
def test_unshaped_link_is_fast() -> None:
    with TestNetwork(["a", "b"]) as net:
        assert net.delay_by is None
        with Server(net, "b", "echo"):
            assert float(in_ns(net, "a", ECHO_RTT, net.addr("b"))) < 5.0


@needs_netns
@pytest.mark.parametrize("delay_ms", [0.0, 2.0], ids=["bridge", "delayed"])
def test_link_down_cuts_and_link_up_restores(delay_ms: float) -> None:
    with TestNetwork(["a", "b"], delay_ms=delay_ms) as net, Server(net, "b", "accept"):
        assert in_ns(net, "a", CONNECT, net.addr("b"), 5001, 3) == "connected"
        net.link_down("b")
        assert in_ns(net, "a", CONNECT, net.addr("b"), 5001, 0.6).startswith("failed")
        assert in_ns(net, "b", CONNECT, net.addr("b"), 5001, 1) == "connected"  # b itself still runs
        net.link_up("b")
        assert in_ns(net, "a", CONNECT, net.addr("b"), 5001, 5) == "connected"


def crashed_run() -> str:
    """Starts a network in a process that is then killed; returns that run's namespace prefix."""
    code = ("import time; from nvme_lm.hypervisor.netns import TestNetwork\n"
            "n = TestNetwork(['a', 'b'], 0, 5.0, 'wire'); n.start(); print(n.wire_ns, flush=True); time.sleep(60)")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    wire_ns = proc.stdout.readline().strip()
    proc.stdout.close()
    proc.kill()
    proc.wait()
    assert wire_ns.endswith("-wire")
    return wire_ns.removesuffix("-wire") + "-"


@needs_netns
def test_cleanup_stale_removes_a_crashed_runs_namespaces_only() -> None:
    with TestNetwork(["a"]) as alive:
        run_id = crashed_run()
        left = [n for n in list_namespaces() if n.startswith(run_id)]
        assert len(left) == 3  # a, b and the wire
        assert set(left) <= set(netns.cleanup_stale())
        assert [n for n in list_namespaces() if n.startswith(run_id)] == []
        assert sorted(ours(alive)) == sorted(alive.namespaces)  # a live run's namespaces stay
    run_id = crashed_run()
    with TestNetwork(["a"]):  # starting a network cleans up first
        assert [n for n in list_namespaces() if n.startswith(run_id)] == []


@needs_netns
def test_failed_command_names_itself_and_its_stderr() -> None:
    with pytest.raises(NetnsError, match=r"`ip netns del nvmelm-0-0-none` failed \(exit \d+\): .+"):
        netns.run(["ip", "netns", "del", "nvmelm-0-0-none"])


def test_cli_netns_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(netns, "available", lambda: (False, "network namespaces need root (running as uid 1000)"))
    r = CliRunner().invoke(migrate_cli.migrate, ["--scenario", str(SMALL), "--netns"])
    assert r.exit_code == 1 and r.exception is not None and isinstance(r.exception, SystemExit)
    assert "--netns: network namespaces are not available here: network namespaces need root" in r.output
    assert "Traceback" not in r.output


# --------------------------------------------------------------------------- a migration across it
@needs_netns
def test_migration_between_namespaced_hosts(tmp_path: Path) -> None:
    sc = load_scenario(SMALL)
    sc = replace(sc, hosts=replace(sc.hosts, link_mbit=400, link_delay_ms=1.0),
                 vm=replace(sc.vm, workload=replace(sc.vm.workload, run_after_s=0.25))).validate("test")
    report = asyncio.run(run_scenario(sc, tmp_path, netns=True))
    assert report["ok"], report["error"]
    assert report["guest_errors"] == 0 and report["verify_failures"] == 0 and report["identity_changes"] == 0
    hosts = report["hosts"]
    assert hosts["a"]["addr"] == f"10.77.0.1:{netns.MIGRATE_PORT}"
    assert hosts["b"]["addr"] == f"10.77.0.2:{netns.MIGRATE_PORT}"
    for h in hosts.values():
        assert h["netns"] and h["link_shaped"] and h["link_mbit"] == 400 and h["link_delay_ms"] == 1.0
        assert h["namespace"].startswith(netns.PREFIX)
    assert not [n for n in list_namespaces() if n in {h["namespace"] for h in hosts.values()}]
