"""A small private test network for a scenario's hosts (issue 6, "real network hosts").

Each host gets its own network namespace with one interface, `eth0`, on 10.77.0.0/24 and loopback up.
Every `eth0` is one end of a veth pair whose other end sits in a "wire" namespace of the run: one
topology for two hosts or more, a place to cut a host's cable (`link_down` takes the wire-side end down,
so the host loses carrier as if the cable were pulled), and a place for the delay to happen. The wire
joins the ports with a kernel bridge, or, when the link must be delayed and the kernel has no `netem`,
with a small userspace switch (`python -m nvme_lm.hypervisor.netns wire ...`) that holds every frame for
the delay. The rate is shaped with `tbf` on each host's `eth0` egress; with `netem`, the delay is set
there too (netem at the root, tbf below it).

Only addresses inside these namespaces (and loopback) are ever used; nothing is added to the root
namespace, so concurrent runs cannot collide. Namespace names carry the creating process's pid
(`nvmelm-PID-N-...`), so `cleanup_stale()` can remove what a crashed run left behind without touching
the namespaces of a run that is still alive.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import ipaddress
import os
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PREFIX = "nvmelm-"
SUBNET = ipaddress.ip_network("10.77.0.0/24")
IFNAME = "eth0"  # the host's interface inside its own namespace
MIGRATE_PORT = 4790  # where an agent in a namespace listens for the migration stream
_NAME = re.compile(rf"^{PREFIX}(\d+)-")
_CMD_TIMEOUT = 30.0
_counter = 0


class NetnsError(RuntimeError):
    """A namespace, link or qdisc could not be set up (the message carries the command and its stderr)."""


def run(argv: Sequence[str], check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs one `ip`/`tc` command; a failure names the command and quotes its stderr."""
    try:
        r = subprocess.run(list(argv), capture_output=True, text=True, timeout=_CMD_TIMEOUT, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NetnsError(f"`{' '.join(argv)}` could not run: {e}") from e
    if check and r.returncode != 0:
        raise NetnsError(f"`{' '.join(argv)}` failed (exit {r.returncode}): {r.stderr.strip() or r.stdout.strip()}")
    return r


def _run_id() -> str:
    """PID-N: unique among this process's networks, and tells `cleanup_stale` whose namespaces they are."""
    global _counter
    _counter += 1
    return f"{os.getpid()}-{_counter}"


@functools.cache
def available() -> tuple[bool, str]:
    """(True, "") when this process can build a test network; else (False, why not)."""
    if not sys.platform.startswith("linux"):
        return False, "network namespaces need Linux"
    if os.geteuid() != 0:
        return False, f"network namespaces need root (running as uid {os.geteuid()})"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return False, f"`{tool}` (iproute2) is not installed"
    probe = f"{PREFIX}{_run_id()}-probe"
    try:
        run(["ip", "netns", "add", probe])
        try:
            run(["ip", "-n", probe, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
        finally:
            run(["ip", "netns", "del", probe], check=False)
    except NetnsError as e:
        return False, str(e)
    return True, ""


@functools.cache
def netem_available() -> bool:
    """Whether the kernel has the netem qdisc (many CI kernels do; some minimal ones do not)."""
    if not available()[0]:
        return False
    probe = f"{PREFIX}{_run_id()}-probe"
    try:
        run(["ip", "netns", "add", probe])
        return run(["tc", "-n", probe, "qdisc", "add", "dev", "lo", "root", "netem", "delay", "1ms"],
                   check=False).returncode == 0
    except NetnsError:
        return False
    finally:
        run(["ip", "netns", "del", probe], check=False)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def list_namespaces() -> list[str]:
    """Our namespaces (any run's), by name."""
    r = run(["ip", "netns", "list"], check=False)
    return [line.split()[0] for line in r.stdout.splitlines() if line.startswith(PREFIX)]


def _delete_namespace(name: str) -> None:
    """Kills what still runs inside (a wire, an agent of a crashed run), then removes the namespace."""
    pids = run(["ip", "netns", "pids", name], check=False).stdout.split()
    for p in pids:
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(p), signal.SIGKILL)
    run(["ip", "netns", "del", name], check=False)


def cleanup_stale() -> list[str]:
    """Removes namespaces left by runs whose process is gone; returns their names."""
    gone = []
    for name in list_namespaces():
        m = _NAME.match(name)
        if m and not _pid_alive(int(m.group(1))):
            _delete_namespace(name)
            gone.append(name)
    return gone


@dataclass(frozen=True)
class _Host:
    name: str
    netns: str
    addr: str
    port: str  # the veth end in the wire namespace


class TestNetwork:
    """One namespace per host plus a wire namespace; `with TestNetwork(["a", "b"], 80, 5.0) as net: ...`.

    `delay_backend`: "auto" (netem when the kernel has it, else the userspace wire), "netem" or "wire".
    """

    __test__ = False  # not a pytest test class despite its name

    def __init__(self, hosts: Sequence[str], link_mbit: int = 0, delay_ms: float = 0.0,
                 delay_backend: str = "auto") -> None:
        if len(set(hosts)) != len(hosts) or not hosts:
            raise ValueError(f"hosts must be distinct and not empty: {list(hosts)}")
        if len(hosts) > SUBNET.num_addresses - 2:
            raise ValueError(f"at most {SUBNET.num_addresses - 2} hosts")
        if link_mbit < 0 or delay_ms < 0:
            raise ValueError("link_mbit and delay_ms must be >= 0")
        if delay_backend not in ("auto", "netem", "wire"):
            raise ValueError(f"delay_backend must be auto, netem or wire, not {delay_backend!r}")
        self.link_mbit = int(link_mbit)
        self.delay_ms = float(delay_ms)
        self.delay_by: str | None = None
        if self.delay_ms > 0:
            self.delay_by = ("netem" if netem_available() else "wire") if delay_backend == "auto" else delay_backend
        run_id = _run_id()
        self.wire_ns = f"{PREFIX}{run_id}-wire"
        addrs = list(SUBNET.hosts())
        self.hosts = {h: _Host(h, f"{PREFIX}{run_id}-h-{h}", str(addrs[i]), f"p{i}") for i, h in enumerate(hosts)}
        self._wire: subprocess.Popen[bytes] | None = None
        self._created: list[str] = []

    # ------------------------------------------------------------------ life cycle
    def __enter__(self) -> TestNetwork:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> None:
        """Builds everything; on any failure removes what was built and raises NetnsError."""
        ok, why = available()
        if not ok:
            raise NetnsError(f"network namespaces are not available: {why}")
        cleanup_stale()  # whatever a crashed run left behind goes first
        try:
            self._build()
        except BaseException:
            self.close()
            raise

    def _build(self) -> None:
        w = self.wire_ns
        self._add_ns(w)
        run(["ip", "-n", w, "link", "set", "lo", "up"])
        for h in self.hosts.values():
            self._add_ns(h.netns)
            run(["ip", "-n", h.netns, "link", "set", "lo", "up"])
            # both ends created straight in their namespaces: no name ever appears in the root namespace
            run(["ip", "-n", w, "link", "add", h.port, "type", "veth", "peer", "name", IFNAME, "netns", h.netns])
            run(["ip", "-n", h.netns, "addr", "add", f"{h.addr}/{SUBNET.prefixlen}", "dev", IFNAME])
            run(["ip", "-n", h.netns, "link", "set", IFNAME, "up"])
            run(["ip", "-n", w, "link", "set", h.port, "up"])
            self._shape(h)
        if self.delay_by == "wire":
            self._start_wire()
        else:
            run(["ip", "-n", w, "link", "add", "br0", "type", "bridge", "stp_state", "0", "forward_delay", "0"])
            for h in self.hosts.values():
                run(["ip", "-n", w, "link", "set", h.port, "master", "br0"])
            run(["ip", "-n", w, "link", "set", "br0", "up"])

    def _add_ns(self, name: str) -> None:
        run(["ip", "netns", "add", name])
        self._created.append(name)

    def _shape(self, h: _Host) -> None:
        """Egress of the host's eth0: netem (delay) at the root with tbf (rate) below it, or tbf alone."""
        dev = ["dev", IFNAME]
        tc = ["tc", "-n", h.netns, "qdisc", "add", *dev]
        parent = ["root", "handle", "1:"]
        if self.delay_by == "netem":
            run([*tc, *parent, "netem", "delay", f"{self.delay_ms}ms", "limit", "100000"])
            parent = ["parent", "1:1", "handle", "10:"]
        if self.link_mbit > 0:
            rate = self.link_mbit * 1_000_000 // 8  # bytes/s
            burst = max(32 * 1024, rate // 250)  # 4 ms of traffic, at least a few full frames
            latency_ms = max(50.0, 4 * self.delay_ms)  # queue deep enough to hold a delayed link's window
            run([*tc, *parent, "tbf", "rate", f"{self.link_mbit}mbit", "burst", str(burst),
                 "latency", f"{latency_ms:g}ms"])

    def _start_wire(self) -> None:
        ports = [h.port for h in self.hosts.values()]
        argv = ["ip", "netns", "exec", self.wire_ns, sys.executable, "-m", "nvme_lm.hypervisor.netns", "wire",
                "--delay-ms", str(self.delay_ms), *ports]
        self._wire = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert self._wire.stdout is not None
        line = self._wire.stdout.readline()  # "ready" once every port is bound
        if line.strip() != b"ready":
            self._wire.kill()
            err = self._wire.communicate(timeout=5)[1].decode(errors="replace").strip()
            raise NetnsError(f"the link's userspace wire did not start: {err or line!r}")

    def close(self) -> None:
        """Stops the wire and removes every namespace this network created (idempotent)."""
        if self._wire is not None:
            wire, self._wire = self._wire, None
            with contextlib.suppress(OSError):
                assert wire.stdin is not None
                wire.stdin.close()  # EOF: the wire exits
            try:
                wire.wait(timeout=5)
            except subprocess.TimeoutExpired:
                wire.kill()
                wire.wait()
            for f in (wire.stdout, wire.stderr):
                if f is not None:
                    f.close()
        while self._created:
            _delete_namespace(self._created.pop())

    # ------------------------------------------------------------------ queries and faults
    def addr(self, host: str) -> str:
        """The host's IPv4 address (inside its namespace)."""
        return self._host(host).addr

    def netns(self, host: str) -> str:
        return self._host(host).netns

    def exec_prefix(self, host: str) -> list[str]:
        """Prefix for an argv that must run inside the host's namespace."""
        return ["ip", "netns", "exec", self._host(host).netns]

    def link_down(self, host: str) -> None:
        """Cuts the host's cable: its wire-side end goes down, so its eth0 loses carrier and nothing passes."""
        run(["ip", "-n", self.wire_ns, "link", "set", self._host(host).port, "down"])

    def link_up(self, host: str) -> None:
        """The cable back in. Neighbour entries that failed while it was out are dropped on every host,
        or the next connection would be refused (EHOSTUNREACH) until they age out."""
        run(["ip", "-n", self.wire_ns, "link", "set", self._host(host).port, "up"])
        for h in self.hosts.values():
            run(["ip", "-n", h.netns, "neigh", "flush", "dev", IFNAME], check=False)

    @property
    def namespaces(self) -> list[str]:
        return list(self._created)

    def describe(self) -> dict[str, Any]:
        """Plain data for reports: the link settings and each host's namespace and address."""
        return {"link_mbit": self.link_mbit, "link_delay_ms": self.delay_ms, "delay_by": self.delay_by,
                "hosts": {h.name: {"netns": h.netns, "addr": h.addr} for h in self.hosts.values()}}

    def _host(self, host: str) -> _Host:
        try:
            return self.hosts[host]
        except KeyError:
            raise KeyError(f"no host {host!r} in this network (hosts: {', '.join(self.hosts)})") from None


# ---------------------------------------------------------------------- the userspace wire
_ETH_P_ALL = 0x0003
_SOL_PACKET = 263
_PACKET_VNET_HDR = 15  # frames carry a virtio_net_hdr: GSO super-frames and partial checksums pass as they are
_PACKET_IGNORE_OUTGOING = 23
_PACKET_OUTGOING = 4
_VNET = 10  # sizeof(struct virtio_net_hdr)
_FRAME_MAX = 256 * 1024
_QUEUE_MAX = 64 << 20  # bytes held per output port before frames are dropped (a switch's buffer)


def run_wire(ports: Sequence[str], delay_s: float, control_fd: int) -> None:
    """A learning switch between AF_PACKET sockets on `ports` that delivers every frame `delay_s` after it
    arrived (the link's one-way delay). Returns when `control_fd` reaches EOF (its parent is gone)."""
    socks = []
    for name in ports:
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(_ETH_P_ALL))
        s.setsockopt(_SOL_PACKET, _PACKET_VNET_HDR, 1)
        with contextlib.suppress(OSError):  # older kernels: outgoing frames are filtered by pkttype below
            s.setsockopt(_SOL_PACKET, _PACKET_IGNORE_OUTGOING, 1)
        for opt in (socket.SO_RCVBUF, socket.SO_SNDBUF):
            s.setsockopt(socket.SOL_SOCKET, opt, 8 << 20)
        s.bind((name, _ETH_P_ALL))
        socks.append(s)
    ep = select.epoll()
    index = {s.fileno(): i for i, s in enumerate(socks)}
    for fd in index:
        ep.register(fd, select.EPOLLIN)
    ep.register(control_fd, select.EPOLLIN | select.EPOLLHUP)
    queues: list[deque[tuple[float, bytes]]] = [deque() for _ in socks]
    queued = [0] * len(socks)
    macs: dict[bytes, int] = {}
    everyone = range(len(socks))
    buf = bytearray(_FRAME_MAX)
    mv = memoryview(buf)
    print("ready", flush=True)
    while True:
        due = min((q[0][0] for q in queues if q), default=None)
        timeout = -1.0 if due is None else max(0.0, due - time.monotonic())
        for fd, _ev in ep.poll(timeout):
            if fd == control_fd:
                if not os.read(control_fd, 4096):
                    return
                continue
            i = index[fd]
            s = socks[i]
            while True:
                try:
                    n, addr = s.recvfrom_into(buf, 0, socket.MSG_DONTWAIT)
                except BlockingIOError:
                    break
                except OSError:  # the port is down
                    break
                if addr[2] == _PACKET_OUTGOING or n < _VNET + 14:
                    continue
                frame = bytes(mv[:n])
                macs[frame[_VNET + 6:_VNET + 12]] = i
                out = macs.get(frame[_VNET:_VNET + 6])
                targets = (out,) if out is not None else everyone
                when = time.monotonic() + delay_s
                for j in targets:
                    if j != i and queued[j] + n <= _QUEUE_MAX:
                        queues[j].append((when, frame))
                        queued[j] += n
        now = time.monotonic()
        for j, q in enumerate(queues):
            while q and q[0][0] <= now:
                _, frame = q.popleft()
                queued[j] -= len(frame)
                with contextlib.suppress(OSError):  # a port that is down loses the frame, as a cut cable would
                    socks[j].send(frame)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m nvme_lm.hypervisor.netns")
    sub = p.add_subparsers(dest="cmd", required=True)
    w = sub.add_parser("wire", help="the userspace switch that delays a test network's link")
    w.add_argument("--delay-ms", type=float, required=True)
    w.add_argument("ports", nargs="+")
    sub.add_parser("cleanup", help="remove namespaces left by runs that are gone")
    args = p.parse_args(argv)
    if args.cmd == "wire":
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        run_wire(args.ports, args.delay_ms / 1000.0, sys.stdin.fileno())
    else:
        for name in cleanup_stale():
            print(f"removed {name}")


if __name__ == "__main__":
    main()
