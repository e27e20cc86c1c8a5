"""XenStore quotas: how much one domain may hold, and the checks that enforce it.  Sans-IO.

Theory of operation
-------------------
XenStore is shared by every domain, so each unprivileged domain is limited in what it
can make the daemon keep: nodes, the size of a node, watches, open transactions, the
nodes one transaction touches, the entries of one permission list and the length of a
path.  `Quotas` holds the limits, with Xen 4.17's C daemon's defaults and the errno it
answers for each (its command-line option beside it); the toolstack (a privileged
connection) is exempt from all of them, as dom0 is in Xen.

Each check is a plain function over the request's identity and the numbers involved; the
node operations (`pvio.xenstore.nodes`) and the watch table (`pvio.xenstore.watches`)
call them *before* changing anything, so a refused request leaves no trace.  (The one
check made after acting is the size of a transaction, which acted only on its private
view: past the limit the transaction is doomed and its commit fails.)  Nodes are charged to their
owner (the first permission entry): `Store.owned` counts the committed tree, and an open
transaction adds its own delta, so a domain cannot exceed its quota by spreading the
nodes over transactions (XSA-414, XSA-415).  Releasing a domain resets its count
(`pvio.xenstore.domains`).

What this module deliberately does not do: write-rate limiting (XSA-206: the daemon
serves connections fairly instead), bounding a connection's buffered replies and events
(the daemon does it, where the buffers are), or a separate memory quota per domain: the
node count and the node size already bound what a domain makes the daemon keep.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from pvio.abi.xs_wire import XENSTORE_REL_PATH_MAX
from pvio.xenstore.errors import XsError
from pvio.xenstore.perms import Perms, Who
from pvio.xenstore.store import Access, Node, Store, Transaction


@dataclass(frozen=True)
class Quotas:
    """Per-domain limits; the defaults are Xen 4.17's C daemon's.  dom0 is exempt."""

    nodes_per_domain: int = 1000  # -E, ENOSPC
    node_size: int = 2048  # -S, ENOSPC (header + perms + value + children names)
    watches_per_domain: int = 128  # -W, E2BIG (as 4.17 answers)
    transactions_per_conn: int = 10  # -t, ENOSPC
    nodes_per_transaction: int = 1024  # ENOSPC
    perms_per_node: int = 5  # -A, ENOSPC
    path_max: int = XENSTORE_REL_PATH_MAX  # -M, EINVAL

    def describe(self) -> str:
        """One ``name: value`` line per limit (the answer to CONTROL quota)."""
        return "".join(f"{f.name}: {getattr(self, f.name)}\n" for f in fields(self))


def check_node_size(quotas: Quotas, who: Who, node: Node) -> None:
    """A node as `who` would leave it must stay under the node-size limit."""
    if not who.privileged and node.size() >= quotas.node_size:
        raise XsError("ENOSPC", "node too large", field="value")


def check_node_count(quotas: Quotas, store: Store, acc: Access, who: Who, owner: int,
                     new: int) -> None:
    """`new` more nodes for `owner`: its committed count plus the open transaction's own
    delta (`acc`) must stay within the limit."""
    if not who.privileged and store.owned[owner] + acc.owned_delta(owner) + new > (
        quotas.nodes_per_domain
    ):
        raise XsError("ENOSPC", "node quota exceeded", field="path")


def check_child_added(quotas: Quotas, who: Who, parent: str, node: Node, child: str) -> None:
    """The existing `parent` gains the child `child`: its children list grows."""
    if not who.privileged and node.size() + len(child) + 1 >= quotas.node_size:
        raise XsError("ENOSPC", f"{parent} would be too large", field="path")


def check_transaction_size(quotas: Quotas, who: Who, tx: Transaction | None) -> None:
    """A transaction may touch so many nodes; past that it is doomed (its commit fails)."""
    if tx is not None and not who.privileged and tx.accessed() > quotas.nodes_per_transaction:
        tx.failed = "ENOSPC"
        raise XsError("ENOSPC", "transaction touches too many nodes", field="tx_id")


def check_open_transactions(quotas: Quotas, who: Who, open_now: int) -> None:
    if not who.privileged and open_now >= quotas.transactions_per_conn:
        raise XsError("ENOSPC", "too many open transactions", field="tx_id")


def check_perms_count(quotas: Quotas, who: Who, perms: Perms) -> None:
    if not who.privileged and len(perms) > quotas.perms_per_node:
        raise XsError("ENOSPC", "too many permission entries", field="perms")


def check_watches(quotas: Quotas, who: Who, registered: int) -> None:
    """`registered`: the watches of all the domain's connections (the limit is per domain)."""
    if not who.privileged and registered >= quotas.watches_per_domain:
        raise XsError("E2BIG", "watch quota exceeded", field="path")
