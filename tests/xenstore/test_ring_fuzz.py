"""Fuzzing the daemon's ring consumer: whatever a guest leaves in its page between kicks
-- indices, words, bytes -- the daemon serves it, or stops that ring with a reason in
`error`; it never raises, never hits a bug of its own, and holds a bounded amount."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hypothesis import given, settings
from hypothesis import strategies as st

from pvio.abi.xs_wire import (
    XENSTORE_DOMAIN_INTERFACE,
    XENSTORE_ERROR_NONE,
    XENSTORE_ERROR_PROTO,
    XENSTORE_ERROR_RINGIDX,
    XENSTORE_PAYLOAD_MAX,
)
from pvio.abi.xs_wire import XsdSockmsgType as T
from pvio.xenstore.daemon import REPLY_BACKLOG, XenStoreDaemon, _Conn
from pvio.xenstore.daemon_ring import RingTransport
from pvio.xenstore.ring import ServerEnd
from pvio.xenstore.wire import encode

LAY = XENSTORE_DOMAIN_INTERFACE
WORDS = ["req_cons", "req_prod", "rsp_cons", "rsp_prod", "connection", "error"]


class FakeDomain:
    """What RingTransport asks of its domain: a handler slot and kicks (counted)."""

    domid = 1

    def __init__(self) -> None:
        self.kicks = 0

    def set_handler(self, port: int, handler: object) -> None:
        pass

    def notify(self, port: int) -> None:
        self.kicks += 1


PAGE_WRITES = st.one_of(
    # a word set to anything
    st.tuples(st.sampled_from(WORDS), st.integers(0, 2**32 - 1)).map(
        lambda t: (LAY.offset(t[0]), t[1].to_bytes(4, "little"))),
    # bytes anywhere in the request ring
    st.tuples(st.integers(0, 1023), st.binary(min_size=1, max_size=64)).map(
        lambda t: (LAY.offset("req") + t[0], t[1][: 1024 - t[0]])),
    # a well-formed request appended where req_prod says, then req_prod moved past it
    st.sampled_from([encode(T.XS_WRITE, b"/local/domain/1/x\0v"), encode(T.XS_READ, b"/\0"),
                     encode(T.XS_WATCH, b"/local/domain/1\0t\0"),
                     encode(T.XS_TRANSACTION_START, b"\0")]).map(lambda p: (-1, p)),
)


def apply(page: memoryview, offset: int, data: bytes) -> None:
    if offset >= 0:
        page[offset : offset + len(data)] = data
        return
    prod = int.from_bytes(page[LAY.offset("req_prod") : LAY.offset("req_prod") + 4], "little")
    for i, b in enumerate(data):
        page[LAY.offset("req") + ((prod + i) & 1023)] = b
    page[LAY.offset("req_prod") : LAY.offset("req_prod") + 4] = ((prod + len(data)) & 0xFFFFFFFF).to_bytes(4, "little")


@settings(max_examples=150, deadline=None)
@given(st.lists(PAGE_WRITES, max_size=30))
def test_whatever_the_page_holds_the_daemon_carries_on(writes: list[tuple[int, bytes]]) -> None:
    async def main() -> None:
        daemon = XenStoreDaemon(Path("/nonexistent/xs.sock"))
        daemon.server.introduce(1, gfn=1 << 24, evtchn=1)
        page = memoryview(bytearray(4096))
        dom = FakeDomain()
        t = RingTransport(dom, 1, ServerEnd(page), port=1)  # type: ignore[arg-type]
        t.start(lambda: _Conn(daemon, 1, ring=True), restored=False)
        for offset, data in writes:
            apply(page, offset, data)
            t.kick()
            # the guest may also read some replies (rsp_cons catches up with rsp_prod)
            rp = page[LAY.offset("rsp_prod") : LAY.offset("rsp_prod") + 4]
            page[LAY.offset("rsp_cons") : LAY.offset("rsp_cons") + 4] = rp
            t.kick()
        assert t.end.stopped in (XENSTORE_ERROR_NONE, XENSTORE_ERROR_RINGIDX, XENSTORE_ERROR_PROTO)
        assert daemon.server.internal_errors == 0
        assert t.get_write_buffer_size() <= REPLY_BACKLOG + 16 + XENSTORE_PAYLOAD_MAX
        conn = t.protocol
        if conn is not None and conn.conn_id in daemon.server.conns:
            assert daemon.server.conns[conn.conn_id].decoder.buffered <= 16 + XENSTORE_PAYLOAD_MAX + 1024
        assert daemon.server.store.check() == []

    asyncio.run(main())
