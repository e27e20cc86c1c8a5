"""lguest's DMA (Linux 2.6.23 drivers/lguest/io.c), done by pvio's hypervisor.

Theory of operation
-------------------
A domain's lguest physical address space is its memory, [0, nr_pages * 4096), plus any
shared regions it attached above that (lguest's --sharenet file, mapped by several
Launchers).  A *key* is an address in that space, a multiple of 4, and is resolved to
(memory object, offset): for private memory the object is the domain itself, for a
region it is the region, so the same key seen through two domains' attachments of one
region is the same key — lguest's Futex Trick, which lets guests on a shared page reach
each other.

BIND_DMA(key, dmas, count, irq) offers `count` lguest_dma buffers at `dmas`; irq 0
unbinds (key, dmas).  SEND_DMA(key, dma) copies the sender's buffer into the first free
(used_len == 0) buffer bound by *another* domain on the same key, writes the receiver's
used_len, raises the receiver's irq, and writes the sender's used_len (the bytes copied;
0 when nobody had a free buffer).

Every lguest_dma is copied out of guest memory once and checked like lguest's
check_dma_list: at most 16 sections, a zero length ends the list, every section inside
the domain's address space and inside one page.  The rules and limits are declared
once, in `pvio.hypervisor.lguest_rules` (parse_dma, check_key, check_bind) and
`pvio.abi.lguest` (LGUEST_MAX_DMA bindings, the violation interrupts), and used here.
Where lguest killed the guest, pvio answers -EINVAL (the sender's
fault) or skips the receiver's bad buffer and counts it, so one bad domain never stops
the others; and it raises a violation interrupt (VIOLATION_IRQ_BASE + irq) in every
other domain bound at the offending key, so a Launcher can mark that device FAILED.

A guest's network device is a page shared with the other guests on its LAN, where its
own Launcher binds nothing, so the rule above would tell only the victims.  The
offender's *supervisor* is told as well: the domain that created a region permitted to
the offender alone (its Launcher, which owns its descriptor page).  When the supervisor
was not already told by the binding rule, it gets GUEST_VIOLATION_IRQ (the violation
notice of irq 0, which nobody can bind), meaning "your guest broke the rules at a key in
a region you are not bound at"; a Launcher marks the network device FAILED on it.  The
supervisor is told once per (offender, region), not once per refused frame of a flood.

Frames (a LAN): the creator of a region may declare that its keys carry frames
(PVIO_LGUEST_region_frames: min_len, max_len, flood).  A SEND_DMA at a key there that
moves fewer than min_len or more than max_len bytes (a runt, an oversized frame) is
refused -EINVAL like any broken rule, so the frame reaches nobody.  A send that finds no
free buffer is a drop, as a full receive ring drops; a sender is flooding when, in one
second (a window per sender, starting at its first send), it has dropped more than
`flood` frames *and* more frames than it delivered: the drop that crosses both, and
every drop after it in that window, is refused -ENOBUFS and is a violation.  The second
condition spares an honest TCP sender, which loses frames to a slow receiver but,
backing off, gets most of them through (a 2-second iperf3 between two guests on this
machine drops more than 1000 a second); a flooder sends far faster than anyone drains.
The numbers are the Launcher's (pvio.lguest.net: ETH_HLEN, ETH_FRAME_LEN,
FLOOD_DROPS_PER_SECOND); the hypervisor holds no Ethernet knowledge.

Rejected: receivers reporting the sender (a receiver cannot tell who sent a frame:
the source MAC is the sender's to forge), and a LAN-wide Launcher (one more process on
every frame's path).

Not here: delivery of private keys to a Launcher process (lguest's /dev/lguest read
path).  In pvio the Launcher is a domain, and a device page is a region shared by the
guest and the Launcher domain, so its keys reach the Launcher by the rule above.
Nor fencing: a guest whose network device was FAILED and that ignores it may still send
frames that keep the rules (each break is refused as before).
"""

from __future__ import annotations

import errno
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from pvio.abi.lguest import GUEST_VIOLATION_IRQ, LGUEST_DMA, LGUEST_MAX_DMA, VIOLATION_IRQ_BASE
from pvio.hypervisor.domain import PAGE_SIZE, DmaBinding, DomainRecord, Region
from pvio.hypervisor.errors import HypercallError
from pvio.hypervisor.lguest_rules import check_bind, check_key, parse_dma

_U32 = struct.Struct("<I")
DMA_STRUCT_SIZE = LGUEST_DMA.size
#: Validated section lists kept per domain (see `LguestDma._sections`).
SECTIONS_CACHE = 256
Section = tuple[memoryview, int, int]  # (memory, offset, length)


@dataclass
class IrqPush:
    domid: int
    irq: int


