"""The xs_wire codec: golden packets (from the probe log of real clients) fed in every
chunking, framing limits, argument parsing, and fuzzing of the frame parser."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvio.abi.xs_wire import XENSTORE_PAYLOAD_MAX
from pvio.abi.xs_wire import XsdSockmsgType as T
from pvio.xenstore.errors import ProtocolViolation, XsError
from pvio.xenstore.wire import (
    NEED_DATA,
    FrameDecoder,
    Packet,
    encode,
    join_args,
    one_arg,
    split_args,
)

# Exactly what xenstore-write /test/a 1 /test/b/c "hello world" sent (probe log, c1).
GOLDEN_STREAM = (
    bytes.fromhex("06000000" "00000000" "00000000" "01000000") + b"\0"
    + bytes.fromhex("0b000000" "00000000" "01000000" "09000000") + b"/test/a\x001"
    + bytes.fromhex("0b000000" "00000000" "01000000" "15000000") + b"/test/b/c\x00hello world"
    + bytes.fromhex("07000000" "00000000" "01000000" "02000000") + b"T\0"
)
GOLDEN_PACKETS = [
    Packet(T.XS_TRANSACTION_START, 0, 0, b"\0"),
    Packet(T.XS_WRITE, 0, 1, b"/test/a\x001"),
    Packet(T.XS_WRITE, 0, 1, b"/test/b/c\x00hello world"),
    Packet(T.XS_TRANSACTION_END, 0, 1, b"T\0"),
]


def test_golden_encode() -> None:
    assert b"".join(p.encode() for p in GOLDEN_PACKETS) == GOLDEN_STREAM
    assert encode(T.XS_READ, b"/a\0", req_id=3, tx_id=4) == struct.pack("<4I", 2, 3, 4, 3) + b"/a\0"


def _decode_in_chunks(data: bytes, cuts: list[int]) -> list[Packet]:
    dec = FrameDecoder()
    out: list[Packet] = []
    prev = 0
    for cut in [*cuts, len(data)]:
        dec.feed(data[prev:cut])
        prev = cut
        out.extend(dec.packets())
    assert dec.next_packet() is NEED_DATA
    return out


def test_golden_every_single_split() -> None:
    for cut in range(len(GOLDEN_STREAM) + 1):
        assert _decode_in_chunks(GOLDEN_STREAM, [cut]) == GOLDEN_PACKETS


def test_golden_every_two_splits() -> None:
    n = len(GOLDEN_STREAM)
    for a in range(0, n + 1, 3):
        for b in range(a, n + 1):
            assert _decode_in_chunks(GOLDEN_STREAM, [a, b]) == GOLDEN_PACKETS


def test_golden_byte_by_byte() -> None:
    assert _decode_in_chunks(GOLDEN_STREAM, list(range(len(GOLDEN_STREAM)))) == GOLDEN_PACKETS


def test_need_data_is_a_value() -> None:
    dec = FrameDecoder()
    assert dec.next_packet() is NEED_DATA
    dec.feed(GOLDEN_STREAM[:10])
    assert dec.next_packet() is NEED_DATA
    assert dec.buffered == 10


def test_payload_limit_is_inclusive() -> None:
    dec = FrameDecoder()
    dec.feed(encode(T.XS_WRITE, b"x" * XENSTORE_PAYLOAD_MAX))
    p = dec.next_packet()
    assert isinstance(p, Packet) and len(p.payload) == XENSTORE_PAYLOAD_MAX


@pytest.mark.parametrize("length", [XENSTORE_PAYLOAD_MAX + 1, 1 << 31, 0xFFFFFFFF])
def test_over_limit_length_is_a_violation_before_the_payload_arrives(length: int) -> None:
    dec = FrameDecoder()
    dec.feed(struct.pack("<4I", T.XS_WRITE, 0, 0, length))
    with pytest.raises(ProtocolViolation) as e:
        dec.next_packet()
    assert e.value.field == "len"


def test_one_arg_rules() -> None:
    assert one_arg(b"/a\0") == b"/a"
    for bad in (b"", b"/a", b"/a\0b\0", b"\0/a\0", b"/a\0\0"):
        with pytest.raises(XsError) as e:
            one_arg(bad)
        assert e.value.errno == "EINVAL"


def test_split_args_ignores_trailing_bytes() -> None:
    assert split_args(b"a\0b\0junk") == [b"a", b"b"]
    assert split_args(b"") == []
    assert join_args("a", b"b") == b"a\0b\0"


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 30), st.integers(0, 2**32 - 1),
                          st.integers(0, 2**32 - 1), st.binary(max_size=300)), max_size=6),
       st.lists(st.integers(0, 2000), max_size=8))
def test_roundtrip_any_chunking(msgs: list[tuple[int, int, int, bytes]], cuts: list[int]) -> None:
    packets = [Packet(*m) for m in msgs]
    data = b"".join(p.encode() for p in packets)
    cuts = sorted(min(c, len(data)) for c in cuts)
    assert _decode_in_chunks(data, cuts) == packets


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 64))
def test_fuzz_decoder_never_crashes(data: bytes, step: int) -> None:
    dec = FrameDecoder()
    try:
        for i in range(0, len(data), step):
            dec.feed(data[i : i + step])
            for p in dec.packets():
                assert len(p.payload) <= XENSTORE_PAYLOAD_MAX
    except ProtocolViolation:
        pass
