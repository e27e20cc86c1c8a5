"""netback's reading of the transmit ring, and its plan for the receive ring.  Sans-IO.

Theory of operation
-------------------
`parse_tx` turns a batch of transmit requests, copied out of the ring, into frames to
fetch, responses to give at once, and possibly a fatal error, with every check Linux's
xen-netback (drivers/net/xen-netback/netback.c) makes of a frontend, in the same two
classes:

* **drop** (xenvif_tx_err: the frame's slots are answered NETIF_RSP_ERROR, the vif goes
  on): a first slot shorter than an Ethernet header ("Bad packet size"), a later slot
  larger than what remains of the frame's declared length, more than
  `max_slots` (XEN_NETIF_NR_SLOTS_MIN, 18) slots, a first slot whose length is not covered
  by the later slots' sizes;
* **fatal** (xenvif_fatal_tx_err: the vif is disabled, nothing more is read from it):
  a slot whose offset + size crosses its page ("Cross page boundary"), `fatal_slots` (20)
  slots or more, a frame whose more_data runs past the requests published ("Asked for %d
  slots but exceeds this limit"), a missing extra-info slot, an extra-info type that is
  not one of GSO / MCAST_ADD / MCAST_DEL / HASH, a GSO extra with size 0 or an unknown GSO
  type.

An impossible ring index is caught one level down (`pvio.ring.RingBroken`) and is
fatal too.  A grant the frontend did not grant is found by the copy (its GNTST status)
and drops only its frame.

`plan_rx` says how a frame is laid into the receive buffers the frontend posted, as
xen-netback's grant-copy receive path does since Linux 3.x: one page per slot from
offset 0, the GSO extra-info in the slot after the first, more_data on all but the last
data slot.

What this module does not do: move bytes (the engine copies), or decide when to notify.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat, starmap
from operator import itemgetter

from pvio.abi import netif as n
from pvio.abi.grant_table import GNTST_okay
from pvio.abi.ring import XEN_PAGE_SIZE

#: xen-netback's max_skb_slots default (XEN_NETBK_LEGACY_SLOTS_MAX): more is dropped
MAX_SLOTS = n.XEN_NETIF_NR_SLOTS_MIN
#: xen-netback's fatal_skb_slots default (FATAL_SKB_SLOTS_DEFAULT): this many is fatal
FATAL_SLOTS = 20

_TXREQ = n.TX_REQUEST.packer
_EXTRA = n.EXTRA_GSO.packer
_TXRSP = n.TX_RESPONSE.packer
_RXRSP = n.RX_RESPONSE.packer
_RX_MORE = n.NETRXF_more_data


#: A frame handed over in pieces (a slot's bytes each), valid only during the call that
#: receives it: the pieces may be live views of granted pages, reused once answered.
FrameParts = Sequence[bytes | memoryview]


class NetifFatal(Exception):
    """The frontend broke the protocol: its vif is disabled (xenvif_fatal_tx_err)."""

    def __init__(self, reason: str, field_name: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.field = field_name


#: One data slot of a frame: a netif_tx_request's fields as struct unpacks them,
#: (gref, offset, flags, id, size) -- the first slot's size being its own bytes, not the
#: frame's.  Plain tuples: made for every slot of every frame, straight from the unpack.
TxSlot = tuple[int, int, int, int, int]


@dataclass
class Gso:
    """A GSO extra-info: the segment size and XEN_NETIF_GSO_TYPE_*."""

    size: int
    type: int


@dataclass
class TxFrame:
    """A frame to fetch: its slots, its flags, its extras, and the ids to answer."""

    slots: list[TxSlot]
    flags: int
    gso: Gso | None = None
    mcast: list[tuple[int, bytes]] = field(default_factory=list)  # (ADD/DEL, address)
    #: ids of every slot, extras included, in ring order, each with the status it gets
    #: when the frame is fine (NETIF_RSP_OKAY for data, NETIF_RSP_NULL for extras)
    answers: list[tuple[int, int]] = field(default_factory=list)

    @property
    def length(self) -> int:
        return sum(s[4] for s in self.slots)

    @property
    def csum_blank(self) -> bool:
        return bool(self.flags & n.NETTXF_csum_blank)

    def responses(self, ok: bool) -> list[bytes]:
        if ok:
            return list(starmap(_TXRSP.pack, self.answers))
        return error_responses(self.answers)


def error_responses(answers: list[tuple[int, int]]) -> list[bytes]:
    """NETIF_RSP_ERROR for the data slots, NETIF_RSP_NULL still for the extras."""
    return [_TXRSP.pack(i, n.NETIF_RSP_ERROR if st != n.NETIF_RSP_NULL else st) for i, st in answers]


@dataclass
class TxRequests:
    """What `parse_tx` found: frames to fetch, responses due now, and a fatal error."""

    frames: list[TxFrame] = field(default_factory=list)
    #: responses for dropped frames (netif responses are matched by id, not by order)
    immediate: list[bytes] = field(default_factory=list)
    dropped: int = 0
    fatal: NetifFatal | None = None
    #: requests consumed (= responses owed) before the fatal error, if any
    consumed: int = 0


def _extras(raws: list[bytes], i: int, frame: TxFrame) -> int:
    """Read the extra-info chain starting at raws[i]; returns the index after it."""
    more = True
    while more:
        if i >= len(raws):
            raise NetifFatal("Missing extra info", "flags")
        etype, eflags, size, gso_type, _pad, _features = _EXTRA.unpack_from(raws[i])
        req_id = _TXREQ.unpack_from(raws[i])[3]  # the id lives where a request's does
        if not n.XEN_NETIF_EXTRA_TYPE_NONE < etype < n.XEN_NETIF_EXTRA_TYPE_MAX:
            raise NetifFatal(f"Invalid extra type: {etype}", "type")
        if etype == n.XEN_NETIF_EXTRA_TYPE_GSO:
            if size == 0:
                raise NetifFatal("GSO size must not be zero", "u.gso.size")
            if gso_type not in (n.XEN_NETIF_GSO_TYPE_TCPV4, n.XEN_NETIF_GSO_TYPE_TCPV6):
                raise NetifFatal(f"Bad GSO type {gso_type}", "u.gso.type")
            frame.gso = Gso(size, gso_type)
        elif etype in (n.XEN_NETIF_EXTRA_TYPE_MCAST_ADD, n.XEN_NETIF_EXTRA_TYPE_MCAST_DEL):
            frame.mcast.append((etype, n.EXTRA_MCAST.unpack(raws[i])["addr"]))
        frame.answers.append((req_id, n.NETIF_RSP_NULL))
        more = bool(eflags & n.XEN_NETIF_EXTRA_FLAG_MORE)
        i += 1
    return i


_MORE = n.NETTXF_more_data
_OKAY = n.NETIF_RSP_OKAY
_ID = itemgetter(3)


# T:1040 netback reads a frame off the transmit ring
# A frame starts with a slot whose `size` is the whole frame's length and whose flags say
# whether extra-info slots follow (GSO, multicast) and whether more data slots do.  netback
# walks the slots as xen-netback does, and sorts what is wrong into two kinds: a frame it
# can refuse (too short for an Ethernet header, too many slots, sizes that do not add up)
# is answered NETIF_RSP_ERROR and the vif carries on; a frontend that cannot be reasoned
# with (a slot crossing its page, an unknown extra, a frame running off the published
# requests) gets its vif disabled.  Nothing is fetched yet: a frame is a list of (grant,
# offset, size), and the copy that follows fetches every frame of the batch at once.
# The whole batch is unpacked by one call, and a frame's later slots are those tuples
# themselves: a 64 KiB frame is 17 slots, and Python's cost per slot is the budget.
# :T
def parse_tx(raws: list[bytes], *, max_slots: int = MAX_SLOTS, fatal_slots: int = FATAL_SLOTS) -> TxRequests:
    """Frames from a batch of transmit requests (see the module notes)."""
    out = TxRequests()
    reqs: list[TxSlot] = list(_TXREQ.iter_unpack(b"".join(raws)))
    i = 0
    total = len(reqs)
    try:
        while i < total:
            gref, offset, flags, req_id, size = reqs[i]
            frame = TxFrame([], flags)
            answers = frame.answers
            answers.append((req_id, _OKAY))
            i += 1
            if flags & n.NETTXF_extra_info:
                i = _extras(raws, i, frame)
            # xenvif_count_requests: the later slots, each taken from the first's length
            first_size = size
            drop = ""
            start = i
            more = flags & _MORE
            while more:
                count = i - start + 1  # the slots of the frame so far, with this one
                if count >= fatal_slots:
                    raise NetifFatal(f"Too many slots ({count}) exceeding limit ({fatal_slots})")
                if i >= total:
                    raise NetifFatal(f"Asked for {count + 1} slots but exceeds this limit", "flags")
                _g2, o2, more, _id2, s2 = reqs[i]
                more &= _MORE
                i += 1
                if drop:
                    pass
                elif count >= max_slots:
                    drop = f"Too many slots ({count}) exceeding limit ({max_slots})"
                elif s2 > first_size:
                    drop = f"Invalid tx request, slot size {s2} > remaining size {first_size}"
                first_size = first_size - s2 if s2 <= first_size else 0
                if o2 + s2 > XEN_PAGE_SIZE:
                    raise NetifFatal(f"Cross page boundary, txp offset: {o2}, size: {s2}", "offset")
            rest = reqs[start:i]
            answers.extend(zip(map(_ID, rest), repeat(_OKAY)))
            if not drop and first_size < n.ETH_HLEN and not (frame.mcast and size == 0):
                drop = f"Bad packet size: {first_size}"  # the first slot's own bytes
            if offset + first_size > XEN_PAGE_SIZE:
                raise NetifFatal(f"Cross page boundary, txp offset: {offset}, size: {first_size}", "offset")
            out.consumed = i
            if drop:
                out.dropped += 1
                out.immediate.extend(error_responses(answers))
                continue
            if frame.mcast and size == 0:  # a multicast control request: no data
                out.frames.append(frame)
                continue
            rest.insert(0, (gref, offset, flags, req_id, first_size))
            frame.slots = rest
            out.frames.append(frame)
    except NetifFatal as e:
        out.fatal = e
    return out


@dataclass
class RxFrame:
    """A frame waiting for the guest's receive buffers."""

    data: bytes | memoryview
    gso: Gso | None = None
    csum_blank: bool = False


