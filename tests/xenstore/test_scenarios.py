"""Table-driven scenarios against the sans-IO server: (connection, transaction, request,
expected reply), in the style of ocaml-xenstore's server tests.  Each table runs top to
bottom on a fresh server; `tx` names a transaction opened earlier in the table ("t1")."""

from __future__ import annotations

from typing import Any

import pytest

from pvio.abi.xs_wire import XsdSockmsgType as T
from pvio.xenstore.wire import join_args
from xs_harness import OK, Harness

R, W, MK, RM, DIR, GP, SP = (T.XS_READ, T.XS_WRITE, T.XS_MKDIR, T.XS_RM, T.XS_DIRECTORY,
                             T.XS_GET_PERMS, T.XS_SET_PERMS)
WATCH, START, END = T.XS_WATCH, T.XS_TRANSACTION_START, T.XS_TRANSACTION_END


def a(*args: str) -> bytes:
    return join_args(*args)


def wv(path: str, value: str) -> bytes:
    return path.encode() + b"\0" + value.encode()


Row = tuple[str, str | int, int, bytes, Any]


def run_table(rows: list[Row], h: Harness | None = None) -> Harness:
    h = h or Harness()
    txs: dict[str, int] = {}
    for i, (conn, tx, type_, payload, expected) in enumerate(rows):
        if type_ == START and isinstance(tx, str) and tx:
            txs[tx] = h.start(conn)
            continue
        tx_id = txs[tx] if isinstance(tx, str) and tx else int(tx or 0)
        got = h.req(conn, type_, payload, tx_id)
        if callable(expected):
            assert expected(got), (i, conn, payload, got)
        else:
            if isinstance(expected, str) and not expected.startswith("E"):
                expected = expected.encode()
            assert got == expected, (i, conn, T(type_).name, payload, got)
    h.check()
    return h


PERMISSIONS: list[Row] = [
    ("dom0", 0, MK, a("/local/domain/1"), OK),
    ("dom0", 0, SP, a("/local/domain/1", "n1"), OK),
    ("dom0", 0, MK, a("/local/domain/2"), OK),
    ("dom0", 0, SP, a("/local/domain/2", "n2"), OK),
    # d1 creates below its home with a relative path and owns what it creates
    ("d1", 0, W, wv("data/x", "v"), OK),
    ("d1", 0, GP, a("data/x"), "n1\0"),
    ("d1", 0, R, a("/local/domain/1/data/x"), "v"),
    ("d1", 0, R, a("data/nope"), "ENOENT"),
    # d2 may neither read nor learn what exists there (errno hiding)
    ("d2", 0, R, a("/local/domain/1/data/x"), "EACCES"),
    ("d2", 0, R, a("/local/domain/1/data/nope"), "EACCES"),
    ("d2", 0, DIR, a("/local/domain/1"), "EACCES"),
    ("d2", 0, W, wv("/local/domain/1/data/x", "z"), "EACCES"),
    ("d2", 0, W, wv("/local/domain/1/new", "z"), "EACCES"),
    ("d2", 0, RM, a("/local/domain/1/data/x"), "EACCES"),
    # an ACL entry grants read
    ("d1", 0, SP, a("data/x", "n1", "r2"), OK),
    ("d2", 0, R, a("/local/domain/1/data/x"), "v"),
    ("d2", 0, W, wv("/local/domain/1/data/x", "z"), "EACCES"),
    ("d2", 0, SP, a("/local/domain/1/data/x", "n2"), "EACCES"),
    # the owner may not give a node away, nor set more than 5 entries
    ("d1", 0, SP, a("data/x", "n2"), "EPERM"),
    ("d1", 0, SP, a("data/x", "n1", "r2", "r3", "r4", "r5", "r6"), "ENOSPC"),
    ("d1", 0, SP, a("data/x", "q1"), "EINVAL"),
    ("d1", 0, SP, a("data/x"), "EINVAL"),
    ("d1", 0, SP, a("data/x", "b1", "w0x2"), OK),
    ("d1", 0, GP, a("data/x"), "b1\0w2\0"),
    ("d2", 0, W, wv("/local/domain/1/data/x", "by2"), OK),
    ("d2", 0, R, a("/local/domain/1/data/x"), "EACCES"),
    # the toolstack may do anything, including changing the owner
    ("dom0", 0, SP, a("/local/domain/1/data/x", "n2", "r1"), OK),
    ("d2", 0, R, a("/local/domain/1/data/x"), "by2"),
    ("d1", 0, W, wv("data/x", "no"), "EACCES"),
    # toolstack-only operations
    ("d1", 0, T.XS_INTRODUCE, a("9", "0", "1"), "EACCES"),
    ("d1", 0, T.XS_IS_DOMAIN_INTRODUCED, a("1"), "EACCES"),
    ("d1", 0, T.XS_RELEASE, a("2"), "EACCES"),
    ("d1", 0, T.XS_SET_TARGET, a("1", "2"), "EACCES"),
    ("d1", 0, T.XS_CONTROL, a("check"), "EACCES"),
    ("d1", 0, T.XS_GET_DOMAIN_PATH, a("2"), "/local/domain/2\0"),
    ("dom0", 0, T.XS_IS_DOMAIN_INTRODUCED, a("2"), "T\0"),
    ("dom0", 0, T.XS_IS_DOMAIN_INTRODUCED, a("77"), "F\0"),
    # the special nodes are the toolstack's
    ("d1", 0, GP, a("@releaseDomain"), "EACCES"),
    ("dom0", 0, GP, a("@releaseDomain"), "n0\0"),
    ("d1", 0, R, a("@releaseDomain"), "EINVAL"),
    ("dom0", 0, T.XS_CONTROL, a("check"), OK),
]

