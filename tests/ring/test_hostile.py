"""Hostile producers (hypothesis): arbitrary indices and entry bytes from the peer.

The consumer must never consume past what was published, never take more requests than
it can answer, return exactly the bytes in the slots it consumed, never loop or crash,
and report an impossible index as RingBroken, after which the ring refuses every call.
"""

from __future__ import annotations

import struct
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from pvio.abi.blkif import ABI_NATIVE, ABI_X86_32_BLKIF, BlkifABI
from pvio.abi.ring import SRING_RING_OFFSET
from pvio.abi.xs_wire import XENSTORE_DOMAIN_INTERFACE as XS
from pvio.ring import BackRing, FrontRing, RingBroken, SharedRing, xenstore_server

M = 2**32
SETTINGS = settings(max_examples=200, deadline=None)
#: How far from the start index the peer moves its producer: mostly near, so that
#: consumption, wrap and small backward steps are all reached.
DELTA = st.one_of(st.integers(-4, 40), st.integers(-80, 120))


def slot_bytes(sring: SharedRing, index: int, size: int) -> bytes:
    whole = sring.memory.tobytes()
    at = SRING_RING_OFFSET + (index % sring.nr_ents) * sring.entry_size
    return whole[at : at + size]


back_actions = st.lists(
    st.one_of(
        st.tuples(st.just("prod"), DELTA, st.integers(0, 5).map(lambda n: n == 0),
                  st.integers(0, M - 1)),
        st.tuples(st.just("take"), st.integers(0, 70)),
        st.tuples(st.just("final")),
        st.tuples(st.just("unconsumed")),
        st.tuples(st.just("respond"), st.integers(0, 70)),
        st.tuples(st.just("push")),
    ),
    max_size=40,
)


@SETTINGS
@given(
    abi=st.sampled_from([ABI_NATIVE, ABI_X86_32_BLKIF]),
    order=st.integers(0, 2),
    start=st.one_of(st.integers(0, M - 1), st.integers(M - 64, M - 1)),
    noise=st.binary(min_size=64, max_size=64),
    actions=back_actions,
)
# a producer index that moves backwards, behind what was already consumed
@example(abi=ABI_NATIVE, order=0, start=M - 3, noise=bytes(64),
         actions=[("prod", 10, False, 0), ("take", 8), ("prod", 5, False, 0), ("take", 5)])
# one request too many, across the wrap
@example(abi=ABI_NATIVE, order=0, start=M - 3, noise=bytes(64),
         actions=[("prod", 33, False, 0), ("unconsumed",)])
