"""What an NBD client asks, checked before anything acts on it: transmission requests
against the export (`validate_request`) and the data of NBD_OPT_INFO/NBD_OPT_GO
(`parse_info_request`), and what the server answers: the NBD_REP_INFO data
(`info_replies`) and the wire error for a backend failure (`nbd_error_for`); where a
write's payload is received (`payload_buffer`, `payload_done`).  Functions of bytes and
numbers, used by `pvio.nbd.server` and its adapter.
"""

from __future__ import annotations

import errno

from pvio.abi.fault import Fault
from pvio.nbd import wire as w
from pvio.nbd.events import Command, Export, NbdError
from pvio.storage.buffers import MIN_SIZE, BufferPool


# Which command flags each command accepts (beyond that: EINVAL), given the export.
def _allowed_flags(cmd: int, export: Export) -> int:
    fua = w.NBD_CMD_FLAG_FUA if export.transmission_flags & w.NBD_FLAG_SEND_FUA else 0
    if cmd == w.NBD_CMD_WRITE or cmd == w.NBD_CMD_TRIM:
        return fua
    if cmd == w.NBD_CMD_WRITE_ZEROES:
        return fua | w.NBD_CMD_FLAG_NO_HOLE
    return 0


_WRITES = frozenset({w.NBD_CMD_WRITE, w.NBD_CMD_TRIM, w.NBD_CMD_WRITE_ZEROES})


# T:730 Copy once, validate, then act
# A request is unpacked once from the 28 header bytes into locals; nothing is read
# from the buffer again.  `validate_request` checks it in the protocol's order: an unknown or
# unadvertised command or flag is EINVAL, a write to a read-only export EPERM, a read or
# write above the maximum block size or off the minimum alignment EINVAL, and a range
# past the end ENOSPC for writes and EINVAL otherwise.  A refused request is answered
# right here, in band, and reported as `CommandRejected`; only a valid one becomes a
# `Command` event for the adapter.  A refused write's payload is still consumed —
# streamed past by the server's `_Draining` without being buffered — so that the next header is
# read where it really starts.  Only a broken byte stream (bad magic, a payload too
# large to be anything but an attack) ends the connection.
# :T
def validate_request(
    export: Export | None, cmd: int, flags: int, offset: int, length: int, shutting_down: bool = False
) -> NbdError | None:
    """Why the request may not run (its wire error and the field at fault), or None."""
    assert export is not None
    info = export.info

    def bad(wire: int, fld: str, message: str) -> NbdError:
        return NbdError(Fault.REMOTE, wire, fld, message)

    if shutting_down:
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


def data_bytes(cmd: int, length: int) -> int:
    """The data a command moves through this server: a read's reply, a write's payload."""
    return length if cmd in (w.NBD_CMD_READ, w.NBD_CMD_WRITE) else 0


# A WRITE's payload of `MIN_SIZE` or more is received into a buffer of the server's pool
# (`pvio.storage.buffers`) and given back when the command is answered: by then the
# backend has written it or copied it (into granted pages, to another server's socket),
# and the reply is the command's end.  A command that is never answered (the client
# went while a backend still held its data) leaves its buffer to the garbage collector.
def payload_buffer(pool: BufferPool | None, length: int) -> memoryview:
    """Where a WRITE's `length`-byte payload is received."""
    if pool is None or length < MIN_SIZE:
        return memoryview(bytearray(length))
    return memoryview(pool.take(length))[:length]


def payload_done(pool: BufferPool | None, command: Command) -> None:
    """`command` is answered: its payload's buffer goes back to `pool`."""
    data = command.data
    if pool is not None and command.length >= MIN_SIZE and isinstance(data, memoryview) \
            and isinstance(data.obj, bytearray):
        pool.give(data.obj)


def parse_info_request(data: bytes) -> tuple[bytes, frozenset[int]] | str:
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


def info_replies(export: Export, requests: frozenset[int]) -> list[bytes]:
    """The data of the NBD_REP_INFO replies NBD_OPT_INFO and NBD_OPT_GO send for `export`:
    NBD_INFO_EXPORT, NBD_INFO_BLOCK_SIZE (whether asked for or not, as the protocol
    allows), then the name and description if asked for."""
    info = export.info
    out = [
        w.INFO_EXPORT.pack(info=w.NBD_INFO_EXPORT, exportsize=info.size, eflags=export.transmission_flags),
        w.INFO_BLOCK_SIZE.pack(
            info=w.NBD_INFO_BLOCK_SIZE,
            minimum=info.min_block,
            preferred=info.preferred_block,
            maximum=info.max_block,
        ),
    ]
    if w.NBD_INFO_NAME in requests:
        out.append(w.INFO_NAME_OR_DESC.pack(info=w.NBD_INFO_NAME) + export.name.encode())
    if w.NBD_INFO_DESCRIPTION in requests and export.description:
        out.append(w.INFO_NAME_OR_DESC.pack(info=w.NBD_INFO_DESCRIPTION) + export.description.encode())
    return out


# OSError errno -> NBD error.  "SHOULD map EDQUOT and EFBIG to ENOSPC"; anything else is EIO.
_ERRNO_TO_NBD = {
    errno.ENOSPC: w.NBD_ENOSPC,
    errno.EDQUOT: w.NBD_ENOSPC,
    errno.EFBIG: w.NBD_ENOSPC,
    errno.EPERM: w.NBD_EPERM,
    errno.EROFS: w.NBD_EPERM,
    errno.EACCES: w.NBD_EPERM,
    errno.ENOMEM: w.NBD_ENOMEM,
    errno.EINVAL: w.NBD_EINVAL,
    errno.EOPNOTSUPP: w.NBD_ENOTSUP,
}


def nbd_error_for(exc: BaseException) -> int:
    """The wire error for a backend failure."""
    if isinstance(exc, OSError) and exc.errno is not None:
        return _ERRNO_TO_NBD.get(exc.errno, w.NBD_EIO)
    return w.NBD_EIO
