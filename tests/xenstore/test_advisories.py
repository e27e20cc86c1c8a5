"""One regression test per Xen security advisory touching xenstored, fed the input that
triggered it (reference notes, section 6).  Every test ends with the store's own
consistency check and, where it matters, shows that another connection is undisturbed."""

from __future__ import annotations

import struct

from pvio.abi.xs_wire import XsdSockmsgType as T
from pvio.xenstore.quotas import Quotas
from pvio.xenstore.wire import encode, join_args
from xs_harness import OK, Harness


def a(*args: str) -> bytes:
    return join_args(*args)


def home(h: Harness, domid: int) -> None:
    """/local/domain/<domid>, owned by the domain, as the toolstack sets it up."""
    h.conn(f"d{domid}")
    assert h.write("dom0", f"/local/domain/{domid}") == OK
    assert h.req("dom0", T.XS_SET_PERMS, a(f"/local/domain/{domid}", f"n{domid}")) == OK


def still_serves(h: Harness, name: str = "dom0") -> None:
    assert h.write(name, "/alive", "yes") == OK
    assert h.read(name, "/alive") == b"yes"
    h.check()


def test_xsa38_420_over_long_frame_closes_only_that_connection() -> None:
    h = Harness()
    home(h, 1)
    for length in (4097, 1 << 30, 0x7FFFFFFF, 0xFFFFFFFF):
        h = Harness()
        home(h, 1)
        replies = h.raw("d1", struct.pack("<4I", T.XS_WRITE, 1, 0, length) + b"x" * 64)
        assert replies == [] and "d1" in h.closed
        assert h.server.conns.get(h.conns["d1"]) is None
        assert 1 in h.server.domains  # the domain is not treated as dead (XSA-325)
        still_serves(h)


def test_xsa72_oversized_reply_is_e2big_and_directory_part_works() -> None:
    h = Harness()
    names = [f"child-with-a-long-name-{i:04d}" for i in range(200)]
    for n in names:
        h.write("dom0", f"/big/{n}", "")
    assert h.req("dom0", T.XS_DIRECTORY, a("/big")) == "E2BIG"
    got: list[str] = []
    offset = 0
    gen = None
    while True:
        r = h.req("dom0", T.XS_DIRECTORY_PART, a("/big", str(offset)))
        assert isinstance(r, bytes) and len(r) <= 4096
        g, _, rest = r.partition(b"\0")
        gen = gen or g
        assert g == gen
        if rest == b"\0":
            break
        end = rest.endswith(b"\0\0")
        chunk = rest[:-1] if end else rest
        got.extend(x.decode() for x in chunk.split(b"\0")[:-1])
        offset += len(chunk)
        if end:
            break
    assert got == names
    still_serves(h)


def test_xsa115_watches_are_filtered_by_read_permission() -> None:
    h = Harness()
    home(h, 1)
    home(h, 2)
    assert h.req("d1", T.XS_WATCH, a("/", "all")) == OK
    assert h.events["d1"] == [("/", "all")]  # the registration event fires regardless
    h.write("dom0", "/secret", "x")
    h.write("d2", "private", "x")
    h.write("d1", "mine", "x")
    assert h.events["d1"][1:] == [("/local/domain/1/mine", "all")]
    # special watches: a guest hears of domains only if the toolstack lets it
    assert h.req("d1", T.XS_WATCH, a("@introduceDomain", "intro")) == OK
    seen = len(h.events["d1"])
    h.server.introduce(7)
    h.dispatch(h.server._take())
    assert len(h.events["d1"]) == seen
    assert h.req("dom0", T.XS_SET_PERMS, a("@introduceDomain", "n0", "r1")) == OK
    h.dispatch(h.server._take())
    h.server.introduce(8)
    h.dispatch(h.server._take())
    assert h.events["d1"][-1] == ("@introduceDomain", "intro")
    assert h.req("d1", T.XS_IS_DOMAIN_INTRODUCED, a("2")) == "EACCES"
    # a tx_id on WATCH is ignored, not trusted
    assert h.req("d1", T.XS_WATCH, a("mine", "t"), tx=12345) == OK
    still_serves(h)


