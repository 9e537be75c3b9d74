"""Runs one interop session: `nvme-lm target serve` as a real process on the host, our own Python initiator's view
of it (the reference the guest's answers are compared with), one Linux guest (../shared/tools/guest/run-guest.sh)
running guest/nvme-tcp-interop.sh against it, and a target restart on the same files half way through the job.

Everything lands in one run directory (tests/interop/runs/<timestamp>-<name>/, not in git): the guest's outputs
(steps/, steps.tsv, job.log, console.log, dmesg.txt, fio JSON), the target logs, our reference bytes (ours/) and
summary.json. The tests in test_linux_host.py only read that directory, one assertion group per step.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from nvme_lm.fabrics.initiator import HostController, identify_sqe
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.opcodes import AdminOpcode

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
GUEST_TOOLS = Path(os.environ.get("NVME_GUEST_TOOLS", ROOT.parent / "shared" / "tools" / "guest"))
GUEST_DIR = Path(os.environ.get("NVME_GUEST_DIR", "/var/tmp/nvme-guest"))
JOB = HERE / "guest" / "nvme-tcp-interop.sh"
RUNS = HERE / "runs"
TARGET_ADDR = "10.0.2.100"  # the host as the guest sees it under slirp (run-guest.sh --tcp-port)
PROBE_HOST = "nqn.2014-08.org.nvmexpress:uuid:00000000-0000-0000-0000-00006e766d65"  # our own initiator
NSID = 1
MIB = 1 << 20
LOG_LENGTHS = {0x00: 1024, 0x02: 512, 0x03: 512, 0x12: 1024}  # the rest: 4096 (the guest job uses the same)


def skip_reason() -> str | None:
    """Why this machine cannot run the interop tests (None: it can)."""
    if os.geteuid() != 0:
        return "the guest harness needs root (network namespaces, /dev/kvm, 9p)"
    if shutil.which("qemu-system-x86_64") is None:
        return "qemu-system-x86_64 is not installed (../shared/tools/guest/build-image.sh installs it)"
    if not (GUEST_TOOLS / "run-guest.sh").is_file():
        return f"no guest harness at {GUEST_TOOLS} (set NVME_GUEST_TOOLS)"
    missing = [n for n in ("vmlinux", "rootfs.img", "initrd.img") if not (GUEST_DIR / n).is_file()]
    if missing:
        return (f"no guest image in {GUEST_DIR} ({', '.join(missing)} missing): run "
                f"{GUEST_TOOLS / 'build-image.sh'} (or set NVME_GUEST_DIR)")
    return None


def guest_hostnqn() -> str | None:
    """The guest's host NQN (made at image build time, the same in every guest), for the allow-list."""
    with contextlib.suppress(OSError):
        return (GUEST_DIR / "rootfs" / "etc" / "nvme" / "hostnqn").read_text().strip() or None
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sha256_region(path: Path, offset: int, length: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        f.seek(offset)
        left = length
        while left:
            chunk = f.read(min(left, 8 * MIB))
            if not chunk:
                chunk = bytes(left)  # past the end of a sparse file: zeroes
            h.update(chunk)
            left -= len(chunk)
    return h.hexdigest()


# ------------------------------------------------------------------------------------------ the target process
class TargetProcess:
    """`nvme-lm target serve` on 127.0.0.1:port, advertising the guest's view of the host."""

    def __init__(self, data_dir: Path, ports: list[int], log_dir: Path, args: list[str]) -> None:
        self.data_dir = data_dir
        self.ports = ports
        self.log_dir = log_dir
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.ready: dict[str, object] = {}
        self.returncodes: list[int] = []
        self.startup_s: list[float] = []

    @property
    def nqn(self) -> str:
        return str(self.ready["subsystems"][0])  # type: ignore[index]

    def start(self) -> None:
        self.starts += 1
        ready = self.log_dir / f"target-{self.starts}.ready.json"
        ready.unlink(missing_ok=True)
        listen = [a for p in self.ports for a in ("--listen", f"127.0.0.1:{p}")]
        cmd = [sys.executable, "-m", "nvme_lm.cli.main", "target", "serve", *listen, "--advertise-addr", TARGET_ADDR,
               "--data-dir", str(self.data_dir), "--ready-file", str(ready), "-v", *self.args]
        log = (self.log_dir / f"target-{self.starts}.log").open("wb")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        deadline = t0 + 30
        while not ready.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"target did not start (see {self.log_dir / f'target-{self.starts}.log'})")
            time.sleep(0.05)
        self.ready = json.loads(ready.read_text())
        self.startup_s.append(time.monotonic() - t0)

    def stop(self) -> None:
        p, self.proc = self.proc, None
        if p is None:
            return
        p.send_signal(signal.SIGTERM)
        try:
            self.returncodes.append(p.wait(30))
        except subprocess.TimeoutExpired:
            p.kill()
            self.returncodes.append(p.wait())

    def log_text(self, n: int) -> str:
        path = self.log_dir / f"target-{n}.log"
        return path.read_text(errors="replace") if path.exists() else ""


