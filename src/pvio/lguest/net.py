"""lguest's network: the LAN page of MAC slots, routing, and the guest driver (lguest_net.c).

Theory of operation
-------------------
A LAN is one page of `struct lguest_net` slots (six-byte MACs) mapped into every guest
on it.  Each peer (a guest, or the host) owns one slot: it publishes its MAC there and
binds its eight receive buffers at key ``page + 4 * slot``.  There is no switch: a
sender reads the page, decides who wants the frame (`route`: the destination MAC, every
peer for broadcast and multicast, any peer whose published MAC has the multicast bit —
that bit means "promiscuous") and SEND_DMAs the frame to each of them in turn; the host
copies it straight into the receiver's buffers.  A peer whose buffers are all full
simply misses the frame: the sender sees a short used_len and counts a carrier error.

Slots are handed out by the page's owner (`LanPage.claim`), one at a time.  lguest's
Launchers shared a file and took a one-byte fcntl lock at offset = slot, so a crashed
Launcher's slot came free when the kernel dropped its lock.  In pvio the page has one
owner — the hypervisor, or the Launcher running the LAN — which serialises every claim
in its event loop (so a claim is atomic without a lock) and calls `release` when a
peer's connection closes, which is when lguest's kernel would have dropped the lock.
The guest learns its slot from the low bits of its descriptor's features, as in lguest.

Frame rules on the LAN are kept by the hypervisor, declared by the LAN's owner when it
creates the page (`lan_frame_rule`): a frame moves ETH_HLEN..ETH_HLEN + MTU bytes, and a
sender may not drop more than FLOOD_DROPS_PER_SECOND frames a second and more frames
than it delivers.  A guest that breaks them is refused, and its own Launcher marks its
device FAILED.  The MTU is lguest's ETH_DATA_LEN unless the LAN is configured larger
(pvio's addition, up to MAX_MTU = 65521, a TAP's largest: a frame of 16 pages still
moves by one SEND_DMA); every peer on a LAN has the same.

Sending is batched (pvio's addition): frames are queued and `stage` writes up to
TX_BATCH = NUM_SKBS of their SEND_DMAs into transmit buffers, for one hypervisor round
trip; a batch is never larger than a receiver's buffers.  A frame that finds its peer's
buffers all full is tried again in a later batch, TX_RETRIES times, before it counts as
a carrier error (lguest dropped it at once, which costs TCP a retransmission).

NOCSUM (LGUEST_NET_F_NOCSUM, set on every pvio LAN as lguest set it on its guest-only
--sharenet LANs) means frames between guests carry no finished checksums: memory copies
do not corrupt them.  The process adapter opens its TAP with a virtio_net_hdr and
checksum offload, so the guest's kernel leaves TCP and UDP checksums to finish, and
tells the receiving TAP where they are (`pvio.domains.tap.checksum_header`), which its
kernel takes as checked.

What this deliberately does not do: protect a slot from a hostile guest that writes
another peer's MAC (every guest maps the page writable, as in lguest), or queue frames:
delivery is a synchronous copy, so a flood costs the flooder and the flooded receiver's
buffers and nobody else's.  The guest's frames go to and from a TAP interface through
`pvio.domains.tap`.
"""

from __future__ import annotations

import errno
import struct
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from pvio.abi.fault import Fault
from pvio.abi.lguest import LGUEST_MAX_DMA_SECTIONS, LGUEST_NET, LGUEST_NET_F_NOCSUM
from pvio.lguest.allocator import Allocator
from pvio.lguest.bus import LguestDevice
from pvio.lguest.dma import DMA_SIZE, PAGE_SIZE, LguestError, build_dma, page_sections

