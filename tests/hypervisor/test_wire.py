"""Hypercall frames: golden bytes, gcc's view of pvio's own structs, and fuzzing."""

from __future__ import annotations

import errno
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cprobe import build, run
from pvio.abi import grant_table as gt
from pvio.hypervisor import wire
from pvio.hypervisor.client_core import HypercallProtocol
from pvio.hypervisor.core import Hypervisor
from pvio.hypervisor.errors import ProtocolError
from pvio.hypervisor.platform import OsPlatform
from pvio.hypervisor.session import Session, createdomain_op
from pvio.hypervisor.wire import Op

PVIO_LAYOUTS = [
    wire.PVIO_HC_FRAME,
    wire.PVIO_HC_OP,
    wire.PVIO_CREATEDOMAIN,
    wire.PVIO_MEMORY_FD,
    wire.PVIO_SHAREABLE,
    wire.PVIO_PAGE_FD,
    wire.PVIO_LHCALL,
    wire.PVIO_LGUEST_REGION,
    wire.PVIO_LGUEST_FRAMES,
    wire.PVIO_PUSH_PORT,
    wire.PVIO_PUSH_IRQ,
    wire.PVIO_PUSH_DOMAIN,
    wire.PVIO_DOMAININFO,
]


def test_pvio_structs_match_gcc(tmp_path: Path) -> None:
    lines = []
    for lay in PVIO_LAYOUTS:
        lines.append(f'printf("{lay.name} size %zu\\n", sizeof({lay.c_type}));')
        for f in lay.named_fields():
            lines.append(f'printf("{lay.name}.{f.name} %zu\\n", offsetof({lay.c_type}, {f.name}));')
    src = "#include <stdio.h>\n#include <stddef.h>\n#include <stdint.h>\n" + wire.C_PROLOGUE
    src += "int main(void) {\n" + "\n".join(lines) + "\nreturn 0; }\n"
    out = run(build(src, tmp_path, "wire_probe")).splitlines()
    expected = []
    for lay in PVIO_LAYOUTS:
        expected.append(f"{lay.name} size {lay.size}")
        expected.extend(f"{lay.name}.{f.name} {f.offset}" for f in lay.named_fields())
    assert out == expected


def test_golden_frame() -> None:
    op = Op(wire.HYPERVISOR_event_channel_op, 4, 1, struct.pack("<I", 7))
    data = wire.encode_frame(wire.FRAME_REQUEST, 9, [op])
    assert data == (
        struct.pack("<IIIHH", 0x43485650, 16 + 16 + 4, 9, 1, 1)
        + struct.pack("<HHIIhH", 32, 4, 1, 4, 0, 0)
        + struct.pack("<I", 7)
    )
    frame = wire.decode_frame(data)
    assert frame.kind == wire.FRAME_REQUEST and frame.seq == 9
    assert frame.ops == [Op(32, 4, 1, struct.pack("<I", 7))]


@pytest.mark.parametrize(
    ("mangle", "reason"),
    [
        (lambda b: b[:10], "short"),
        (lambda b: b"XXXX" + b[4:], "magic"),
        (lambda b: b[:4] + struct.pack("<I", 999) + b[8:], "length"),
        (lambda b: b[:12] + struct.pack("<H", 77) + b[14:], "kind"),
        (lambda b: b[:14] + struct.pack("<H", 2) + b[16:], "past the frame"),
        (lambda b: b[:24] + struct.pack("<I", 400) + b[28:], "past the frame"),
    ],
)
def test_malformed_frames(mangle: object, reason: str) -> None:
    data = wire.encode_frame(wire.FRAME_REQUEST, 1, [Op(32, 4, 1, b"\0" * 4)])
    with pytest.raises(ProtocolError, match=reason):
        wire.decode_frame(mangle(data))  # type: ignore[operator]


