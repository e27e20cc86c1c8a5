"""Replies leaving an NBD connection: gathered per turn of the loop, lent data sent in place.

Theory of operation
-------------------
The adapter (`pvio.nbd.server_asyncio`) queues the pieces of every reply completed in one
turn of the event loop and hands them here together.  Small pieces are joined into one
buffer; a large one (a read's data) is written on its own, so the transport sends it from
where it is.  A read whose data a backend *lent* (`pvio.storage.lent.Lent`: blkfront's
granted pages) is sent by the kernel straight from those pages, with one `writev` of the
whole batch on the connection's socket, when the transport has nothing buffered (so the
bytes cannot overtake earlier ones); what the socket does not take at once is copied and
left to the transport.  Every loan is released before `send_replies` returns, whatever
happened: the pages go back to blkfront's pool in the same turn.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterable, MutableMapping

from pvio.nbd.server import ReplyData as ReplyData  # (re-exported for the adapter)
from pvio.storage.lent import Lent

#: Reply pieces at least this large are written on their own rather than joined.
JOIN_LIMIT = 64 << 10
#: Buffers one writev may carry (Linux's IOV_MAX).
_IOV_MAX = 1024


def release_all(parts: Iterable[ReplyData]) -> None:
    """Give back every loan among `parts` (the replies will not be sent)."""
    for part in parts:
        if isinstance(part, Lent):
            part.release()


# T:747 A read's data leaves from the guest's pages
# blkfront answers a READ by *lending* the pages it was read into (`Lent`) instead of
# copying them into a buffer, and the replies of one turn of the loop leave with one
# writev: headers from Python, the data straight from the granted pages, the kernel
# copying each byte once into the socket.  Only when the transport still holds bytes
# (the client reads slowly) or the socket is full is the rest copied into the transport.
# Every loan is released before this returns, so the pages are back in blkfront's pool in
# the same turn and the pool never needs more pages than a full ring (blkback's
# persistent mappings).
# :T
def send_replies(transport: asyncio.Transport, fd: int | None, parts: list[ReplyData],
                 stats: MutableMapping[str, int]) -> None:
    """Send `parts` in order (see the module notes); `fd` is the socket, None when the
    transport must carry everything (TLS)."""
    try:
        lent = any(isinstance(p, Lent) for p in parts)
        if lent and fd is not None and transport.get_write_buffer_size() == 0:
            _send_in_place(transport, fd, parts, stats)
            return
        for piece in _gathered(parts):
            transport.write(piece.tobytes() if isinstance(piece, Lent) else piece)
    finally:
        release_all(parts)


def _gathered(parts: list[ReplyData]) -> list[ReplyData]:
    """Small pieces joined, large ones (and loans) as they are, in order."""
    out: list[ReplyData] = []
    small: list[bytes | bytearray | memoryview] = []
    for part in parts:
        if isinstance(part, Lent) or len(part) >= JOIN_LIMIT:
            if small:
                out.append(b"".join(small))
                small = []
            out.append(part)
        else:
            small.append(part)
    if small:
        out.append(b"".join(small))
    return out


def _send_in_place(transport: asyncio.Transport, fd: int, parts: list[ReplyData],
                   stats: MutableMapping[str, int]) -> None:
    # Each buffer, and whether it is lent (to copy if the socket does not take it now).
    iov: list[tuple[bytes | bytearray | memoryview, bool]] = []
    for piece in _gathered(parts):
        if isinstance(piece, Lent):
            iov.extend((v, True) for v in piece.views)
            stats["reads_lent"] += 1
        else:
            iov.append((piece, False))
    done = 0  # buffers wholly sent
    sent = 0  # bytes of iov[done] sent
    while done < len(iov):
        batch = [b for b, _ in iov[done : done + _IOV_MAX]]
        if sent:
            batch[0] = memoryview(batch[0])[sent:]
        try:
            n = os.writev(fd, batch)
        except (BlockingIOError, InterruptedError):
            break
        except OSError:
            break  # the transport finds the socket broken and closes the connection
        for b in batch:
            if n < len(b):
                sent += n
                break
            n -= len(b)
            done += 1
            sent = 0
        else:
            continue
        break
    if done == len(iov):
        return
    rest: list[bytes | bytearray | memoryview] = []
    for k in range(done, len(iov)):
        buf, is_lent = iov[k]
        if k == done and sent:
            buf = memoryview(buf)[sent:]
        if is_lent:
            stats["lent_bytes_copied"] += len(buf)
            buf = bytes(buf)
        rest.append(buf)
    transport.writelines(rest)
