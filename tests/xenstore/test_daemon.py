"""The asyncio daemon and the client library, in process and as a real process: domain
connections attached by the toolstack, isolation of malformed peers, back-pressure,
durability across restarts, watches as async iterators, reconnection."""

from __future__ import annotations

import asyncio
import os
import socket
import struct
import subprocess
import sys
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest

from pvio.abi.xs_wire import XsdSockmsgType as T
from pvio.xenstore.client import AsyncClient, Client, WatchEvent, XsReply
from pvio.xenstore.daemon import XenStoreDaemon, attach_domain, load_db
from pvio.xenstore.errors import XsError
from pvio.xenstore.wire import FrameDecoder, Packet, encode
from xs_harness import run_daemon, until, wait_for_socket


async def read_until(
    r: asyncio.StreamReader, dec: FrameDecoder, done: Callable[[list[Packet]], bool]
) -> list[Packet]:
    """Read packets from `r` until `done(packets read so far)` (at most 5 s a read)."""
    got: list[Packet] = []
    while not done(got):
        data = await asyncio.wait_for(r.read(65536), 5)
        assert data, "connection closed"
        dec.feed(data)
        got.extend(dec.packets())
    return got


def answered(type_: int, req_id: int) -> Callable[[list[Packet]], bool]:
    return lambda got: any(p.type == type_ and p.req_id == req_id for p in got)


def run_with_daemon(tmp_path: Path, body: Callable[[XenStoreDaemon], Awaitable[None]],
                    **kw: object) -> None:
    async def main() -> None:
        d = XenStoreDaemon(tmp_path / "xs.sock", **kw)  # type: ignore[arg-type]
        await d.start()
        try:
            await asyncio.wait_for(body(d), 60)
        finally:
            await d.close()

    asyncio.run(main())


async def in_thread(fn: Callable[[], object]) -> object:
    return await asyncio.get_running_loop().run_in_executor(None, fn)


def test_domain_identity_is_set_by_the_toolstack(tmp_path: Path) -> None:
    async def body(d: XenStoreDaemon) -> None:
        tool = await AsyncClient.open(str(d.socket_path))
        with pytest.raises(XsError) as e:
            await in_thread(lambda: attach_domain(d.control_path, 5))
        assert e.value.errno == "ENOENT"  # not introduced yet
        await tool.introduce(5)
        await tool.write("/local/domain/5", "")
        await tool.set_perms("/local/domain/5", ["n5"])
        sock = await in_thread(lambda: attach_domain(d.control_path, 5))
        assert isinstance(sock, socket.socket)
        guest = await AsyncClient.open(sock=sock)
        await guest.write("name", "guest")  # relative to its own home
        assert await tool.read("/local/domain/5/name") == b"guest"
        assert await tool.get_perms("/local/domain/5/name") == ["n5"]
        for op in (guest.read("/tool/xenstored"), guest.introduce(9),
                   guest.write("/local/domain/0/x", "y")):
            with pytest.raises(XsError) as e:
                await op
            assert e.value.errno == "EACCES"
        # releasing the domain closes its connection
        await tool.release(5)
        with pytest.raises((ConnectionResetError, XsError)):
            await asyncio.wait_for(guest.read("name"), 5)
        await guest.close()
        await tool.close()

    run_with_daemon(tmp_path, body)


def test_malformed_frames_never_disturb_other_connections(tmp_path: Path) -> None:
    bad_inputs = [
        struct.pack("<4I", T.XS_READ, 1, 0, 5000),  # over-long: closed
        struct.pack("<4I", 99, 1, 0, 0),  # unknown type: ENOSYS
        struct.pack("<4I", T.XS_READ, 1, 0, 3) + b"/ab",  # missing NUL: EINVAL
        encode(T.XS_READ, b"/a b\0"),  # bad character: EINVAL
        encode(T.XS_WRITE, b"/a//b\0x"),
        struct.pack("<2I", 1, 2),  # truncated header, then hang up
        encode(T.XS_READ, b"\xff\xfe\0"),
    ]

    async def body(d: XenStoreDaemon) -> None:
        good = await AsyncClient.open(str(d.socket_path))
        await good.write("/k", "v")
        for data in bad_inputs:
            r, w = await asyncio.open_unix_connection(str(d.socket_path))
            w.write(data)
            await w.drain()
            if len(data) >= 16 and struct.unpack_from("<I", data, 12)[0] <= 4096:
                reply = await asyncio.wait_for(r.readexactly(16), 5)
                type_, _, _, length = struct.unpack("<4I", reply)
                payload = await r.readexactly(length)
                assert type_ == T.XS_ERROR and payload in (b"ENOSYS\0", b"EINVAL\0"), payload
            elif len(data) >= 16:
                assert await asyncio.wait_for(r.read(), 5) == b""  # closed by the daemon
            w.close()
            assert await good.read("/k") == b"v"
        await good.close()

    run_with_daemon(tmp_path, body)