def rx_slots_needed(length: int, gso: bool) -> int:
    """Receive buffers a frame needs (xenvif_rx_ring_slots_available): pages, plus one
    for the GSO extra-info."""
    return max(1, -(-length // XEN_PAGE_SIZE)) + (1 if gso else 0)


# T:1060 netback lays a frame into the guest's posted buffers
# Each receive request the frontend posted names one page of its memory.  netback cuts the
# frame into page-sized pieces, one per buffer from offset 0; each response carries the
# piece's length as its status and more_data on all but the last, and the first carries
# the checksum flags.  A GSO frame's segment size rides in an extra-info slot right after
# the first response, which takes a buffer of its own (the frontend simply posts that
# page again).  The bytes move by one grant copy per batch, from netback's own pages into
# the guest's, or by plain copies into the pages kept mapped; either way `rx_layout`
# says which grant each piece fills, and `rx_responses` answers every request taken,
# a failed piece failing its frame.
# :T
def rx_layout(frames: Sequence[RxFrame], reqs: Sequence[tuple[int, int, int]]) -> tuple[list[int], list[memoryview]]:
    """The grant each piece of `frames` fills and the piece itself, in step, from the
    receive requests taken for them ((id, pad, gref) each, rx_slots_needed of them a frame)."""
    grefs: list[int] = []
    pieces: list[memoryview] = []
    k = 0
    for f in frames:
        data = memoryview(f.data)
        start = 0
        if f.gso is not None:  # the first piece, then the extra-info's request
            grefs.append(reqs[k][2])
            pieces.append(data[:XEN_PAGE_SIZE])
            k += 2
            start = XEN_PAGE_SIZE
        for off in range(start, len(data) or 1, XEN_PAGE_SIZE):
            grefs.append(reqs[k][2])
            pieces.append(data[off : off + XEN_PAGE_SIZE])
            k += 1
    return grefs, pieces


def rx_responses(frames: Sequence[RxFrame], reqs: Sequence[tuple[int, int, int]],
                 statuses: Sequence[int]) -> tuple[list[bytes], list[bool]]:
    """The responses to every request `rx_layout` used, given each piece's GNTST status
    (NETIF_RSP_ERROR for a piece that failed), and whether each frame arrived whole."""
    responses: list[bytes] = []
    whole: list[bool] = []
    k = p = 0  # request index, piece index
    for f in frames:
        length = len(f.data)
        last = max(1, -(-length // XEN_PAGE_SIZE)) - 1
        flags = n.NETRXF_data_validated | (n.NETRXF_csum_blank if f.csum_blank else 0)
        if f.gso is not None:
            flags |= n.NETRXF_extra_info
        ok = True
        for j in range(last + 1):
            status = XEN_PAGE_SIZE if j < last else length - j * XEN_PAGE_SIZE
            if statuses[p] != GNTST_okay:
                ok = False
                status = n.NETIF_RSP_ERROR
            responses.append(_RXRSP.pack(reqs[k][0], 0, flags | _RX_MORE if j < last else flags, status))
            p += 1
            k += 1
            if j == 0:
                flags = 0
                if f.gso is not None:
                    responses.append(rx_gso_extra(f.gso))
                    k += 1
        whole.append(ok)
    return responses, whole


def rx_gso_extra(gso: Gso) -> bytes:
    """The GSO extra-info, as the 8 bytes of an rx response slot."""
    return n.EXTRA_GSO.pack(type=n.XEN_NETIF_EXTRA_TYPE_GSO, size=gso.size, gso_type=gso.type)


__all__ = [
    "FATAL_SLOTS",
    "MAX_SLOTS",
    "FrameParts",
    "Gso",
    "NetifFatal",
    "RxFrame",
    "TxFrame",
    "TxRequests",
    "TxSlot",
    "error_responses",
    "parse_tx",
    "rx_gso_extra",
    "rx_layout",
    "rx_responses",
    "rx_slots_needed",
]