# ------------------------------------------------------------------------------------------ our own view
async def _probe(port: int, nqn: str, out: Path) -> dict[str, object]:
    """What our own initiator reads from the target: the reference for the guest's answers."""
    h = await HostController.connect("127.0.0.1", port, nqn, PROBE_HOST, io_queues=0)
    try:
        _, idc = await h.admin.command(identify_sqe(0x01), "Identify Controller", read_len=4096)
        _, idn = await h.admin.command(identify_sqe(0x00, nsid=NSID), "Identify Namespace", read_len=4096)
        _, descs = await h.admin.command(identify_sqe(0x03, nsid=NSID), "Namespace Descriptors", read_len=4096)
        _, common = await h.admin.command(identify_sqe(0x00, nsid=0xFFFFFFFF), "Identify Namespace (all)",
                                          read_len=4096)
        _, nvm_ns = await h.admin.command(identify_sqe(0x05, nsid=NSID), "Identify NVM Namespace", read_len=4096)
        _, nvm_ctrl = await h.admin.command(identify_sqe(0x06), "Identify NVM Controller", read_len=4096)
        for name, data in (("id-ctrl", idc), ("id-ns", idn), ("ns-descs", descs), ("id-ns-broadcast", common),
                           ("nvm-id-ns", nvm_ns), ("nvm-id-ctrl", nvm_ctrl)):
            (out / f"{name}.bin").write_bytes(data)
        lids = await h.get_log(0x00, 1024)
        (out / "log-00.bin").write_bytes(lids)
        supported = [i for i in range(256) if int.from_bytes(lids[4 * i : 4 * i + 4], "little") & 1]
        for lid in supported:
            data = await h.get_log(lid, LOG_LENGTHS.get(lid, 4096), rae=True)
            (out / f"log-{lid:02x}.bin").write_bytes(data)
        fid_log = (out / "log-12.bin").read_bytes() if 0x12 in supported else bytes(1024)
        fids = [i for i in range(256) if int.from_bytes(fid_log[4 * i : 4 * i + 4], "little") & 1]
        features: dict[str, dict[str, int | None]] = {}
        for fid in fids:
            values: dict[str, int | None] = {}
            for sel in (0, 1, 3):
                cqe, _ = await h.admin.submit(SQE(opcode=AdminOpcode.GET_FEATURES, cdw10=fid | sel << 8),
                                              read_len=8 if fid == 0x0E else 0)
                values[f"sel{sel}"] = cqe.dw0 if cqe.ok else None
            features[f"{fid:02x}"] = values
        return {"cntlid": h.cntlid, "lids": [f"{x:02x}" for x in supported], "fids": [f"{x:02x}" for x in fids],
                "features": features}
    finally:
        await h.close()


