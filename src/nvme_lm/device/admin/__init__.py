"""Admin command handlers, one module per command family (as Linux's nvmet splits them).

Each module exports `HANDLERS: dict[opcode, handler]`; this package merges them into the
dispatch table the controller uses. A new family is one name in _FAMILY_NAMES.
"""

from __future__ import annotations

import importlib

from nvme_lm.device.request import Handler

_FAMILY_NAMES = (
    "abort", "cdq", "doorbell_buffer", "events", "exported", "features", "format", "identify", "lba_status",
    "log_pages", "migration", "namespaces", "queues", "virtualization",
)
FAMILIES = tuple(importlib.import_module(f"{__name__}.{name}") for name in _FAMILY_NAMES)

ADMIN_HANDLERS: dict[int, Handler] = {}
for _module in FAMILIES:
    ADMIN_HANDLERS.update(_module.HANDLERS)
