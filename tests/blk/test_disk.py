"""blkback's disks: raw files (thread pool, RWF_NOWAIT fast path) and NBD URIs."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from blk.pair import asynctest, blk_pair, make_image
from pvio.blk.disk import BackendDisk, ThreadedDisk, is_nbd_uri, open_disk
from pvio.blk.storage import RawFileStorage
from pvio.export.backend import MemoryBackend
from pvio.export.conformance import check_backend
from pvio.export.nbd_server_asyncio import NbdServer


@asynctest
async def test_threaded_disk_both_paths(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 1 << 20)
    ref = img.read_bytes()
    for nowait in (True, False):
        disk = ThreadedDisk(RawFileStorage(img), nowait=nowait)
        bufs = [memoryview(bytearray(4096)) for _ in range(3)]
        await disk.readv(8192, bufs)
        assert b"".join(bytes(b) for b in bufs) == ref[8192 : 8192 + 3 * 4096]
        data = os.urandom(8192)
        await disk.writev(65536, [memoryview(data)[:4096], memoryview(data)[4096:]])
        await disk.flush()
        assert img.read_bytes()[65536 : 65536 + 8192] == data
        assert (disk.nowait > 0) == nowait
        await disk.close()


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
        assert isinstance(disk, BackendDisk) and disk.size == 1 << 20
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
