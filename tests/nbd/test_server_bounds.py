"""What a client can make the NBD server hold: commands and bytes in flight (enforced while
parsing, by the core), connections per export, and time (an idle connection is closed when a new client needs its slot)."""

from __future__ import annotations

import asyncio
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nbd.helpers import client_flags, go_data, option, parse_simple_replies, request
from nbd.test_asyncio import run, serve, until
from nbd.test_server_core import EXPORTS, RW
from pvio.bench.harness.fio import listening
from pvio.nbd import wire as w
from pvio.nbd.address import NbdAddress
from pvio.nbd.client import NbdOptionError
from pvio.nbd.client_asyncio import NbdClient
from pvio.nbd.events import Command, CommandRejected
from pvio.nbd.server import NbdServerConnection
from pvio.storage.backend import MemoryBackend

MiB = 1 << 20


def connected(**kw: int) -> NbdServerConnection:
    conn = NbdServerConnection(EXPORTS, default_export="disk", **kw)
    conn.receive_data(client_flags() + option(w.NBD_OPT_GO, go_data("disk")))
    conn.data_to_send()
    return conn


def reads(n: int, length: int = 4096) -> bytes:
    return b"".join(request(w.NBD_CMD_READ, 0, length, cookie=i) for i in range(n))


# --- the core: bounds while parsing ---------------------------------------------------------


def test_commands_stop_at_max_in_flight_while_parsing() -> None:
    conn = connected()
    events = conn.receive_data(reads(1000))  # 28 KB on the wire, one chunk
    commands = [e for e in events if isinstance(e, Command)]
    assert len(commands) == 64 and conn.in_flight == 64
    assert not conn.reading_wanted and conn.buffered == (1000 - 64) * w.REQUEST.size
    conn.reply(commands[0], data=bytes(4096))
    more = conn.receive_data(b"")  # one answered: exactly one more comes out
    assert [type(e) for e in more] == [Command] and conn.in_flight == 64


def test_bytes_in_flight_stop_parsing() -> None:
    conn = connected(max_in_flight_bytes=MiB)
    commands = conn.receive_data(reads(100, 256 << 10))
    assert len(commands) == 4 and conn.bytes_in_flight == MiB and not conn.reading_wanted
    for c in commands[:3]:
        assert isinstance(c, Command)
        conn.reply(c, data=bytes(c.length))
    assert len(conn.receive_data(b"")) == 3 and conn.bytes_in_flight == MiB


def test_one_command_always_fits_so_a_connection_cannot_wedge() -> None:
    conn = connected(max_in_flight_bytes=4096)
    assert len(conn.receive_data(reads(3, 65536))) == 1


def test_a_write_payload_is_not_taken_in_without_room() -> None:
    conn = connected(max_in_flight_bytes=64 << 10)
    payload = bytes(48 << 10)
    wire = (request(w.NBD_CMD_WRITE, 0, len(payload), cookie=1) + payload) * 2
    events = conn.receive_data(wire)
    assert [type(e) for e in events] == [Command]
    assert conn.buffered == w.REQUEST.size + len(payload) and not conn.reading_wanted
    command = events[0]
    assert isinstance(command, Command)
    conn.reply(command)
    assert [type(e) for e in conn.receive_data(b"")] == [Command] and conn.buffered == 0


def test_nothing_is_parsed_while_the_client_does_not_read() -> None:
    conn = connected()
    conn.output_blocked = True
    bad = request(w.NBD_CMD_READ, RW.info.size, 4096)  # each would queue an EINVAL reply
    assert conn.receive_data(bad * 100) == [] and conn.data_to_send() == b""
    assert not conn.reading_wanted
    conn.output_blocked = False
    events = conn.receive_data(b"")
    assert len(events) == 100 and all(isinstance(e, CommandRejected) for e in events)
    assert len(parse_simple_replies(conn.data_to_send())) == 100


