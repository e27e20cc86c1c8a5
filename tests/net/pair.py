"""Both ends of a vif in one process: an in-process hypervisor, netback and netfront."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from pvio.hypervisor.client import Domain
from pvio.hypervisor.inprocess import InProcessHypervisor
from pvio.net.backend import FrontendRings, NetbackQueue
from pvio.net.frontend import BackendFeatures, NetFront, RxMeta
from pvio.net.keys import parse_frontend_rings
from pvio.net.slots import TxFrame


@dataclass
class NetPair:
    hv: InProcessHypervisor
    back_dom: Domain
    front_dom: Domain
    back: NetbackQueue
    front: NetFront
    #: frames netback delivered to the host (guest → host), with their parsed requests
    to_host: list[tuple[bytes, TxFrame]] = field(default_factory=list)
    #: frames netfront received (host → guest)
    to_guest: list[tuple[bytes, RxMeta]] = field(default_factory=list)


async def wait_for(cond: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll `cond` on the event loop until it holds (a deadline, not a fixed sleep)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise TimeoutError("condition not met in time")
        await asyncio.sleep(0.001)


@contextlib.asynccontextmanager
async def net_pair(
    *, features: BackendFeatures | None = None, transport: str = "map", rx_stall_timeout: float = 60.0,
    rx_queue_max: int = 512, rate: tuple[int, float] | None = None,
) -> AsyncIterator[NetPair]:
    hv = InProcessHypervisor()
    back_dom = await hv.create_domain("driver", 2048, transport=transport)
    front_dom = await hv.create_domain("guest", 4096)
    to_host: list[tuple[bytes, TxFrame]] = []
    to_guest: list[tuple[bytes, RxMeta]] = []
    back = NetbackQueue(back_dom, front_dom.domid, lambda d, f: to_host.append((b"".join(d), f)),
                        rx_stall_timeout=rx_stall_timeout, rx_queue_max=rx_queue_max, rate=rate)
    front = NetFront(front_dom, back_dom.domid, lambda d, m: to_guest.append((b"".join(d), m)))
    feats = features or BackendFeatures(sg=True, gso_tcpv4=True, gso_tcpv6=True)
    keys = await front.setup_rings(feats)
    rings: FrontendRings = parse_frontend_rings(keys)
    await back.connect(rings)
    pair = NetPair(hv, back_dom, front_dom, back, front, to_host, to_guest)
    try:
        yield pair
    finally:
        await pair.back.disconnect()
        await pair.front.close()
        await front_dom.close()
        await back_dom.close()
