"""The NBD server protocol, sans-IO: feed it bytes, get events; answer events, get bytes.

Theory of operation
-------------------
`NbdServerConnection` is one client connection's protocol state and nothing else.  The
adapter (`pvio.nbd.server_asyncio`) writes `data_to_send()` to the socket, passes what it
reads to `receive_data()`, and acts on the events that come back:

* `ExportChosen` — the handshake is over (NBD_OPT_GO or NBD_OPT_EXPORT_NAME); commands
  for that export follow.
* `Command` — a validated request (READ, WRITE with its payload, FLUSH, TRIM,
  WRITE_ZEROES) to run on the backend, then answer with `reply()`, in any order.
* `CommandRejected` — a request that failed validation; its error reply is already
  queued.  Reported for logs and statistics only.
* `Disconnect` — the client asked to leave (NBD_OPT_ABORT, NBD_CMD_DISC) or broke the
  protocol: send what is queued, wait for in-flight commands if `drain`, then close.

The handshake is a table (`_OPTION_HANDLERS`): each option code maps to a method that
answers it; anything not in the table gets NBD_REP_ERR_UNSUP and haggling continues, as
fixed newstyle requires.  Served: NBD_OPT_EXPORT_NAME, NBD_OPT_ABORT, NBD_OPT_LIST,
NBD_OPT_INFO, NBD_OPT_GO.  Not served (ERR_UNSUP): STARTTLS (pvio listens on a UNIX
socket or localhost only), STRUCTURED_REPLY and the meta-context options (so no
BLOCK_STATUS), EXTENDED_HEADERS.  Simple replies only: a failed read sends its error and
no data, which the protocol allows for simple replies.

The client is hostile.  Every field of every request is checked before anything is
acted on, in the order the protocol's error rules imply (unknown command or flag →
EINVAL; write to a read-only export → EPERM; larger than the advertised maximum or
unaligned to the minimum → EINVAL; past the end → ENOSPC for writes, EINVAL otherwise).
A write that fails validation still has its payload consumed — streamed past without
buffering — so the connection stays in step.  Only violations that make the byte stream
meaningless (a bad request magic, unknown client flags, an unknown NBD_OPT_EXPORT_NAME,
a write payload too large to be anything but an attack) end the connection.  Nothing a
client sends raises out of `receive_data` except through a `Disconnect` event.

Alternatives rejected: one coroutine per connection reading with `readexactly` (simpler,
but mixes protocol with I/O and cannot be fuzzed byte by byte); structured replies
(they help sparse reads, but every client pvio targets works without them, and they
double the reply paths to test).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from pvio.abi.fault import Fault
from pvio.nbd import wire as w
from pvio.nbd.events import (
    Command,
    CommandRejected,
    Disconnect,
    Event,
    Export,
    ExportChosen,
    LocalProtocolError,
    NbdError,
    OptionRejected,
)

#: Option data larger than this is streamed past and answered NBD_REP_ERR_TOO_BIG: the
#: largest legal option (NBD_OPT_GO: a 4096-byte name and a few info requests) is far less.
MAX_OPTION_DATA = 16 * 1024
#: A write payload larger than this ends the connection (the protocol allows treating
#: such a payload as a denial-of-service attack); up to it, an oversized write is drained
#: and answered EINVAL.
MAX_WRITE_PAYLOAD_DRAINED = w.NBD_MAX_PAYLOAD_PORTABLE * 2


class State(enum.Enum):
    """The connection's phases (proto.md, "Protocol phases").

        greeting sent ── client flags ──▶ OPTIONS ── GO / EXPORT_NAME ──▶ TRANSMISSION
              │                             │  ▲ other options                │
              └── bad flags ──▶ CLOSED ◀─────┘──┘ ABORT, violation  ◀─── DISC / violation
    """

    CLIENT_FLAGS = "client flags"
    OPTIONS = "options"
    TRANSMISSION = "transmission"
    CLOSED = "closed"


# Which command flags each command accepts (beyond that: EINVAL), given the export.
def _allowed_flags(cmd: int, export: Export) -> int:
    fua = w.NBD_CMD_FLAG_FUA if export.transmission_flags & w.NBD_FLAG_SEND_FUA else 0
    if cmd == w.NBD_CMD_WRITE or cmd == w.NBD_CMD_TRIM:
        return fua
    if cmd == w.NBD_CMD_WRITE_ZEROES:
        return fua | w.NBD_CMD_FLAG_NO_HOLE
    return 0


_WRITES = frozenset({w.NBD_CMD_WRITE, w.NBD_CMD_TRIM, w.NBD_CMD_WRITE_ZEROES})


@dataclass
class _PendingOption:
    option: int
    length: int


@dataclass
class _Draining:
    """A payload being streamed past: `remaining` bytes still to drop."""

    remaining: int
    then: Callable[[], None] | None = None


# T:720 The handshake, as a table
# A connection starts with the server's greeting (NBDMAGIC, IHAVEOPT, and the handshake
# flags FIXED_NEWSTYLE and NO_ZEROES); the client answers with its own flags, and any flag
# pvio does not know ends the connection, as the protocol demands.  Then options: each is
# looked up in `_OPTION_HANDLERS` (at the end of this module).  NBD_OPT_GO and
# NBD_OPT_INFO answer NBD_INFO_EXPORT (size and transmission flags) and NBD_INFO_BLOCK_SIZE,
# then NBD_REP_ACK; GO then switches to transmission.  The transmission flags are derived
# from the backend's `BackendInfo`, so FLUSH, FUA, TRIM and WRITE_ZEROES are advertised
# exactly when the backend implements them.  An option not in the table is answered
# NBD_REP_ERR_UNSUP and haggling goes on; the empty export name selects the default export.
# :T


@dataclass
class NbdServerConnection:
    """One server-side NBD connection (see the module docstring)."""

    exports: Mapping[str, Export]
    #: The export NBD_OPT_GO "" (the default export) selects; None: "" is just a name.
    default_export: str | None = None
    state: State = field(default=State.CLIENT_FLAGS, init=False)
    export: Export | None = field(default=None, init=False)
    no_zeroes: bool = field(default=False, init=False)
    shutting_down: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self._in = bytearray()
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._option: _PendingOption | None = None
        self._write_header: tuple[int, int, int, int] | None = None  # cookie, flags, off, len
        self._draining: _Draining | None = None
        self._next_tag = 0
        self._in_flight: dict[int, Command] = {}
        self._disc_seen = False
        self._out.append(
            w.NEW_HANDSHAKE.pack(
                nbdmagic=w.NBDMAGIC,
                version=w.IHAVEOPT,
                gflags=w.NBD_FLAG_FIXED_NEWSTYLE | w.NBD_FLAG_NO_ZEROES,
            )
        )

    # --- the adapter's interface ----------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued for the client since the last call."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes read from the client; returns the events they complete."""
        if self.state is State.CLOSED or self._disc_seen:
            return []  # whatever follows a DISC or a violation is ignored
        self._in += data
        pos = 0
        while self._parsing():
            used = self._step(pos)
            if used is None:
                break
            pos += used
        del self._in[:pos]
        events, self._events = self._events, []
        return events

    def reply(
        self, command: Command, error: int = 0, data: bytes | bytearray | memoryview = b""
    ) -> list[bytes | bytearray | memoryview]:
        """The simple reply to `command` (header, then a successful read's data).

        Return the pieces rather than one joined buffer: the adapter gathers them with
        other replies and copies each once, into the one buffer it sends.
        """
        if self._in_flight.pop(command.tag, None) is None:
            raise LocalProtocolError(f"reply to {command.name} #{command.tag}: not in flight")
        header = w.SIMPLE_REPLY.packer.pack(w.NBD_SIMPLE_REPLY_MAGIC, error, command.cookie)
        if command.type != w.NBD_CMD_READ or error:
            return [header]
        if len(data) != command.length:
            raise LocalProtocolError(
                f"reply to {command.name}: {len(data)} bytes of data for a {command.length}-byte read"
            )
        return [header, data]

    def start_shutdown(self) -> None:
        """From now on, refuse new options (NBD_REP_ERR_SHUTDOWN) and commands (ESHUTDOWN)."""
        self.shutting_down = True

    # --- parsing ----------------------------------------------------------------------------

    def _parsing(self) -> bool:
        return self.state is not State.CLOSED and not self._disc_seen

    def _avail(self, pos: int) -> int:
        return len(self._in) - pos

    def _step(self, pos: int) -> int | None:
        """Consume one unit from `self._in[pos:]`: how many bytes (maybe 0), None if more
        bytes are needed.  A unit that consumes 0 bytes always changes state, so the
        parsing loop always ends."""
        if self._draining is not None:
            return self._drain(pos)
        if self.state is State.CLIENT_FLAGS:
            return self._client_flags(pos)
        if self.state is State.OPTIONS:
            return self._option_step(pos)
        return self._transmission_step(pos)

    def _drain(self, pos: int) -> int | None:
        d = self._draining
        assert d is not None
        n = min(d.remaining, self._avail(pos))
        d.remaining -= n
        if d.remaining == 0:
            self._draining = None
            if d.then is not None:
                d.then()
            return n
        return n or None

    def _violation(self, fld: str, message: str) -> None:
        err = NbdError(Fault.REMOTE, 0, fld, message)
        self.state = State.CLOSED
        self._events.append(Disconnect(f"protocol violation: {err}", err))

    def _client_flags(self, pos: int) -> int | None:
        if self._avail(pos) < w.CLIENT_FLAGS.size:
            return None
        (cflags,) = w.CLIENT_FLAGS.packer.unpack_from(self._in, pos)
        known = w.NBD_FLAG_C_FIXED_NEWSTYLE | w.NBD_FLAG_C_NO_ZEROES
        if cflags & ~known:
            # "the server MUST drop the TCP connection if the client sets an unknown flag"
            self._violation("client flags", f"unknown client flags {cflags:#x}")
        else:
            self.no_zeroes = bool(cflags & w.NBD_FLAG_C_NO_ZEROES)
            self.state = State.OPTIONS
        return w.CLIENT_FLAGS.size

    # --- option haggling --------------------------------------------------------------------

    def _option_step(self, pos: int) -> int | None:
        if self._option is None:
            if self._avail(pos) < w.NEW_OPTION.size:
                return None
            magic, option, length = w.NEW_OPTION.packer.unpack_from(self._in, pos)
            if magic != w.IHAVEOPT:
                self._violation("option magic", f"{magic:#x} is not IHAVEOPT")
                return w.NEW_OPTION.size
            if length > MAX_OPTION_DATA:
                if option == w.NBD_OPT_EXPORT_NAME:
                    self._violation("NBD_OPT_EXPORT_NAME", f"{length}-byte export name")
                    return w.NEW_OPTION.size
                self._draining = _Draining(
                    length,
                    lambda: self._option_error(
                        option, w.NBD_REP_ERR_TOO_BIG, "optlen", f"{length} bytes of option data"
                    ),
                )
                return w.NEW_OPTION.size
            self._option = _PendingOption(option, length)
            return w.NEW_OPTION.size
        opt = self._option
        if self._avail(pos) < opt.length:
            return None
        data = bytes(self._in[pos : pos + opt.length])
        self._option = None
        self._handle_option(opt.option, data)
        return opt.length

    def _handle_option(self, option: int, data: bytes) -> None:
        if self.shutting_down and option != w.NBD_OPT_ABORT:
            self._option_error(option, w.NBD_REP_ERR_SHUTDOWN, "option", "server shutting down")
            return
        handler = _OPTION_HANDLERS.get(option)
        if handler is None:
            name = w.NBD_OPT_NAMES.get(option, f"option {option}")
            self._option_error(option, w.NBD_REP_ERR_UNSUP, "option", f"{name} is not supported")
            return
        handler(self, option, data)

    def _option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out.append(
            w.FIXED_NEW_OPTION_REPLY.pack(
                magic=w.NBD_REP_MAGIC, option=option, reply=reply, replylen=len(data)
            )
        )
        if data:
            self._out.append(data)

    def _option_error(self, option: int, reply: int, fld: str, message: str) -> None:
        err = NbdError(Fault.REMOTE, reply, fld, message)
        self._option_reply(option, reply, message.encode()[: w.NBD_MAX_STRING])
        self._events.append(OptionRejected(option, err))

    def _lookup(self, name: str) -> Export | None:
        if name in self.exports:
            return self.exports[name]
        if name == "" and self.default_export is not None:
            return self.exports.get(self.default_export)
        return None

    def _opt_export_name(self, option: int, data: bytes) -> None:
        try:
            name = data.decode()
        except UnicodeDecodeError:
            name = None
        export = None if name is None else self._lookup(name)
        if export is None:
            # "If the chosen export does not exist ... the server MUST terminate the session."
            self._violation("NBD_OPT_EXPORT_NAME", f"no export named {data[:64]!r}")
            return
        self._out.append(
            w.NEW_HANDSHAKE_FINISH.pack(exportsize=export.info.size, eflags=export.transmission_flags)
        )
        if not self.no_zeroes:
            self._out.append(bytes(w.NBD_EXPORT_NAME_ZEROES))
        self._enter_transmission(export, option)

    def _opt_abort(self, option: int, data: bytes) -> None:
        # "The server MUST reply with NBD_REP_ACK"; data "SHOULD" be ignored.
        self._option_reply(option, w.NBD_REP_ACK)
        self.state = State.CLOSED
        self._events.append(Disconnect("client sent NBD_OPT_ABORT"))

    def _opt_list(self, option: int, data: bytes) -> None:
        if data:
            self._option_error(option, w.NBD_REP_ERR_INVALID, "optlen", "NBD_OPT_LIST carries no data")
            return
        for export in self.exports.values():
            name = export.name.encode()
            self._option_reply(
                option,
                w.NBD_REP_SERVER,
                w.REP_SERVER_NAMELEN.pack(namelen=len(name)) + name + export.description.encode(),
            )
        self._option_reply(option, w.NBD_REP_ACK)

    def _opt_info_or_go(self, option: int, data: bytes) -> None:
        parsed = _parse_info_request(data)
        if isinstance(parsed, str):
            self._option_error(option, w.NBD_REP_ERR_INVALID, "option data", parsed)
            return
        raw_name, requests = parsed
        try:
            name = raw_name.decode()
        except UnicodeDecodeError:
            self._option_error(option, w.NBD_REP_ERR_INVALID, "export name", "not UTF-8")
            return
        export = self._lookup(name)
        if export is None:
            self._option_error(option, w.NBD_REP_ERR_UNKNOWN, "export name", f"no export {name!r}")
            return
        info = export.info
        if option == w.NBD_OPT_GO and info.min_block > 1 and w.NBD_INFO_BLOCK_SIZE not in requests:
            # Exports that need aligned requests only go to clients that promise alignment.
            self._option_error(
                option,
                w.NBD_REP_ERR_BLOCK_SIZE_REQD,
                "info requests",
                f"export needs {info.min_block}-byte alignment: ask for NBD_INFO_BLOCK_SIZE",
            )
            return
        self._option_reply(
            option,
            w.NBD_REP_INFO,
            w.INFO_EXPORT.pack(
                info=w.NBD_INFO_EXPORT, exportsize=info.size, eflags=export.transmission_flags
            ),
        )
        # Block sizes go out whether asked for or not, as the protocol allows.
        self._option_reply(
            option,
            w.NBD_REP_INFO,
            w.INFO_BLOCK_SIZE.pack(
                info=w.NBD_INFO_BLOCK_SIZE,
                minimum=info.min_block,
                preferred=info.preferred_block,
                maximum=info.max_block,
            ),
        )
        if w.NBD_INFO_NAME in requests:
            self._option_reply(
                option, w.NBD_REP_INFO, w.INFO_NAME_OR_DESC.pack(info=w.NBD_INFO_NAME) + export.name.encode()
            )
        if w.NBD_INFO_DESCRIPTION in requests and export.description:
            self._option_reply(
                option,
                w.NBD_REP_INFO,
                w.INFO_NAME_OR_DESC.pack(info=w.NBD_INFO_DESCRIPTION) + export.description.encode(),
            )
        self._option_reply(option, w.NBD_REP_ACK)
        if option == w.NBD_OPT_GO:
            self._enter_transmission(export, option)

    def _enter_transmission(self, export: Export, via: int) -> None:
        self.export = export
        self.state = State.TRANSMISSION
        self._events.append(ExportChosen(export, via))

    # --- transmission ---------------------------------------------------------------------------

    def _transmission_step(self, pos: int) -> int | None:
        if self._write_header is not None:
            cookie, flags, offset, length = self._write_header
            if self._avail(pos) < length:
                return None
            self._write_header = None
            data = bytes(self._in[pos : pos + length])
            self._issue(cookie, w.NBD_CMD_WRITE, flags, offset, length, data)
            return length
        if self._avail(pos) < w.REQUEST.size:
            return None
        magic, flags, cmd, cookie, offset, length = w.REQUEST.packer.unpack_from(self._in, pos)
        if magic != w.NBD_REQUEST_MAGIC:
            self._violation("request magic", f"{magic:#x} is not NBD_REQUEST_MAGIC")
            return w.REQUEST.size
        if cmd == w.NBD_CMD_DISC:
            self._disc_seen = True
            self.state = State.CLOSED
            self._events.append(Disconnect("client sent NBD_CMD_DISC", drain=True))
            return w.REQUEST.size
        error = self._validate(cmd, flags, offset, length)
        if cmd == w.NBD_CMD_WRITE:
            if length > MAX_WRITE_PAYLOAD_DRAINED:
                self._violation("length", f"{length}-byte write payload")
                return w.REQUEST.size
            if error is not None:
                # Keep in step: stream the payload past, then answer.
                self._draining = _Draining(length, lambda: self._reject(cookie, cmd, error))
            else:
                self._write_header = (cookie, flags, offset, length)
            return w.REQUEST.size
        if error is not None:
            self._reject(cookie, cmd, error)
        else:
            self._issue(cookie, cmd, flags, offset, length, b"")
        return w.REQUEST.size

    # T:730 Copy once, validate, then act
    # A request is unpacked once from the 28 header bytes into locals; nothing is read
    # from the buffer again.  `_validate` checks it in the protocol's order: an unknown or
    # unadvertised command or flag is EINVAL, a write to a read-only export EPERM, a read or
    # write above the maximum block size or off the minimum alignment EINVAL, and a range
    # past the end ENOSPC for writes and EINVAL otherwise.  A refused request is answered
    # right here, in band, and reported as `CommandRejected`; only a valid one becomes a
    # `Command` event for the adapter.  A refused write's payload is still consumed —
    # streamed past by `_Draining` without being buffered — so that the next header is
    # read where it really starts.  Only a broken byte stream (bad magic, a payload too
    # large to be anything but an attack) ends the connection.
    # :T
    def _validate(self, cmd: int, flags: int, offset: int, length: int) -> NbdError | None:
        export = self.export
        assert export is not None
        info = export.info

        def bad(wire: int, fld: str, message: str) -> NbdError:
            return NbdError(Fault.REMOTE, wire, fld, message)

        if self.shutting_down:
            return NbdError(Fault.LOCAL, w.NBD_ESHUTDOWN, "server", "shutting down")
        supported = {
            w.NBD_CMD_READ: True,
            w.NBD_CMD_WRITE: True,
            w.NBD_CMD_FLUSH: info.can_flush,
            w.NBD_CMD_TRIM: info.can_trim,
            w.NBD_CMD_WRITE_ZEROES: info.can_write_zeroes,
        }
        name = w.NBD_CMD_NAMES.get(cmd, f"command {cmd}")
        if not supported.get(cmd, False):
            return bad(w.NBD_EINVAL, "type", f"{name} is not supported")
        extra = flags & ~_allowed_flags(cmd, export)
        if extra:
            return bad(w.NBD_EINVAL, "flags", f"{name} does not take flags {extra:#x}")
        if cmd in _WRITES and info.read_only:
            return bad(w.NBD_EPERM, "type", f"{name} on a read-only export")
        if cmd == w.NBD_CMD_FLUSH:
            return None  # offset and length are reserved: ignored
        if cmd in (w.NBD_CMD_READ, w.NBD_CMD_WRITE) and length > info.max_block:
            return bad(w.NBD_EINVAL, "length", f"{length} > maximum block size {info.max_block}")
        if offset % info.min_block or length % info.min_block:
            return bad(w.NBD_EINVAL, "offset", f"not aligned to {info.min_block} bytes")
        if offset + length > info.size:
            wire = w.NBD_ENOSPC if cmd in (w.NBD_CMD_WRITE, w.NBD_CMD_WRITE_ZEROES) else w.NBD_EINVAL
            return bad(wire, "offset", f"{offset}+{length} is past the end ({info.size})")
        return None

    def _reject(self, cookie: int, cmd: int, error: NbdError) -> None:
        self._out.append(
            w.SIMPLE_REPLY.pack(magic=w.NBD_SIMPLE_REPLY_MAGIC, error=error.wire_error, cookie=cookie)
        )
        self._events.append(CommandRejected(cookie, cmd, error))

    def _issue(self, cookie: int, cmd: int, flags: int, offset: int, length: int, data: bytes) -> None:
        tag = self._next_tag
        self._next_tag += 1
        command = Command(tag, cookie, cmd, flags, offset, length, data)
        self._in_flight[tag] = command
        self._events.append(command)


