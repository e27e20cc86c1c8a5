"""Single-request semantics of Xen 4.17's daemon that the tables elsewhere do not show:
argument parsing, path rules, watches' details, domain operations."""

from __future__ import annotations

import pytest

from pvio.abi.xs_wire import XsdSockmsgType as T
from pvio.xenstore.wire import join_args
from xs_harness import OK, Harness


def a(*args: str) -> bytes:
    return join_args(*args)


@pytest.mark.parametrize(
    ("type_", "payload", "expected"),
    [
        (T.XS_READ, b"", "EINVAL"),
        (T.XS_READ, b"/tool", "EINVAL"),  # no NUL
        (T.XS_READ, b"/tool\0/x\0", "EINVAL"),  # two strings
        (T.XS_READ, a("/tool/"), "EINVAL"),
        (T.XS_READ, a("//tool"), "EINVAL"),
        (T.XS_READ, a("/to ol"), "EINVAL"),
        (T.XS_READ, a("/to.ol"), "EINVAL"),
        (T.XS_READ, a(""), "EINVAL"),  # what xenstore-rm -t finally sends
        (T.XS_READ, a("/"), b""),
        (T.XS_WRITE, b"/novalue", "EINVAL"),
        (T.XS_WRITE, b"/bin\0a\0b\xff", OK),  # values are bytes, NULs included
        (T.XS_DIRECTORY_PART, a("/tool"), "EINVAL"),
        (T.XS_DIRECTORY_PART, a("/tool", "0"), lambda r: r.endswith(b"\0xenstored\0\0")),
        (T.XS_DIRECTORY_PART, a("/tool", "99"), lambda r: r.endswith(b"\0\0") and r.count(b"\0") == 2),
        (T.XS_GET_DOMAIN_PATH, a("7"), b"/local/domain/7\0"),
        (T.XS_GET_DOMAIN_PATH, a("-1"), b"/local/domain/4294967295\0"),
        (T.XS_GET_DOMAIN_PATH, a("junk"), b"/local/domain/0\0"),
        (T.XS_INTRODUCE, a("5", "0"), "EINVAL"),
        (T.XS_INTRODUCE, a("5", "0", "0"), "EINVAL"),
        (T.XS_INTRODUCE, a("x5", "0", "1"), "EINVAL"),
        (T.XS_INTRODUCE, a("5", "77", "1"), OK),
        (T.XS_RESUME, a("5"), "ENOENT"),
        (T.XS_SET_TARGET, a("5", "6"), "ENOENT"),
        (T.XS_IS_DOMAIN_INTRODUCED, a(str(0x7FF0)), b"T\0"),
        (T.XS_TRANSACTION_END, a("T"), "ENOENT"),
        (T.XS_WATCH, a("/x"), "EINVAL"),
        (T.XS_UNWATCH, a("/x", "nope"), "ENOENT"),
        (T.XS_CONTROL, a("help"), lambda r: b"check" in r),
        (T.XS_CONTROL, a("frobnicate"), "EINVAL"),
        (15, a("/x", "t"), "ENOSYS"),  # WATCH_EVENT is not a request
        (16, b"", "ENOSYS"),
        (20, b"", "ENOSYS"),  # XS_RESTRICT was removed
        (23, b"", "ENOSYS"),
        (0xFFFF, b"", "ENOSYS"),
    ],
)
def test_single_requests(type_: int, payload: bytes, expected: object) -> None:
    h = Harness()
    h.write("dom0", "/tool/xenstored", "")
    got = h.req("dom0", type_, payload)
    if callable(expected):
        assert isinstance(got, bytes) and expected(got), got
    else:
        assert got == expected


def test_relative_watch_gives_relative_events_for_domains_and_sockets() -> None:
    h = Harness()
    h.conn("d1")
    h.write("dom0", "/local/domain/1", "")
    h.req("dom0", T.XS_SET_PERMS, a("/local/domain/1", "n1"))
    assert h.req("d1", T.XS_WATCH, a("data", "rel")) == OK
    assert h.req("dom0", T.XS_WATCH, a("mine", "rel0")) == OK
    h.write("d1", "data/x", "1")
    h.write("dom0", "/local/domain/0/mine/y", "1")
    assert h.events["d1"] == [("data", "rel"), ("data/x", "rel")]
    assert h.events["dom0"] == [("mine", "rel0"), ("mine/y", "rel0")]


def test_watch_details() -> None:
    h = Harness()
    assert h.req("dom0", T.XS_WATCH, a("/w", "t")) == OK
    assert h.req("dom0", T.XS_WATCH, a("/w", "t")) == "EEXIST"
    assert h.req("dom0", T.XS_WATCH, a("/w", "u")) == OK  # same path, other token
    h.write("dom0", "/w", "same")
    h.write("dom0", "/w", "same")  # unchanged value: still an event
    assert h.req("dom0", T.XS_MKDIR, a("/w")) == OK  # existing: no event
    assert h.events["dom0"].count(("/w", "t")) == 3  # registration + two writes
    h.req("dom0", T.XS_RM, a("/w"))
    assert h.events["dom0"][-2:] == [("/w", "t"), ("/w", "u")]
    # the event comes before the write's reply
    kinds = [p.type for p in h.log["dom0"][-2:]]
    assert kinds[-1] == T.XS_RM and kinds[-2] == T.XS_WATCH_EVENT


def test_rm_fires_exact_watches_on_deleted_descendants() -> None:
    h = Harness()
    h.conn("w", domid=0)
    h.write("dom0", "/r/a/b", "")
    for p in ("/r/a/b", "/r/a/b/never", "/r", "/"):
        h.req("w", T.XS_WATCH, a(p, p))
    h.events["w"].clear()
    h.req("dom0", T.XS_RM, a("/r/a"))
    assert sorted(h.events["w"]) == sorted([("/r/a/b", "/r/a/b"), ("/r/a", "/r"), ("/r/a", "/")])


def test_introduce_and_release_fire_special_watches() -> None:
    h = Harness()
    h.req("dom0", T.XS_WATCH, a("@introduceDomain", "i"))
    h.req("dom0", T.XS_WATCH, a("@releaseDomain", "r"))
    h.req("dom0", T.XS_INTRODUCE, a("3", "0", "1"))
    h.req("dom0", T.XS_INTRODUCE, a("0", "0", "1"))  # dom0: no event
    h.req("dom0", T.XS_RESUME, a("3"))
    h.req("dom0", T.XS_RELEASE, a("3"))
    assert h.events["dom0"] == [("@introduceDomain", "i"), ("@releaseDomain", "r"),
                                ("@introduceDomain", "i"), ("@releaseDomain", "r")]


def test_reintroduce_resets_the_domains_connections() -> None:
    h = Harness()
    h.conn("d2")
    h.req("d2", T.XS_WATCH, a("@releaseDomain", "x"))
    t = h.start("d2")
    h.req("dom0", T.XS_INTRODUCE, a("2", "0", "1"))
    assert h.read("d2", "/tool", tx=t) == "ENOENT"  # the transaction is gone
    assert h.server.watches.count[2] == 0