def test_oversized_frame_is_refused() -> None:
    with pytest.raises(ValueError):
        wire.encode_frame(wire.FRAME_REQUEST, 1, [Op(32, 4, 1, b"\0" * wire.MAX_FRAME)])
    big = struct.pack("<IIIHH", wire.PVIO_HC_MAGIC, wire.MAX_FRAME + 16, 1, 1, 0) + bytes(wire.MAX_FRAME)
    with pytest.raises(ProtocolError) as info:
        wire.decode_frame(big)
    assert info.value.rc == -errno.E2BIG


_ops = st.builds(
    Op,
    hypercall=st.integers(0, 0xFFFF),
    cmd=st.integers(0, 0xFFFF),
    count=st.integers(0, 0xFFFFFFFF),
    args=st.binary(max_size=64),
    rc=st.integers(-0x8000, 0x7FFF),
    nr_fds=st.integers(0, 0xFFFF),
)


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from([1, 2, 3, 4]), seq=st.integers(0, 0xFFFFFFFF), ops=st.lists(_ops, max_size=8))
def test_round_trip(kind: int, seq: int, ops: list[Op]) -> None:
    frame = wire.decode_frame(wire.encode_frame(kind, seq, ops))
    assert (frame.kind, frame.seq, frame.ops) == (kind, seq, ops)


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=256))
def test_decode_garbage_never_crashes(data: bytes) -> None:
    try:
        wire.decode_frame(data)
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(prefix_ops=st.lists(_ops, max_size=4), cut=st.integers(0, 200), flip=st.integers(0, 255))
def test_decode_mutated_frames(prefix_ops: list[Op], cut: int, flip: int) -> None:
    data = bytearray(wire.encode_frame(wire.FRAME_REQUEST, 5, prefix_ops))
    if cut < len(data):
        data[cut] ^= flip
    try:
        frame = wire.decode_frame(bytes(data))
    except ProtocolError:
        return
    assert sum(16 + len(op.args) for op in frame.ops) + 16 == len(data)


@pytest.fixture(scope="module")
def session_hv() -> Hypervisor:
    return Hypervisor(OsPlatform(), lambda fd: fd)


_grant_cmds = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 99])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    ops=st.lists(
        st.builds(
            Op,
            hypercall=st.sampled_from([20, 32, 0x7000, 0x7001, 5]),
            cmd=st.integers(0, 14),
            count=st.integers(0, 3),
            args=st.binary(max_size=120),
        ),
        max_size=6,
    )
)
def test_session_survives_random_ops(ops: list[Op]) -> None:
    """Any batch of well-framed ops with arbitrary arguments: replies, never a crash."""
    platform = OsPlatform()
    hv = Hypervisor(platform, lambda fd: fd)
    session = Session(hv)
    proto = HypercallProtocol()
    _, data = proto.request([createdomain_op("fuzz", 16, 2, "map", None)])
    reply, fds = session.handle(data)
    peer = Session(hv)
    peer.handle(proto.request([createdomain_op("peer", 16, 2, "map", None)])[1])
    _, data = proto.request(ops)
    reply, fds = session.handle(data)
    frame = wire.decode_frame(reply)
    assert frame.kind == wire.FRAME_REPLY and len(frame.ops) == len(ops)
    session.close()
    peer.close()
    assert hv.is_empty()
    assert platform.open_fds() == 0
    del fds


def test_session_rejects_garbage_and_keeps_going() -> None:
    platform = OsPlatform()
    hv = Hypervisor(platform, lambda fd: fd)
    session = Session(hv)
    reply, _ = session.handle(b"garbage that is not a frame")
    assert wire.decode_frame(reply).kind == wire.FRAME_ERROR
    proto = HypercallProtocol()
    reply, fds = session.handle(proto.request([createdomain_op("ok", 4, 1, "map", None)])[1])
    frame = wire.decode_frame(reply)
    assert frame.kind == wire.FRAME_REPLY and frame.ops[0].rc == 0 and len(fds) == 2
    # A second createdomain on the same connection is refused.
    reply, _ = session.handle(proto.request([createdomain_op("again", 4, 1, "map", None)])[1])
    assert wire.decode_frame(reply).ops[0].rc == -errno.EINVAL
    # Ops before createdomain on a fresh connection: -ESRCH.
    fresh = Session(hv)
    q = Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_query_size, 1, gt.GNTTAB_QUERY_SIZE.pack(dom=gt.DOMID_SELF))
    reply, _ = fresh.handle(proto.request([q])[1])
    assert wire.decode_frame(reply).ops[0].rc == -errno.ESRCH
    session.close()
    assert hv.is_empty()