ETH_ALEN = 6
ETH_HLEN = 14
ETH_DATA_LEN = 1500
#: The largest frame: a 14-byte header and 1500 bytes of payload.
ETH_FRAME_LEN = ETH_HLEN + ETH_DATA_LEN
#: The smallest MTU a LAN may have (IPv4's minimum datagram, RFC 791).
MIN_MTU = 68
#: The largest MTU a LAN may have (pvio's addition; lguest's LAN was ETH_DATA_LEN): a
#: TAP's largest (Linux's tun: 65535 − ETH_HLEN), whose frames fit one lguest_dma of
#: 16 page-sized sections.
MAX_MTU = 65535 - ETH_HLEN
assert MAX_MTU + ETH_HLEN <= LGUEST_MAX_DMA_SECTIONS * PAGE_SIZE
#: A sender whose frames find no free receive buffer more than this many times in one
#: second, and more often than they find one, is flooding the LAN: the hypervisor
#: refuses its frames and tells its Launcher, which marks its network device FAILED
#: (pvio's rule; lguest had none).  An honest TCP sender drops more than this to slow
#: receivers, but gets most frames through.
FLOOD_DROPS_PER_SECOND = 1000
#: Receive buffers per guest (lguest_net's NUM_SKBS).
NUM_SKBS = 8
#: SEND_DMAs in one batch (pvio's addition): no more than a receiver's buffers, so a
#: batch to one peer that has drained its buffers never misses.
TX_BATCH = NUM_SKBS
#: Times a frame is sent again to a peer that had no free buffer, in the batches that
#: follow, before it is dropped as lguest dropped it at once (pvio's addition: a burst
#: longer than the receiver's eight buffers would otherwise cost TCP a retransmission).
TX_RETRIES = 4
#: "We overload the multicast bit to show promiscuous mode."
PROMISC_BIT = 0x01
MAC_SIZE = LGUEST_NET.size
BROADCAST = b"\xff" * ETH_ALEN
_USED_LEN = struct.Struct("<I")
_ZERO_LEN = _USED_LEN.pack(0)


class FrameError(LguestError):
    """A frame too short for an Ethernet header or longer than the LAN's MTU allows."""


def check_mtu(mtu: int) -> int:
    """`mtu` if a LAN may have it (MIN_MTU..MAX_MTU), else LguestError."""
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not MIN_MTU <= mtu <= MAX_MTU:
        raise LguestError(f"MTU {mtu!r} not in {MIN_MTU}..{MAX_MTU}", fault=Fault.LOCAL, field="mtu")
    return mtu


def lan_frame_rule(mtu: int = ETH_DATA_LEN) -> tuple[int, int, int]:
    """(min_len, max_len, flood) of PVIO_LGUEST_region_frames for a LAN page."""
    return ETH_HLEN, ETH_HLEN + check_mtu(mtu), FLOOD_DROPS_PER_SECOND


def check_frame(frame: bytes | memoryview, max_len: int = ETH_FRAME_LEN) -> None:
    if len(frame) < ETH_HLEN:
        raise FrameError(f"runt frame of {len(frame)} bytes", field="len")
    if len(frame) > max_len:
        raise FrameError(f"{len(frame)}-byte frame > {max_len}", field="len")


def peer_key(peer_phys: int, slot: int) -> int:
    """A peer's receive key: the LAN page's address plus 4 × slot (keys are multiples
    of 4)."""
    return peer_phys + 4 * slot


