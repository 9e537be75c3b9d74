"""The guest's identity verifier: what the controller says it is must not change under the guest.

A VM on an exported VF sees the template's identity whatever SSD is underneath, so a migration to
another model must leave every identity page the guest can read byte for byte as it was at boot:
Identify Controller (CNS 01h), Identify Namespace (CNS 00h), the Namespace Identification
Descriptor list (CNS 03h), the Commands Supported and Effects log (05h) and the Supported Log Pages
log (00h). `baseline()` reads them at boot; `check()` reads them again (periodically and after a
migration) and names, for each page that differs, the first differing offset and the field there.

The verifier issues synchronous admin commands through the guest's driver: a VM must not capture
its driver state while a check is running (the driver refuses: an untagged command has a waiter).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import numpy as np

from nvme_lm.host.driver import NvmeDriver
from nvme_lm.host.qpair import NvmeCommandError, NvmeTimeout
from nvme_lm.spec.identify import CNS, IdentifyController, IdentifyNamespace
from nvme_lm.spec.layout import Layout
from nvme_lm.spec.logs import LogId

VERIFIER_STATE_VERSION = 1
CMD_EFFECTS_LEN = 4096
SUPPORTED_LOGS_LEN = 1024

# name -> (title, decoded layout for field names, or a function naming the item at an offset)
_PAGES: dict[str, tuple[str, type[Layout] | Callable[[int], str] | None]] = {
    "identify_controller": ("Identify Controller (CNS 01h)", IdentifyController),
    "identify_namespace": ("Identify Namespace (CNS 00h)", IdentifyNamespace),
    "ns_descriptors": ("NS Identification Descriptor list (CNS 03h)", None),
    "cmd_effects": ("Commands Supported and Effects log (05h)",
                    lambda off: (f"ACS opcode {off // 4:#04x}" if off < 1024 else
                                 f"IOCS opcode {(off - 1024) // 4:#04x}" if off < 2048 else "reserved")),
    "supported_logs": ("Supported Log Pages log (00h)", lambda off: f"LID {off // 4:#04x}"),
}


def _fields(cls: type[Layout]) -> list[tuple[int, str]]:
    """(offset, name) of every declared field, in offset order."""
    return sorted((cls.offset_of(f.name), f.name) for f in dataclasses.fields(cls))  # type: ignore[arg-type]


def _field_spans(cls: type[Layout]) -> list[tuple[int, int, str]]:
    """(start, end, name) of every declared field; a field's span runs to the next field's offset."""
    offs = _fields(cls)
    return [(off, offs[i + 1][0] if i + 1 < len(offs) else cls.SIZE, name) for i, (off, name) in enumerate(offs)]


def _changed_fields(cls: type[Layout], old: bytes, new: bytes) -> list[str]:
    """Names of the fields whose decoded values differ, in offset order."""
    a, b = cls.decode(old), cls.decode(new)
    return [n for _, n in _fields(cls) if getattr(a, n) != getattr(b, n)]


def describe_difference(page: str, old: bytes, new: bytes) -> str:
    """One line saying how `new` differs from `old` for identity page `page` (they do differ)."""
    title, namer = _PAGES[page]
    n = min(len(old), len(new))
    diff = np.flatnonzero(np.frombuffer(old[:n], np.uint8) != np.frombuffer(new[:n], np.uint8))
    first = int(diff[0]) if len(diff) else n
    line = f"{title}: {len(diff) + abs(len(old) - len(new))} byte(s) differ, first at offset {first:#x}"
    if len(old) != len(new):
        line += f" (length {len(old)} -> {len(new)})"
    if isinstance(namer, type) and len(old) >= namer.SIZE and len(new) >= namer.SIZE:
        changed = _changed_fields(namer, old, new)
        at = next((name for start, end, name in _field_spans(namer) if start <= first < end), None)
        line += f" (field {at})" if at in changed else " (reserved bytes)"
        if changed:
            line += f"; fields changed: {', '.join(changed)}"
    elif callable(namer) and not isinstance(namer, type):
        line += f" ({namer(first)})"
    return line


class IdentityVerifier:
    """Compares the guest-visible identity pages of namespace `nsid`'s controller with boot time."""

    def __init__(self, driver: NvmeDriver, nsid: int) -> None:
        self.driver = driver
        self.nsid = nsid
        self.boot: dict[str, bytes] | None = None
        self.checks = 0  # check() calls
        self.changes = 0  # pages found different, summed over checks
        self.errors = 0  # identity reads that failed (error status or timeout)
        self.last: list[str] = []  # the differences the last check reported

    def _readers(self) -> dict[str, Callable[[], bytes]]:
        d, nsid = self.driver, self.nsid
        return {
            "identify_controller": lambda: d.identify(CNS.CTRL),
            "identify_namespace": lambda: d.identify(CNS.NS, nsid=nsid),
            "ns_descriptors": lambda: d.identify(CNS.NS_DESC_LIST, nsid=nsid),
            "cmd_effects": lambda: d.get_log(LogId.CMD_EFFECTS, CMD_EFFECTS_LEN),
            "supported_logs": lambda: d.get_log(LogId.SUPPORTED_LOG_PAGES, SUPPORTED_LOGS_LEN),
        }

    def capture(self) -> dict[str, bytes]:
        """Reads every identity page now (errors propagate)."""
        return {name: read() for name, read in self._readers().items()}

    def baseline(self) -> dict[str, bytes]:
        """The boot-time capture every later check compares with."""
        self.boot = self.capture()
        return self.boot

    def check(self) -> list[str]:
        """Reads every page again; one line per page that differs from boot or could not be read."""
        if self.boot is None:
            raise RuntimeError("no baseline: call baseline() at boot")
        self.checks += 1
        out: list[str] = []
        for name, read in self._readers().items():
            try:
                now = read()
            except (NvmeCommandError, NvmeTimeout) as e:
                self.errors += 1
                out.append(f"{_PAGES[name][0]}: read failed: {e}")
                continue
            if now != self.boot[name]:
                self.changes += 1
                out.append(describe_difference(name, self.boot[name], now))
        self.last = out
        return out

    def state(self) -> dict[str, Any]:
        """Plain data (msgpack-able): the boot capture and the counters."""
        return {"v": VERIFIER_STATE_VERSION, "nsid": self.nsid, "boot": self.boot, "checks": self.checks,
                "changes": self.changes, "errors": self.errors, "last": list(self.last)}

    @classmethod
    def restore(cls, driver: NvmeDriver, state: dict[str, Any]) -> IdentityVerifier:
        """The verifier of a migrated VM, now reading through `driver` (its driver at the destination)."""
        if state.get("v") != VERIFIER_STATE_VERSION:
            raise ValueError(f"verifier state version {state.get('v')!r} is not {VERIFIER_STATE_VERSION}")
        v = cls(driver, state["nsid"])
        v.boot = None if state["boot"] is None else {k: bytes(b) for k, b in state["boot"].items()}
        v.checks, v.changes, v.errors = state["checks"], state["changes"], state["errors"]
        v.last = list(state["last"])
        return v


__all__ = ["VERIFIER_STATE_VERSION", "IdentityVerifier", "describe_difference"]
