"""What domains make the hypervisor hold, counted against what the host can give.

Theory of operation
-------------------
Every descriptor the hypervisor keeps open for a domain and every page it promises one
is charged here before it is made, and given back when it is closed or freed, so no
domain can make the hypervisor run itself out of descriptors or promise memory the host
does not have.  Nothing here does I/O: the numbers come from `HostLimits`, which the
adapter computes from the process's RLIMIT_NOFILE and the host's MemAvailable
(`pvio.hypervisor.platform.host_limits`).

The descriptor table (RLIMIT_NOFILE, N) is cut in parts, so that one use can never eat
another's room:

    base reserve      64        stdio, the listener, the event loop, logs, a client's
                                stray SCM_RIGHTS (closed at once)
    connections       min(1024, N/8)   one socket each; past it a connection is
                                answered -EBUSY and closed
    in flight         N/8       duplicates queued in replies and pushes, closed once sent
    domains           2 per connection: each domain's memory and grant-table memfds,
                                so a domain can always be created while a slot is free
    pool              the rest  ports' eventfds, shareable frames, lguest regions

A domain's pool descriptors are bounded by its share (a guest: pool/16, the control
domain, which serves everyone: pool/2); past it the request fails -EMFILE.  Ports are
bounded host-wide too (pool/2), so domains that flood event channels leave room for
shareable frames (every shared ring is one); past either host bound the request fails
-ENFILE.  Each is that request's answer only: the domain, and everyone else, carry on.

Memory is a promise, as in Xen: a domain's pages (its memory, its grant table, its
shareable frames, the lguest regions it creates) are counted when created, against
`max_pages`; a create the host cannot hold is refused -ENOMEM (Xen refuses to build a
domain without the free memory for it), and a domain's pages return to the account when
it is freed (after its last foreign mapping, for a zombie).

Rejected: measuring (/proc/self/fd, MemAvailable at each request) instead of counting
(costly per hypercall, and memfd pages are faulted in lazily, so the host's free memory
says nothing of what was promised); a single shared pool (one domain's ports could then
starve every other domain's creation).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from pvio.hypervisor.domain import NR_EVTCHN_PORTS, DomainRecord
from pvio.hypervisor.errors import HypercallError

#: xl's `max_event_channels` default: a guest's highest port is 1023 (Xen's
#: EVTCHNOP_alloc_unbound answers -ENOSPC past the domain's max_evtchn_port).  The
#: control domain has no such limit in Xen and gets the whole 2-level ABI (4095).
DEFAULT_MAX_EVTCHN_PORT = 1023
DOM0_MAX_EVTCHN_PORT = NR_EVTCHN_PORTS - 1
#: Descriptors kept aside for the process itself (see the table above).
BASE_RESERVE_FDS = 64
#: Connections served at once, at most (also bounded by RLIMIT_NOFILE / 8).
MAX_CONNECTIONS = 1024
#: Descriptors a domain is charged when it is created: its memory and grant-table memfds.
FDS_PER_DOMAIN = 2


@dataclass(frozen=True)
class HostLimits:
    """The bounds, computed once by the adapter.  None: not bounded (tests of the core)."""

    max_evtchn_port: int = DEFAULT_MAX_EVTCHN_PORT
    dom0_max_evtchn_port: int = DOM0_MAX_EVTCHN_PORT
    max_connections: int = MAX_CONNECTIONS
    #: in-flight duplicates (replies and pushes not yet sent)
    transient_fds: int | None = None
    #: memory and grant-table memfds of all domains
    domain_fds: int | None = None
    #: ports, shareable frames and regions of all domains
    pool_fds: int | None = None
    #: ports of all domains (part of the pool)
    evtchn_fds: int | None = None
    #: a guest's share of the pool, and the control domain's
    guest_share: int | None = None
    dom0_share: int | None = None
    #: pages all domains may be promised
    max_pages: int | None = None

    @classmethod
    def for_host(cls, nofile: int, max_pages: int | None) -> HostLimits:
        """The cut described in the module notes, for RLIMIT_NOFILE `nofile`."""
        connections = max(1, min(MAX_CONNECTIONS, nofile // 8))
        transient = max(1, nofile // 8)
        domain_fds = FDS_PER_DOMAIN * connections
        pool = max(0, nofile - BASE_RESERVE_FDS - connections - transient - domain_fds)
        return cls(
            max_connections=connections,
            transient_fds=transient,
            domain_fds=domain_fds,
            pool_fds=pool,
            evtchn_fds=pool // 2,
            guest_share=pool // 16,
            dom0_share=pool // 2,
            max_pages=max_pages,
        )


#: The errnos a bound answers with (logged through `RefusalLog`, not per request).
BOUND_ERRNOS = frozenset({-errno.ENOSPC, -errno.EMFILE, -errno.ENFILE, -errno.ENOMEM})


# T:395 What a domain may make the hypervisor hold
# Every eventfd, memfd and page the hypervisor keeps for a domain is charged here before
# it is made and given back when it goes.  A guest has xl's 1023 ports (-ENOSPC after,
# as Xen), a share of the descriptors (-EMFILE), the host a bound on all of them and on
# its ports (-ENFILE), and memory is promised only as far as the host can hold it
# (-ENOMEM at create, as Xen refuses a domain it cannot build).  Each refusal is that
# request's answer: the table for the connections stays whole, so the next domain is
# always accepted and answered.
# :T
class Accounts:
    """The counts, checked and kept by the core (one per `Hypervisor`)."""

    def __init__(self, limits: HostLimits) -> None:
        self.limits = limits
        self.domain_fds = 0
        self.pool_fds = 0
        self.evtchn_fds = 0
        self.pages = 0

    # -- domains ----------------------------------------------------------------

    def max_evtchn_port(self, domid: int) -> int:
        return self.limits.dom0_max_evtchn_port if domid == 0 else self.limits.max_evtchn_port

    def charge_domain(self, domid: int, name: str, nr_pages: int) -> None:
        """A new domain's memfds and `nr_pages` pages (memory and grant table)."""
        self._charge_pages(nr_pages, f"d{domid} {name!r}")
        cap = self.limits.domain_fds
        if cap is not None and self.domain_fds + FDS_PER_DOMAIN > cap:
            self.pages -= nr_pages
            raise HypercallError(-errno.ENFILE, f"d{domid} {name!r}: {cap // FDS_PER_DOMAIN} domains already")
        self.domain_fds += FDS_PER_DOMAIN

    def release_domain(self, nr_pages: int) -> None:
        self.domain_fds -= FDS_PER_DOMAIN
        self.pages -= nr_pages

    def charge_pages(self, d: DomainRecord, n: int) -> None:
        self._charge_pages(n, f"d{d.domid}")
        d.pages_held += n

    def release_pages(self, d: DomainRecord, n: int) -> None:
        self.pages -= n
        d.pages_held -= n

    def _charge_pages(self, n: int, who: str) -> None:
        cap = self.limits.max_pages
        if cap is not None and self.pages + n > cap:
            free = max(0, cap - self.pages)
            raise HypercallError(
                -errno.ENOMEM,
                f"{who}: {n} pages asked, {free} of the host's {cap} left to promise",
                "nr_pages",
            )
        self.pages += n

    # -- descriptors of the pool ------------------------------------------------

    def charge_fds(self, d: DomainRecord, n: int, *, ports: bool = False) -> None:
        """`n` descriptors for `d` (eventfds if `ports`): -EMFILE past its share,
        -ENFILE past the host's pool (or its ports' part)."""
        lim = self.limits
        share = lim.dom0_share if d.privileged else lim.guest_share
        if share is not None and d.fds_held + n > share:
            raise HypercallError(-errno.EMFILE, f"d{d.domid} holds {d.fds_held} of its {share} descriptors")
        if lim.pool_fds is not None and self.pool_fds + n > lim.pool_fds:
            raise HypercallError(-errno.ENFILE, f"the host's {lim.pool_fds} domain descriptors are in use")
        if ports and lim.evtchn_fds is not None and self.evtchn_fds + n > lim.evtchn_fds:
            raise HypercallError(-errno.ENFILE, f"the host's {lim.evtchn_fds} event channels are in use")
        d.fds_held += n
        self.pool_fds += n
        if ports:
            self.evtchn_fds += n

    def release_fds(self, d: DomainRecord, n: int, *, ports: bool = False) -> None:
        d.fds_held -= n
        self.pool_fds -= n
        if ports:
            self.evtchn_fds -= n

    def is_empty(self) -> bool:
        return not (self.domain_fds or self.pool_fds or self.evtchn_fds or self.pages)


class RefusalLog:
    """Refusals at a bound, logged without letting a domain flood the log: the first of a
    kind at once, then at most one line per `interval` seconds, saying how many were not
    logged in between."""

    interval = 10.0

    def __init__(self, log: logging.Logger, clock: Callable[[], float] = time.monotonic) -> None:
        self._log = log
        self.clock = clock
        self._seen: dict[int, tuple[float, int]] = {}

    def refused(self, exc: HypercallError) -> None:
        now = self.clock()
        seen = self._seen.get(exc.rc)
        if seen is not None and now - seen[0] < self.interval:
            self._seen[exc.rc] = (seen[0], seen[1] + 1)
            return
        quiet = f" ({seen[1]} more refusals like it not logged)" if seen is not None and seen[1] else ""
        self._log.warning("refused: %s%s", exc, quiet)
        self._seen[exc.rc] = (now, 0)