@dataclass
class LguestDma:
    regions: dict[int, Region] = field(default_factory=dict)
    pushes: list[IrqPush] = field(default_factory=list)
    bad_buffers: int = 0
    violations: int = 0
    lookup: Callable[[int], DomainRecord | None] | None = None
    clock: Callable[[], float] = time.monotonic
    floods: int = 0  # sends refused because their sender was flooding
    #: sender domid -> (start of its window, drops, deliveries in it)
    _drops: dict[int, tuple[float, int, int]] = field(default_factory=dict)
    #: (offender domid, region id) whose supervisor was told already
    _reported: set[tuple[int, int]] = field(default_factory=set)

    def forget(self, domid: int) -> None:
        """Domain `domid` is gone: drop its flood window and reports."""
        self._drops.pop(domid, None)
        self._reported = {r for r in self._reported if r[0] != domid}

    # -- the address space ----------------------------------------------------------

    @staticmethod
    def resolve(d: DomainRecord, addr: int, length: int) -> tuple[object, memoryview, int]:
        """(key object, memory, offset) of [addr, addr+length) in `d`'s space, or raise."""
        if length < 0 or addr < 0:
            raise HypercallError(-errno.EINVAL, "negative address", "addr")
        if addr + length <= d.nr_pages * PAGE_SIZE:
            return d, d.memory, addr
        for r in d.regions.values():
            base = r.attached[d.domid]
            if base <= addr and addr + length <= base + r.nr_pages * PAGE_SIZE:
                return r, r.view, addr - base
        raise HypercallError(-errno.EINVAL, f"address {addr:#x}+{length} outside d{d.domid}", "addr")

    def _key(self, d: DomainRecord, key: int) -> tuple[object, int]:
        check_key(key)
        obj, _, off = self.resolve(d, key, 4)
        return obj, off

    def _sections(self, d: DomainRecord, raw: memoryview | bytes) -> list[Section]:
        # The shared rules (at most 16 sections, a zero length ends the list, none
        # crossing a page, none past 4 GiB); then each section is resolved in `d`'s space
        # and sections that continue each other in one memory are joined (one copy for a
        # frame in consecutive pages).  The result depends only on the struct's bytes
        # after used_len and on `d`'s regions, so it is kept per domain, keyed by those
        # bytes, until d's regions change: a driver that sends from or receives into the
        # same buffers is checked once, and a struct rewritten differently is new bytes.
        key = bytes(raw[4:DMA_STRUCT_SIZE])
        cached = d.dma_sections.get(key)
        if cached is not None:
            return cached
        buf = parse_dma(raw, memory_size=1 << 32)
        out: list[Section] = []
        for s in buf.sections:
            _, mem, off = self.resolve(d, s.addr, s.length)
            if out and out[-1][0] is mem and out[-1][1] + out[-1][2] == off:
                out[-1] = (mem, out[-1][1], out[-1][2] + s.length)
            else:
                out.append((mem, off, s.length))
        if len(d.dma_sections) >= SECTIONS_CACHE:
            d.dma_sections.clear()
        d.dma_sections[key] = out
        return out

    def _read_dma(self, d: DomainRecord, addr: int) -> bytes:
        _, mem, off = self.resolve(d, addr, LGUEST_DMA.size)
        return bytes(mem[off : off + LGUEST_DMA.size])

    @staticmethod
    def supervisor(d: DomainRecord) -> int | None:
        """The domain that created a region permitted to `d` alone (its Launcher), if any."""
        for r in d.regions.values():
            if r.permitted == {d.domid} and r.creator not in (-1, d.domid):
                return r.creator
        return None

    def violation(self, d: DomainRecord, key: int, bindings: list[DmaBinding]) -> None:
        """`d` broke a rule on `key`: count it, tell the other domains bound there, and
        tell `d`'s supervisor (GUEST_VIOLATION_IRQ) when it was not among them."""
        self.violations += 1
        told: set[tuple[int, int]] = set()
        try:
            obj, _, off = self.resolve(d, key & ~3, 4)
        except HypercallError:
            obj = None
        if obj is not None:
            kobj = (obj, off)
            for b in bindings:
                if b.key != kobj or b.domain is d or b.domain.dying or (b.domain.domid, b.irq) in told:
                    continue
                told.add((b.domain.domid, b.irq))
                self.pushes.append(IrqPush(b.domain.domid, VIOLATION_IRQ_BASE + b.irq))
        if not isinstance(obj, Region):
            return  # a key in the offender's own memory (or nowhere) concerns only it
        sup = self.supervisor(d)
        if sup is None or any(domid == sup for domid, _ in told) or (d.domid, obj.region_id) in self._reported:
            return
        self._reported.add((d.domid, obj.region_id))
        self.pushes.append(IrqPush(sup, GUEST_VIOLATION_IRQ))

    # T:380 lguest: BIND_DMA and SEND_DMA
    # lguest has no rings: a receiver binds an array of lguest_dma buffers to a key and
    # an irq; a sender names the key and one buffer.  The hypervisor copies the sender's
    # buffer out of its memory once, checks every section (at most 16, zero length ends
    # the list, inside memory, inside one page), finds a buffer with used_len 0 bound by
    # another domain to the same key, copies section by section, writes both used_lens
    # and raises the receiver's irq.  A key in a region two domains share is the same key
    # for both: that is how guests on lguest's LAN reach each other.  On a region that
    # carries frames (a LAN) a send must also move a frame of the declared length and
    # not be one drop too many of a flood; a broken rule there is reported to the
    # sender's supervisor, its Launcher, which fails its network device.
    # :T
    def bind_dma(self, d: DomainRecord, key: int, dmas: int, count: int, irq: int) -> None:
        kobj = self._key(d, key)
        if irq == 0:
            d.dma = [b for b in d.dma if not (b.key == kobj and b.dmas == dmas)]
            return
        check_bind(count, irq)
        self.resolve(d, dmas, count * LGUEST_DMA.size)
        if len(d.dma) >= LGUEST_MAX_DMA:
            raise HypercallError(-errno.ENOSPC, "too many DMA bindings", "dmas")
        d.dma.append(DmaBinding(d, kobj, key, dmas, count, irq))

    def send_dma(self, d: DomainRecord, key: int, dma_addr: int, bindings: list[DmaBinding]) -> int:
        kobj = self._key(d, key)
        raw = self._read_dma(d, dma_addr)
        src = self._sections(d, raw)
        rule = kobj[0].frames if isinstance(kobj[0], Region) else None
        if rule is not None:
            length = sum(n for _, _, n in src)
            if not rule.min_len <= length <= rule.max_len:
                raise HypercallError(-errno.EINVAL, f"{length}-byte frame not in {rule.min_len}..{rule.max_len}",
                                     "len")
        copied = 0
        delivered = False
        for b in bindings:
            if b.key != kobj or b.domain is d or b.domain.dying:
                continue
            n = self._deliver(b, src)
            if n is not None:
                copied, delivered = n, True
                break
        if rule is not None and rule.flood:
            self._count(d, rule.flood, delivered)
        _, mem, off = self.resolve(d, dma_addr, 4)
        _U32.pack_into(mem, off, copied)
        return copied

    def _count(self, d: DomainRecord, limit: int, delivered: bool) -> None:
        """Count `d`'s frame in its one-second window; refuse the drop of a flooder."""
        now = self.clock()
        start, drops, good = self._drops.get(d.domid, (now, 0, 0))
        if now - start >= 1.0:
            start, drops, good = now, 0, 0
        if delivered:
            good += 1
        else:
            drops += 1
        self._drops[d.domid] = (start, drops, good)
        if not delivered and drops > limit and drops > good:
            self.floods += 1
            raise HypercallError(-errno.ENOBUFS, f"d{d.domid} dropped {drops} frames in a second", "flood")

    # T:840 SEND_DMA: the host's copy
    # The host is pvio's hypervisor (this code, whether the daemon runs it or a test runs
    # its core in one process).  A SEND_DMA names a key and one buffer.  The key is
    # resolved in the sender's address space: a key in its own RAM reaches nobody (its
    # Launcher is another domain); a key in a region it attached (a device page, a LAN
    # page) is (region, offset), one key for every domain attached there, lguest's futex
    # trick.  The sender's buffer is copied out and checked once (T:830), its sections
    # resolved and joined where they continue each other; on a LAN page the frame must
    # also have the length the LAN's owner declared.  Then the first other domain bound
    # at the key with a free buffer (used_len 0, read first; then the struct copied and
    # checked like the sender's) gets the bytes section by section: its used_len is
    # set and its irq raised.  The sender's used_len becomes the bytes copied, or 0 if
    # nobody had a free buffer: a drop, which counts toward a flood.  A receiver's broken
    # buffer is the receiver's fault, skipped and counted; a rule the sender broke
    # refuses the hypercall with -errno and tells the domains bound at the key (T:380).
    # :T
    def _deliver(self, b: DmaBinding, src: list[Section]) -> int | None:
        dst_dom = b.domain
        try:  # the bound array, resolved as BIND_DMA checked it
            _, mem, base = self.resolve(dst_dom, b.dmas, b.count * DMA_STRUCT_SIZE)
        except HypercallError:
            self.bad_buffers += 1
            return None
        for i in range(b.count):
            off = base + i * DMA_STRUCT_SIZE
            if _U32.unpack_from(mem, off)[0] != 0:
                continue  # in use: only used_len is read
            raw = bytes(mem[off : off + DMA_STRUCT_SIZE])  # copied once, then checked
            if _U32.unpack_from(raw)[0] != 0:
                continue
            try:
                dst = self._sections(dst_dom, raw)
            except HypercallError:
                self.bad_buffers += 1
                continue
            n = _copy_sections(src, dst)
            _U32.pack_into(mem, off, n)
            self.pushes.append(IrqPush(dst_dom.domid, b.irq))
            return n
        return None


def _copy_sections(src: list[Section], dst: list[Section]) -> int:
    total = 0
    si = di = 0
    s_done = d_done = 0
    while si < len(src) and di < len(dst):
        smem, soff, slen = src[si]
        dmem, doff, dlen = dst[di]
        n = min(slen - s_done, dlen - d_done)
        dmem[doff + d_done : doff + d_done + n] = smem[soff + s_done : soff + s_done + n]
        total += n
        s_done += n
        d_done += n
        if s_done == slen:
            si, s_done = si + 1, 0
        if d_done == dlen:
            di, d_done = di + 1, 0
    return total
