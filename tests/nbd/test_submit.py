"""The NBD server's short way: READ and WRITE handed to a backend's `submit_read` /
`submit_write` (`pvio.storage.backend.Submitting`) with no task per command."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from nbd.test_asyncio import run, serve
from pvio.nbd import wire as w
from pvio.nbd.address import NbdAddress
from pvio.nbd.client_asyncio import NbdClient, NbdCommandError
from pvio.storage.backend import MemoryBackend, Submitting

Done = Callable[[BaseException | None, bytes], None]


class SubmittingMemory(MemoryBackend):
    """A MemoryBackend with the short way: completions come in a later turn of the loop,
    in reverse order of submission (so replies leave out of order); `refuse` says no."""

    def __init__(self, size: int, **kw: object) -> None:
        super().__init__(size, **kw)  # type: ignore[arg-type]
        self.submitted = 0
        self.refuse = False
        self.held: list[Callable[[], None]] = []
        self.hold = False
        self.sync = False  # complete inside submit_*, before it returns

    def _later(self, fn: Callable[[], None]) -> None:
        if self.sync:
            fn()
            return
        if self.hold:
            self.held.append(fn)
            return
        self.held.insert(0, fn)
        if len(self.held) == 1:
            asyncio.get_running_loop().call_soon(self.release)

    def release(self) -> None:
        held, self.held = self.held, []
        for fn in held:
            fn()

    def submit_read(self, offset: int, length: int, done: Done) -> bool:
        if self.refuse:
            return False
        self.submitted += 1
        if self.fail_at is not None and offset <= self.fail_at < offset + length:
            self._later(lambda: done(OSError(5, "failing sector"), b""))
        else:
            data = bytes(self.data[offset : offset + length])
            self._later(lambda: done(None, data))
        return True

    def submit_write(self, offset: int, data: bytes | memoryview, done: Done) -> bool:
        if self.refuse:
            return False
        self.submitted += 1
        self.data[offset : offset + len(data)] = data
        self._later(lambda: done(None, b""))
        return True


def test_the_backend_is_seen_to_submit() -> None:
    assert isinstance(SubmittingMemory(4096), Submitting)
    assert not isinstance(MemoryBackend(4096), Submitting)


def test_reads_and_writes_take_the_short_way_and_others_the_task(tmp_path: Path) -> None:
    mem = SubmittingMemory(1 << 20)

    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": mem})
        async with server, await NbdClient.connect(NbdAddress(socket_path=path)) as client:
            blocks = [os.urandom(4096) for _ in range(32)]
            await asyncio.gather(*(client.write(i * 4096, b) for i, b in enumerate(blocks)))
            assert await asyncio.gather(*(client.read(i * 4096, 4096) for i in range(32))) == blocks
            assert mem.submitted == 64
            await client.flush()  # not a READ or WRITE: the awaiting way
            await client.write(0, b"f" * 512, fua=True)  # FUA: the awaiting way too
            assert mem.flushes == 1 and mem.submitted == 64
            mem.refuse = True  # the backend says no: the same commands still work
            await client.write(8192, b"slow")
            assert await client.read(8192, 4) == b"slow" and mem.submitted == 64

    run(main())


def test_a_failed_submitted_read_is_eio_and_the_connection_lives(tmp_path: Path) -> None:
    mem = SubmittingMemory(1 << 16, fail_at=8192)

    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": mem})
        async with server, await NbdClient.connect(NbdAddress(socket_path=path)) as client:
            with pytest.raises(NbdCommandError) as info:
                await client.read(8192, 512)
            assert info.value.errno == w.NBD_EIO and mem.submitted == 1
            assert await client.read(0, 4) == bytes(4)
            assert server.stats["backend_errors"] == 1

    run(main())


def test_close_waits_for_submitted_commands(tmp_path: Path) -> None:
    mem = SubmittingMemory(1 << 16)

    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": mem})
        client = await NbdClient.connect(NbdAddress(socket_path=path))
        mem.data[0:4] = b"kept"
        mem.hold = True
        read = asyncio.ensure_future(client.read(0, 4))
        while not mem.held:  # the command reached the backend and waits there
            await asyncio.sleep(0.001)
        closing = asyncio.ensure_future(server.close(timeout=10))
        await asyncio.sleep(0.05)
        assert not closing.done()  # it could have closed: it waits for the command
        mem.release()
        assert await asyncio.wait_for(read, 10) == b"kept"
        await asyncio.wait_for(closing, 10)
        await client.close()

    run(main())


def test_a_backend_may_complete_before_submit_returns(tmp_path: Path) -> None:
    mem = SubmittingMemory(1 << 16)
    mem.sync = True

    async def main() -> None:
        server, path = await serve(tmp_path, {"disk": mem})
        async with server, await NbdClient.connect(NbdAddress(socket_path=path)) as client:
            await asyncio.gather(*(client.write(i * 512, bytes([i]) * 512) for i in range(16)))
            got = await asyncio.gather(*(client.read(i * 512, 512) for i in range(16)))
            assert got == [bytes([i]) * 512 for i in range(16)] and mem.submitted == 32
            (conn,) = server._connections
            assert conn.fast_in_flight == 0  # nothing counted as running once answered
        await asyncio.wait_for(server.close(), 10)  # and nothing for close to wait on

    run(main())
