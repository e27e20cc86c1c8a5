"""blkback's disks by their `params`: raw image paths and NBD URIs (`open_disk`)."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

from blk.pair import asynctest, blk_pair, make_image
from pvio.blk.xenbus_backend import open_disk
from pvio.nbd.address import is_nbd_uri
from pvio.nbd.server_asyncio import NbdServer
from pvio.storage.backend import FlatVectored, MemoryBackend
from pvio.storage.rawfile import RawFile
from pvio.testing.backend_conformance import check_backend


@asynctest
async def test_nbd_uri_disk_serves_blkfront(tmp_path: Path) -> None:
    sock = str(tmp_path / "remote.sock")
    remote = MemoryBackend(1 << 20)
    server = NbdServer({"remote": remote})
    await server.listen_unix(sock)
    uri = f"nbd+unix:///remote?socket={sock}"
    assert is_nbd_uri(uri) and not is_nbd_uri(str(tmp_path / "x.img"))
    try:
        disk = await open_disk(uri, read_only=False)
        assert isinstance(disk, FlatVectored) and disk.info.size == 1 << 20
        async with blk_pair(tmp_path / "unused", disk=disk) as p:
            await check_backend(p.front)
            data = os.urandom(12288)
            await p.front.write(4096, data)
            await p.front.flush()
            assert bytes(remote.data[4096 : 4096 + 12288]) == data
            assert remote.flushes > 0
    finally:
        await server.close()


@asynctest
async def test_unreachable_nbd_uri_is_a_storage_error(tmp_path: Path) -> None:
    try:
        await asyncio.wait_for(open_disk(f"nbd+unix:///x?socket={tmp_path}/none.sock", read_only=True), 15)
    except OSError as e:
        assert "cannot reach" in str(e)
    else:
        raise AssertionError("open_disk succeeded on a missing socket")


@asynctest
async def test_read_only_nbd_disk_refuses_writes(tmp_path: Path) -> None:
    sock = str(tmp_path / "remote.sock")
    server = NbdServer({"remote": MemoryBackend(1 << 20)})
    await server.listen_unix(sock)
    try:
        disk = await open_disk(f"nbd+unix:///remote?socket={sock}", read_only=True)
        assert disk.info.read_only and not disk.info.can_trim
        try:
            await disk.writev(0, [memoryview(b"x" * 512)])
        except OSError as e:
            assert e.errno == errno.EROFS
        else:
            raise AssertionError("a read-only disk took a write")
        await disk.close()
    finally:
        await server.close()


@asynctest
async def test_raw_path_opens_a_raw_file(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 1 << 20)
    disk = await open_disk(str(img), read_only=True)
    assert isinstance(disk, RawFile) and disk.info.read_only
    await disk.close()