def test_unread_replies_stop_the_connection_not_the_daemon(tmp_path: Path) -> None:
    """XSA-326/416: a client that never reads makes the daemon stop reading it."""

    async def body(d: XenStoreDaemon) -> None:
        c = await AsyncClient.open(str(d.socket_path))
        await c.write("/big", "x" * 4000)
        _r, w = await asyncio.open_unix_connection(str(d.socket_path))
        req = encode(T.XS_READ, b"/big\0")
        for _ in range(20):
            w.write(req * 1000)  # 80 MB of replies requested, never read
            await asyncio.sleep(0)
        # Without back-pressure the daemon would read every request and never pause:
        # this fails at the deadline instead of passing on whatever was read so far.
        await until(lambda: any(conn.paused for conn in d.transports.values()),
                    "the daemon to stop reading the connection that does not read")
        buffered = sum(
            conn.transport.get_write_buffer_size()
            for conn in d.transports.values() if conn.transport is not None
        )
        assert buffered < 8 << 20
        assert await asyncio.wait_for(c.read("/big"), 5) == b"x" * 4000
        w.close()
        await c.close()

    run_with_daemon(tmp_path, body)


def test_flooding_domain_does_not_starve_the_toolstack(tmp_path: Path) -> None:
    """XSA-206: a domain pipelining thousands of writes; the toolstack is still served."""

    async def body(d: XenStoreDaemon) -> None:
        tool = await AsyncClient.open(str(d.socket_path))
        await tool.introduce(3)
        await tool.write("/local/domain/3", "")
        await tool.set_perms("/local/domain/3", ["n3"])
        sock = await in_thread(lambda: attach_domain(d.control_path, 3))
        assert isinstance(sock, socket.socket)
        r, w = await asyncio.open_unix_connection(sock=sock)
        n = 100000
        flood = b"".join(encode(T.XS_WRITE, b"f\0" + b"x" * 100, req_id=i) for i in range(n))
        received = 0

        async def drain() -> None:  # the flooder reads its replies: it is never paused
            nonlocal received
            while received < n * 19:
                data = await r.read(65536)
                if not data:
                    return
                received += len(data)

        drainer = asyncio.create_task(drain())
        w.write(flood)
        for _ in range(3):
            await tool.read("/local/domain/3")
        # the toolstack was served while the flood was still being worked through
        # (the daemon takes turns between connections, a socket read at a time)
        assert received < n * 19 // 2, "the toolstack waited for the flood"
        await asyncio.wait_for(drainer, 30)
        assert received == n * 19
        w.close()
        await tool.close()

    run_with_daemon(tmp_path, body)


def test_many_idle_connections(tmp_path: Path) -> None:
    async def body(d: XenStoreDaemon) -> None:
        idle = [await asyncio.open_unix_connection(str(d.socket_path)) for _ in range(300)]
        c = await AsyncClient.open(str(d.socket_path))
        await c.write("/i", "1")
        assert await c.read("/i") == b"1"
        assert len(d.transports) == 301
        for _, w in idle:
            w.close()
        await c.close()

    run_with_daemon(tmp_path, body)


def test_async_watch_stream_and_own_write_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def body(d: XenStoreDaemon) -> None:
        c = await AsyncClient.open(str(d.socket_path))
        # Every event the connection receives, whichever watch it is for (the client
        # drops events for tokens it no longer has, so the streams alone cannot tell).
        heard: list[WatchEvent] = []
        dispatch = c._dispatch

        def spy(item: XsReply | WatchEvent) -> None:
            if isinstance(item, WatchEvent):
                heard.append(item)
            dispatch(item)

        monkeypatch.setattr(c, "_dispatch", spy)
        async with await c.watch("/ws") as events:
            assert (await events.get(5)).path == "/ws"
            await c.write("/ws/a", "1")
            # the event for our own write was queued before the write's reply
            assert [e.path for e in events.drain()] == ["/ws/a"]
            await c.rm("/ws")
            ev = await events.get(5)
            assert ev.path == "/ws"
        # Leaving the block unregistered the watch.  Positive control: a second watch on
        # the same path and connection hears the next write, and since a request's events
        # come before its reply, everything that write caused has arrived once it returns.
        async with await c.watch("/ws") as control:
            assert (await control.get(5)).path == "/ws"
            heard.clear()
            await c.write("/ws/b", "1")
            assert [(e.path, e.token) for e in heard] == [("/ws/b", control.token)]
        assert events.drain() == []
        await c.close()

    run_with_daemon(tmp_path, body)


