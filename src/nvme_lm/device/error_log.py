"""The controller's Error Information log (LID 01h): a ring of the newest entries."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ErrorEntry:
    error_count: int
    sqid: int
    cid: int
    status_field: int  # 15-bit status field (phase bit not included)
    param_location: int = 0xFFFF
    lba: int = 0
    nsid: int = 0


class ErrorLog:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.count = 0  # monotonic, never reset: ERRCNT of the newest entry
        self.entries: deque[ErrorEntry] = deque(maxlen=capacity)

    def record(self, sqid: int, cid: int, status_field: int, param_location: int = 0xFFFF,
               lba: int = 0, nsid: int = 0) -> ErrorEntry:
        self.count += 1
        entry = ErrorEntry(self.count, sqid, cid, status_field, param_location, lba, nsid)
        self.entries.appendleft(entry)
        return entry

    def newest_first(self) -> list[ErrorEntry]:
        return list(self.entries)
