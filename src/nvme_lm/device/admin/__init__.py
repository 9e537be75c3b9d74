"""Admin command handlers, one module per command family (as Linux's nvmet splits them).

Each module exports `HANDLERS: dict[opcode, handler]`; this package merges them into the
dispatch table the controller uses. A new family is one import and one entry in FAMILIES.
"""

from __future__ import annotations

from nvme_lm.device.admin import (
    abort,
    cdq,
    doorbell_buffer,
    events,
    exported,
    features,
    format,
    identify,
    lba_status,
    log_pages,
    migration,
    namespaces,
    queues,
    virtualization,
)
from nvme_lm.device.request import Handler

FAMILIES = (
    abort,
    cdq,
    doorbell_buffer,
    events,
    exported,
    features,
    format,
    identify,
    lba_status,
    log_pages,
    migration,
    namespaces,
    queues,
    virtualization,
)

ADMIN_HANDLERS: dict[int, Handler] = {}
for _module in FAMILIES:
    ADMIN_HANDLERS.update(_module.HANDLERS)
