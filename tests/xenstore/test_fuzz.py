"""Property-based tests of the store: random requests from several connections never
crash the server or break the tree's invariants; dom0's plain operations agree with a
dictionary model; and merged transactions are serializable in commit order."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pvio.abi.xs_wire import XsdSockmsgType as T
from pvio.xenstore.wire import encode, join_args
from xs_harness import Harness

NAMES = st.sampled_from(["a", "b", "c", "dd"])
PATHS = st.lists(NAMES, min_size=1, max_size=3).map(lambda p: "/" + "/".join(p))
VALUES = st.binary(max_size=8)
CONNS = st.sampled_from(["dom0", "d1", "d2"])

OPS = st.one_of(
    st.tuples(st.just(T.XS_WRITE), PATHS, VALUES),
    st.tuples(st.just(T.XS_READ), PATHS, st.just(b"")),
    st.tuples(st.just(T.XS_MKDIR), PATHS, st.just(b"")),
    st.tuples(st.just(T.XS_RM), PATHS, st.just(b"")),
    st.tuples(st.just(T.XS_DIRECTORY), PATHS, st.just(b"")),
    st.tuples(st.just(T.XS_GET_PERMS), PATHS, st.just(b"")),
    st.tuples(st.just(T.XS_SET_PERMS), PATHS,
              st.sampled_from([b"n0", b"b1", b"n1\0r2", b"r2\0w1", b"n0\0b1\0b2"])),
    st.tuples(st.just(T.XS_WATCH), PATHS, st.sampled_from([b"t1", b"t2"])),
    st.tuples(st.just(T.XS_UNWATCH), PATHS, st.sampled_from([b"t1", b"t2"])),
    st.tuples(st.just(T.XS_TRANSACTION_START), st.just(""), st.just(b"")),
    st.tuples(st.just(T.XS_TRANSACTION_END), st.just(""), st.sampled_from([b"T", b"F"])),
    st.tuples(st.just(T.XS_RESET_WATCHES), st.just(""), st.just(b"")),
    st.tuples(st.just(T.XS_RELEASE), st.just(""), st.sampled_from([b"1", b"2"])),
)


def payload_for(type_: int, path: str, extra: bytes) -> bytes:
    if type_ == T.XS_WRITE:
        return path.encode() + b"\0" + extra
    if type_ in (T.XS_SET_PERMS, T.XS_WATCH, T.XS_UNWATCH):
        return path.encode() + b"\0" + extra + b"\0"
    if type_ in (T.XS_TRANSACTION_START, T.XS_RESET_WATCHES):
        return b"\0"
    if type_ in (T.XS_TRANSACTION_END, T.XS_RELEASE):
        return extra + b"\0"
    return join_args(path)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(CONNS, OPS, st.integers(0, 3)), max_size=40))
def test_random_requests_keep_the_store_consistent(
    steps: list[tuple[str, tuple[int, str, bytes], int]]
) -> None:
    h = Harness()
    for conn, (type_, path, extra), tx in steps:
        if conn in h.closed:
            continue
        if type_ == T.XS_RELEASE:
            conn = "dom0"
        h.conn(conn)
        replies = h.raw(conn, encode(type_, payload_for(type_, path, extra), req_id=5, tx_id=tx))
        if conn not in h.closed:
            assert len(replies) == 1 and replies[0].req_id == 5
            assert replies[0].type in (type_, T.XS_ERROR)
        h.check()
        if type_ == T.XS_RELEASE:  # domain gone: let a new one take the id
            for name in [n for n in h.closed if n.startswith("d")]:
                del h.conns[name]
                h.closed.discard(name)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.integers(0, 30), CONNS)
def test_garbage_payloads_get_answers_not_crashes(payload: bytes, type_: int, conn: str) -> None:
    h = Harness()
    h.conn("other", domid=0)
    h.write("other", "/k", "v")
    replies = h.raw(conn, encode(type_, payload, req_id=9))
    assert len(replies) == 1 and replies[0].req_id == 9
    assert h.read("other", "/k") == b"v"
    h.check()


def model_apply(model: dict[str, bytes], order: dict[str, list[str]], type_: int, path: str,
                value: bytes) -> bytes | str:
    """A dictionary model of dom0's view (no permissions, no watches)."""
    def parent(p: str) -> str:
        return p.rsplit("/", 1)[0] or "/"

    def create(p: str, v: bytes) -> None:
        chain = []
        while p not in model:
            chain.append(p)
            p = parent(p)
        for q in reversed(chain):
            model[q] = b""
            order.setdefault(parent(q), []).append(q.rsplit("/", 1)[1])
            order[q] = []
        model[chain[0]] = v

    if type_ == T.XS_WRITE:
        if path in model:
            model[path] = value
        else:
            create(path, value)
        return b"OK\0"
    if type_ == T.XS_MKDIR:
        if path not in model:
            create(path, b"")
        return b"OK\0"
    if type_ == T.XS_READ:
        return model.get(path, "ENOENT")
    if type_ == T.XS_DIRECTORY:
        if path not in model:
            return "ENOENT"
        return b"".join(c.encode() + b"\0" for c in order.get(path, []))
    if type_ == T.XS_RM:
        if path not in model:
            return b"OK\0" if parent(path) in model else "ENOENT"
        for p in [p for p in model if p == path or p.startswith(path + "/")]:
            del model[p]
            order.pop(p, None)
        order[parent(path)].remove(path.rsplit("/", 1)[1])
        return b"OK\0"
    raise AssertionError(type_)