def test_xsa322_417_reused_domid_inherits_no_permissions() -> None:
    h = Harness()
    home(h, 2)
    h.write("dom0", "/pub", "p")
    h.req("dom0", T.XS_SET_PERMS, a("/pub", "n0", "r2"))
    assert h.read("d2", "/pub") == b"p"
    h.server.release(2)
    h.dispatch(h.server._take())
    assert h.req("dom0", T.XS_GET_PERMS, a("/pub")) == b"n0\0"  # entry stripped
    # an entry set while domain 5 does not exist is kept but ignored
    h.write("dom0", "/early", "e")
    h.req("dom0", T.XS_SET_PERMS, a("/early", "n0", "r5"))
    assert h.req("dom0", T.XS_GET_PERMS, a("/early")) == b"n0\0r5\0"
    del h.conns["d2"]
    h.conn("d2")  # domid 2 again, a new domain
    h.conn("d5")
    assert h.read("d2", "/pub") == "EACCES"
    assert h.read("d5", "/early") == "EACCES"
    h.req("dom0", T.XS_SET_PERMS, a("/early", "n0", "r5"))
    assert h.read("d5", "/early") == b"e"
    still_serves(h)


def test_xsa323_relative_and_absolute_paths_are_limited_alike() -> None:
    h = Harness()
    home(h, 1)
    ok_rel = "/".join(["ab"] * 683)  # 2048 bytes below the home, short names
    assert len(ok_rel) == 2048
    assert h.write("d1", ok_rel, "v") == OK
    assert h.read("d1", f"/local/domain/1/{ok_rel}") == b"v"
    assert h.write("d1", ok_rel + "y", "v") == "EINVAL"
    assert h.write("d1", f"/local/domain/1/{ok_rel}y", "v") == "EINVAL"
    assert h.write("dom0", "/" + "z" * 2047, "v") == OK
    assert h.write("dom0", "/" + "z" * 2048, "v") == "EINVAL"
    still_serves(h)


def test_xsa324_watch_event_too_big_is_dropped() -> None:
    h = Harness()
    h.conn("other", domid=0)
    token = "t" * 4000
    assert h.req("dom0", T.XS_WATCH, a("/w", token)) == OK
    assert h.req("other", T.XS_WATCH, a("/w", "small")) == OK
    long_path = "/w/" + "p" * 200
    assert h.write("dom0", long_path, "v") == OK  # its event would be > 4096 bytes
    assert h.events["dom0"] == [("/w", token)]
    assert h.events["other"][-1] == (long_path, "small")
    still_serves(h)


def test_xsa325_protocol_violation_is_not_a_domain_death() -> None:
    h = Harness()
    home(h, 3)
    h.req("dom0", T.XS_WATCH, a("@releaseDomain", "rel"))
    h.raw("d3", struct.pack("<4I", 0, 0, 0, 5000))
    assert "d3" in h.closed
    assert h.events["dom0"] == [("@releaseDomain", "rel")]
    assert h.req("dom0", T.XS_IS_DOMAIN_INTRODUCED, a("3")) == b"T\0"
    still_serves(h)


def test_xsa326_per_domain_quotas() -> None:
    q = Quotas(nodes_per_domain=20, watches_per_domain=4, nodes_per_transaction=10)
    h = Harness(quotas=q)
    home(h, 1)
    for i in range(19):  # the home node is the domain's twentieth
        assert h.write("d1", f"n{i}", "") == OK
    assert h.write("d1", "n19", "") == "ENOSPC"
    assert h.write("d1", "n0", "x" * 2100) == "ENOSPC"  # node size (2048)
    for i in range(4):
        assert h.req("d1", T.XS_WATCH, a("/", f"t{i}")) == OK
    assert h.req("d1", T.XS_WATCH, a("/", "t4")) == "E2BIG"
    t = h.start("d1")
    for i in range(8):
        h.read("d1", f"n{i}", t)
    results = [h.read("d1", f"n{i}", t) for i in range(8, 19)]
    assert "ENOSPC" in results
    assert h.end("d1", t) == "ENOMEM"  # a transaction that failed, as Xen answers
    # dom0 is exempt
    for i in range(30):
        assert h.write("dom0", f"/big/n{i}", "y" * 3000) == OK
    still_serves(h)


def test_xsa330_watch_reset_loop_leaks_nothing() -> None:
    h = Harness()
    home(h, 1)
    for round_ in range(300):
        assert h.req("d1", T.XS_WATCH, a(f"p{round_}", "t")) == OK
        assert h.req("d1", T.XS_RESET_WATCHES, b"") == OK
    assert h.server.watches.index == {}
    assert h.server.watches.count[1] == 0
    for i in range(128):
        assert h.req("d1", T.XS_WATCH, a(f"q{i}", "t")) == OK
    still_serves(h)


