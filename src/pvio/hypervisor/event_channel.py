"""Event channels, hypervisor side: ports, binding, and the eventfd behind each port.

Theory of operation
-------------------
A port is EVTCHNSTAT_unbound (waiting for a named remote domain) or
EVTCHNSTAT_interdomain (bound to a remote port); a free port is EVTCHNSTAT_closed and
not in the table.  Port 0 is never allocated, as in Xen.

The hot path never comes here.  Each allocated port owns an eventfd, its "pending" bit:
the owner waits on it (``loop.add_reader``), and when the channel is bound the peer is
given a duplicate to write, so EVTCHNOP_send is a single ``write(2)`` by the sender.
The hypervisor hands out eventfds only at binding, keeps its own copy while the port is
open, and on close tells the peer (a PORT_UNBOUND push plus a signal on the peer's
port, so a waiting peer wakes and can look).  EVTCHNOP_send through the hypervisor is
kept for clients without the fd yet, and validates ownership like Xen.

Mask and pending bits live where Xen puts them, with the domain (Xen: shared_info, which
the guest owns): `pvio.hypervisor.client_core.EventPorts` keeps them; an eventfd's count
is the pending bit as the kernel sees it.

State table (the rows are the only transitions; anything else is -EINVAL):

    closed      --alloc_unbound(remote)-->            unbound(remote)
    unbound(r)  --bind_interdomain by r-->            interdomain(r, p)   (+ new port in r)
    interdomain --close-->                            closed   (peer: -> unbound(us))
    unbound     --close-->                            closed

Errors are negative errno values as Xen returns them: -EINVAL for a bad or foreign port,
-EPERM for an unprivileged dom != DOMID_SELF, -ESRCH for an unknown remote domain,
-ENOSPC when a domain's ports are exhausted (every port up to its max_evtchn_port, 1023
for a guest as xl's default, in use).  A port's eventfd is charged to its domain's
descriptors (pvio.hypervisor.accounts): -EMFILE past the domain's share, -ENFILE past
the host's; the request fails and nothing changes.  Each port's descriptors are made and
duplicated before any state changes, so a failure half-way leaves no port behind.
"""

from __future__ import annotations

import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pvio.abi.event_channel import (
    EVTCHNSTAT_closed,
    EVTCHNSTAT_interdomain,
    EVTCHNSTAT_unbound,
)
from pvio.abi.grant_table import DOMID_SELF
from pvio.hypervisor.accounts import Accounts
from pvio.hypervisor.domain import NR_EVTCHN_PORTS, DomainRecord, Platform, Port
from pvio.hypervisor.errors import HypercallError

DomainLookup = Callable[[int], DomainRecord | None]


@dataclass
class PortPush:
    """Something a domain must be told about one of its ports (sent by the adapter)."""

    domid: int
    port: int
    bound: bool
    remote_dom: int = 0
    remote_port: int = 0
    fds: list[int] = field(default_factory=list)  # duplicates the adapter sends and closes
    allocated: bool = False  # a port the control domain allocated for this domain


