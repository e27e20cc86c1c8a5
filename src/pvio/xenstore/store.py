"""The XenStore tree and its transactions.  Sans-IO.

Theory of operation
-------------------
The committed tree (`Store`) is a flat dict from canonical path to `Node`: the value
(bytes, may hold NULs), the permission list, the children's names in creation order, and
two generation numbers drawn from one global counter: `gen` moves when the node itself
changes (created, value, permissions) and `cgen` when its list of children changes.
Keeping the two apart is what lets transactions merge (below).

Requests act on the tree through an *access*: `StoreAccess` reads and writes the tree
directly; `TxAccess` gives a transaction an isolated view.  A transaction copies a node
into its private overlay on first write, and records what it *observed*:

* `reads`: every node it looked at, with the `gen` it saw (None: the node was absent);
* `child_reads`: every children list it listed (DIRECTORY, or RM of a subtree), with
  the `cgen` it saw;
* `implied`: intermediate parents it would create implicitly (empty value, inherited
  permissions), with the permissions it would give them.

and keeps its changes as an ordered list of effects (put, ensure-parent, remove).  At
commit, the observations are checked against the tree: any node read whose `gen` moved,
any children list listed whose `cgen` moved, any implied parent that now exists with
other permissions -> EAGAIN, and nothing is applied.  Otherwise the effects are replayed
onto the *current* tree: new children are appended to whatever the directory holds now.

One answer is deliberately not re-checked: RM of an absent node (a no-op either way)
may say ENOENT inside the transaction and OK had it run after a concurrent commit that
created the parent (see `pvio.xenstore.nodes.NodeOps.rm`).

So two transactions that add different children to one directory (two vbds created in
parallel, each implicitly creating ``device/vbd``) both commit, where Xen's C daemon,
which compares whole nodes including their children lists, makes one of them retry.
This is the guarantee of oxenstored's coalescing and replay, got more simply: the result
equals running the transactions one after the other, because everything a transaction's
answers depended on is unchanged at its commit.  Alternatives rejected: a full tree copy
per transaction (memory per transaction grows with the store; XSA-326), and C's
whole-node comparison (parallel device creation bounces with EAGAIN).

What this module does not do: permission checks, quotas, path parsing and watches (the
node operations do them, through the access), or any I/O.
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from pvio.xenstore import paths
from pvio.xenstore.errors import XsError
from pvio.xenstore.perms import DEFAULT_ROOT_PERMS, Perm, Perms


@dataclass(slots=True)
class Node:
    value: bytes
    perms: Perms
    children: list[str]
    gen: int
    cgen: int

    def copy(self) -> Node:
        return Node(self.value, self.perms, list(self.children), self.gen, self.cgen)

    def size(self) -> int:
        """Bytes the node weighs for the node-size quota (C: header, perms, data, children)."""
        return 16 + 4 * len(self.perms) + len(self.value) + sum(len(c) + 1 for c in self.children)


@dataclass(frozen=True, slots=True)
class Removed:
    """One node deleted by RM, for watch firing: its path and old permissions."""

    path: str
    perms: Perms
    parent_perms: Perms


class Access(Protocol):
    """How request handlers see the tree: directly, or through a transaction."""

    def node(self, path: str) -> Node | None: ...
    def children(self, path: str) -> list[str]: ...
    def put(self, path: str, value: bytes | None, perms: Perms) -> None: ...
    def ensure(self, path: str, perms: Perms) -> None: ...
    def remove(self, path: str) -> list[Removed]: ...
    def explicit(self, path: str) -> None: ...
    def owned_delta(self, domid: int) -> int: ...


class Store:
    """The committed tree, the global generation counter and per-owner node counts."""

    def __init__(self) -> None:
        self.gen = 0
        self.nodes: dict[str, Node] = {"/": Node(b"", DEFAULT_ROOT_PERMS, [], 0, 0)}
        self.owned: Counter[int] = Counter()
        self.specials: dict[str, Perms] = {p: DEFAULT_ROOT_PERMS for p in paths.SPECIAL_PATHS}

    def next_gen(self) -> int:
        self.gen += 1
        return self.gen

    def get(self, path: str) -> Node | None:
        return self.nodes.get(path)

    # -- mutations (the only code that changes committed nodes) ------------------------

    def put(self, path: str, value: bytes | None, perms: Perms) -> None:
        """Create `path` (its parent must exist) or update its value and permissions."""
        node = self.nodes.get(path)
        if node is None:
            parent = self.nodes[paths.parent(path)]
            gen = self.next_gen()
            self.nodes[path] = Node(value or b"", perms, [], gen, gen)
            parent.children.append(paths.basename(path))
            parent.cgen = gen
            self.owned[perms[0].domid] += 1
            return
        if perms[0].domid != node.perms[0].domid and path != "/":  # "/" is nobody's quota
            self.owned[node.perms[0].domid] -= 1
            self.owned[perms[0].domid] += 1
        if value is not None:
            node.value = value
        node.perms = perms
        node.gen = self.next_gen()

    def ensure(self, path: str, perms: Perms) -> None:
        if path not in self.nodes:
            self.put(path, b"", perms)

    def remove(self, path: str) -> list[Removed]:
        """Delete `path` and its subtree; returns the deleted nodes in post-order."""
        node = self.nodes.get(path)
        if node is None or path == "/":
            return []
        parent = self.nodes[paths.parent(path)]
        out = self._collect(path, parent.perms)
        for r in out:
            self.owned[r.perms[0].domid] -= 1
            del self.nodes[r.path]
        parent.children.remove(paths.basename(path))
        parent.cgen = self.next_gen()
        return out

    def _collect(self, root: str, root_parent_perms: Perms) -> list[Removed]:
        # Iterative post-order walk: deep trees must not exhaust the stack (XSA-418).
        out: list[Removed] = []
        stack: list[tuple[str, Perms, bool]] = [(root, root_parent_perms, False)]
        while stack:
            path, pperms, expanded = stack.pop()
            node = self.nodes[path]
            if expanded:
                out.append(Removed(path, node.perms, pperms))
                continue
            stack.append((path, pperms, True))
            for child in reversed(node.children):
                stack.append((paths.join(path, child), node.perms, False))
        return out

    def walk(self, root: str = "/") -> Iterator[tuple[str, Node]]:
        """Every node below and including `root`, parents before children, in order."""
        stack = [root]
        while stack:
            path = stack.pop()
            node = self.nodes[path]
            yield path, node
            stack.extend(paths.join(path, c) for c in reversed(node.children))

    # -- consistency ---------------------------------------------------------------------

    def check(self) -> list[str]:
        """Problems with the tree's invariants (CONTROL check); empty when consistent."""
        problems: list[str] = []
        seen = 0
        owned: Counter[int] = Counter()
        for path, node in self.walk():
            seen += 1
            if path != "/":
                owned[node.perms[0].domid] += 1
            if len(set(node.children)) != len(node.children):
                problems.append(f"{path}: duplicate children")
            for c in node.children:
                if paths.join(path, c) not in self.nodes:
                    problems.append(f"{path}: child {c} missing")
        if seen != len(self.nodes):
            problems.append(f"{len(self.nodes) - seen} unreachable nodes")
        if +owned != +self.owned:
            problems.append("per-domain node counts disagree with the tree")
        return problems

    # -- durability ----------------------------------------------------------------------

    def dump(self) -> dict[str, Any]:
        nodes = [
            [
                path,
                base64.b64encode(node.value).decode(),
                [p.encode().decode() + ("!" if p.ignored else "") for p in node.perms],
            ]
            for path, node in self.walk()
        ]
        specials = {k: [p.encode().decode() for p in v] for k, v in self.specials.items()}
        return {"gen": self.gen, "nodes": nodes, "specials": specials}

    @classmethod
    def load(cls, data: dict[str, Any]) -> Store:
        store = cls()
        for path, value, perms in data["nodes"]:
            plist = tuple(
                Perm(p[0], int(p[1:].rstrip("!")), ignored=p.endswith("!")) for p in perms
            )
            if path == "/":
                store.nodes["/"].perms = plist
                continue
            store.put(path, base64.b64decode(value), plist)
        for k, v in data.get("specials", {}).items():
            store.specials[k] = tuple(Perm(p[0], int(p[1:])) for p in v)
        store.gen = max(store.gen, int(data["gen"]))
        return store

    def to_json(self) -> bytes:
        return json.dumps(self.dump(), separators=(",", ":")).encode()


