"""Room for the device's own metadata when the host filesystem is full.

A real SSD keeps its metadata (namespaces, attachments, exported subsystems, SR-IOV allocation) in an area
user data cannot take. The emulator keeps it in small files next to the namespace images, on the same host
filesystem; when user data fills that filesystem, a management command (a detach, a delete) would change
its in-memory state and then fail to save it, leaving the device half changed. So every data directory
holds a reserve file taken at power-on, and a metadata write that meets ENOSPC gives the reserve back,
writes, and takes back what it can. (Found by issue 6's fault matrix, destination out of space.)
"""

from __future__ import annotations

import contextlib
import errno
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

RESERVE_NAME = ".metadata-reserve"
RESERVE_BYTES = 1 << 20  # far more than every metadata file of a device together
T = TypeVar("T")


def ensure_reserve(directory: Path) -> None:
    """Takes the reserve in `directory` (best effort: on a full filesystem it takes what there is)."""
    path = Path(directory) / RESERVE_NAME
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_blocks * 512 < RESERVE_BYTES:
                os.posix_fallocate(fd, 0, RESERVE_BYTES)
        finally:
            os.close(fd)


def with_reserve(directory: Path, write: Callable[[], T]) -> T:
    """Runs `write` (a metadata file write); if the filesystem is full, once more after giving the reserve back."""
    try:
        return write()
    except OSError as e:
        reserve = Path(directory) / RESERVE_NAME
        if e.errno != errno.ENOSPC or not reserve.exists():
            raise
    reserve.unlink()
    try:
        return write()
    finally:
        ensure_reserve(directory)