TRANSACTIONS: list[Row] = [
    ("dom0", "t1", START, b"", None),
    ("c2", "u1", START, b"", None),
    ("dom0", "t1", W, wv("/t/a", "1"), OK),
    ("dom0", "t1", R, a("/t/a"), "1"),
    ("c2", 0, R, a("/t/a"), "ENOENT"),  # isolation
    ("c2", "u1", W, wv("/t/b", "2"), OK),
    ("dom0", "t1", DIR, a("/t"), "a\0"),
    ("dom0", "t1", END, b"T\0", OK),
    ("c2", "u1", END, b"T\0", OK),  # both created /t implicitly, and different children
    ("dom0", 0, DIR, a("/t"), "a\0b\0"),
    # listing a directory makes its children part of what the transaction depends on
    ("dom0", "t0", START, b"", None),
    ("dom0", "t0", DIR, a("/t"), "a\0b\0"),
    ("dom0", "t0", W, wv("/t/n", "0"), OK),
    ("c2", 0, W, wv("/t/z", "z"), OK),
    ("dom0", "t0", END, b"T\0", "EAGAIN"),
    ("c2", 0, RM, a("/t/z"), OK),
    # disjoint creations in one directory both commit (merging)
    ("dom0", "t2", START, b"", None),
    ("c2", "u2", START, b"", None),
    ("dom0", "t2", W, wv("/t/c", "3"), OK),
    ("c2", "u2", W, wv("/t/d", "4"), OK),
    ("dom0", "t2", END, b"T\0", OK),
    ("c2", "u2", END, b"T\0", OK),
    ("dom0", 0, DIR, a("/t"), "a\0b\0c\0d\0"),
    # read-modify-write conflict on one node
    ("dom0", "t3", START, b"", None),
    ("dom0", "t3", R, a("/t/b"), "2"),
    ("c2", 0, W, wv("/t/b", "x"), OK),
    ("dom0", "t3", R, a("/t/b"), "2"),  # the transaction keeps its snapshot
    ("dom0", "t3", W, wv("/t/b", "y"), OK),
    ("dom0", "t3", END, b"T\0", "EAGAIN"),
    ("dom0", 0, R, a("/t/b"), "x"),
    # ids, nesting, bad ends
    ("dom0", 99, R, a("/t/b"), "ENOENT"),
    ("dom0", "t4", START, b"", None),
    ("dom0", "t4", START, b"\0", "EBUSY"),
    ("dom0", "t4", END, b"X\0", "EINVAL"),
    ("dom0", 0, END, b"T\0", "ENOENT"),
    ("dom0", "t4", RM, a("/t/c"), OK),
    ("dom0", "t4", END, b"F\0", OK),
    ("dom0", 0, R, a("/t/c"), "3"),
    ("dom0", "t4", R, a("/t/c"), "ENOENT"),  # the transaction is gone
    # a created-then-removed node inside a transaction leaves nothing (XSA-421)
    ("dom0", "t5", START, b"", None),
    ("dom0", "t5", W, wv("/t/tmp/deep", "1"), OK),
    ("dom0", "t5", RM, a("/t/tmp"), OK),
    ("dom0", "t5", END, b"T\0", OK),
    ("dom0", 0, DIR, a("/t"), "a\0b\0c\0d\0"),
    # a read-only transaction whose node is untouched commits
    ("dom0", "t6", START, b"", None),
    ("dom0", "t6", R, a("/t/d"), "4"),
    ("c2", 0, W, wv("/t/e", "5"), OK),
    ("dom0", "t6", END, b"T\0", OK),
]


def test_permissions_across_domains() -> None:
    run_table(PERMISSIONS)


def test_transactions() -> None:
    h = Harness()
    h.conn("c2", domid=0)
    run_table(TRANSACTIONS, h)


def test_transaction_ids_are_per_connection_and_nonzero() -> None:
    h = Harness()
    h.conn("c2", domid=0)
    assert h.start("dom0") == 1 and h.start("c2") == 1 and h.start("dom0") == 2


def test_transaction_limit_for_domains() -> None:
    h = Harness()
    for _ in range(10):
        h.start("d3")
    assert h.req("d3", START, b"\0") == "ENOSPC"
    for _ in range(20):
        h.start("dom0")


