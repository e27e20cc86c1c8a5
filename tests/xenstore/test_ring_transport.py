"""XenStore over a domain's shared page and event channel: the daemon maps grant 1 and
binds the port INTRODUCE names, serves the domain there, and lets go on RELEASE and
death; the page's signalling words follow docs/misc/xenstore-ring.txt."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from pvio.abi.xs_wire import (
    XENSTORE_CONNECTED,
    XENSTORE_SERVER_FEATURE_ERROR,
    XENSTORE_SERVER_FEATURE_RECONNECTION,
)
from pvio.xenstore.errors import XsError
from pvio.xenstore.ring import GuestEnd
from xs_ring_world import RingWorld, until


def run(tmp_path: Path, body: Callable[[RingWorld], Awaitable[None]], **kw: object) -> None:
    async def main() -> None:
        world = RingWorld(tmp_path)
        try:
            await world.start(**kw)
            await asyncio.wait_for(body(world), 30)
        finally:
            await world.close()

    asyncio.run(main())


def test_a_guest_reads_and_writes_its_home_over_the_ring(tmp_path: Path) -> None:
    async def body(w: RingWorld) -> None:
        g = await w.guest(3)
        assert g.xs is not None
        await g.xs.write("/local/domain/3/data/x", "hello")
        assert await g.xs.read("/local/domain/3/data/x") == b"hello"
        # identity is the ring's: dom0's nodes are out of reach
        try:
            await g.xs.read("/tool/xenstored/domid")
        except XsError as e:
            assert e.errno == "EACCES"
        else:
            raise AssertionError("a guest read dom0's node")
        end = GuestEnd(g.page.view)
        want = XENSTORE_SERVER_FEATURE_RECONNECTION | XENSTORE_SERVER_FEATURE_ERROR
        assert end.features() & want == want
        assert end.ctl.connection.load() == XENSTORE_CONNECTED
        assert end.server_error() == 0
        assert w.tool is not None
        assert await w.tool.read("/tool/xenstored/domid") == b"32751"

    run(tmp_path, body)


def test_large_values_cross_the_ring_in_pieces_both_ways(tmp_path: Path) -> None:
    async def body(w: RingWorld) -> None:
        g = await w.guest(4)
        assert g.xs is not None
        big = bytes(range(250)) * 8  # 2000 bytes (the node-size quota: 2048): two ring-fulls each
        results = await asyncio.gather(*(g.xs.write(f"/local/domain/4/v{i}", big) for i in range(8)))
        assert results == [None] * 8
        got = await asyncio.gather(*(g.xs.read(f"/local/domain/4/v{i}") for i in range(8)))
        assert got == [big] * 8

    run(tmp_path, body)


def test_watches_and_transactions_over_the_ring(tmp_path: Path) -> None:
    async def body(w: RingWorld) -> None:
        g = await w.guest(5)
        assert g.xs is not None and w.tool is not None
        stream = await g.xs.watch("/local/domain/5/device", "tok")
        first = await stream.get(5)
        assert first.path == "/local/domain/5/device"
        await w.tool.write("/local/domain/5/device/vbd", "x")
        ev = await stream.get(5)
        assert ev.path == "/local/domain/5/device/vbd"

        async def incr(tx: int) -> None:
            assert g.xs is not None
            old = await g.xs.read_or("/local/domain/5/n", b"0", tx)
            await g.xs.write("/local/domain/5/n", str(int(old or b"0") + 1), tx)

        for _ in range(5):
            await g.xs.transact(incr)
        assert await g.xs.read("/local/domain/5/n") == b"5"

    run(tmp_path, body)


def test_release_and_death_end_the_ring_and_free_the_page(tmp_path: Path) -> None:
    async def body(w: RingWorld) -> None:
        assert w.daemon is not None and w.daemon.rings is not None and w.tool is not None
        g1 = await w.guest(6)
        g2 = await w.guest(7)
        assert g1.xs is not None and g2.xs is not None
        await g1.xs.write("/local/domain/6/a", "1")
        await w.tool.release(6)
        await until(lambda: 6 not in w.daemon.rings.rings, what="ring 6 detached")  # type: ignore[union-attr]
        # death: the hypervisor tells xenstored, which unmaps so the domain can go
        await g2.dom.close()
        await until(lambda: 7 not in w.daemon.rings.rings, what="ring 7 detached")  # type: ignore[union-attr]
        await until(lambda: 7 not in w.hv.hv.zombies and 7 not in w.hv.hv.domains, what="domain 7 freed")
        # the daemon serves on
        g3 = await w.guest(8)
        assert g3.xs is not None
        await g3.xs.write("/local/domain/8/a", "ok")
        assert await w.tool.read("/local/domain/8/a") == b"ok"

    run(tmp_path, body)


def test_a_restarted_daemon_has_its_guests_reconnect_over_their_rings(tmp_path: Path) -> None:
    """The new daemon maps every page again and reports XENSTORE_ERROR_COMM; each guest
    runs the reconnection, registers its watches again and resends its requests."""
    from pvio.xenstore.daemon import XenStoreDaemon
    from xs_ring_world import XENSTORED_DOMID

    async def body(w: RingWorld) -> None:
        assert w.daemon is not None and w.xs_dom is not None and w.tool is not None
        g = await w.guest(9)
        assert g.xs is not None
        stream = await g.xs.watch("/local/domain/9/w", "tok")
        await stream.get(5)
        await g.xs.write("/local/domain/9/kept", "yes")
        # the daemon dies: its domain goes (ports unbound, page unmapped), then it is gone
        await w.xs_dom.close()
        await w.daemon.close()
        await w.tool.close()
        w.xs_dom = await w.hv.create_domain("xenstored", 16, transport="copy", domid=XENSTORED_DOMID)
        w.daemon = XenStoreDaemon(tmp_path / "xs.sock", db=tmp_path / "xs.db", ring_domain=w.xs_dom)
        await w.daemon.start()
        w.tool = await __import__("pvio.xenstore.client", fromlist=["AsyncClient"]).AsyncClient.open(
            str(tmp_path / "xs.sock"))
        assert await g.xs.read("/local/domain/9/kept") == b"yes"  # sent again after reconnecting
        assert g.xs.reconnects == 1
        await stream.get(5)  # the watch, registered again, fired once
        await w.tool.write("/local/domain/9/w", "x")
        ev = await stream.get(5)
        assert ev.path == "/local/domain/9/w"

    run(tmp_path, body, db=tmp_path / "xs.db")


def test_introducing_dom0_again_leaves_the_toolstacks_sockets_alone() -> None:
    """INTRODUCE resets the watches of the domain's own connections; dom0's sockets (the
    toolstack, its tools) are no domain's connection, even once dom0 has a ring."""
    from pvio.abi.xs_wire import XsdSockmsgType as T
    from pvio.xenstore.server import Send, XenStoreServer
    from pvio.xenstore.wire import encode

    server = XenStoreServer()
    server.introduce(0, gfn=1 << 24, evtchn=1)
    tool = server.connect(0)
    ring = server.connect(0, of_domain=True)
    for conn in (tool, ring):
        server.receive(conn, encode(T.XS_WATCH, b"/w\0t\0", req_id=1))
    server.introduce(0, gfn=(1 << 24) + 1, evtchn=2)  # the driver domain restarted
    out = server.receive(0 + tool, encode(T.XS_WRITE, b"/w\0x", req_id=2))
    events = [o.conn_id for o in out if isinstance(o, Send) and o.watch is not None]
    assert events == [tool]
