"""Multi-queue vifs: several ring pairs for one interface, as io/netif.h lays them out.

Theory of operation
-------------------
A vif may have several *queues*, each one a transmit ring, a receive ring and its own
event channel(s) -- a `pvio.net.backend.NetbackQueue` on one side and a
`pvio.net.frontend.NetFront` on the other, exactly the single-queue engines.  Nothing in
a ring knows about the others: multi-queue is only how many pairs there are, where
their keys live in XenStore, and which pair a frame takes.

Negotiation (io/netif.h, "Multiple transmit and receive queues"; the keys are in
`pvio.net.keys`): netback writes ``multi-queue-max-queues`` before InitWait; a frontend
that wants n > 1 queues (the smaller of what the guest asks and that maximum) writes
``multi-queue-num-queues = n`` and each queue's tx-ring-ref, rx-ring-ref and
event-channel (or event-channel-tx/-rx) under ``queue-0/`` .. ``queue-<n-1>/``; the
features (feature-sg, request-rx-copy, ...) stay at the top.  A frontend that writes no
num-queues, or 1, has one queue with the top-level keys, as before multi-queue existed.
netback refuses 0 queues or more than its maximum with dev_fatal, as Linux's
xen-netback connect() does, and only that vif fails.

Which queue a frame takes:

- guest → host: in the guest, the kernel picks.  The guest's end is a TAP opened with
  IFF_MULTI_QUEUE, one fd per queue; the kernel's tun driver spreads the flows the
  guest's stack sends over those fds (by flow hash), and frames read from fd i go on
  queue i's transmit ring (`pvio.domains.xen_net`).
- host → guest: the same on the driver domain's TAP ``vif<domid>.<devid>``, which is
  always opened with IFF_MULTI_QUEUE and given one fd per queue when the frontend
  connects: frames read from fd i go into queue i's receive ring.  netback writes the
  frames a queue carried out of the guest through that queue's fd, so tun's automatic
  flow steering sends the replies of a flow back to the queue it came on.
- where no kernel picks (a host end that is a list in tests, or any caller of
  `select_queue`): a hash of the flow's addresses and ports, as Linux's xen-netfront
  picks with skb_get_hash() % num_queues.  One flow stays on one queue, so its frames
  are never reordered.

A vif's `rate` limits each queue, as Linux's netback gives every queue the vif's credit.

What queues buy in pvio: all the rings of a domain process are served by that process's
one asyncio loop, so more queues do not add CPUs the way Linux's per-queue kthreads and
interrupts do; they add ring slots and receive buffers in flight.  `pvio bench net
--queues N` measures it; docs/net.md has the numbers.

Rejected: one ring pair with a wider ring (io/netif.h's rings are one page, fixed); a
queue per TCP connection (n is fixed at connect time); spreading one flow's frames
round-robin over the queues (reorders TCP segments).
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import fields

from pvio.net.backend import NetbackStats

#: multi-queue-max-queues, what netback offers.  Linux's xen-netback offers the number of
#: CPUs, because each queue gets a kthread and an interrupt of its own; in pvio every
#: ring of the driver domain is served by one event loop, so CPUs are not what a queue
#: adds.  4 is what pvio's blkback offers, keeps a guest's grants bounded (each queue is
#: 2 ring pages and 512 granted pages in the guest), and is the same on every machine.
DEFAULT_MAX_QUEUES = 4

_ETH_IPV4 = b"\x08\x00"
_ETH_IPV6 = b"\x86\xdd"
_PORTS = (6, 17)  # TCP, UDP: their first four bytes are the ports


def flow_key(frame: bytes | memoryview) -> bytes:
    """The bytes that name a frame's flow: IP addresses, protocol and (TCP, UDP, not a
    fragment) ports; b"" for anything that is not IP (ARP goes on queue 0)."""
    if len(frame) < 14:
        return b""
    ethertype = bytes(frame[12:14])
    if ethertype == _ETH_IPV4 and len(frame) >= 34:
        ihl = (frame[14] & 0x0F) * 4
        proto = frame[23]
        fragment = bool(frame[20] & 0x3F or frame[21])  # MF or an offset: no ports here
        key = bytes(frame[26:34]) + bytes([proto])
        l4 = 14 + ihl
    elif ethertype == _ETH_IPV6 and len(frame) >= 54:
        proto = frame[20]
        fragment = False
        key = bytes(frame[22:54]) + bytes([proto])
        l4 = 54
    else:
        return b""
    if proto in _PORTS and not fragment and len(frame) >= l4 + 4:
        key += bytes(frame[l4 : l4 + 4])
    return key


def select_queue(frame: bytes | memoryview, queues: int) -> int:
    """The queue a frame's flow takes, of `queues` (Linux: skb_get_hash() % num_queues)."""
    if queues <= 1:
        return 0
    return zlib.crc32(flow_key(frame)) % queues


def total_stats(stats: Sequence[NetbackStats]) -> NetbackStats:
    """Every queue's counters added up: the vif's."""
    total = NetbackStats()
    for s in stats:
        for f in fields(NetbackStats):
            setattr(total, f.name, getattr(total, f.name) + getattr(s, f.name))
    return total


__all__ = ["DEFAULT_MAX_QUEUES", "flow_key", "select_queue", "total_stats"]