def _parse_info_request(data: bytes) -> tuple[bytes, frozenset[int]] | str:
    """NBD_OPT_INFO/GO data: u32 name length, name, u16 count, count u16 info types."""
    if len(data) < w.OPT_GO_NAMELEN.size + w.OPT_GO_NRINFOS.size:
        return f"{len(data)} bytes is too short"
    (namelen,) = w.OPT_GO_NAMELEN.packer.unpack_from(data, 0)
    if namelen > w.NBD_MAX_STRING or 4 + namelen + 2 > len(data):
        return f"name length {namelen} does not fit"
    name = data[4 : 4 + namelen]
    (count,) = w.OPT_GO_NRINFOS.packer.unpack_from(data, 4 + namelen)
    rest = data[4 + namelen + 2 :]
    if len(rest) != 2 * count:
        return f"{count} info requests in {len(rest)} bytes"
    requests = frozenset(int.from_bytes(rest[i : i + 2], "big") for i in range(0, len(rest), 2))
    return name, requests


_OPTION_HANDLERS: dict[int, Callable[[NbdServerConnection, int, bytes], None]] = {
    w.NBD_OPT_EXPORT_NAME: NbdServerConnection._opt_export_name,
    w.NBD_OPT_ABORT: NbdServerConnection._opt_abort,
    w.NBD_OPT_LIST: NbdServerConnection._opt_list,
    w.NBD_OPT_INFO: NbdServerConnection._opt_info_or_go,
    w.NBD_OPT_GO: NbdServerConnection._opt_info_or_go,
}