def test_admit_refuses_go_with_policy_and_export_name_by_closing() -> None:
    conn = NbdServerConnection(EXPORTS, default_export="disk", admit=lambda e: f"{e.name} is full")
    conn.data_to_send()
    conn.receive_data(client_flags() + option(w.NBD_OPT_GO, go_data("disk")))
    reply = w.FIXED_NEW_OPTION_REPLY.unpack(conn.data_to_send(), 0)
    assert reply["reply"] == w.NBD_REP_ERR_POLICY and conn.export is None
    conn.receive_data(option(w.NBD_OPT_EXPORT_NAME, b"disk"))
    assert conn.state.value == "closed" and conn.data_to_send() == b""


# --- the server process under a client that never reads ----------------------------------

#: What the flood may add to `pvio nbd serve`'s peak RSS: the 64 MiB of reads in flight,
#: then the same 64 MiB again as the replies the transport holds (it copies what it cannot
#: send at once, and the allocator keeps the memory the reads freed for reuse, so RSS
#: counts both), one received chunk and the interpreter's own slack.  Before the in-flight
#: bounds were enforced while parsing, 1,000 such READs took it past 1.6 GiB.
FLOOD_RSS_LIMIT = 256 * MiB


def _rss(pid: int, field: str = "VmRSS") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def _handshake(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX)
    s.connect(str(path))
    s.settimeout(10)
    s.sendall(client_flags() + option(w.NBD_OPT_GO, go_data("")))
    need = 18 + 20 + 12 + 20 + 14 + 20  # greeting, INFO_EXPORT, INFO_BLOCK_SIZE, ACK
    got = b""
    while len(got) < need:
        chunk = s.recv(need - len(got))
        assert chunk, "server closed during the handshake"
        got += chunk
    return s


def test_a_client_that_never_reads_cannot_grow_the_server(tmp_path: Path) -> None:
    img = tmp_path / "disk.img"
    with open(img, "wb") as f:
        f.truncate(64 * MiB)
    sock = tmp_path / "nbd.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvio", "nbd", "serve", str(img), "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
    )
    flood: socket.socket | None = None
    try:
        deadline = time.monotonic() + 20
        while not listening(sock):
            assert proc.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        flood = _handshake(sock)
        base = _rss(proc.pid)
        flood.setblocking(False)
        batch = b"".join(request(w.NBD_CMD_READ, (i % 64) * MiB, MiB, cookie=i) for i in range(64))
        sent = 0
        deadline = time.monotonic() + 30
        # Send 1 MiB READ headers and never read a reply, until the server stops reading.
        while time.monotonic() < deadline:
            growth = _rss(proc.pid) - base
            assert growth < FLOOD_RSS_LIMIT, f"server grew {growth >> 20} MiB after {sent} READs"
            if not select.select([], [flood], [], 2.0)[1]:
                break  # not writable for two seconds: the server has stopped reading (not just busy)
            try:
                sent += flood.send(batch) // w.REQUEST.size
            except BlockingIOError:
                continue
        else:
            pytest.fail("the server never stopped reading the flooding connection")
        assert sent >= 1000, f"only {sent} READs went out: the flood proves nothing"

        async def other_client() -> None:
            async with await NbdClient.connect(NbdAddress(socket_path=str(sock))) as c:
                await c.write(4096, b"served meanwhile")
                assert await c.read(4096, 16) == b"served meanwhile"

        run(other_client(), timeout=10)
        peak = _rss(proc.pid, "VmHWM") - base
        assert peak < FLOOD_RSS_LIMIT, f"peak growth {peak >> 20} MiB after {sent} READs"
    finally:
        if flood is not None:
            flood.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# --- connections: per export, and idle ones -------------------------------------------------


