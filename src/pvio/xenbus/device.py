"""Running the XenBus handshake over XenStore: one `Frontend` or `Backend` per device end.

Theory of operation
-------------------
An end is a `XenbusDevice` (its own node, the other end's node, the XenStore client)
plus the table of `pvio.xenbus.handshake`.  It watches the other end's `state`; on each
event it re-reads both states from the store (a watch says "something changed", not
what), looks the pair up in its table, has its driver do the work, and writes its new
state.  Work and state switch share one transaction where the work writes XenStore
(PUBLISH, CONNECT), so the other end never sees the state before the data it announces.

The driver -- blkfront, blkback, a test -- is a small object with one coroutine per
action; it never sees watches or states.  A fatal error in a driver is reported like
Linux's xenbus_dev_fatal: "<errno> <message>" in ``<home>/error/<device>/error`` and
the end switches to Closing.

Rejected: letting drivers write `state` themselves (they would each re-implement the
ordering rules), and caching the other end's state (a watch event can stand for several
writes; only the store knows the current value).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno as errno_mod
from typing import Protocol

from pvio.abi.xenbus import XenbusState as S
from pvio.trace import TRACE
from pvio.xenbus.handshake import Action, Handshake, Role, Step, parse_state
from pvio.xenstore.client import AsyncClient, WatchStream


class XenbusDevice:
    """One end of a split device: `nodename` (ours) and `otherend` (theirs), absolute."""

    def __init__(self, xs: AsyncClient, nodename: str, otherend: str) -> None:
        self.xs = xs
        self.nodename = nodename
        self.otherend = otherend

    async def read_state(self, path: str | None = None, tx: int = 0) -> S:
        return parse_state(await self.xs.read_or(f"{path or self.nodename}/state", None, tx))

    async def otherend_state(self) -> S:
        return await self.read_state(self.otherend)

    # T:530 switch_state, inside the caller's transaction
    # An end announces progress by writing its own `state`, in decimal.  When the step
    # also wrote data (ring-ref, sectors...), the write shares the transaction, so the
    # other end's watch fires after the data is there.  Writing the same state again is
    # allowed on purpose: it is how a backend tells a connected frontend to re-read the
    # disk size (online resize).
    # :T
    async def switch_state(self, state: S, tx: int = 0) -> None:
        await self.xs.write(f"{self.nodename}/state", str(int(state)), tx)
        if TRACE.on:
            TRACE.instant(f"xenbus {state.name}", "xenbus", args={"node": self.nodename})

    async def dev_error(self, err: int, message: str) -> None:
        """Record an error as Linux's xenbus_dev_error does, without closing."""
        home = await self._home()
        rel = self.nodename[len(home) + 1 :] if self.nodename.startswith(home + "/") else (
            self.nodename.lstrip("/")
        )
        await self.xs.write(f"{home}/error/{rel}/error", f"{abs(err)} {message}")

    async def dev_fatal(self, err: int, message: str) -> None:
        """Record the error and switch to Closing (Linux's xenbus_dev_fatal)."""
        await self.dev_error(err, message)
        await self.switch_state(S.Closing)

    async def _home(self) -> str:
        parts = self.nodename.split("/")
        if len(parts) > 3 and parts[1:3] == ["local", "domain"]:
            return "/".join(parts[:4])
        return "/local/domain/0"


class FrontendDriver(Protocol):
    async def publish(self, dev: XenbusDevice, tx: int) -> None: ...
    async def finalize(self, dev: XenbusDevice) -> None: ...
    async def resize(self, dev: XenbusDevice) -> None: ...
    async def disconnect(self, dev: XenbusDevice) -> None: ...


class BackendDriver(Protocol):
    async def probe(self, dev: XenbusDevice, tx: int) -> None: ...
    async def connect(self, dev: XenbusDevice, tx: int) -> bool: ...
    async def disconnect(self, dev: XenbusDevice) -> None: ...


