"""Both ends of a vbd in one process: an in-process hypervisor, blkback and blkfront."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ParamSpec

from pvio.abi.blkif import ABI_NATIVE, BlkifABI, abi_for_protocol
from pvio.abi.xenbus import XenbusState
from pvio.blk.backend import MAX_INDIRECT_SEGMENTS, BlkbackRing
from pvio.blk.frontend import DEFAULT_INDIRECT_SEGMENTS, BlkFront
from pvio.blk.keys import backend_disk_keys, parse_backend_disk, parse_frontend_ring
from pvio.hypervisor.client import Domain
from pvio.hypervisor.inprocess import InProcessHypervisor
from pvio.storage.backend import VectoredBackend
from pvio.storage.rawfile import RawFile

P = ParamSpec("P")


@dataclass
class Pair:
    hv: InProcessHypervisor
    back_dom: Domain
    front_dom: Domain
    back: BlkbackRing
    front: BlkFront
    disk: VectoredBackend
    image: Path | None

    async def reconnect_backend(self, transport: str | None = None) -> None:
        """The backend goes away (its ring disconnected); a new one serves a new ring."""
        await self.back.disconnect()
        await self.front.suspend()
        keys = await self.front.setup_ring()
        self.back = BlkbackRing(
            self.back_dom, self.front_dom.domid, self.disk, persistent=self.front.persistent,
            max_indirect_segments=self.front.max_indirect_segments,
        )
        await self.back.connect(parse_frontend_ring(keys))
        self.front.resume()


def make_image(path: Path, size: int, fill: bool = True) -> Path:
    with open(path, "wb") as f:
        f.truncate(size)
        if fill:
            f.seek(0)
            f.write(os.urandom(min(size, 1 << 20)))
    return path


@contextlib.asynccontextmanager
async def blk_pair(
    image: Path,
    *,
    transport: str = "map",
    abi: BlkifABI = ABI_NATIVE,
    ring_order: int = 0,
    read_only: bool = False,
    disk: VectoredBackend | None = None,
    max_in_flight: int = 64,
    persistent: bool = False,
    indirect: int = MAX_INDIRECT_SEGMENTS,
    want_indirect: int = DEFAULT_INDIRECT_SEGMENTS,
    sector_size: int = 512,
) -> AsyncIterator[Pair]:
    hv = InProcessHypervisor()
    back_dom = await hv.create_domain("driver", 2048, transport=transport)
    front_dom = await hv.create_domain("guest", 4096)
    if disk is None:
        disk = RawFile(image, read_only=read_only)
    back = BlkbackRing(
        back_dom, front_dom.domid, disk, max_in_flight=max_in_flight, persistent=persistent,
        max_indirect_segments=indirect, sector_size=sector_size,
    )
    front = BlkFront(front_dom, back_dom.domid, ring_order=ring_order, abi=abi, want_indirect_segments=want_indirect)
    front.persistent = persistent
    keys = await front.setup_ring()
    ring = parse_frontend_ring(keys)
    assert ring.abi == abi_for_protocol(abi.protocol)
    await back.connect(ring)
    disk_keys = backend_disk_keys(
        disk.info.size // 512, read_only=disk.info.read_only, discard=disk.info.can_trim,
        sector_size=sector_size, physical_sector_size=max(512, sector_size),
    )
    if indirect:
        disk_keys["feature-max-indirect-segments"] = str(indirect)
    front.connect(parse_backend_disk(disk_keys))
    pair = Pair(hv, back_dom, front_dom, back, front, disk, image)
    try:
        yield pair
    finally:
        await pair.back.disconnect()
        await pair.front.close(force=True)
        await front_dom.close()
        await back_dom.close()
        await disk.close()


def asynctest(fn: Callable[P, Coroutine[Any, Any, None]]) -> Callable[P, None]:
    """Run an async test body with asyncio.run and a 60 s bound (the suite's convention)."""

    @functools.wraps(fn)
    def run(*args: P.args, **kwargs: P.kwargs) -> None:
        asyncio.run(asyncio.wait_for(fn(*args, **kwargs), 60))

    return run


async def kick_reading_late(end: Any, state: XenbusState) -> None:
    """`end.kick()` (a `pvio.xenbus` end) with its first read of the other end's state
    giving `state`: a watch event read late, after the other end moved on."""
    real = end.dev.otherend_state
    late = [state]

    async def read(*args: Any) -> XenbusState:
        return late.pop() if late else await real(*args)

    end.dev.otherend_state = read
    try:
        await end.kick()
    finally:
        end.dev.otherend_state = real
    assert not late, "the kick never read the other end's state"
