"""NbdServer and NbdClient over real sockets, in one process; RawFile on a real file."""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Awaitable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from nbd.helpers import client_flags, go_data, option, request, until
from pvio.nbd import wire as w
from pvio.nbd.address import NbdAddress
from pvio.nbd.client import ClientRequestError
from pvio.nbd.client_asyncio import NbdClient, NbdCommandError
from pvio.nbd.server_asyncio import NbdServer
from pvio.storage.backend import BackendInfo, BlockBackend, MemoryBackend
from pvio.storage.rawfile import RawFile
from pvio.testing.backend_conformance import check_backend

T = TypeVar("T")


def run(coro: Awaitable[T], timeout: float = 30.0) -> T:
    async def bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(bounded())


class SlowBackend:
    """A MemoryBackend whose operations take a random time: replies come out of order."""

    def __init__(self, inner: MemoryBackend, seed: int = 1) -> None:
        self.inner = inner
        self.rng = random.Random(seed)
        self.completed: list[int] = []
        self.started = 0

    @property
    def info(self) -> BackendInfo:
        return self.inner.info

    async def _pause(self) -> None:
        self.started += 1
        await asyncio.sleep(self.rng.random() * 0.02)

    async def read(self, offset: int, length: int) -> bytes | bytearray:
        await self._pause()
        self.completed.append(offset)
        return await self.inner.read(offset, length)

    async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
        await self._pause()
        await self.inner.write(offset, data, fua)

    async def flush(self) -> None:
        await self.inner.flush()

    async def trim(self, offset: int, length: int, fua: bool = False) -> None:
        await self.inner.trim(offset, length, fua)

    async def write_zeroes(self, offset: int, length: int, fua: bool = False, may_trim: bool = True) -> None:
        await self.inner.write_zeroes(offset, length, fua, may_trim)


async def serve(tmp_path: Path, exports: dict[str, BlockBackend], **kw: Any) -> tuple[NbdServer, str]:
    server = NbdServer(exports, **kw)
    path = await server.listen_unix(tmp_path / "nbd.sock")
    return server, path



def test_pipelined_out_of_order_round_trip(tmp_path: Path) -> None:
    slow = SlowBackend(MemoryBackend(1 << 20))

    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": slow})
        async with server, await NbdClient.connect(NbdAddress(socket_path=path)) as client:
            blocks = [os.urandom(4096) for _ in range(64)]
            await asyncio.gather(*(client.write(i * 4096, b) for i, b in enumerate(blocks)))
            got = await asyncio.gather(*(client.read(i * 4096, 4096) for i in range(64)))
            assert got == blocks
            await client.flush()
            assert slow.inner.flushes == 1
            # Replies really were out of order: completion order is not request order.
            assert slow.completed != sorted(slow.completed)

    run(main())


def test_large_writes_pipelined_land_whole(tmp_path: Path) -> None:
    # Payloads of 64 KiB and more are read straight into their own buffers; smaller ones,
    # and the start of every payload, through the adapter's read buffer.
    mem = MemoryBackend(8 << 20)
    sizes = [1 << 20, (200 << 10) + 3, 70 << 10, 5, (64 << 10) - 1, 3 << 20, 4096]
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    blobs = [os.urandom(n) for n in sizes]

    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": mem})
        async with server, await NbdClient.connect(NbdAddress(socket_path=path)) as client:
            await asyncio.gather(*(client.write(o, b) for o, b in zip(offsets, blobs, strict=True)))
            got = await asyncio.gather(*(client.read(o, len(b)) for o, b in zip(offsets, blobs, strict=True)))
            assert got == blobs
            # most of the large payloads came the direct way
            assert server.stats["payload_bytes_direct"] > 1 << 20
        assert bytes(mem.data[: sum(sizes)]) == b"".join(blobs)

    run(main())


