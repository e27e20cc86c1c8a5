"""Driver and guest domains as real processes, through XenStore and XenBus."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blk.pair import make_image
from domains.harness import Harness
from pvio.nbd.client_asyncio import NbdClient


@pytest.fixture
def harness(tmp_path: Path) -> Iterator[Harness]:
    h = Harness(tmp_path).start()
    try:
        yield h
    finally:
        h.close()


def nbd(uri: str, fn):  # type: ignore[no-untyped-def]
    async def body():  # type: ignore[no-untyped-def]
        client = await NbdClient.connect(uri)
        try:
            return await fn(client)
        finally:
            await client.close()

    return asyncio.run(asyncio.wait_for(body(), 60))


@pytest.mark.parametrize("transport", ["map", "copy"])
def test_guest_disk_through_driver_domain(harness: Harness, tmp_path: Path, transport: str) -> None:
    img = make_image(tmp_path / "disk.img", 16 << 20, fill=False)
    disk = harness.add_vbd(1, f"format=raw, vdev=xvda, access=rw, target={img}")
    harness.start_domain("driver", 0, "driver", transport=transport)
    harness.start_domain("guest", 1, "guest", disks=[disk])
    st = harness.status("guest")
    assert st is not None
    uri = st["disks"][0]["nbd_uri"]
    be = "/local/domain/0/backend/vbd/1/51712"
    fe = "/local/domain/1/device/vbd/51712"
    assert harness.read(f"{be}/state") == "4" and harness.read(f"{fe}/state") == "4"
    assert harness.read(f"{be}/sectors") == str((16 << 20) // 512)
    assert harness.read(f"{fe}/protocol") == "x86_64-abi"
    data = os.urandom(586 * 512)

    async def io(c: NbdClient) -> bytes:
        await c.write(4096 * 3 + 512, data)
        await c.flush()
        return await c.read(4096 * 3 + 512, len(data))

    assert nbd(uri, io) == data
    assert img.read_bytes()[4096 * 3 + 512 : 4096 * 3 + 512 + len(data)] == data
    # qemu-io, a real client, through the guest's export
    if shutil.which("qemu-io"):
        out = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x33 5000 9000", "-c",
                              "read -P 0x33 5000 9000", uri], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "verification failed" not in out.stdout, out.stdout + out.stderr
    # orderly stop: guest first (Closing -> Closed on both ends), then the driver
    assert harness.stop("guest") == 0
    assert harness.read(f"{fe}/state") == "6"
    assert harness.read(f"{be}/state") == "6"
    assert harness.stop("driver") == 0
    assert img.read_bytes()[5000:14000] == b"\x33" * 9000


def test_driver_domain_killed_mid_io(harness: Harness, tmp_path: Path) -> None:
    """SIGKILL the driver domain with writes in flight, start it again: the guest's
    requests complete without error, and data acknowledged before a flush is there."""
    img = make_image(tmp_path / "disk.img", 16 << 20, fill=False)
    disk = harness.add_vbd(1, f"format=raw, vdev=xvda, access=rw, target={img}")
    harness.start_domain("driver", 0, "driver")
    harness.start_domain("guest", 1, "guest", disks=[disk])
    st = harness.status("guest")
    assert st is not None
    uri = st["disks"][0]["nbd_uri"]
    flushed = os.urandom(1 << 20)
    blocks = [os.urandom(65536) for _ in range(96)]

    async def io(c: NbdClient) -> list[bytes]:
        await c.write(0, flushed)
        await c.flush()
        writes = [asyncio.ensure_future(c.write((2 << 20) + i * 65536, b)) for i, b in enumerate(blocks)]
        # The driver is serving (one write came back) and most are still in flight.
        _, pending = await asyncio.wait(writes, return_when=asyncio.FIRST_COMPLETED)
        assert len(pending) > len(blocks) // 2, "the writes finished before the kill"
        await asyncio.to_thread(harness.kill, "driver")  # SIGKILL, mid-I/O
        await asyncio.to_thread(harness.start_domain, "driver", 0, "driver")
        await asyncio.gather(*writes)  # no error for the callers
        await c.flush()
        return [await c.read((2 << 20) + i * 65536, 65536) for i in range(len(blocks))]

    got = nbd(uri, io)
    assert got == blocks
    data = img.read_bytes()
    assert data[: 1 << 20] == flushed
    assert data[2 << 20 : (2 << 20) + 96 * 65536] == b"".join(blocks)
    assert harness.read("/local/domain/1/device/vbd/51712/state") == "4"
    # blkfront re-issued what the dead driver had taken and never answered (blkif_recover);
    # the guest's status file carries its counters, refreshed once a second.
    deadline = time.monotonic() + 10
    while (reissued := _reissued(harness)) == 0 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert reissued > 0
    assert harness.stop("guest") == 0


def _reissued(harness: Harness) -> int:
    st = harness.status("guest") or {}
    return sum(int(d.get("statistics", {}).get("reissued", 0)) for d in st.get("disks", []))
