"""The sans-IO NBD client: against pvio's server core in one process, and hostile servers."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvio.nbd import wire as w
from pvio.nbd.client import (
    ClientRequestError,
    ExportList,
    NbdClientConnection,
    NbdOptionError,
    NbdReply,
    Phase,
    Ready,
    ServerProtocolError,
)
from pvio.nbd.events import Command, Export
from pvio.nbd.server import NbdServerConnection
from pvio.storage.backend import BackendInfo

SIZE = 1 << 20
EXPORTS = {
    "disk": Export("disk", BackendInfo(size=SIZE, can_trim=True), "the disk"),
    "ro": Export("ro", BackendInfo(size=4096, read_only=True)),
    "aligned": Export("aligned", BackendInfo(size=SIZE, min_block=512, max_block=65536)),
}


def pump(client: NbdClientConnection, server: NbdServerConnection) -> tuple[list[object], list[object]]:
    """Move bytes both ways until both ends are quiet; return (client events, server events)."""
    cev: list[object] = []
    sev: list[object] = []
    while True:
        s2c = server.data_to_send()
        if s2c:
            cev += client.receive_data(s2c)
        c2s = client.data_to_send()
        if c2s:
            sev += server.receive_data(c2s)
        if not s2c and not c2s:
            return cev, sev


def pair(name: str = "disk") -> tuple[NbdClientConnection, NbdServerConnection, list[object]]:
    client = NbdClientConnection(export_name=name)
    server = NbdServerConnection(EXPORTS, default_export="disk")
    cev, _ = pump(client, server)
    return client, server, cev


def test_go_against_pvio_server() -> None:
    client, _, events = pair("disk")
    (ready,) = events
    assert isinstance(ready, Ready)
    exp = ready.export
    assert (exp.size, exp.description, exp.min_block, exp.max_block) == (SIZE, "the disk", 1, 1 << 25)
    assert exp.has(w.NBD_FLAG_SEND_TRIM) and not exp.has(w.NBD_FLAG_READ_ONLY)
    assert client.phase is Phase.TRANSMISSION
    info = exp.backend_info()
    assert info.can_trim and not info.read_only and info.size == SIZE


def test_pipelined_requests_and_out_of_order_replies() -> None:
    client, server, _ = pair()
    cookies = []
    for i in range(3):
        cookie, parts = client.request(w.NBD_CMD_READ, i * 512, 512)
        cookies.append(cookie)
        server_events = server.receive_data(b"".join(parts))
    cookie_w, parts = client.request(w.NBD_CMD_WRITE, 0, 3, b"abc", w.NBD_CMD_FLAG_FUA)
    server_events = server.receive_data(b"".join(bytes(p) for p in parts))
    assert isinstance(server_events[0], Command) and server_events[0].data == b"abc"
    assert client.in_flight == 4
    # The server answered three reads; now answer them backwards, data included.
    cmds = [c for c in server._in_flight.values() if c.type == w.NBD_CMD_READ]
    out = b""
    for cmd in reversed(cmds):
        out += b"".join(bytes(p) for p in server.reply(cmd, 0, bytes([cmd.offset // 512]) * 512))
    out += b"".join(server.reply(server_events[0], w.NBD_ENOSPC))
    replies = client.receive_data(out)
    assert [(r.cookie, r.error, r.data[:1]) for r in replies if isinstance(r, NbdReply)] == [
        (cookies[2], 0, b"\x02"),
        (cookies[1], 0, b"\x01"),
        (cookies[0], 0, b"\x00"),
        (cookie_w, w.NBD_ENOSPC, b""),
    ]
    assert client.in_flight == 0


def test_list_exports() -> None:
    client = NbdClientConnection(list_exports=True)
    server = NbdServerConnection(EXPORTS)
    events, sev = pump(client, server)
    assert events == [ExportList((("disk", "the disk"), ("ro", ""), ("aligned", "")))]
    assert client.phase is Phase.DONE
    assert sev and type(sev[-1]).__name__ == "Disconnect"  # the client sent NBD_OPT_ABORT


def test_unknown_export_is_an_option_error() -> None:
    client = NbdClientConnection(export_name="nope")
    server = NbdServerConnection(EXPORTS)
    with pytest.raises(NbdOptionError) as info:
        pump(client, server)
    assert info.value.reply == w.NBD_REP_ERR_UNKNOWN


def test_local_checks_refuse_what_the_export_does_not_allow() -> None:
    client, _, _ = pair("ro")
    for args in [
        (w.NBD_CMD_WRITE, 0, 1, b"x"),
        (w.NBD_CMD_TRIM, 0, 1),
        (w.NBD_CMD_READ, 4000, 100),
        (w.NBD_CMD_WRITE_ZEROES, 0, 1),
    ]:
        with pytest.raises(ClientRequestError):
            client.request(*args)  # type: ignore[arg-type]
    client, _, _ = pair("aligned")
    with pytest.raises(ClientRequestError):
        client.request(w.NBD_CMD_READ, 1, 512)
    with pytest.raises(ClientRequestError):
        client.request(w.NBD_CMD_READ, 0, 65536 * 2)
    client.request(w.NBD_CMD_READ, 512, 1024)


def test_export_name_fallback_for_servers_without_go() -> None:
    client = NbdClientConnection(export_name="old")
    client.receive_data(w.NEW_HANDSHAKE.pack(nbdmagic=w.NBDMAGIC, version=w.IHAVEOPT, gflags=1))
    client.data_to_send()
    client.receive_data(
        w.FIXED_NEW_OPTION_REPLY.pack(magic=w.NBD_REP_MAGIC, option=w.NBD_OPT_GO, reply=w.NBD_REP_ERR_UNSUP)
    )
    sent = client.data_to_send()
    assert sent == w.NEW_OPTION.pack(version=w.IHAVEOPT, option=w.NBD_OPT_EXPORT_NAME, optlen=3) + b"old"
    (ready,) = client.receive_data(w.NEW_HANDSHAKE_FINISH.pack(exportsize=4096, eflags=3) + bytes(124))
    assert isinstance(ready, Ready) and ready.export.size == 4096 and ready.export.has(w.NBD_FLAG_READ_ONLY)


@pytest.mark.parametrize(
    "reply",
    [
        w.SIMPLE_REPLY.pack(magic=w.NBD_SIMPLE_REPLY_MAGIC, cookie=999),  # unknown cookie
        w.SIMPLE_REPLY.pack(magic=0x12345678, cookie=1),  # bad magic
        w.STRUCTURED_REPLY.pack(magic=w.NBD_STRUCTURED_REPLY_MAGIC, cookie=1),  # not negotiated
    ],
)
def test_hostile_replies_break_the_connection(reply: bytes) -> None:
    client, _, _ = pair()
    client.request(w.NBD_CMD_FLUSH)
    with pytest.raises(ServerProtocolError):
        client.receive_data(reply)
    with pytest.raises(ServerProtocolError):
        client.receive_data(b"")  # stays broken


def test_hostile_greetings() -> None:
    for greeting in (
        b"NBDMAGIX" + b"IHAVEOPT\x00\x01",
        b"NBDMAGIC" + w.NBD_OLD_VERSION.to_bytes(8, "big") + b"\x00\x01",
        b"NBDMAGICIHAVEOPT\x00\x00",
    ):
        with pytest.raises(ServerProtocolError):
            NbdClientConnection().receive_data(greeting)


FUZZ = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=400), st.integers(1, 50))
def test_fuzz_client_handshake_parser(data: bytes, chunk: int) -> None:
    client = NbdClientConnection(export_name="x")
    prefix = w.NEW_HANDSHAKE.pack(nbdmagic=w.NBDMAGIC, version=w.IHAVEOPT, gflags=3)
    stream = prefix + data
    try:
        for i in range(0, len(stream), chunk):
            client.receive_data(stream[i : i + chunk])
    except (ServerProtocolError, NbdOptionError):
        pass


@FUZZ
@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from([w.NBD_SIMPLE_REPLY_MAGIC, w.NBD_STRUCTURED_REPLY_MAGIC, 0]),
                      st.integers(0, 2**32 - 1), st.integers(0, 6)),
            st.binary(max_size=600),
        ),
        max_size=10,
    ),
    st.integers(1, 64),
)
def test_fuzz_client_reply_parser(items: list[object], chunk: int) -> None:
    client, _, _ = pair()
    for _ in range(5):
        client.request(w.NBD_CMD_READ, 0, 512)
    stream = b""
    for item in items:
        if isinstance(item, tuple):
            magic, error, cookie = item
            stream += w.SIMPLE_REPLY.packer.pack(magic, error, cookie)
        else:
            assert isinstance(item, bytes)
            stream += item
    try:
        for i in range(0, len(stream), chunk):
            for event in client.receive_data(stream[i : i + chunk]):
                assert isinstance(event, NbdReply)
                assert len(event.data) in (0, 512)
                assert event.error == 0 or event.data == b""
    except ServerProtocolError:
        assert client.broken is not None


@FUZZ
@given(
    st.integers(0, 2**64 - 1),
    st.integers(0, 0xFFFF),
    st.one_of(st.none(), st.tuples(*[st.integers(0, 2**32 - 1) | st.sampled_from([1, 512, 4096, 1 << 16, 1 << 25, 0xFFFFFFFF])] * 3)),
)
def test_fuzz_go_replies_give_a_usable_export_or_an_error(
    size: int, flags: int, sizes: tuple[int, int, int] | None
) -> None:
    client = NbdClientConnection(export_name="x")
    client.receive_data(w.NEW_HANDSHAKE.pack(nbdmagic=w.NBDMAGIC, version=w.IHAVEOPT, gflags=3))

    def rep(reply: int, data: bytes = b"") -> bytes:
        return w.FIXED_NEW_OPTION_REPLY.pack(
            magic=w.NBD_REP_MAGIC, option=w.NBD_OPT_GO, reply=reply, replylen=len(data)
        ) + data

    stream = rep(w.NBD_REP_INFO, w.INFO_EXPORT.pack(info=0, exportsize=size, eflags=flags))
    if sizes is not None:
        lo, pref, hi = sizes
        stream += rep(w.NBD_REP_INFO, w.INFO_BLOCK_SIZE.pack(info=3, minimum=lo, preferred=pref, maximum=hi))
    stream += rep(w.NBD_REP_ACK)
    try:
        events = client.receive_data(stream)
    except ServerProtocolError:
        return
    (ready,) = events
    assert isinstance(ready, Ready)
    info = ready.export.backend_info()  # never an impossible BackendInfo
    assert info.size == size < 1 << 63 and info.max_block <= w.NBD_MAX_PAYLOAD_PORTABLE
