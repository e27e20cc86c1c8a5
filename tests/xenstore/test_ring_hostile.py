"""Hostile guests on their XenStore rings: each loses its own connection (the reason in
its page's `error` word), never the daemon's or another domain's; what a guest can make
the daemon hold stays bounded."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Awaitable, Callable
from pathlib import Path

from pvio.abi.xs_wire import (
    XENSTORE_DOMAIN_INTERFACE,
    XENSTORE_ERROR_PROTO,
    XENSTORE_ERROR_RINGIDX,
    XENSTORE_PAYLOAD_MAX,
    XSD_SOCKMSG,
)
from pvio.abi.xs_wire import XsdSockmsgType as T
from pvio.xenstore.client_ring import reconnect
from pvio.xenstore.daemon import EVENT_BACKLOG, REPLY_BACKLOG
from pvio.xenstore.ring import GuestEnd
from pvio.xenstore.wire import encode
from xs_ring_world import Guest, RingWorld, until


def run(tmp_path: Path, body: Callable[[RingWorld], Awaitable[None]]) -> None:
    async def main() -> None:
        world = RingWorld(tmp_path)
        try:
            await world.start()
            await asyncio.wait_for(body(world), 60)
        finally:
            await world.close()

    asyncio.run(main())


async def others_carry_on(w: RingWorld, good: Guest) -> None:
    """The well-behaved guest and the toolstack are served as before."""
    assert good.xs is not None and w.tool is not None and w.daemon is not None
    await good.xs.write(f"/local/domain/{good.dom.domid}/ok", "yes")
    assert await w.tool.read(f"/local/domain/{good.dom.domid}/ok") == b"yes"
    assert w.daemon.server.internal_errors == 0


def transport(w: RingWorld, domid: int):  # type: ignore[no-untyped-def]
    assert w.daemon is not None and w.daemon.rings is not None
    return w.daemon.rings.rings[domid][0]


def test_impossible_indices_stop_that_ring_only_until_it_reconnects(tmp_path: Path) -> None:
    async def body(w: RingWorld) -> None:
        good = await w.guest(2)
        bad = await w.guest(3, connect=False)
        end = GuestEnd(bad.page.view)
        lay = XENSTORE_DOMAIN_INTERFACE
        # req_prod 5000 bytes past req_cons: more than the ring holds
        struct.pack_into("<I", bad.page.view, lay.offset("req_prod"), 5000)
        bad.dom.notify(bad.page.port)
        await until(lambda: end.server_error() == XENSTORE_ERROR_RINGIDX, what="RINGIDX")
        await others_carry_on(w, good)
        assert transport(w, 3).end.stopped == XENSTORE_ERROR_RINGIDX
        # The guest asks for a reconnection and is served again on empty rings.
        stream = await reconnect(bad.dom, end, bad.page.port)
        assert end.server_error() == 0
        stream.write(encode(T.XS_WRITE, b"/local/domain/3/x\0back", req_id=7))
        reply = await asyncio.wait_for(stream.read(), 5)
        assert XSD_SOCKMSG.unpack(reply[:16])["req_id"] == 7 and reply[16:] == b"OK\0"
        stream.close()

    run(tmp_path, body)


def test_a_packet_longer_than_the_payload_max_is_a_protocol_error(tmp_path: Path) -> None:
    async def body(w: RingWorld) -> None:
        good = await w.guest(2)
        bad = await w.guest(3, connect=False)
        end = GuestEnd(bad.page.view)
        header = XSD_SOCKMSG.pack(type=T.XS_WRITE, req_id=1, tx_id=0, len=XENSTORE_PAYLOAD_MAX + 1)
        assert end.send(header) == 16
        bad.dom.notify(bad.page.port)
        await until(lambda: end.server_error() == XENSTORE_ERROR_PROTO, what="PROTO")
        await others_carry_on(w, good)

    run(tmp_path, body)


def test_a_packet_that_never_ends_holds_one_packet_at_most(tmp_path: Path) -> None:
    """A header announcing 4096 bytes, then only part of them: the daemon waits for the
    rest holding at most one packet; everyone else is served meanwhile."""
    async def body(w: RingWorld) -> None:
        good = await w.guest(2)
        bad = await w.guest(3, connect=False)
        end = GuestEnd(bad.page.view)
        header = XSD_SOCKMSG.pack(type=T.XS_WRITE, req_id=1, tx_id=0, len=XENSTORE_PAYLOAD_MAX)
        assert end.send(header + b"x" * 900) == 916
        bad.dom.notify(bad.page.port)
        await until(lambda: end.rings.tx.writable() == 1024, what="the daemon to take the bytes")
        await others_carry_on(w, good)
        assert w.daemon is not None
        conn = transport(w, 3).protocol
        assert conn is not None
        assert w.daemon.server.conns[conn.conn_id].decoder.buffered <= 16 + XENSTORE_PAYLOAD_MAX
        assert end.server_error() == 0

    run(tmp_path, body)


def test_a_guest_that_never_reads_its_replies_is_stopped_not_the_daemon(tmp_path: Path) -> None:
    async def body(w: RingWorld) -> None:
        assert w.tool is not None
        good = await w.guest(2)
        bad = await w.guest(3, connect=False)
        end = GuestEnd(bad.page.view)
        await w.tool.write("/local/domain/3/big", b"v" * 2000)
        request = encode(T.XS_READ, b"/local/domain/3/big\0", req_id=1)
        t = transport(w, 3)
        # A watch whose events it will never read either.
        end.send(encode(T.XS_WATCH, b"/local/domain/3\0t\0", req_id=2))
        bad.dom.notify(bad.page.port)
        await until(lambda: end.rings.tx.writable() == 1024, what="the watch to be taken")
        sent = 0
        # Keep the request ring full, never read a reply: past REPLY_BACKLOG the daemon
        # stops reading our requests, and our writes stall.
        deadline = asyncio.get_running_loop().time() + 30
        while t._reading:
            assert asyncio.get_running_loop().time() < deadline, "the daemon never stopped reading"
            if end.rings.tx.writable() >= len(request):
                sent += end.send(request) // len(request)
                bad.dom.notify(bad.page.port)
            await asyncio.sleep(0)
        held = t.get_write_buffer_size()
        assert REPLY_BACKLOG < held <= REPLY_BACKLOG + 16 + XENSTORE_PAYLOAD_MAX
        assert sent > REPLY_BACKLOG // 2100
        # Its watch events pile up to EVENT_BACKLOG at most, then are dropped.
        await others_carry_on(w, good)
        long = "/".join(["n" * 100] * 20)  # events of 2 KiB: past EVENT_BACKLOG in 500
        for i in range(600):
            await w.tool.write(f"/local/domain/3/{long}{i % 50}", "x")
        assert t.get_write_buffer_size() <= EVENT_BACKLOG + 16 + XENSTORE_PAYLOAD_MAX
        assert len(t.protocol.lost) == 1  # its one watch lost events: it fires again later
        assert w.daemon is not None and w.daemon.server.internal_errors == 0

    run(tmp_path, body)
