"""Large READs of a file served over NBD: lent from buffers used again (`BufferPool`),
never showing a former read's bytes, safe while a slow client leaves replies queued."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import AsyncIterator
from pathlib import Path

from nbd.helpers import client_flags, go_data, option, request, until
from pvio.nbd import wire as w
from pvio.nbd.address import NbdAddress
from pvio.nbd.client_asyncio import NbdClient
from pvio.nbd.server_asyncio import NbdServer
from pvio.storage.rawfile import RawFile

MiB = 1 << 20


def image(tmp_path: Path, size: int) -> tuple[Path, bytearray]:
    data = bytearray(os.urandom(size))
    path = tmp_path / "disk.img"
    path.write_bytes(data)
    return path, data


@contextlib.asynccontextmanager
async def served(tmp_path: Path, path: Path) -> AsyncIterator[tuple[RawFile, NbdServer, NbdClient]]:
    """`path` served by a raw file over NBD on a UNIX socket, and a client of it."""
    raw = RawFile(path)
    server = NbdServer({"disk": raw})
    sock = await server.listen_unix(tmp_path / "nbd.sock")
    async with server, await NbdClient.connect(NbdAddress(socket_path=sock)) as client:
        yield raw, server, client
    await raw.close()


def test_large_reads_come_from_reused_buffers_and_are_always_fresh(tmp_path: Path) -> None:
    path, data = image(tmp_path, 16 * MiB)
    rng = random.Random(7)
    sizes = [64 << 10, MiB, (200 << 10) + 3, 3 * MiB, (64 << 10) + 1, 4096]

    async def main() -> None:
        async with served(tmp_path, path) as (raw, server, client):
            for _round in range(4):
                reads = [(rng.randrange(0, 16 * MiB - n), n) for n in sizes * 3]
                got = await asyncio.gather(*(client.read(o, n) for o, n in reads))
                assert got == [bytes(data[o : o + n]) for o, n in reads]
                # New bytes where the next round reads: a reused buffer must show them.
                o = rng.randrange(0, 15 * MiB)
                fresh = os.urandom(MiB)
                await client.write(o, fresh)
                data[o : o + MiB] = fresh
            assert server.stats["reads_lent"] >= 4 * 5 * 3  # every read of 64 KiB or more
        assert raw.buffers.reused > 0 and raw.buffers.allocated < 4 * 5 * 3, vars(raw.buffers)

    asyncio.run(main())


def test_a_slow_reader_gets_copies_while_the_buffers_serve_others(tmp_path: Path) -> None:
    # A client that stops reading fills the socket; what a lent reply could not send is
    # copied into the transport, the buffer goes back to the pool and the next reads use
    # it at once.  The queued replies must still carry the bytes they were read with.
    path, data = image(tmp_path, 16 * MiB)
    first = [(k * MiB, MiB) for k in range(6)]
    second = [(8 * MiB + k * MiB, MiB) for k in range(6)]

    async def main() -> None:
        raw = RawFile(path)
        server = NbdServer({"disk": raw})
        sock = await server.listen_unix(tmp_path / "nbd.sock")
        async with server:
            reader, writer = await asyncio.open_unix_connection(sock)
            await reader.readexactly(18)
            writer.write(client_flags() + option(w.NBD_OPT_GO, go_data("disk")))
            await reader.readexactly(20 + 12 + 20 + 14 + 20)
            writer.write(b"".join(request(w.NBD_CMD_READ, o, n, cookie=i) for i, (o, n) in enumerate(first)))
            # Every buffer back in the pool while the client has read nothing: 6 MiB do not
            # fit a socket's buffer, so the transport holds copies of what was not sent.
            await until(lambda: raw.buffers.kept == len(first) * MiB)
            assert server.stats["reads_lent"] == len(first)
            # More reads, of other bytes, into those same buffers, before the client reads a thing.
            writer.write(b"".join(request(w.NBD_CMD_READ, o, n, cookie=100 + i) for i, (o, n) in enumerate(second)))
            want = {i: (o, n) for i, (o, n) in enumerate(first)} | {100 + i: (o, n) for i, (o, n) in enumerate(second)}
            for _ in range(len(want)):
                magic, error, cookie = w.SIMPLE_REPLY.packer.unpack(await reader.readexactly(16))
                assert (magic, error) == (w.NBD_SIMPLE_REPLY_MAGIC, 0)
                o, n = want.pop(cookie)
                assert await reader.readexactly(n) == bytes(data[o : o + n]), f"reply {cookie} carries other bytes"
            writer.close()
        assert raw.buffers.reused > 0
        await raw.close()

    asyncio.run(main())


def test_pipelined_large_writes_land_whole_through_reused_payload_buffers(tmp_path: Path) -> None:
    path, data = image(tmp_path, 16 * MiB)
    rng = random.Random(11)
    sizes = [64 << 10, MiB, (200 << 10) + 3, 2 * MiB, (64 << 10) + 1, 4096, MiB]

    async def main() -> None:
        async with served(tmp_path, path) as (_raw, server, client):
            for _round in range(3):
                # One slot each, so that the file's bytes do not depend on the order.
                rng.shuffle(sizes)
                slot = 2 * MiB + (64 << 10)
                writes = [(k * slot + rng.randrange(0, 4096), os.urandom(n)) for k, n in enumerate(sizes)]
                await asyncio.gather(*(client.write(o, b) for o, b in writes))
                for o, b in writes:
                    data[o : o + len(b)] = b
                got = await asyncio.gather(*(client.read(o, len(b)) for o, b in writes))
                assert got == [b for _, b in writes]
            assert server.buffers.reused > 0, vars(server.buffers)
        assert path.read_bytes() == bytes(data)

    asyncio.run(main())
