"""The driver domain process: blkback for every vbd of this domain (role "driver").

`main(spec)` connects to the hypervisor as `spec.domid` with `spec.transport`, opens
the XenStore connection the toolstack handed over (fd `spec.xenstore_fd`, already bound
to the domid), serves every ``/local/domain/<domid>/backend/vbd/*/*`` with a
`pvio.blk.xenbus_backend.BlkbackService`, and writes the status file: ``ready``, the
pid, and per device its backend path and statistics (refreshed every second, the
place `pvio bench blk` and `pvio list` read them; the same counters are in XenStore
under each backend directory's ``statistics/``).  Cancelled (SIGTERM), it drains every
ring, closes the disks, and leaves: the hypervisor tears the domain down.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

from pvio.blk.xenbus_backend import BlkbackService
from pvio.hypervisor import aio
from pvio.toolstack.spec import DomainSpec, write_status
from pvio.xenstore.client import AsyncClient

STATUS_INTERVAL = 1.0


async def open_xenstore(spec: DomainSpec) -> AsyncClient:
    sock = socket.socket(fileno=spec.xenstore_fd)
    sock.setblocking(False)
    return await AsyncClient.open(sock=sock)


async def main(spec: DomainSpec) -> None:
    dom = await aio.connect(
        spec.hypervisor_socket, spec.name, spec.nr_pages, transport=spec.transport, domid=spec.domid
    )
    xs: AsyncClient | None = None
    service: BlkbackService | None = None
    try:
        xs = await open_xenstore(spec)
        service = BlkbackService(dom, xs, max_in_flight=int(spec.extra.get("max_in_flight", 64)))
        await service.start()
        while True:
            write_status(
                spec.status_file,
                ready=True,
                pid=os.getpid(),
                domid=dom.domid,
                role=spec.role,
                devices=sorted(service.devices),
                failed=service.failed,
                statistics=service.statistics(),
            )
            await asyncio.sleep(STATUS_INTERVAL)
    finally:
        with contextlib.suppress(Exception):
            if service is not None:
                await service.stop()
        with contextlib.suppress(Exception):
            if xs is not None:
                await xs.close()
        await dom.close()
