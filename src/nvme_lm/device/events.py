"""Asynchronous events: outstanding AER commands, pending events, and per-log masking.

Once an event has been reported, further events of the same type stay pending until the
host reads the associated log page without RAE, as NVMe Base §5.2.2 requires.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import IntEnum

from nvme_lm.spec.status import SUCCESS


class AsyncEventType(IntEnum):
    ERROR = 0
    SMART = 1
    NOTICE = 2
    IMMEDIATE = 3
    ONE_SHOT = 4
    IO_COMMAND_SET = 6
    VENDOR = 7


class ErrorEventInfo(IntEnum):
    INVALID_DOORBELL_REGISTER = 0x00
    INVALID_DOORBELL_VALUE = 0x01
    DIAGNOSTIC_FAILURE = 0x02
    PERSISTENT_INTERNAL_ERROR = 0x03
    TRANSIENT_INTERNAL_ERROR = 0x04


class NoticeInfo(IntEnum):
    NAMESPACE_ATTRIBUTE_CHANGED = 0x00
    FIRMWARE_ACTIVATION_STARTING = 0x01


@dataclass(frozen=True, slots=True)
class AsyncEvent:
    type: int
    info: int
    log_page: int
    dw1: int = 0  # CQE DW1 of the AER completion (one-shot CDQ events carry the CDQID, TP4159)

    @property
    def dw0(self) -> int:
        return (self.type & 0x7) | (self.info & 0xFF) << 8 | (self.log_page & 0xFF) << 16


class EventQueue:
    """Events waiting for an AER, masked per associated log page until the host reads it."""

    def __init__(self) -> None:
        self.pending: deque[AsyncEvent] = deque()
        self.masked_logs: set[int] = set()

    def add(self, event: AsyncEvent) -> None:
        if event not in self.pending:
            self.pending.append(event)

    def next_reportable(self) -> AsyncEvent | None:
        for ev in self.pending:
            if ev.type == AsyncEventType.ONE_SHOT:  # no associated log page: never masked
                self.pending.remove(ev)
                return ev
            if ev.log_page not in self.masked_logs:
                self.pending.remove(ev)
                self.masked_logs.add(ev.log_page)
                return ev
        return None

    def log_page_read(self, log_page: int) -> None:
        """The host read `log_page` with RAE=0: events reported through it may be sent again."""
        self.masked_logs.discard(log_page)

    def clear(self) -> None:
        self.pending.clear()
        self.masked_logs.clear()


class EventDelivery:
    """Posting and delivering asynchronous events, for any controller (PCIe or fabrics) that has
    `features`, `_lock`, `events` (EventQueue), `aers` (outstanding AER requests) and
    `complete_deferred(req, status)`."""

    def post_event(self, event: AsyncEvent) -> None:
        if not self.features.async_event_enabled(event.type, event.info):  # type: ignore[attr-defined]
            return  # masked by Asynchronous Event Configuration (FID 0Bh)
        with self._lock:  # type: ignore[attr-defined]
            self.events.add(event)  # type: ignore[attr-defined]
            self.deliver_events()

    def deliver_events(self) -> None:
        while self.aers:  # type: ignore[attr-defined]
            ev = self.events.next_reportable()  # type: ignore[attr-defined]
            if ev is None:
                return
            req = self.aers.popleft()  # type: ignore[attr-defined]
            req.dw0, req.dw1 = ev.dw0, ev.dw1
            self.complete_deferred(req, SUCCESS)  # type: ignore[attr-defined]