def test_backend_failure_is_eio_and_the_connection_lives(tmp_path: Path) -> None:
    mem = MemoryBackend(1 << 16, fail_at=8192)

    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": mem})
        async with server, await NbdClient.connect(NbdAddress(socket_path=path)) as client:
            with pytest.raises(NbdCommandError) as info:
                await client.read(8000, 1000)
            assert info.value.errno == w.NBD_EIO
            with pytest.raises(NbdCommandError):
                await client.write(8192, b"x")
            assert await client.read(0, 4) == bytes(4)
            assert server.stats["backend_errors"] == 2

    run(main())


def test_read_only_export_refuses_writes_on_the_wire(tmp_path: Path) -> None:
    mem = MemoryBackend(1 << 16, read_only=True)

    async def main() -> None:
        server, path = await serve(tmp_path, {"ro": mem})
        async with server:
            client = await NbdClient.connect(NbdAddress(export="ro", socket_path=path))
            with pytest.raises(ClientRequestError):
                await client.write(0, b"x")  # refused locally...
            await client.close()
            # ...and by the server, for a client that does not check.
            reader, writer = await asyncio.open_unix_connection(path)
            await reader.readexactly(18)
            writer.write(client_flags() + option(w.NBD_OPT_GO, go_data("ro")))
            await reader.readexactly(20 + 12 + 20 + 14 + 20)
            writer.write(request(w.NBD_CMD_WRITE, 0, 4, cookie=77) + b"evil")
            reply = await reader.readexactly(16)
            assert w.SIMPLE_REPLY.unpack(reply) == {
                "magic": w.NBD_SIMPLE_REPLY_MAGIC,
                "error": w.NBD_EPERM,
                "cookie": 77,
            }
            writer.close()
        assert mem.data == bytes(1 << 16)

    run(main())