def lan_slots(page: bytes) -> list[bytes]:
    """The published MACs of a LAN page (b"" for an unused slot: mac[0] == 0)."""
    out: list[bytes] = []
    for i in range(len(page) // MAC_SIZE):
        mac = page[i * MAC_SIZE : (i + 1) * MAC_SIZE]
        out.append(b"" if mac[0] == 0 else bytes(mac))
    return out


def is_multicast(mac: bytes | memoryview) -> bool:
    """By definition the broadcast address is also a multicast address."""
    return bool(mac[0] & 0x01)


def mac_eq(dest: bytes, published: bytes) -> bool:
    """The destination matches a published MAC, ignoring the peer's promiscuous bit."""
    return (published[0] & ~PROMISC_BIT & 0xFF) == dest[0] and dest[1:6] == published[1:6]


# T:880 The network: a page of MAC slots, and who gets each frame
# A LAN is a page of six-byte MAC slots shared by every peer on it.  A peer's slot is
# handed out by the page's owner, one claim at a time, and freed when the peer goes
# (lguest used a one-byte fcntl lock per slot for the same effect).  A peer publishes
# its MAC in its slot and binds eight 1514-byte receive buffers at page + 4 × slot.
# To send, a guest reads the page and picks the receivers: every used slot but its own
# when the destination is broadcast or multicast, every peer whose published MAC has the
# multicast bit set (lguest's way of saying "promiscuous"), and the peer whose MAC is the
# destination.  It SEND_DMAs the frame to each in turn.  A receiver with no free buffer
# misses the frame; the sender sees used_len short of the frame and counts a carrier
# error.  Frames shorter than an Ethernet header or longer than 1514 bytes are dropped
# and counted on both sides.
# :T
def route(dest: bytes, macs: Sequence[bytes], me: int) -> list[int]:
    """The slots a frame for `dest` goes to, from `me` (lguestnet_start_xmit)."""
    broadcast = is_multicast(dest)
    out: list[int] = []
    for i, mac in enumerate(macs):
        if i == me or not mac:
            continue
        if broadcast or mac[0] & PROMISC_BIT or mac_eq(dest, mac):
            out.append(i)
    return out


def route_page(dest: bytes | memoryview, page: bytes, me: int) -> list[int]:
    """`route` straight from a LAN page's bytes, looking only at slots up to the last one
    in use (slots are claimed lowest first, so that is usually a handful)."""
    firsts = page[0 : len(page) - len(page) % MAC_SIZE : MAC_SIZE]
    used = len(firsts.rstrip(b"\0"))
    broadcast = is_multicast(dest)
    out: list[int] = []
    for i in range(used):
        first = firsts[i]
        if first == 0 or i == me:
            continue
        mine = first == dest[0] and page[i * MAC_SIZE + 1 : (i + 1) * MAC_SIZE] == dest[1:6]
        if broadcast or first & PROMISC_BIT or mine:
            out.append(i)
    return out


class LanPage:
    """The owner's view of a LAN page: claims and releases slots, one at a time."""

    def __init__(self, page: bytearray | memoryview) -> None:
        if len(page) % PAGE_SIZE or not len(page):
            raise LguestError("a LAN is whole pages", fault=Fault.LOCAL, field="page")
        self.page = page
        self.slots = len(page) // MAC_SIZE
        self._claimed: set[int] = set()

    def claim(self) -> int:
        """The lowest free slot, reserved for one peer; ENOSPC when the LAN is full."""
        for slot in range(self.slots):
            if slot not in self._claimed:
                self._claimed.add(slot)
                self._clear(slot)
                return slot
        raise LguestError("no free slot on the LAN", fault=Fault.LOCAL, field="slot",
                          err=errno.ENOSPC)

    def release(self, slot: int) -> None:
        """The peer went away: its slot and published MAC go with it."""
        self._claimed.discard(slot)
        self._clear(slot)

    def claimed(self) -> set[int]:
        return set(self._claimed)

    def publish(self, slot: int, mac: bytes, *, promisc: bool = False) -> None:
        """Publish a MAC for `slot` (the host's own peer, or a test acting as a guest)."""
        first = (mac[0] | PROMISC_BIT) if promisc else (mac[0] & ~PROMISC_BIT & 0xFF)
        LGUEST_NET.pack_into(self.page, slot * MAC_SIZE, mac=bytes([first]) + mac[1:6])

    def macs(self) -> list[bytes]:
        return lan_slots(bytes(self.page))

    def _clear(self, slot: int) -> None:
        self.page[slot * MAC_SIZE : (slot + 1) * MAC_SIZE] = bytes(MAC_SIZE)


def lan_features(slot: int, *, nocsum: bool = True) -> int:
    """A network descriptor's features: the peer slot in the low bits (as lguest's
    Launcher did), and NOCSUM."""
    return slot | (LGUEST_NET_F_NOCSUM if nocsum else 0)


@dataclass
class NetStatistics:
    """The net_device statistics lguest_net kept, plus pvio's drop reasons."""

    rx_packets: int = 0
    rx_bytes: int = 0
    rx_errors: int = 0
    rx_length_errors: int = 0
    tx_packets: int = 0
    tx_bytes: int = 0
    tx_errors: int = 0
    tx_dropped: int = 0  # frames refused before sending (runt, oversized)
    tx_carrier_errors: int = 0  # a peer took less than the whole frame
    tx_retries: int = 0  # sends again to a peer whose buffers were all full


@dataclass
class _RxSlot:
    buf: int
    dma: int


@dataclass
class TxBatch:
    """SEND_DMAs staged by `NetDriver.stage`: (key, dma) per send, and each one's
    frame length, for `NetDriver.account` once the port has run them."""

    sends: list[tuple[int, int]] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    #: per send: the frame, its peer and how often it was tried (for `account`'s retry)
    frames: list[tuple[bytes | memoryview, int, int]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.sends)


@dataclass
class NetDriver:
    """The guest's lguest network device.

    `mtu` is the LAN's (every peer on a LAN has the same; its owner declares the frame
    rule to the hypervisor): ETH_DATA_LEN, lguest's, unless the LAN is configured for
    larger frames.  Receive and transmit buffers hold MTU + ETH_HLEN bytes."""

    device: LguestDevice
    alloc: Allocator
    mac: bytes = b""
    stats: NetStatistics = field(default_factory=NetStatistics)
    mtu: int = ETH_DATA_LEN

    def __post_init__(self) -> None:
        dev = self.device
        self.port = dev.port
        self.peer_phys = dev.phys_addr
        self.mapsize = dev.num_pages * PAGE_SIZE
        # "This stores our peerid (upper bits reserved for future)."
        self.me = dev.features & (self.mapsize - 1)
        if self.me >= self.mapsize // MAC_SIZE:
            raise LguestError(f"peer slot {self.me} beyond the LAN page", field="features")
        self.nocsum = bool(dev.features & LGUEST_NET_F_NOCSUM)
        if not self.mac:
            # lguest: 02:00:<guest id>:00:00, the locally-administered bit set.
            self.mac = bytes([0x02, 0x00, dev.index, self.me & 0xFF, 0x00, 0x00])
        if len(self.mac) != ETH_ALEN or self.mac[0] & 0x01 or self.mac[0] == 0:
            raise LguestError(f"bad MAC {self.mac.hex(':')}", fault=Fault.LOCAL, field="mac")
        self.frame_len = ETH_HLEN + check_mtu(self.mtu)
        self.rx_dmas = self.alloc.alloc(NUM_SKBS * DMA_SIZE, align=PAGE_SIZE)
        self.rx = [_RxSlot(self._alloc_frame(), self.rx_dmas + i * DMA_SIZE) for i in range(NUM_SKBS)]
        # A frame's worth of the driver's memory that no batch uses (the guest process's
        # rule-breaking test frames are staged there).
        self.tx_buf = self._alloc_frame()
        # `stage`'s buffers, one per SEND_DMA of a batch
        self._tx_slots = [(self._alloc_frame(), self.alloc.alloc_unsplit(DMA_SIZE)) for _ in range(TX_BATCH)]
        self.promisc = False
        self.is_open = False
        self._frames: list[bytes] = []
        self._tx_dmas: dict[tuple[int, int], bytes] = {}  # (buffer, length) -> lguest_dma
        # frames waiting for a batch, with the peers still to send each to (None: not
        # yet routed)
        self._tx_queue: deque[tuple[bytes | memoryview, list[int] | None, int]] = deque()

    @staticmethod
    def memory_pages(mtu: int = ETH_DATA_LEN) -> int:
        """An upper bound on the pages of its owner's memory the driver allocates: the
        NUM_SKBS receive buffers and their DMA array, the single transmit buffer and the
        TX_BATCH batch buffers with their DMA structs (what `__post_init__` takes)."""
        frame_pages = -(-(ETH_HLEN + check_mtu(mtu)) // PAGE_SIZE) + 1  # + 1: alignment
        return (NUM_SKBS + 1 + TX_BATCH) * (frame_pages + 1) + 1

    def _alloc_frame(self) -> int:
        # A frame buffer larger than a page starts on one, so that its sections (one per
        # page it touches) never number more than 16.
        return self.alloc.alloc(self.frame_len, align=PAGE_SIZE if self.frame_len > PAGE_SIZE else 8)

    def _dma_for(self, buf: int, length: int) -> bytes:
        """The lguest_dma of `length` bytes at `buf`, built once per (buffer, length)."""
        dma = self._tx_dmas.get((buf, length))
        if dma is None:
            if len(self._tx_dmas) > 4096:
                self._tx_dmas.clear()
            dma = self._tx_dmas[(buf, length)] = build_dma(page_sections(buf, length))
        return dma

    @property
    def my_key(self) -> int:
        return peer_key(self.peer_phys, self.me)

    def _slot_addr(self, slot: int) -> int:
        return self.peer_phys + slot * MAC_SIZE

    def _publish(self) -> None:
        first = self.mac[0] | PROMISC_BIT if self.promisc else self.mac[0]
        self.port.write(self._slot_addr(self.me), bytes([first]) + self.mac[1:])

    def open(self, *, promisc: bool = False) -> None:
        """lguestnet_open: publish our MAC, fill eight buffers, bind them at our key."""
        self.promisc = promisc
        self._publish()
        for slot in self.rx:
            self._fill(slot)
        self.port.bind_dma(self.my_key, self.rx_dmas, NUM_SKBS, self.device.irq)
        self.is_open = True

    def set_promisc(self, on: bool) -> None:
        """lguestnet_set_multicast: the multicast bit of our published MAC."""
        self.promisc = on
        if self.is_open:
            self._publish()

    def close(self) -> None:
        """lguestnet_close: clear our slot, unbind our buffers."""
        self.port.write(self._slot_addr(self.me), bytes(MAC_SIZE))
        self.port.unbind_dma(self.my_key, self.rx_dmas)
        self.is_open = False

    def remove(self) -> None:
        if self.is_open:
            self.close()

    def _fill(self, slot: _RxSlot) -> None:
        # The sections first, used_len 0 last: the host must never see a free buffer
        # whose sections are not yet written (lguest's wmb()).
        self.port.write(slot.dma, build_dma(page_sections(slot.buf, self.frame_len)))

    def _check(self, frame: bytes | memoryview) -> bool:
        try:
            check_frame(frame, self.frame_len)
        except FrameError:
            self.stats.tx_dropped += 1
            self.stats.tx_errors += 1
            return False
        return True

    # T:885 Sending many frames: staged in memory, one round trip
    # lguest's driver made one SEND_DMA per frame and waited for it.  pvio's adds a
    # batch: frames are queued, and `stage` writes up to TX_BATCH of their sends, each
    # into a transmit buffer of its own with its lguest_dma beside it, and returns the
    # (key, dma) pairs; the port runs them all in one hypervisor round trip (each
    # SEND_DMA still copies and answers on its own); `account` counts what each one
    # moved.  Staging touches only guest memory, so the process adapter runs it on its
    # event loop and awaits the batch there, with no thread in the frame's path.
    # :T
    def queue(self, frames: Sequence[bytes | memoryview]) -> None:
        """Frames to send with the next batches (`stage`)."""
        for frame in frames:
            if self._check(frame):
                self._tx_queue.append((frame, None, 0))

    def queued(self) -> int:
        return len(self._tx_queue)

    def drop_queue(self) -> None:
        """Forget the queued frames (the device has FAILED)."""
        self.stats.tx_dropped += len(self._tx_queue)
        self._tx_queue.clear()

    def stage(self) -> TxBatch:
        """Stage the next SEND_DMAs of queued frames, at most TX_BATCH (a broadcast to
        more peers than that continues in the next batch); empty when none is queued."""
        batch = TxBatch()
        if not self._tx_queue:
            return batch
        page = self.port.read(self.peer_phys, self.mapsize)  # copied once per batch
        queue = self._tx_queue
        while queue and len(batch.sends) < TX_BATCH:
            frame, targets, tries = queue[0]
            if targets is None:
                targets = route_page(frame[:ETH_ALEN], page, self.me)
            room = TX_BATCH - len(batch.sends)
            for peer in targets[:room]:
                buf, dma = self._tx_slots[len(batch.sends)]
                self.port.write(buf, frame)
                self.port.write(dma, self._dma_for(buf, len(frame)))
                batch.sends.append((peer_key(self.peer_phys, peer), dma))
                batch.lengths.append(len(frame))
                batch.frames.append((frame, peer, tries))
            if len(targets) > room:
                queue[0] = (frame, targets[room:], tries)
            else:
                queue.popleft()
        return batch

    def account(self, batch: TxBatch, results: Sequence[int]) -> None:
        """Count what the port reported for each SEND_DMA of `batch` (bytes, or -errno).
        A frame that found no free buffer (used_len 0) goes back to the head of the
        queue, in order, for that peer alone, until it was tried TX_RETRIES times."""
        again: list[tuple[bytes | memoryview, list[int] | None, int]] = []
        for used, n, (frame, peer, tries) in zip(results, batch.lengths, batch.frames, strict=True):
            if used < 0:
                self.stats.tx_errors += 1  # refused by the host
            elif used == 0 and tries < TX_RETRIES:
                self.stats.tx_retries += 1
                again.append((frame, [peer], tries + 1))
            elif used != n:
                self.stats.tx_carrier_errors += 1
            else:
                self.stats.tx_packets += 1
                self.stats.tx_bytes += n
        self._tx_queue.extendleft(reversed(again))

    def interrupt(self) -> None:
        """lguestnet_rcv: take every filled buffer, refill it, check the length."""
        dmas = self.port.read(self.rx_dmas, NUM_SKBS * DMA_SIZE)  # every used_len at once
        for i, slot in enumerate(self.rx):
            length = _USED_LEN.unpack_from(dmas, i * DMA_SIZE)[0]
            if length == 0:
                continue
            frame = self.port.read(slot.buf, min(length, self.frame_len))
            # Our sections never change; giving the buffer back is used_len = 0.
            self.port.write(slot.dma, _ZERO_LEN)
            if length < ETH_HLEN or length > self.frame_len:
                self.stats.rx_errors += 1
                self.stats.rx_length_errors += 1
                continue
            self.stats.rx_packets += 1
            self.stats.rx_bytes += length
            self._frames.append(frame)

    def take_frames(self) -> list[bytes]:
        frames, self._frames = self._frames, []
        return frames
