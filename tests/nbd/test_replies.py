"""Replies leaving a connection (`pvio.nbd.replies`): lent data sent from where it lies
with one writev, in order with everything else; what the socket does not take is copied
to the transport; every loan is released before `send_replies` returns."""

from __future__ import annotations

import os
import socket
from collections import Counter

from pvio.nbd.replies import JOIN_LIMIT, send_replies
from pvio.storage.lent import Lent


class Transport:
    """What `send_replies` uses of an asyncio transport: it records what it is given."""

    def __init__(self, buffered: int = 0) -> None:
        self.buffered = buffered
        self.out: list[bytes] = []

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.out.append(bytes(data))

    def writelines(self, parts: list[bytes | bytearray | memoryview]) -> None:
        for p in parts:
            self.write(p)


def loan(data: bytes, released: list[bytes]) -> Lent:
    """`data` lent in pieces of 4 KiB, as a page-sized loan would be."""
    buf = memoryview(bytearray(data))
    return Lent([buf[i : i + 4096] for i in range(0, len(data), 4096)], lambda: released.append(data))


def pair(sndbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    if sndbuf is not None:
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    return a, b


def drain(sock: socket.socket) -> bytes:
    sock.setblocking(False)
    out = bytearray()
    while True:
        try:
            chunk = sock.recv(1 << 20)
        except BlockingIOError:
            return bytes(out)
        if not chunk:
            return bytes(out)
        out += chunk


def test_lent_data_leaves_in_place_in_order_with_the_other_replies() -> None:
    a, b = pair(sndbuf=4 << 20)  # room for it all (as the export asks for its connections)
    released: list[bytes] = []
    data = os.urandom(256 * 1024)
    parts = [b"H" * 16, loan(data, released), b"h" * 16, b"x" * JOIN_LIMIT]
    t, stats = Transport(), Counter[str]()
    send_replies(t, a.fileno(), parts, stats)  # type: ignore[arg-type]
    assert t.out == []  # nothing through the transport: the socket took it all
    assert drain(b) == b"H" * 16 + data + b"h" * 16 + b"x" * JOIN_LIMIT
    assert released == [data] and stats["reads_lent"] == 1 and stats["lent_bytes_copied"] == 0
    a.close()
    b.close()


def test_what_the_socket_does_not_take_is_copied_to_the_transport() -> None:
    a, b = pair(sndbuf=64 * 1024)
    released: list[bytes] = []
    data = os.urandom(4 << 20)  # far more than the socket holds
    lent = loan(data, released)
    t, stats = Transport(), Counter[str]()
    send_replies(t, a.fileno(), [b"H" * 16, lent, b"tail"], stats)  # type: ignore[arg-type]
    took = drain(b)
    assert 0 < len(took) < len(data)  # the socket took a part, the transport the rest
    assert took + b"".join(t.out) == b"H" * 16 + data + b"tail"
    assert released == [data] and lent.released  # before send_replies returned
    assert 0 < stats["lent_bytes_copied"] <= len(data)
    a.close()
    b.close()


def test_with_bytes_buffered_or_no_socket_everything_goes_through_the_transport() -> None:
    a, b = pair()
    data = os.urandom(128 * 1024)
    for buffered, fd in ((1, a.fileno()), (0, None)):
        released: list[bytes] = []
        t, stats = Transport(buffered), Counter[str]()
        send_replies(t, fd, [b"H" * 16, loan(data, released), b"h" * 16], stats)  # type: ignore[arg-type]
        # (the transport has bytes of its own to send first: writing to the socket now
        # would put these before them)
        assert b"".join(t.out) == b"H" * 16 + data + b"h" * 16
        assert released == [data] and stats["reads_lent"] == 0
    assert drain(b) == b""
    a.close()
    b.close()


def test_a_broken_socket_still_releases_every_loan() -> None:
    a, b = pair()
    b.close()
    released: list[bytes] = []
    data = os.urandom(64 * 1024)
    t, stats = Transport(), Counter[str]()
    send_replies(t, a.fileno(), [b"H" * 16, loan(data, released)], stats)  # type: ignore[arg-type]
    assert released == [data]
    assert b"".join(t.out) == b"H" * 16 + data  # left to the transport, which finds the socket closed
    a.close()


def test_a_lent_part_is_not_used_after_its_release() -> None:
    released: list[bytes] = []
    lent = Lent.joined([loan(b"a" * 4096, released), loan(b"b" * 4096, released)])
    assert len(lent) == 8192 and lent.tobytes() == b"a" * 4096 + b"b" * 4096
    lent.release()
    assert released == [b"a" * 4096, b"b" * 4096] and lent.released
    try:
        lent.tobytes()
    except ValueError:
        pass
    else:
        raise AssertionError("a released loan gave its bytes")