class EventChannels:
    def __init__(
        self,
        lookup: DomainLookup,
        platform: Platform,
        dup: Callable[[int], int],
        accounts: Accounts,
        close_dup: Callable[[int], None],
    ) -> None:
        self._lookup = lookup
        self._platform = platform
        self._dup = dup
        self._close_dup = close_dup
        self._accounts = accounts
        self.pushes: list[PortPush] = []

    def _target(self, caller: DomainRecord, domid: int) -> DomainRecord:
        if domid in (DOMID_SELF, caller.domid):
            return caller
        if not caller.privileged:
            raise HypercallError(-errno.EPERM, "foreign domain", "dom")
        d = self._lookup(domid)
        if d is None:
            raise HypercallError(-errno.ESRCH, "no such domain", "dom")
        return d

    @staticmethod
    def _free_port(d: DomainRecord) -> int:
        if len(d.ports) < d.max_evtchn_port:
            for port in range(1, d.max_evtchn_port + 1):
                if port not in d.ports:
                    return port
        raise HypercallError(-errno.ENOSPC, f"d{d.domid} uses all its ports (max_evtchn_port {d.max_evtchn_port})")

    def _new_eventfd(self, d: DomainRecord, dups: int) -> tuple[int, list[int]]:
        """A port's eventfd, charged to `d`, and `dups` duplicates of it (all or none)."""
        self._accounts.charge_fds(d, 1, ports=True)
        try:
            rx_fd = self._platform.new_eventfd()
        except BaseException:
            self._accounts.release_fds(d, 1, ports=True)
            raise
        made: list[int] = []
        try:
            for _ in range(dups):
                made.append(self._dup(rx_fd))
        except BaseException:
            self._drop(rx_fd, made, d)
            raise
        return rx_fd, made

    def _drop(self, rx_fd: int, dups: list[int], d: DomainRecord) -> None:
        for fd in dups:
            self._close_dup(fd)
        self._platform.close_fd(rx_fd)
        self._accounts.release_fds(d, 1, ports=True)

    @staticmethod
    def _port(d: DomainRecord, port: int) -> Port:
        p = d.ports.get(port)
        if p is None:
            raise HypercallError(-errno.EINVAL, f"d{d.domid} has no port {port}", "port")
        return p

    # T:370 Event channels: an eventfd per port, handed out at binding
    # alloc_unbound gives the caller a new port, in state unbound for the named remote
    # domain, and the read end of the port's eventfd.  When the remote domain binds to
    # it, it gets its own new port and eventfd, plus a duplicate of the first port's
    # eventfd to send with; the first domain is told by a PORT_BOUND push carrying the
    # new port's eventfd.  From then on a notify is one write(2) by the sender and one
    # epoll wake-up in the receiver's event loop (add_reader on the port's eventfd, the
    # handler called from that callback): the hypervisor is not involved.
    # :T
    def alloc_unbound(self, caller: DomainRecord, op: dict[str, Any]) -> list[int]:
        d = self._target(caller, op["dom"])
        remote = op["remote_dom"]
        if remote == DOMID_SELF:
            remote = caller.domid
        port = self._free_port(d)
        rx_fd, fds = self._new_eventfd(d, 1)
        d.ports[port] = Port(port, EVTCHNSTAT_unbound, remote, 0, rx_fd)
        op["port"] = port
        if d is caller:
            return fds
        # The control domain allocated it for `d` (as a toolstack does for a guest's
        # xenstore or console channel): `d` is told, with the port's eventfd.
        self.pushes.append(PortPush(d.domid, port, False, remote, 0, fds, allocated=True))
        return []

    def bind_interdomain(self, caller: DomainRecord, op: dict[str, Any]) -> list[int]:
        rdomid = op["remote_dom"]
        remote = caller if rdomid in (DOMID_SELF, caller.domid) else self._lookup(rdomid)
        if remote is None or remote.dying:
            raise HypercallError(-errno.ESRCH, "no such domain", "remote_dom")
        rport = remote.ports.get(op["remote_port"])
        if rport is None or rport.state != EVTCHNSTAT_unbound or rport.remote_dom != caller.domid:
            raise HypercallError(-errno.EINVAL, "remote port not unbound for us", "remote_port")
        lport = self._free_port(caller)
        rx_fd, dups = self._new_eventfd(caller, 2 if remote is not caller else 1)
        try:
            dups.append(self._dup(rport.rx_fd))
        except BaseException:
            self._drop(rx_fd, dups, caller)
            raise
        local = Port(lport, EVTCHNSTAT_interdomain, remote.domid, rport.port, rx_fd)
        caller.ports[lport] = local
        rport.state = EVTCHNSTAT_interdomain
        rport.remote_dom = caller.domid
        rport.remote_port = lport
        op["local_port"] = lport
        if remote is not caller:
            self.pushes.append(PortPush(remote.domid, rport.port, True, caller.domid, lport, [dups.pop(1)]))
        # Notifications sent on the unbound port may have been lost: raise one, as Xen.
        self._platform.signal(local.rx_fd)
        return dups  # the new port's eventfd, and the remote port's to send with

    def send(self, caller: DomainRecord, op: dict[str, Any]) -> None:
        p = self._port(caller, op["port"])
        if p.state != EVTCHNSTAT_interdomain:
            return  # Xen drops events on an unbound port
        remote = self._lookup(p.remote_dom)
        if remote is None:
            return
        rp = remote.ports.get(p.remote_port)
        if rp is not None:
            self._platform.signal(rp.rx_fd)

    def close(self, caller: DomainRecord, op: dict[str, Any]) -> None:
        self.close_port(caller, self._port(caller, op["port"]))

    def close_port(self, d: DomainRecord, p: Port) -> None:
        if p.state == EVTCHNSTAT_interdomain:
            remote = self._lookup(p.remote_dom)
            rp = remote.ports.get(p.remote_port) if remote is not None else None
            if remote is not None and rp is not None:
                rp.state = EVTCHNSTAT_unbound
                rp.remote_dom = d.domid
                rp.remote_port = 0
                if remote is not d:
                    self.pushes.append(PortPush(remote.domid, rp.port, False, d.domid))
                self._platform.signal(rp.rx_fd)
        del d.ports[p.port]
        self._platform.close_fd(p.rx_fd)
        self._accounts.release_fds(d, 1, ports=True)

    def close_all(self, d: DomainRecord) -> None:
        for p in list(d.ports.values()):
            self.close_port(d, p)

    def status(self, caller: DomainRecord, op: dict[str, Any]) -> None:
        d = self._target(caller, op["dom"])
        p = d.ports.get(op["port"])
        op["vcpu"] = 0
        op["u_dom"] = 0
        op["u_port"] = 0
        if p is None:
            if not 0 < op["port"] < NR_EVTCHN_PORTS:
                raise HypercallError(-errno.EINVAL, "port out of range", "port")
            op["status"] = EVTCHNSTAT_closed
            return
        op["status"] = p.state
        op["u_dom"] = p.remote_dom
        if p.state == EVTCHNSTAT_interdomain:
            op["u_port"] = p.remote_port

    def unmask(self, caller: DomainRecord, op: dict[str, Any]) -> None:
        """Validates the port; mask bits are the domain's own (see the module notes)."""
        self._port(caller, op["port"])