def test_async_transact_retries_on_eagain(tmp_path: Path) -> None:
    async def body(d: XenStoreDaemon) -> None:
        c = await AsyncClient.open(str(d.socket_path))
        other = await AsyncClient.open(str(d.socket_path))
        await c.write("/cnt", "0")
        tries = 0

        async def incr(tx: int) -> int:
            nonlocal tries
            tries += 1
            n = int(await c.read("/cnt", tx))
            if tries == 1:
                await other.write("/cnt", "10")  # makes the first attempt conflict
            await c.write("/cnt", str(n + 1), tx)
            return n + 1

        assert await c.transact(incr) == 11
        assert tries == 2
        assert await c.read("/cnt") == b"11"
        await c.close()
        await other.close()

    run_with_daemon(tmp_path, body)


def test_blocking_client(tmp_path: Path) -> None:
    with run_daemon(tmp_path) as d, Client(str(d.socket)) as c:
        c.write("/b/x", "1")
        assert c.read("/b/x") == b"1"
        assert c.directory("/b") == ["x"]
        assert c.exists("/b/x") and not c.exists("/b/y")
        c.watch("/b", "t")
        assert c.wait_event(5).path == "/b"

        def body(tx: int) -> str:
            c.write("/b/y", "2", tx)
            return "done"

        assert c.transact(body) == "done"
        assert c.wait_event(5).path == "/b/y"
        assert c.get_domain_path(4) == "/local/domain/4"
        assert c.control("check") == b"OK\0"
        with pytest.raises(XsError) as e:
            c.read("/nope")
        assert e.value.errno == "ENOENT"


def test_store_survives_a_restart_and_clients_reconnect(tmp_path: Path) -> None:
    db = tmp_path / "store.json"

    async def scenario() -> None:
        with run_daemon(tmp_path, "--db", str(db)) as d:
            c = await AsyncClient.open(str(d.socket), reconnect=True)
            await c.write("/persist/a", "1")
            await c.introduce(4)
            await c.write("/local/domain/4", "")
            await c.set_perms("/local/domain/4", ["n4", "r0"])
            events = await c.watch("/persist")
            assert (await events.get(5)).path == "/persist"
            on_disk, domains = load_db(db)  # written before the reply came back
            assert on_disk.get("/persist/a") is not None
            assert [(d.domid, d.target) for d in domains] == [(4, None)]
        with run_daemon(tmp_path, "--db", str(db)):
            # the client reconnects and re-registers its watch, which fires once
            assert (await events.get(10)).path == "/persist"
            assert await c.read("/persist/a") == b"1"
            assert await c.get_perms("/local/domain/4") == ["n4", "r0"]
            await c.write("/persist/b", "2")
            assert (await events.get(5)).path == "/persist/b"
            assert c.reconnects == 1
            await c.close()
        assert not (tmp_path / "store.json.tmp").exists()

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_pipelined_requests_keep_their_ids(tmp_path: Path) -> None:
    async def body(d: XenStoreDaemon) -> None:
        r, w = await asyncio.open_unix_connection(str(d.socket_path))
        w.write(b"".join(encode(T.XS_GET_DOMAIN_PATH, f"{i}\0".encode(), req_id=1000 + i)
                         for i in range(50)))
        dec = FrameDecoder()
        got: list[Packet] = []
        while len(got) < 50:
            dec.feed(await asyncio.wait_for(r.read(65536), 5))
            got.extend(dec.packets())
        assert [p.req_id for p in got] == [1000 + i for i in range(50)]
        assert got[7].payload == b"/local/domain/7\0"
        w.close()

    run_with_daemon(tmp_path, body)


