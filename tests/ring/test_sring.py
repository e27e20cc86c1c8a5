"""FrontRing/BackRing: each io/ring.h macro equivalent, both ends in one process."""

from __future__ import annotations

import struct

import pytest

from pvio.abi.blkif import ABI_NATIVE, ABI_X86_32_BLKIF, BlkifABI
from pvio.abi.ring import SRING_RING_OFFSET
from pvio.ring import BackRing, FrontRing, RingBroken, RingUsageError, SharedRing
from pvio.ring.slots import RingMemory, SplitSlot

M = 2**32
NATIVE_REQ = ABI_NATIVE.request.size
NATIVE_RSP = ABI_NATIVE.response.size


def pages(order: int) -> list[memoryview]:
    return [memoryview(bytearray(4096)) for _ in range(1 << order)]


def pair(order: int = 0, start: int = 0, abi: BlkifABI = ABI_NATIVE,
         mem: list[memoryview] | None = None) -> tuple[SharedRing, FrontRing, BackRing]:
    sring = SharedRing.for_blkif(mem if mem is not None else pages(order), abi)
    return sring, FrontRing.init(sring, start), BackRing(sring, start)


def req(n: int, size: int = NATIVE_REQ) -> bytes:
    return (n.to_bytes(4, "little") * (size // 4 + 1))[:size]


def rsp(n: int, size: int = NATIVE_RSP) -> bytes:
    return (n.to_bytes(4, "little") * (size // 4 + 1))[:size]


def header(sring: SharedRing) -> tuple[int, int, int, int]:
    return struct.unpack_from("<4I", sring.memory.pages[0], 0)


# ---- SHARED_RING_INIT, FRONT_RING_INIT, BACK_RING_ATTACH, RING_SIZE ------------------


def test_shared_ring_init_golden_bytes() -> None:
    mem = pages(0)
    mem[0][:64] = b"\xff" * 64
    mem[0][64:] = b"\xee" * (4096 - 64)
    sring = SharedRing.for_blkif(mem)
    FrontRing.init(sring)
    # req_prod 0, req_event 1, rsp_prod 0, rsp_event 1, then pvt and __pad zeroed
    assert mem[0][:64].tobytes() == struct.pack("<4I", 0, 1, 0, 1) + bytes(48)
    assert mem[0][64:].tobytes() == b"\xee" * (4096 - 64)  # slots are left alone


def test_init_at_a_start_index() -> None:
    sring, front, back = pair(start=0xFFFF_FFF0)
    assert header(sring) == (0xFFFF_FFF0, 0xFFFF_FFF1, 0xFFFF_FFF0, 0xFFFF_FFF1)
    assert (front.req_prod_pvt, front.rsp_cons) == (0xFFFF_FFF0, 0xFFFF_FFF0)
    assert (back.rsp_prod_pvt, back.req_cons) == (0xFFFF_FFF0, 0xFFFF_FFF0)


def test_back_attach_does_not_touch_shared_memory() -> None:
    mem = pages(1)
    mem[0][:] = b"\x5a" * 4096
    before = b"".join(p.tobytes() for p in mem)
    BackRing(SharedRing.for_blkif(mem), 1234)
    assert b"".join(p.tobytes() for p in mem) == before


@pytest.mark.parametrize("order", range(5))
@pytest.mark.parametrize("abi", [ABI_NATIVE, ABI_X86_32_BLKIF], ids=lambda a: a.name)
def test_ring_size_is_const_ring_size(order: int, abi: BlkifABI) -> None:
    _, front, back = pair(order, abi=abi)
    assert front.nr_ents == back.nr_ents == abi.ring_size(order)


def test_generic_entry_sizes() -> None:
    sring = SharedRing(bytearray(4096), entry_size=8, req_size=8, rsp_size=4)
    assert sring.nr_ents == 256  # (4096 - 64) // 8 = 504, rounded down to 256
    front, back = FrontRing.init(sring), BackRing(sring)
    front.put_request(b"ABCDEFGH")
    front.push_requests()
    assert back.take_requests() == [b"ABCDEFGH"]
    back.put_response(b"wxyz")
    back.push_responses()
    assert front.take_responses() == [b"wxyz"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"entry_size": 8, "req_size": 9, "rsp_size": 4}, "fit the entry"),
        ({"entry_size": 8, "req_size": 8, "rsp_size": 0}, "positive"),
        ({"entry_size": 5000, "req_size": 8, "rsp_size": 4}, "fits"),
    ],
)
def test_bad_geometry(kwargs: dict[str, int], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        SharedRing(bytearray(4096), **kwargs)


@pytest.mark.parametrize(
    "mem",
    [
        bytearray(4095),
        bytearray(3 * 4096),
        bytearray(32 * 4096),
        [bytearray(4096), bytearray(4095)],
        [bytearray(4096)] * 3,
    ],
    ids=["short", "three-pages", "too-many", "short-page", "three-page-list"],
)
def test_bad_memory(mem: bytearray | list[bytearray]) -> None:
    with pytest.raises(ValueError):
        RingMemory(mem)


def test_readonly_memory_is_refused() -> None:
    with pytest.raises(ValueError, match="writable"):
        RingMemory(memoryview(bytes(4096)))


# ---- producing: RING_FREE_REQUESTS, RING_FULL, PUSH -----------------------------------


def test_free_requests_and_full() -> None:
    _, front, _ = pair()
    assert front.free_requests() == 32 and not front.full()
    assert front.put_requests(req(i) for i in range(40)) == 32
    assert front.free_requests() == 0 and front.full()
    with pytest.raises(RingUsageError, match="full"):
        front.put_request(req(99))


def test_requests_are_invisible_until_pushed() -> None:
    sring, front, back = pair()
    front.put_request(req(1))
    assert back.unconsumed_requests() == 0
    assert header(sring)[0] == 0
    front.push_requests()
    assert header(sring)[0] == 1
    assert back.unconsumed_requests() == 1
    assert back.get_request() == req(1)
    assert back.get_request() is None


def test_push_and_check_notify_follows_req_event() -> None:
    sring, front, back = pair()
    front.put_request(req(0))
    assert front.push_requests_and_check_notify()  # req_event was 1
    front.put_request(req(1))
    assert not front.push_requests_and_check_notify()  # back has not asked again
    assert len(back.take_requests()) == 2
    assert not back.final_check_for_requests()  # sets req_event = req_cons + 1 = 3
    assert header(sring)[1] == 3
    assert not front.push_requests_and_check_notify()  # nothing new pushed
    front.put_requests([req(2), req(3)])
    assert front.push_requests_and_check_notify()


def test_final_check_sees_work_pushed_before_it() -> None:
    _, front, back = pair()
    front.put_request(req(0))
    front.push_requests()
    assert back.final_check_for_requests()  # work: req_event is left alone
    back.take_requests()
    back.put_response(rsp(0))
    assert back.push_responses_and_check_notify()
    assert front.final_check_for_responses()
    assert front.take_responses() == [rsp(0)]
    assert not front.final_check_for_responses()


def test_wrong_sizes_are_local_errors() -> None:
    _, front, back = pair()
    with pytest.raises(RingUsageError, match="bytes"):
        front.put_request(b"short")
    before = front.sring.memory.tobytes()
    for bad in ([req(0), b"short"], iter([req(0), req(1), b"x" * 200])):
        with pytest.raises(RingUsageError):
            front.put_requests(bad)
    assert front.req_prod_pvt == 0  # nothing of a bad batch went in
    assert front.sring.memory.tobytes() == before
    front.put_request(req(0))
    front.push_requests()
    back.take_requests()
    with pytest.raises(RingUsageError):
        back.put_response(b"x")
    assert front.broken is None and back.broken is None


def test_response_without_a_request_is_a_local_error() -> None:
    _, _, back = pair()
    with pytest.raises(RingUsageError, match="waiting"):
        back.put_response(rsp(0))
    assert back.put_responses([rsp(0)]) == 0


# ---- consuming: RING_HAS_UNCONSUMED_*, RING_REQUEST_CONS_OVERFLOW --------------------


def test_take_is_limited_by_count_and_by_response_room() -> None:
    _, front, back = pair()
    front.put_requests(req(i) for i in range(32))
    front.push_requests()
    assert back.take_requests(5) == [req(i) for i in range(5)]
    assert back.unconsumed_requests() == 27
    assert len(back.take_requests()) == 27
    assert back.request_cons_overflow(back.req_cons)  # 32 consumed, none answered
    assert not back.request_cons_overflow(back.req_cons - 1)
    assert back.put_responses(rsp(i) for i in range(40)) == 32
    back.push_responses()
    assert front.unconsumed_responses() == 32
    assert front.take_responses(3) == [rsp(0), rsp(1), rsp(2)]
    assert front.free_requests() == 3


def test_unconsumed_requests_is_bounded_by_response_slots() -> None:
    """XEN_RING_NR_UNCONSUMED_REQUESTS' min(): requests beyond free response slots wait."""
    sring, front, back = pair()
    front.put_requests(req(i) for i in range(32))
    front.push_requests()
    back.take_requests()
    back.put_responses(rsp(i) for i in range(32))
    back.push_responses()
    front.take_responses(10)  # ten slots free again
    front.put_requests(req(i) for i in range(10))
    front.push_requests()
    assert back.unconsumed_requests() == 10
    assert header(sring)[0] == 42


@pytest.mark.parametrize("start", [0, 0xFFFF_FFF0, 0xFFFF_FFFF, 0x7FFF_FFF8])
def test_indices_wrap_at_2_32(start: int) -> None:
    sring, front, back = pair(start=start)
    for rnd in range(10):
        batch = [req(rnd * 100 + i) for i in range(7)]
        assert front.put_requests(batch) == 7
        front.push_requests_and_check_notify()
        assert back.take_requests() == batch
        back.put_responses(rsp(int.from_bytes(r[:4], "little")) for r in batch)
        back.push_responses_and_check_notify()
        assert back.final_check_for_requests() is False
        assert front.take_responses() == [rsp(rnd * 100 + i) for i in range(7)]
        assert front.final_check_for_responses() is False
    end = (start + 70) % M
    assert header(sring) == (end, (end + 1) % M, end, (end + 1) % M)
    assert front.req_prod_pvt == front.rsp_cons == back.req_cons == back.rsp_prod_pvt == end


def test_slot_is_index_modulo_ring_size_across_the_wrap() -> None:
    sring, front, _ = pair(start=M - 1)
    front.put_requests([req(1), req(2)])  # indices 0xFFFFFFFF (slot 31) and 0 (slot 0)
    mem = sring.memory.pages[0]
    slot = lambda i: SRING_RING_OFFSET + i * ABI_NATIVE.entry_size  # noqa: E731
    assert mem[slot(31) : slot(31) + NATIVE_REQ].tobytes() == req(1)
    assert mem[slot(0) : slot(0) + NATIVE_REQ].tobytes() == req(2)


def test_entries_are_copies() -> None:
    sring, front, back = pair()
    front.put_request(req(7))
    front.push_requests()
    (got,) = back.take_requests()
    sring.memory.pages[0][SRING_RING_OFFSET : SRING_RING_OFFSET + 4] = b"EVIL"
    assert got == req(7)
    assert isinstance(got, bytes)


# ---- multi-page, scattered pages, straddling slots ----------------------------------


def test_x86_32_slots_straddle_pages_and_round_trip() -> None:
    abi = ABI_X86_32_BLKIF
    mem = pages(1)
    sring, front, back = pair(1, abi=abi, mem=mem)
    # slot 37 is bytes 64 + 37*108 = 4060 .. 4168: across the first page boundary
    assert isinstance(sring.req_views[37], SplitSlot)
    assert sum(isinstance(v, SplitSlot) for v in sring.req_views) >= 1
    reqs = [req(i, abi.request.size) for i in range(40)]
    assert front.put_requests(reqs) == 40
    front.push_requests()
    assert back.take_requests() == reqs
    raw = mem[0].tobytes() + mem[1].tobytes()
    assert raw[4060 : 4060 + 108] == reqs[37]
    # responses: 12 bytes in 108-byte slots
    back.put_responses(rsp(i, 12) for i in range(40))
    back.push_responses()
    assert front.take_responses() == [rsp(i, 12) for i in range(40)]


@pytest.mark.parametrize("order", [1, 4])
def test_scattered_and_contiguous_memory_hold_the_same_bytes(order: int) -> None:
    abi = ABI_X86_32_BLKIF
    whole = bytearray(4096 << order)
    scattered = pages(order)
    results = []
    for mem in (whole, scattered):
        sring = SharedRing.for_blkif(mem, abi)
        front, back = FrontRing.init(sring, M - 5), BackRing(sring, M - 5)
        for rnd in range(3):
            n = front.put_requests(req(rnd * 1000 + i, abi.request.size) for i in range(9999))
            front.push_requests_and_check_notify()
            got = back.take_requests()
            assert len(got) == n
            back.put_responses(g[:12] for g in got)
            back.push_responses_and_check_notify()
            front.take_responses(n - rnd)
        results.append(sring.memory.tobytes())
    assert results[0] == results[1]


def test_split_slot_must_be_written_whole() -> None:
    a, b = memoryview(bytearray(4)), memoryview(bytearray(4))
    split = SplitSlot(a[1:], b[:2])
    split[:] = b"12345"
    assert a.tobytes() == b"\x00123" and b.tobytes() == b"45\x00\x00"
    assert split.tobytes() == b"12345" and len(split) == 5
    with pytest.raises(ValueError):
        split[:] = b"1234"
    with pytest.raises(TypeError):
        split[1:] = b"1234"


# ---- a peer publishing impossible indices --------------------------------------------


def set_word(sring: SharedRing, index: int, value: int) -> None:
    struct.pack_into("<I", sring.memory.pages[0], index * 4, value % M)


def test_request_prod_overflow_breaks_the_ring() -> None:
    sring, _, back = pair(start=M - 3)
    set_word(sring, 0, M - 3 + 33)  # 33 requests in a 32-slot ring
    with pytest.raises(RingBroken) as info:
        back.take_requests()
    err = info.value
    assert err.check == "RING_REQUEST_PROD_OVERFLOW" and err.field == "req_prod"
    assert err.values == {"req_prod": 30, "rsp_prod_pvt": M - 3, "nr_ents": 32}
    assert err.fault == "remote"
    assert "0x0000001e" in str(err)
    assert back.broken is not None
    # the ring refuses further use, even once the index looks sane again
    set_word(sring, 0, M - 3)
    for call in (back.take_requests, back.unconsumed_requests, back.final_check_for_requests,
                 back.push_responses, back.push_responses_and_check_notify,
                 lambda: back.put_response(rsp(0))):
        with pytest.raises(RingBroken):
            call()


def test_request_prod_moving_backwards_breaks_the_ring() -> None:
    sring, front, back = pair()
    front.put_requests(req(i) for i in range(10))
    front.push_requests()
    back.take_requests(8)
    set_word(sring, 0, 5)  # behind req_cons (8)
    with pytest.raises(RingBroken, match="backwards"):
        back.take_requests()


def test_response_prod_overflow_breaks_the_front() -> None:
    sring, front, _ = pair()
    front.put_requests(req(i) for i in range(4))
    front.push_requests()
    set_word(sring, 2, 33)
    with pytest.raises(RingBroken) as info:
        front.take_responses()
    assert info.value.check == "RING_RESPONSE_PROD_OVERFLOW"
    with pytest.raises(RingBroken):
        front.put_request(req(0))


def test_responses_to_unpublished_requests_break_the_front() -> None:
    sring, front, _ = pair()
    front.put_requests(req(i) for i in range(4))
    front.push_requests()
    front.put_requests(req(i) for i in range(4))  # not pushed: the back cannot see them
    set_word(sring, 2, 5)
    with pytest.raises(RingBroken, match="beyond published requests"):
        front.final_check_for_responses()


def test_one_broken_ring_does_not_disturb_another() -> None:
    sring1, _, back1 = pair()
    _, front2, back2 = pair()
    set_word(sring1, 0, 1000)
    with pytest.raises(RingBroken):
        back1.take_requests()
    front2.put_request(req(1))
    front2.push_requests()
    assert back2.take_requests() == [req(1)]


def test_reprs_name_the_indices() -> None:
    sring, front, back = pair(start=0x10)
    assert "req_prod=0x10" in repr(sring)
    assert "req_prod_pvt=0x10" in repr(front)
    assert "req_cons=0x10" in repr(back)
