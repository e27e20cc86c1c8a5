"""blkback's XenBus side: the driver domain's vbd devices, from XenStore to the engine.

Theory of operation
-------------------
`BlkbackService` watches ``/local/domain/<own>/backend/vbd``; every
``<frontend-domid>/<devid>`` directory under it is one device.  For each it reads the
keys the toolstack wrote (`params`, `mode`, `type`, `device-type`, `format`,
`frontend`, `frontend-id`, `discard-enable`, and pvio's `logical-block-size`: the
disk's logical sector size, 512 unless `pvio up --disk` said `sector-size=4096`), opens the disk (`open_disk`:
a raw image, or an NBD URI for qcow2 behind qemu-nbd and for remote disks), and runs a
`pvio.xenbus.Backend` end whose driver is a `BlkbackDevice`:

- probe (with the switch to InitWait, one transaction): feature-flush-cache,
  feature-barrier, max-ring-page-order, feature-max-indirect-segments (256, as Linux
  writes it at probe), multi-queue-max-queues, and feature-discard with its granularity when the disk can
  discard and the toolstack allows it;
- connect (with the switch to Connected, one transaction): read the frontend's
  ring-ref(s), event-channel and protocol (`pvio.blk.keys.parse_frontend_ring`), attach
  a `pvio.blk.backend.BlkbackRing` — one per queue when the frontend asked for several
  (multi-queue-num-queues, refused with dev_fatal when 0 or above
  multi-queue-max-queues, as Linux does; each queue's keys under queue-<i>/) — and
  publish sectors, sector-size,
  physical-sector-size, info (VDISK_READONLY / CDROM / REMOVABLE) and
  feature-persistent (both transports, as Linux; the map transport keeps the mappings
  of a frontend's persistent grants, so the steady state needs no hypercall) — Linux
  blkback writes feature-persistent only here, so a frontend reads it when the backend
  is Connected;
- disconnect: the engine drains and lets the ring go.

The handshake table (`pvio.xenbus.handshake`) gives reconnection (Closed → the
frontend is Initialising → InitWait), orderly close, and toolstack removal (`online` =
0 and Closing → Closed → the device is dropped).  `resize()` publishes a new size; a
raw image that grew is noticed within a second (its size is checked with the
statistics, as Linux's blkback checks its device's size on every turn of its loop), so
`pvio block-resize` only has to grow the file.

A ring the frontend breaks (an impossible index) is reported with dev_fatal on that
device only.  One refinement over the plain table: blkback connects only to a frontend
in Initialised.  A frontend still Connected when a (re)started blkback reaches InitWait
is the one whose previous backend died mid-flight: its old ring has requests the dead
backend consumed and never answered, so attaching to it would lose or repeat slots.
That frontend renegotiates (blkif_recover) and publishes a new ring; blkback waits.

4 KiB logical sectors follow Xen's blkif.h as reconciled with its implementations
(Xen 4.18, note 12): `sector-size` is 4096 while `sectors` and every sector number in
the ring stay in 512-byte units — what Linux's blkfront and blkback do — and a request
that is not whole logical sectors is refused (BLKIF_RSP_ERROR, Linux's "misaligned
I/O").  `feature-large-sector-size`, the older header's switch to sector-size units,
is deprecated there ("backends should not make any decisions based on it"): blkback
neither reads it nor needs it, and blkfront does not write it.  The disk served is
the image rounded down to whole logical sectors.

Statistics (`BlkbackStats.as_keys()`) are published under the device's backend
directory, ``statistics/<name>``, at most once a second when they changed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
from dataclasses import dataclass, field

from pvio.abi.ring import MAX_RING_PAGE_ORDER
from pvio.abi.xenbus import XenbusState
from pvio.blk.back_stats import BlkbackStats
from pvio.blk.backend import DEFAULT_MAX_IN_FLIGHT, MAX_INDIRECT_SEGMENTS, BlkbackRing
from pvio.blk.keys import backend_disk_keys, parse_frontend_queue, parse_num_queues, read_uint
from pvio.hypervisor.client import Domain
from pvio.nbd.address import is_nbd_uri
from pvio.storage.backend import FlatVectored, StorageError, VectoredBackend, physical_sector_size
from pvio.storage.rawfile import RawFile
from pvio.xenbus import Backend, XenbusDevice
from pvio.xenbus.service import BackendService, Served
from pvio.xenstore.client import AsyncClient

log = logging.getLogger(__name__)

#: Keys of a ring's directory (the frontend's, or its queue-<i>/) blkback reads to connect.
QUEUE_KEYS = ("ring-ref", "event-channel", *(f"ring-ref{i}" for i in range(1 << MAX_RING_PAGE_ORDER)))
#: Keys of the frontend's directory blkback reads to connect.
FRONTEND_RING_KEYS = (*QUEUE_KEYS, "ring-page-order", "protocol", "feature-persistent", "multi-queue-num-queues")
#: multi-queue-max-queues: rings one vbd may have.  They are served by one event loop
#: (the driver domain's), as tasks: more queues give more requests in flight, not more
#: CPUs (see docs/blk.md for what that measured).
DEFAULT_MAX_QUEUES = 4


@dataclass
class VbdConfig:
    """The backend directory's keys as the toolstack wrote them."""

    params: str
    read_only: bool
    device_type: str = "disk"
    format: str = "raw"
    type: str = "phy"
    frontend: str = ""
    frontend_id: int = 0
    discard_enable: bool = True
    sector_size: int = 512  # logical-block-size
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def cdrom(self) -> bool:
        return self.device_type == "cdrom"


