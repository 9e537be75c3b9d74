"""Migration scenarios: a TOML file that says which hosts, which VM, what it runs and how to migrate it.

The schema is the set of frozen dataclasses below; their defaults are the demo of issue 5 (two hosts on
loopback, vendor-a -> vendor-b, 1 GiB namespace 25% allocated, 256 MiB RAM, randrw at QD16), so
`default_scenario()` and `scenarios/default.toml` are the same scenario. Validation is strict because a
typo must not silently become a default that changes what a migration measures: an unknown key, a wrong
type or an impossible value is refused, and every problem of a file is reported at once, each naming the
file, the table, the key, the bad value and what is allowed. Keys are documented in docs/scenarios.md.
"""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import math
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from nvme_lm.device.model import DeviceModel
from nvme_lm.device.template import Template

__all__ = [
    "PATTERNS",
    "FaultsSpec",
    "HostSpec",
    "HostsSpec",
    "MigrationSpec",
    "NamespaceSpec",
    "Scenario",
    "ScenarioError",
    "VmSpec",
    "WorkloadSpec",
    "default_scenario",
    "load_scenario",
    "parse_scenario",
]

KIB, MIB, GIB = 1 << 10, 1 << 20, 1 << 30
PATTERNS = ("randread", "randwrite", "randrw", "write", "trim")  # fio's names
LBA_SIZES = (512, 4096)
NAME_RE = re.compile(r"[a-z0-9-]{1,32}")  # host and VM names: they become directory names and report keys
U32 = (1 << 32) - 1  # TP4176 TIOPS is 32 bits
PAGE = 4096  # CAP.MPSMIN: MDTS counts pages of this size


