"""XenStore's node operations: read, list, write, make, remove, permissions, transactions.
Sans-IO.

Theory of operation
-------------------
`NodeOps` answers the requests that read or change the tree: READ, DIRECTORY,
DIRECTORY_PART, GET_PERMS, WRITE, MKDIR, RM, SET_PERMS, TRANSACTION_START and
TRANSACTION_END.  Each handler gets the requesting connection, the packet and the
connection's transaction that tx_id names (None for none).  It parses its arguments
the way the C daemon does, canonicalises the paths (a relative path is below the
requester's home: `pvio.xenstore.paths`), checks permissions (`pvio.xenstore.perms`) and
quotas (`pvio.xenstore.quotas`) *before* it changes anything, acts through an access --
the committed tree, or the transaction's private view (`pvio.xenstore.store`) -- and
returns the reply payload or raises `XsError`.

Every modification is reported as a `Change` (`pvio.xenstore.watches`): outside a
transaction at once, to the `on_change` hook the server gives (it counts the mutation and
fires the watches); inside one, into the transaction's pending list, reported when the
commit succeeds and dropped otherwise.

A domain must not learn that a node it may not read exists: where a node is absent, the
answer is EACCES rather than ENOENT when its nearest existing ancestor is hidden from the
requester (`_hide`), as in the C daemon.

What this module deliberately does not do: decode frames or dispatch requests, keep
connections, watches or domains (it asks only whether a domid is known, for the ACL
entries of SET_PERMS), or any I/O.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from typing import Protocol

from pvio.abi.xs_wire import XENSTORE_PAYLOAD_MAX
from pvio.xenstore import paths
from pvio.xenstore.domains import atoi, mark_dead
from pvio.xenstore.errors import XsError
from pvio.xenstore.perms import (
    PERM_OWNER,
    PERM_READ,
    PERM_WRITE,
    Perms,
    Who,
    encode_perms,
    inherit,
    parse_perm,
    perm_for,
)
from pvio.xenstore.quotas import (
    Quotas,
    check_child_added,
    check_node_count,
    check_node_size,
    check_open_transactions,
    check_perms_count,
    check_transaction_size,
)
from pvio.xenstore.store import (
    Access,
    Node,
    Store,
    StoreAccess,
    Transaction,
    TxAccess,
    apply,
    conflicts,
)
from pvio.xenstore.watches import Change
from pvio.xenstore.wire import OK, Packet, one_arg, split_args

#: Raw paths whose canonical form is cached before the cache starts over.
PATH_CACHE_SIZE = 4096


class Requester(Protocol):
    """What a node operation needs to know of the connection that asks."""

    conn_id: int
    domid: int
    privileged: bool
    who: Who
    transactions: dict[int, Transaction]
    next_tx_id: int


class NodeOps:
    """The tree's request handlers; see the module docstring."""

    def __init__(
        self,
        store: Store,
        quotas: Quotas,
        domains: Container[int],
        on_change: Callable[[Change], None],
        on_touch: Callable[[], None],
    ) -> None:
        self.store = store
        self.quotas = quotas
        self.domains = domains
        #: A committed change to report (outside a transaction, or at its commit).
        self.on_change = on_change
        #: The tree changed in a way no watch hears about (a special path's permissions).
        self.on_touch = on_touch
        self._direct = StoreAccess(store)
        # Canonical forms of recently seen raw paths (valid ones only), per home domain.
        self._paths: dict[tuple[bytes, int, bool], tuple[str, bool]] = {}

    # -- helpers ---------------------------------------------------------------------

    def path(self, conn: Requester, raw: bytes, *, special: bool = False) -> tuple[str, bool]:
        """The canonical path `raw` names for `conn`, and whether it was relative."""
        key = (raw, conn.domid, special)
        hit = self._paths.get(key)
        if hit is not None:
            return hit
        result = paths.canonicalize(
            paths.decode(raw), conn.domid, allow_special=special, path_max=self.quotas.path_max
        )
        if len(self._paths) >= PATH_CACHE_SIZE:
            self._paths.clear()
        self._paths[key] = result
        return result

    def _access(self, tx: Transaction | None) -> Access:
        return TxAccess(self.store, tx) if tx is not None else self._direct

    def _hide(
        self, acc: Access, who: Who, path: str, bit: int, errno: str, *, record: bool = True
    ) -> str:
        """Errno hiding: an unreadable (unwritable) ancestor makes ENOENT look like EACCES,
        so a domain cannot probe for nodes it may not see."""
        for a in paths.ancestors(path)[1:]:
            if record:
                acc.explicit(a)  # the answer depends on which ancestor exists
            node = acc.node(a)
            if node is not None:
                return "EACCES" if not perm_for(who, node.perms) & bit else errno
        return errno

    def _get(self, acc: Access, who: Who, path: str, bit: int) -> Node:
        acc.explicit(path)
        node = acc.node(path)
        if node is None:
            raise XsError(self._hide(acc, who, path, bit, "ENOENT"), path, field="path")
        if not perm_for(who, node.perms) & bit:
            raise XsError("EACCES", path, field="path")
        return node

    def _changed(self, tx: Transaction | None, change: Change) -> None:
        if tx is not None:
            tx.pending.append(change)
        else:
            self.on_change(change)

    # -- reading ---------------------------------------------------------------------

    def read(self, conn: Requester, pkt: Packet, tx: Transaction | None) -> bytes:
        path, _ = self.path(conn, one_arg(pkt.payload))
        if tx is None:  # the common case, kept short
            node = self.store.nodes.get(path)
            if node is not None and (conn.privileged or perm_for(conn.who, node.perms) & PERM_READ):
                return node.value
        acc = self._access(tx)
        node = self._get(acc, conn.who, path, PERM_READ)
        check_transaction_size(self.quotas, conn.who, tx)
        return node.value

    def directory(self, conn: Requester, pkt: Packet, tx: Transaction | None) -> bytes:
        path, _ = self.path(conn, one_arg(pkt.payload))
        acc = self._access(tx)
        self._get(acc, conn.who, path, PERM_READ)
        children = acc.children(path)
        check_transaction_size(self.quotas, conn.who, tx)
        return b"".join(c.encode() + b"\0" for c in children)

    def directory_part(self, conn: Requester, pkt: Packet, tx: Transaction | None) -> bytes:
        args = split_args(pkt.payload)
        if len(args) != 2:
            raise XsError("EINVAL", "expected path and offset", field="payload")
        path, _ = self.path(conn, args[0])
        offset = atoi(args[1])
        acc = self._access(tx)
        node = self._get(acc, conn.who, path, PERM_READ)
        listing = b"".join(c.encode() + b"\0" for c in acc.children(path))
        gen = str(node.cgen).encode() + b"\0"
        if offset >= len(listing):
            return gen + b"\0"
        end = offset
        while end < len(listing):
            nxt = listing.index(b"\0", end) + 1
            if len(gen) + (nxt - offset) >= XENSTORE_PAYLOAD_MAX:
                break
            end = nxt
        chunk = listing[offset:end]
        return gen + chunk + (b"\0" if end == len(listing) else b"")

    def get_perms(self, conn: Requester, pkt: Packet, tx: Transaction | None) -> bytes:
        path, _ = self.path(conn, one_arg(pkt.payload), special=True)
        who = conn.who
        if path.startswith("@"):
            perms = self.store.specials.get(path)
            if perms is None:
                raise XsError("ENOENT", path, field="path")
            if not perm_for(who, perms) & PERM_READ:
                raise XsError("EACCES", path, field="path")
            return encode_perms(perms)
        node = self._get(self._access(tx), who, path, PERM_READ)
        return encode_perms(node.perms)

    # -- writing ---------------------------------------------------------------------

    # T:430 Writing creates parents, and who owns what
    # WRITE and MKDIR create every missing parent on the way (empty value).  New nodes
    # copy the permissions of the nearest existing ancestor, where the creator needs
    # write permission; an unprivileged creator becomes the new nodes' owner and is
    # charged for them against its quota (1000 nodes, 2048 bytes a node).  All checks
    # run before the first node is created, so a failed create leaves nothing behind
    # and the per-domain counts stay exact (XSA-414, XSA-415).
    # :T
    def _create(self, conn: Requester, acc: Access, path: str, value: bytes) -> Perms:
        who = conn.who
        missing = [path]
        anc = paths.parent(path)
        while (existing := acc.node(anc)) is None:
            missing.append(anc)
            anc = paths.parent(anc)
        if not perm_for(who, existing.perms) & PERM_WRITE:
            raise XsError("EACCES", f"cannot create below {anc}", field="path")
        perms = inherit(existing.perms, who)
        check_node_count(self.quotas, self.store, acc, who, perms[0].domid, len(missing))
        check_node_size(self.quotas, who, Node(value, perms, [], 0, 0))
        check_child_added(self.quotas, who, anc, existing, paths.basename(missing[-1]))
        for p in reversed(missing[1:]):
            acc.ensure(p, perms)
        acc.put(path, value, perms)
        return perms

    def write(self, conn: Requester, pkt: Packet, tx: Transaction | None) -> bytes:
        cut = pkt.payload.find(b"\0")
        if cut < 0:
            raise XsError("EINVAL", "no NUL after the path", field="payload")
        path, _ = self.path(conn, pkt.payload[:cut])
        value = pkt.payload[cut + 1 :]
        acc = self._access(tx)
        who = conn.who
        acc.explicit(path)
        node = acc.node(path)
        if node is not None:
            if not perm_for(who, node.perms) & PERM_WRITE:
                raise XsError("EACCES", path, field="path")
            check_node_size(self.quotas, who, Node(value, node.perms, node.children, 0, 0))
            acc.put(path, value, node.perms)
            perms = node.perms
        else:
            perms = self._create(conn, acc, path, value)
        self._written(tx, acc, who, path, perms)
        return OK

    def _written(self, tx: Transaction | None, acc: Access, who: Who, path: str, perms: Perms) -> None:
        """A WRITE or MKDIR done: the transaction's size checked, the change recorded
        with the node's and its parent's permissions (for the watches that may see it)."""
        check_transaction_size(self.quotas, who, tx)
        parent = acc.node(paths.parent(path))
        self._changed(tx, Change(path, False, (perms, parent.perms if parent else perms)))

    def mkdir(self, conn: Requester, pkt: Packet, tx: Transaction | None) -> bytes:
        path, _ = self.path(conn, one_arg(pkt.payload))
        acc = self._access(tx)
        who = conn.who
        acc.explicit(path)
        node = acc.node(path)
        if node is not None:
            if not perm_for(who, node.perms) & PERM_WRITE:
                raise XsError("EACCES", path, field="path")
            return OK
        perms = self._create(conn, acc, path, b"")
        self._written(tx, acc, who, path, perms)
        return OK

    def rm(self, conn: Requester, pkt: Packet, tx: Transaction | None) -> bytes:
        path, _ = self.path(conn, one_arg(pkt.payload))
        acc = self._access(tx)
        who = conn.who
        acc.explicit(path)
        node = acc.node(path)
        if node is None:
            # Removing an absent node changes nothing, so inside a transaction its answer
            # (OK, or ENOENT when the parent is absent too) is not re-checked at commit:
            # libxl sends exactly this RM before creating every device and ignores the
            # answer, and two devices created in parallel must not conflict over it.
            errno = self._hide(acc, who, path, PERM_WRITE, "ENOENT", record=False)
            if errno == "ENOENT" and acc.node(paths.parent(path)) is not None:
                return OK
            raise XsError(errno, path, field="path")
        if not perm_for(who, node.perms) & PERM_WRITE:
            raise XsError("EACCES", path, field="path")
        if path == "/":
            raise XsError("EINVAL", "cannot remove /", field="path")
        removed = acc.remove(path)
        check_transaction_size(self.quotas, who, tx)
        for r in removed[:-1]:
            self._changed(tx, Change(r.path, True, (r.perms, r.parent_perms)))
        root = removed[-1]
        self._changed(tx, Change(path, False, (root.perms, root.parent_perms)))
        return OK

    def set_perms(self, conn: Requester, pkt: Packet, tx: Transaction | None) -> bytes:
        args = split_args(pkt.payload)
        if len(args) < 2:
            raise XsError("EINVAL", "expected a path and permissions", field="payload")
        path, _ = self.path(conn, args[0], special=True)
        who = conn.who
        perms = tuple(mark_dead(parse_perm(a), self.domains) for a in args[1:])
        check_perms_count(self.quotas, who, perms)
        if path.startswith("@"):
            old_special = self.store.specials.get(path)
            if old_special is None:
                raise XsError("ENOENT", path, field="path")
            if not perm_for(who, old_special) & PERM_OWNER:
                raise XsError("EACCES", path, field="path")
            self.store.specials[path] = perms
            self.on_touch()
            return OK
        acc = self._access(tx)
        node = self._get(acc, who, path, PERM_WRITE)
        if not perm_for(who, node.perms) & PERM_OWNER:
            raise XsError("EACCES", "only the owner may change permissions", field="path")
        old = node.perms
        if not who.privileged:
            if perms[0].domid != old[0].domid:
                raise XsError("EPERM", "only the toolstack may change the owner", field="perms")
            check_node_size(self.quotas, who, Node(node.value, perms, node.children, 0, 0))
        acc.put(path, None, perms)
        check_transaction_size(self.quotas, who, tx)
        parent = acc.node(paths.parent(path)) if path != "/" else None
        self._changed(tx, Change(path, False, (old, perms, parent.perms if parent else perms)))
        return OK

    # -- transactions ----------------------------------------------------------------

    # T:450 Transactions
    # TRANSACTION_START hands out the connection's next free id (ids are per connection,
    # from 1, never 0); requests carrying that id see the tree through the transaction's
    # private view.  TRANSACTION_END "T" commits: if anything the transaction depended on
    # changed meanwhile, the answer is EAGAIN and nothing is applied; else its effects
    # are replayed onto the current tree and its queued watch events fire.  Two
    # transactions that only add different children to one directory both commit.
    # :T
    def transaction_start(self, conn: Requester, pkt: Packet, tx: Transaction | None) -> bytes:
        if tx is not None:
            raise XsError("EBUSY", "transactions do not nest", field="tx_id")
        check_open_transactions(self.quotas, conn.who, len(conn.transactions))
        tx_id = conn.next_tx_id
        while tx_id == 0 or tx_id in conn.transactions:
            tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn.next_tx_id = (tx_id + 1) & 0xFFFFFFFF
        conn.transactions[tx_id] = Transaction(tx_id, conn.conn_id)
        return f"{tx_id}".encode() + b"\0"

    def transaction_end(self, conn: Requester, pkt: Packet, tx: Transaction | None) -> bytes:
        arg = one_arg(pkt.payload, field="payload")
        if arg not in (b"T", b"F"):
            raise XsError("EINVAL", "expected T or F", field="payload")
        if tx is None:
            raise XsError("ENOENT", "no transaction", field="tx_id")
        del conn.transactions[tx.tx_id]
        if arg == b"F":
            return OK
        if tx.failed is not None:  # as the C daemon answers a transaction marked failed
            raise XsError("ENOMEM", f"the transaction failed earlier ({tx.failed})",
                          field="tx_id")
        if conflicts(self.store, tx) is not None:
            raise XsError("EAGAIN", "conflict", field="tx_id")
        apply(self.store, tx)
        for change in tx.pending:
            self.on_change(change)
        return OK