def test_connections_per_export_are_capped_with_a_message(tmp_path: Path) -> None:
    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": MemoryBackend(4096)}, max_connections_per_export=2)
        async with server:
            a = await NbdClient.connect(NbdAddress(socket_path=path))
            b = await NbdClient.connect(NbdAddress(socket_path=path))
            with pytest.raises(NbdOptionError, match="its limit"):
                await NbdClient.connect(NbdAddress(socket_path=path))
            assert server.connections_in("disk") == 2 and server.stats["refused_export_full"] == 1
            await a.close()
            await until(lambda: server.connections_in("disk") < 2)
            async with await NbdClient.connect(NbdAddress(socket_path=path)) as c:  # room again
                assert await c.read(0, 1) == b"\0"
            await b.close()

    run(main())


async def _idle_client(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_unix_connection(path)
    writer.write(client_flags() + option(w.NBD_OPT_GO, go_data("")))
    await reader.readexactly(18 + 20 + 12 + 20 + 14 + 20)
    return reader, writer


def test_an_idle_connection_stays_while_nobody_needs_its_slot(tmp_path: Path) -> None:
    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": MemoryBackend(4096)}, idle_timeout=0.3)
        async with server:
            reader, writer = await _idle_client(path)  # a mounted disk nobody touches
            async with await NbdClient.connect(NbdAddress(socket_path=path)) as busy:
                start = asyncio.get_running_loop().time()
                while asyncio.get_running_loop().time() - start < 0.9:  # three idle limits
                    assert await busy.read(0, 1) == b"\0"
                    await asyncio.sleep(0.1)
            writer.write(reads(1, 512))  # still served
            assert len(await asyncio.wait_for(reader.readexactly(w.SIMPLE_REPLY.size + 512), 5)) > 0
            writer.close()
            assert server.stats["idle_timeouts"] == 0

    run(main())


def test_idle_handshaken_clients_cannot_hold_every_slot(tmp_path: Path) -> None:
    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": MemoryBackend(4096)}, max_connections=3, idle_timeout=0.3)
        async with server:
            idle = [await _idle_client(path) for _ in range(3)]
            with pytest.raises(ConnectionError):
                await NbdClient.connect(NbdAddress(socket_path=path))  # every slot busy < 0.3 s
            await asyncio.sleep(0.35)  # now they are idle past the limit
            async with await NbdClient.connect(NbdAddress(socket_path=path)) as c:
                assert await c.read(0, 1) == b"\0"  # the longest idle made room
            assert server.stats["idle_timeouts"] == 1
            closed = [await asyncio.wait_for(r.read(), 0.5) == b"" for r, _ in idle[:1]]
            assert closed == [True]  # the first, idle longest
            for _, writer in idle:
                writer.close()

    run(main())


def test_an_export_full_of_idle_clients_lets_a_new_one_in(tmp_path: Path) -> None:
    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": MemoryBackend(4096)}, max_connections_per_export=2,
                                   idle_timeout=0.3)
        async with server:
            idle = [await _idle_client(path) for _ in range(2)]
            with pytest.raises(NbdOptionError, match="its limit"):
                await NbdClient.connect(NbdAddress(socket_path=path))
            await asyncio.sleep(0.35)
            async with await NbdClient.connect(NbdAddress(socket_path=path)) as c:
                assert await c.read(0, 1) == b"\0"
            for _, writer in idle:
                writer.close()

    run(main())


def test_server_keeps_its_bound_on_the_wire(tmp_path: Path) -> None:
    """Over a real socket: 1,000 READs sent at once run 64 at a time, all answered."""

    class Gauge(MemoryBackend):
        now = peak = 0

        async def read(self, offset: int, length: int) -> bytes | bytearray:
            Gauge.now += 1
            Gauge.peak = max(Gauge.peak, Gauge.now)
            await asyncio.sleep(0.001)
            Gauge.now -= 1
            return await super().read(offset, length)

    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": Gauge(1 << 20)})
        async with server:
            reader, writer = await _idle_client(path)
            writer.write(reads(1000, 512))
            for _ in range(1000):
                await reader.readexactly(w.SIMPLE_REPLY.size + 512)
            writer.close()

    run(main())
    assert Gauge.peak == 64
