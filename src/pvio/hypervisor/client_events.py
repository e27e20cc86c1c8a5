"""A domain's event channels: binding ports, notifying, waiting, masking.

Theory of operation
-------------------
`EventClient` is the domain's side of `pvio.hypervisor.event_channel`.  Binding goes
through the hypervisor (EVTCHNOP_alloc_unbound, _bind_interdomain, _close, _status);
each reply carries the port's own eventfd (its pending doorbell), which this part
registers with the channel's event loop (``add_reader``), and for an interdomain port
also the peer port's eventfd, to notify with.

The hot path never reaches the hypervisor.  `notify` writes 1 to the peer port's
eventfd: one system call.  On the receiving side the loop sees the port's eventfd
readable; the count is drained (the pending bit as the kernel sees it) and, unless the
port is masked, the handler runs right there in the callback and any `wait_event`
waiter wakes.  An event that comes while nobody waits is latched, so the next
`wait_event` returns at once: an event is never lost between two waits.

The mask and pending bits, and the table of what an event does to them, are the sans-IO
`pvio.hypervisor.client_core.EventPorts`; this part adds the descriptors, the waiters
and the loop.

Three pushes from the hypervisor change the ports without a call from us (`on_push`):
PORT_BOUND (a peer bound to our unbound port: here is its eventfd to notify with; until
it is read, `notify` asks the hypervisor to send instead), PORT_ALLOC (domain 0
allocated a port for us: here is its eventfd) and PORT_UNBOUND (the peer closed: stop
notifying it).

Deliberately not here: Xen's upcall and per-vCPU selectors.  A domain is a process with
an event loop; the loop's readiness of each eventfd plays that part.
"""

from __future__ import annotations

import asyncio
import errno
import os
from collections.abc import Callable

from pvio.abi import event_channel as ev
from pvio.abi.grant_table import DOMID_SELF
from pvio.hypervisor import wire
from pvio.hypervisor.client_channel import Hypercalls
from pvio.hypervisor.client_core import EventPorts
from pvio.hypervisor.errors import HypercallError
from pvio.hypervisor.wire import Op
from pvio.trace import TRACE

#: The pushes that change this domain's ports (`EventClient.on_push`).
PORT_PUSHES = frozenset({wire.PVIO_PUSH_port_bound, wire.PVIO_PUSH_port_alloc, wire.PVIO_PUSH_port_unbound})


