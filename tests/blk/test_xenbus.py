"""blkfront and blkback through XenStore and XenBus, both ends in one process.

An in-process hypervisor, pvio's xenstored daemon on a socket, the driver domain's
`BlkbackService` and the guest's `attach_disk`, with the toolstack's writes done the way
libxl does them: handshake to Connected, online resize, an explicit suspend/resume with
requests in flight, a frontend that publishes a bad key, and removal by the toolstack.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from blk.pair import asynctest, kick_reading_late, make_image
from pvio.abi.xenbus import XenbusState as S
from pvio.blk.xenbus_backend import BlkbackService
from pvio.domains.xen_guest import GuestDisk, attach_disk, detach_disk
from pvio.hypervisor.client import Domain
from pvio.hypervisor.inprocess import InProcessHypervisor
from pvio.toolstack import diskspec, xslayout
from pvio.xenstore.client import AsyncClient
from pvio.xenstore.daemon import XenStoreDaemon, attach_domain

BE = "/local/domain/0/backend/vbd/1/51712"
FE = "/local/domain/1/device/vbd/51712"


@dataclass
class World:
    tool: AsyncClient
    service: BlkbackService
    gdom: Domain
    gxs: AsyncClient

    async def ops(self, ops: list[xslayout.XsOp]) -> None:
        async def run(tx: int) -> None:
            for op in ops:
                if op.op == "rm":
                    try:
                        await self.tool.rm(op.path, tx)
                    except Exception:  # absent is fine
                        pass
                elif op.op == "mkdir":
                    await self.tool.mkdir(op.path, tx)
                elif op.op == "write":
                    await self.tool.write(op.path, op.value, tx)
                else:
                    await self.tool.set_perms(op.path, list(op.perms), tx)

        await self.tool.transact(run)

    async def read(self, path: str) -> str | None:
        v = await self.tool.read_or(path, None)
        return None if v is None else v.decode()

    async def until(self, path: str, value: str, timeout: float = 10) -> None:
        for _ in range(int(timeout / 0.01)):
            if await self.read(path) == value:
                return
            await asyncio.sleep(0.01)
        raise AssertionError(f"{path} never became {value!r} (is {await self.read(path)!r})")


@asynccontextmanager
async def world(
    tmp_path: Path, image: Path, access: str = "rw", fmt: str = "raw", spec_extra: str = ""
) -> AsyncIterator[World]:
    daemon = XenStoreDaemon(tmp_path / "xs.sock")
    await daemon.start()
    hv = InProcessHypervisor()
    tool = await AsyncClient.open(str(daemon.socket_path))
    await tool.introduce(1)
    w = World(tool, None, None, None)  # type: ignore[arg-type]
    await w.ops(xslayout.domain_add(0, "driver") + xslayout.domain_add(1, "guest"))
    disk = diskspec.parse(f"format={fmt}, vdev=xvda, access={access}, {spec_extra}target={image}")
    await w.ops(xslayout.vbd_add(1, disk, str(image)))
    ddom = await hv.create_domain("driver", 2048, domid=0)
    gdom = await hv.create_domain("guest", 4096, domid=1)
    dxs = await AsyncClient.open(sock=await asyncio.to_thread(attach_domain, daemon.control_path, 0))
    gxs = await AsyncClient.open(sock=await asyncio.to_thread(attach_domain, daemon.control_path, 1))
    service = BlkbackService(ddom, dxs)
    await service.start()
    w.service, w.gdom, w.gxs = service, gdom, gxs
    try:
        yield w
    finally:
        await service.stop()
        for c in (gxs, dxs, tool):
            await c.close()
        await gdom.close()
        await ddom.close()
        await daemon.close()


async def attach(w: World) -> GuestDisk:
    return await attach_disk(w.gdom, w.gxs, "xvda", 51712)


@asynctest
async def test_handshake_resize_and_close(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 << 20)
    async with world(tmp_path, img) as w:
        d = await attach(w)
        assert await w.read(f"{BE}/state") == "4" and await w.read(f"{FE}/state") == "4"
        assert await w.read(f"{BE}/feature-flush-cache") == "1"
        assert await w.read(f"{BE}/info") == "0"
        data = os.urandom(65536)
        await d.front.write(8192, data)
        assert await d.front.read(8192, 65536) == data
        # online resize: the image grows, blkback publishes, blkfront re-reads
        with open(img, "r+b") as f:
            f.truncate(8 << 20)
        await w.service.resize(BE)
        for _ in range(500):
            if d.front.disk is not None and d.front.disk.sectors == (8 << 20) // 512:
                break
            await asyncio.sleep(0.01)
        assert d.front.info.size == 8 << 20
        await d.front.write((8 << 20) - 4096, b"e" * 4096)
        # statistics appear under the backend directory (published at most once a second)
        deadline = asyncio.get_running_loop().time() + 10
        while int(await w.read(f"{BE}/statistics/wr_req") or 0) < 2:
            assert asyncio.get_running_loop().time() < deadline, "no statistics within 10 s"
            await asyncio.sleep(0.05)
        # with how the image's transfers were made: every write and read accounted for
        ways = [int(await w.read(f"{BE}/statistics/{k}") or -1) for k in ("io_nowait", "io_gated", "io_pool_jobs")]
        assert min(ways) >= 0 and sum(ways) >= 1, ways
        assert await w.read(f"{BE}/statistics/gate_slow_writes") is not None
        # orderly close: both ends Closed
        await detach_disk(d)
        await w.until(f"{FE}/state", "6")
        await w.until(f"{BE}/state", "6")
    assert img.read_bytes()[8192 : 8192 + 65536] == data
    assert img.read_bytes()[-4096:] == b"e" * 4096


@asynctest
async def test_suspend_resume_reissues_in_flight(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 4 << 20)
    async with world(tmp_path, img) as w:
        d = await attach(w)
        blocks = [os.urandom(4096) for _ in range(64)]
        writes = [asyncio.ensure_future(d.front.write(i * 4096, b)) for i, b in enumerate(blocks)]
        await asyncio.sleep(0)
        await d.end.renegotiate()
        await asyncio.gather(*writes)
        assert d.driver.connections == 2
        got = await asyncio.gather(*(d.front.read(i * 4096, 4096) for i in range(64)))
        assert got == blocks
        await detach_disk(d)


@asynctest
async def test_a_late_watch_event_leaves_a_connected_vbd_alone(tmp_path: Path) -> None:
    """blkback Connected that reads a late Initialised of a frontend Connected by now
    (a restarted driver domain met this) keeps its ring: the frontend will not
    publish again, so dropping it would leave the disk dead."""
    img = make_image(tmp_path / "d.img", 1 << 20)
    async with world(tmp_path, img) as w:
        d = await attach(w)
        end = w.service.devices[BE].end
        rings = list(w.service.devices[BE].driver.rings)
        assert rings and await w.read(f"{FE}/state") == "4"
        await kick_reading_late(end, S.Initialised)
        assert w.service.devices[BE].driver.rings == rings
        await asyncio.wait_for(d.front.write(0, b"w" * 4096), 10)
        assert await asyncio.wait_for(d.front.read(0, 4096), 10) == b"w" * 4096
        await detach_disk(d)


@asynctest
async def test_disk_in_use_refuses_to_close(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 1 << 20)
    async with world(tmp_path, img) as w:
        d = await attach(w)
        d.front.open()
        try:
            await d.front.close()
        except OSError as e:
            assert "in use" in str(e)
        else:
            raise AssertionError("a disk in use closed")
        d.front.release()
        await detach_disk(d)


@asynctest
async def test_read_only_vbd(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 1 << 20)
    before = img.read_bytes()
    async with world(tmp_path, img, access="ro") as w:
        d = await attach(w)
        assert await w.read(f"{BE}/info") == "4"  # VDISK_READONLY
        assert d.front.info.read_only
        try:
            await d.front.write(0, b"x" * 512)
        except OSError:
            pass
        else:
            raise AssertionError("a write to a read-only disk succeeded")
        assert await d.front.read(0, 512) == before[:512]
        await detach_disk(d)
    assert img.read_bytes() == before


@asynctest
async def test_bad_frontend_key_is_dev_fatal(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 1 << 20)
    async with world(tmp_path, img) as w:
        await w.until(f"{BE}/state", "2")  # InitWait
        # a frontend that asks for a ring bigger than blkback maps
        async def publish(tx: int) -> None:
            await w.gxs.write(f"{FE}/ring-page-order", "9", tx)
            await w.gxs.write(f"{FE}/event-channel", "1", tx)
            await w.gxs.write(f"{FE}/state", str(int(S.Initialised)), tx)

        await w.gxs.transact(publish)
        await w.until(f"{BE}/state", "5")  # Closing
        err = await w.read("/local/domain/0/error/backend/vbd/1/51712/error")
        assert err is not None and "ring-page-order" in err


@asynctest
async def test_formatted_image_is_never_served_raw(tmp_path: Path) -> None:
    """format=qcow2 with a file path: blkback refuses (an error node, Closing) and writes
    nothing, instead of exposing the format's metadata as disk bytes."""
    img = make_image(tmp_path / "d.qcow2", 1 << 20)
    before = img.read_bytes()
    async with world(tmp_path, img, fmt="qcow2") as w:
        await w.until(f"{BE}/state", "5")
        err = await w.read("/local/domain/0/error/backend/vbd/1/51712/error")
        assert err is not None and "qcow2" in err and "NBD" in err
        assert BE not in w.service.devices
    assert img.read_bytes() == before