def test_killed_daemon_loses_no_acknowledged_write(tmp_path: Path) -> None:
    """SIGKILL in the middle of a stream of writes: the restarted daemon has every write
    that was acknowledged, and a loadable (untorn) store."""
    db = tmp_path / "db.json"
    sock = tmp_path / "k.sock"
    cmd = [sys.executable, "-m", "pvio", "xenstored", "--socket", str(sock), "--db", str(db)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    acked = -1
    try:
        wait_for_socket(sock)
        c = Client(str(sock))
        c.introduce(9)
        killer = threading.Timer(0.3, proc.kill)
        killer.start()
        try:
            for i in range(100000):
                c.write(f"/k/n{i % 50}", str(i))
                acked = i
        except (ConnectionError, OSError):
            pass
        killer.join()
        c.close()
    finally:
        proc.kill()
        proc.wait()
    assert acked > 0
    store, domains = load_db(db)
    assert [(d.domid, d.target) for d in domains] == [(9, None)]
    last = {int(n.value) for p, n in store.nodes.items() if p.startswith("/k/")}
    assert max(last) >= acked
    assert store.check() == []
    with run_daemon(tmp_path, "--db", str(db), name="k2.sock") as d, Client(str(d.socket)) as c2:
        assert int(c2.read(f"/k/n{acked % 50}")) >= acked


def test_control_socket_rejects_bad_attachments(tmp_path: Path) -> None:
    async def body(d: XenStoreDaemon) -> None:
        def attempt(msg: bytes, fds: list[int]) -> bytes:
            with socket.socket(socket.AF_UNIX) as ctl:
                ctl.settimeout(5)
                ctl.connect(str(d.control_path))
                socket.send_fds(ctl, [msg], fds)
                return ctl.recv(64)

        r, w = os.pipe()
        try:
            assert await in_thread(lambda: attempt(b"attach 0\n", [r])) == b"error EINVAL\n"
            a, b = socket.socketpair()
            assert await in_thread(lambda: attempt(b"attach x\n", [a.fileno()])) == b"error EINVAL\n"
            assert await in_thread(lambda: attempt(b"hello\n", [])) == b"error EINVAL\n"
            u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            assert await in_thread(lambda: attempt(b"attach 0\n", [u.fileno()])) == b"error EINVAL\n"
            for s in (a, b, u):
                s.close()
        finally:
            os.close(r)
            os.close(w)
        c = await AsyncClient.open(str(d.socket_path))
        assert await c.read("/tool/xenstored") == b""
        await c.close()

    run_with_daemon(tmp_path, body)


def test_a_watcher_that_never_reads_loses_events_not_the_daemons_memory(tmp_path: Path) -> None:
    """XSA-326: events for an unprivileged connection that stopped reading are dropped
    past a backlog; its replies are not, and nobody else is affected."""

    async def body(d: XenStoreDaemon) -> None:
        tool = await AsyncClient.open(str(d.socket_path))
        await tool.introduce(4)
        await tool.write("/local/domain/4", "")
        await tool.set_perms("/local/domain/4", ["n4"])
        sock = await in_thread(lambda: attach_domain(d.control_path, 4))
        assert isinstance(sock, socket.socket)
        r, w = await asyncio.open_unix_connection(sock=sock)
        dec = FrameDecoder()
        w.write(encode(T.XS_WATCH, b"/local/domain/4\0" + b"t" * 2000 + b"\0", req_id=1))
        got = await read_until(r, dec, answered(T.XS_WATCH, 1))  # registered; now stop reading
        r2, w2 = await asyncio.open_unix_connection(str(d.socket_path))
        n = 9000
        batch = b"".join(encode(T.XS_WRITE, f"/local/domain/4/n{i % 10}\0v".encode(), req_id=i)
                         for i in range(n // 3))
        for _ in range(3):  # 9000 events of 2 KiB for a reader that never reads
            w2.write(batch)
            await w2.drain()
        # every write answered, so every event was queued or dropped (before its reply)
        await read_until(r2, FrameDecoder(), lambda replies: len(replies) >= n)
        await tool.write("/local/domain/4/last", "x")
        (conn,) = [c for c in d.transports.values() if c.domid == 4]
        assert conn.transport is not None
        assert conn.transport.get_write_buffer_size() < 2 << 20
        assert await tool.read("/local/domain/4/last") == b"x"
        # The watcher reads again: its next reply reaches it, but past the backlog its
        # events were dropped, most of the 9000 (the watch did fire: some arrived).
        w.write(encode(T.XS_READ, b"last\0", req_id=2))
        got += await read_until(r, dec, answered(T.XS_READ, 2))
        (reply,) = [p for p in got if p.type == T.XS_READ]
        assert reply.payload == b"x"
        events = [p for p in got if p.type == T.XS_WATCH_EVENT]
        assert 0 < len(events) < n // 2
        w.close()
        w2.close()
        await tool.close()

    run_with_daemon(tmp_path, body)


def test_quota_options_apply_to_domains_only(tmp_path: Path) -> None:
    with run_daemon(tmp_path, "--quota-watches", "2", "--quota-nodes", "3") as d, \
            Client(str(d.socket)) as tool:
        tool.introduce(3)
        tool.write("/local/domain/3", "")
        tool.set_perms("/local/domain/3", ["n3"])
        with Client(sock=attach_domain(d.control, 3)) as guest:
            guest.watch("a", "1")
            guest.watch("b", "2")
            with pytest.raises(XsError) as e:
                guest.watch("c", "3")
            assert e.value.errno == "E2BIG"
            guest.write("x", "")
            guest.write("y", "")  # the home is the third node
            with pytest.raises(XsError) as e:
                guest.write("z", "")
            assert e.value.errno == "ENOSPC"
        for i in range(5):
            tool.watch(f"/w{i}", "t")
            tool.write(f"/n{i}", "")
