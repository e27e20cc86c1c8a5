"""The driver domain process: blkback for every vbd and netback for every vif of this domain (role "driver").

`main(spec)` connects to the hypervisor as `spec.domid` with `spec.transport`, opens
the XenStore connection the toolstack handed over (fd `spec.xenstore_fd`, already bound
to the domid), serves every ``/local/domain/<domid>/backend/vbd/*/*`` with a
`pvio.blk.xenbus_backend.BlkbackService` and every ``backend/vif/*/*`` with a
`pvio.net.xenbus_backend.NetbackService` (hotplug scripts get XenStore at
``extra["xenstored_path"]``), and writes the status file: ``ready``, the
pid, and per device its backend path and statistics (refreshed every second, the
place `pvio bench blk` and `pvio list` read them; the same counters are in XenStore
under each backend directory's ``statistics/``), and per vbd its rings' occupancy at
that moment (``rings``: slots in use and slots per ring, which `pvio top` shows).  Cancelled (SIGTERM), it drains every
ring, closes the disks, and leaves: the hypervisor tears the domain down.
"""

from __future__ import annotations

import contextlib

from pvio.blk.xenbus_backend import BlkbackService
from pvio.domains.role import become_domain, open_xenstore, report_status
from pvio.domains.spec import DomainSpec
from pvio.domains.xen_vif_script import vif_opener
from pvio.net.xenbus_backend import NetbackService
from pvio.xenstore.client import AsyncClient


async def main(spec: DomainSpec) -> None:
    dom = await become_domain(spec)
    xs: AsyncClient | None = None
    service: BlkbackService | None = None
    netback: NetbackService | None = None
    try:
        xs = await open_xenstore(spec, dom)
        service = BlkbackService(dom, xs, max_in_flight=int(spec.extra.get("max_in_flight", 64)))
        await service.start()
        blkback = service
        # backend/vif/*: TAPs attached by the built-in hotplug (pvio.domains.xen_net) or
        # by the vif's own script, run as libxl runs it (pvio.domains.xen_vif_script)
        netback = vifs = NetbackService(dom, xs, vif_opener(xs, str(spec.extra.get("xenstored_path", ""))))
        await netback.start()
        await report_status(spec, dom.domid, lambda: {
            "devices": sorted(blkback.devices),
            "failed": blkback.failed | vifs.failed,
            "statistics": blkback.statistics() | vifs.statistics(),
            "rings": blkback.rings(),
            "vifs": sorted(vifs.devices),
        })
    finally:
        with contextlib.suppress(Exception):
            if netback is not None:
                await netback.stop()
        with contextlib.suppress(Exception):
            if service is not None:
                await service.stop()
        with contextlib.suppress(Exception):
            if xs is not None:
                await xs.close()
        await dom.close()
