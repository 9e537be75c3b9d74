"""NVMe over Fabrics: the NVMe/TCP transport (sans-I/O PDU codec and connection state machines).

`pdu.py` holds the wire formats, `connection.py` the shared connection machinery and the target
(controller) state machine, `host_connection.py` the host's,
`server.py` the asyncio target that carries capsules to the fabrics controllers of the device core
(device/fabrics_controller.py), `initiator.py` a small Python host for tests and benchmarks.
Formats, state machine and decisions: docs/nvme-tcp.md.
"""