@settings(max_examples=200, deadline=None)
@given(
    kind=st.sampled_from([1, 2, 3, 4, 9]),
    seq=st.sampled_from([0, 1, 2, 77]),
    ops=st.lists(_ops, max_size=5),
    nfds=st.integers(0, 6),
)
def test_client_protocol_never_misplaces_fds(kind: int, seq: int, ops: list[Op], nfds: int) -> None:
    """A hostile hypervisor's frames: each fd goes to exactly one op, or back to be closed."""
    proto = HypercallProtocol()
    proto.request([])  # seq 1 is pending
    fds = list(range(100, 100 + nfds))
    try:
        data = wire.encode_frame(kind, seq, ops)
    except ValueError:
        return
    try:
        received = proto.receive(data, fds)
    except ProtocolError:
        return
    given_out = [fd for op in received.frame.ops for fd in op.fds]
    assert sorted(given_out + received.stray_fds) == fds
    assert not (given_out and received.stray_fds)


def _dup_session() -> tuple[OsPlatform, Hypervisor, Session, HypercallProtocol]:
    platform = OsPlatform()
    hv = Hypervisor(platform, os.dup)
    session = Session(hv)
    proto = HypercallProtocol()
    reply, fds = session.handle(proto.request([createdomain_op("big", 16, 1024, "map", None)])[1])
    assert wire.decode_frame(reply).ops[0].rc == 0
    for fd in fds:
        platform.close_fd(fd)
    return platform, hv, session, proto


def test_reply_too_large_for_a_frame_is_an_error_frame() -> None:
    """setup_table answers 8 bytes a frame: 20 of 1024 frames would make a 160 KiB reply."""
    platform, hv, session, proto = _dup_session()
    args = gt.GNTTAB_SETUP_TABLE.pack(dom=gt.DOMID_SELF, nr_frames=1024)
    op = Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_setup_table, 1, args)
    reply, fds = session.handle(proto.request([op] * 20)[1])  # raised ValueError before
    frame = wire.decode_frame(reply)
    assert frame.kind == wire.FRAME_ERROR and frame.ops[0].rc == -errno.E2BIG and fds == []
    session.close()
    assert hv.is_empty() and platform.open_fds() == 0


def test_reply_with_too_many_descriptors_is_refused() -> None:
    """More descriptors than one frame may carry (MAX_FDS) are never handed out, nor kept."""
    base = len(os.listdir("/proc/self/fd"))
    platform, hv, session, proto = _dup_session()
    one = Op(wire.PVIO_HYPERVISOR_domctl, wire.PVIO_DOMCTL_alloc_shareable, 1, wire.PVIO_SHAREABLE.pack(nr_frames=256))
    reply, fds = session.handle(proto.request([one])[1])
    assert wire.decode_frame(reply).ops[0].rc == -errno.ENOSPC and fds == []
    half = Op(wire.PVIO_HYPERVISOR_domctl, wire.PVIO_DOMCTL_alloc_shareable, 1, wire.PVIO_SHAREABLE.pack(nr_frames=128))
    reply, fds = session.handle(proto.request([half, half])[1])
    frame = wire.decode_frame(reply)
    assert frame.kind == wire.FRAME_ERROR and frame.ops[0].rc == -errno.E2BIG and fds == []
    session.close()
    assert hv.is_empty() and platform.open_fds() == 0
    # The duplicates made for the reply that could not be sent were closed.
    assert len(os.listdir("/proc/self/fd")) == base
