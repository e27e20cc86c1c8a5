"""The XenStore keys of a vbd, as io/blkif.h documents them, and their parsing.

Each key is listed as blkif.h does (Values / Default / Notes).  Values written by the
other end are hostile input: `parse_frontend_ring` and `parse_backend_disk` turn the
strings read from XenStore into checked values or raise `KeyValueError` naming the key,
which the caller reports with xenbus_dev_fatal (an `error` node) instead of crashing.

Backend → frontend (written by blkback under its backend directory)::

    sectors                 Values: <uint64_t>   Notes: size of the disk in 512-byte sectors
    info                    Values: <uint32_t> (bitmap)  VDISK_CDROM | VDISK_REMOVABLE |
                            VDISK_READONLY
    sector-size             Values: <uint32_t>   logical sector size in bytes; `sectors` and
                            every sector number in the ring stay in 512-byte units
                            whatever it is (Xen 4.18's blkif.h, Linux), requests must be
                            whole logical sectors.  feature-large-sector-size (the older
                            header's switch to sector-size units) is deprecated: pvio
                            neither writes nor reads it
    physical-sector-size    Values: <uint32_t>   Default: <"sector-size">
    feature-flush-cache     Values: 0/1          Default: 0
    feature-barrier         Values: 0/1          Default: 0
    feature-discard         Values: 0/1          Default: 0
    max-ring-page-order     Values: <uint32_t>   Default: 0; the largest ring the backend maps
    multi-queue-max-queues  Values: <uint32_t>   Default: 1; the most rings the backend serves
    feature-max-indirect-segments  Values: <uint32_t>  Default: 0; the most segments one
                            BLKIF_OP_INDIRECT may carry (written at probe); absent: no
                            indirect requests
    feature-persistent      Values: 0/1          Default: 0; the backend keeps the frontend's
                            persistent grants mapped.  Written with Connected (Linux
                            blkback's connect()), so a frontend reads it then

Frontend → backend (written by blkfront under its device directory)::

    ring-ref                Values: <uint32_t>   grant reference of the ring page (order 0)
    ring-page-order         Values: <uint32_t>   Default: 0; then ring-ref0 .. ring-refN-1
    event-channel           Values: <uint32_t>   the frontend's unbound port for the backend
    protocol                Values: "x86_32-abi" | "x86_64-abi" | "arm-abi"
                            Default: the backend's native ABI
    multi-queue-num-queues  Values: <uint32_t>   Default: 1; 1..multi-queue-max-queues, else
                            the backend refuses (Linux: "guest requested N queues,
                            exceeding the maximum of M").  With more than one, each ring's
                            ring-ref(s) and event-channel are under queue-0/ ..
                            queue-<N-1>/; ring-page-order and protocol stay here
    feature-persistent      Values: 0/1          Default: 0; the frontend can reuse granted
                            pages (it writes its capability; both must say 1)

Toolstack → backend: params, mode ("r"/"w"), type, device-type ("disk"/"cdrom"),
format, discard-enable.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from pvio.abi.blkif import VDISK_CDROM, VDISK_READONLY, VDISK_REMOVABLE, BlkifABI, abi_for_protocol
from pvio.abi.ring import MAX_RING_PAGE_ORDER

U32_MAX = 0xFFFF_FFFF
U64_MAX = 0xFFFF_FFFF_FFFF_FFFF


class KeyValueError(ValueError):
    """A XenStore key is missing or holds a value the protocol does not allow."""

    def __init__(self, key: str, reason: str):
        super().__init__(f"{key}: {reason}")
        self.key = key
        self.reason = reason


def read_uint(values: Mapping[str, str], key: str, limit: int, default: int | None = None) -> int:
    """A decimal unsigned integer key, checked against `limit`."""
    text = values.get(key)
    if text is None:
        if default is None:
            raise KeyValueError(key, "missing")
        return default
    text = text.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 20:
        raise KeyValueError(key, f"{text[:32]!r} is not an unsigned decimal number")
    value = int(text)
    if value > limit:
        raise KeyValueError(key, f"{value} exceeds {limit}")
    return value


def read_bool(values: Mapping[str, str], key: str, default: bool = False) -> bool:
    text = values.get(key)
    if text is None:
        return default
    return text.strip() not in ("", "0")


@dataclass(frozen=True)
class FrontendRing:
    """What blkback needs to connect: the ring's grant refs, its order, port and ABI."""

    ring_refs: tuple[int, ...]
    ring_page_order: int
    event_channel: int
    abi: BlkifABI


