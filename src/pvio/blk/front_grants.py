"""blkfront's grant references: claimed per request, or kept granted in a pool.

Theory of operation
-------------------
Each request's data pages are granted to the backend.  Without persistent grants
(`feature-persistent`) a request claims fresh references (`claim`, waiting while the
table is full, as Linux's blkfront waits for free grants), grants its pages read-only for
a write or read-write for a read (`grant`), and ends access when the response arrives
(`end`): a reference is reused only once the backend has let go of it, and its page is
freed then.  With persistent grants the pages stay granted read-write in a pool
(`take_pooled`, `give_back`) and the backend may keep them mapped; `release_pool` ends
them all when the ring is given up.

`purge` is Linux blkfront's purge_persistent_grants (run every PURGE_INTERVAL seconds,
as blkfront_delay_work does): a pooled grant not in use whose backend no longer maps it
(a backend purges its own least-used mappings) is revoked — gnttab_try_end_foreign_access
— and its reference and page are freed; one still mapped stays in the pool.  So a pool
grown by a burst shrinks back once the backend lets go of the pages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from pvio.hypervisor.client import Domain
from pvio.hypervisor.granting import NoSpace

#: seconds between purges of unused persistent grants (Linux blkfront: HZ * 10)
PURGE_INTERVAL = 10.0


class FrontGrants:
    """The grant references one blkfront uses for its data pages."""

    def __init__(self, domain: Domain, backend_domid: int, *, on_wait: Callable[[], None],
                 check: Callable[[], None]) -> None:
        self.domain = domain
        self.backend_domid = backend_domid
        self.on_wait = on_wait  # a claim had to wait for free references (counted)
        self.check = check  # raises if the device broke while a claim waited
        self.pool: list[tuple[int, int]] = []  # persistent (ref, frame) pairs not in use
        self.pool_size = 0
        #: the pool grows no larger than this (the backend's persistent mappings: None, no bound)
        self.cap: int | None = None
        self.pool_waiters: list[asyncio.Future[None]] = []  # for pages to come back
        self._ref_frames: dict[int, int] = {}  # ref -> the page it grants, freed with it

    async def claim(self, n: int) -> list[int]:
        """`n` free grant references, waiting while the table has too few."""
        if n == 0:
            return []
        gnttab = self.domain.gnttab
        while True:
            try:
                head = gnttab.alloc_grant_references(n)
                return [gnttab.claim_grant_reference(head) for _ in range(n)]
            except NoSpace:
                self.on_wait()
                fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()

                def wake(f: asyncio.Future[None] = fut) -> None:
                    if not f.done():
                        f.set_result(None)

                gnttab.request_free_callback(wake, n)
                try:
                    await fut
                finally:
                    gnttab.cancel_free_callback(wake)
                self.check()

    def claim_now(self, n: int) -> tuple[list[int], list[int]] | None:
        """`n` free references and `n` free pages if there are and no one waits for
        references already; else None."""
        gnttab = self.domain.gnttab
        if gnttab.waiters:
            return None
        try:
            head = gnttab.alloc_grant_references(n)
        except NoSpace:
            return None
        refs = [gnttab.claim_grant_reference(head) for _ in range(n)]
        try:
            return refs, self.domain.alloc_pages(n)
        except NoSpace:
            for ref in refs:
                gnttab.free_grant_reference(ref)
            return None

    def grant(self, ref: int, frame: int, readonly: bool) -> None:
        """Grant `frame` to the backend through `ref`; the page is freed when `ref` is."""
        self.domain.gnttab.grant_foreign_access_ref(ref, self.backend_domid, frame, readonly)
        self._ref_frames[ref] = frame

    async def take_pooled(self, n: int) -> list[tuple[int, int]]:
        """`n` persistently granted pages: reused ones first, new ones granted read-write
        -- or, when the pool is at its `cap`, the ones given back next (pages lent to an
        NBD reply come back within a turn of the loop; the others with their responses)."""
        while self.cap is not None and len(self.pool) < n <= self.pool_size and self.pool_size + n - len(
                self.pool) > self.cap:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.pool_waiters.append(fut)
            try:
                await fut
            finally:
                if fut in self.pool_waiters:
                    self.pool_waiters.remove(fut)
            self.check()
        take = self.pool[-n:] if n else []
        del self.pool[len(self.pool) - len(take) :]
        more = n - len(take)
        if more:
            refs = await self.claim(more)
            frames = self.domain.alloc_pages(more)
            for ref, frame in zip(refs, frames, strict=True):
                self.grant(ref, frame, False)
            take += list(zip(refs, frames, strict=True))
            self.pool_size += more
        return take

    def take_from_pool(self, n: int) -> list[tuple[int, int]]:
        """`n` pooled pages, which the pool must have (`len(pool) >= n`)."""
        take = self.pool[-n:]
        del self.pool[len(self.pool) - n :]
        return take

    def give_back(self, pooled: list[tuple[int, int]]) -> None:
        """Persistent pages a request is done with: still granted, the next one reuses them."""
        self.pool.extend(pooled)
        if self.pool_waiters:
            waiters, self.pool_waiters = self.pool_waiters, []
            for fut in waiters:
                if not fut.done():
                    fut.set_result(None)

    def put_back(self, pooled: list[tuple[int, int]] | None, grefs: tuple[int, ...], persistent: bool) -> None:
        """A request's pages once it is done with them: pooled ones back to the pool
        (their grants ended, if persistence was given up meanwhile), others' grants ended."""
        if pooled is not None and persistent:
            self.give_back(pooled)
        elif pooled is not None:
            self.end(tuple(r for r, _ in pooled))
        else:
            self.end(grefs)

    def purge(self) -> int:
        """Revoke and free every pooled grant the backend does not map; returns how many."""
        gnttab = self.domain.gnttab
        kept: list[tuple[int, int]] = []
        freed: list[int] = []
        for ref, frame in self.pool:
            if gnttab.end_foreign_access_ref(ref):  # fails while the backend maps it
                freed.append(ref)
            else:
                kept.append((ref, frame))
        self.pool = kept
        for ref in freed:
            gnttab.free_grant_reference(ref)
            self._ref_freed(ref)
        self.pool_size -= len(freed)
        return len(freed)

    def end(self, grefs: tuple[int, ...]) -> None:
        """End the backend's access through `grefs`; each page is freed once it is let go."""
        if grefs:
            self.domain.end_access(list(grefs), self._ref_freed)

    def release_pool(self) -> None:
        """End every persistent grant (the ring is given up)."""
        if self.pool:
            pool, self.pool = self.pool, []
            self.end(tuple(r for r, _ in pool))

    def _ref_freed(self, ref: int) -> None:
        frame = self._ref_frames.pop(ref, None)
        if frame is not None:
            self.domain.free_pages([frame])
