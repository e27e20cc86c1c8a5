"""The client's sans-IO core: frame sequencing, descriptors per op, event-port state.

Theory of operation
-------------------
`HypercallProtocol` turns a batch of ops into a request frame with a fresh sequence number
and turns each received frame (plus the descriptors that came with it) into a reply for
a pending sequence number or a push.  It hands every descriptor to exactly one op (by
the ops' nr_fds) or, if the counts do not add up, reports them for closing: a confused
or hostile hypervisor cannot make the client leak or misuse fds.

`EventPorts` is the domain's own event-channel state, Xen's shared_info bits: for each
port a mask bit and a pending bit, the eventfd it waits on and the eventfd it notifies
with.  Delivery is a table:

    eventfd readable, unmasked  -> deliver to the handler
    eventfd readable, masked    -> pending := 1, do not deliver
    unmask with pending         -> pending := 0, deliver
    mask / unmask otherwise     -> just the bit
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pvio.hypervisor import wire
from pvio.hypervisor.errors import ProtocolError
from pvio.hypervisor.wire import Frame, Op


@dataclass
class Received:
    frame: Frame
    stray_fds: list[int] = field(default_factory=list)  # to be closed by the adapter


class HypercallProtocol:
    def __init__(self) -> None:
        self._seq = 0
        self.pending: set[int] = set()

    def request(self, ops: list[Op]) -> tuple[int, bytes]:
        self._seq = self._seq % 0xFFFFFFFF + 1
        seq = self._seq
        data = wire.encode_frame(wire.FRAME_REQUEST, seq, ops)
        self.pending.add(seq)
        return seq, data

    def receive(self, data: bytes, fds: list[int]) -> Received:
        frame = wire.decode_frame(data)
        if frame.kind == wire.FRAME_REPLY and frame.seq not in self.pending:
            raise ProtocolError(f"reply for unknown request {frame.seq}")
        if frame.kind == wire.FRAME_PUSH and frame.seq != 0:
            raise ProtocolError("push with a sequence number")
        if frame.kind in (wire.FRAME_REPLY, wire.FRAME_ERROR):
            self.pending.discard(frame.seq)
        wanted = sum(op.nr_fds for op in frame.ops)
        if wanted != len(fds):
            return Received(frame, list(fds))
        i = 0
        for op in frame.ops:
            op.fds = fds[i : i + op.nr_fds]
            i += op.nr_fds
        return Received(frame)


@dataclass
class PortState:
    port: int
    rx_fd: int
    tx_fd: int = -1
    masked: bool = False
    pending: bool = False
    handler: Callable[[int], None] | None = None
    #: an event was delivered while no wait_event() waited for it
    latched: bool = False


class EventPorts:
    def __init__(self) -> None:
        self.ports: dict[int, PortState] = {}

    def add(self, port: int, rx_fd: int, tx_fd: int = -1) -> PortState:
        st = PortState(port, rx_fd, tx_fd)
        self.ports[port] = st
        return st

    def remove(self, port: int) -> list[int]:
        st = self.ports.pop(port, None)
        if st is None:
            return []
        return [fd for fd in (st.rx_fd, st.tx_fd) if fd >= 0]

    def set_tx(self, port: int, tx_fd: int) -> int:
        """Install the fd to notify the peer with; returns an old one to close (or -1)."""
        st = self.ports.get(port)
        if st is None:
            return tx_fd
        old, st.tx_fd = st.tx_fd, tx_fd
        return old

    def event(self, port: int) -> bool:
        """The port's eventfd fired: True if the handler should run now."""
        st = self.ports.get(port)
        if st is None:
            return False
        if st.masked:
            st.pending = True
            return False
        return True

    def mask(self, port: int) -> None:
        self.ports[port].masked = True

    def unmask(self, port: int) -> bool:
        """Clear the mask: True if an event was pending and must be delivered now."""
        st = self.ports[port]
        st.masked = False
        if st.pending:
            st.pending = False
            return True
        return False