async def read_keys(xs: AsyncClient, path: str, names: tuple[str, ...], tx: int = 0) -> dict[str, str]:
    """The values of `names` under `path` that exist (as text)."""
    values = await asyncio.gather(*(xs.read_or(f"{path}/{n}", None, tx) for n in names))
    return {n: v.decode(errors="replace") for n, v in zip(names, values, strict=True) if v is not None}


async def read_vbd_config(xs: AsyncClient, path: str) -> VbdConfig:
    names = ("params", "mode", "device-type", "format", "type", "frontend", "frontend-id", "discard-enable",
             "logical-block-size")
    v = await read_keys(xs, path, names)
    if "params" not in v:
        raise OSError(errno.ENOENT, f"{path}/params is missing")
    sector_size = read_uint(v, "logical-block-size", 4096, default=512)
    if sector_size < 512 or sector_size & (sector_size - 1):
        raise StorageError(errno.EINVAL, f"{path}/logical-block-size {sector_size} is not a power of two >= 512")
    mode = v.get("mode", "w")
    return VbdConfig(
        params=v["params"],
        read_only=mode != "w" or v.get("device-type") == "cdrom",
        device_type=v.get("device-type", "disk"),
        format=v.get("format", "raw"),
        type=v.get("type", "phy"),
        frontend=v.get("frontend", ""),
        frontend_id=read_uint(v, "frontend-id", 0xFFFF, default=0),
        discard_enable=v.get("discard-enable", "1") != "0",
        sector_size=sector_size,
    )


async def open_disk(params: str, *, read_only: bool, workers: int = 4) -> VectoredBackend:
    """The disk named by a vbd's `params`: an NBD URI (an `NbdClient`, for qcow2 and other
    formats served by qemu-nbd) or a raw image path (a `RawFile`)."""
    if is_nbd_uri(params):
        from pvio.nbd.client_asyncio import NbdClient

        try:
            client = await NbdClient.connect(params)
        except (OSError, TimeoutError) as e:
            raise StorageError(errno.EIO, f"cannot reach {params}: {e}") from None
        return FlatVectored(client, read_only=read_only)
    return RawFile(params, read_only=read_only, workers=workers)


