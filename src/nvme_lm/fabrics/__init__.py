"""NVMe over Fabrics: the NVMe/TCP transport (sans-I/O PDU codec and connection state machines).

`pdu.py` holds the wire formats, `connection.py` the target (controller) and host state machines.
Formats, state machine and decisions: docs/nvme-tcp.md.
"""
