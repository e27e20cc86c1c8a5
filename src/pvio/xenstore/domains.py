"""XenStore's domains: which domains the daemon knows, and what a domain leaves behind.
Sans-IO.

Theory of operation
-------------------
The toolstack tells XenStore about a domain with INTRODUCE (its domid, the gfn of its
ring page and its event channel) and makes it forget with RELEASE.  `XsDomain` is the
daemon's record of one introduced domain: what INTRODUCE said, the domain it may act
for (SET_TARGET: a device model acting for its guest) and the ids of its connections.
dom0 is always known and has no record.  Which domain a connection speaks for is set by
pvio when the toolstack attaches it, never claimed by the peer (`pvio.xenstore.daemon`).

Domids on the wire are parsed as Xen 4.17's C daemon parses them: INTRODUCE wants a
strictly decimal domid below DOMID_FIRST_RESERVED (`parse_domid`); the other requests
read theirs with C's atoi (`atoi`: garbage is 0, -1 wraps).

A released domain must leave nothing behind that a later domain with the same domid
would inherit, nor nodes that pile up over reboots: `forget` deletes every node the
domain owns wherever it is (XSA-419), gives "/" back to dom0 should it own it, strips
its entries from the permission lists of the nodes that remain and resets its node
count (XSA-322, 417, 483), returning the changes for the watches.  An ACL entry
naming a domain that does not exist yet is kept but ignored (`mark_dead`, XSA-322), so
that a domain introduced later gains nothing from it.

What this module deliberately does not do: map the ring page or bind the event channel
INTRODUCE names (pvio's domains reach the daemon through a socket the toolstack attaches;
a shared-page ring is a transport adapter's job), act on connections (closing a released
domain's connections is `pvio.xenstore.server`'s), or any I/O.
"""

from __future__ import annotations

import re
from collections.abc import Container
from dataclasses import dataclass, field
from typing import Final

from pvio.xenstore import paths
from pvio.xenstore.errors import XsError
from pvio.xenstore.perms import Perm
from pvio.xenstore.store import Store
from pvio.xenstore.watches import Change
from pvio.xenstore.wire import split_args

DOMID_SELF: Final = 0x7FF0
DOMID_FIRST_RESERVED: Final = 0x7FF0


@dataclass(eq=False)
class XsDomain:
    """One introduced domain, as XenStore knows it."""

    domid: int
    gfn: int = 0
    evtchn: int = 0
    target: int | None = None
    conns: set[int] = field(default_factory=set)


_ATOI = re.compile(rb"\s*([+-]?\d+)")


def atoi(raw: bytes) -> int:
    """C's atoi() as the 4.17 daemon uses it for domids: garbage is 0, -1 wraps."""
    m = _ATOI.match(raw)
    value = int(m.group(1)) if m else 0
    return value & 0xFFFFFFFF


def parse_domid(raw: bytes, field: str = "domid") -> int:
    """A strictly decimal domid below DOMID_FIRST_RESERVED."""
    if not raw.isdigit() or len(raw) > 5:
        raise XsError("EINVAL", f"bad domid {raw!r}", field=field)
    domid = int(raw)
    if domid >= DOMID_FIRST_RESERVED:
        raise XsError("EINVAL", f"domid {domid} is reserved", field=field)
    return domid


def parse_introduce(payload: bytes) -> tuple[int, int, int]:
    """INTRODUCE's arguments: domid, gfn and event channel (which must not be 0)."""
    args = split_args(payload)
    if len(args) < 3:
        raise XsError("EINVAL", "expected domid, gfn and event channel", field="payload")
    domid = parse_domid(args[0])
    gfn = atoi(args[1])
    evtchn = atoi(args[2])
    if evtchn == 0 or evtchn >= 0x80000000:
        raise XsError("EINVAL", "bad event channel", field="evtchn")
    return domid, gfn, evtchn


def mark_dead(perm: Perm, known: Container[int]) -> Perm:
    """An ACL entry naming a domain that does not exist is kept but ignored (XSA-322)."""
    if perm.domid == 0 or perm.domid in known:
        return perm
    return Perm(perm.letter, perm.domid, ignored=True)


def forget(store: Store, domid: int) -> list[Change]:
    """Remove every trace of `domid` from the tree; the changes to report, in order."""
    root = store.nodes["/"]
    owned_roots = [
        path
        for path, node in store.walk()
        if path != "/" and node.perms[0].domid == domid
        and (paths.parent(path) == "/"
             or store.nodes[paths.parent(path)].perms[0].domid != domid)
    ]
    if root.perms[0].domid == domid:  # "/" cannot go: it returns to dom0
        root.perms = (Perm(root.perms[0].letter, 0), *root.perms[1:])
    changes: list[Change] = []
    for path in owned_roots:
        if path in store.nodes:
            removed = store.remove(path)
            changes.extend(Change(r.path, True, (r.perms, r.parent_perms)) for r in removed[:-1])
            changes.append(Change(path, False, (removed[-1].perms, removed[-1].parent_perms)))
    for node in store.nodes.values():
        if any(p.domid == domid for p in node.perms[1:]):
            node.perms = (node.perms[0], *(p for p in node.perms[1:] if p.domid != domid))
    for k, v in store.specials.items():
        store.specials[k] = (v[0], *(p for p in v[1:] if p.domid != domid))
    store.owned.pop(domid, None)
    return changes