PLAIN = st.sampled_from([T.XS_WRITE, T.XS_MKDIR, T.XS_READ, T.XS_DIRECTORY, T.XS_RM])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(PLAIN, PATHS, VALUES), max_size=40))
def test_dom0_operations_agree_with_a_dictionary_model(
    steps: list[tuple[int, str, bytes]]
) -> None:
    h = Harness()
    model: dict[str, bytes] = {"/": b""}
    order: dict[str, list[str]] = {"/": []}
    for type_, path, value in steps:
        payload = payload_for(type_, path, value)
        assert h.req("dom0", type_, payload) == model_apply(model, order, type_, path, value)


TX_OPS = st.lists(st.tuples(st.sampled_from([T.XS_WRITE, T.XS_READ, T.XS_RM, T.XS_DIRECTORY,
                                              T.XS_MKDIR]), PATHS, VALUES), max_size=6)


TX_SETUP = st.lists(st.tuples(st.sampled_from([T.XS_WRITE, T.XS_MKDIR, T.XS_SET_PERMS]),
                             PATHS, st.sampled_from([b"", b"v", b"n0", b"n0\0b1", b"b0"])),
                   max_size=6)


def _setup(h: Harness, setup: list[tuple[int, str, bytes]], domain: bool) -> None:
    if domain:  # domain 1 may write at the top, and owns what it creates there
        h.req("dom0", T.XS_SET_PERMS, join_args("/", "n0", "b1"))
    for type_, path, value in setup:
        h.req("dom0", type_, payload_for(type_, path, value))


@settings(max_examples=200, deadline=None)
@given(TX_SETUP, TX_OPS, TX_OPS, st.lists(st.booleans(), max_size=12), st.booleans())
# Found by a longer run: an RM's "parent exists?" answer is a read the commit must check.
@example([], [(T.XS_WRITE, "/a", b""), (T.XS_WRITE, "/c", b"")],
         [(T.XS_RM, "/c/a", b""), (T.XS_WRITE, "/c/a", b"")], [], False)
def test_merged_transactions_are_serializable_in_commit_order(
    setup: list[tuple[int, str, bytes]], ops1: list[tuple[int, str, bytes]],
    ops2: list[tuple[int, str, bytes]], interleave: list[bool], domain: bool,
) -> None:
    """Run two transactions interleaved (from dom0, or from two connections of domain 1,
    where permissions and ownership come into play); whatever commits must equal running
    the committed ones one after the other, replies included."""
    domid = 1 if domain else 0
    h = Harness()
    a_name, b_name = "x1", "x2"
    h.conn(a_name, domid=domid)
    h.conn(b_name, domid=domid)
    _setup(h, setup, domain)
    initial = {p: (n.value, n.perms, list(n.children)) for p, n in h.server.store.nodes.items()}

    t1, t2 = h.start(a_name), h.start(b_name)
    replies: dict[str, list[bytes | str]] = {a_name: [], b_name: []}
    queues = {a_name: list(ops1), b_name: list(ops2)}
    txs = {a_name: t1, b_name: t2}
    picks = iter(interleave)
    while queues[a_name] or queues[b_name]:
        first = (next(picks, True) and queues[a_name]) or not queues[b_name]
        who = a_name if first else b_name
        type_, path, value = queues[who].pop(0)
        replies[who].append(h.req(who, type_, payload_for(type_, path, value), txs[who]))
    r1 = h.end(a_name, t1)
    r2 = h.end(b_name, t2)
    final = {p: (n.value, n.perms, list(n.children)) for p, n in h.server.store.nodes.items()}

    # replay serially on a fresh server: setup, then each committed transaction alone
    s = Harness()
    s.conn("serial", domid=domid)
    _setup(s, setup, domain)
    assert {p: (n.value, n.perms, list(n.children))
            for p, n in s.server.store.nodes.items()} == initial
    for name, ops, result in ((a_name, ops1, r1), (b_name, ops2, r2)):
        if result != b"OK\0":
            assert result == "EAGAIN"
            continue
        serial = [s.req("serial", t, payload_for(t, p, v)) for t, p, v in ops]
        for (t, _, _), got, want in zip(ops, replies[name], serial, strict=True):
            if t == T.XS_RM and {got, want} == {b"OK\0", "ENOENT"}:
                continue  # RM of an absent node: a no-op whose answer is not re-checked
            assert got == want, name
    assert {p: (n.value, n.perms, list(n.children))
            for p, n in s.server.store.nodes.items()} == final
    assert s.server.store.owned == h.server.store.owned
    h.check()
