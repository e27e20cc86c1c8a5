"""Serving every device of one kind under a driver domain's backend directory.

A Xen backend (blkback's vbds, netback's vifs) watches
``/local/domain/<domid>/backend/<kind>/<frontend-domid>/<devid>``: a directory that
appears is a device to serve, one that goes away (or whose XenBus end finished) is
stopped, and while served its driver's counters are published under ``statistics/``
once a second, as Linux's backends show them in sysfs.  A device the toolstack is
removing (``online`` = 0) is not served again once its end unregistered, while the
toolstack finishes the removal.  `BackendService` is that loop,
once; each device kind says how a device is opened (`_add`), closed (`_close`) and
counted (`_stats_keys`).
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from typing import Generic, TypeVar

from pvio.xenbus.device import Backend
from pvio.xenstore.client import AsyncClient, WatchStream

STATS_INTERVAL = 1.0  # seconds between two statistics/ updates of a served device

D = TypeVar("D")


@dataclass
class Served(Generic[D]):
    """A device being served: its XenBus end, its driver, its statistics task."""

    path: str
    end: Backend
    driver: D
    stats_task: asyncio.Task[None] | None = None


class BackendService(Generic[D]):
    """Every device directory under `root`, each served while it is there."""

    def __init__(self, xs: AsyncClient, root: str) -> None:
        self.xs = xs
        self.root = root
        self.devices: dict[str, Served[D]] = {}
        self.failed: dict[str, str] = {}  # path -> why it could not be served
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    # -- what each device kind supplies ------------------------------------------------

    async def _add(self, path: str) -> None:
        """Open and `_serve` the device at `path`, or record it in `failed`."""
        raise NotImplementedError

    async def _close(self, device: Served[D]) -> None:
        """Release what `_add` opened, once the device's end has stopped."""
        raise NotImplementedError

    def _stats_keys(self, device: Served[D]) -> dict[str, str] | None:
        """The device's counters as statistics/ keys, or None while it is not connected."""
        raise NotImplementedError

    async def _tick(self, device: Served[D]) -> None:
        """Once a second while served (before its statistics are published)."""

    # -- the shared loop ---------------------------------------------------------------

    async def start(self) -> None:
        stream = await self.xs.watch(self.root)
        await self.scan()
        self._task = asyncio.get_running_loop().create_task(self._watch(stream))

    async def _watch(self, stream: WatchStream) -> None:
        try:
            async for _ in stream:
                stream.drain()
                await self.scan()
        finally:
            with contextlib.suppress(Exception):
                await stream.close()

    async def _list(self, path: str) -> list[str]:
        try:
            return await self.xs.directory(path)
        except Exception:  # ENOENT: nothing there (yet)
            return []

    async def scan(self) -> None:
        """Start a device for every new directory; drop those that went away or unregistered."""
        async with self._lock:
            present: set[str] = set()
            for fe in await self._list(self.root):
                for devid in await self._list(f"{self.root}/{fe}"):
                    present.add(f"{self.root}/{fe}/{devid}")
            for path in sorted(present - set(self.devices) - set(self.failed)):
                if await self.xs.read_or(f"{path}/online", None) == b"0":
                    continue  # being removed (unregistered, its directory not gone yet): not again
                await self._add(path)
            for path, d in list(self.devices.items()):
                if path not in present or d.end.done.is_set():
                    await self._remove(path)
            for path in list(self.failed):
                if path not in present:
                    del self.failed[path]

    async def _serve(self, device: Served[D]) -> None:
        """Register a device `_add` opened and start its XenBus end and statistics."""
        self.devices[device.path] = device
        await device.end.start()
        device.stats_task = asyncio.get_running_loop().create_task(self._publish_stats(device))

    async def _remove(self, path: str) -> None:
        device = self.devices.pop(path)
        if device.stats_task is not None:
            device.stats_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await device.stats_task
        await device.end.stop()
        await self._close(device)

    async def _publish_stats(self, device: Served[D]) -> None:
        last: dict[str, str] = {}
        while True:
            await asyncio.sleep(STATS_INTERVAL)
            if device.end.done.is_set():
                await self.scan()  # unregistered: drop it
                return
            await self._tick(device)
            keys = self._stats_keys(device)
            if keys is None or keys == last:
                continue

            async def write(tx: int, keys: dict[str, str] = keys) -> None:
                for k, v in keys.items():
                    await self.xs.write(f"{device.path}/statistics/{k}", v, tx)

            with contextlib.suppress(Exception):
                await self.xs.transact(write)
                last = keys

    def statistics(self) -> dict[str, dict[str, str]]:
        """Every connected device's statistics (for the status file)."""
        return {p: keys for p, d in self.devices.items() if (keys := self._stats_keys(d)) is not None}

    async def stop(self) -> None:
        """Stop watching; every device's end stops and what it opened is closed."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for path in list(self.devices):
            with contextlib.suppress(Exception):
                await self._remove(path)


__all__ = ["STATS_INTERVAL", "BackendService", "Served"]