@asynctest
async def test_toolstack_removal(tmp_path: Path) -> None:
    img = make_image(tmp_path / "d.img", 1 << 20)
    async with world(tmp_path, img) as w:
        d = await attach(w)
        await w.ops(xslayout.vbd_remove_request(1, 51712))
        await w.until(f"{FE}/state", "6")
        await w.until(f"{BE}/state", "6")
        for _ in range(300):
            if BE not in w.service.devices:
                break
            await asyncio.sleep(0.01)
        assert BE not in w.service.devices
        try:
            await d.front.read(0, 512)
        except OSError:
            pass
        else:
            raise AssertionError("a removed disk still reads")
        await d.end.stop()


@asynctest
async def test_features_are_written_when_linux_writes_them(tmp_path: Path) -> None:
    """feature-max-indirect-segments with InitWait (probe), feature-persistent only with
    Connected; the frontend writes its own feature-persistent and uses both."""
    img = make_image(tmp_path / "d.img", 4 << 20)
    async with world(tmp_path, img) as w:
        await w.until(f"{BE}/state", "2")
        assert await w.read(f"{BE}/feature-max-indirect-segments") == "256"
        assert await w.read(f"{BE}/feature-persistent") is None
        d = await attach(w)
        assert await w.read(f"{BE}/feature-persistent") == "1"
        assert await w.read(f"{FE}/feature-persistent") == "1"
        assert d.front.persistent and d.front.max_indirect_segments == 32
        data = os.urandom(256 * 1024)
        await d.front.write(0, data)
        assert await d.front.read(0, len(data)) == data
        ring = w.service.devices[BE].driver.ring
        assert ring is not None and ring.persistent and ring.stats.wr_req == 2
        await detach_disk(d)
