"""XenStore watches: who is told about which change, and with what event.  Sans-IO.

Theory of operation
-------------------
A connection registers a watch with a path and a token of its choosing; from then on a
change at that path or anywhere below it sends the connection an XS_WATCH_EVENT carrying
the changed path and the token.  `WatchTable` holds every connection's watches twice:
per connection, keyed by (path, token), for UNWATCH, RESET_WATCHES and disconnection;
and in an index from watched path to watches, so that a change at P costs one dict
lookup per ancestor of P whatever the number of connections.  (Xen's C daemon walks
every connection's watch list on every change; oxenstored keeps a trie.  A dict of exact
paths is the simplest structure with the same cost, since a change only ever concerns
the ancestors of one path.)

A `Change` is what the node operations report: the path, whether only watches on the
path itself may hear it (the descendants an RM deleted), and the permission lists of
which a watcher must be able to read one (the node's, and its parent's: XSA-115).  The
table turns a change into encoded events; sending them, and queueing a transaction's
changes until it commits, is the server's business.

What this module deliberately does not do: decide when a change happens (the node
operations do), bound the events a connection that stops reading accumulates (the daemon
drops them past a backlog, XSA-326, and sends `rescan_event` for each watch that lost
some when the connection catches up), or any I/O.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Protocol

from pvio.abi.xs_wire import XENSTORE_PAYLOAD_MAX, XsdSockmsgType
from pvio.xenstore import paths
from pvio.xenstore.errors import XsError
from pvio.xenstore.perms import PERM_READ, Perms, Who, perm_for
from pvio.xenstore.quotas import Quotas, check_watches
from pvio.xenstore.wire import encode

_WATCH_EVENT = XsdSockmsgType.XS_WATCH_EVENT


@dataclass(frozen=True, slots=True)
class Change:
    """A modification to report to watches: `exact` = only watches on the path itself
    (descendants deleted by RM); `perms` = a watcher must be able to read one of these."""

    path: str
    exact: bool
    perms: tuple[Perms, ...]


@dataclass(eq=False, slots=True)
class Watch:
    conn_id: int
    path: str  # canonical
    token: bytes
    relative: bool


class Watcher(Protocol):
    """What the table needs to know of a connection."""

    conn_id: int
    domid: int
    privileged: bool
    who: Who


def event(path: str | bytes, token: bytes) -> bytes | None:
    """The encoded XS_WATCH_EVENT, or None when it would not fit in a packet (XSA-324:
    such an event is dropped, not truncated)."""
    payload = (path.encode() if isinstance(path, str) else path) + b"\0" + token + b"\0"
    if len(payload) > XENSTORE_PAYLOAD_MAX:
        return None
    return encode(_WATCH_EVENT, payload)


class WatchTable:
    """Every connection's watches, indexed by watched path; per-domain counts for the
    quota."""

    def __init__(self, quotas: Quotas) -> None:
        self.quotas = quotas
        self.index: dict[str, list[Watch]] = {}
        self.count: Counter[int] = Counter()
        self._by_conn: dict[int, dict[tuple[str, bytes], Watch]] = {}

    def watching(self, conn_id: int) -> int:
        """How many watches connection `conn_id` has."""
        return len(self._by_conn.get(conn_id, ()))

    def add(self, watcher: Watcher, path: str, token: bytes, relative: bool) -> Watch:
        """Register a watch (EEXIST for the same path and token again, E2BIG past the
        domain's quota)."""
        mine = self._by_conn.setdefault(watcher.conn_id, {})
        if (path, token) in mine:
            raise XsError("EEXIST", "watch exists", field="token")
        check_watches(self.quotas, watcher.who, self.count[watcher.domid])
        w = Watch(watcher.conn_id, path, token, relative)
        mine[(path, token)] = w
        self.index.setdefault(path, []).append(w)
        self.count[watcher.domid] += 1
        return w

    def remove(self, watcher: Watcher, path: str, token: bytes) -> None:
        w = self._by_conn.get(watcher.conn_id, {}).pop((path, token), None)
        if w is None:
            raise XsError("ENOENT", "no such watch", field="token")
        self._unindex(w)
        self.count[watcher.domid] -= 1

    def drop(self, watcher: Watcher) -> None:
        """Forget every watch of a connection (RESET_WATCHES, re-introduction, closing)."""
        mine = self._by_conn.pop(watcher.conn_id, {})
        for w in mine.values():
            self._unindex(w)
        self.count[watcher.domid] -= len(mine)
        if self.count[watcher.domid] <= 0:
            del self.count[watcher.domid]

    def registered(self, w: Watch) -> bool:
        """Whether `w` is still one of its connection's watches."""
        return self._by_conn.get(w.conn_id, {}).get((w.path, w.token)) is w

    def _unindex(self, w: Watch) -> None:
        lst = self.index.get(w.path)
        if lst is not None:
            lst.remove(w)
            if not lst:
                del self.index[w.path]

    # T:440 Watches
    # A watch on W fires for a change at W or anywhere below it; the event carries the
    # changed path (relative again if W was given relative) and the watch's token.  The
    # index maps a watched path to its watches, so a change at P costs one lookup per
    # ancestor of P, whatever the number of connections.  A watcher only hears about
    # nodes it may read, or whose parent it may read (XSA-115).  Registering fires once
    # at once, after the OK; an event that would not fit in 4096 bytes is dropped
    # (XSA-324); a connection without watches never receives an event.
    # :T
    def events(
        self, change: Change, watchers: Mapping[int, Watcher]
    ) -> Iterator[tuple[Watch, bytes]]:
        """(watch, encoded event) for every watch that hears about `change`."""
        targets = [change.path] if change.exact or change.path.startswith("@") else (
            paths.ancestors(change.path)
        )
        for target in targets:
            for w in self.index.get(target, ()):
                conn = watchers[w.conn_id]
                if not conn.privileged and not any(
                    perm_for(conn.who, p) & PERM_READ for p in change.perms
                ):
                    continue
                epath = paths.relative_to_home(change.path, conn.domid) if w.relative else (
                    change.path
                )
                packet = event(epath, w.token)
                if packet is not None:
                    yield w, packet


def rescan_event(w: Watch, domid: int) -> bytes | None:
    """The event that tells a watcher to look at everything under `w` again: `w` fired on
    its own path, as on registration.  (It stands for the events a connection that stopped
    reading lost: every XenStore client must already take an event as "read again".)"""
    return event(paths.relative_to_home(w.path, domid) if w.relative else w.path, w.token)
