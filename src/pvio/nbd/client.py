"""The NBD client protocol, sans-IO; `pvio.nbd.client_asyncio.NbdClient` runs it.

Theory of operation
-------------------
`NbdClientConnection` is the client's side of one connection: fixed newstyle handshake
with NO_ZEROES, then NBD_OPT_GO for one export asking for NBD_INFO_BLOCK_SIZE (so the
client promises, and keeps, the server's alignment), falling back to NBD_OPT_EXPORT_NAME
only if the server answers NBD_REP_ERR_UNSUP; or NBD_OPT_LIST to enumerate exports.
In transmission `request()` builds a request with a fresh cookie and remembers it;
`receive_data()` parses simple replies, pairs them with their requests by cookie (any
order) and returns `NbdReply` events, with the data for a successful read.

The server is not trusted either: a reply with an unknown cookie, a bad magic, an
unasked-for structured reply, or option replies that do not fit the option asked mark
the connection broken (`ServerProtocolError`), and every pending request fails.  Requests
are checked locally against the export's size, flags and block sizes before they are
sent (`ClientRequestError`, a local fault) so that a misbehaving caller cannot make pvio
break the protocol.

`NbdClient` (in `pvio.nbd.client_asyncio`) runs the core over an asyncio stream (UNIX socket or TCP).  Any number of
coroutines may call `read`/`write`/`flush`/`trim` at once: requests are pipelined on the
one connection and complete as their replies arrive.  `NbdClient` implements
`pvio.storage.backend.BlockBackend`, so a remote export (qemu-nbd serving a qcow2, or a
server on another machine) can be the storage behind a pvio disk or behind another
export.  This is the storage path pvio's blkback uses for anything that is not a raw file.

Not supported: TLS, structured replies, block status, extended headers, multiple
connections (each `NbdClient` is one connection; open several for multi-conn).
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from pvio.nbd import wire as w
from pvio.storage.backend import BackendInfo


class ServerProtocolError(Exception):
    """The server broke the protocol: the connection is unusable (remote fault)."""


class ClientRequestError(ValueError):
    """The caller asked for something the export does not allow (local fault)."""


class NbdOptionError(Exception):
    """The server refused an option (for example NBD_REP_ERR_UNKNOWN for NBD_OPT_GO)."""

    def __init__(self, option: int, reply: int, message: str) -> None:
        self.option = option
        self.reply = reply
        self.message = message
        opt = w.NBD_OPT_NAMES.get(option, str(option))
        rep = w.NBD_REP_NAMES.get(reply, hex(reply))
        super().__init__(f"{opt}: {rep} {message}".rstrip())


class NbdCommandError(OSError):
    """A command failed on the server: `errno` is the NBD error (EIO, ENOSPC, EPERM...)."""


@dataclass(frozen=True)
class ExportDetails:
    """What NBD_OPT_GO (or NBD_OPT_EXPORT_NAME) told us about the export."""

    name: str
    size: int
    flags: int
    min_block: int = 1
    preferred_block: int = 4096
    max_block: int = w.NBD_MAX_PAYLOAD_PORTABLE
    description: str = ""

    def has(self, flag: int) -> bool:
        return bool(self.flags & flag)

    def backend_info(self) -> BackendInfo:
        """The export seen as a pvio backend (for serving or for blkback)."""
        read_only = self.has(w.NBD_FLAG_READ_ONLY)
        return BackendInfo(
            size=self.size,
            read_only=read_only,
            min_block=self.min_block,
            preferred_block=max(self.preferred_block, self.min_block, 512),
            max_block=self.max_block,
            can_flush=self.has(w.NBD_FLAG_SEND_FLUSH),
            can_fua=self.has(w.NBD_FLAG_SEND_FUA),
            can_trim=self.has(w.NBD_FLAG_SEND_TRIM) and not read_only,
            can_write_zeroes=self.has(w.NBD_FLAG_SEND_WRITE_ZEROES) and not read_only,
            can_multi_conn=self.has(w.NBD_FLAG_CAN_MULTI_CONN),
        )


@dataclass(frozen=True)
class Ready:
    """The handshake is done; transmission may start."""

    export: ExportDetails


@dataclass(frozen=True)
class ExportList:
    """The answer to NBD_OPT_LIST: (name, description) pairs."""

    exports: tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class NbdReply:
    cookie: int
    error: int
    data: bytes = b""


ClientEvent = Ready | ExportList | NbdReply


class Phase(enum.Enum):
    GREETING = "greeting"
    OPTION_REPLY = "option reply"
    EXPORT_NAME_REPLY = "export name reply"
    TRANSMISSION = "transmission"
    DONE = "done"  # list finished, or disconnected


@dataclass
class _Pending:
    type: int
    length: int


# T:770 The client's side
# pvio also speaks NBD as a client, for storage it does not hold itself: a qcow2 image
# behind qemu-nbd, or a disk on another machine.  `NbdClientConnection` mirrors the server:
# it answers the greeting with FIXED_NEWSTYLE and NO_ZEROES, sends NBD_OPT_GO asking for
# NBD_INFO_BLOCK_SIZE (and then keeps the promise: every request is checked against size,
# alignment, maximum and flags before it is sent), and falls back to NBD_OPT_EXPORT_NAME
# only for servers that answer NBD_REP_ERR_UNSUP.  Replies are matched to requests by
# cookie; a reply for no request, a bad magic or an unasked-for structured reply marks the
# server broken and fails everything pending.
# :T


@dataclass
class NbdClientConnection:
    """The client side of one NBD connection (see the module docstring)."""

    export_name: str = ""
    #: Instead of opening an export, list the server's exports (then the connection is done).
    list_exports: bool = False
    phase: Phase = field(default=Phase.GREETING, init=False)
    export: ExportDetails | None = field(default=None, init=False)

    def __post_init__(self) -> None:
        self._in = bytearray()
        self._out: list[bytes] = []
        self._option = 0
        self._info: dict[str, int] = {}
        self._listed: list[tuple[str, str]] = []
        self._server_no_zeroes = False
        self._pending: dict[int, _Pending] = {}
        self._read_reply: tuple[int, int] | None = None  # cookie, bytes of data awaited
        self._next_cookie = 1
        self.broken: ServerProtocolError | None = None

    # --- the adapter's interface -------------------------------------------------------------

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    @property
    def in_flight(self) -> int:
        return len(self._pending)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[ClientEvent]:
        """Feed bytes from the server.  Raises `ServerProtocolError` (and stays broken) on a
        violation, `NbdOptionError` if the server refuses the export."""
        if self.broken is not None:
            raise self.broken
        self._in += data
        events: list[ClientEvent] = []
        pos = 0
        try:
            while self.phase is not Phase.DONE:
                used = self._step(pos, events)
                if used is None:
                    break
                pos += used
        except ServerProtocolError as exc:
            self.broken = exc
            self.phase = Phase.DONE
            raise
        finally:
            del self._in[:pos]
        return events

    def request(
        self, type: int, offset: int = 0, length: int = 0, data: bytes | memoryview = b"", flags: int = 0
    ) -> tuple[int, list[bytes | memoryview]]:
        """Queue a command; returns its cookie and the bytes to send (header, payload)."""
        if self.phase is not Phase.TRANSMISSION or self.export is None:
            raise ClientRequestError(f"not in transmission ({self.phase.value})")
        self._check(type, offset, length, data, flags)
        cookie = self._next_cookie
        self._next_cookie = (self._next_cookie + 1) & 0xFFFFFFFFFFFFFFFF or 1
        # Field order of `nbd_request`: magic, flags, type, cookie, offset, count.
        header = w.REQUEST.packer.pack(w.NBD_REQUEST_MAGIC, flags, type, cookie, offset, length)
        if type != w.NBD_CMD_DISC:
            self._pending[cookie] = _Pending(type, length)
        else:
            self.phase = Phase.DONE
        return cookie, ([header, data] if type == w.NBD_CMD_WRITE and length else [header])

    def disconnect(self) -> bytes:
        """NBD_CMD_DISC in transmission, NBD_OPT_ABORT during the handshake."""
        if self.phase is Phase.TRANSMISSION:
            _, parts = self.request(w.NBD_CMD_DISC)
            return b"".join(bytes(p) for p in parts)
        self.phase = Phase.DONE
        return w.NEW_OPTION.pack(version=w.IHAVEOPT, option=w.NBD_OPT_ABORT, optlen=0)

    # --- local checks ---------------------------------------------------------------------------

    def _check(self, type: int, offset: int, length: int, data: bytes | memoryview, flags: int) -> None:
        exp = self.export
        assert exp is not None
        need = {
            w.NBD_CMD_FLUSH: w.NBD_FLAG_SEND_FLUSH,
            w.NBD_CMD_TRIM: w.NBD_FLAG_SEND_TRIM,
            w.NBD_CMD_WRITE_ZEROES: w.NBD_FLAG_SEND_WRITE_ZEROES,
        }.get(type)
        if type not in (w.NBD_CMD_READ, w.NBD_CMD_WRITE, w.NBD_CMD_DISC) and need is None:
            raise ClientRequestError(f"command {type} is not supported by this client")
        if need is not None and not exp.has(need):
            raise ClientRequestError(f"{w.NBD_CMD_NAMES[type]}: the export does not support it")
        if flags & w.NBD_CMD_FLAG_FUA and not exp.has(w.NBD_FLAG_SEND_FUA):
            raise ClientRequestError("FUA: the export does not support it")
        if type in (w.NBD_CMD_WRITE, w.NBD_CMD_TRIM, w.NBD_CMD_WRITE_ZEROES) and exp.has(w.NBD_FLAG_READ_ONLY):
            raise ClientRequestError(f"{w.NBD_CMD_NAMES[type]}: the export is read-only")
        if type == w.NBD_CMD_WRITE and len(data) != length:
            raise ClientRequestError(f"write of {len(data)} bytes declared as {length}")
        if type in (w.NBD_CMD_READ, w.NBD_CMD_WRITE, w.NBD_CMD_TRIM, w.NBD_CMD_WRITE_ZEROES):
            if offset < 0 or length < 0 or offset + length > exp.size:
                raise ClientRequestError(f"{offset}+{length} is outside the export ({exp.size})")
            if offset % exp.min_block or length % exp.min_block:
                raise ClientRequestError(f"{offset}+{length} is not aligned to {exp.min_block}")
            if type in (w.NBD_CMD_READ, w.NBD_CMD_WRITE) and length > exp.max_block:
                raise ClientRequestError(f"{length} bytes > the export's maximum {exp.max_block}")

    # --- parsing --------------------------------------------------------------------------------

    def _avail(self, pos: int) -> int:
        return len(self._in) - pos

    def _step(self, pos: int, events: list[ClientEvent]) -> int | None:
        if self.phase is Phase.GREETING:
            return self._greeting(pos)
        if self.phase is Phase.OPTION_REPLY:
            return self._option_reply(pos, events)
        if self.phase is Phase.EXPORT_NAME_REPLY:
            return self._export_name_reply(pos, events)
        return self._reply(pos, events)

    def _send_option(self, option: int, data: bytes = b"") -> None:
        self._option = option
        self._out.append(w.NEW_OPTION.pack(version=w.IHAVEOPT, option=option, optlen=len(data)) + data)
        self.phase = Phase.OPTION_REPLY

    def _greeting(self, pos: int) -> int | None:
        if self._avail(pos) < w.NEW_HANDSHAKE.size:
            return None
        hs = w.NEW_HANDSHAKE.unpack(self._in, pos)
        if hs["nbdmagic"] != w.NBDMAGIC:
            raise ServerProtocolError(f"greeting magic {hs['nbdmagic']:#x} is not NBDMAGIC")
        if hs["version"] != w.IHAVEOPT:
            raise ServerProtocolError("not a newstyle server (oldstyle is not supported)")
        gflags = hs["gflags"]
        if not gflags & w.NBD_FLAG_FIXED_NEWSTYLE:
            raise ServerProtocolError("the server does not speak fixed newstyle")
        cflags = w.NBD_FLAG_C_FIXED_NEWSTYLE
        if gflags & w.NBD_FLAG_NO_ZEROES:
            cflags |= w.NBD_FLAG_C_NO_ZEROES
            self._server_no_zeroes = True
        self._out.append(w.CLIENT_FLAGS.pack(cflags=cflags))
        if self.list_exports:
            self._send_option(w.NBD_OPT_LIST)
        else:
            self._send_option(w.NBD_OPT_GO, self._go_data())
        return w.NEW_HANDSHAKE.size

    def _go_data(self) -> bytes:
        name = self.export_name.encode()
        infos = (w.NBD_INFO_BLOCK_SIZE, w.NBD_INFO_DESCRIPTION)
        return (
            w.OPT_GO_NAMELEN.pack(namelen=len(name))
            + name
            + w.OPT_GO_NRINFOS.pack(nrinfos=len(infos))
            + b"".join(i.to_bytes(2, "big") for i in infos)
        )

    def _option_reply(self, pos: int, events: list[ClientEvent]) -> int | None:
        hsize = w.FIXED_NEW_OPTION_REPLY.size
        if self._avail(pos) < hsize:
            return None
        magic, option, reply, length = (
            int(v) for v in w.FIXED_NEW_OPTION_REPLY.packer.unpack_from(self._in, pos)
        )
        if magic != w.NBD_REP_MAGIC:
            raise ServerProtocolError(f"option reply magic {magic:#x}")
        if option != self._option:
            raise ServerProtocolError(f"reply for option {option}, asked {self._option}")
        if length > 64 * 1024:
            raise ServerProtocolError(f"{length}-byte option reply")
        if self._avail(pos) < hsize + length:
            return None
        data = bytes(self._in[pos + hsize : pos + hsize + length])
        if reply & w.NBD_REP_FLAG_ERROR:
            if option == w.NBD_OPT_GO and reply == w.NBD_REP_ERR_UNSUP:
                # An old server: fall back to NBD_OPT_EXPORT_NAME (no errors, no block sizes).
                self._out.append(
                    w.NEW_OPTION.pack(
                        version=w.IHAVEOPT, option=w.NBD_OPT_EXPORT_NAME, optlen=len(self.export_name.encode())
                    )
                    + self.export_name.encode()
                )
                self.phase = Phase.EXPORT_NAME_REPLY
                return hsize + length
            self.phase = Phase.DONE
            self._out.append(w.NEW_OPTION.pack(version=w.IHAVEOPT, option=w.NBD_OPT_ABORT, optlen=0))
            raise NbdOptionError(option, reply, data.decode(errors="replace"))
        if reply == w.NBD_REP_SERVER and option == w.NBD_OPT_LIST:
            if length < 4:
                raise ServerProtocolError("NBD_REP_SERVER shorter than its name length")
            (namelen,) = w.REP_SERVER_NAMELEN.packer.unpack_from(data, 0)
            if namelen > length - 4:
                raise ServerProtocolError("NBD_REP_SERVER name overruns the reply")
            self._listed.append(
                (data[4 : 4 + namelen].decode(errors="replace"), data[4 + namelen :].decode(errors="replace"))
            )
        elif reply == w.NBD_REP_INFO and option == w.NBD_OPT_GO:
            self._parse_info(data)
        elif reply == w.NBD_REP_ACK:
            if option == w.NBD_OPT_LIST:
                self.phase = Phase.DONE
                self._out.append(w.NEW_OPTION.pack(version=w.IHAVEOPT, option=w.NBD_OPT_ABORT, optlen=0))
                events.append(ExportList(tuple(self._listed)))
            else:
                if "size" not in self._info:
                    raise ServerProtocolError("NBD_OPT_GO acknowledged without NBD_INFO_EXPORT")
                self._ready(events)
        else:
            raise ServerProtocolError(f"unexpected reply {reply} to option {option}")
        return hsize + length

    def _parse_info(self, data: bytes) -> None:
        if len(data) < 2:
            raise ServerProtocolError("NBD_REP_INFO without a type")
        info = int.from_bytes(data[:2], "big")
        if info == w.NBD_INFO_EXPORT:
            if len(data) != w.INFO_EXPORT.size:
                raise ServerProtocolError(f"NBD_INFO_EXPORT of {len(data)} bytes")
            fields = w.INFO_EXPORT.unpack(data)
            self._info["size"] = fields["exportsize"]
            self._info["flags"] = fields["eflags"]
        elif info == w.NBD_INFO_BLOCK_SIZE:
            if len(data) != w.INFO_BLOCK_SIZE.size:
                raise ServerProtocolError(f"NBD_INFO_BLOCK_SIZE of {len(data)} bytes")
            fields = w.INFO_BLOCK_SIZE.unpack(data)
            lo, pref, hi = fields["minimum"], fields["preferred"], fields["maximum"]
            # The NBD_INFO_BLOCK_SIZE rules: a server breaking them is not to be trusted.
            if (
                lo < 1
                or lo & (lo - 1)
                or lo > 1 << 16
                or pref < max(lo, 512)
                or pref & (pref - 1)
                or (hi != 0xFFFFFFFF and (hi % lo or hi < min(pref, self._info.get("size", pref))))
            ):
                raise ServerProtocolError(f"impossible block sizes {lo}/{pref}/{hi}")
            self._info.update(min_block=lo, preferred_block=pref, max_block=hi)
        elif info == w.NBD_INFO_DESCRIPTION:
            self._description = data[2:].decode(errors="replace")
        # Other info types (NBD_INFO_NAME, future ones) are ignored, as the protocol says.

    def _ready(self, events: list[ClientEvent]) -> None:
        if self._info["size"] >= 1 << 63:  # what no file, device or lseek(2) can address
            raise ServerProtocolError(f"export size {self._info['size']} is not addressable")
        flags = self._info["flags"]
        if not flags & w.NBD_FLAG_HAS_FLAGS:
            flags = w.NBD_FLAG_HAS_FLAGS  # no flags: nothing beyond read and write
        max_block = self._info.get("max_block", w.NBD_MAX_PAYLOAD_PORTABLE)
        self.export = ExportDetails(
            name=self.export_name,
            size=self._info["size"],
            flags=flags,
            min_block=self._info.get("min_block", 1),
            preferred_block=min(self._info.get("preferred_block", 4096), w.NBD_MAX_PAYLOAD_PORTABLE),
            max_block=min(max_block, w.NBD_MAX_PAYLOAD_PORTABLE),
            description=getattr(self, "_description", ""),
        )
        self.phase = Phase.TRANSMISSION
        events.append(Ready(self.export))

    def _export_name_reply(self, pos: int, events: list[ClientEvent]) -> int | None:
        need = w.NEW_HANDSHAKE_FINISH.size + (0 if self._server_no_zeroes else w.NBD_EXPORT_NAME_ZEROES)
        if self._avail(pos) < need:
            return None
        fields = w.NEW_HANDSHAKE_FINISH.unpack(self._in, pos)
        self._info["size"] = fields["exportsize"]
        self._info["flags"] = fields["eflags"]
        self._ready(events)
        return need

    def _reply(self, pos: int, events: list[ClientEvent]) -> int | None:
        if self._read_reply is not None:
            cookie, length = self._read_reply
            if self._avail(pos) < length:
                return None
            self._read_reply = None
            events.append(NbdReply(cookie, 0, bytes(self._in[pos : pos + length])))
            return length
        if self._avail(pos) < 4:
            return None
        magic = int.from_bytes(self._in[pos : pos + 4], "big")
        if magic == w.NBD_STRUCTURED_REPLY_MAGIC:
            raise ServerProtocolError("structured reply, which was not negotiated")
        if magic != w.NBD_SIMPLE_REPLY_MAGIC:
            raise ServerProtocolError(f"reply magic {magic:#x}")
        if self._avail(pos) < w.SIMPLE_REPLY.size:
            return None
        _, error, cookie = w.SIMPLE_REPLY.packer.unpack_from(self._in, pos)
        pending = self._pending.pop(cookie, None)
        if pending is None:
            raise ServerProtocolError(f"reply for unknown cookie {cookie}")
        if pending.type == w.NBD_CMD_READ and error == 0 and pending.length:
            self._read_reply = (cookie, pending.length)
        else:
            events.append(NbdReply(cookie, error))
        return w.SIMPLE_REPLY.size