class StoreAccess:
    """Direct access to the committed tree (requests outside a transaction)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def node(self, path: str) -> Node | None:
        return self.store.nodes.get(path)

    def children(self, path: str) -> list[str]:
        node = self.store.nodes.get(path)
        return node.children if node else []

    def put(self, path: str, value: bytes | None, perms: Perms) -> None:
        self.store.put(path, value, perms)

    def ensure(self, path: str, perms: Perms) -> None:
        self.store.ensure(path, perms)

    def remove(self, path: str) -> list[Removed]:
        return self.store.remove(path)

    def explicit(self, path: str) -> None:
        pass

    def owned_delta(self, domid: int) -> int:
        return 0


# Effects a transaction replays at commit, in order.
@dataclass(frozen=True, slots=True)
class Put:
    path: str
    value: bytes | None
    perms: Perms


@dataclass(frozen=True, slots=True)
class Ensure:
    path: str
    perms: Perms


@dataclass(frozen=True, slots=True)
class Remove:
    path: str


Effect = Put | Ensure | Remove


@dataclass
class Transaction:
    """One open transaction of one connection (ids are per connection)."""

    tx_id: int
    conn_id: int
    overlay: dict[str, Node | None] = field(default_factory=dict)
    seen: dict[str, Node | None] = field(default_factory=dict)
    base_cgen: dict[str, int] = field(default_factory=dict)
    reads: dict[str, int | None] = field(default_factory=dict)
    child_reads: dict[str, int] = field(default_factory=dict)
    implied: dict[str, Perms] = field(default_factory=dict)
    hard: set[str] = field(default_factory=set)
    #: An error that doomed the transaction (its commit answers with it).
    failed: str | None = None
    effects: list[Effect] = field(default_factory=list)
    owned: Counter[int] = field(default_factory=Counter)
    #: Changes to report to watches if the commit succeeds (queued by the node operations).
    pending: list[Any] = field(default_factory=list)

    def accessed(self) -> int:
        return len(self.reads.keys() | self.overlay.keys())


class TxAccess:
    """A transaction's isolated view: its own writes visible to it, no one else's."""

    def __init__(self, store: Store, tx: Transaction) -> None:
        self.store = store
        self.tx = tx

    def node(self, path: str) -> Node | None:
        tx = self.tx
        if path in tx.overlay:
            return tx.overlay[path]
        if path in tx.seen:
            return tx.seen[path]
        # First look: remember what was seen, as it was.  Later reads in the transaction
        # see the same thing even if the node changes outside (the commit then fails).
        node = self.store.nodes.get(path)
        snap = node.copy() if node is not None else None
        tx.seen[path] = snap
        if path not in tx.reads:
            tx.reads[path] = node.gen if node is not None else None
        return snap

    def explicit(self, path: str) -> None:
        """The request looks at `path` itself: an implied parent stops being merely implied."""
        tx = self.tx
        tx.hard.add(path)
        if path in tx.implied:
            del tx.implied[path]
            tx.reads[path] = None

    def children(self, path: str) -> list[str]:
        tx = self.tx
        node = self.node(path)
        if node is None:
            return []
        if path in tx.overlay:
            if path in tx.base_cgen and path not in tx.child_reads:
                tx.child_reads[path] = tx.base_cgen[path]
        elif path not in tx.child_reads:
            tx.child_reads[path] = node.cgen
        return node.children

    def _writable(self, path: str) -> Node | None:
        """The overlay copy of `path` (copied from the tree on first write)."""
        tx = self.tx
        if path in tx.overlay:
            return tx.overlay[path]
        snap = self.node(path)
        if snap is None:
            return None
        tx.overlay[path] = snap
        tx.base_cgen[path] = snap.cgen
        return snap

    def put(self, path: str, value: bytes | None, perms: Perms) -> None:
        tx = self.tx
        node = self._writable(path)
        if node is None:
            parent = self._writable(paths.parent(path))
            if parent is None:
                raise XsError("ENOENT", "parent vanished in transaction", field="path")
            tx.overlay[path] = Node(value or b"", perms, [], 0, 0)
            _add_child(parent, paths.basename(path))
            tx.owned[perms[0].domid] += 1
        else:
            if perms[0].domid != node.perms[0].domid and path != "/":
                tx.owned[node.perms[0].domid] -= 1
                tx.owned[perms[0].domid] += 1
            if value is not None:
                node.value = value
            node.perms = perms
        tx.effects.append(Put(path, value, perms))

    def ensure(self, path: str, perms: Perms) -> None:
        tx = self.tx
        if self.node(path) is not None:
            return
        if tx.reads.get(path, 0) is None and path not in tx.hard:
            # Only implied: absent now, and the commit accepts it having appeared since
            # with the same permissions.
            del tx.reads[path]
            tx.implied[path] = perms
        parent = self._writable(paths.parent(path))
        if parent is None:
            raise XsError("ENOENT", "parent vanished in transaction", field="path")
        tx.overlay[path] = Node(b"", perms, [], 0, 0)
        _add_child(parent, paths.basename(path))
        tx.owned[perms[0].domid] += 1
        tx.effects.append(Ensure(path, perms))

    def remove(self, path: str) -> list[Removed]:
        tx = self.tx
        node = self.node(path)
        if node is None or path == "/":
            return []
        parent = self._writable(paths.parent(path))
        assert parent is not None
        out: list[Removed] = []
        stack: list[tuple[str, Perms, bool]] = [(path, parent.perms, False)]
        while stack:
            p, pperms, expanded = stack.pop()
            n = self.node(p)
            if n is None:
                continue
            if expanded:
                out.append(Removed(p, n.perms, pperms))
                continue
            stack.append((p, pperms, True))
            for child in reversed(self.children(p)):
                stack.append((paths.join(p, child), n.perms, False))
        for r in out:
            tx.overlay[r.path] = None
            tx.owned[r.perms[0].domid] -= 1
        name = paths.basename(path)
        if name in parent.children:  # snapshots of parent and child may differ in time
            parent.children.remove(name)
        tx.effects.append(Remove(path))
        return out

    def owned_delta(self, domid: int) -> int:
        return self.tx.owned[domid]


# T:460 How a commit merges
# A transaction never copies the tree.  It remembers what it saw (the generation of each
# node it read, of each children list it listed, and the permissions of the parents it
# would create on the way), and what it did, as a list of effects.  Commit checks only
# what it saw: if that is unchanged, its answers would have been the same on today's
# tree, so its effects are replayed there.  New children are appended to the
# directory's current list, which is why two vbds created in parallel both commit.
# :T
def _add_child(parent: Node, name: str) -> None:
    # A transaction's snapshot of a parent may be younger than its snapshot of the child
    # (taken at first look each): never list a child twice.  The commit fails anyway.
    if name not in parent.children:
        parent.children.append(name)


def conflicts(store: Store, tx: Transaction) -> str | None:
    """Why `tx` cannot commit onto the current tree, or None if it can."""
    nodes = store.nodes
    for path, gen in tx.reads.items():
        node = nodes.get(path)
        if (node.gen if node is not None else None) != gen:
            return f"{path} changed"
    for path, cgen in tx.child_reads.items():
        node = nodes.get(path)
        if node is None or node.cgen != cgen:
            return f"children of {path} changed"
    for path, perms in tx.implied.items():
        node = nodes.get(path)
        if node is not None and node.perms != perms:
            return f"{path} appeared with other permissions"
    return None


def apply(store: Store, tx: Transaction) -> None:
    """Replay a transaction's effects onto the committed tree (after `conflicts`)."""
    for effect in tx.effects:
        if isinstance(effect, Put):
            if effect.path not in store.nodes and paths.parent(effect.path) not in store.nodes:
                continue  # its parent was removed later in this transaction's own order
            store.put(effect.path, effect.value, effect.perms)
        elif isinstance(effect, Ensure):
            if paths.parent(effect.path) in store.nodes:
                store.ensure(effect.path, effect.perms)
        else:
            store.remove(effect.path)