def parse_frontend_ring(
    values: Mapping[str, str], max_ring_page_order: int = MAX_RING_PAGE_ORDER
) -> FrontendRing:
    """Read ring-ref(s), ring-page-order, event-channel and protocol as Linux blkback does."""
    order = read_uint(values, "ring-page-order", U32_MAX, default=0)
    if order > max_ring_page_order:
        raise KeyValueError("ring-page-order", f"{order} exceeds max-ring-page-order {max_ring_page_order}")
    if "ring-page-order" in values:
        refs = tuple(read_uint(values, f"ring-ref{i}", U32_MAX) for i in range(1 << order))
    else:
        refs = (read_uint(values, "ring-ref", U32_MAX),)
    port = read_uint(values, "event-channel", U32_MAX)
    try:
        abi = abi_for_protocol(values.get("protocol"))
    except ValueError as e:
        raise KeyValueError("protocol", str(e)) from None
    return FrontendRing(refs, order, port, abi)


def parse_num_queues(values: Mapping[str, str], max_queues: int) -> int:
    """multi-queue-num-queues, refused as Linux blkback's connect_ring refuses it."""
    n = read_uint(values, "multi-queue-num-queues", U32_MAX, default=1)
    if n == 0 or n > max_queues:
        raise KeyValueError("multi-queue-num-queues", f"guest requested {n} queues, exceeding the maximum of {max_queues}")
    return n


def parse_frontend_queue(
    top: Mapping[str, str], queue: Mapping[str, str], max_ring_page_order: int = MAX_RING_PAGE_ORDER
) -> FrontendRing:
    """One ring of a multi-queue frontend: its own refs and port, the device's order and ABI."""
    shared = {k: top[k] for k in ("ring-page-order", "protocol") if k in top}
    return parse_frontend_ring({**queue, **shared}, max_ring_page_order)


@dataclass(frozen=True)
class BackendDisk:
    """What blkfront learns about its disk when the backend is Connected."""

    sectors: int
    info: int
    sector_size: int
    physical_sector_size: int
    feature_flush_cache: bool
    feature_barrier: bool
    feature_discard: bool
    max_indirect_segments: int = 0
    feature_persistent: bool = False

    @property
    def read_only(self) -> bool:
        return bool(self.info & VDISK_READONLY)

    @property
    def cdrom(self) -> bool:
        return bool(self.info & VDISK_CDROM)

    @property
    def removable(self) -> bool:
        return bool(self.info & VDISK_REMOVABLE)

    @property
    def size(self) -> int:
        return self.sectors * 512


def parse_backend_disk(values: Mapping[str, str]) -> BackendDisk:
    sector_size = read_uint(values, "sector-size", U32_MAX, default=512)
    if sector_size < 512 or sector_size & (sector_size - 1):
        raise KeyValueError("sector-size", f"{sector_size} is not a power of two >= 512")
    physical = read_uint(values, "physical-sector-size", U32_MAX, default=sector_size)
    if physical < sector_size or physical & (physical - 1):
        raise KeyValueError("physical-sector-size", f"{physical} is not a power of two >= sector-size")
    return BackendDisk(
        sectors=read_uint(values, "sectors", U64_MAX),
        info=read_uint(values, "info", U32_MAX, default=0),
        sector_size=sector_size,
        physical_sector_size=physical,
        feature_flush_cache=read_bool(values, "feature-flush-cache"),
        feature_barrier=read_bool(values, "feature-barrier"),
        feature_discard=read_bool(values, "feature-discard"),
        max_indirect_segments=read_uint(values, "feature-max-indirect-segments", U32_MAX, default=0),
        feature_persistent=read_bool(values, "feature-persistent"),
    )


def backend_disk_keys(
    sectors: int,
    *,
    read_only: bool,
    cdrom: bool = False,
    removable: bool = False,
    sector_size: int = 512,
    physical_sector_size: int = 512,
    flush: bool = True,
    barrier: bool = True,
    discard: bool = False,
) -> dict[str, str]:
    """The keys blkback writes (in one transaction) before switching to Connected."""
    info = (VDISK_READONLY if read_only else 0) | (VDISK_CDROM if cdrom else 0)
    info |= VDISK_REMOVABLE if removable else 0
    keys = {
        "sectors": str(sectors),
        "info": str(info),
        "sector-size": str(sector_size),
        "physical-sector-size": str(physical_sector_size),
        "feature-flush-cache": "1" if flush else "0",
        "feature-barrier": "1" if barrier else "0",
        "feature-discard": "1" if discard else "0",
    }
    if discard:
        keys["discard-granularity"] = str(physical_sector_size)
        keys["discard-alignment"] = "0"
        keys["discard-secure"] = "0"
    return keys
