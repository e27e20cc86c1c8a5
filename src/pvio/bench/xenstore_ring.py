"""`pvio bench xenstore`'s ring rows: a domain's requests over its XenStore page, next to
the same domain's requests over a socket, in the same run.

Theory of operation
-------------------
The bench process becomes a domain of a `pvio hypervisor` (started by the caller, with
`pvio xenstored --hypervisor` as a domain too), builds its XenStore page and port as a
guest does (`pvio.xenstore.client_ring.build_store_page`), introduces itself as the
toolstack would, and opens two `AsyncClient`s for that same domid: one over the ring
(page and event channel, between processes), one over a socket attached for the domain
(`attach_domain`).  Same client code, same domain, same permissions: only the transport
differs.  Blocks of 50 requests alternate between the two, so machine noise hits both
alike; each run reports each measurement's median.
"""

from __future__ import annotations

import asyncio
import statistics
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from pvio.hypervisor import aio
from pvio.xenstore.client import AsyncClient
from pvio.xenstore.client_ring import build_store_page, open_ring_client
from pvio.xenstore.daemon import attach_domain

#: The bench's own domid, and xenstored's when the bench starts it.
BENCH_DOMID = 7
XENSTORED_DOMID = 0x7FEF
BLOCK = 50


async def _samples(fn: Callable[[], Awaitable[object]], n: int) -> list[float]:
    out: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(n):
        t0 = clock()
        await fn()
        out.append(clock() - t0)
    return out


async def _measure(hv: Path, xs_path: Path, iterations: int, runs: int) -> dict[str, list[float]]:
    dom = await aio.connect(str(hv), "bench", 64, domid=BENCH_DOMID)
    tool = await AsyncClient.open(str(xs_path))
    ring: AsyncClient | None = None
    sock: AsyncClient | None = None
    try:
        page = await build_store_page(dom, XENSTORED_DOMID)
        await tool.introduce(BENCH_DOMID, page.frame, page.port)
        home = f"/local/domain/{BENCH_DOMID}"
        await tool.write(home, "")
        await tool.set_perms(home, [f"n{BENCH_DOMID}"])
        ring = await open_ring_client(dom, page.view, page.port)
        s = await asyncio.to_thread(attach_domain, f"{xs_path}.control", BENCH_DOMID)
        s.setblocking(False)
        sock = await AsyncClient.open(sock=s)
        node = f"{home}/node"
        await ring.write(node, "value")

        def read(c: AsyncClient) -> Callable[[], Awaitable[object]]:
            return lambda: c.read(node)

        def transaction(c: AsyncClient) -> Callable[[], Awaitable[object]]:
            async def tx() -> None:
                t = await c.transaction_start()
                await c.read(node, t)
                await c.write(node, "value", t)
                await c.transaction_end(t)

            return tx

        fns = {"ring_read": read(ring), "ring_socket_read": read(sock),
               "ring_transaction": transaction(ring), "ring_socket_transaction": transaction(sock)}
        for fn in fns.values():  # warm up
            await _samples(fn, 100)
        results: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(runs):
            samples: dict[str, list[float]] = {k: [] for k in fns}
            for _ in range(max(1, iterations // BLOCK)):
                for k, fn in fns.items():
                    samples[k].extend(await _samples(fn, BLOCK if "read" in k else max(1, BLOCK // 4)))
            for k, v in samples.items():
                results[k].append(statistics.median(v))
        return results
    finally:
        for c in (ring, sock, tool):
            if c is not None:
                await c.close()
        await dom.close()


def measure_ring(hv: Path, xs_path: Path, iterations: int, runs: int) -> dict[str, list[float]]:
    """Per run, the median latency (ns) of a read and of a transaction over the ring and
    over a socket, for the same domain (see the module notes)."""
    return aio.run(_measure(hv, xs_path, iterations, runs))