def test_xsa352_owner_cannot_give_node_and_quota_away() -> None:
    h = Harness()
    home(h, 1)
    home(h, 2)
    h.write("d1", "x", "")
    before = h.server.store.owned[1]
    assert h.req("d1", T.XS_SET_PERMS, a("x", "n2")) == "EPERM"
    assert h.server.store.owned[1] == before
    still_serves(h)


def test_xsa353_guest_cannot_touch_the_root() -> None:
    h = Harness()
    home(h, 1)
    assert h.req("d1", T.XS_SET_PERMS, a("/", "b1")) == "EACCES"
    assert h.req("d1", T.XS_RM, a("/")) == "EACCES"
    assert h.req("d1", T.XS_DIRECTORY, a("/")) == "EACCES"
    assert h.req("dom0", T.XS_RM, a("/")) == "EINVAL"
    still_serves(h)


def test_xsa414_415_failed_creation_leaves_exact_accounting() -> None:
    h = Harness(quotas=Quotas(nodes_per_domain=5))
    home(h, 1)
    assert h.write("d1", "a/b/c/d/e", "") == "ENOSPC"  # five new nodes + the home
    assert h.server.store.owned[1] == 1
    assert h.req("dom0", T.XS_DIRECTORY, a("/local/domain/1")) == b""
    t = h.start("d1")
    assert h.write("d1", "a/b/c/d/e", "", t) == "ENOSPC"
    assert h.write("d1", "ok", "", t) == OK
    assert h.end("d1", t) == OK
    assert h.req("dom0", T.XS_DIRECTORY, a("/local/domain/1")) == b"ok\0"
    assert h.server.store.owned[1] == 2
    still_serves(h)


def test_xsa418_deep_trees_do_not_exhaust_the_stack() -> None:
    h = Harness()
    deep = "/d" * 1000
    assert h.write("dom0", deep, "bottom") == OK
    assert h.req("dom0", T.XS_CONTROL, a("check")) == OK
    t = h.start("dom0")
    assert h.req("dom0", T.XS_RM, a("/d"), t) == OK
    assert h.end("dom0", t) == OK
    h.write("dom0", deep, "again")
    assert h.req("dom0", T.XS_RM, a("/d")) == OK
    still_serves(h)


def test_xsa419_nodes_a_guest_owns_outside_its_home_go_with_it() -> None:
    h = Harness()
    home(h, 4)
    h.write("dom0", "/shared", "")
    h.req("dom0", T.XS_SET_PERMS, a("/shared", "n0", "w4"))
    assert h.write("d4", "/shared/mine/deeper", "x") == OK
    assert h.server.store.owned[4] == 3  # with the home
    h.server.release(4)
    h.dispatch(h.server._take())
    assert h.read("dom0", "/shared/mine") == "ENOENT"
    assert h.read("dom0", "/local/domain/4") == "ENOENT"
    assert h.server.store.owned[4] == 0
    still_serves(h)


def test_xsa421_create_and_delete_in_one_transaction() -> None:
    h = Harness()
    home(h, 1)
    t = h.start("d1")
    for _ in range(3):
        assert h.write("d1", "tmp/x", "1", t) == OK
        assert h.req("d1", T.XS_RM, a("tmp"), t) == OK
    assert h.end("d1", t) == OK
    assert h.server.store.owned[1] == 1  # the home
    still_serves(h)


def test_xsa425_release_twice() -> None:
    h = Harness()
    home(h, 6)
    assert h.req("dom0", T.XS_RELEASE, a("6")) == OK
    assert "d6" in h.closed
    assert h.req("dom0", T.XS_RELEASE, a("6")) == "ENOENT"
    assert h.req("dom0", T.XS_RELEASE, a("0")) == "EINVAL"
    still_serves(h)


def test_xsa233_stubdom_target_released_in_either_order() -> None:
    for first, second in ((1, 2), (2, 1)):
        h = Harness()
        home(h, 1)
        home(h, 2)
        assert h.req("dom0", T.XS_SET_TARGET, a("2", "1")) == OK
        h.write("dom0", "/local/domain/1/dm", "")
        h.req("dom0", T.XS_SET_PERMS, a("/local/domain/1/dm", "n1"))
        assert h.write("d2", "/local/domain/1/dm/x", "by-stubdom") == OK
        assert h.req("dom0", T.XS_RELEASE, a(str(first))) == OK
        assert h.req("dom0", T.XS_RELEASE, a(str(second))) == OK
        still_serves(h)


