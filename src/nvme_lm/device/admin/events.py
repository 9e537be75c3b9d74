"""Asynchronous Event Request and Keep Alive (admin 0Ch, 18h).

An AER stays outstanding (DEFERRED, held in `ctrl.aers`) until the controller has an event
to report; `ctrl.deliver_events()` completes it then. The controller refuses a command whose
CID equals an outstanding AER's with Command ID Conflict (in the dispatcher, controller.py).
"""

from __future__ import annotations

from nvme_lm.device.request import DEFERRED, Handler, NvmeError, Request
from nvme_lm.spec import status as st
from nvme_lm.spec.opcodes import AdminOpcode


def async_event_request(req: Request) -> st.Status:
    ctrl = req.ctrl
    if len(ctrl.aers) > ctrl.model.aerl:  # AERL is 0's based
        raise NvmeError(st.AER_LIMIT_EXCEEDED, f"{len(ctrl.aers)} AERs already outstanding")
    ctrl.aers.append(req)
    # An event may be waiting already. Completing it here is safe: the dispatcher counts the
    # request in flight when it sees DEFERRED, and complete_deferred() has already uncounted it.
    ctrl.deliver_events()
    return DEFERRED


def keep_alive(req: Request) -> st.Status:
    """Restarts the Keep Alive Timer; with KATO 0 (disabled) there is nothing to restart."""
    req.ctrl.restart_keep_alive()
    return st.SUCCESS


HANDLERS: dict[int, Handler] = {
    AdminOpcode.ASYNC_EVENT_REQUEST: async_event_request,
    AdminOpcode.KEEP_ALIVE: keep_alive,
}
