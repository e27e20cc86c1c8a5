"""The xs_wire codec: bytes in, packets out; packets in, bytes out.  Sans-IO.

Theory of operation
-------------------
A XenStore stream, in either direction, is a sequence of frames: the 16-byte
`struct xsd_sockmsg` header (declared once in `pvio.abi.xs_wire.XSD_SOCKMSG`) followed by
`len` bytes of payload.  `FrameDecoder` is fed whatever bytes arrived (one byte, half a
header, three frames at once) and hands back whole `Packet`s; when a frame is incomplete
it returns the `NEED_DATA` value rather than raising or blocking, so the same decoder
serves the daemon, the clients, the tests that feed golden packets in every chunking, and
later the shared-page ring transport.

A header announcing more than XENSTORE_PAYLOAD_MAX bytes is a protocol violation: the
decoder raises `ProtocolViolation` and the caller closes the connection, as Xen's C daemon
does.  Clamping the length and reading on (oxenstored's answer to XSA-38) is rejected: the
stream is desynchronised after that and nothing good can be parsed from it.

The argument helpers mirror the C daemon's parsing: `one_arg` wants exactly one NUL, at
the end; `split_args` counts NUL-terminated strings and ignores trailing bytes.

What this module does not do: interpret message types or paths (see `pvio.xenstore.paths`
and `pvio.xenstore.server`), or any I/O.
"""

from __future__ import annotations

import enum
from typing import Final, NamedTuple

from pvio.abi.xs_wire import XENSTORE_PAYLOAD_MAX, XSD_SOCKMSG, XsdSockmsgType
from pvio.xenstore.errors import ProtocolViolation, XsError

HEADER_SIZE: Final = XSD_SOCKMSG.size
_HEADER = XSD_SOCKMSG.packer

OK: Final = b"OK\0"


class _NeedData(enum.Enum):
    NEED_DATA = "need more data"


#: Returned by `FrameDecoder.next_packet` while a frame is incomplete.
NEED_DATA: Final = _NeedData.NEED_DATA


class Packet(NamedTuple):
    """One xs_wire message: the header's fields and the payload bytes (a named tuple:
    immutable, and cheap to make on the hot path)."""

    type: int
    req_id: int
    tx_id: int
    payload: bytes

    def encode(self) -> bytes:
        return _HEADER.pack(self.type, self.req_id, self.tx_id, len(self.payload)) + self.payload

    @property
    def type_name(self) -> str:
        try:
            return XsdSockmsgType(self.type).name
        except ValueError:
            return f"type {self.type}"


def encode(type_: int, payload: bytes, *, req_id: int = 0, tx_id: int = 0) -> bytes:
    """The bytes of one frame (no length check: the sender decides what is too big)."""
    return _HEADER.pack(type_, req_id, tx_id, len(payload)) + payload


def error_payload(errno: str) -> bytes:
    return errno.encode() + b"\0"


# T:410 Framing: bytes in, packets out
# The decoder keeps one growing buffer and an offset into it.  `next_packet` looks at the
# 16 bytes of header only once they are all there, checks `len` against the 4096-byte
# limit *before* waiting for the payload (a peer announcing 2 GiB must not make us wait
# for, or buffer, 2 GiB: XSA-38, XSA-420), then hands out the packet when the payload is
# complete.  Incomplete input is the value NEED_DATA, never an exception: partial frames
# are the normal case on a stream and on a 1 KiB ring.
# :T
class FrameDecoder:
    """Feed bytes with `feed`; take packets with `next_packet` until it says NEED_DATA."""

    def __init__(self, max_payload: int = XENSTORE_PAYLOAD_MAX) -> None:
        self.max_payload = max_payload
        self._buf = bytearray()
        self._pos = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self._pos == len(self._buf):
            self._buf = bytearray(data)
            self._pos = 0
        else:
            self._buf += data

    @property
    def buffered(self) -> int:
        """How many bytes are waiting (part of a frame, or frames not yet taken)."""
        return len(self._buf) - self._pos

    def next_packet(self) -> Packet | _NeedData:
        avail = len(self._buf) - self._pos
        if avail < HEADER_SIZE:
            return NEED_DATA
        type_, req_id, tx_id, length = _HEADER.unpack_from(self._buf, self._pos)
        if length > self.max_payload:
            raise ProtocolViolation(f"payload length {length} > {self.max_payload}")
        if avail < HEADER_SIZE + length:
            return NEED_DATA
        start = self._pos + HEADER_SIZE
        payload = bytes(self._buf[start : start + length])
        self._pos = start + length
        if self._pos > 65536 and self._pos * 2 > len(self._buf):
            del self._buf[: self._pos]
            self._pos = 0
        return Packet(type_, req_id, tx_id, payload)

    def packets(self) -> list[Packet]:
        """Every complete packet buffered now (raises ProtocolViolation like next_packet)."""
        out: list[Packet] = []
        while True:
            p = self.next_packet()
            if p is NEED_DATA:
                return out
            assert isinstance(p, Packet)
            out.append(p)


# -- argument parsing, as the C daemon does it -------------------------------------------


def one_arg(payload: bytes, field: str = "path") -> bytes:
    """The single argument of READ, RM, ...: exactly one NUL, at the very end."""
    if not payload or payload.find(b"\0") != len(payload) - 1:
        raise XsError("EINVAL", "expected one NUL-terminated string", field=field)
    return payload[:-1]


def split_args(payload: bytes) -> list[bytes]:
    """The NUL-terminated strings of a payload; bytes after the last NUL are ignored."""
    parts = payload.split(b"\0")
    return parts[:-1]


def join_args(*args: bytes | str) -> bytes:
    return b"".join((a.encode() if isinstance(a, str) else a) + b"\0" for a in args)