def test_xsa440_two_transactions_deleting_the_same_nodes() -> None:
    h = Harness()
    h.conn("c2", domid=0)
    for i in range(50):
        h.write("dom0", f"/many/n{i}", "")
    t1, t2 = h.start("dom0"), h.start("c2")
    for i in range(50):
        assert h.req("dom0", T.XS_RM, a(f"/many/n{i}"), t1) == OK
        assert h.req("c2", T.XS_RM, a(f"/many/n{i}"), t2) == OK
    assert h.end("dom0", t1) == OK
    assert h.end("c2", t2) == "EAGAIN"
    assert h.req("dom0", T.XS_DIRECTORY, a("/many")) == b""
    still_serves(h)


def test_xsa481_bare_local_domain_prefix() -> None:
    h = Harness()
    home(h, 1)
    for type_ in (T.XS_READ, T.XS_WRITE, T.XS_MKDIR, T.XS_RM, T.XS_DIRECTORY, T.XS_GET_PERMS):
        assert h.req("dom0", type_, a("/local/domain/")) == "EINVAL"
        assert h.req("d1", type_, a("/local/domain/")) == "EINVAL"
    assert h.req("dom0", T.XS_WATCH, a("/local/domain/", "t")) == "EINVAL"
    still_serves(h)


def test_xsa483_reused_domid_starts_with_a_fresh_node_quota() -> None:
    h = Harness(quotas=Quotas(nodes_per_domain=10))
    home(h, 5)
    for i in range(9):
        assert h.write("d5", f"n{i}", "") == OK
    assert h.write("d5", "more", "") == "ENOSPC"
    h.server.release(5)
    h.dispatch(h.server._take())
    del h.conns["d5"]
    home(h, 5)
    for i in range(9):
        assert h.write("d5", f"n{i}", "") == OK
    still_serves(h)


def test_xsa484_reset_watches_inside_a_transaction() -> None:
    h = Harness()
    t = h.start("dom0")
    h.write("dom0", "/r/x", "1", t)
    h.req("dom0", T.XS_WATCH, a("/r", "tok"))
    assert h.req("dom0", T.XS_RESET_WATCHES, b"", tx=t) == OK
    assert h.req("dom0", T.XS_RESET_WATCHES, b"", tx=t) == OK  # idempotent
    assert h.end("dom0", t) == "ENOENT"  # the transaction went with it
    assert h.read("dom0", "/r/x") == "ENOENT"
    still_serves(h)


def test_xsa206_flooding_connection_does_not_starve_others_in_the_core() -> None:
    """The core answers each request as it comes; a flood on one connection is just
    bytes on that connection (the daemon test checks the fairness of the adapter)."""
    h = Harness()
    home(h, 1)
    flood = b"".join(encode(T.XS_WRITE, b"f\0" + b"x" * 10, req_id=i) for i in range(2000))
    h.raw("d1", flood)
    still_serves(h)


def test_root_owner_change_is_nobodys_quota() -> None:
    """Found by atheris: giving "/" to a domain must not skew the node counts."""
    h = Harness()
    h.conn("d1")
    assert h.req("dom0", T.XS_SET_PERMS, a("/", "r1")) == OK
    assert h.server.store.owned[0] == 0 and h.server.store.owned[1] == 0
    t = h.start("dom0")
    assert h.req("dom0", T.XS_SET_PERMS, a("/", "n0"), t) == OK
    assert h.end("dom0", t) == OK
    still_serves(h)


def test_release_of_a_domain_that_owned_the_root() -> None:
    """Found by atheris: nodes below a "/" the domain owned were missed at release."""
    h = Harness()
    h.conn("d2")
    assert h.req("dom0", T.XS_SET_PERMS, a("/", "b2")) == OK
    assert h.req("dom0", T.XS_MKDIR, a("/local/domain/0/x")) == OK  # inherits owner 2
    assert h.req("dom0", T.XS_RELEASE, a("2")) == OK
    assert h.req("dom0", T.XS_DIRECTORY, a("/")) == b""
    assert h.req("dom0", T.XS_GET_PERMS, a("/")) == b"b0\0"
    still_serves(h)
