"""netfront and netback through XenStore and XenBus, both ends in one process.

pvio's xenstored on a socket, the driver domain's `NetbackService` (its host ends are lists
here) and two guests' `attach_vif`, with the toolstack's writes done as libxl does them:
the handshake to Connected with netif.h's keys (split event channels, as offered),
frames guest → host → other guest, a frontend publishing keys netback refuses, recovery
from a netback that restarted, and an orderly close."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from blk.pair import asynctest, kick_reading_late
from net.pair import wait_for
from pvio.hypervisor.client import Domain
from pvio.hypervisor.inprocess import InProcessHypervisor
from pvio.net.backend import NetbackQueue
from pvio.net.multiqueue import select_queue
from pvio.net.slots import FrameParts, TxFrame
from pvio.net.xenbus_backend import NetbackService, VifConfig
from pvio.net.xenbus_frontend import GuestVif, attach_vif, detach_vif
from pvio.toolstack import vifspec, xslayout
from pvio.xenbus import XenbusState
from pvio.xenstore.client import AsyncClient
from pvio.xenstore.daemon import XenStoreDaemon, attach_domain

BE1 = "/local/domain/0/backend/vif/1/0"
FE1 = "/local/domain/1/device/vif/0"


@dataclass
class ListHost:
    """A vif's host end that is a list, and a switch: frames go to the other vifs, on the
    queue of their flow (`select_queue`: no kernel picks one here)."""

    config: VifConfig
    hosts: dict[str, ListHost]
    got: list[bytes] = field(default_factory=list)
    #: the queue each frame in `got` came on
    got_queue: list[int] = field(default_factory=list)
    queues: list[NetbackQueue] = field(default_factory=list)

    def deliver(self, parts: FrameParts, frame: TxFrame, queue: int) -> None:
        data = b"".join(parts)
        self.got.append(data)
        self.got_queue.append(queue)
        for other in self.hosts.values():
            if other is not self and other.queues:
                other.queues[select_queue(data, len(other.queues))].transmit(data)

    def attach(self, queues: Sequence[NetbackQueue]) -> None:
        self.queues = list(queues)

    async def close(self) -> None:
        self.hosts.pop(self.config.ifname, None)


@dataclass
class World:
    tool: AsyncClient
    service: NetbackService
    hosts: dict[str, ListHost]
    guests: dict[int, tuple[Domain, AsyncClient]]

    async def ops(self, ops: list[xslayout.XsOp]) -> None:
        async def run(tx: int) -> None:
            for op in ops:
                if op.op == "rm":
                    try:
                        await self.tool.rm(op.path, tx)
                    except Exception:
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


@asynccontextmanager
async def world(tmp_path: Path) -> AsyncIterator[World]:
    daemon = XenStoreDaemon(tmp_path / "xs.sock")
    await daemon.start()
    hv = InProcessHypervisor()
    tool = await AsyncClient.open(str(daemon.socket_path))
    hosts: dict[str, ListHost] = {}
    w = World(tool, None, hosts, {})  # type: ignore[arg-type]
    await w.ops(xslayout.domain_add(0, "driver"))
    for domid in (1, 2):
        await tool.introduce(domid)
        await w.ops(xslayout.domain_add(domid, f"g{domid}"))
        spec = vifspec.parse(f"mac=00:16:3e:00:00:0{domid}, bridge=pvbr0, ip=10.0.1.{domid}/24")
        await w.ops(xslayout.vif_add(domid, 0, spec))
    ddom = await hv.create_domain("driver", 2048, domid=0)
    dxs = await AsyncClient.open(sock=await asyncio.to_thread(attach_domain, daemon.control_path, 0))

    async def open_host(config: VifConfig) -> ListHost:
        hosts[config.ifname] = ListHost(config, hosts)
        return hosts[config.ifname]

    service = NetbackService(ddom, dxs, open_host)
    await service.start()
    w.service = service
    for domid in (1, 2):
        gdom = await hv.create_domain(f"g{domid}", 2048, domid=domid)
        gxs = await AsyncClient.open(sock=await asyncio.to_thread(attach_domain, daemon.control_path, domid))
        w.guests[domid] = (gdom, gxs)
    try:
        yield w
    finally:
        await w.service.stop()
        for gdom, gxs in w.guests.values():
            await gxs.close()
            await gdom.close()
        for c in (dxs, tool):
            await c.close()
        await ddom.close()
        await daemon.close()


async def attach(w: World, domid: int, got: list[bytes], queues: int = 1) -> GuestVif:
    dom, xs = w.guests[domid]
    return await attach_vif(dom, xs, 0, lambda d, m: got.append(b"".join(d)), queues=queues)


@asynctest
async def test_handshake_frames_between_guests_and_close(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        got1: list[bytes] = []
        got2: list[bytes] = []
        v1 = await attach(w, 1, got1)
        v2 = await attach(w, 2, got2)
        assert await w.read(f"{BE1}/state") == "4" and await w.read(f"{FE1}/state") == "4"
        for key, value in [("feature-sg", "1"), ("feature-gso-tcpv4", "1"), ("feature-rx-copy", "1"),
                           ("feature-rx-flip", "0"), ("feature-split-event-channels", "1"),
                           ("multi-queue-max-queues", "4"), ("hotplug-status", "connected")]:
            assert await w.read(f"{BE1}/{key}") == value, key
        assert await w.read(f"{FE1}/request-rx-copy") == "1"
        assert await w.read(f"{FE1}/multi-queue-num-queues") is None  # one queue: the top-level keys
        assert await w.read(f"{FE1}/event-channel-rx") is not None  # split, as offered
        assert v1.front.rx_port != v1.front.port
        assert v1.mac == bytes.fromhex("00163e000001") and v1.mtu == 1500
        assert sorted(w.hosts) == ["vif1.0", "vif2.0"]
        frame = os.urandom(9000)
        assert v1.front.send(frame)
        await wait_for(lambda: got2 == [frame])
        assert w.hosts["vif1.0"].got == [frame]
        back = os.urandom(1514)
        assert v2.front.send(back)
        await wait_for(lambda: got1 == [back])
        await detach_vif(v1)
        for _ in range(500):
            if await w.read(f"{BE1}/state") == "6":
                break
            await asyncio.sleep(0.01)
        assert await w.read(f"{BE1}/state") == "6"
        await detach_vif(v2)


@asynctest
async def test_a_frontend_asking_for_more_queues_is_refused(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        _dom, xs = w.guests[1]
        await xs.write(f"{FE1}/multi-queue-num-queues", "5")  # four were offered: netback refuses
        got: list[bytes] = []
        task = asyncio.create_task(attach(w, 1, got))
        for _ in range(500):
            if await w.read("/local/domain/0/error/backend/vif/1/0/error") is not None:
                break
            await asyncio.sleep(0.01)
        err = await w.read("/local/domain/0/error/backend/vif/1/0/error")
        assert err is not None and "multi-queue-num-queues" in err, err
        task.cancel()
        try:
            await task
        except (asyncio.CancelledError, Exception):
            pass
        # the other guest's vif is unaffected
        got2: list[bytes] = []
        v2 = await attach(w, 2, got2)
        assert v2.driver.connected.is_set()
        await detach_vif(v2)


@asynctest
async def test_netfront_recovers_when_netback_restarts(tmp_path: Path) -> None:
    async with world(tmp_path) as w:
        got1: list[bytes] = []
        got2: list[bytes] = []
        v1 = await attach(w, 1, got1)
        v2 = await attach(w, 2, got2)
        # the driver domain's netback goes away (its rings with it) and a new one starts
        old = w.service
        await old.stop()
        w.service = NetbackService(old.domain, old.xs, old.open_host)
        await w.service.start()
        await wait_for(lambda: v1.driver.connections == 2 and v2.driver.connections == 2)
        assert v1.end.recoveries == 1 and v1.front.broken is None
        frame = os.urandom(5000)
        assert v1.front.send(frame)
        await wait_for(lambda: got2 == [frame])
        await detach_vif(v1)
        await detach_vif(v2)


@asynctest
async def test_a_late_watch_event_leaves_a_connected_vif_alone(tmp_path: Path) -> None:
    """netback's watch fires once for the frontend's Initialised and once for its
    Connected; when the first event is read late, netback sees (Connected,
    Initialised) although the frontend is Connected by then (a restarted driver domain
    met this).  It must keep its rings: the frontend will not publish again."""
    async with world(tmp_path) as w:
        got1: list[bytes] = []
        got2: list[bytes] = []
        v1 = await attach(w, 1, got1)
        await attach(w, 2, got2)
        end = w.service.devices[BE1].end
        queues = w.service.devices[BE1].driver.queues
        assert queues and await w.read(f"{FE1}/state") == str(int(XenbusState.Connected))
        await kick_reading_late(end, XenbusState.Initialised)
        assert w.service.devices[BE1].driver.queues == queues and queues[0].connected
        frame = os.urandom(3000)
        assert v1.front.send(frame)
        await wait_for(lambda: got2 == [frame])


@asynctest
async def test_request_multicast_control_is_watched_while_connected(tmp_path: Path) -> None:
    """xen_mcast_ctrl_changed: a frontend turning the filter on (and off) after it
    connected is heeded; a multicast frame for a group it never listed goes through
    before, not while the filter is on, and again after."""
    group = bytes.fromhex("01005e000001")

    def to(dest: bytes, tag: bytes) -> bytes:
        return dest + bytes.fromhex("00163e000002") + b"\x08\x00" + tag + os.urandom(60)

    async with world(tmp_path) as w:
        got1: list[bytes] = []
        v1 = await attach(w, 1, got1)
        v2 = await attach(w, 2, [])
        queue = w.hosts["vif1.0"].queues[0]
        first = to(group, b"first")
        assert v2.front.send(first)
        await wait_for(lambda: first in got1)  # no filter: every group is delivered
        _dom, xs = w.guests[1]
        await xs.write(f"{FE1}/request-multicast-control", "1")
        await wait_for(lambda: queue.features.multicast_control)
        filtered, broadcast = to(group, b"filtered"), to(b"\xff" * 6, b"broadcast")
        assert v2.front.send(filtered) and v2.front.send(broadcast)
        await wait_for(lambda: broadcast in got1)  # sent after the multicast frame
        assert filtered not in got1
        await xs.write(f"{FE1}/request-multicast-control", "0")
        await wait_for(lambda: not queue.features.multicast_control)
        last = to(group, b"last")
        assert v2.front.send(last)
        await wait_for(lambda: last in got1)
        await detach_vif(v1)
        await detach_vif(v2)
