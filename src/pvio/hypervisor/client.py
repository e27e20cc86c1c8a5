"""The client library a domain uses: memory, grants, mappings, copies, events, lguest.

Theory of operation
-------------------
`Domain` is what a frontend or backend holds.  It is the same class whatever carries its
hypercalls: a `Channel` is either the asyncio adapter over the hypercall socket
(`pvio.hypervisor.aio`) or the in-process one (`pvio.hypervisor.inprocess`) that calls a
`Hypervisor` core in the same process; one conformance suite
(`pvio.testing.hypervisor`) runs against both.

`Domain` is a façade: each of its jobs is a part in a module of its own, and `Domain`
only passes calls on and routes the hypervisor's pushes to the part they concern.

    part             module            job
    Hypercalls       client_channel    the counted round trip every part calls through
    MemoryClient     client_memory     own frames, shareable pages, granting them
    MappingClient    client_mapping    mapping and copying others' grants (two transports)
    EventClient      client_events     event-channel ports: bind, notify, wait, mask
    LguestClient     client_lguest     lguest regions, BIND_DMA/SEND_DMA, interrupts
    EventPorts,      client_core       the sans-IO bits: port mask/pending table, and
    HypercallProtocol                     the frame sequencing the adapters use

Everything that can be batched is: `map_grants` of N references is one
GNTTABOP_map_grant_ref op with N structs (one round trip, whatever N), `unmap_grants`
and `copy` likewise.  Everything that needs no hypervisor is local: allocating the
domain's own pages, granting and ending access (the table is shared memory), and
notifying a bound event channel (one eventfd write).

The data transport, *map* or *copy*, is chosen when the domain is created
(`create_domain`); `pvio.hypervisor.client_mapping` states both and their threat model.
In short: *map* hands a trusted backend the granter's memory fd (live views, the fast
path); *copy* never does (every byte moves by GNTTABOP_copy, views are bounce copies).
Shared rings live in shareable pages, which both map live.

Deliberately not here: any protocol.  Rings, XenStore, blkif and lguest devices are
built on this API by the packages above `hypervisor`.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable, Sequence

from pvio.abi.grant_table import DOMID_SELF
from pvio.hypervisor import wire
from pvio.hypervisor.client_channel import Channel, Hypercalls, check
from pvio.hypervisor.client_core import EventPorts
from pvio.hypervisor.client_events import PORT_PUSHES, EventClient
from pvio.hypervisor.client_lguest import LguestClient, LguestRegion
from pvio.hypervisor.client_mapping import (
    CopySeg,
    GrantMapping,
    MappingClient,
    pack_from_grant,
    pack_to_grant,
)
from pvio.hypervisor.client_memory import MemoryClient, PageAllocator
from pvio.hypervisor.granting import GrantRefs, NoSpace
from pvio.hypervisor.wire import Op

__all__ = [
    "Channel",
    "CopySeg",
    "Domain",
    "GrantMapping",
    "LguestRegion",
    "NoSpace",
    "create_domain",
    "pack_from_grant",
    "pack_to_grant",
]


class Domain:
    """A pvio domain's handle on the hypervisor (see the module notes)."""

    def __init__(
        self,
        channel: Channel,
        domid: int,
        name: str,
        nr_pages: int,
        transport: str,
        mem_fd: int,
        gnttab_fd: int,
        max_grant_frames: int,
    ) -> None:
        self.channel = channel
        self.domid = domid
        self.name = name
        self.nr_pages = nr_pages
        self.transport = transport
        self._calls = Hypercalls(channel)
        self._memory = MemoryClient(self._calls, nr_pages, mem_fd, gnttab_fd, max_grant_frames)
        self._mapping = MappingClient(self._calls, self._memory, transport)
        self._events = EventClient(self._calls, domid)
        self._lguest = LguestClient(self._calls, self._memory, domid)
        #: Domains the hypervisor told us are dead (domain 0 hears of all).
        self.dead_domains: set[int] = set()
        #: Called with a domid when that domain is torn down (domain 0 hears of all).
        self.on_domain_dead: Callable[[int], None] | None = None
        self.closed = False
        channel.start(self._on_push)

    # -- what the parts hold ---------------------------------------------------------------

    @property
    def memory(self) -> memoryview:
        """This domain's memory, all `nr_pages` pages of it."""
        return self._memory.memory

    @property
    def memory_fd(self) -> int:
        """This domain's memory memfd."""
        return self._memory.mem_fd

    @property
    def pages(self) -> PageAllocator:
        """The free list of this domain's frames."""
        return self._memory.pages

    @property
    def gnttab(self) -> GrantRefs:
        """This domain's grant table (references, entries, the deferred list)."""
        return self._memory.gnttab

    @property
    def gnttab_fd(self) -> int:
        """The grant table's memfd (for a C granter sharing this domain's table)."""
        return self._memory.gnttab_fd

    @property
    def ports(self) -> EventPorts:
        """This domain's event-channel ports and their mask and pending bits."""
        return self._events.ports

    @property
    def regions(self) -> dict[int, LguestRegion]:
        """The lguest regions this domain created or attached, by region id."""
        return self._lguest.regions

    @property
    def round_trips(self) -> int:
        """Hypercall round trips made (one per batch)."""
        return self._calls.round_trips

    # -- raw hypercalls --------------------------------------------------------------------

    async def hypercall(self, ops: list[Op]) -> list[Op]:
        """Send a raw batch (a multicall); one reply op per op."""
        return await self._calls.batch(ops)

    # -- own memory and granting it (client_memory) ----------------------------------------

    def frame(self, frame: int) -> memoryview:
        """The page of one of our frames (memory or shareable)."""
        return self._memory.frame(frame)

    def alloc_pages(self, n: int) -> list[int]:
        """N free frames of our memory (NoSpace if there are fewer)."""
        return self._memory.pages.alloc(n)

    def free_pages(self, frames: Sequence[int]) -> None:
        """Give frames back to the free list."""
        self._memory.pages.free(frames)

    async def alloc_shareable_pages(self, n: int) -> list[int]:
        """N pages another domain can map without reaching the rest of our memory."""
        return await self._memory.alloc_shareable_pages(n)

    async def grow_grant_table(self, count: int) -> None:
        """Make sure `count` references can be allocated (GNTTABOP_setup_table if needed)."""
        await self._memory.grow_grant_table(count)

    async def grant_access(self, domid: int, frames: Sequence[int], readonly: bool = False) -> list[int]:
        """Grant `domid` access to our `frames`; returns the references."""
        return await self._memory.grant_access(domid, frames, readonly)

    def end_access(self, refs: Sequence[int], on_freed: Callable[[int], None] | None = None) -> list[bool]:
        """End access to each ref; False where it is still mapped (freed when unmapped,
        then `on_freed(ref)` runs)."""
        return self._memory.end_access(refs, on_freed)

    async def query_size(self, dom: int = DOMID_SELF) -> dict[str, int]:
        """GNTTABOP_query_size."""
        return await self._memory.query_size(dom)

    # -- others' grants (client_mapping) ---------------------------------------------------

    async def map_grants(
        self, domid: int, refs: Sequence[int], readonly: bool | Sequence[bool] = False, *, strict: bool = True
    ) -> list[GrantMapping]:
        """Map N grant references of `domid` in one round trip (see `MappingClient`)."""
        return await self._mapping.map_grants(domid, refs, readonly, strict=strict)

    async def unmap_grants(self, mappings: Sequence[GrantMapping]) -> list[int]:
        """Unmap in one round trip; the views are released.  Returns GNTST statuses."""
        return await self._mapping.unmap_grants(mappings)

    async def copy(self, segs: Sequence[CopySeg]) -> list[int]:
        """GNTTABOP_copy, batched: one round trip; returns a GNTST status per segment."""
        return await self._mapping.copy(segs)

    async def copy_packed(self, args: bytes) -> list[int]:
        """`copy` of gnttab_copy structs already packed (`pack_from_grant`, `pack_to_grant`)."""
        return await self._mapping.copy_packed(args)

    # -- event channels (client_events) ----------------------------------------------------

    async def alloc_unbound(self, remote_dom: int) -> int:
        return await self._events.alloc_unbound(remote_dom)

    async def bind_interdomain(self, remote_dom: int, remote_port: int) -> int:
        return await self._events.bind_interdomain(remote_dom, remote_port)

    def notify(self, port: int) -> None:
        """Notify the peer of `port` (one eventfd write)."""
        self._events.notify(port)

    async def send_via_hypervisor(self, port: int) -> None:
        await self._events.send_via_hypervisor(port)

    def set_handler(self, port: int, handler: Callable[[int], None] | None) -> None:
        self._events.set_handler(port, handler)

    async def wait_event(self, port: int) -> None:
        """Wait for an event on `port`; returns at once if one came since the last wait."""
        await self._events.wait_event(port)

    def mask(self, port: int) -> None:
        self._events.mask(port)

    def unmask(self, port: int) -> None:
        self._events.unmask(port)

    async def close_port(self, port: int) -> None:
        await self._events.close_port(port)

    async def evtchn_status(self, port: int, dom: int = DOMID_SELF) -> dict[str, int]:
        return await self._events.evtchn_status(port, dom)

    # -- lguest (client_lguest) ------------------------------------------------------------

    async def lguest_region(self, nr_pages: int, base: int, region_id: int = 0) -> LguestRegion:
        """Create (region_id 0) or attach a region shared with other domains at `base`."""
        return await self._lguest.lguest_region(nr_pages, base, region_id)

    async def lguest_region_permit(self, region_id: int, peer: int) -> None:
        """Let domain `peer` attach a region this domain created."""
        await self._lguest.lguest_region_permit(region_id, peer)

    async def lguest_region_frames(self, region_id: int, min_len: int, max_len: int, flood: int) -> None:
        """Declare the frame sizes and flood limit of a region this domain created."""
        await self._lguest.lguest_region_frames(region_id, min_len, max_len, flood)

    def phys(self, addr: int, length: int) -> memoryview:
        """A view of [addr, addr+length) of this domain's lguest physical space."""
        return self._lguest.phys(addr, length)

    async def bind_dma(self, key: int, dmas: int, count: int, irq: int) -> None:
        await self._lguest.bind_dma(key, dmas, count, irq)

    async def unbind_dma(self, key: int, dmas: int) -> None:
        await self._lguest.unbind_dma(key, dmas)

    async def send_dma(self, key: int, dma: int) -> int:
        """SEND_DMA; returns the bytes copied (also written into the dma's used_len)."""
        return await self._lguest.send_dma(key, dma)

    async def send_dma_many(self, sends: Sequence[tuple[int, int]]) -> list[int]:
        """Several SEND_DMA(key, dma) in one round trip: bytes copied or -errno each."""
        return await self._lguest.send_dma_many(sends)

    def set_irq_handler(self, handler: Callable[[int], None] | None) -> None:
        self._lguest.set_irq_handler(handler)

    async def wait_irq(self) -> int:
        """Wait for the next lguest interrupt; returns its number."""
        return await self._lguest.wait_irq()

    # -- pushes from the hypervisor --------------------------------------------------------

    def _on_push(self, op: Op) -> None:
        if op.cmd in PORT_PUSHES:
            self._events.on_push(op)
        elif op.cmd == wire.PVIO_PUSH_irq:
            self._lguest.on_irq(wire.PVIO_PUSH_IRQ.unpack(op.args)["irq"])
        elif op.cmd == wire.PVIO_PUSH_domain_dead:
            domid: int = wire.PVIO_PUSH_DOMAIN.unpack(op.args)["domid"]
            self.dead_domains.add(domid)
            if self.on_domain_dead is not None:
                self.on_domain_dead(domid)
            self._mapping.domain_dead(domid)
        else:
            for fd in op.fds:
                os.close(fd)

    # -- the end ---------------------------------------------------------------------------

    async def close(self) -> None:
        """Leave: the hypervisor tears the domain down when the channel closes."""
        if self.closed:
            return
        self.closed = True
        self._memory.stop()
        self._events.close()
        await self.channel.close()
        self._mapping.close()
        self._lguest.close()
        self._memory.close()


#: What a refused create means, in the error the caller sees.
_CREATE_REFUSED = {
    errno.ENOMEM: "the host has no more memory to promise: see the hypervisor's log and --max-memory",
    errno.ENFILE: "the hypervisor holds as many domains as its descriptors allow",
}


async def create_domain(
    channel: Channel,
    name: str,
    nr_pages: int,
    *,
    transport: str = "map",
    max_grant_frames: int = 64,
    domid: int | None = None,
) -> Domain:
    """Become a new domain over `channel` (PVIO_DOMCTL_createdomain)."""
    from pvio.hypervisor.session import createdomain_op

    (reply,) = await channel.call([createdomain_op(name, nr_pages, max_grant_frames, transport, domid)])
    why = _CREATE_REFUSED.get(-reply.rc)
    check(reply, f"PVIO_DOMCTL_createdomain ({why})" if why else "PVIO_DOMCTL_createdomain")
    a = wire.PVIO_CREATEDOMAIN.unpack(reply.args)
    return Domain(channel, a["domid"], name, nr_pages, transport, reply.fds[0], reply.fds[1], max_grant_frames)