def test_a_client_vanishing_mid_request_disturbs_no_one(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    slow = SlowBackend(MemoryBackend(1 << 20))

    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": slow})
        async with server:
            good = await NbdClient.connect(NbdAddress(socket_path=path))
            for _ in range(5):
                rude = await NbdClient.connect(NbdAddress(socket_path=path))
                pending = [asyncio.ensure_future(rude.read(i * 512, 512)) for i in range(20)]
                pending.append(asyncio.ensure_future(rude.write(0, b"z" * 512)))
                await asyncio.sleep(0.001)
                rude._abort()  # gone, with requests in flight
                await asyncio.gather(*pending, return_exceptions=True)
                data = os.urandom(8192)
                await good.write(65536, data)
                assert await good.read(65536, 8192) == data
            await good.close()
            await until(lambda: server.connections == 0)  # the orphaned commands finish

    with caplog.at_level(logging.ERROR, logger="pvio.nbd"):
        run(main())
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_flow_control_with_a_small_in_flight_limit(tmp_path: Path) -> None:
    slow = SlowBackend(MemoryBackend(1 << 20))

    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": slow}, max_in_flight=2)
        async with server, await NbdClient.connect(NbdAddress(socket_path=path)) as client:
            await asyncio.gather(*(client.write(i * 1024, bytes([i]) * 1024) for i in range(100)))
            got = await asyncio.gather(*(client.read(i * 1024, 1024) for i in range(100)))
            assert got == [bytes([i]) * 1024 for i in range(100)]

    run(main())


def test_tcp_on_localhost_and_list(tmp_path: Path) -> None:
    async def main() -> None:
        server = NbdServer({"a": MemoryBackend(4096), "b": MemoryBackend(8192)}, descriptions={"b": "bee"})
        async with server:
            host, port = await server.listen_tcp()
            assert host == "127.0.0.1"
            exports = await NbdClient.list_exports(f"nbd://127.0.0.1:{port}/")
            assert exports == [("a", ""), ("b", "bee")]
            async with await NbdClient.connect(f"nbd://127.0.0.1:{port}/b") as client:
                assert client.export.size == 8192 and client.export.description == "bee"
                await client.write(100, b"hello")
                assert await client.read(98, 9) == b"\0\0hello\0\0"

    run(main())


def test_close_disconnects_clients_and_removes_the_socket(tmp_path: Path) -> None:
    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": MemoryBackend(4096)})
        client = await NbdClient.connect(NbdAddress(socket_path=path))
        await server.close()
        assert not os.path.exists(path)
        with pytest.raises((ConnectionError, NbdCommandError)):
            await client.read(0, 1)

    run(main())


def test_hostile_connection_is_dropped_and_others_continue(tmp_path: Path) -> None:
    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": MemoryBackend(4096)})
        async with server, await NbdClient.connect(NbdAddress(socket_path=path)) as client:
            reader, writer = await asyncio.open_unix_connection(path)
            await reader.readexactly(18)
            writer.write(client_flags() + option(w.NBD_OPT_GO, go_data("")))
            await reader.readexactly(20 + 12 + 20 + 14 + 20)
            writer.write(b"\xde\xad\xbe\xef" * 7)  # bad request magic
            assert await reader.read() == b""  # hard disconnect
            writer.close()
            await client.write(0, b"still fine")
            assert await client.read(0, 10) == b"still fine"
            assert server.stats["protocol_errors"] == 1

    run(main())


def test_proxy_an_export_through_nbd_client(tmp_path: Path) -> None:
    """NbdClient is a BlockBackend: pvio can serve a remote export (qcow2 via qemu-nbd...)."""
    mem = MemoryBackend(1 << 20)

    async def main() -> None:
        origin, origin_path = await serve(tmp_path, {"origin": mem})
        async with origin:
            upstream = await NbdClient.connect(NbdAddress(export="origin", socket_path=origin_path))
            proxy = NbdServer({"proxy": upstream})
            async with proxy:
                path = await proxy.listen_unix(tmp_path / "proxy.sock")
                async with await NbdClient.connect(NbdAddress(socket_path=path)) as client:
                    assert client.export.has(w.NBD_FLAG_SEND_TRIM)
                    await client.write(1000, b"through two servers", fua=True)
                    await client.trim(0, 512)
            await upstream.close()
        assert mem.data[1000:1019] == b"through two servers"

    run(main())


def test_many_connections_at_once(tmp_path: Path) -> None:
    mem = MemoryBackend(1 << 20)

    async def one(path: str, i: int) -> None:
        async with await NbdClient.connect(NbdAddress(socket_path=path)) as c:
            await c.write(i * 4096, bytes([i]) * 4096)
            assert await c.read(i * 4096, 4096) == bytes([i]) * 4096

    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": mem})
        async with server:
            await asyncio.gather(*(one(path, i) for i in range(32)))

    run(main())


def test_in_flight_bytes_are_bounded(tmp_path: Path) -> None:
    class Gauge(SlowBackend):
        def __init__(self) -> None:
            super().__init__(MemoryBackend(4 << 20))
            self.now = self.peak = 0

        async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
            self.now += len(data)
            self.peak = max(self.peak, self.now)
            await super().write(offset, data, fua)
            self.now -= len(data)

    gauge = Gauge()
    chunk = 32 << 10

    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": gauge}, max_in_flight_bytes=4 * chunk)
        async with server, await NbdClient.connect(NbdAddress(socket_path=path)) as client:
            await asyncio.gather(*(client.write(i * chunk, bytes([i]) * chunk) for i in range(64)))
        assert gauge.inner.data[63 * chunk : 64 * chunk] == bytes([63]) * chunk

    run(main())
    # Enforced while parsing: the bound is reached and never passed.
    assert gauge.peak == 4 * chunk


def test_close_answers_in_flight_requests_first(tmp_path: Path) -> None:
    slow = SlowBackend(MemoryBackend(1 << 20))
    slow.inner.data[:4096] = b"\x42" * 4096

    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": slow})
        client = await NbdClient.connect(NbdAddress(socket_path=path))
        reads = [asyncio.ensure_future(client.read(0, 4096)) for _ in range(16)]
        while slow.started < 16:  # every read has reached the backend
            await asyncio.sleep(0.001)
        await server.close()
        assert [await r for r in reads] == [b"\x42" * 4096] * 16
        with pytest.raises(ConnectionError):
            await client.read(0, 1)

    run(main())


@pytest.mark.parametrize("kind", ["memory", "raw", "nbd-client-over-pvio", "raw-aligned-nbd"])
def test_backend_conformance(kind: str, tmp_path: Path) -> None:
    img = tmp_path / "c.img"
    with open(img, "wb") as f:
        f.truncate(1 << 20)

    async def main() -> None:
        if kind == "memory":
            await check_backend(MemoryBackend(1 << 20))
        elif kind == "raw":
            raw = RawFile(img)
            await check_backend(raw)
            await raw.close()
        else:
            inner: BlockBackend = (
                MemoryBackend(1 << 20, min_block=512, max_block=65536)
                if kind == "raw-aligned-nbd"
                else RawFile(img)
            )
            server, path = await serve(tmp_path, {"x": inner})
            async with server, await NbdClient.connect(NbdAddress(socket_path=path)) as client:
                await check_backend(client)
            if isinstance(inner, RawFile):
                await inner.close()

    run(main())


def test_conformance_suite_catches_a_lying_backend() -> None:
    class Forgetful(MemoryBackend):
        async def write(self, offset: int, data: bytes | memoryview, fua: bool = False) -> None:
            if len(data) == 2:
                return  # drops some writes on the floor
            await super().write(offset, data, fua)

    with pytest.raises(AssertionError, match="did not read back"):
        run(check_backend(Forgetful(1 << 20)))


def test_connections_beyond_the_limit_are_refused(tmp_path: Path) -> None:
    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": MemoryBackend(4096)}, max_connections=2)
        async with server:
            a = await NbdClient.connect(NbdAddress(socket_path=path))
            b = await NbdClient.connect(NbdAddress(socket_path=path))
            with pytest.raises(ConnectionError):
                await NbdClient.connect(NbdAddress(socket_path=path))
            await a.close()
            await until(lambda: server.connections < 2)
            c = await NbdClient.connect(NbdAddress(socket_path=path))  # room again
            assert await c.read(0, 1) == b"\0" and await b.read(0, 1) == b"\0"
            await b.close()
            await c.close()
            assert server.stats["refused_connections"] == 1

    run(main())


def test_a_silent_client_is_closed_after_the_handshake_timeout(tmp_path: Path) -> None:
    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": MemoryBackend(4096)}, handshake_timeout=0.2)
        async with server:
            reader, writer = await asyncio.open_unix_connection(path)
            assert len(await reader.readexactly(18)) == 18
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed on us
            writer.close()
            async with await NbdClient.connect(NbdAddress(socket_path=path)) as client:
                await asyncio.sleep(0.4)  # past the timeout, but the handshake is done
                assert await client.read(0, 1) == b"\0"
            assert server.stats["handshake_timeouts"] == 1

    run(main())


def test_fuzz_bytes_at_a_live_server_never_hurt_it(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Random and half-valid byte streams over real sockets; a good client keeps working."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    from nbd.helpers import request as req

    prefix = st.sampled_from(
        [b"", client_flags(), client_flags() + option(w.NBD_OPT_GO, go_data(""))]
    )
    body = st.lists(
        st.one_of(
            st.binary(max_size=64),
            st.builds(req, st.integers(0, 9), st.integers(0, 1 << 17), st.integers(0, 1 << 16)),
        ),
        max_size=6,
    ).map(b"".join)
    mem = MemoryBackend(1 << 17)

    async def attack(path: str, data: bytes) -> None:
        _, writer = await asyncio.open_unix_connection(path)
        writer.write(data)
        await writer.drain()
        await asyncio.sleep(0)
        writer.close()

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(prefix, body)
    def one(pre: bytes, rest: bytes) -> None:
        async def main() -> None:
            server, path = await serve(tmp_path, {"disk": mem})
            async with server, await NbdClient.connect(NbdAddress(socket_path=path)) as good:
                await asyncio.gather(*(attack(path, pre + rest) for _ in range(3)))
                await good.write(0, b"ok")
                assert await good.read(0, 2) == b"ok"

        run(main(), timeout=20)

    with caplog.at_level(logging.ERROR):
        one()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
