"""pvio's NBD client against qemu-nbd serving qcow2: the storage path for non-raw disks."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd.helpers import ServerThread
from pvio.nbd import wire as w
from pvio.nbd.address import NbdAddress
from pvio.nbd.client import ClientRequestError, NbdOptionError
from pvio.nbd.client_asyncio import NbdClient
from pvio.storage.backend import BlockBackend
from pvio.testing.backend_conformance import check_backend

SIZE = 32 << 20

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-nbd") is None or shutil.which("qemu-img") is None,
    reason="qemu-utils is not installed (tools/install.sh installs it)",
)


def sh(*args: str) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, f"{args}: {proc.stdout}{proc.stderr}"
    return proc.stdout


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


class QemuNbd:
    def __init__(self, image: Path, sock: Path, *extra: str) -> None:
        self.image = image
        self.sock = sock
        self.proc = subprocess.Popen(
            ["qemu-nbd", f"--socket={sock}", "--format=qcow2", "--persistent", "--shared=8",
             "--export-name=q", "--discard=unmap", *extra, str(image)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )  # fmt: skip
        deadline = time.monotonic() + 15
        while not _listening(sock):  # the socket file exists a moment before listen()
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("qemu-nbd did not start")
            time.sleep(0.02)

    def address(self, export: str = "q") -> NbdAddress:
        return NbdAddress(export=export, socket_path=str(self.sock))

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def qcow2(tmp_path: Path) -> Path:
    image = tmp_path / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), str(SIZE))
    return image


@pytest.fixture
def qemu(qcow2: Path, tmp_path: Path) -> Iterator[QemuNbd]:
    server = QemuNbd(qcow2, tmp_path / "qemu.sock")
    try:
        yield server
    finally:
        server.stop()


def run(coro: object, timeout: float = 60) -> object:
    async def bounded() -> object:
        return await asyncio.wait_for(coro, timeout)  # type: ignore[arg-type]

    return asyncio.run(bounded())


def qcow2_bytes(image: Path, tmp_path: Path) -> bytes:
    raw = tmp_path / "flat.raw"
    sh("qemu-img", "convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
    return raw.read_bytes()


def test_handshake_and_export_details(qemu: QemuNbd) -> None:
    async def main() -> None:
        async with await NbdClient.connect(qemu.address()) as client:
            exp = client.export
            assert exp.size == SIZE
            assert exp.has(w.NBD_FLAG_SEND_FLUSH) and exp.has(w.NBD_FLAG_SEND_FUA)
            assert exp.has(w.NBD_FLAG_SEND_TRIM) and exp.has(w.NBD_FLAG_SEND_WRITE_ZEROES)
            assert not exp.has(w.NBD_FLAG_READ_ONLY)
            assert exp.min_block >= 1 and exp.max_block >= 1 << 20
        assert await NbdClient.list_exports(qemu.address()) == [("q", "")]

    run(main())


def test_pipelined_io_lands_in_the_qcow2(qemu: QemuNbd, tmp_path: Path) -> None:
    blocks = {i * 65536 + (i % 7) * 512: os.urandom(4096 * (1 + i % 5)) for i in range(128)}

    async def main() -> None:
        async with await NbdClient.connect(qemu.address()) as client:
            await asyncio.gather(*(client.write(off, data) for off, data in blocks.items()))
            got = await asyncio.gather(*(client.read(off, len(data)) for off, data in blocks.items()))
            assert got == list(blocks.values())
            await client.write(SIZE - 4096, b"\xee" * 4096, fua=True)
            await client.write_zeroes(0, 65536)
            await client.trim(20 << 20, 1 << 20)
            await client.flush()

    run(main())
    qemu.stop()
    data = qcow2_bytes(qemu.image, tmp_path)
    expect = bytearray(SIZE)
    for off, chunk in blocks.items():
        expect[off : off + len(chunk)] = chunk
    expect[SIZE - 4096 :] = b"\xee" * 4096
    expect[0:65536] = bytes(65536)
    expect[20 << 20 : 21 << 20] = bytes(1 << 20)  # qemu-nbd reads trimmed qcow2 clusters as zero
    assert data == expect


def test_unknown_export_and_local_refusals(qemu: QemuNbd, qcow2: Path, tmp_path: Path) -> None:
    async def main() -> None:
        with pytest.raises(NbdOptionError) as info:
            await NbdClient.connect(qemu.address("nope"))
        assert info.value.reply == w.NBD_REP_ERR_UNKNOWN
        async with await NbdClient.connect(qemu.address()) as client:
            with pytest.raises(ClientRequestError):
                await client.read(SIZE - 1, 2)
            assert await client.read(SIZE - 1, 1) == b"\0"

    run(main())


def test_read_only_qemu_nbd(qcow2: Path, tmp_path: Path) -> None:
    server = QemuNbd(qcow2, tmp_path / "ro.sock", "--read-only")
    try:

        async def main() -> None:
            async with await NbdClient.connect(server.address()) as client:
                assert client.info.read_only and not client.info.can_trim
                with pytest.raises(ClientRequestError):
                    await client.write(0, b"x")
                assert await client.read(0, 4) == bytes(4)

        run(main())
    finally:
        server.stop()


def test_qcow2_served_through_pvio(qemu: QemuNbd, tmp_path: Path) -> None:
    """A real client → pvio's NbdServer → NbdClient → qemu-nbd → qcow2: blkback's path."""
    if shutil.which("qemu-io") is None:
        pytest.skip("qemu-io is not installed")

    async def exports() -> dict[str, BlockBackend]:
        return {"qcow2": await NbdClient.connect(qemu.address())}

    with ServerThread(exports, str(tmp_path / "pvio.sock")) as pvio:
        sh(
            "qemu-io", "-f", "raw",
            "-c", "write -P 0x5a 3 100000", "-c", "write -P 0xa5 10M 1M", "-c", "flush",
            "-c", "read -P 0x5a 3 100000",
            pvio.uri("qcow2"),
        )  # fmt: skip
    qemu.stop()
    data = qcow2_bytes(qemu.image, tmp_path)
    assert data[3:100003] == b"\x5a" * 100000 and data[:3] == bytes(3)
    assert data[10 << 20 : 11 << 20] == b"\xa5" * (1 << 20)


def test_nbd_client_over_qemu_nbd_passes_backend_conformance(qemu: QemuNbd) -> None:
    async def main() -> None:
        async with await NbdClient.connect(qemu.address()) as client:
            await check_backend(client)

    run(main())
