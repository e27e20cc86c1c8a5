"""A READ's data lent where it lies, for whoever sends it on without a copy.

Theory of operation
-------------------
blkfront reads a disk into pages it has granted to the backend; the NBD export then
sends those bytes to its client.  Copying them into a buffer of their own first costs an
allocation and a pass over the data, for a 1 MiB read most of the guest's work.  A
backend that can, instead *lends* the data: a `Lent` is the views of the bytes where
they are, in order, and a `release` the borrower calls exactly once, when it has sent
them or copied what it still needs.  Until then the backend does not reuse the memory.

`Lending` is the short way of `pvio.storage.backend.Submitting` with lent data, and an
awaitable form for when the short way cannot start at once.  A borrower that cannot
send from the views (TLS, a closed connection) takes `tobytes()` or drops them, and
releases either way.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol, runtime_checkable


class Lent:
    """`views` (in order, `nbytes` in all), valid until `release()`."""

    __slots__ = ("_release", "nbytes", "views")

    def __init__(self, views: Sequence[memoryview], release: Callable[[], None]) -> None:
        self.views = list(views)
        self.nbytes = sum(len(v) for v in self.views)
        self._release: Callable[[], None] | None = release

    def __len__(self) -> int:
        return self.nbytes

    @property
    def released(self) -> bool:
        return self._release is None

    def tobytes(self) -> bytes:
        """A copy of the data (to keep after `release`)."""
        if self._release is None:
            raise ValueError("lent data used after its release")
        return b"".join(self.views)

    def release(self) -> None:
        """Give the memory back to its owner; a second call does nothing."""
        release, self._release = self._release, None
        if release is not None:
            self.views = []
            release()

    @classmethod
    def joined(cls, parts: Sequence[Lent]) -> Lent:
        """The parts, in order, as one loan whose release releases each part."""

        def release_all() -> None:
            for p in parts:
                p.release()

        return cls([v for p in parts for v in p.views], release_all)


#: `done(None, data)` -- lent, or bytes when the backend cannot lend just now -- or `done(exc, None)`
LentDone = Callable[[BaseException | None, "Lent | bytes | bytearray | None"], None]


@runtime_checkable
class Lending(Protocol):
    """A backend that lends READ data (blkfront, `pvio.blk.front_io`)."""

    def submit_read_lent(self, offset: int, length: int, done: LentDone) -> bool:
        """Start a READ now, `done` called when it completes; False: it could not start
        without waiting (then `read_lent`)."""
        ...

    async def read_lent(self, offset: int, length: int) -> Lent: ...
