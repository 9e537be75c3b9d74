"""Controller State layouts (spec notes §11, docs/controller-state.md): round trips and strict decoding."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from nvme_lm.spec.controller_state import (
    HEADER_SIZE,
    VENDOR_UUID,
    ControllerState,
    CqState,
    NvmeState,
    SqState,
    Tlv,
    decode_vendor,
    encode_error_log,
    encode_events,
    encode_vendor,
    supported_formats,
)

u16 = hs.integers(0, 0xFFFF)
sq_st = hs.builds(SqState, hs.integers(0, 2**64 - 1), u16, u16, u16, hs.booleans(), hs.integers(0, 3), u16, u16)
cq_st = hs.builds(CqState, hs.integers(0, 2**64 - 1), u16, u16, u16, u16, hs.booleans(), hs.booleans(),
                  hs.integers(0, 1), u16)


@given(sqs=hs.lists(sq_st, max_size=5, unique_by=lambda s: s.qid),
       cqs=hs.lists(cq_st, max_size=5, unique_by=lambda c: c.qid))
def test_nvme_state_round_trip_sorted_by_qid(sqs, cqs):
    st = NvmeState.decode(NvmeState(sqs, cqs).encode())
    assert st.sqs == sorted(sqs, key=lambda s: s.qid) and st.cqs == sorted(cqs, key=lambda c: c.qid)


def test_outer_header_and_vendor_tlvs():
    vendor = encode_vendor({
        Tlv.REGISTERS: (0x460001, 0x1F001F, 0x1000, 0x2000, 0),
        Tlv.AERS: [(7,), (9,)],
        Tlv.EVENTS: encode_events([(0, 1, 1, 0), (4, 0, 0, 3)], [2]),
        Tlv.ERROR_LOG: encode_error_log(5, [(5, 1, 2, 0x4002, 0xFFFF, 0, 1)]),
        Tlv.HELD_COMPLETIONS: [(1, 0, 0, 3, 1, 4, 0)],
    })
    blob = ControllerState(True, NvmeState().encode(), vendor).encode()
    assert len(blob) == HEADER_SIZE + 8 + len(vendor) and blob[2] == 1
    cs = ControllerState.decode(blob)
    v = decode_vendor(cs.vendor)
    assert v[Tlv.AERS] == [(7,), (9,)] and v[Tlv.EVENTS] == ([(0, 1, 1, 0), (4, 0, 0, 3)], [2])
    assert v[Tlv.ERROR_LOG] == (5, [(5, 1, 2, 0x4002, 0xFFFF, 0, 1)])
    assert v[Tlv.HELD_COMPLETIONS] == [(1, 0, 0, 3, 1, 4, 0)]
    for bad in (blob[:-4], blob + bytes(4), b"\x01" + blob[1:], blob[:3] + b"\x01" + blob[4:]):
        with pytest.raises(ValueError):
            ControllerState.decode(bad)
    with pytest.raises(ValueError):
        decode_vendor(b"XXXX" + vendor[4:])
    with pytest.raises(ValueError):
        decode_vendor(vendor[:8] + b"\x63\x00\x00\x00" + vendor[12:])  # unknown TLV type


def test_supported_formats_cns_20h():
    data = supported_formats()
    assert data[:4] == bytes([1, 1, 0, 0]) and data[4:20] == VENDOR_UUID.bytes and len(data) == 20