class EventClient:
    """A domain's event-channel ports (see the module notes)."""

    def __init__(self, calls: Hypercalls, domid: int) -> None:
        self._calls = calls
        self._domid = domid
        self.ports = EventPorts()
        self._waiters: dict[int, list[asyncio.Future[None]]] = {}
        self._sends: set[asyncio.Future[None]] = set()

    # -- binding ---------------------------------------------------------------------------

    async def _evtchn(self, cmd: int, args: bytes) -> Op:
        return await self._calls.one(Op(wire.HYPERVISOR_event_channel_op, cmd, 1, args), f"EVTCHNOP {cmd}")

    async def alloc_unbound(self, remote_dom: int) -> int:
        """EVTCHNOP_alloc_unbound: a port `remote_dom` may bind to."""
        reply = await self._evtchn(
            ev.EVTCHNOP_alloc_unbound, ev.EVTCHN_ALLOC_UNBOUND.pack(dom=DOMID_SELF, remote_dom=remote_dom)
        )
        port: int = ev.EVTCHN_ALLOC_UNBOUND.unpack(reply.args)["port"]
        self._add_port(port, reply.fds[0])
        return port

    async def bind_interdomain(self, remote_dom: int, remote_port: int) -> int:
        """EVTCHNOP_bind_interdomain: a local port bound to `remote_port` of `remote_dom`."""
        reply = await self._evtchn(
            ev.EVTCHNOP_bind_interdomain,
            ev.EVTCHN_BIND_INTERDOMAIN.pack(remote_dom=remote_dom, remote_port=remote_port),
        )
        port: int = ev.EVTCHN_BIND_INTERDOMAIN.unpack(reply.args)["local_port"]
        self._add_port(port, reply.fds[0], reply.fds[1])
        return port

    def _add_port(self, port: int, rx_fd: int, tx_fd: int = -1) -> None:
        for fd in self.ports.remove(port):
            self._calls.channel.remove_reader(fd)
            os.close(fd)
        self.ports.add(port, rx_fd, tx_fd)
        self._calls.channel.add_reader(rx_fd, self._on_eventfd, port, rx_fd)

    async def close_port(self, port: int) -> None:
        """EVTCHNOP_close; a waiter on the port is cancelled."""
        await self._evtchn(ev.EVTCHNOP_close, ev.EVTCHN_CLOSE.pack(port=port))
        self._forget_port(port)

    def _forget_port(self, port: int) -> None:
        for fd in self.ports.remove(port):
            self._calls.channel.remove_reader(fd)
            os.close(fd)
        for fut in self._waiters.pop(port, []):
            if not fut.done():
                fut.cancel()

    async def evtchn_status(self, port: int, dom: int = DOMID_SELF) -> dict[str, int]:
        """EVTCHNOP_status of `port` of `dom` (another dom: domain 0 only)."""
        reply = await self._evtchn(ev.EVTCHNOP_status, ev.EVTCHN_STATUS.pack(dom=dom, port=port))
        return ev.EVTCHN_STATUS.unpack(reply.args)

    # -- notifying -------------------------------------------------------------------------

    def _no_port(self, port: int) -> HypercallError:
        return HypercallError(-errno.EINVAL, f"d{self._domid} has no port {port}", "port")

    def notify(self, port: int) -> None:
        """Notify the peer of `port`: one eventfd write (see the module notes)."""
        st = self.ports.ports.get(port)
        if st is None:
            raise self._no_port(port)
        if st.tx_fd < 0:
            # Bound, but the PORT_BOUND push has not been read yet: ask the hypervisor.
            task = asyncio.ensure_future(self.send_via_hypervisor(port))
            self._sends.add(task)
            task.add_done_callback(self._sends.discard)
            return
        os.eventfd_write(st.tx_fd, 1)
        if TRACE.on:
            TRACE.instant("notify sent", "evtchn", args={"port": port})

    async def send_via_hypervisor(self, port: int) -> None:
        """EVTCHNOP_send: notify through the hypervisor (the slow path)."""
        await self._evtchn(ev.EVTCHNOP_send, ev.EVTCHN_SEND.pack(port=port))

    # -- receiving -------------------------------------------------------------------------

    def _on_eventfd(self, port: int, fd: int) -> None:
        try:
            os.eventfd_read(fd)
        except OSError:
            return
        self._deliver(port)

    def _deliver(self, port: int) -> None:
        if not self.ports.event(port):  # no such port, or masked (now pending)
            return
        if TRACE.on:
            TRACE.instant("notify received", "evtchn", args={"port": port})
        st = self.ports.ports[port]
        if st.handler is not None:
            st.handler(port)
        woke = False
        if self._waiters:
            for fut in self._waiters.pop(port, ()):
                if not fut.done():
                    fut.set_result(None)
                    woke = True
        if not woke:
            st.latched = True

    def set_handler(self, port: int, handler: Callable[[int], None] | None) -> None:
        """Run `handler(port)` from the event loop on each event (None: no handler)."""
        self.ports.ports[port].handler = handler

    async def wait_event(self, port: int) -> None:
        """Wait for an event on `port`; returns at once if one came since the last wait."""
        st = self.ports.ports.get(port)
        if st is None:
            raise self._no_port(port)
        if st.latched:  # an event came while nobody waited: it is not lost
            st.latched = False
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.setdefault(port, []).append(fut)
        await fut

    def mask(self, port: int) -> None:
        """Set the mask bit: events are held pending, not delivered."""
        self.ports.mask(port)

    def unmask(self, port: int) -> None:
        """Clear the mask bit; an event held pending is delivered now."""
        if self.ports.unmask(port):
            self._deliver(port)

    # -- pushes from the hypervisor, and the end -------------------------------------------

    def on_push(self, op: Op) -> None:
        """A push in PORT_PUSHES: install or drop a port's descriptors."""
        if op.cmd == wire.PVIO_PUSH_port_bound and op.fds:
            old = self.ports.set_tx(wire.PVIO_PUSH_PORT.unpack(op.args)["port"], op.fds[0])
            for fd in op.fds[1:]:
                os.close(fd)
            if old >= 0:
                os.close(old)
        elif op.cmd == wire.PVIO_PUSH_port_alloc and op.fds:
            for fd in op.fds[1:]:
                os.close(fd)
            self._add_port(wire.PVIO_PUSH_PORT.unpack(op.args)["port"], op.fds[0])
        elif op.cmd == wire.PVIO_PUSH_port_unbound:
            old = self.ports.set_tx(wire.PVIO_PUSH_PORT.unpack(op.args)["port"], -1)
            if old >= 0:
                os.close(old)
        else:
            for fd in op.fds:
                os.close(fd)

    def close(self) -> None:
        """Forget every port: readers removed, eventfds closed, waiters cancelled."""
        for port in list(self.ports.ports):
            self._forget_port(port)
