"""A blkfront disk exported over NBD: qemu-io writes and reads through blkfront and blkback."""

from __future__ import annotations

import asyncio
import os
import shutil
from pathlib import Path

import pytest

from blk.pair import blk_pair, make_image
from pvio.nbd.server_asyncio import NbdServer


async def _qemu_io(uri: str, *commands: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in commands:
        args += ["-c", c]
    proc = await asyncio.create_subprocess_exec(
        *args, uri, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), 30)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    text = out.decode()
    assert proc.returncode == 0, text
    return text


@pytest.mark.parametrize(("transport", "persistent"), [("map", False), ("copy", False), ("map", True)])
def test_qemu_io_through_blkfront(tmp_path: Path, transport: str, persistent: bool) -> None:
    if shutil.which("qemu-io") is None:
        raise AssertionError("qemu-io not found: apt-get install qemu-utils")
    img = make_image(tmp_path / "d.img", 8 << 20, fill=False)
    sock = str(tmp_path / "xvda.sock")

    async def body() -> None:
        async with blk_pair(img, transport=transport, persistent=persistent) as p:
            server = NbdServer({"xvda": p.front})
            p.front.open()
            await server.listen_unix(sock)
            try:
                uri = f"nbd+unix:///xvda?socket={sock}"
                # unaligned offsets and lengths: the NBD server and blkfront split them
                out = await _qemu_io(
                    uri,
                    "write -P 0x5a 1000 70000",
                    "write -P 0xa5 3145728 1048576",
                    "flush",
                    "read -P 0x5a 1000 70000",
                    "read -P 0xa5 3145728 1048576",
                    "read -P 0 0 1000",
                )
                assert "Pattern verification failed" not in out, out
                assert out.count("wrote") == 2 and out.count("read ") == 3, out
                # with persistent grants, reads of 64 KiB and more leave from blkfront's pages
                assert server.stats["reads_lent"] >= 2 or not persistent, server.stats
                assert len(p.front.grants.pool) == p.front.grants.pool_size  # every loan came back
            finally:
                await server.close()
                p.front.release()

    asyncio.run(asyncio.wait_for(body(), 60))
    data = img.read_bytes()
    assert data[1000:71000] == b"\x5a" * 70000
    assert data[:1000] == bytes(1000) and data[71000:72000] == bytes(1000)
    assert data[3 << 20 : 4 << 20] == b"\xa5" * (1 << 20)
    assert os.path.exists(sock) is False
