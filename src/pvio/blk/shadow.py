"""blkfront's shadow table: a copy of every request in flight, found again by its id.

Theory of operation
-------------------
Linux blkfront keeps, for each ring slot's worth of requests, a *shadow*: the request as
it was sent, the grant references of its pages, and who is waiting for it.  The `id` a
frontend puts in a request is simply the shadow's index, handed out from a free list, so
a response finds its request in O(1) — and a response the frontend cannot match is proof
of a broken or hostile backend.  After a backend reconnect (blkif_recover) the shadows
are the frontend's memory of what must be sent again.

Checks on every response (`complete`): the id is in range, its shadow is in flight (not
free, not already completed), and the response's operation is the request's.  Any
failure raises `BackendProtocolError`, on which blkfront marks the device broken.
"""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pvio.abi.blkif import BLKIF_RSP_EOPNOTSUPP
from pvio.hypervisor.domain import PAGE_SIZE
from pvio.storage.lent import Lent

#: A submitted request's completion: (None, data) on success -- data is a READ's bytes,
#: b"" for a WRITE -- or (the error, b"").
Submitted = Callable[[BaseException | None, Any], None]  # the data: bytes, or a `Lent`


class BackendProtocolError(Exception):
    """The backend answered something no correct backend can: the device is broken."""


@dataclass
class Shadow:
    """One request in flight, as the frontend sent it."""

    id: int
    operation: int
    sector_number: int
    request: bytes  # the exact slot bytes, to re-issue on recovery
    grefs: tuple[int, ...] = ()
    cookie: Any = None  # the caller's completion handle
    extra: dict[str, Any] = field(default_factory=dict)

    def __init__(self, id: int, operation: int, sector_number: int, request: bytes,
                 grefs: tuple[int, ...] = (), cookie: Any = None, extra: dict[str, Any] | None = None) -> None:
        # written out, not generated: compiled (see `pvio.blk.request.BlkifRequest`)
        self.id = id
        self.operation = operation
        self.sector_number = sector_number
        self.request = request
        self.grefs = grefs
        self.cookie = cookie
        self.extra = {} if extra is None else extra


class ShadowTable:
    """Ids 0..size-1 handed out from a free list (lowest first)."""

    def __init__(self, size: int):
        if size <= 0:
            raise ValueError("shadow table size must be positive")
        self.size = size
        self._slots: list[Shadow | None] = [None] * size
        self._free: list[int] = list(range(size - 1, -1, -1))

    def __len__(self) -> int:
        """Requests in flight."""
        return self.size - len(self._free)

    @property
    def free(self) -> int:
        return len(self._free)

    def alloc(
        self,
        operation: int,
        sector_number: int,
        build: Any,
        grefs: tuple[int, ...] = (),
        cookie: Any = None,
    ) -> Shadow:
        """Take an id, build the request bytes with `build(id)`, and record the shadow."""
        if not self._free:
            raise RuntimeError("no free request id: the caller must wait for a response")
        req_id = self._free.pop()
        try:
            raw = build(req_id)
        except BaseException:
            self._free.append(req_id)
            raise
        shadow = Shadow(req_id, operation, sector_number, bytes(raw), grefs, cookie)
        self._slots[req_id] = shadow
        return shadow

    def complete(self, req_id: int, operation: int) -> Shadow:
        """Match a response to its request and free the id; BackendProtocolError if none."""
        if not 0 <= req_id < self.size:
            raise BackendProtocolError(f"response id {req_id} is not a request id")
        shadow = self._slots[req_id]
        if shadow is None:
            raise BackendProtocolError(f"response id {req_id} answers no request in flight")
        if shadow.operation != operation:
            raise BackendProtocolError(
                f"response id {req_id} has operation {operation}, request had {shadow.operation}"
            )
        self._slots[req_id] = None
        self._free.append(req_id)
        return shadow

    def in_flight(self) -> list[Shadow]:
        """Every shadow still waiting, oldest id first (for recovery)."""
        return [s for s in self._slots if s is not None]

    def reset(self) -> list[Shadow]:
        """Forget every shadow (after recovery has copied them) and free all ids."""
        pending = self.in_flight()
        self._slots = [None] * self.size
        self._free = list(range(self.size - 1, -1, -1))
        return pending


@dataclass
class Pending:
    """What a shadow's cookie holds: the caller's future (or, for a request `submit`ted,
    its `done` callback) and the data pages."""

    future: asyncio.Future[int] | None
    frames: list[int]
    nbytes: int  # payload bytes, in pages from the first
    read_into: memoryview | None = None
    pooled: list[tuple[int, int]] | None = None  # persistent (ref, frame) pairs in use
    want_bytes: bool = False  # a READ whose data the caller takes as bytes
    lend: bool = False  # a READ whose data the caller borrows in place (`Lent`)
    data: bytes | Lent = b""
    done: Submitted | None = None

    def __init__(self, future: asyncio.Future[int] | None, frames: list[int], nbytes: int,
                 read_into: memoryview | None = None, pooled: list[tuple[int, int]] | None = None,
                 want_bytes: bool = False, lend: bool = False, data: bytes | Lent = b"",
                 done: Submitted | None = None) -> None:
        # written out, not generated: compiled (see `pvio.blk.request.BlkifRequest`)
        self.future = future
        self.frames = frames
        self.nbytes = nbytes
        self.read_into = read_into
        self.pooled = pooled
        self.want_bytes = want_bytes
        self.lend = lend
        self.data = data
        self.done = done

    def copy_data(self, mem: memoryview) -> None:
        """A completed READ's data out of its pages: as bytes, or into the caller's buffer."""
        if self.want_bytes:
            runs = page_runs(self.frames, self.nbytes)
            if len(runs) == 1:
                _, start, n = runs[0]
                self.data = mem[start : start + n].tobytes()
            else:
                self.data = b"".join([mem[start : start + n] for _, start, n in runs])
        elif self.read_into is not None:
            out = self.read_into
            for pos, start, n in page_runs(self.frames, self.nbytes):
                out[pos : pos + n] = mem[start : start + n]

    def lend_data(self, mem: memoryview, give_back: Callable[[], None]) -> None:
        """A completed READ's data lent in its pages, which `give_back` returns."""
        self.data = Lent([mem[start : start + n] for _, start, n in page_runs(self.frames, self.nbytes)], give_back)


def page_runs(frames: list[int], nbytes: int) -> list[list[int]]:
    """Where `nbytes` of data in `frames` (a page each, the first first) lie, as runs of
    consecutive frames: [offset in the data, offset in the domain's memory, length].

    Pooled pages are taken and given back a request's worth at a time, so a request's
    pages are mostly one run: its data is copied in one piece, not a page at a time."""
    runs: list[list[int]] = []
    pos = 0
    prev = -2
    for frame in frames:
        if pos >= nbytes:
            break
        n = min(PAGE_SIZE, nbytes - pos)
        if frame == prev + 1:
            runs[-1][2] += n
        else:
            runs.append([pos, frame * PAGE_SIZE, n])
        prev = frame
        pos += n
    return runs


def status_error(shadow: Shadow, status: int) -> OSError:
    """The error a caller sees for a response whose status is not BLKIF_RSP_OKAY."""
    code = errno.EOPNOTSUPP if status == BLKIF_RSP_EOPNOTSUPP else errno.EIO
    return OSError(code, f"blkfront: {shadow.operation} at sector {shadow.sector_number} failed ({status})")