# ------------------------------------------------------------------------------------------ one session
@dataclass
class Step:
    name: str
    rc: int
    ms: int
    cmd: str
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode(errors="replace")

    def json(self) -> object:
        return json.loads(self.text)


@dataclass
class InteropRun:
    """One finished session (read-only for the tests)."""

    name: str
    dir: Path
    config: dict[str, object]
    guest_rc: int
    wall_s: float
    nqn: str
    port: int
    port2: int
    steps: dict[str, Step] = field(default_factory=dict)
    ours: dict[str, object] = field(default_factory=dict)
    host_sums: dict[str, str] = field(default_factory=dict)
    target: TargetProcess | None = None
    restart_s: dict[str, float] = field(default_factory=dict)

    @property
    def out(self) -> Path:
        return self.dir / "guest"

    def step(self, name: str) -> Step:
        assert name in self.steps, f"step {name} did not run (guest rc {self.guest_rc}; see {self.out / 'job.log'})"
        return self.steps[name]

    def ok(self, name: str) -> Step:
        s = self.step(name)
        assert s.rc == 0, f"{name}: `{s.cmd}` failed (rc {s.rc}): {s.err.strip() or s.text[-500:]}"
        return s

    def ours_bytes(self, name: str) -> bytes:
        return (self.dir / "ours" / name).read_bytes()

    def guest_file(self, name: str) -> str:
        path = self.out / name
        return path.read_text(errors="replace") if path.exists() else ""

    def target_log(self, n: int) -> str:
        assert self.target is not None
        return self.target.log_text(n)


def _load_steps(out: Path) -> dict[str, Step]:
    steps: dict[str, Step] = {}
    tsv = out / "steps.tsv"
    if not tsv.exists():
        return steps
    for line in tsv.read_text(errors="replace").splitlines():
        parts = line.split("\t", 3)
        if len(parts) < 4:
            continue
        name, rc, ms, cmd = parts
        o, e = out / "steps" / f"{name}.out", out / "steps" / f"{name}.err"
        steps[name] = Step(name, int(rc), int(ms), cmd, o.read_bytes() if o.exists() else b"",
                           e.read_text(errors="replace") if e.exists() else "")
    return steps


def run_session(name: str, *, work: Path, target_args: list[str], guest_env: dict[str, str],
                timeout: int = 900) -> InteropRun:
    """Target up, our reference read, the guest job run (target restarted when it asks), everything saved."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_dir = RUNS / f"{stamp}-{name}"
    (run_dir / "ours").mkdir(parents=True, exist_ok=True)
    out = run_dir / "guest"
    out.mkdir()
    data_dir = work / f"data-{name}"
    port, port2 = free_port(), free_port()
    while port2 == port:
        port2 = free_port()
    target = TargetProcess(data_dir, [port, port2], run_dir, target_args)
    t0 = time.monotonic()
    target.start()
    restart: dict[str, float] = {}
    host_sums: dict[str, str] = {}
    try:
        ours = asyncio.run(asyncio.wait_for(_probe(port, target.nqn, run_dir / "ours"), 60))
        env = {"PORT": str(port), "PORT2": str(port2), "NQN": target.nqn, "NSID": str(NSID), **guest_env}
        cmd = [str(GUEST_TOOLS / "run-guest.sh"), "--tcp-port", str(port), "--tcp-port", str(port2), "--out",
               str(out), "--quiet", "--timeout", str(timeout)]
        for k, v in env.items():
            cmd += ["--env", f"{k}={v}"]
        cmd.append(str(JOB))
        with (run_dir / "run-guest.log").open("wb") as log:
            guest = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            stop_watch = threading.Event()

            def watch() -> None:  # the guest's restart handshakes through the 9p share
                pending = ["restart", "restart2"]
                while pending and not stop_watch.is_set():
                    name = pending[0]
                    if (out / f"{name}.request").exists():
                        r0 = time.monotonic()
                        target.stop()
                        if name == "restart":
                            host_sums.update(_host_sums(data_dir, guest_env))
                        target.start()
                        restart[name] = time.monotonic() - r0
                        (out / f"{name}.done").write_text("restarted\n")
                        pending.pop(0)
                    stop_watch.wait(0.2)

            watcher = threading.Thread(target=watch, daemon=True)
            watcher.start()
            try:
                guest_rc = guest.wait(timeout + 60)
            finally:
                stop_watch.set()
                watcher.join(60)
                if guest.poll() is None:
                    guest.kill()
                    guest.wait()
    finally:
        target.stop()
    wall = time.monotonic() - t0
    run = InteropRun(name=name, dir=run_dir, config={"target_args": target_args, **guest_env}, guest_rc=guest_rc,
                     wall_s=wall, nqn=str(target.ready.get("subsystems", ["?"])[0]),  # type: ignore[index]
                     port=port, port2=port2, steps=_load_steps(out), ours=ours, host_sums=host_sums,
                     target=target, restart_s=restart)
    (run_dir / "ours" / "ours.json").write_text(json.dumps(ours, indent=1))
    _write_summary(run)
    return run


def _host_sums(data_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """Checksums of the guest's regions straight from the namespace file, with the first target stopped."""
    img = data_dir / f"ns{NSID}.img"
    area = int(env["FIO_AREA_MIB"]) * int(env["FIO_NUMJOBS"])
    return {"fio_area": sha256_region(img, 0, area * MIB),
            "keep": sha256_region(img, int(env["KEEP_OFFSET_MIB"]) * MIB, int(env["KEEP_MIB"]) * MIB)}