class BlkbackDevice:
    """The BackendDriver of one vbd: probe, connect, disconnect (see the module notes)."""

    def __init__(
        self, domain: Domain, config: VbdConfig, disk: VectoredBackend, *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, max_queues: int = DEFAULT_MAX_QUEUES,
    ):
        self.domain = domain
        self.config = config
        self.disk = disk
        self.max_in_flight = max_in_flight
        self.max_queues = max_queues
        self.rings: list[BlkbackRing] = []
        self.end: Backend | None = None
        self._ring_keys: list[dict[str, str]] | None = None
        self._fatal: set[asyncio.Task[None]] = set()

    @property
    def ring(self) -> BlkbackRing | None:
        """The first ring (the only one without multi-queue)."""
        return self.rings[0] if self.rings else None

    def stats(self) -> BlkbackStats | None:
        """The device's statistics: every ring's, added up."""
        return BlkbackStats.total([r.stats for r in self.rings]) if self.rings else None

    def occupancy(self) -> list[tuple[int, int]]:
        """Each ring's (slots in use, nr_ents) now (`BlkbackRing.occupancy`)."""
        return [r.occupancy() for r in self.rings]

    @property
    def sectors(self) -> int:
        """The disk's size in 512-byte units, rounded down to whole logical sectors."""
        ss = self.config.sector_size
        return self.disk.info.size // ss * ss // 512

    @property
    def discard(self) -> bool:
        return self.disk.info.can_trim and self.config.discard_enable and not self.config.read_only

    async def probe(self, dev: XenbusDevice, tx: int) -> None:
        keys = {
            "feature-flush-cache": "1",
            "feature-barrier": "1",
            "max-ring-page-order": str(MAX_RING_PAGE_ORDER),
            "feature-discard": "1" if self.discard else "0",
            "feature-max-indirect-segments": str(MAX_INDIRECT_SEGMENTS),
            "multi-queue-max-queues": str(self.max_queues),
        }
        if self.discard:
            keys["discard-granularity"] = str(max(self.config.sector_size, physical_sector_size(self.disk.info)))
            keys["discard-alignment"] = "0"
            keys["discard-secure"] = "0"
        for k, v in keys.items():
            await dev.xs.write(f"{dev.nodename}/{k}", v, tx)

    # blkback connects: the frontend's keys, the engine, the disk's properties.  When the frontend is Initialised, blkback reads its transport keys — checked with
    # pvio.blk.keys (a ring order above max-ring-page-order, a missing ring-ref, an
    # unknown protocol are the frontend's fault and end in dev_fatal) — attaches the
    # engine to the ring, and, in the same transaction as the switch to Connected, writes
    # what the frontend needs to know about the disk: sectors, sector-size,
    # physical-sector-size and info.  A transaction that must be retried (EAGAIN) runs
    # this again: the engine is attached once, for the same keys.
    async def connect(self, dev: XenbusDevice, tx: int) -> bool:
        if await dev.read_state(dev.otherend, tx) is not XenbusState.Initialised:
            return False  # a frontend still Connected to a dead backend's ring: wait
        top = await read_keys(dev.xs, dev.otherend, FRONTEND_RING_KEYS, tx)
        n = parse_num_queues(top, self.max_queues)
        queues = [top] if n == 1 else [
            await read_keys(dev.xs, f"{dev.otherend}/queue-{i}", QUEUE_KEYS, tx) for i in range(n)
        ]
        values = [top, *queues]
        if not self.rings or self._ring_keys != values:
            await self._disconnect_rings()
            infos = [parse_frontend_queue(top, q) for q in queues]
            for info in infos:
                ring = BlkbackRing(
                    self.domain, self.config.frontend_id, self.disk, max_in_flight=self.max_in_flight,
                    on_broken=lambda e: self._on_broken(dev, e),
                    persistent=top.get("feature-persistent") == "1",
                    max_indirect_segments=MAX_INDIRECT_SEGMENTS,
                    sector_size=self.config.sector_size,
                )
                try:
                    await ring.connect(info)
                except BaseException:
                    await self._disconnect_rings()
                    raise
                self.rings.append(ring)
            self._ring_keys = values
        keys = backend_disk_keys(
            self.sectors,
            read_only=self.config.read_only,
            cdrom=self.config.cdrom,
            removable=self.config.cdrom,
            sector_size=self.config.sector_size,
            physical_sector_size=max(self.config.sector_size, physical_sector_size(self.disk.info)),
            discard=self.discard,
        )
        # Persistent grants, in both transports as Linux's blkback offers them whatever it
        # does with them: a map-transport backend keeps the mappings; a copying one has
        # nothing to keep, but the frontend still reuses its granted pool (no grant claimed,
        # granted and ended per request) and can lend a read's pages to its export.
        keys["feature-persistent"] = "1"
        for k, v in keys.items():
            await dev.xs.write(f"{dev.nodename}/{k}", v, tx)
        return True

    async def disconnect(self, dev: XenbusDevice) -> None:
        await self._disconnect_rings()

    async def _disconnect_rings(self) -> None:
        rings, self.rings, self._ring_keys = self.rings, [], None
        for ring in rings:
            await ring.disconnect()

    def _on_broken(self, dev: XenbusDevice, e: BaseException) -> None:
        async def fatal() -> None:
            with contextlib.suppress(Exception):
                await dev.dev_fatal(errno.EPROTO, f"ring broken: {e}")

        task = asyncio.get_running_loop().create_task(fatal())
        self._fatal.add(task)
        task.add_done_callback(self._fatal.discard)


