"""What every domain role does the same way: open the XenStore connection the toolstack
handed over, and keep the status file fresh.

A role's main connects, starts its devices, then ends in `report_status`: the status file
says ``ready`` at once (the toolstack waits for that), then is rewritten every
`STATUS_INTERVAL` seconds with the role's counters (`pvio list` and `pvio bench` read
them).  A role that must also look at something more often (the lguest guest, for devices
its Launcher removed) passes `poll`, run every `poll_interval` seconds.
"""

from __future__ import annotations

import asyncio
import errno
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any, NoReturn

from pvio.domains.spec import DomainSpec, write_status
from pvio.domains.xen_pages import open_ring_xenstore, uses_ring
from pvio.hypervisor import aio
from pvio.hypervisor.client import Domain
from pvio.hypervisor.errors import HypercallError
from pvio.trace import TRACE_DIR, follow
from pvio.xenstore.client import AsyncClient

#: Seconds between refreshes of a domain's status file.
STATUS_INTERVAL = 1.0
#: How long a restarted domain waits for the hypervisor to finish its previous life
#: (a dead domain lingers while another domain still maps its pages).
REBIRTH_TIMEOUT = 15.0


async def become_domain(spec: DomainSpec, nr_pages: int | None = None) -> Domain:
    """Connect to the hypervisor as `spec.domid`.  A domain restarted after it died may
    find its domid still taken for a moment (EEXIST): it waits, at most REBIRTH_TIMEOUT."""
    deadline = asyncio.get_running_loop().time() + REBIRTH_TIMEOUT
    while True:
        try:
            return await aio.connect(spec.hypervisor_socket, spec.name,
                                     spec.nr_pages if nr_pages is None else nr_pages,
                                     transport=spec.transport, domid=spec.domid)
        except HypercallError as e:
            if e.rc != -errno.EEXIST or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.1)


async def open_xenstore(spec: DomainSpec, dom: Domain | None = None) -> AsyncClient:
    """The domain's XenStore connection.  By default (no `spec.xenstore_fd`) over its
    ring: the domain builds its page and port and the toolstack introduces it
    (`pvio.domains.xen_pages`); a restarted xenstored has it reconnect over the ring.
    Otherwise the socket the toolstack handed over (fd `spec.xenstore_fd`, already
    bound to the domain's domid by xenstored): if xenstored restarts, the client asks
    the toolstack for a new one over `spec.toolstack_fd` and carries on (its watches
    registered again, its requests outside a transaction sent again)."""
    if dom is not None and uses_ring(spec):
        xs, _, _ = await open_ring_xenstore(spec, dom)
        return xs
    sock = socket.socket(fileno=spec.xenstore_fd)
    sock.setblocking(False)
    if spec.toolstack_fd < 0:
        return await AsyncClient.open(sock=sock)
    channel = socket.socket(fileno=spec.toolstack_fd)

    async def connector() -> socket.socket:
        return await asyncio.to_thread(ask_for_xenstore, channel)

    return await AsyncClient.open(sock=sock, reconnect=True, connector=connector)


def ask_for_xenstore(channel: socket.socket) -> socket.socket:
    """A new XenStore connection from the toolstack (blocking: it answers once xenstored
    serves again)."""
    channel.send(b"xenstore")
    msg, fds, _, _ = socket.recv_fds(channel, 256, 1)
    if not fds:
        raise ConnectionRefusedError(f"the toolstack gave no XenStore connection: {msg[:200]!r}")
    sock = socket.socket(fileno=fds[0])
    sock.setblocking(False)
    return sock


async def report_status(
    spec: DomainSpec,
    domid: int,
    sample: Callable[[], dict[str, Any]],
    *,
    poll: Callable[[], Awaitable[None]] | None = None,
    poll_interval: float = STATUS_INTERVAL,
) -> NoReturn:
    """Write ``{"ready": true, "pid", "domid", "role", **sample()}`` now and every
    STATUS_INTERVAL seconds, running `poll` every `poll_interval` seconds in between;
    returns only by cancellation."""
    loop = asyncio.get_running_loop()

    def write() -> None:
        write_status(spec.status_file, ready=True, pid=os.getpid(), domid=domid, role=spec.role, **sample())

    trace_dir = os.path.join(spec.state_dir, TRACE_DIR)
    write()
    next_write = loop.time() + STATUS_INTERVAL
    while True:
        await asyncio.sleep(poll_interval if poll is not None else STATUS_INTERVAL)
        if poll is not None:
            await poll()
        follow(trace_dir, spec.name)  # `pvio trace` switches tracing on and off
        if loop.time() >= next_write:
            write()
            next_write = loop.time() + STATUS_INTERVAL
