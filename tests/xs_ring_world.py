"""An in-process world for XenStore over rings: a hypervisor core, xenstored as a domain
of it (with its dom0 socket), and guests that build their page and are introduced the
way `pvio up` introduces them.  Everything is closed by `RingWorld.close`."""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from pathlib import Path

from pvio.hypervisor.client import Domain
from pvio.hypervisor.inprocess import InProcessHypervisor
from pvio.xenstore.client import AsyncClient
from pvio.xenstore.client_ring import StorePage, build_store_page, open_ring_client
from pvio.xenstore.daemon import XenStoreDaemon

XENSTORED_DOMID = 0x7FEF


async def until(cond: object, timeout: float = 5.0, what: str = "condition") -> None:
    """Wait (polling the loop) until cond() is true, at most `timeout` seconds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not cond():  # type: ignore[operator]
        if asyncio.get_running_loop().time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


@dataclass
class Guest:
    dom: Domain
    page: StorePage
    xs: AsyncClient | None = None


class RingWorld:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.hv = InProcessHypervisor()
        self.daemon: XenStoreDaemon | None = None
        self.xs_dom: Domain | None = None
        self.tool: AsyncClient | None = None
        self.guests: list[Guest] = []

    async def start(self, **kw: object) -> RingWorld:
        self.xs_dom = await self.hv.create_domain("xenstored", 16, transport="copy", domid=XENSTORED_DOMID)
        self.daemon = XenStoreDaemon(self.root / "xs.sock", ring_domain=self.xs_dom, **kw)  # type: ignore[arg-type]
        await self.daemon.start()
        self.tool = await AsyncClient.open(str(self.root / "xs.sock"))
        return self

    async def guest(self, domid: int, *, connect: bool = True, transport: str = "map") -> Guest:
        """A domain with its XenStore page, introduced by the toolstack, and (with
        `connect`) its ring client."""
        assert self.tool is not None
        dom = await self.hv.create_domain(f"g{domid}", 64, transport=transport, domid=domid)
        page = await build_store_page(dom, XENSTORED_DOMID)
        await self.tool.introduce(domid, page.frame, page.port)
        home = f"/local/domain/{domid}"
        await self.tool.write(home, "")
        await self.tool.set_perms(home, [f"n{domid}"])
        g = Guest(dom, page)
        if connect:
            g.xs = await open_ring_client(dom, page.view, page.port)
        self.guests.append(g)
        return g

    async def close(self) -> None:
        for g in self.guests:
            with contextlib.suppress(Exception):
                if g.xs is not None:
                    await g.xs.close()
            with contextlib.suppress(Exception):
                await g.dom.close()
        if self.tool is not None:
            await self.tool.close()
        if self.daemon is not None:
            await self.daemon.close()
        if self.xs_dom is not None:
            await self.xs_dom.close()