def test_back_ring_against_a_hostile_front(abi: BlkifABI, order: int, start: int,
                                           noise: bytes, actions: list[Any]) -> None:
    mem = bytearray(noise * ((4096 << order) // 64))
    sring = SharedRing.for_blkif([memoryview(mem)[i : i + 4096]
                                  for i in range(0, len(mem), 4096)], abi)
    sring.init(start)
    back = BackRing(sring, start)
    nr = sring.nr_ents
    prod = start
    broken = False
    for action in actions:
        kind = action[0]
        if kind == "prod":
            _, delta, wild, anything = action
            prod = anything if wild else (start + delta) % M
            struct.pack_into("<I", mem, 0, prod)
            continue
        pvt, cons = back.rsp_prod_pvt, back.req_cons
        possible = (prod - pvt) % M <= nr and (cons - pvt) % M <= (prod - pvt) % M
        try:
            if kind == "take":
                expected = [slot_bytes(sring, (cons + k) % M, abi.request.size)
                             for k in range(nr)]
                got = back.take_requests(action[1])
                assert got == expected[: len(got)]
                assert len(got) <= action[1]
            elif kind == "final":
                back.final_check_for_requests()
            elif kind == "unconsumed":
                n = back.unconsumed_requests()
                assert n <= (prod - cons) % M and n <= nr - (cons - pvt) % M
            elif kind == "respond":
                n = back.put_responses([b"R" * abi.response.size] * action[1])
                assert n <= (cons - pvt) % M
            else:
                back.push_responses_and_check_notify()
        except RingBroken as err:
            assert not possible or broken, f"sane index reported broken: {err}"
            assert err.fault == "remote"
            broken = True
            continue
        assert not broken, "a broken ring kept working"
        if kind in ("take", "final", "unconsumed"):
            assert possible, "an impossible req_prod was accepted"
        # never consumed past what was published, never more than it can answer
        assert (back.req_cons - back.rsp_prod_pvt) % M <= nr
        assert (back.req_cons - pvt) % M <= (prod - pvt) % M or kind in ("respond", "push")


front_actions = st.lists(
    st.one_of(
        st.tuples(st.just("prod"), DELTA, st.integers(0, 5).map(lambda n: n == 0),
                  st.integers(0, M - 1)),
        st.tuples(st.just("put"), st.integers(0, 70)),
        st.tuples(st.just("push")),
        st.tuples(st.just("take"), st.integers(0, 70)),
        st.tuples(st.just("final")),
    ),
    max_size=40,
)


@SETTINGS
@given(
    order=st.integers(0, 1),
    start=st.one_of(st.integers(0, M - 1), st.integers(M - 64, M - 1)),
    noise=st.binary(min_size=64, max_size=64),
    actions=front_actions,
)
# responses to requests that were never published
@example(order=0, start=M - 3, noise=bytes(64),
         actions=[("put", 4), ("push",), ("put", 4), ("prod", 5, False, 0), ("take", 9)])
def test_front_ring_against_a_hostile_back(order: int, start: int, noise: bytes,
                                           actions: list[Any]) -> None:
    abi = ABI_X86_32_BLKIF
    mem = bytearray(noise * ((4096 << order) // 64))
    sring = SharedRing.for_blkif(mem, abi)
    front = FrontRing.init(sring, start)
    nr = sring.nr_ents
    prod = start
    published = start
    broken = False
    for action in actions:
        kind = action[0]
        if kind == "prod":
            _, delta, wild, anything = action
            prod = anything if wild else (start + delta) % M
            struct.pack_into("<I", mem, 8, prod)
            continue
        cons = front.rsp_cons
        possible = (prod - cons) % M <= (published - cons) % M
        try:
            if kind == "put":
                front.put_requests([b"Q" * abi.request.size] * action[1])
            elif kind == "push":
                front.push_requests()
                published = front.req_prod_pvt
            elif kind == "take":
                expected = [slot_bytes(sring, (cons + k) % M, abi.response.size)
                            for k in range(nr)]
                got = front.take_responses(action[1])
                assert got == expected[: len(got)]
            else:
                front.final_check_for_responses()
        except RingBroken:
            assert not possible or broken
            broken = True
            continue
        assert not broken, "a broken ring kept working"
        if kind in ("take", "final"):
            assert possible, "an impossible rsp_prod was accepted"
            assert (front.rsp_cons - cons) % M <= (prod - cons) % M
        assert (front.req_prod_pvt - front.rsp_cons) % M <= nr


@SETTINGS
@given(
    cons=st.integers(0, M - 1),
    used=st.one_of(st.integers(0, 1100), st.integers(0, M - 1)),
    data=st.binary(min_size=1024, max_size=1024),
    max_bytes=st.integers(0, 2000),
)
def test_xenstore_byte_ring_against_a_hostile_guest(cons: int, used: int, data: bytes,
                                                    max_bytes: int) -> None:
    mem = memoryview(bytearray(4096))
    mem[XS.offset("req") : XS.offset("req") + 1024] = data
    prod = (cons + used) % M
    struct.pack_into("<II", mem, XS.offset("req_cons"), cons, prod)
    ring = xenstore_server(mem).rx
    try:
        got = ring.read(max_bytes)
    except RingBroken as err:
        assert used > 1024
        assert err.values["prod"] == prod
        return
    assert used <= 1024
    n = min(used, max_bytes)
    assert got == bytes(data[(cons + k) % 1024] for k in range(n))
    assert struct.unpack_from("<I", mem, XS.offset("req_cons"))[0] == (cons + n) % M


@SETTINGS
@given(
    cons=st.integers(0, M - 1),
    used=st.one_of(st.integers(0, 1100), st.integers(0, M - 1)),
    payload=st.binary(max_size=1500),
)
def test_xenstore_byte_ring_writer_against_a_hostile_consumer(cons: int, used: int,
                                                              payload: bytes) -> None:
    mem = memoryview(bytearray(4096))
    prod = (cons + used) % M
    struct.pack_into("<II", mem, XS.offset("rsp_cons"), cons, prod)
    ring = xenstore_server(mem).tx
    before = mem.tobytes()
    try:
        n = ring.write(payload)
    except RingBroken:
        assert used > 1024
        assert mem.tobytes() == before  # nothing written into a broken ring
        return
    assert n == min(len(payload), 1024 - used)
    rsp = mem[XS.offset("rsp") : XS.offset("rsp") + 1024]
    assert bytes(rsp[(prod + k) % 1024] for k in range(n)) == payload[:n]