class _End:
    role: Role

    def __init__(self, xs: AsyncClient, nodename: str, otherend: str) -> None:
        self.dev = XenbusDevice(xs, nodename, otherend)
        self.hs = Handshake(self.role)
        self.done = asyncio.Event()
        self.changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    async def start(self) -> None:
        await self._startup()
        stream = await self.dev.xs.watch(f"{self.dev.otherend}/state")
        self._task = asyncio.create_task(self._run(stream))

    async def _startup(self) -> None:
        pass

    async def _run(self, stream: WatchStream) -> None:
        try:
            async for _ in stream:
                await self.kick()
                if self.done.is_set():
                    break
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    async def kick(self) -> None:
        """Re-read both states and do what the table says (drivers call this when a
        precondition of theirs, like the hotplug script's `physical-device`, appears)."""
        async with self._lock:
            self.hs.state = await self.dev.read_state()
            other = await self.dev.otherend_state()
            step = self.hs.on_otherend(other)
            try:
                await self._perform(step)
            except Exception as e:  # a driver failed: report it where Linux would
                with contextlib.suppress(Exception):
                    await self.dev.dev_fatal(errno_mod.EIO, f"{type(e).__name__}: {e}")
            async with self.changed:
                self.changed.notify_all()

    async def _perform(self, step: Step) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        """Begin an orderly close: Closing here, the other end follows to Closed."""
        async with self._lock:
            self.hs.state = await self.dev.read_state()
            step = self.hs.close()
            if step.switch_to is not None:
                await self.dev.switch_state(step.switch_to)

    async def wait_state(self, *states: S, timeout: float = 10.0) -> S:
        """Wait until this end's state (as in the store) is one of `states`."""

        async def until() -> S:
            async with self.changed:
                while True:
                    s = await self.dev.read_state()
                    if s in states:
                        return s
                    await self.changed.wait()

        return await asyncio.wait_for(until(), timeout)

    async def stop(self) -> None:
        self.done.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class Frontend(_End):
    role = Role.FRONTEND

    def __init__(self, xs: AsyncClient, nodename: str, otherend: str,
                 driver: FrontendDriver) -> None:
        super().__init__(xs, nodename, otherend)
        self.driver = driver

    async def _perform(self, step: Step) -> None:
        dev, drv = self.dev, self.driver
        actions = step.actions
        if Action.PUBLISH in actions:
            target = step.switch_to if Action.FINALIZE not in actions else S.Initialised
            assert target is not None

            async def publish(tx: int) -> None:
                await drv.publish(dev, tx)
                await dev.switch_state(target, tx)

            await dev.xs.transact(publish)
            if Action.FINALIZE not in actions:
                return
        if Action.FINALIZE in actions:
            await drv.finalize(dev)
        if Action.RESIZE in actions:
            await drv.resize(dev)
        if Action.DISCONNECT in actions:
            await drv.disconnect(dev)
        if step.switch_to is not None:
            await dev.switch_state(step.switch_to)

    async def reconnect(self) -> None:
        """From Closed, start over: Initialising; the backend goes back to InitWait."""
        async with self._lock:
            self.hs.state = await self.dev.read_state()
            step = self.hs.reconnect()
            if step.switch_to is not None:
                await self.dev.switch_state(step.switch_to)


class Backend(_End):
    role = Role.BACKEND

    def __init__(self, xs: AsyncClient, nodename: str, otherend: str,
                 driver: BackendDriver) -> None:
        super().__init__(xs, nodename, otherend)
        self.driver = driver

    async def _startup(self) -> None:
        """Probe: publish features and go to InitWait (blkif.h's first backend step)."""

        async def probe(tx: int) -> None:
            await self.driver.probe(self.dev, tx)
            await self.dev.switch_state(S.InitWait, tx)

        await self.dev.xs.transact(probe)

    async def _perform(self, step: Step) -> None:
        dev, drv = self.dev, self.driver
        if Action.DISCONNECT in step.actions:
            await drv.disconnect(dev)
        if Action.CONNECT in step.actions:
            connected = False

            async def connect(tx: int) -> None:
                nonlocal connected
                connected = await drv.connect(dev, tx)
                if connected:
                    await dev.switch_state(S.Connected, tx)

            await dev.xs.transact(connect)
            return
        if step.switch_to is not None:
            await dev.switch_state(step.switch_to)
        if step.switch_to is S.Closed:
            online = await dev.xs.read_or(f"{dev.nodename}/online", b"1")
            if online == b"0":
                self.done.set()  # UNREGISTER: the toolstack is removing the device

    # T:540 Online resize and toolstack-initiated close
    # To announce a new size the backend writes `sectors` and rewrites `state` as
    # Connected in one transaction; the write fires the frontend's watch and its table
    # turns (Connected, Connected) into a re-read of the size.  To remove a device the
    # toolstack sets the backend's `online` to 0 and its `state` to Closing; the frontend
    # follows to Closed, the backend to Closed, and since it is offline, it unregisters.
    # :T
    async def resize(self, sectors: int) -> None:
        async def write(tx: int) -> None:
            await self.dev.xs.write(f"{self.dev.nodename}/sectors", str(sectors), tx)
            await self.dev.switch_state(S.Connected, tx)

        await self.dev.xs.transact(write)