def _vbd_tx(h: Harness, conn: str, tx: int, fe: int, be: int, devid: int) -> None:
    """What libxl writes for one vbd, in one transaction (reference notes, section 4)."""
    fpath = f"/local/domain/{fe}/device/vbd/{devid}"
    bpath = f"/local/domain/{be}/backend/vbd/{fe}/{devid}"
    steps: list[tuple[int, bytes]] = [
        (RM, a(fpath)), (MK, a(fpath)), (SP, a(fpath, f"n{fe}", f"r{be}")),
        (W, wv(f"{fpath}/backend", bpath)), (W, wv(f"{fpath}/backend-id", str(be))),
        (W, wv(f"{fpath}/state", "1")), (W, wv(f"{fpath}/virtual-device", str(devid))),
        (RM, a(bpath)), (MK, a(bpath)), (SP, a(bpath, f"n{be}", f"r{fe}")),
        (W, wv(f"{bpath}/frontend", fpath)), (W, wv(f"{bpath}/frontend-id", str(fe))),
        (W, wv(f"{bpath}/online", "1")), (W, wv(f"{bpath}/state", "1")),
        (W, wv(f"{bpath}/params", f"/img/{devid}")),
    ]
    for type_, payload in steps:
        got = h.req(conn, type_, payload, tx)
        # libxl ignores the answer to its clean-up RM (ENOENT when the parent is new)
        assert got == OK or (type_ == RM and got == "ENOENT"), (type_, payload, got)


@pytest.mark.parametrize("interleave", [False, True])
def test_two_parallel_vbd_creations_both_commit(interleave: bool) -> None:
    h = Harness()
    h.conn("tool2", domid=0)
    h.server.introduce(1)
    h.write("dom0", "/local/domain/1", "")
    h.req("dom0", SP, a("/local/domain/1", "n1"))
    t1, t2 = h.start("dom0"), h.start("tool2")
    if interleave:
        _vbd_tx(h, "dom0", t1, 1, 0, 51712)
        _vbd_tx(h, "tool2", t2, 1, 0, 51728)
    else:
        _vbd_tx(h, "tool2", t2, 1, 0, 51728)
        _vbd_tx(h, "dom0", t1, 1, 0, 51712)
    assert h.end("dom0", t1) == OK
    assert h.end("tool2", t2) == OK
    assert h.req("dom0", DIR, a("/local/domain/1/device/vbd")) == b"51712\x0051728\0"
    assert h.req("dom0", DIR, a("/local/domain/0/backend/vbd/1")) == b"51712\x0051728\0"
    assert h.read("dom0", "/local/domain/1/device/vbd/51728/state") == b"1"
    h.check()


def test_same_vbd_twice_conflicts() -> None:
    h = Harness()
    h.conn("tool2", domid=0)
    h.server.introduce(1)
    t1, t2 = h.start("dom0"), h.start("tool2")
    _vbd_tx(h, "dom0", t1, 1, 0, 51712)
    _vbd_tx(h, "tool2", t2, 1, 0, 51712)
    assert h.end("dom0", t1) == OK
    assert h.end("tool2", t2) == "EAGAIN"


def test_watch_events_of_a_transaction_fire_only_on_commit() -> None:
    h = Harness()
    h.conn("w", domid=0)
    assert h.req("w", WATCH, a("/x", "tok")) == OK
    assert h.events["w"] == [("/x", "tok")]
    t = h.start("dom0")
    h.write("dom0", "/x/a", "1", t)
    assert h.events["w"] == [("/x", "tok")]
    h.end("dom0", t, commit=False)
    t = h.start("dom0")
    h.write("dom0", "/x/b", "1", t)
    h.end("dom0", t)
    assert h.events["w"] == [("/x", "tok"), ("/x/b", "tok")]


def test_implied_parent_with_other_perms_conflicts() -> None:
    h = Harness()
    h.conn("tool2", domid=0)
    t1 = h.start("dom0")
    h.write("dom0", "/p/q/r", "1", t1)
    h.write("tool2", "/p/q", "")
    h.req("tool2", SP, a("/p/q", "n0", "r5"))
    assert h.end("dom0", t1) == "EAGAIN"


def test_snapshots_taken_at_different_times_stay_consistent() -> None:
    """A transaction sees the child before an outside RM and the parent after it."""
    h = Harness()
    h.conn("c2", domid=0)
    h.write("dom0", "/s/a/b", "1")
    t = h.start("dom0")
    assert h.read("dom0", "/s/a/b", t) == b"1"
    h.req("c2", RM, a("/s/a/b"))
    h.req("c2", W, wv("/s/a/c", "2"))
    assert h.req("dom0", RM, a("/s/a/b"), t) == OK
    assert h.read("dom0", "/s/x", t) == "ENOENT"
    h.req("c2", W, wv("/s/x", "3"))
    assert h.write("dom0", "/s/x", "mine", t) == OK
    assert h.req("dom0", DIR, a("/s"), t) == b"a\0x\0"
    assert h.end("dom0", t) == "EAGAIN"
    h.check()
