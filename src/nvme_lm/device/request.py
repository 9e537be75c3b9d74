"""A command in flight inside the controller, and the helpers handlers use to move data.

Handlers are small functions `handler(req) -> Status`. They raise `NvmeError` to refuse a
command with a precise status; DMA faults become Data Transfer Error in the dispatcher.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from nvme_lm.device.prp import prp_views
from nvme_lm.spec import status as st
from nvme_lm.spec.commands import SQE
from nvme_lm.spec.status import Status

if TYPE_CHECKING:
    from nvme_lm.device.controller import Controller
    from nvme_lm.device.queues import SubmissionQueue


class NvmeError(Exception):
    """Refuses a command: the controller completes it with `status` (and logs PEL if given)."""

    def __init__(self, status: Status, message: str = "", pel: int = 0xFFFF) -> None:
        super().__init__(message or str(status))
        self.status = status
        self.pel = pel


class _Deferred(Status):
    """Marker: the handler completes the request later (AER, suspended work)."""


DEFERRED = _Deferred(0, 0, False)


class Request:
    __slots__ = ("buffer", "ctrl", "dw0", "dw1", "sq", "sqe")

    def __init__(self, ctrl: Controller, sq: SubmissionQueue, sqe: SQE, buffer: memoryview | None = None) -> None:
        self.ctrl = ctrl
        self.sq = sq
        self.sqe = sqe
        self.dw0 = 0
        self.dw1 = 0
        # NVMe over Fabrics: the command's data lives in a transport buffer (in-capsule or R2T data the
        # transport gathered, or the buffer it sends as C2HData), described by SGL1 instead of PRPs.
        self.buffer = buffer

    @property
    def is_admin(self) -> bool:
        return self.sq.qid == 0

    def data_views(self, length: int, to_host: bool) -> list[memoryview]:
        """The command's data buffer (PRP1/PRP2) as memoryviews; `to_host` means the device writes."""
        if self.buffer is not None:
            return self._transport_views(length)
        if self.sqe.psdt != 0:
            raise NvmeError(st.INVALID_FIELD, "SGLs are not supported")
        return prp_views(self.ctrl.fn, self.sqe.prp1, self.sqe.prp2, length, self.ctrl.page_size, to_host)

    def write_to_host(self, data: bytes | bytearray | memoryview, length: int | None = None, *,
                      buffer_length: int | None = None) -> None:
        """Copies `data` (truncated or zero-padded to `length`) into the command's buffer.

        `buffer_length` is the size of the host's buffer when only a prefix of it is transferred: PRP2
        is a list pointer or a page pointer depending on the buffer's size, not on the bytes moved."""
        n = len(data) if length is None else length
        if n == 0:
            return
        mv = memoryview(data)[:n]
        pos = 0
        for view in self.data_views(max(n, buffer_length or 0), to_host=True):
            if pos >= n:
                break
            view = view[: n - pos]
            chunk = mv[pos : pos + len(view)]
            view[: len(chunk)] = chunk
            if len(chunk) < len(view):
                view[len(chunk) :] = bytes(len(view) - len(chunk))
            pos += len(view)

    def _transport_views(self, length: int) -> list[memoryview]:
        """Fabrics data: SGLs only (PSDT 01b; PRPs are invalid), and the SGL must cover what the command
        moves (a longer one is fine: reads send the rest as zeroes, writes ignore it)."""
        if self.sqe.psdt != 1:
            raise NvmeError(st.INVALID_FIELD, "fabrics commands describe data with an SGL (PSDT 01b)", 1)
        buf = self.buffer
        assert buf is not None
        if length > len(buf):
            raise NvmeError(st.DATA_SGL_LENGTH_INVALID, f"the command moves {length} bytes, its SGL {len(buf)}")
        return [buf[:length]]

    def read_from_host(self, length: int) -> bytes:
        return b"".join(bytes(v) for v in self.data_views(length, to_host=False))


Handler = Callable[[Request], Status]


def by_select(command: str, handlers: dict[int, Handler], mask: int = 0xFF) -> Handler:
    """A handler for a command whose CDW10 select field (SEL, under `mask`) picks the operation;
    a reserved select is Invalid Field at CDW10."""

    def dispatch(req: Request) -> Status:
        sel = req.sqe.cdw10 & mask
        handler = handlers.get(sel)
        if handler is None:
            raise NvmeError(st.INVALID_FIELD, f"{command} select {sel:#x} reserved", 40)
        return handler(req)

    return dispatch
