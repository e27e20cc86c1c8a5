"""The XenStore keys of a vif, as io/netif.h documents them, and their parsing.

Values written by the other end are hostile input: `parse_frontend_rings` and
`parse_backend_features` turn strings into checked values or raise `KeyValueError`
naming the key (the caller reports it with xenbus_dev_fatal).

Backend → frontend (written by netback under its backend directory, before InitWait)::

    feature-sg                      Values: 0/1  Default: 0  frames of several slots
    feature-gso-tcpv4               Values: 0/1  Default: 0  TCPv4 GSO extra-info accepted
    feature-gso-tcpv6               Values: 0/1  Default: 0
    feature-ipv6-csum-offload       Values: 0/1  Default: 0
    feature-rx-copy                 Values: 0/1  Default: 0  receive by grant copy
    feature-rx-flip                 Values: 0/1  Default: 1  page flipping (pvio: always 0)
    feature-multicast-control       Values: 0/1  Default: 0  MCAST_ADD/DEL extra-info
    feature-split-event-channels    Values: 0/1  Default: 0  a port per ring (pvio: 1)
    multi-queue-max-queues          Values: <uint32_t>  Default: 1  the most queues (ring
                                    pairs) netback serves for one vif (pvio: 4, see
                                    `pvio.net.multiqueue.DEFAULT_MAX_QUEUES`)
    hotplug-status                  "connected" once the vif's host end is attached

Frontend → backend (written by netfront under its device directory)::

    tx-ring-ref, rx-ring-ref        Values: <uint32_t>  grant references of the rings
    event-channel                   Values: <uint32_t>  one port for both rings, or
    event-channel-tx/-rx            one port each (feature-split-event-channels)
    request-rx-copy                 Values: 0/1  must be 1 (flipping is not supported)
    feature-rx-notify               Values: 0/1  the frontend kicks when it posts buffers
    feature-sg, feature-gso-tcpv4, feature-gso-tcpv6   what the frontend accepts on rx
    multi-queue-num-queues          Values: <uint32_t>  Default: 1; 1..multi-queue-max-queues,
                                    else netback refuses (Linux: "guest requested N
                                    queues, but valid range is 1 - M").  With more than
                                    one, each queue's tx-ring-ref, rx-ring-ref and
                                    event-channel(-tx/-rx) are under queue-0/ ..
                                    queue-<N-1>/; the features stay here
    request-multicast-control       Values: 0/1  Default: 0  only listed groups are received

Toolstack → both: mac, bridge, script, handle, type, ip, rate (libxl's names).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

from pvio.blk.keys import KeyValueError, read_bool, read_uint
from pvio.net.backend import FrontendRings
from pvio.net.frontend import BackendFeatures
from pvio.net.multiqueue import DEFAULT_MAX_QUEUES

U32_MAX = 0xFFFF_FFFF

#: What netback offers.
BACKEND_FEATURES = {
    "feature-sg": "1",
    "feature-gso-tcpv4": "1",
    "feature-gso-tcpv6": "1",
    "feature-ipv6-csum-offload": "1",
    "feature-rx-copy": "1",
    "feature-rx-flip": "0",
    "feature-multicast-control": "1",
    "feature-split-event-channels": "1",
    "multi-queue-max-queues": str(DEFAULT_MAX_QUEUES),
}

#: Keys of one queue: in the frontend's directory (one queue), or its queue-<i>/ (several).
QUEUE_RING_KEYS = ("tx-ring-ref", "rx-ring-ref", "event-channel", "event-channel-tx", "event-channel-rx")
#: Keys of the frontend's directory netback reads to connect.
FRONTEND_RING_KEYS = (
    *QUEUE_RING_KEYS, "request-rx-copy", "feature-rx-notify", "feature-sg", "feature-gso-tcpv4",
    "feature-gso-tcpv6", "multi-queue-num-queues", "request-multicast-control",
)
#: Keys of the backend's directory netfront reads before it publishes.
BACKEND_FEATURE_KEYS = tuple(BACKEND_FEATURES)


def parse_num_queues(values: Mapping[str, str], max_queues: int = DEFAULT_MAX_QUEUES) -> int:
    """multi-queue-num-queues (absent: 1), refused as Linux's xen-netback connect() does."""
    n = read_uint(values, "multi-queue-num-queues", U32_MAX, default=1)
    if n == 0 or n > max_queues:
        raise KeyValueError("multi-queue-num-queues",
                            f"guest requested {n} queues, but valid range is 1 - {max_queues}")
    return n