def _write_summary(run: InteropRun) -> None:
    timing = {}
    with contextlib.suppress(OSError):
        for line in (run.out / "timing.txt").read_text().splitlines():
            k, _, v = line.partition("=")
            timing[k] = v
    summary = {
        "name": run.name, "nqn": run.nqn, "port": run.port, "guest_rc": run.guest_rc, "wall_s": round(run.wall_s, 1),
        "restart_s": {k: round(v, 2) for k, v in run.restart_s.items()}, "config": run.config, "timing": timing,
        "target_returncodes": run.target.returncodes if run.target else None,
        "failed_steps": [s.name for s in run.steps.values() if s.rc != 0],
        "steps": [{"name": s.name, "rc": s.rc, "ms": s.ms, "cmd": s.cmd} for s in run.steps.values()],
        "fio": fio_figures(run.out / "fio-verify.json"),
    }
    (run.dir / "summary.json").write_text(json.dumps(summary, indent=1))


def fio_figures(path: Path) -> dict[str, object] | None:
    """The few fio figures docs/benchmarks.md quotes (write IOPS, verify-read IOPS, MiB/s, completion latency)."""
    try:
        text = path.read_text()
        job = json.loads(text[text.index("{"):])["jobs"][0]
    except (OSError, ValueError, KeyError, IndexError):
        return None
    # with group_reporting, job_runtime adds up the jobs' runtimes; elapsed is the wall time (s). fio's own
    # per-direction rates divide by the time that direction was active, which flatters the verify reads.
    elapsed = max(1, int(job.get("elapsed", 0)))
    fig: dict[str, object] = {"error": job.get("error"), "runtime_ms": job.get("job_runtime"), "elapsed_s": elapsed}
    for d in ("read", "write"):
        s = job[d]
        fig[d] = {"iops": round(s["total_ios"] / elapsed, 1), "mib_s": round(s["io_bytes"] / MIB / elapsed, 2),
                  "io_bytes": s["io_bytes"], "total_ios": s["total_ios"],
                  "clat_mean_ms": round(s["clat_ns"]["mean"] / 1e6, 2),
                  "clat_p99_ms": round(s["clat_ns"].get("percentile", {}).get("99.000000", 0) / 1e6, 2)}
    return fig
