"""Admin command handlers, one module per command family (as Linux's nvmet splits them).

Each module exports `HANDLERS: dict[opcode, handler]`; this package merges them into the
dispatch table the controller uses.
"""

from __future__ import annotations

from nvme_lm.device.admin import features, identify, log_pages, queues
from nvme_lm.device.request import Handler

ADMIN_HANDLERS: dict[int, Handler] = {}
for _module in (features, identify, log_pages, queues):
    ADMIN_HANDLERS.update(_module.HANDLERS)
