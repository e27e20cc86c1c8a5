"""The sans-IO NBD server: handshake table, validation table, chunking, hostile input."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbd.helpers import (
    client_flags,
    go_data,
    option,
    parse_option_replies,
    parse_simple_replies,
    request,
)
from pvio.abi.fault import Fault
from pvio.nbd import wire as w
from pvio.nbd.events import (
    Command,
    CommandRejected,
    Disconnect,
    Export,
    ExportChosen,
    LocalProtocolError,
    OptionRejected,
)
from pvio.nbd.server import NbdServerConnection, State
from pvio.storage.backend import BackendInfo
from pvio.storage.buffers import BufferPool, size_class

SIZE = 1 << 20
RW = Export("disk", BackendInfo(size=SIZE, can_trim=True, can_write_zeroes=True), "a disk")
RO = Export("ro", BackendInfo(size=SIZE, read_only=True))
ALIGNED = Export("aligned", BackendInfo(size=SIZE, min_block=512, max_block=65536))
EXPORTS = {e.name: e for e in (RW, RO, ALIGNED)}


def new_conn() -> NbdServerConnection:
    conn = NbdServerConnection(EXPORTS, default_export="disk")
    greeting = conn.data_to_send()
    assert greeting == b"NBDMAGICIHAVEOPT\x00\x03"
    return conn


def connected(name: str = "disk") -> NbdServerConnection:
    conn = new_conn()
    events = conn.receive_data(client_flags() + option(w.NBD_OPT_GO, go_data(name)))
    assert [type(e) for e in events] == [ExportChosen]
    conn.data_to_send()
    return conn


# --- handshake ---------------------------------------------------------------------------


def test_go_replies_info_export_block_size_then_ack() -> None:
    conn = new_conn()
    events = conn.receive_data(
        client_flags() + option(w.NBD_OPT_GO, go_data("disk", (w.NBD_INFO_NAME, w.NBD_INFO_DESCRIPTION)))
    )
    assert events == [ExportChosen(RW, w.NBD_OPT_GO)]
    replies = parse_option_replies(conn.data_to_send())
    assert [r.reply for r in replies] == [w.NBD_REP_INFO] * 4 + [w.NBD_REP_ACK]
    export = w.INFO_EXPORT.unpack(replies[0].data)
    assert export["exportsize"] == SIZE
    flags = export["eflags"]
    assert flags == (
        w.NBD_FLAG_HAS_FLAGS
        | w.NBD_FLAG_SEND_FLUSH
        | w.NBD_FLAG_SEND_FUA
        | w.NBD_FLAG_SEND_TRIM
        | w.NBD_FLAG_SEND_WRITE_ZEROES
        | w.NBD_FLAG_CAN_MULTI_CONN
    )
    bs = w.INFO_BLOCK_SIZE.unpack(replies[1].data)
    assert (bs["minimum"], bs["preferred"], bs["maximum"]) == (1, 4096, 1 << 25)
    assert replies[2].data == b"\x00\x01disk"
    assert replies[3].data == b"\x00\x02a disk"
    assert conn.state is State.TRANSMISSION


def test_read_only_export_advertises_read_only_and_no_writes() -> None:
    conn = new_conn()
    conn.receive_data(client_flags() + option(w.NBD_OPT_GO, go_data("ro")))
    flags = w.INFO_EXPORT.unpack(parse_option_replies(conn.data_to_send())[0].data)["eflags"]
    assert flags & w.NBD_FLAG_READ_ONLY
    assert not flags & (w.NBD_FLAG_SEND_FUA | w.NBD_FLAG_SEND_TRIM | w.NBD_FLAG_SEND_WRITE_ZEROES)


def test_empty_name_is_the_default_export() -> None:
    conn = new_conn()
    events = conn.receive_data(client_flags() + option(w.NBD_OPT_GO, go_data("")))
    assert events == [ExportChosen(RW, w.NBD_OPT_GO)]


def test_info_does_not_end_the_handshake_and_unknown_names_are_errors() -> None:
    conn = new_conn()
    events = conn.receive_data(
        client_flags()
        + option(w.NBD_OPT_INFO, go_data("ro"))
        + option(w.NBD_OPT_GO, go_data("nope"))
        + option(w.NBD_OPT_STRUCTURED_REPLY)
        + option(w.NBD_OPT_STARTTLS)
        + option(99, b"whatever")
    )
    replies = parse_option_replies(conn.data_to_send())
    assert [r.reply for r in replies] == [
        w.NBD_REP_INFO,
        w.NBD_REP_INFO,
        w.NBD_REP_ACK,
        w.NBD_REP_ERR_UNKNOWN,
        w.NBD_REP_ERR_UNSUP,
        w.NBD_REP_ERR_UNSUP,
        w.NBD_REP_ERR_UNSUP,
    ]
    assert [r.option for r in replies[-3:]] == [w.NBD_OPT_STRUCTURED_REPLY, w.NBD_OPT_STARTTLS, 99]
    assert all(isinstance(e, OptionRejected) for e in events) and len(events) == 4
    assert conn.state is State.OPTIONS


def test_list_names_every_export_then_acks() -> None:
    conn = new_conn()
    conn.receive_data(client_flags() + option(w.NBD_OPT_LIST) + option(w.NBD_OPT_LIST, b"x"))
    replies = parse_option_replies(conn.data_to_send())
    assert [r.reply for r in replies] == [w.NBD_REP_SERVER] * 3 + [w.NBD_REP_ACK, w.NBD_REP_ERR_INVALID]
    assert replies[0].data == b"\x00\x00\x00\x04diska disk"
    assert replies[1].data == b"\x00\x00\x00\x02ro"


def test_abort_is_acked_then_disconnects() -> None:
    conn = new_conn()
    events = conn.receive_data(client_flags() + option(w.NBD_OPT_ABORT) + b"ignored")
    assert [r.reply for r in parse_option_replies(conn.data_to_send())] == [w.NBD_REP_ACK]
    assert isinstance(events[-1], Disconnect) and events[-1].error is None


def test_export_name_old_style_go_with_and_without_zeroes() -> None:
    for cflags, zeroes in ((w.NBD_FLAG_C_FIXED_NEWSTYLE, 124), (w.NBD_FLAG_C_FIXED_NEWSTYLE | 2, 0)):
        conn = new_conn()
        events = conn.receive_data(client_flags(cflags) + option(w.NBD_OPT_EXPORT_NAME, b"ro"))
        assert events == [ExportChosen(RO, w.NBD_OPT_EXPORT_NAME)]
        out = conn.data_to_send()
        assert len(out) == 10 + zeroes and out[10:] == bytes(zeroes)
        assert w.NEW_HANDSHAKE_FINISH.unpack(out)["exportsize"] == SIZE


def test_export_name_unknown_terminates() -> None:
    conn = new_conn()
    events = conn.receive_data(client_flags() + option(w.NBD_OPT_EXPORT_NAME, b"nope"))
    assert isinstance(events[0], Disconnect) and events[0].error is not None
    assert conn.data_to_send() == b""


def test_unknown_client_flags_drop_the_connection() -> None:
    conn = new_conn()
    events = conn.receive_data(client_flags(0x4 | 1))
    assert isinstance(events[0], Disconnect)
    assert events[0].error is not None and events[0].error.fault is Fault.REMOTE
    assert conn.receive_data(option(w.NBD_OPT_LIST)) == []


def test_aligned_export_requires_block_size_request() -> None:
    conn = new_conn()
    conn.receive_data(client_flags() + option(w.NBD_OPT_GO, go_data("aligned", ())))
    assert [r.reply for r in parse_option_replies(conn.data_to_send())] == [w.NBD_REP_ERR_BLOCK_SIZE_REQD]
    events = conn.receive_data(option(w.NBD_OPT_GO, go_data("aligned")))
    assert events == [ExportChosen(ALIGNED, w.NBD_OPT_GO)]


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00\x00", b"\x00\x00\x00\x09disk\x00\x00", b"\x00\x00\x00\x04disk\x00\x02\x00\x03", b"\x00\x00\x00\x02\xff\xfe\x00\x00"],
)
def test_malformed_go_data_is_err_invalid(data: bytes) -> None:
    conn = new_conn()
    conn.receive_data(client_flags() + option(w.NBD_OPT_GO, data))
    assert [r.reply for r in parse_option_replies(conn.data_to_send())] == [w.NBD_REP_ERR_INVALID]
    assert conn.state is State.OPTIONS


def test_huge_option_is_streamed_past_and_err_too_big() -> None:
    conn = new_conn()
    n = 1 << 20
    conn.receive_data(client_flags() + w.NEW_OPTION.pack(version=w.IHAVEOPT, option=w.NBD_OPT_GO, optlen=n))
    for _ in range(n // 65536 - 1):
        assert conn.receive_data(bytes(65536)) == []
    assert conn.data_to_send() == b""
    (rejected,) = conn.receive_data(bytes(65536))
    assert isinstance(rejected, OptionRejected) and rejected.error.field == "optlen"
    assert [r.reply for r in parse_option_replies(conn.data_to_send())] == [w.NBD_REP_ERR_TOO_BIG]
    assert conn.receive_data(option(w.NBD_OPT_GO, go_data("disk")))[-1] == ExportChosen(RW, w.NBD_OPT_GO)


def test_bad_option_magic_is_a_violation() -> None:
    conn = new_conn()
    events = conn.receive_data(client_flags() + b"IHAVEOPX" + bytes(8))
    assert isinstance(events[0], Disconnect) and events[0].error is not None


def test_shutdown_refuses_options() -> None:
    conn = new_conn()
    conn.start_shutdown()
    conn.receive_data(client_flags() + option(w.NBD_OPT_GO, go_data("disk")))
    assert [r.reply for r in parse_option_replies(conn.data_to_send())] == [w.NBD_REP_ERR_SHUTDOWN]


def test_handshake_in_every_chunking() -> None:
    """Feeding the same bytes one at a time, or in any split, gives the same answers."""
    stream = client_flags() + option(w.NBD_OPT_LIST) + option(w.NBD_OPT_GO, go_data("disk"))
    stream += request(w.NBD_CMD_WRITE, 0, 8, cookie=5) + b"abcdefgh" + request(w.NBD_CMD_FLUSH, cookie=6)
    whole = new_conn()
    expect = whole.receive_data(stream)
    expect_out = whole.data_to_send()
    for split in range(1, len(stream)):
        conn = new_conn()
        events = conn.receive_data(stream[:split]) + conn.receive_data(stream[split:])
        assert [type(e) for e in events] == [type(e) for e in expect]
        assert conn.data_to_send() == expect_out
    conn = new_conn()
    events = []
    for i in range(len(stream)):
        events += conn.receive_data(stream[i : i + 1])
    assert [(type(e), getattr(e, "data", None)) for e in events] == [
        (type(e), getattr(e, "data", None)) for e in expect
    ]


# --- transmission -------------------------------------------------------------------------


def test_commands_come_out_validated_with_payload() -> None:
    conn = connected()
    events = conn.receive_data(
        request(w.NBD_CMD_READ, 100, 50, cookie=1)
        + request(w.NBD_CMD_WRITE, 4096, 4, cookie=2, flags=w.NBD_CMD_FLAG_FUA)
        + b"data"
        + request(w.NBD_CMD_FLUSH, cookie=3)
        + request(w.NBD_CMD_TRIM, 0, 4096, cookie=4)
        + request(w.NBD_CMD_WRITE_ZEROES, 0, SIZE, cookie=5, flags=w.NBD_CMD_FLAG_NO_HOLE)
    )
    assert all(isinstance(e, Command) for e in events)
    cmds = [e for e in events if isinstance(e, Command)]
    assert [(c.cookie, c.type, c.offset, c.length) for c in cmds] == [
        (1, w.NBD_CMD_READ, 100, 50),
        (2, w.NBD_CMD_WRITE, 4096, 4),
        (3, w.NBD_CMD_FLUSH, 0, 0),
        (4, w.NBD_CMD_TRIM, 0, 4096),
        (5, w.NBD_CMD_WRITE_ZEROES, 0, SIZE),
    ]
    assert cmds[1].data == b"data" and cmds[1].fua
    assert conn.in_flight == 5
    # Replies in any order; a read's data follows its header.
    assert conn.reply(cmds[2]) == [w.SIMPLE_REPLY.pack(magic=w.NBD_SIMPLE_REPLY_MAGIC, cookie=3)]
    parts = conn.reply(cmds[0], 0, b"x" * 50)
    assert parts[1] == b"x" * 50
    assert conn.reply(cmds[1], w.NBD_EIO) == [
        w.SIMPLE_REPLY.pack(magic=w.NBD_SIMPLE_REPLY_MAGIC, error=w.NBD_EIO, cookie=2)
    ]
    with pytest.raises(LocalProtocolError):
        conn.reply(cmds[1])  # twice
    with pytest.raises(LocalProtocolError):
        conn.reply(cmds[3], 0, b"")  # fine: trim has no data
        conn.reply(cmds[3])
    assert conn.in_flight == 1


def test_failed_read_sends_no_data() -> None:
    conn = connected()
    (cmd,) = conn.receive_data(request(w.NBD_CMD_READ, 0, 512, cookie=9))
    assert isinstance(cmd, Command)
    assert len(b"".join(conn.reply(cmd, w.NBD_EIO))) == 16
    (cmd,) = conn.receive_data(request(w.NBD_CMD_READ, 0, 512, cookie=9))
    assert isinstance(cmd, Command)
    with pytest.raises(LocalProtocolError):
        conn.reply(cmd, 0, b"short")


# (export, cmd, offset, length, flags, expected wire error, field)
REJECTIONS = [
    ("disk", 77, 0, 0, 0, w.NBD_EINVAL, "type"),
    ("disk", w.NBD_CMD_CACHE, 0, 512, 0, w.NBD_EINVAL, "type"),
    ("disk", w.NBD_CMD_BLOCK_STATUS, 0, 512, 0, w.NBD_EINVAL, "type"),
    ("disk", w.NBD_CMD_READ, 0, 512, w.NBD_CMD_FLAG_FUA, w.NBD_EINVAL, "flags"),
    ("disk", w.NBD_CMD_READ, 0, 512, w.NBD_CMD_FLAG_DF, w.NBD_EINVAL, "flags"),
    ("disk", w.NBD_CMD_WRITE, 0, 512, w.NBD_CMD_FLAG_NO_HOLE, w.NBD_EINVAL, "flags"),
    ("disk", w.NBD_CMD_READ, SIZE - 511, 512, 0, w.NBD_EINVAL, "offset"),
    ("disk", w.NBD_CMD_READ, 1 << 63, 512, 0, w.NBD_EINVAL, "offset"),
    ("disk", w.NBD_CMD_READ, 2**64 - 1, 2**32 - 1, 0, w.NBD_EINVAL, "length"),
    ("disk", w.NBD_CMD_TRIM, SIZE, 1, 0, w.NBD_EINVAL, "offset"),
    ("disk", w.NBD_CMD_WRITE, SIZE - 1, 2, 0, w.NBD_ENOSPC, "offset"),
    ("disk", w.NBD_CMD_WRITE_ZEROES, SIZE, 1, 0, w.NBD_ENOSPC, "offset"),
    ("ro", w.NBD_CMD_WRITE, 0, 512, 0, w.NBD_EPERM, "type"),
    ("ro", w.NBD_CMD_WRITE, SIZE, 512, 0, w.NBD_EPERM, "type"),
    ("ro", w.NBD_CMD_TRIM, 0, 512, 0, w.NBD_EINVAL, "type"),  # not advertised at all
    ("ro", w.NBD_CMD_WRITE, 0, 512, w.NBD_CMD_FLAG_FUA, w.NBD_EINVAL, "flags"),
    ("aligned", w.NBD_CMD_READ, 1, 512, 0, w.NBD_EINVAL, "offset"),
    ("aligned", w.NBD_CMD_WRITE, 0, 100, 0, w.NBD_EINVAL, "offset"),
    ("aligned", w.NBD_CMD_READ, 0, 65536 + 512, 0, w.NBD_EINVAL, "length"),
    ("aligned", w.NBD_CMD_WRITE, 0, 65536 + 512, 0, w.NBD_EINVAL, "length"),
]


@pytest.mark.parametrize(("export", "cmd", "offset", "length", "flags", "error", "field"), REJECTIONS)
def test_bad_requests_get_in_band_errors(
    export: str, cmd: int, offset: int, length: int, flags: int, error: int, field: str
) -> None:
    conn = connected(export)
    payload = bytes(length) if cmd == w.NBD_CMD_WRITE else b""
    bad = request(cmd, offset, length, cookie=0xC0FFEE, flags=flags) + payload
    good = request(w.NBD_CMD_READ, 0, 512, cookie=2)
    events = conn.receive_data(bad + good)
    assert isinstance(events[0], CommandRejected)
    assert events[0].error.wire_error == error and events[0].error.field == field
    assert isinstance(events[1], Command) and events[1].cookie == 2  # still in step
    assert parse_simple_replies(conn.data_to_send()) == [(0xC0FFEE, error)]


def test_bad_write_payload_is_drained_in_pieces() -> None:
    conn = connected("ro")
    n = 3 << 20
    assert conn.receive_data(request(w.NBD_CMD_WRITE, 0, n, cookie=3)) == []
    for _ in range(n // (1 << 20) - 1):
        assert conn.receive_data(bytes(1 << 20)) == []
    events = conn.receive_data(bytes(1 << 20) + request(w.NBD_CMD_FLUSH, cookie=4))
    assert [type(e) for e in events] == [CommandRejected, Command]
    assert len(conn._in) == 0  # drained, not buffered


def test_a_write_payload_can_be_read_straight_into_its_buffer() -> None:
    conn = connected()
    payload = bytes(range(256)) * 64  # 16 KiB
    assert conn.payload_view() is None  # no write under way
    assert conn.receive_data(request(w.NBD_CMD_WRITE, 8192, len(payload), cookie=7) + payload[:100]) == []
    # What came with the header went into the payload; the rest is read into its view.
    view = conn.payload_view()
    assert view is not None and len(view) == len(payload) - 100
    view[:1000] = payload[100:1100]
    assert conn.payload_received(1000) == []
    view = conn.payload_view()
    assert view is not None and len(view) == len(payload) - 1100
    view[:] = payload[1100:]
    (cmd,) = conn.payload_received(len(view))
    assert isinstance(cmd, Command) and (cmd.cookie, cmd.offset, cmd.length) == (7, 8192, len(payload))
    assert bytes(cmd.data) == payload
    assert conn.payload_view() is None and conn.buffered == 0
    # Header and payload through receive_data alone give the same command.
    (again,) = conn.receive_data(request(w.NBD_CMD_WRITE, 8192, len(payload), cookie=8) + payload)
    assert isinstance(again, Command) and bytes(again.data) == payload


def test_payload_view_only_while_the_next_bytes_are_all_payload() -> None:
    conn = connected("ro")  # a rejected write's payload is drained, never viewed
    conn.receive_data(request(w.NBD_CMD_WRITE, 0, 4096, cookie=1))
    assert conn.payload_view() is None
    conn = connected()
    with pytest.raises(LocalProtocolError):
        conn.payload_received(1)  # no view was given
    conn.receive_data(request(w.NBD_CMD_WRITE, 0, 4096, cookie=1))
    with pytest.raises(LocalProtocolError):
        conn.payload_received(4097)  # more than the view holds
    conn.output_blocked = True  # parsing held: read into the adapter's own buffer instead
    assert conn.payload_view() is None


def test_monstrous_write_is_a_violation() -> None:
    conn = connected()
    events = conn.receive_data(request(w.NBD_CMD_WRITE, 0, 0xFFFFFFFF, cookie=3))
    assert isinstance(events[0], Disconnect) and events[0].error is not None


def test_disc_drains_and_ignores_what_follows() -> None:
    conn = connected()
    events = conn.receive_data(request(w.NBD_CMD_READ, 0, 1) + request(w.NBD_CMD_DISC) + b"garbage")
    assert isinstance(events[1], Disconnect) and events[1].drain and events[1].error is None
    assert conn.receive_data(request(w.NBD_CMD_READ, 0, 1)) == []


def test_bad_request_magic_is_a_violation() -> None:
    conn = connected()
    events = conn.receive_data(b"\x25\x60\x95\x14" + bytes(24))
    assert isinstance(events[0], Disconnect) and events[0].error is not None
    assert events[0].error.field == "request magic"


def test_shutdown_refuses_commands_with_eshutdown() -> None:
    conn = connected()
    conn.start_shutdown()
    conn.receive_data(request(w.NBD_CMD_READ, 0, 1, cookie=8))
    assert parse_simple_replies(conn.data_to_send()) == [(8, w.NBD_ESHUTDOWN)]


def test_cookies_may_repeat() -> None:
    conn = connected()
    a, b = conn.receive_data(request(w.NBD_CMD_FLUSH, cookie=1) + request(w.NBD_CMD_FLUSH, cookie=1))
    assert isinstance(a, Command) and isinstance(b, Command) and a.tag != b.tag
    conn.reply(b)
    conn.reply(a)


# --- fuzzing --------------------------------------------------------------------------------

FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=300), st.lists(st.integers(1, 40), max_size=10))
def test_fuzz_handshake_never_raises(data: bytes, cuts: list[int]) -> None:
    conn = new_conn()
    pos = 0
    for cut in [*cuts, len(data)]:
        for event in conn.receive_data(data[pos : pos + cut]):
            assert isinstance(event, ExportChosen | OptionRejected | Disconnect | Command | CommandRejected)
        pos += cut
    conn.data_to_send()


def _fuzz_request() -> st.SearchStrategy[bytes]:
    cmd = st.sampled_from([0, 1, 2, 3, 4, 5, 6, 7, 8, 200])
    off = st.one_of(st.integers(0, SIZE + 10), st.integers(0, 2**64 - 1))
    length = st.one_of(st.integers(0, 5000), st.integers(0, 2**32 - 1))
    flags = st.integers(0, 0xFFFF)

    @st.composite
    def build(draw: st.DrawFn) -> bytes:
        c = draw(cmd)
        n = draw(length)
        if c == w.NBD_CMD_WRITE:
            n = min(n, 5000)
        hdr = request(c, draw(off), n, cookie=draw(st.integers(0, 2**64 - 1)), flags=draw(flags))
        if draw(st.booleans()) and c == w.NBD_CMD_WRITE:
            hdr += bytes(n)
        elif draw(st.integers(0, 20)) == 0:
            hdr = draw(st.binary(min_size=1, max_size=40))
        return hdr

    return build()


@FUZZ
@given(st.sampled_from(["disk", "ro", "aligned"]), st.lists(_fuzz_request(), max_size=8), st.integers(1, 64))
def test_fuzz_transmission_never_raises_and_answers_every_rejection(
    export: str, reqs: list[bytes], chunk: int
) -> None:
    conn = connected(export)
    stream = b"".join(reqs)
    events = []
    for i in range(0, len(stream), chunk):
        events += conn.receive_data(stream[i : i + chunk])
    rejected = [e for e in events if isinstance(e, CommandRejected)]
    out = conn.data_to_send()
    assert len(out) == 16 * len(rejected)
    for event in events:
        if isinstance(event, Command):
            info = EXPORTS[export].info
            assert event.offset + event.length <= info.size or event.type == w.NBD_CMD_FLUSH
            if event.type == w.NBD_CMD_WRITE:
                assert len(event.data) == event.length and not info.read_only
            conn.reply(event, 0, bytes(event.length) if event.type == w.NBD_CMD_READ else b"")
    assert conn.in_flight == 0


def test_large_write_payloads_are_received_into_pooled_buffers_given_back_at_the_reply() -> None:
    pool = BufferPool()
    conn = NbdServerConnection(EXPORTS, default_export="disk", buffers=pool)
    conn.data_to_send()
    conn.receive_data(client_flags() + option(w.NBD_OPT_GO, go_data("disk")))
    conn.data_to_send()
    big, small = bytes(range(256)) * 400, b"s" * 1000  # 100 KiB, and under the pool's minimum
    cmds: list[Command] = []
    for cookie in (1, 2):
        events = conn.receive_data(request(w.NBD_CMD_WRITE, 0, len(big), cookie=cookie) + big)
        events += conn.receive_data(request(w.NBD_CMD_WRITE, 0, len(small), cookie=9) + small)
        cmd, tiny = [e for e in events if isinstance(e, Command)]
        assert cmd.data == big and tiny.data == small
        conn.reply(tiny)
        assert pool.kept == 0  # the small payload had a buffer of its own
        cmds.append(cmd)
        conn.reply(cmd)  # answered: the backend is done with the payload
        assert pool.kept == size_class(len(big))
    assert pool.allocated == 1 and pool.reused == 1
    assert cmds[0].data.obj is cmds[1].data.obj  # type: ignore[union-attr]  # the same buffer, twice
