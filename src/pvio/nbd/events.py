"""What the NBD server core hands its adapter, and its errors: the events of
`pvio.nbd.server.NbdServerConnection` (h11's shape: the core returns events, the adapter
acts on them), with the export each connection serves.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

from pvio.abi.fault import Fault
from pvio.nbd import wire as w
from pvio.storage.backend import BackendInfo

# --- errors ------------------------------------------------------------------------------


@dataclass(frozen=True)
class NbdError:
    """Why a request or option was refused: whose fault, the wire error, the bad field."""

    fault: Fault
    wire_error: int  # NBD_E* for commands, NBD_REP_ERR_* for options, 0 if none is sent
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message} ({self.fault.value} fault)"


class LocalProtocolError(Exception):
    """pvio's own code used the connection wrongly (a reply to an unknown command...)."""


# --- events ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Export:
    """One named export as the protocol sees it: a name, a description and its backend's facts."""

    name: str
    info: BackendInfo
    description: str = ""

    def __post_init__(self) -> None:
        if len(self.name.encode()) > w.NBD_MAX_STRING or "\0" in self.name:
            raise ValueError(f"export name {self.name!r}: at most 4096 bytes, no NUL")
        if len(self.description.encode()) > w.NBD_MAX_STRING:
            raise ValueError("export description: at most 4096 bytes")

    @functools.cached_property
    def transmission_flags(self) -> int:
        """The flags advertised for this export: exactly what its backend supports."""
        info = self.info
        flags = w.NBD_FLAG_HAS_FLAGS
        if info.read_only:
            flags |= w.NBD_FLAG_READ_ONLY
        if info.can_flush:
            flags |= w.NBD_FLAG_SEND_FLUSH
        if info.can_fua and not info.read_only:
            flags |= w.NBD_FLAG_SEND_FUA
        if info.can_trim:
            flags |= w.NBD_FLAG_SEND_TRIM
        if info.can_write_zeroes:
            flags |= w.NBD_FLAG_SEND_WRITE_ZEROES
        if info.can_multi_conn:
            flags |= w.NBD_FLAG_CAN_MULTI_CONN
        return flags


@dataclass(frozen=True)
class ExportChosen:
    export: Export
    via: int  # NBD_OPT_GO or NBD_OPT_EXPORT_NAME


@dataclass(eq=False, slots=True)
class Command:
    """A validated request to execute; answer it with `NbdServerConnection.reply`.

    Immutable by convention: not declared frozen, because a frozen dataclass's generated
    ``__init__`` sets every field through ``object.__setattr__`` (1.4 µs a command against
    0.6 µs for the one below, interpreted), and a connection makes one per request.
    """

    tag: int  # this connection's own serial number for the request (cookies may repeat)
    cookie: int
    type: int  # NBD_CMD_READ, _WRITE, _FLUSH, _TRIM, _WRITE_ZEROES
    flags: int
    offset: int
    length: int
    data: bytes | memoryview = b""  # the payload of NBD_CMD_WRITE (a view of its own buffer)

    def __init__(self, tag: int, cookie: int, type: int, flags: int, offset: int, length: int,
                 data: bytes | memoryview = b"") -> None:
        self.tag = tag
        self.cookie = cookie
        self.type = type
        self.flags = flags
        self.offset = offset
        self.length = length
        self.data = data

    @property
    def fua(self) -> bool:
        return bool(self.flags & w.NBD_CMD_FLAG_FUA)

    @property
    def name(self) -> str:
        return w.NBD_CMD_NAMES.get(self.type) or str(self.type)  # str() only when unnamed


@dataclass(frozen=True)
class CommandRejected:
    cookie: int
    type: int
    error: NbdError


@dataclass(frozen=True)
class OptionRejected:
    option: int
    error: NbdError


@dataclass(frozen=True)
class StartTls:
    """NBD_OPT_STARTTLS was acknowledged: send `data_to_send()` in plain text, run the TLS
    handshake (server side) on the connection, then call `tls_started()`.  Until then the
    core parses nothing."""


@dataclass(frozen=True)
class Disconnect:
    """Close the connection once `data_to_send()` is sent (and, if `drain`, once every
    in-flight command is answered)."""

    reason: str
    error: NbdError | None = None  # set when the client broke the protocol
    drain: bool = False


Event = ExportChosen | Command | CommandRejected | OptionRejected | StartTls | Disconnect
