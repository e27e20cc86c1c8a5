"""A domain as the hypervisor sees it, and the few I/O effects the cores ask for.

Theory of operation
-------------------
A domain is a number (domid), a name, N pages of memory addressed by frame number, a
grant table (up to `max_grant_frames` pages of grant_entry_v1, shared with the domain),
a handle table of the grants it has mapped (Xen's maptrack), event-channel ports and
lguest DMA bindings.  Domain 0 is the control/driver domain and the only privileged one.

Besides its memory, a domain may ask for *shareable frames* (numbered from
SHAREABLE_FRAME_BASE), each a one-page memfd of its own: a page that can be mapped by
another domain without handing over the rest of memory.  Shared rings live there, so
that even a copy-transport backend maps its ring live (see
`pvio.hypervisor.client_mapping`).

The cores never open files: memory, eventfds and signalling come from a `Platform`
the adapter supplies (`pvio.hypervisor.platform.OsPlatform` makes memfds and eventfds;
a test may supply fakes).  The cores see memory only as memoryviews.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from pvio.hypervisor.atomic import AtomicWords

PAGE_SHIFT = 12
PAGE_SIZE = 1 << PAGE_SHIFT

#: Limits (policy, like Xen's command-line defaults).
MAX_DOMAIN_PAGES = 1 << 18  # 1 GiB
DEFAULT_MAX_GRANT_FRAMES = 64
MAX_GRANT_FRAMES_LIMIT = 1024
MAX_MAPTRACK = 1 << 16
NR_EVTCHN_PORTS = 4096
#: Shareable frames (one memfd each) are numbered from here, far above any memory, so a
#: frame number says by itself which kind it is.
SHAREABLE_FRAME_BASE = 1 << 24
MAX_SHAREABLE_FRAMES = 256


class Platform(Protocol):
    """I/O the hypervisor core needs, supplied by its adapter."""

    def new_memory(self, nr_pages: int, name: str) -> tuple[int, memoryview]:
        """A shareable zeroed region of `nr_pages` pages: (fd, writable view)."""
        ...

    def free_memory(self, fd: int, view: memoryview) -> None: ...

    def new_eventfd(self) -> int: ...

    def signal(self, fd: int) -> None:
        """Make an eventfd readable (a notification)."""
        ...

    def close_fd(self, fd: int) -> None: ...


@dataclass(eq=False)
class MapRecord:
    """One maptrack entry: a grant `ref` of domain `granter` mapped by the owner."""

    handle: int
    granter: DomainRecord
    ref: int
    readonly: bool
    frame: int


@dataclass(eq=False)
class ActiveGrant:
    """Xen's active_grant_entry: the frame captured at first pin and the pin counts."""

    frame: int
    mapper: int
    pins_ro: int = 0
    pins_rw: int = 0

    @property
    def pins(self) -> int:
        return self.pins_ro + self.pins_rw


@dataclass(eq=False)
class Port:
    """An event-channel port: EVTCHNSTAT_unbound or _interdomain, and its eventfd."""

    port: int
    state: int
    remote_dom: int
    remote_port: int = 0
    #: The eventfd that is this port's "pending" doorbell: the owner reads it, the peer
    #: (and EVTCHNOP_send) write it.  Held by the hypervisor until the port closes.
    rx_fd: int = -1


@dataclass(eq=False)
class DmaBinding:
    """An lguest BIND_DMA: `count` lguest_dma structs at `dmas` in the binder's space."""

    domain: DomainRecord
    key: tuple[object, int]
    guest_key: int
    dmas: int
    count: int
    irq: int


@dataclass(eq=False)
class Region:
    """Memory shared by several domains (lguest's --sharenet file): the Futex Trick."""

    region_id: int
    nr_pages: int
    fd: int
    view: memoryview
    attached: dict[int, int] = field(default_factory=dict)  # domid -> base address
    creator: int = -1
    permitted: set[int] | None = None  # None: open to all (nobody was ever permitted)
    frames: FrameRule | None = None  # set by PVIO_LGUEST_region_frames
    #: the domain whose account holds the region's descriptor and pages
    charged_to: DomainRecord | None = None


@dataclass(frozen=True)
class FrameRule:
    """A region whose keys carry frames: each SEND_DMA there moves min_len..max_len
    bytes, and at most `flood` sends per second from one sender find no free buffer
    (0: no limit)."""

    min_len: int
    max_len: int
    flood: int = 0


@dataclass(eq=False)
class DomainRecord:
    """The core's record of one domain (what Xen keeps in its struct domain).

    Not the client: a domain process holds `pvio.hypervisor.client.Domain`, its handle
    on the hypervisor; this record is what the hypervisor keeps about that domain.
    """

    domid: int
    name: str
    nr_pages: int
    mem_fd: int
    memory: memoryview
    gnttab_fd: int
    gnttab: memoryview
    max_grant_frames: int
    gnttab_atomic: AtomicWords | None = None
    transport: str = "map"
    #: created with PVIO_CDF_xs_domain (Xen's XenStore domain)
    xs_domain: bool = False
    #: created with PVIO_CDF_control (a daemon with the control domain's trust)
    control: bool = False
    #: request frames (hypervisor round trips) and the ops in them, for pvio top and bench
    hypercall_frames: int = 0
    hypercall_ops: int = 0
    nr_grant_frames: int = 1
    dying: bool = False
    #: ref -> pins on this domain's grant entries
    active: dict[int, ActiveGrant] = field(default_factory=dict)
    #: handle -> grants this domain has mapped
    maptrack: dict[int, MapRecord] = field(default_factory=dict)
    next_handle: int = 0
    free_handles: list[int] = field(default_factory=list)
    #: mappings of this domain's pages held by others (count), for zombie handling
    foreign_maps: int = 0
    ports: dict[int, Port] = field(default_factory=dict)
    dma: list[DmaBinding] = field(default_factory=list)
    regions: dict[int, Region] = field(default_factory=dict)  # region_id -> region
    #: lguest: a DMA struct's sections (its bytes after used_len) -> the validated,
    #: resolved copy list; cleared whenever `regions` changes (pvio.hypervisor.lguest_dma)
    dma_sections: dict[bytes, list[tuple[memoryview, int, int]]] = field(default_factory=dict)
    #: domids whose memory fd this domain was given (map transport)
    mem_fds_given: set[int] = field(default_factory=set)
    #: shareable frames: frame -> (its own memfd, view)
    shareable: dict[int, tuple[int, memoryview]] = field(default_factory=dict)
    #: Xen's max_evtchn_port: EVTCHNOP_alloc_unbound past it is -ENOSPC
    max_evtchn_port: int = NR_EVTCHN_PORTS - 1
    #: what the hypervisor holds for this domain (pvio.hypervisor.accounts): pool
    #: descriptors (ports, shareable frames, regions), and pages beyond its memory and
    #: grant table (shareable frames, regions)
    fds_held: int = 0
    pages_held: int = 0

    @property
    def privileged(self) -> bool:
        return self.domid == 0

    @property
    def nr_grant_entries(self) -> int:
        return self.nr_grant_frames * (PAGE_SIZE // 8)

    def valid_frame(self, frame: int) -> bool:
        return 0 <= frame < self.nr_pages or frame in self.shareable

    def frame_view(self, frame: int) -> memoryview:
        if frame >= SHAREABLE_FRAME_BASE:
            return self.shareable[frame][1]
        return self.memory[frame << PAGE_SHIFT : (frame + 1) << PAGE_SHIFT]