def parse_frontend_rings(values: Mapping[str, str], queue: Mapping[str, str] | None = None) -> FrontendRings:
    """One queue's ring keys, checked (KeyValueError names the offending key): the rings
    and ports from `queue` (a queue-<i>/ directory; default: `values` itself, the
    single-queue layout), the features from the frontend's directory `values`."""
    ring = values if queue is None else queue
    split = "event-channel-tx" in ring or "event-channel-rx" in ring
    if split and "event-channel" in ring:
        raise KeyValueError("event-channel", "given with event-channel-tx/-rx: one or the other")
    if not read_bool(values, "request-rx-copy"):
        raise KeyValueError("request-rx-copy", "receive by page flipping is not supported")
    return FrontendRings(
        tx_ring_ref=read_uint(ring, "tx-ring-ref", U32_MAX),
        rx_ring_ref=read_uint(ring, "rx-ring-ref", U32_MAX),
        event_channel=read_uint(ring, "event-channel-tx" if split else "event-channel", U32_MAX),
        event_channel_rx=read_uint(ring, "event-channel-rx", U32_MAX) if split else -1,
        rx_notify=read_bool(values, "feature-rx-notify"),
        sg=read_bool(values, "feature-sg"),
        gso_tcpv4=read_bool(values, "feature-gso-tcpv4"),
        gso_tcpv6=read_bool(values, "feature-gso-tcpv6"),
        multicast_control=read_bool(values, "request-multicast-control"),
    )


def frontend_keys(queues: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """The keys a frontend publishes for its queues, each queue's keys as
    `pvio.net.frontend.NetFront.setup_rings` returned them: one queue, all at the top (no
    multi-queue-num-queues, as a frontend without multi-queue writes them); several, the
    ring keys under queue-<i>/ and the rest once at the top with multi-queue-num-queues."""
    if len(queues) == 1:
        return dict(queues[0])
    keys = {k: v for k, v in queues[0].items() if k not in QUEUE_RING_KEYS}
    keys["multi-queue-num-queues"] = str(len(queues))
    for i, q in enumerate(queues):
        keys.update((f"queue-{i}/{k}", v) for k, v in q.items() if k in QUEUE_RING_KEYS)
    return keys


_RATE = re.compile(r"^\s*(\d+)\s*([kKmMgG]?)([bB])/s\s*(?:@\s*(\d+)\s*(us|ms|s))?\s*$")


def parse_rate(text: str) -> tuple[int, float]:
    """libxl's rate syntax (xl-network-configuration(5)): ``RATE/s[@INTERVAL]``, RATE in
    b or B with an optional k/M/G (powers of 10, as libxl), INTERVAL in us/ms/s
    (default 50ms).  Returns (bytes per interval, interval in seconds)."""
    m = _RATE.match(text)
    if m is None:
        raise KeyValueError("rate", f"{text!r} is not RATE/s[@INTERVAL] (e.g. 10Mb/s@20ms)")
    value = int(m.group(1)) * {"": 1, "k": 10**3, "m": 10**6, "g": 10**9}[m.group(2).lower()]
    per_second = value // 8 if m.group(3) == "b" else value
    interval = 0.05
    if m.group(4):
        interval = int(m.group(4)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0}[m.group(5)]
    if per_second <= 0 or interval <= 0:
        raise KeyValueError("rate", f"{text!r}: must be positive")
    return max(1, int(per_second * interval)), interval


def parse_backend_features(values: Mapping[str, str]) -> BackendFeatures:
    """The backend's feature keys; a backend that only flips pages cannot be used."""
    if not read_bool(values, "feature-rx-copy"):
        raise KeyValueError("feature-rx-copy", "the backend does not receive by copy")
    return BackendFeatures(
        sg=read_bool(values, "feature-sg"),
        gso_tcpv4=read_bool(values, "feature-gso-tcpv4"),
        gso_tcpv6=read_bool(values, "feature-gso-tcpv6"),
        rx_copy=True,
        multicast_control=read_bool(values, "feature-multicast-control"),
        split_event_channels=read_bool(values, "feature-split-event-channels"),
        max_queues=max(1, read_uint(values, "multi-queue-max-queues", U32_MAX, default=1)),
    )


__all__ = [
    "BACKEND_FEATURES",
    "BACKEND_FEATURE_KEYS",
    "FRONTEND_RING_KEYS",
    "QUEUE_RING_KEYS",
    "KeyValueError",
    "frontend_keys",
    "parse_backend_features",
    "parse_frontend_rings",
    "parse_num_queues",
    "parse_rate",
]
