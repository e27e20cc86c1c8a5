"""The XenBus handshake: the tables alone, then a frontend (a domain connection) and a
backend (dom0) driven through a real XenStore daemon to Connected and back to Closed."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

from cprobe import build, run
from pvio.abi.xenbus import XenbusState as S
from pvio.xenbus import Backend, Frontend, XenbusDevice
from pvio.xenbus.handshake import BACKEND, FRONTEND, Action, Handshake, Role, parse_state
from pvio.xenstore.client import AsyncClient
from pvio.xenstore.daemon import XenStoreDaemon, attach_domain

# -- the tables --------------------------------------------------------------------


def test_states_match_xenbus_h(tmp_path: Path) -> None:
    body = "".join(
        f'printf("{s.name} %d\\n", XenbusState{s.name});' for s in S
    )
    src = ("#include <stdio.h>\n#include <xen/io/xenbus.h>\nint main(void){" + body
           + "return 0;}\n")
    lines = run(build(src, tmp_path, "xenbus")).split("\n")
    assert {ln.split()[0]: int(ln.split()[1]) for ln in lines if ln} == {s.name: s for s in S}


def walk(role: Role, start: S, others: list[S]) -> list[tuple[tuple[Action, ...], S]]:
    hs = Handshake(role, start)
    out = []
    for other in others:
        step = hs.on_otherend(other)
        out.append((step.actions, hs.state))
    return out


def test_startup_as_in_blkif_h() -> None:
    assert walk(Role.FRONTEND, S.Initialising, [S.Initialising, S.InitWait, S.Connected]) == [
        ((), S.Initialising),
        ((Action.PUBLISH,), S.Initialised),
        ((Action.FINALIZE,), S.Connected),
    ]
    assert walk(Role.BACKEND, S.InitWait, [S.Initialising, S.Initialised, S.Connected]) == [
        ((), S.InitWait),
        ((Action.CONNECT,), S.Connected),
        ((), S.Connected),
    ]


def test_skipped_and_repeated_states_are_tolerated() -> None:
    # the backend skipped InitWait
    assert walk(Role.FRONTEND, S.Initialising, [S.Initialised]) == [
        ((Action.PUBLISH,), S.Initialised)]
    # the frontend saw the backend only once it was Connected
    assert walk(Role.FRONTEND, S.Initialising, [S.Connected]) == [
        ((Action.PUBLISH, Action.FINALIZE), S.Connected)]
    # the frontend went to Initialised without waiting; a backend still Initialising
    assert walk(Role.BACKEND, S.Initialised, [S.Initialised]) == [
        ((Action.CONNECT,), S.Connected)]
    # repeated events change nothing
    assert walk(Role.FRONTEND, S.Initialised, [S.InitWait, S.InitWait]) == [
        ((), S.Initialised), ((), S.Initialised)]


def test_close_and_reconnect() -> None:
    fe, be = Handshake(Role.FRONTEND, S.Connected), Handshake(Role.BACKEND, S.Connected)
    assert fe.close().switch_to is S.Closing
    assert be.on_otherend(S.Closing).switch_to is S.Closing
    assert fe.on_otherend(S.Closing).actions == (Action.DISCONNECT,) and fe.state is S.Closed
    assert be.on_otherend(S.Closed).switch_to is S.Closed
    assert fe.reconnect().switch_to is S.Initialising
    assert be.on_otherend(S.Initialising).switch_to is S.InitWait
    assert fe.on_otherend(S.InitWait).actions == (Action.PUBLISH,)


def test_a_new_backend_waits_for_a_closed_frontend_to_start_over() -> None:
    # A restarted driver domain's backend (InitWait) that reads the frontend Closed (the
    # backend before it closed the device) stays in InitWait; the frontend, Closed, sees
    # InitWait and starts over.  Had the backend closed, both ends would sit in Closed.
    be, fe = Handshake(Role.BACKEND, S.InitWait), Handshake(Role.FRONTEND, S.Closed)
    assert be.on_otherend(S.Closed).actions == () and be.state is S.InitWait
    assert fe.reconnect().switch_to is S.Initialising
    assert be.on_otherend(S.Initialising).actions == () and be.state is S.InitWait
    assert fe.on_otherend(S.InitWait).actions == (Action.PUBLISH,)
    assert be.on_otherend(S.Initialised).actions == (Action.CONNECT,)
    # Every other live backend state still follows a frontend into Closed.
    for mine in (S.Initialising, S.Initialised, S.Connected, S.Closing):
        assert Handshake(Role.BACKEND, mine).on_otherend(S.Closed).switch_to is S.Closed


def test_tables_only_name_real_states_and_never_leave_closed_silently() -> None:
    for table in (FRONTEND, BACKEND):
        for (mine, other), step in table.items():
            assert isinstance(mine, S) and isinstance(other, S)
            if mine is S.Closed:
                assert step.switch_to in (None, S.Closed, S.InitWait)


def test_parse_state() -> None:
    assert parse_state(b"4") is S.Connected
    assert parse_state(None) is S.Unknown
    assert parse_state(b"banana") is S.Unknown
    assert parse_state(b"42") is S.Unknown


# -- over a real daemon ------------------------------------------------------------

FE_DOM, DEVID = 1, 51712
FE_PATH = f"/local/domain/{FE_DOM}/device/vbd/{DEVID}"
BE_PATH = f"/local/domain/0/backend/vbd/{FE_DOM}/{DEVID}"


class Blkfront:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.sectors = 0

    async def publish(self, dev: XenbusDevice, tx: int) -> None:
        self.log.append("publish")
        await dev.xs.write(f"{dev.nodename}/ring-ref", "8", tx)
        await dev.xs.write(f"{dev.nodename}/event-channel", "3", tx)
        await dev.xs.write(f"{dev.nodename}/protocol", "x86_64-abi", tx)

    async def finalize(self, dev: XenbusDevice) -> None:
        self.sectors = int(await dev.xs.read(f"{dev.otherend}/sectors"))
        self.log.append("finalize")

    async def resize(self, dev: XenbusDevice) -> None:
        self.sectors = int(await dev.xs.read(f"{dev.otherend}/sectors"))
        self.log.append("resize")

    async def disconnect(self, dev: XenbusDevice) -> None:
        self.log.append("disconnect")


class Blkback:
    def __init__(self) -> None:
        self.log: list[str] = []
        self.ring: bytes | None = None

    async def probe(self, dev: XenbusDevice, tx: int) -> None:
        await dev.xs.write(f"{dev.nodename}/feature-max-indirect-segments", "256", tx)

    async def connect(self, dev: XenbusDevice, tx: int) -> bool:
        self.ring = await dev.xs.read(f"{dev.otherend}/ring-ref", tx)
        await dev.xs.write(f"{dev.nodename}/sectors", "2048", tx)
        await dev.xs.write(f"{dev.nodename}/sector-size", "512", tx)
        await dev.xs.write(f"{dev.nodename}/info", "0", tx)
        self.log.append("connect")
        return True

    async def disconnect(self, dev: XenbusDevice) -> None:
        self.log.append("disconnect")


async def toolstack_adds_vbd(tool: AsyncClient) -> None:
    """What libxl writes, in one transaction (reference notes, section 4)."""

    async def add(tx: int) -> None:
        await tool.mkdir(FE_PATH, tx)
        await tool.set_perms(FE_PATH, [f"n{FE_DOM}", "r0"], tx)
        for k, v in (("backend", BE_PATH), ("backend-id", "0"), ("state", "1"),
                     ("virtual-device", str(DEVID))):
            await tool.write(f"{FE_PATH}/{k}", v, tx)
        await tool.mkdir(BE_PATH, tx)
        await tool.set_perms(BE_PATH, ["n0", f"r{FE_DOM}"], tx)
        for k, v in (("frontend", FE_PATH), ("frontend-id", str(FE_DOM)), ("online", "1"),
                     ("state", "1"), ("params", "/img")):
            await tool.write(f"{BE_PATH}/{k}", v, tx)

    await tool.transact(add)


Body = Callable[[AsyncClient, Frontend, Backend, Blkfront, Blkback], Awaitable[None]]


def with_pair(tmp_path: Path, body: Body, backend_driver: type[Blkback] = Blkback) -> None:
    async def main() -> None:
        d = XenStoreDaemon(tmp_path / "xs.sock")
        await d.start()
        try:
            tool = await AsyncClient.open(str(d.socket_path))
            await tool.introduce(FE_DOM)
            await tool.write(f"/local/domain/{FE_DOM}", "")
            await tool.set_perms(f"/local/domain/{FE_DOM}", [f"n{FE_DOM}"])
            await toolstack_adds_vbd(tool)
            sock = await asyncio.get_running_loop().run_in_executor(
                None, attach_domain, d.control_path, FE_DOM)
            assert isinstance(sock, socket.socket)
            guest = await AsyncClient.open(sock=sock)
            backend_xs = await AsyncClient.open(str(d.socket_path))
            fdrv, bdrv = Blkfront(), backend_driver()
            fe = Frontend(guest, FE_PATH, BE_PATH, fdrv)
            be = Backend(backend_xs, BE_PATH, FE_PATH, bdrv)
            await be.start()
            await fe.start()
            try:
                await asyncio.wait_for(body(tool, fe, be, fdrv, bdrv), 30)
            finally:
                await fe.stop()
                await be.stop()
                for c in (guest, backend_xs, tool):
                    await c.close()
        finally:
            await d.close()

    asyncio.run(main())


async def connected(fe: Frontend, be: Backend) -> None:
    assert await fe.wait_state(S.Connected) is S.Connected
    assert await be.wait_state(S.Connected) is S.Connected


def test_connect_resize_close(tmp_path: Path) -> None:
    async def body(tool: AsyncClient, fe: Frontend, be: Backend, f: Blkfront,
                   b: Blkback) -> None:
        await connected(fe, be)
        assert f.sectors == 2048 and b.ring == b"8"
        assert await tool.read(f"{BE_PATH}/feature-max-indirect-segments") == b"256"
        # online resize: the backend rewrites state, the frontend re-reads the size
        await be.resize(4096)
        for _ in range(100):
            if f.sectors == 4096:
                break
            await asyncio.sleep(0.02)
        assert f.sectors == 4096 and "resize" in f.log
        # orderly close, started by the guest: Closing -> Closed on both ends
        await fe.close()
        assert await fe.wait_state(S.Closed) is S.Closed
        assert await be.wait_state(S.Closed) is S.Closed
        assert "disconnect" in f.log and "disconnect" in b.log

    with_pair(tmp_path, body)


def test_reconnect_after_close(tmp_path: Path) -> None:
    async def body(tool: AsyncClient, fe: Frontend, be: Backend, f: Blkfront,
                   b: Blkback) -> None:
        await connected(fe, be)
        await fe.close()
        await be.wait_state(S.Closed)
        await fe.wait_state(S.Closed)
        await fe.reconnect()  # frontend Initialising -> backend back to InitWait -> ...
        await connected(fe, be)
        assert f.log.count("publish") == 2 and b.log.count("connect") == 2

    with_pair(tmp_path, body)


def test_toolstack_removes_the_device(tmp_path: Path) -> None:
    async def body(tool: AsyncClient, fe: Frontend, be: Backend, f: Blkfront,
                   b: Blkback) -> None:
        await connected(fe, be)

        async def unplug(tx: int) -> None:
            await tool.write(f"{BE_PATH}/online", "0", tx)
            await tool.write(f"{BE_PATH}/state", str(int(S.Closing)), tx)

        await tool.transact(unplug)
        assert await fe.wait_state(S.Closed) is S.Closed
        assert await be.wait_state(S.Closed) is S.Closed
        await asyncio.wait_for(be.done.wait(), 5)  # offline and closed: unregistered

    with_pair(tmp_path, body)


def test_dev_fatal_writes_the_error_node_and_closes(tmp_path: Path) -> None:
    async def body(tool: AsyncClient, fe: Frontend, be: Backend, f: Blkfront,
                   b: Blkback) -> None:
        await connected(fe, be)
        await fe.dev.dev_fatal(19, "no such device")
        err = await tool.read(f"/local/domain/{FE_DOM}/error/device/vbd/{DEVID}/error")
        assert err == b"19 no such device"
        assert await fe.wait_state(S.Closed) is S.Closed  # backend followed to Closing
        assert await be.wait_state(S.Closing, S.Closed) in (S.Closing, S.Closed)

    with_pair(tmp_path, body)


def test_a_failing_driver_reports_like_xenbus_dev_fatal(tmp_path: Path) -> None:
    class Broken(Blkback):
        async def connect(self, dev: XenbusDevice, tx: int) -> bool:
            raise RuntimeError("cannot open /img")

    async def body(tool: AsyncClient, fe: Frontend, be: Backend, f: Blkfront,
                   b: Blkback) -> None:
        path = f"/local/domain/0/error/backend/vbd/{FE_DOM}/{DEVID}/error"
        got = None
        for _ in range(200):
            got = await tool.read_or(path)
            if got is not None:
                break
            await asyncio.sleep(0.02)
        assert got == b"5 RuntimeError: cannot open /img"
        # the backend closed; the frontend, which had published its ring, follows
        assert await fe.wait_state(S.Closed) is S.Closed
        assert await be.wait_state(S.Closing, S.Closed) in (S.Closing, S.Closed)

    with_pair(tmp_path, body, Broken)
