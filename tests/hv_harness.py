"""Run hypervisor clients against either implementation, with leak checks afterwards."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from pvio.hypervisor import aio
from pvio.hypervisor.client import Domain
from pvio.hypervisor.daemon import HypervisorServer
from pvio.hypervisor.inprocess import InProcessHypervisor

IMPLEMENTATIONS = ("inprocess", "daemon")


def open_fds() -> set[int]:
    return {int(n) for n in os.listdir("/proc/self/fd")}


async def _settle(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():
        if asyncio.get_running_loop().time() > deadline:
            return False
        await asyncio.sleep(0.002)
    return True


async def run_with(impl: str, body: Callable[..., Awaitable[None]], *args: Any) -> None:
    """Run `body(make, *args)`; then close every domain and check nothing leaked."""
    fds_before = open_fds()
    domains: list[Domain] = []
    with tempfile.TemporaryDirectory(prefix="pvio-hv-") as tmp:
        if impl == "inprocess":
            ihv = InProcessHypervisor()
            hv = ihv.hv
            platform = ihv.platform

            async def make(name: str, *, transport: str = "map", nr_pages: int = 4096, domid: int | None = None) -> Domain:
                d = await ihv.create_domain(name, nr_pages, transport=transport, domid=domid)
                domains.append(d)
                return d

            server = None
        else:
            path = str(Path(tmp) / "hv.sock")
            server = HypervisorServer(path)
            await server.start()
            hv = server.hv
            platform = server.platform

            async def make(name: str, *, transport: str = "map", nr_pages: int = 4096, domid: int | None = None) -> Domain:
                d = await aio.connect(path, name, nr_pages, transport=transport, domid=domid)
                domains.append(d)
                return d

            make.socket_path = path  # type: ignore[attr-defined]

        try:
            await asyncio.wait_for(body(make, *args), 60)
        finally:
            for d in domains:
                await d.close()
            settled = await _settle(lambda: hv.is_empty())
            if server is not None:
                await server.stop()
                assert server.in_flight == 0, f"{server.in_flight} descriptors sent but never closed"
        # The leak check: after every scenario the hypervisor's tables must be empty (no
        # domain, zombie, shared region, queued push, memfd or eventfd), and the test
        # process holds no descriptor it did not hold before.
        assert settled and hv.is_empty(), (hv.domains, hv.zombies, hv.regions)
        assert platform.open_fds() == 0
        await asyncio.sleep(0)
    leaked = open_fds() - fds_before
    assert not leaked, f"descriptors leaked: {sorted(leaked)}"
