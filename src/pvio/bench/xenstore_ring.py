"""`pvio bench xenstore`'s ring rows: a domain's requests over its XenStore page, next to
the same domain's requests over a socket, served by pvio's xenstored and, in the same
run, by Xen's C xenstored.

Theory of operation
-------------------
For each daemon (a `Daemon`: its hypervisor's socket and its XenStore socket, each
daemon a domain of its own `pvio hypervisor`), the bench process becomes a domain
(`BENCH_DOMID`) of that hypervisor, builds its XenStore page and port as a guest does
(`pvio.xenstore.client_ring.build_store_page`), introduces itself as the toolstack
would, and opens two `AsyncClient`s: one over the ring (page and event channel, between
processes), one over a socket.  The socket differs between the daemons as their
transports do: pvio's xenstored attaches a socket to the domain (`attach_domain`: the
same domid and permissions as the ring), Xen's has no such thing and serves sockets as
the privileged toolstack (domain 0), so its socket row is the toolstack's own request.
Xen's xenstored charges socket connections to domain 0 and refuses some of their
requests until it knows it, so domain 0 is introduced first, with a page of its own, as
`pvio up` introduces its driver domain.

Blocks of 50 requests (12 transactions) alternate between every daemon and transport,
so machine noise hits them all alike; each run reports each measurement's median.
Results are keyed ``<daemon>_<transport>_<request>``: ``pvio_ring_read``,
``xen_socket_transaction``...
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from pvio.hypervisor import aio
from pvio.toolstack.xenpages import XENSTORED_DOMID
from pvio.xenstore.client import AsyncClient
from pvio.xenstore.client_ring import build_store_page, open_ring_client
from pvio.xenstore.daemon import attach_domain

#: The bench's own domid on each hypervisor.
BENCH_DOMID = 7
BLOCK = 50
REQUESTS = ("read", "transaction")
TRANSPORTS = ("ring", "socket")


@dataclass(frozen=True)
class Daemon:
    """A XenStore daemon to measure: `name` prefixes its keys."""

    name: str
    hypervisor: Path
    xenstored: Path
    xen: bool  # Xen's C xenstored: no attached sockets, domain 0 introduced first


async def _samples(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        await fn()
        out.append(clock() - t0)
    return out


async def _domain(stack: contextlib.AsyncExitStack, tool: AsyncClient, hv: Path, name: str,
                  domid: int) -> AsyncClient:
    """Domain `domid` of `hv` with its XenStore page, introduced: its ring client.  The
    domain and the client close with `stack`."""
    dom = await aio.connect(str(hv), name, 64, domid=domid)
    stack.push_async_callback(dom.close)
    page = await build_store_page(dom, XENSTORED_DOMID)
    await tool.introduce(domid, page.frame, page.port)
    ring = await open_ring_client(dom, page.view, page.port)
    stack.push_async_callback(ring.close)
    return ring


async def _clients(stack: contextlib.AsyncExitStack, d: Daemon) -> tuple[AsyncClient, AsyncClient]:
    """The bench domain's ring client and socket client of daemon `d`."""
    tool = await AsyncClient.open(str(d.xenstored))
    stack.push_async_callback(tool.close)
    if d.xen:
        await _domain(stack, tool, d.hypervisor, "dom0", 0)
    ring = await _domain(stack, tool, d.hypervisor, "bench", BENCH_DOMID)
    home = f"/local/domain/{BENCH_DOMID}"  # after the introduction: Xen's refuses an unknown owner
    await tool.write(home, "")
    await tool.set_perms(home, [f"n{BENCH_DOMID}"])
    if d.xen:
        sock = await AsyncClient.open(str(d.xenstored))
    else:
        s = await asyncio.to_thread(attach_domain, f"{d.xenstored}.control", BENCH_DOMID)
        s.setblocking(False)
        sock = await AsyncClient.open(sock=s)
    stack.push_async_callback(sock.close)
    return ring, sock


def _requests(c: AsyncClient, node: str) -> dict[str, Callable[[], Awaitable[object]]]:
    async def transaction() -> None:
        t = await c.transaction_start()
        await c.read(node, t)
        await c.write(node, "value", t)
        await c.transaction_end(t)

    return {"read": lambda: c.read(node), "transaction": transaction}


async def _measure(daemons: Sequence[Daemon], iterations: int, runs: int) -> dict[str, list[float]]:
    node = f"/local/domain/{BENCH_DOMID}/node"
    async with contextlib.AsyncExitStack() as stack:
        fns: dict[str, Callable[[], Awaitable[object]]] = {}
        for d in daemons:
            ring, sock = await _clients(stack, d)
            await ring.write(node, "value")
            for transport, c in zip(TRANSPORTS, (ring, sock), strict=True):
                fns |= {f"{d.name}_{transport}_{k}": fn for k, fn in _requests(c, node).items()}
        for fn in fns.values():  # warm up
            await _samples(fn, 100)
        results: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(runs):
            samples: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(max(1, iterations // BLOCK)):
                for k, fn in fns.items():
                    samples[k].extend(await _samples(fn, BLOCK if k.endswith("read") else max(1, BLOCK // 4)))
            for k, v in samples.items():
                results[k].append(statistics.median(v))
        return results


def measure_ring(daemons: Sequence[Daemon], iterations: int, runs: int) -> dict[str, list[float]]:
    """Per run, the median latency (ns) of a read and of a transaction over the ring and
    over a socket, for the bench domain of each daemon (see the module notes)."""
    return aio.run(_measure(daemons, iterations, runs))
