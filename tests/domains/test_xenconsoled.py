"""The console daemon in process, with hostile guests: a flood never blocks the guest and
costs the daemon at most the console's limit; broken indices end that console only."""

from __future__ import annotations

import asyncio
import os
import struct
from pathlib import Path

from pvio.abi.console import XENCONS_INTERFACE
from pvio.domains.xen_console import PENDING_MAX, GuestConsole, build_console_page
from pvio.domains.xenconsoled import ConsoleDaemon
from pvio.toolstack.xenpages import console_keys
from xs_ring_world import Guest, RingWorld, until

CONSOLED_DOMID = 0x7FEE


async def with_console(w: RingWorld, domid: int, limit: int) -> tuple[Guest, GuestConsole]:
    """A guest with a console page, and the keys the toolstack writes for it."""
    assert w.tool is not None
    g = await w.guest(domid, connect=False)
    page = await build_console_page(g.dom, CONSOLED_DOMID)
    home = f"/local/domain/{domid}"
    await w.tool.write(f"{home}/name", f"g{domid}")
    for op in console_keys(domid):
        await w.tool.write(op.path, op.value)
    await w.tool.write(f"{home}/console/limit", str(limit))
    await w.tool.write(f"{home}/console/ring-ref", str(page.frame))
    await w.tool.write(f"{home}/console/port", str(page.port))
    return g, GuestConsole(g.dom, page)


def read_pty(path: str, want: bytes, timeout: float = 5.0) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)
    got = b""
    try:
        import time

        deadline = time.monotonic() + timeout
        while want not in got and time.monotonic() < deadline:
            try:
                got += os.read(fd, 65536)
            except BlockingIOError:
                time.sleep(0.01)
    finally:
        os.close(fd)
    return got


def test_a_console_flood_is_bounded_and_the_others_carry_on(tmp_path: Path) -> None:
    async def body(w: RingWorld) -> None:
        assert w.tool is not None
        cdom = await w.hv.create_domain("xenconsoled", 16, transport="copy", domid=CONSOLED_DOMID)
        daemon = ConsoleDaemon(w.tool, cdom, log_dir=tmp_path)
        try:
            await daemon.start()
            _, flood = await with_console(w, 5, limit=64 << 10)
            _, quiet = await with_console(w, 6, limit=64 << 10)
            await until(lambda: 5 in daemon.consoles and 6 in daemon.consoles, what="both consoles")
            # 4 MiB of output as fast as the guest can write: it never waits (what its
            # ring cannot take at once it keeps, up to PENDING_MAX, dropping the oldest)
            chunk = b"x" * 4096
            for _ in range(1024):
                flood.write(chunk)
                assert len(flood._pending) <= PENDING_MAX
                await asyncio.sleep(0)
            await until(lambda: daemon.consoles[5].statistics["out"] > 512 << 10, what="the daemon draining")
            con = daemon.consoles[5]
            assert len(con.buffer.data) <= con.buffer.limit == 64 << 10
            assert con.buffer.discarded > 0
            # The quiet guest's console works meanwhile, both ways.
            quiet.write(b"quiet-line\r\n")
            tty = (await w.tool.read("/local/domain/6/console/tty")).decode()
            got = await asyncio.to_thread(read_pty, tty, b"quiet-line")
            assert b"quiet-line" in got
            typed: list[bytes] = []
            quiet.on_input = typed.append
            fd = os.open(tty, os.O_WRONLY | os.O_NOCTTY)
            os.write(fd, b"ls\n")
            os.close(fd)
            await until(lambda: b"".join(typed) == b"ls\n", what="input to reach the guest")
            assert (tmp_path / "guest-g6.log").read_bytes().startswith(b"[")
        finally:
            await daemon.close()
            await cdom.close()

    run(tmp_path, body)


def test_impossible_console_indices_end_that_console_only(tmp_path: Path) -> None:
    async def body(w: RingWorld) -> None:
        assert w.tool is not None
        cdom = await w.hv.create_domain("xenconsoled", 16, transport="copy", domid=CONSOLED_DOMID)
        daemon = ConsoleDaemon(w.tool, cdom)
        try:
            await daemon.start()
            bad_g, bad = await with_console(w, 5, limit=4096)
            good_g, good = await with_console(w, 6, limit=4096)
            await until(lambda: 5 in daemon.consoles and 6 in daemon.consoles, what="both consoles")
            struct.pack_into("<I", bad.page.view, XENCONS_INTERFACE.offset("out_prod"), 1 << 20)
            bad_g.dom.notify(bad.page.port)
            await until(lambda: 5 not in daemon.consoles or daemon.consoles[5].broken != "", what="broken")
            good.write(b"still-here\r\n")
            tty = (await w.tool.read("/local/domain/6/console/tty")).decode()
            assert b"still-here" in await asyncio.to_thread(read_pty, tty, b"still-here")
            # the dead domain's console goes with it, its page unmapped
            await good_g.dom.close()
            await until(lambda: 6 not in daemon.consoles, what="the dead domain's console to go")
        finally:
            await daemon.close()
            await cdom.close()

    run(tmp_path, body)


def run(tmp_path: Path, body):  # type: ignore[no-untyped-def]
    async def main() -> None:
        world = RingWorld(tmp_path)
        try:
            await world.start()
            await asyncio.wait_for(body(world), 60)
        finally:
            await world.close()

    asyncio.run(main())
