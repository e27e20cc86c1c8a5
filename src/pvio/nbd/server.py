"""The NBD server protocol, sans-IO: feed it bytes, get events; answer events, get bytes.

Theory of operation
-------------------
`NbdServerConnection` is one client connection's protocol state and nothing else.  The
adapter (`pvio.nbd.server_asyncio`) writes `data_to_send()` to the socket, passes what it
reads to `receive_data()` (or, while a write's payload is due, reads into
`payload_view()` and calls `payload_received()`), and acts on the events that come back:

* `ExportChosen` — the handshake is over (NBD_OPT_GO or NBD_OPT_EXPORT_NAME); commands
  for that export follow.
* `Command` — a validated request (READ, WRITE with its payload, FLUSH, TRIM,
  WRITE_ZEROES) to run on the backend, then answer with `reply()`, in any order.
* `CommandRejected` — a request that failed validation; its error reply is already
  queued.  Reported for logs and statistics only.
* `StartTls` — NBD_OPT_STARTTLS was acknowledged: send what is queued, run the TLS
  handshake on the socket, then call `tls_started()`.
* `Disconnect` — the client asked to leave (NBD_OPT_ABORT, NBD_CMD_DISC) or broke the
  protocol: send what is queued, wait for in-flight commands if `drain`, then close.

The handshake is a table (`_OPTION_HANDLERS`): each option code maps to a method that
answers it; anything not in the table gets NBD_REP_ERR_UNSUP and haggling continues, as
fixed newstyle requires.  Served: NBD_OPT_EXPORT_NAME, NBD_OPT_ABORT, NBD_OPT_LIST,
NBD_OPT_INFO, NBD_OPT_GO, and NBD_OPT_STARTTLS when `tls_required` (the protocol's
FORCEDTLS mode: until TLS is up every other option but ABORT is answered
NBD_REP_ERR_TLS_REQD, and NBD_OPT_EXPORT_NAME, which cannot be refused, ends the
connection).  Not served (ERR_UNSUP): STRUCTURED_REPLY and the meta-context options (so no
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

Nothing a client sends makes the core hold more than its bounds, and they are enforced
while parsing, request by request: a request header that would take the connection past
`max_in_flight` commands or `max_in_flight_bytes` of read and write data is left in the
buffer, unparsed, until a command is answered; while `output_blocked` (the client is not
reading what is sent: the adapter's transport holds more than its high-water mark) nothing
is parsed at all, so neither commands nor replies to rejected requests or options pile up.
`reading_wanted` then says False and the adapter stops reading the socket: what the core
buffers is at most one received chunk plus the request being assembled.  Replies written
but not yet sent are bounded the same way: a command is only handed out while the unsent
output is under the high-water mark, and its data was counted in flight until its reply
was handed over, so in flight plus unsent never exceeds `max_in_flight_bytes` plus that
mark.  (Counting the unsent bytes themselves against `max_in_flight_bytes` was tried and
rejected: the transport does not say when its buffer shrinks short of `resume_writing`,
so a connection would wait for its whole pipeline to drain; 1 MiB reads lost half their
throughput.)

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
from pvio.nbd import requests as rq
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
    StartTls,
)
from pvio.nbd.requests import data_bytes, info_replies, parse_info_request, validate_request
from pvio.storage.buffers import BufferPool
from pvio.storage.lent import Lent

ReplyData = bytes | bytearray | memoryview | Lent

#: Option data larger than this is streamed past and answered NBD_REP_ERR_TOO_BIG: the
#: largest legal option (NBD_OPT_GO: a 4096-byte name and a few info requests) is far less.
MAX_OPTION_DATA = 16 * 1024
#: A write payload larger than this ends the connection (the protocol allows treating
#: such a payload as a denial-of-service attack); up to it, an oversized write is drained
#: and answered EINVAL.
MAX_WRITE_PAYLOAD_DRAINED = w.NBD_MAX_PAYLOAD_PORTABLE * 2
#: Commands one connection may have handed out and not yet answered.
DEFAULT_MAX_IN_FLIGHT = 64
#: Bytes of read and write data one connection may have in flight: a READ from its header
#: until its reply is handed to the adapter, a WRITE from its header until it is answered.
DEFAULT_MAX_IN_FLIGHT_BYTES = 64 << 20


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


@dataclass
class _PendingOption:
    option: int
    length: int


@dataclass
class _Draining:
    """A payload being streamed past: `remaining` bytes still to drop."""

    remaining: int
    then: Callable[[], None] | None = None


class _Payload:
    """A write's payload being received into `buf` (not a dataclass: mypyc's cannot hold
    a bare `memoryview` field)."""

    def __init__(self, cookie: int, flags: int, offset: int, buf: memoryview) -> None:
        self.cookie, self.flags, self.offset, self.buf = cookie, flags, offset, buf
        self.filled = 0


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
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_in_flight_bytes: int = DEFAULT_MAX_IN_FLIGHT_BYTES
    #: FORCEDTLS: no option but NBD_OPT_STARTTLS and NBD_OPT_ABORT before TLS is up.
    tls_required: bool = False
    #: Asked as a client enters an export: None admits it, a message refuses it
    #: (NBD_REP_ERR_POLICY to NBD_OPT_GO; NBD_OPT_EXPORT_NAME, which cannot fail, disconnects).
    admit: Callable[[Export], str | None] | None = None
    #: Where payloads of `MIN_SIZE` or more are received, each given back at its reply
    buffers: BufferPool | None = None
    # Set by __post_init__: compiled (pvio.compiled), an init=False default stays unset.
    state: State = field(init=False)
    export: Export | None = field(init=False)
    no_zeroes: bool = field(init=False)
    shutting_down: bool = field(init=False)
    #: Set by the adapter while the client is not reading what is sent: nothing is parsed.
    output_blocked: bool = field(init=False)

    def __post_init__(self) -> None:
        self.state, self.export = State.CLIENT_FLAGS, None
        self.no_zeroes = self.shutting_down = self.output_blocked = False
        self._in = bytearray()
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._option: _PendingOption | None = None
        self._payload: _Payload | None = None
        self._draining: _Draining | None = None
        self._next_tag = 0
        self._in_flight: dict[int, Command] = {}
        self._bytes_in_flight = 0  # read and write data of `_in_flight` and a write being received
        self._held = False  # the last parse stopped at a bound, not for want of bytes
        self._starttls_pending = False
        self._tls_active = False
        self._disc_seen = False
        self._out.append(w.NEW_HANDSHAKE.pack(
            nbdmagic=w.NBDMAGIC, version=w.IHAVEOPT, gflags=w.NBD_FLAG_FIXED_NEWSTYLE | w.NBD_FLAG_NO_ZEROES))

    # --- the adapter's interface ----------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued for the client since the last call."""
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    @property
    def bytes_in_flight(self) -> int:
        return self._bytes_in_flight

    @property
    def buffered(self) -> int:
        """Bytes received and not yet parsed."""
        return len(self._in)

    @property
    def tls_active(self) -> bool:
        return self._tls_active

    @property
    def reading_wanted(self) -> bool:
        """False while a bound (or a TLS handshake) holds parsing: stop reading the socket,
        and feed `receive_data(b"")` when a command is answered or the output unblocks."""
        return self._parsing() and not (self._held or self.output_blocked or self._starttls_pending)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed bytes read from the client (b"": go on parsing what is buffered); returns
        the events they complete.  Parsing stops at the bounds; the rest waits, buffered."""
        if self.state is State.CLOSED or self._disc_seen:
            return []  # whatever follows a DISC or a violation is ignored
        self._in += data
        pos = 0
        self._held = False
        while self._parsing():
            if self.output_blocked or self._starttls_pending:
                break
            used = self._step(pos)
            if used is None:
                break
            pos += used
        del self._in[:pos]
        if self._starttls_pending and self._in:
            # The client must wait for the ACK before its TLS handshake: these bytes came
            # before it, in plain text, and TLS would never see them.
            self._violation("NBD_OPT_STARTTLS", f"{len(self._in)} bytes sent before the TLS handshake")
        events, self._events = self._events, []
        return events

    def payload_view(self) -> memoryview | None:
        """The unfilled end of a write's payload buffer if the next bytes all belong there,
        for the adapter to read into (then `payload_received`); else None: `receive_data`."""
        p = self._payload
        if p is None or self._in or not self.reading_wanted:
            return None
        return p.buf[p.filled :]

    def payload_received(self, n: int) -> list[Event]:
        """`n` bytes were read into the `payload_view()`; returns the events they complete."""
        p = self._payload
        if p is None or self._in or n > len(p.buf) - p.filled:
            raise LocalProtocolError(f"payload_received({n}) without a payload_view of that size")
        p.filled += n
        return self.receive_data(b"")

    def tls_started(self) -> None:
        """The TLS handshake that followed `StartTls` is done: haggling goes on over TLS."""
        if not self._starttls_pending:
            raise LocalProtocolError("tls_started() without an acknowledged NBD_OPT_STARTTLS")
        self._starttls_pending = False
        self._tls_active = True

    def reply(self, command: Command, error: int = 0, data: ReplyData = b"") -> list[ReplyData]:
        """The simple reply to `command` (header, then a successful read's data, maybe
        `Lent`).  Return the pieces rather than one joined buffer: the adapter gathers
        them with other replies and sends them together, lent data from where it lies.
        """
        if self._in_flight.pop(command.tag, None) is None:
            raise LocalProtocolError(f"reply to {command.name} #{command.tag}: not in flight")
        self._bytes_in_flight -= data_bytes(command.type, command.length)
        rq.payload_done(self.buffers, command)
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
            return self._drain(self._draining, pos)
        if self.state is State.CLIENT_FLAGS:
            return self._client_flags(pos)
        if self.state is State.OPTIONS:
            return self._option_step(pos)
        return self._transmission_step(pos)

    def _drain(self, d: _Draining, pos: int) -> int | None:
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
        if self.tls_required and not self._tls_active and option not in (w.NBD_OPT_STARTTLS, w.NBD_OPT_ABORT):
            if option == w.NBD_OPT_EXPORT_NAME:
                # "as this request cannot error, it MUST terminate the session"
                self._violation("NBD_OPT_EXPORT_NAME", "sent before NBD_OPT_STARTTLS; this server requires TLS")
            else:
                self._option_error(
                    option, w.NBD_REP_ERR_TLS_REQD, "option", "this server requires TLS: send NBD_OPT_STARTTLS"
                )
            return
        handler = _OPTION_HANDLERS.get(option)
        if handler is None:
            name = w.NBD_OPT_NAMES.get(option, f"option {option}")
            self._option_error(option, w.NBD_REP_ERR_UNSUP, "option", f"{name} is not supported")
            return
        handler(self, option, data)

    def _option_reply(self, option: int, reply: int, data: bytes = b"") -> None:
        self._out.append(w.FIXED_NEW_OPTION_REPLY.pack(
            magic=w.NBD_REP_MAGIC, option=option, reply=reply, replylen=len(data)))
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
        refusal = self.admit(export) if self.admit is not None else None
        if refusal is not None:
            # Cannot be answered with an error: refused the only way EXPORT_NAME allows.
            self._events.append(OptionRejected(option, NbdError(Fault.LOCAL, 0, "export", refusal)))
            self.state = State.CLOSED
            self._events.append(Disconnect(f"NBD_OPT_EXPORT_NAME refused: {refusal}"))
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
        parsed = parse_info_request(data)
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
        refusal = self.admit(export) if option == w.NBD_OPT_GO and self.admit is not None else None
        if refusal is not None:
            self._option_error(option, w.NBD_REP_ERR_POLICY, "export", refusal)
            return
        for info_data in info_replies(export, requests):
            self._option_reply(option, w.NBD_REP_INFO, info_data)
        self._option_reply(option, w.NBD_REP_ACK)
        if option == w.NBD_OPT_GO:
            self._enter_transmission(export, option)

    def _opt_starttls(self, option: int, data: bytes) -> None:
        if not self.tls_required:
            self._option_error(option, w.NBD_REP_ERR_UNSUP, "option", "no TLS on this socket")
        elif data:
            self._option_error(option, w.NBD_REP_ERR_INVALID, "optlen", "NBD_OPT_STARTTLS carries no data")
        elif self._tls_active:
            self._option_error(option, w.NBD_REP_ERR_INVALID, "option", "TLS is already up")
        else:
            self._option_reply(option, w.NBD_REP_ACK)
            self._starttls_pending = True
            self._events.append(StartTls())

    def _enter_transmission(self, export: Export, via: int) -> None:
        self.export = export
        self.state = State.TRANSMISSION
        self._events.append(ExportChosen(export, via))

    # --- transmission ---------------------------------------------------------------------------

    def _transmission_step(self, pos: int) -> int | None:
        p = self._payload
        if p is not None:
            n = min(len(p.buf) - p.filled, self._avail(pos))
            if n:
                with memoryview(self._in) as view:
                    p.buf[p.filled : p.filled + n] = view[pos : pos + n]
                p.filled += n
            if p.filled < len(p.buf):
                return n or None
            self._payload = None
            self._issue(p.cookie, w.NBD_CMD_WRITE, p.flags, p.offset, len(p.buf), p.buf)
            return n
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
        error = validate_request(self.export, cmd, flags, offset, length, self.shutting_down)
        if error is None:
            cost = data_bytes(cmd, length)
            if not self._room(cost):
                self._held = True
                return None  # stays buffered until a command is answered
            self._bytes_in_flight += cost
        if cmd == w.NBD_CMD_WRITE:
            if length > MAX_WRITE_PAYLOAD_DRAINED:
                self._violation("length", f"{length}-byte write payload")
                return w.REQUEST.size
            if error is not None:
                # Keep in step: stream the payload past, then answer.
                self._draining = _Draining(length, lambda: self._reject(cookie, cmd, error))
            else:
                self._payload = _Payload(cookie, flags, offset, rq.payload_buffer(self.buffers, length))
            return w.REQUEST.size
        if error is not None:
            self._reject(cookie, cmd, error)
        else:
            self._issue(cookie, cmd, flags, offset, length, b"")
        return w.REQUEST.size

    # T:735 Bounded while parsing
    # A valid request is only taken from the buffer if the connection has room for it:
    # fewer than `max_in_flight` commands, and its data (a read's reply or a write's
    # payload) within `max_in_flight_bytes` together with what is already in flight.
    # Otherwise its header stays in the buffer and `reading_wanted` turns False, so the
    # adapter stops reading the socket; the header is parsed again when a command is
    # answered.  One command always fits when none is in flight, so a connection cannot
    # wedge.  While the client is not reading its replies (`output_blocked`), nothing at
    # all is parsed.
    # :T
    def _room(self, cost: int) -> bool:
        if not self._in_flight:
            return True
        return (
            len(self._in_flight) < self.max_in_flight
            and self._bytes_in_flight + cost <= self.max_in_flight_bytes
        )

    def _reject(self, cookie: int, cmd: int, error: NbdError) -> None:
        self._out.append(
            w.SIMPLE_REPLY.pack(magic=w.NBD_SIMPLE_REPLY_MAGIC, error=error.wire_error, cookie=cookie)
        )
        self._events.append(CommandRejected(cookie, cmd, error))

    def _issue(
        self, cookie: int, cmd: int, flags: int, offset: int, length: int, data: bytes | memoryview
    ) -> None:
        tag = self._next_tag
        self._next_tag += 1
        command = Command(tag, cookie, cmd, flags, offset, length, data)
        self._in_flight[tag] = command
        self._events.append(command)


_OPTION_HANDLERS: dict[int, Callable[[NbdServerConnection, int, bytes], None]] = {
    w.NBD_OPT_EXPORT_NAME: NbdServerConnection._opt_export_name,
    w.NBD_OPT_ABORT: NbdServerConnection._opt_abort,
    w.NBD_OPT_LIST: NbdServerConnection._opt_list,
    w.NBD_OPT_INFO: NbdServerConnection._opt_info_or_go,
    w.NBD_OPT_GO: NbdServerConnection._opt_info_or_go,
    w.NBD_OPT_STARTTLS: NbdServerConnection._opt_starttls,
}