class BlkbackService(BackendService[BlkbackDevice]):
    """Every vbd under /local/domain/<domid>/backend/vbd, served by one driver domain."""

    def __init__(
        self, domain: Domain, xs: AsyncClient, *, max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_queues: int = DEFAULT_MAX_QUEUES,
    ) -> None:
        super().__init__(xs, f"/local/domain/{domain.domid}/backend/vbd")
        self.domain = domain
        self.max_in_flight = max_in_flight
        self.max_queues = max_queues

    def rings(self) -> dict[str, dict[str, list[int]]]:
        """Every connected vbd's rings now: slots in use and slots, one entry per ring
        (a gauge for `pvio top`, not a counter: not published in XenStore)."""
        out = {}
        for path, served in self.devices.items():
            if rings := served.driver.occupancy():
                out[path] = {"in_use": [u for u, _ in rings], "slots": [n for _, n in rings]}
        return out

    async def _add(self, path: str) -> None:
        try:
            config = await read_vbd_config(self.xs, path)
        except OSError:
            return  # the toolstack has not finished writing: the next event retries
        try:
            if config.format != "raw" and not is_nbd_uri(config.params):
                # Serving a qcow2 (or any formatted) image as raw bytes would hand the guest
                # the format's metadata and corrupt the image on the first write.
                raise StorageError(
                    errno.EMEDIUMTYPE,
                    f"format {config.format!r} is served through an NBD server (params must be "
                    "an nbd:// or nbd+unix:// URI; pvio up starts qemu-nbd for such disks)",
                )
            disk = await open_disk(config.params, read_only=config.read_only)
        except OSError as e:
            self.failed[path] = str(e)
            log.warning("blkback: %s: %s", path, e)
            dev = XenbusDevice(self.xs, path, config.frontend)
            with contextlib.suppress(Exception):
                await dev.dev_fatal(e.errno or errno.EIO, f"opening {config.params}: {e.strerror or e}")
            return
        driver = BlkbackDevice(
            self.domain, config, disk, max_in_flight=self.max_in_flight, max_queues=self.max_queues
        )
        end = Backend(self.xs, path, config.frontend, driver)
        driver.end = end
        await self._serve(Served(path, end, driver))
        log.info("blkback: serving %s (%s)", path, config.params)

    async def _close(self, device: Served[BlkbackDevice]) -> None:
        await device.driver.disconnect(device.end.dev)
        await device.driver.disk.close()
        log.info("blkback: %s removed", device.path)

    async def _tick(self, device: Served[BlkbackDevice]) -> None:
        disk = device.driver.disk
        if isinstance(disk, RawFile) and device.driver.rings:  # a raw image grown: online resize
            size = disk.info.size
            if disk.refresh_size() != size:
                log.info("blkback: %s grew to %d bytes", device.path, disk.info.size)
                with contextlib.suppress(Exception):
                    await self.resize(device.path)

    def _stats_keys(self, device: Served[BlkbackDevice]) -> dict[str, str] | None:
        stats = device.driver.stats()
        if stats is None:
            return None
        keys = stats.as_keys()
        disk = device.driver.disk
        if isinstance(disk, RawFile):  # how the image's transfers were made
            keys |= {"io_nowait": str(disk.nowait), "io_gated": str(disk.gated), "io_pool_jobs": str(disk.pool_jobs)}
            gate = disk.gate
            if gate is not None:
                keys |= {"gate_slow_writes": str(gate.slow_writes), "gate_preempted_writes": str(gate.preempted_writes)}
        return keys

    async def resize(self, path: str) -> None:
        """Publish the disk's current size to a connected frontend (online resize)."""
        device = self.devices[path]
        disk = device.driver.disk
        if isinstance(disk, RawFile):
            disk.refresh_size()
        for ring in device.driver.rings:
            ring.set_size(device.driver.sectors * 512)
        await device.end.resize(device.driver.sectors)