class ScenarioError(ValueError):
    """A scenario file that cannot be run; `problems` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


# ============================================================================================ field rules
@dataclass(frozen=True)
class _Rule:
    """How one key is checked: its TOML type, then its value (`check` returns why it is bad, or None)."""

    kind: type  # int, float, str or bool; float also takes an int
    check: Callable[[Any], str | None] | None = None


def _int(lo: int, hi: int | None = None, *, pow2: bool = False) -> _Rule:
    def check(v: int) -> str | None:
        if pow2 and (v < lo or (hi is not None and v > hi) or v & (v - 1)):
            return f"must be a power of two in {lo}..{hi}"
        if v < lo or (hi is not None and v > hi):
            return f"must be in {lo}..{hi}" if hi is not None else f"must be >= {lo}"
        return None
    return _Rule(int, check)


def _num(lo: float, hi: float | None = None, *, above: bool = False) -> _Rule:
    """A finite float >= lo (> lo when `above`) and <= hi."""
    def check(v: float) -> str | None:
        if (above and v <= lo) or v < lo or (hi is not None and v > hi):
            low = f"> {_fmt(lo)}" if above else f">= {_fmt(lo)}"
            return f"must be a number {low}" + (f" and <= {_fmt(hi)}" if hi is not None else "")
        return None
    return _Rule(float, check)


def _choice(options: tuple[str, ...] | Callable[[], list[str]], what: str = "") -> _Rule:
    def check(v: str) -> str | None:
        allowed = options() if callable(options) else options
        return None if v in allowed else f"must be one of {', '.join(allowed)}{what}"
    return _Rule(str, check)


def _name(v: str) -> str | None:
    return None if NAME_RE.fullmatch(v) else "must be 1..32 characters from a-z, 0-9 and '-'"


def _title(v: str) -> str | None:
    return None if v and len(v) <= 64 and v.isprintable() else "must be 1..64 printable characters"


def _patterns(v: str) -> str | None:
    if not v or all(p in PATTERNS for p in v.split(",")):
        return None
    return f"must be comma-separated patterns, each one of {', '.join(PATTERNS)}"


def _listen(v: str) -> str | None:
    """IP:PORT on loopback or a private network: agents never listen on a public or wildcard address."""
    allowed = "must be IP:PORT with a loopback or private IP address (e.g. 127.0.0.1:0; port 0 = any free port)"
    host, sep, port = v.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        return allowed
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        return allowed  # an IPv6 address goes in brackets: [::1]:0
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return allowed
    if ip.is_unspecified or not (ip.is_loopback or ip.is_private or ip.is_link_local):
        return allowed
    return None


def _key(rule: _Rule, default: Any, *, key: str | None = None) -> Any:
    """A dataclass field for one TOML key (`key`, default the field's name), checked by `rule`."""
    return field(default=default, metadata={"rule": rule, "key": key})


# ============================================================================================ the schema
@dataclass(frozen=True)
class HostSpec:
    """One host agent: `[hosts.<name>]`."""

    name: str = "a"  # the table's name, not a key inside it
    model: str = _key(_choice(DeviceModel.builtin_names, " (built-in device models)"), "vendor-a")
    listen: str = _key(_Rule(str, _listen), "127.0.0.1:0")


@dataclass(frozen=True)
class HostsSpec:
    """`[hosts]`: the link between hosts (shaped in issue 6) and the hosts, in file order."""

    link_mbit: int = _key(_int(0), 0)  # 0 = unlimited
    link_delay_ms: float = _key(_num(0.0), 0.0)
    nodes: tuple[HostSpec, ...] = (HostSpec("a", "vendor-a"), HostSpec("b", "vendor-b"))

    @property
    def names(self) -> list[str]:
        return [h.name for h in self.nodes]

    def get(self, name: str) -> HostSpec:
        for h in self.nodes:
            if h.name == name:
                return h
        raise KeyError(f"no host named {name!r} (hosts: {', '.join(self.names)})")


@dataclass(frozen=True)
class NamespaceSpec:
    """`[vm.namespace]`: the VM's namespace, created on the source host's SSD."""

    capacity_gib: float = _key(_num(0.0, above=True), 1.0)
    lba_size: int = _key(_Rule(int, lambda v: None if v in LBA_SIZES else "must be 512 or 4096"), 4096)
    prefill_gib: float = _key(_num(0.0), 0.25)

    @property
    def capacity_bytes(self) -> int:
        return round(self.capacity_gib * GIB)

    @property
    def nlbas(self) -> int:
        return self.capacity_bytes // self.lba_size

    @property
    def prefill_bytes(self) -> int:
        """Bytes written before the migration starts, rounded down to whole LBAs."""
        n = int(self.prefill_gib * GIB)
        return min(n - n % self.lba_size, self.capacity_bytes)


@dataclass(frozen=True)
class WorkloadSpec:
    """`[vm.workload]`: what the guest's vCPUs run, in fio's vocabulary."""

    pattern: str = _key(_choice(PATTERNS), "randrw")
    block_size: int = _key(_int(512, 128 * KIB), 4096)
    iodepth: int = _key(_int(1, 1023), 16)  # per queue
    rwmixread: int = _key(_int(0, 100), 70)
    rate_iops: int = _key(_int(0, U32), 0)  # 0 = unlimited
    hot_set: float = _key(_num(0.0, 1.0, above=True), 1.0)
    hot_share: float = _key(_num(0.0, 1.0), 0.9)
    trim_percent: int = _key(_int(0, 100), 10)
    identity_check_s: float = _key(_num(0.0, above=True), 1.0)
    run_after_s: float = _key(_num(0.0), 1.0)
    region_gib: float = _key(_num(0.0), 0.0)  # the workload's part of the namespace, from LBA 0; 0: all of it
    # one pattern per queue, comma-separated (a reader and a writer job: "randread,randwrite"); "" = `pattern`
    queue_patterns: str = _key(_Rule(str, _patterns), "")

    @property
    def region_bytes(self) -> int:
        """Bytes of the namespace the workload uses (0: the whole namespace)."""
        return round(self.region_gib * GIB)

    @property
    def read_fraction(self) -> float:
        """The share of commands that are reads: fio's meaning of each pattern."""
        if self.pattern == "randread":
            return 1.0
        if self.pattern in ("randwrite", "write"):
            return 0.0
        return self.rwmixread / 100


@dataclass(frozen=True)
class VmSpec:
    """`[vm]`: the guest: RAM, vCPUs (one I/O queue each), the template its VF presents."""

    name: str = _key(_Rule(str, _name), "vm1")
    memory_mib: int = _key(_int(16, 65536), 256)
    queues: int = _key(_int(1, 8), 1)
    template: str = _key(_choice(Template.builtin_names, " (built-in templates)"), "generic-v1")
    device_rate_iops: int = _key(_int(0, U32), 0)  # 0 = no TP4176 limit on the VF
    namespace: NamespaceSpec = field(default_factory=NamespaceSpec, metadata={"table": NamespaceSpec})
    workload: WorkloadSpec = field(default_factory=WorkloadSpec, metadata={"table": WorkloadSpec})

    @property
    def memory_bytes(self) -> int:
        return self.memory_mib * MIB


@dataclass(frozen=True)
class MigrationSpec:
    """`[migration]`: where to, when, and the engine's knobs."""

    from_host: str = _key(_Rule(str), "a", key="from")
    to_host: str = _key(_Rule(str), "b", key="to")
    downtime_target_ms: float = _key(_num(0.0, above=True), 50.0)
    max_passes: int = _key(_int(1, 100), 8)
    start_after_s: float = _key(_num(0.0), 2.0)
    repeat: int = _key(_int(1, 100), 1)
    copy_chunk_kib: int = _key(_int(4, 4096, pow2=True), 128)
    copy_inflight: int = _key(_int(1, 64), 8)
    verify_ram: bool = _key(_Rule(bool), False)
    verify_lbas: bool = _key(_Rule(bool), False)
    policy: str = _key(_choice(("predictive", "fixed", "auto-converge", "local-minimum")), "predictive")
    throttle: bool = _key(_Rule(bool), True)
    give_up_s: float = _key(_num(0.0), 0.0)  # 0: only timeout_s ends a leg that does not converge
    max_bandwidth_mib_s: float = _key(_num(0.0), 0.0)  # the engine's own cap on the stream; 0: none
    timeout_s: float = _key(_num(0.0, above=True), 60.0)
    reply_timeout_s: float = _key(_num(0.0, above=True), 30.0)  # a peer silent (or not reading) this long is gone

    @property
    def copy_chunk_bytes(self) -> int:
        return self.copy_chunk_kib * KIB


def _fault_kinds() -> list[str]:
    from nvme_lm.hypervisor.faults import KINDS  # the engine's list, loaded only when a [faults] key is checked

    return ["none", *KINDS]


def _fault_phases() -> list[str]:
    from nvme_lm.hypervisor.faults import PHASES

    return list(PHASES)


@dataclass(frozen=True)
class FaultsSpec:
    """`[faults]`: one fault injected into one leg (issue 6's fault matrix, docs/faults.md)."""

    kind: str = _key(_choice(_fault_kinds), "none")  # none: no fault
    phase: str = _key(_choice(_fault_phases), "pre-copy")
    leg: int = _key(_int(1, 100), 1)  # which leg gets the fault
    after_s: float = _key(_num(0.0), 0.0)  # fire this long after the phase's point (the engine is not held)
    out_of_space: str = _key(_choice(("auto", "tmpfs", "inject")), "auto")  # how the destination's disk fills

    @property
    def armed(self) -> bool:
        return self.kind != "none"


@dataclass(frozen=True)
class Scenario:
    """A whole scenario; `Scenario()` is the default one. Build from files with `load_scenario`."""

    name: str = _key(_Rule(str, _title), "default")
    description: str = _key(_Rule(str), "Two hosts on loopback, vendor-a -> vendor-b: 1 GiB namespace "
                            "25% allocated, 256 MiB RAM, randrw at QD16")
    hosts: HostsSpec = field(default_factory=HostsSpec)
    vm: VmSpec = field(default_factory=VmSpec, metadata={"table": VmSpec})
    migration: MigrationSpec = field(default_factory=MigrationSpec, metadata={"table": MigrationSpec})
    faults: FaultsSpec = field(default_factory=FaultsSpec, metadata={"table": FaultsSpec})

    @property
    def capacity_bytes(self) -> int:
        return self.vm.namespace.capacity_bytes

    @property
    def prefill_bytes(self) -> int:
        return self.vm.namespace.prefill_bytes

    @property
    def memory_bytes(self) -> int:
        return self.vm.memory_bytes

    @property
    def legs(self) -> list[tuple[str, str]]:
        """(from, to) of each leg: from->to on odd legs, back on even ones (A->B->A...)."""
        a, b = self.migration.from_host, self.migration.to_host
        return [(a, b) if i % 2 else (b, a) for i in range(1, self.migration.repeat + 1)]

    def host(self, name: str) -> HostSpec:
        return self.hosts.get(name)

    def to_dict(self) -> dict[str, Any]:
        """The scenario as TOML-shaped plain data; `parse_scenario(s.to_dict(), ...) == s`."""
        hosts: dict[str, Any] = _dump(self.hosts)
        for h in self.hosts.nodes:
            hosts[h.name] = _dump(h)
        top = _dump(self)
        return {"name": top.pop("name"), "description": top.pop("description"), "hosts": hosts, **top}

    def validate(self, source: str = "<scenario>") -> Scenario:
        """Checks a scenario built in code (e.g. with dataclasses.replace) as strictly as a file."""
        return parse_scenario(self.to_dict(), source)


def _keyed(cls: type) -> dict[str, Any]:
    """TOML key -> field, for the fields that are plain keys."""
    return {f.metadata["key"] or f.name: f for f in fields(cls) if "rule" in f.metadata}


def _subtables(cls: type) -> list[Any]:
    return [f for f in fields(cls) if "table" in f.metadata]


def _dump(obj: Any) -> dict[str, Any]:
    out: dict[str, Any] = {key: getattr(obj, f.name) for key, f in _keyed(type(obj)).items()}
    for f in _subtables(type(obj)):
        out[f.name] = _dump(getattr(obj, f.name))
    return out


def default_scenario() -> Scenario:
    """The demo scenario of issue 5 (= scenarios/default.toml)."""
    return Scenario()


# ============================================================================================ parsing
def _fmt(v: Any) -> str:
    """A value as the user wrote it in TOML (integral floats without '.0': `prefill_gib = 2`)."""
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        return str(int(v))
    if isinstance(v, dict):
        return "{...}"
    return repr(v)


class _Ctx:
    """Problems found so far, and which keys were bad (cross-field checks skip those: no noise)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[str] = []
        self.bad: set[tuple[str, str]] = set()

    def problem(self, table: str, key: str | None, why: str, value: Any = MISSING) -> None:
        where = f"[{table}]" if table else ""
        if key is not None:
            where = f"{where} {key}".strip()
            if value is not MISSING:
                where += f" = {_fmt(value)}"
            self.bad.add((table, key))
        self.problems.append(f"{self.source}: {where}: {why}")

    def ok(self, *keys: tuple[str, str]) -> bool:
        return not any(k in self.bad for k in keys)


def _typed(rule: _Rule, v: Any) -> tuple[Any, str | None]:
    """(value converted to the rule's kind, None) or (None, why the type is wrong)."""
    if rule.kind is bool:
        return (v, None) if isinstance(v, bool) else (None, "must be true or false")
    if rule.kind is int:
        return (v, None) if isinstance(v, int) and not isinstance(v, bool) else (None, "must be an integer")
    if rule.kind is float:
        if not isinstance(v, int | float) or isinstance(v, bool):
            return None, "must be a number"
        if not math.isfinite(v):
            return None, "must be a finite number"
        return float(v), None
    return (v, None) if isinstance(v, str) else (None, "must be a string")


def _unknown(ctx: _Ctx, table: str, key: str, allowed: list[str], is_table: bool) -> None:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    what = "unknown table" if is_table else "unknown key"
    ctx.problem(table, key, f"{what} (allowed: {', '.join(allowed)}){hint}")


def _parse_table(ctx: _Ctx, cls: type, data: Any, table: str, skip: frozenset[str] = frozenset(),
                 extra: tuple[str, ...] = ()) -> dict[str, Any]:
    """Checks one table against `cls`'s keyed fields and sub-tables; returns constructor kwargs of the
    keys that passed (the others keep their defaults, so checking can go on)."""
    kwargs: dict[str, Any] = {}
    if not isinstance(data, Mapping):
        parent, _, key = table.rpartition(".")
        ctx.problem(parent, key, f"must be a table ([{table}])", data)
        return kwargs
    keyed = _keyed(cls)
    subs = {f.name: f for f in _subtables(cls)}
    for key, value in data.items():
        if key in skip:
            continue
        if key in keyed:
            f = keyed[key]
            rule: _Rule = f.metadata["rule"]
            v, why = _typed(rule, value)
            if why is None and rule.check is not None:
                why = rule.check(v)
            if why is not None:
                ctx.problem(table, key, why, value)
            else:
                kwargs[f.name] = v
        elif key in subs:
            sub = f"{table}.{key}" if table else key
            kwargs[key] = subs[key].metadata["table"](**_parse_table(ctx, subs[key].metadata["table"], value, sub))
        else:
            _unknown(ctx, table, key, [*keyed, *extra, *subs], isinstance(value, Mapping))
    return kwargs


def _parse_hosts(ctx: _Ctx, data: Any) -> HostsSpec:
    """`[hosts]` mixes link keys with one `[hosts.<name>]` table per host, kept in file order."""
    if not isinstance(data, Mapping):
        _parse_table(ctx, HostsSpec, data, "hosts")
        return HostsSpec()
    tables = {k: v for k, v in data.items() if isinstance(v, Mapping)}
    kwargs = _parse_table(ctx, HostsSpec, data, "hosts", skip=frozenset(tables), extra=("[hosts.<name>] tables",))
    nodes = []
    for name, table in tables.items():
        if why := _name(name):
            ctx.problem("hosts", name, f"host name {why}")
            continue
        nodes.append(HostSpec(name=name, **_parse_table(ctx, HostSpec, table, f"hosts.{name}")))
    if len(nodes) < 2 and len(tables) == len(nodes):
        ctx.problem("hosts", None, f"at least two hosts are needed, one [hosts.<name>] table each; found {len(nodes)}")
    kwargs["nodes"] = tuple(nodes)
    return HostsSpec(**kwargs)


def parse_scenario(data: Mapping[str, Any], source: str = "<scenario>", *, check_hosts: bool = True) -> Scenario:
    """Validates TOML-shaped `data` (from `source`, named in messages) and returns the Scenario.

    `check_hosts=False` skips the checks that compare the VM with its hosts' device models (template
    presentable, queues, capacity, copy chunk), for tests that want a destination agent to refuse."""
    ctx = _Ctx(source)
    if not isinstance(data, Mapping):
        raise ScenarioError([f"{source}: a scenario must be a table of keys, not {type(data).__name__}"])
    data = dict(data)
    hosts = _parse_hosts(ctx, data.pop("hosts")) if "hosts" in data else HostsSpec()
    kwargs = _parse_table(ctx, Scenario, data, "", extra=("hosts",))
    # `from` / `to` default to the first two hosts of this file, not to the built-in default's
    given = data.get("migration")
    given = given if isinstance(given, Mapping) else {}
    fill: dict[str, str] = {}
    for i, (attr, key) in enumerate((("from_host", "from"), ("to_host", "to"))):
        if key not in given:
            if i < len(hosts.nodes):
                fill[attr] = hosts.nodes[i].name
            else:
                ctx.bad.add(("migration", key))  # no host to default to: [hosts] already says why
    kwargs["migration"] = dataclasses.replace(kwargs.get("migration", MigrationSpec()), **fill)
    scenario = Scenario(hosts=hosts, **kwargs)
    _cross_checks(ctx, scenario, check_hosts)
    if ctx.problems:
        raise ScenarioError(ctx.problems)
    return scenario


def load_scenario(path: str | Path, *, check_hosts: bool = True) -> Scenario:
    """Reads and validates a scenario file; every problem is raised as one ScenarioError."""
    source = str(path)
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ScenarioError([f"{source}: cannot read: {e.strerror or e}"]) from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ScenarioError([f"{source}: not valid TOML: {e}"]) from None
    return parse_scenario(data, source, check_hosts=check_hosts)


# ============================================================================================ cross-field checks
def _max_transfer(mdts: int) -> int | None:
    """Bytes one command may move with MDTS `mdts` (None: no limit)."""
    return PAGE << mdts if mdts else None


def _cross_checks(ctx: _Ctx, s: Scenario, check_hosts: bool) -> None:
    """Checks between keys, run on values that passed their own checks."""
    ns, wl, vm, mig = s.vm.namespace, s.vm.workload, s.vm, s.migration
    NS, WL, VM, MIG = "vm.namespace", "vm.workload", "vm", "migration"
    cap, lba, bs = (NS, "capacity_gib"), (NS, "lba_size"), (WL, "block_size")

    # the namespace
    if ctx.ok(cap, lba):
        exact = ns.capacity_gib * GIB
        if not exact.is_integer() or int(exact) % ns.lba_size:
            ctx.problem(NS, "capacity_gib", f"{_fmt(exact)} bytes is not a whole number of {ns.lba_size}-byte "
                        "LBAs", ns.capacity_gib)
        elif exact < MIB:
            ctx.problem(NS, "capacity_gib", "must be at least 1 MiB (0.0009765625)", ns.capacity_gib)
    if ctx.ok(cap, (NS, "prefill_gib")) and ns.prefill_gib > ns.capacity_gib:
        ctx.problem(NS, "prefill_gib", f"larger than capacity_gib ({_fmt(ns.capacity_gib)})", ns.prefill_gib)

    # the workload against the namespace and guest RAM
    if ctx.ok(bs, lba) and wl.block_size % ns.lba_size:
        ctx.problem(WL, "block_size", f"must be a multiple of lba_size ({ns.lba_size})", wl.block_size)
    region = (WL, "region_gib")
    if ctx.ok(cap, bs, region) and wl.region_gib:
        exact = wl.region_gib * GIB
        if exact > ns.capacity_bytes:
            ctx.problem(WL, "region_gib", f"larger than capacity_gib ({_fmt(ns.capacity_gib)})", wl.region_gib)
        elif not exact.is_integer() or int(exact) % wl.block_size:
            ctx.problem(WL, "region_gib", f"{_fmt(exact)} bytes is not a whole number of {wl.block_size}-byte "
                        "blocks", wl.region_gib)
        elif ctx.ok((NS, "prefill_gib")) and ns.prefill_gib > wl.region_gib:
            ctx.problem(NS, "prefill_gib", f"larger than [vm.workload] region_gib ({_fmt(wl.region_gib)}): the "
                        "prefill writes the workload's region", ns.prefill_gib)
    depth = ((WL, "iodepth"), (VM, "queues"))
    if ctx.ok(cap, lba, bs, region, *depth) and wl.block_size % ns.lba_size == 0:
        need = 2 * wl.iodepth * vm.queues
        used = wl.region_bytes or ns.capacity_bytes
        if used // wl.block_size < need:
            key, value = ("region_gib", wl.region_gib) if wl.region_gib else ("capacity_gib", ns.capacity_gib)
            ctx.problem(WL if wl.region_gib else NS, key, f"holds {used // wl.block_size} blocks of "
                        f"{wl.block_size} B; the workload needs at least 2 x iodepth x queues = {need}", value)
    if ctx.ok(bs, *depth, (VM, "memory_mib")):
        buffers = vm.queues * wl.iodepth * wl.block_size
        if buffers > vm.memory_bytes // 2:
            ctx.problem(VM, "memory_mib", f"too small: the I/O buffers in flight (queues x iodepth x block_size = "
                        f"{buffers / MIB:g} MiB) may use at most half of guest RAM", vm.memory_mib)
    if ctx.ok((WL, "queue_patterns"), (VM, "queues")) and wl.queue_patterns:
        n = len(wl.queue_patterns.split(","))
        if n != vm.queues:
            ctx.problem(WL, "queue_patterns", f"names {n} patterns for {vm.queues} queues ([vm] queues)",
                        wl.queue_patterns)
    if ctx.ok((WL, "pattern"), (WL, "trim_percent")) and wl.pattern == "trim" and wl.trim_percent == 0:
        ctx.problem(WL, "trim_percent", "pattern 'trim' needs trim_percent > 0", wl.trim_percent)

    # the template the VF presents
    if ctx.ok((VM, "template")):
        t = Template.builtin(vm.template)
        if ctx.ok(lba) and ns.lba_size not in t.lba_sizes:
            ctx.problem(NS, "lba_size", f"template {t.name!r} has no {ns.lba_size}-byte LBA format "
                        f"(it has {', '.join(map(str, t.lba_sizes))})", ns.lba_size)
        if ctx.ok((WL, "iodepth")) and wl.iodepth > t.mqes:
            ctx.problem(WL, "iodepth", f"must be below the {t.mqes + 1}-entry queues of template {t.name!r}",
                        wl.iodepth)
        top = _max_transfer(t.ctrl("mdts"))
        if ctx.ok(bs) and top is not None and wl.block_size > top:
            ctx.problem(WL, "block_size", f"larger than the {top // KIB} KiB one command may move with template "
                        f"{t.name!r} (MDTS {t.ctrl('mdts')})", wl.block_size)

    # hosts and legs
    names = s.hosts.names
    for key, host in (("from", mig.from_host), ("to", mig.to_host)):
        if ctx.ok((MIG, key)) and host not in names:
            ctx.problem(MIG, key, f"no such host (hosts: {', '.join(names) or 'none'})", host)
    if ctx.ok((MIG, "from"), (MIG, "to")) and mig.from_host == mig.to_host:
        ctx.problem(MIG, "to", "must differ from 'from'", mig.to_host)
    for h in s.hosts.nodes:
        if ctx.ok((f"hosts.{h.name}", "model")) and DeviceModel.builtin(h.model).max_vfs == 0:
            ctx.problem(f"hosts.{h.name}", "model", "has no SR-IOV VFs to assign to a VM", h.model)
    listening = [h for h in s.hosts.nodes if not h.listen.endswith(":0")]
    for i, h in enumerate(listening):
        if any(h.listen == o.listen for o in listening[:i]):
            ctx.problem(f"hosts.{h.name}", "listen", "another host listens there already", h.listen)
    if ctx.ok(("faults", "leg"), (MIG, "repeat")) and s.faults.leg > mig.repeat:
        ctx.problem("faults", "leg", f"must be at most [migration] repeat ({mig.repeat})", s.faults.leg)
    if check_hosts:
        _host_checks(ctx, s)


def _host_checks(ctx: _Ctx, s: Scenario) -> None:
    """The VM against the device of every host it visits: what the destination agent would refuse."""
    ns, vm, mig = s.vm.namespace, s.vm, s.migration
    visited = [n for n in dict.fromkeys((mig.from_host, mig.to_host)) if n in s.hosts.names]
    for name in visited:
        h = s.hosts.get(name)
        table = f"hosts.{name}"
        if not ctx.ok((table, "model")):
            continue
        m = DeviceModel.builtin(h.model)
        if m.max_vfs == 0:
            continue
        if ctx.ok(("vm", "template")):
            from nvme_lm.device.admin.exported import capabilities_for  # the device's admin tables: load late

            why = Template.builtin(vm.template).problems(capabilities_for(m))
            if why:
                ctx.problem("vm", "template", f"host {name!r} ({m.name}) cannot present it: {'; '.join(why)}",
                            vm.template)
        if ctx.ok(("vm", "queues")) and vm.queues + 1 > m.vq_max_per_vf:
            ctx.problem("vm", "queues", f"host {name!r} ({m.name}) gives a VF at most {m.vq_max_per_vf} queues, "
                        f"the admin queue included: at most {m.vq_max_per_vf - 1} I/O queues", vm.queues)
        if ctx.ok(("vm.namespace", "capacity_gib")) and ns.capacity_bytes > m.capacity_bytes:
            ctx.problem("vm.namespace", "capacity_gib", f"larger than the {m.capacity_bytes / GIB:.0f} GiB SSD of "
                        f"host {name!r} ({m.name})", ns.capacity_gib)
        top = _max_transfer(m.mdts)
        if ctx.ok(("migration", "copy_chunk_kib")) and top is not None and mig.copy_chunk_bytes > top:
            ctx.problem("migration", "copy_chunk_kib", f"larger than the {top // KIB} KiB one command may move "
                        f"through the PF of host {name!r} ({m.name}, MDTS {m.mdts})", mig.copy_chunk_kib)
