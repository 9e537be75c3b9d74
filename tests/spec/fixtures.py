"""Access to the QEMU 7.2 / nvme-cli 2.3 reference fixtures, and the field-by-field comparison helper."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

# The repo root is parents[2]; shared/ sits beside the repo (also in CI, where the repo is cloned elsewhere).
FIXTURES = Path(__file__).resolve().parents[2] / ".." / "shared" / "fixtures" / "qemu-7.2-nvme"

requires_fixtures = pytest.mark.skipif(
    not FIXTURES.is_dir(),
    reason=f"reference fixtures not found at {FIXTURES} (a copy of shared/ must sit beside the repo)",
)


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def fixture_json(name: str) -> Any:
    return json.loads((FIXTURES / name).read_text())


def fixture_text(name: str) -> str:
    return (FIXTURES / name).read_text()


# How to get nvme-cli's value for one printed key from our decoded object: an attribute name, or a
# function rendering our value the way nvme-cli prints it.
FieldTable = Mapping[str, str | Callable[[Any], Any]]


def render(ours: Any, table: FieldTable) -> dict[str, Any]:
    """Our object rendered under nvme-cli's key names, per ``table``."""
    return {k: getattr(ours, how) if isinstance(how, str) else how(ours) for k, how in table.items()}


def assert_matches(printed: Mapping[str, Any], ours: Any, table: FieldTable, skipped: Mapping[str, str],
                   where: str) -> None:
    """Every key nvme-cli printed is either mapped (and equal) or explicitly skipped with a reason."""
    assert not set(table) & set(skipped), f"{where}: keys both mapped and skipped"
    unaccounted = set(printed) - set(table) - set(skipped)
    assert not unaccounted, f"{where}: nvme-cli printed fields with no mapping and no skip reason: {unaccounted}"
    for key, value in printed.items():
        if key in skipped:
            continue
        how = table[key]
        got = getattr(ours, how) if isinstance(how, str) else how(ours)
        assert got == value, f"{where}.{key}: ours {got!r} != nvme-cli {value!r}"
