"""blkif request parsing and every validation blkback applies."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pvio.abi.blkif import (
    ABI_NATIVE,
    ABI_X86_32_BLKIF,
    BLKIF_OP_DISCARD,
    BLKIF_OP_FLUSH_DISKCACHE,
    BLKIF_OP_INDIRECT,
    BLKIF_OP_READ,
    BLKIF_OP_RESERVED_1,
    BLKIF_OP_WRITE,
    BLKIF_OP_WRITE_BARRIER,
    BLKIF_RSP_EOPNOTSUPP,
    BLKIF_RSP_ERROR,
    BlkifABI,
)
from pvio.blk.request import (
    BlkifRequestError,
    DiskInfo,
    Segment,
    build_discard,
    build_indirect,
    build_request,
    build_response,
    check_indirect,
    indirect_pages_for,
    pack_page_segments,
    pack_segments,
    page_segments,
    parse_indirect_segments,
    parse_request,
    parse_response,
    validate,
)

DISK = DiskInfo(sectors=2048)
ABIS = [ABI_NATIVE, ABI_X86_32_BLKIF]


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.name)
def test_round_trip(abi: BlkifABI) -> None:
    segs = (Segment(8, 0, 7), Segment(9, 2, 3))
    raw = build_request(abi, BLKIF_OP_WRITE, 0xDEADBEEF12345678, 100, segs, handle=51712)
    assert len(raw) == abi.request.size
    req = parse_request(abi, raw)
    assert (req.operation, req.nr_segments, req.handle, req.id, req.sector_number) == (
        BLKIF_OP_WRITE, 2, 51712, 0xDEADBEEF12345678, 100)
    assert req.segments == segs
    io = validate(req, DISK)
    assert (io.kind, io.offset, io.length) == ("write", 100 * 512, 10 * 512)
    rsp = build_response(abi, req.id, req.operation, BLKIF_RSP_ERROR)
    assert len(rsp) == abi.response.size
    assert parse_response(abi, rsp) == (req.id, BLKIF_OP_WRITE, BLKIF_RSP_ERROR)


def test_golden_bytes_native() -> None:
    raw = build_request(ABI_NATIVE, BLKIF_OP_READ, 7, 0x0102, [Segment(0x11223344, 1, 6)], 0xCA00)
    assert raw[:40].hex() == (
        "00" "01" "00ca" "00000000"  # operation, nr_segments, handle, pad
        "0700000000000000"  # id
        "0201000000000000"  # sector_number
        "44332211" "01" "06" "0000"  # seg[0]
        "0000000000000000"  # seg[1]
    )


def test_golden_bytes_x86_32() -> None:
    raw = build_request(ABI_X86_32_BLKIF, BLKIF_OP_READ, 7, 0x0102, [Segment(0x11223344, 1, 6)])
    assert raw[:28].hex() == (
        "00" "01" "0000"  # operation, nr_segments, handle: id follows with no pad
        "0700000000000000" "0201000000000000" "44332211" "01" "06" "0000"
    )
    assert build_response(ABI_X86_32_BLKIF, 7, 0, -1).hex() == "0700000000000000" "00" "00" "ffff"


def _refused(raw: bytes, disk: DiskInfo = DISK, abi: BlkifABI = ABI_NATIVE) -> BlkifRequestError:
    with pytest.raises(BlkifRequestError) as info:
        validate(parse_request(abi, raw), disk)
    return info.value


@pytest.mark.parametrize("op", [BLKIF_OP_RESERVED_1, BLKIF_OP_INDIRECT, 7, 99, 255])
def test_unknown_operation_is_eopnotsupp(op: int) -> None:
    assert _refused(build_request(ABI_NATIVE, op, 1, 0, [Segment(1, 0, 7)])).status == BLKIF_RSP_EOPNOTSUPP


@pytest.mark.parametrize("op", [BLKIF_OP_READ, BLKIF_OP_WRITE])
def test_zero_segments_is_an_error_for_read_write(op: int) -> None:
    err = _refused(build_request(ABI_NATIVE, op, 1, 0, []))
    assert (err.status, err.field) == (BLKIF_RSP_ERROR, "nr_segments")


def test_more_than_eleven_segments() -> None:
    raw = bytearray(build_request(ABI_NATIVE, BLKIF_OP_READ, 1, 0, [Segment(1, 0, 7)] * 11))
    raw[1] = 12
    err = _refused(bytes(raw))
    assert (err.status, err.field) == (BLKIF_RSP_ERROR, "nr_segments")


@pytest.mark.parametrize(("first", "last"), [(3, 2), (0, 8), (8, 8), (255, 255)])
def test_bad_segment_sectors(first: int, last: int) -> None:
    err = _refused(build_request(ABI_NATIVE, BLKIF_OP_READ, 1, 0, [Segment(1, 0, 7), Segment(2, first, last)]))
    assert (err.status, err.field) == (BLKIF_RSP_ERROR, "seg[1]")


def test_access_past_the_end() -> None:
    ok = build_request(ABI_NATIVE, BLKIF_OP_READ, 1, 2040, [Segment(1, 0, 7)])
    assert validate(parse_request(ABI_NATIVE, ok), DISK).length == 4096
    err = _refused(build_request(ABI_NATIVE, BLKIF_OP_READ, 1, 2041, [Segment(1, 0, 7)]))
    assert (err.status, err.field) == (BLKIF_RSP_ERROR, "sector_number")
    err = _refused(build_request(ABI_NATIVE, BLKIF_OP_WRITE, 1, 2**64 - 1, [Segment(1, 0, 0)]))
    assert err.status == BLKIF_RSP_ERROR


@pytest.mark.parametrize(
    "raw",
    [
        build_request(ABI_NATIVE, BLKIF_OP_WRITE, 1, 0, [Segment(1, 0, 7)]),
        build_request(ABI_NATIVE, BLKIF_OP_WRITE_BARRIER, 1, 0, [Segment(1, 0, 7)]),
        build_request(ABI_NATIVE, BLKIF_OP_FLUSH_DISKCACHE, 1, 0, [Segment(1, 0, 7)]),
        build_discard(ABI_NATIVE, 1, 0, 8),
    ],
)
def test_writes_to_read_only_disk(raw: bytes) -> None:
    disk = DiskInfo(sectors=2048, read_only=True, feature_discard=True)
    assert _refused(raw, disk).status == BLKIF_RSP_ERROR
    assert validate(parse_request(ABI_NATIVE, build_request(ABI_NATIVE, BLKIF_OP_READ, 1, 0, [Segment(1, 0, 7)])), disk)


def test_flush_and_barrier_with_no_segments() -> None:
    for op in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
        io = validate(parse_request(ABI_NATIVE, build_request(ABI_NATIVE, op, 3, 0, [])), DISK)
        assert io.kind == "flush" and io.length == 0
    io = validate(
        parse_request(ABI_NATIVE, build_request(ABI_NATIVE, BLKIF_OP_WRITE_BARRIER, 3, 8, [Segment(1, 0, 7)])),
        DISK,
    )
    assert (io.kind, io.preflush, io.postflush) == ("write", True, True)
    no_flush = DiskInfo(sectors=2048, feature_flush_cache=False, feature_barrier=False)
    for op in (BLKIF_OP_FLUSH_DISKCACHE, BLKIF_OP_WRITE_BARRIER):
        assert _refused(build_request(ABI_NATIVE, op, 3, 0, []), no_flush).status == BLKIF_RSP_EOPNOTSUPP


def test_discard() -> None:
    raw = build_discard(ABI_NATIVE, 5, 16, 32)
    assert _refused(raw).status == BLKIF_RSP_EOPNOTSUPP
    io = validate(parse_request(ABI_NATIVE, raw), DiskInfo(sectors=2048, feature_discard=True))
    assert (io.kind, io.offset, io.length, io.request.id) == ("discard", 16 * 512, 32 * 512, 5)
    req = parse_request(ABI_NATIVE, raw)
    assert req.operation == BLKIF_OP_DISCARD


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(ABIS), st.binary(min_size=112, max_size=112))
def test_arbitrary_bytes_never_crash(abi: BlkifABI, raw: bytes) -> None:
    """Whatever a hostile frontend writes, parsing succeeds and validation either yields
    an I/O inside the disk or refuses in-band."""
    req = parse_request(abi, raw)
    try:
        io = validate(req, DiskInfo(sectors=4096, feature_discard=True))
    except BlkifRequestError as e:
        assert e.status in (BLKIF_RSP_ERROR, BLKIF_RSP_EOPNOTSUPP)
        return
    assert io.offset >= 0 and io.offset + io.length <= 4096 * 512
    assert sum(s.length for s in io.segments) == (io.length if io.kind in ("read", "write") else 0)


@pytest.mark.parametrize("abi", ABIS, ids=lambda a: a.name)
def test_indirect_round_trip(abi: BlkifABI) -> None:
    raw = build_indirect(abi, BLKIF_OP_WRITE, 0x1122334455667788, 64, 600, [70, 71], handle=51712)
    assert len(raw) == abi.request.size
    req = parse_request(abi, raw)
    assert (req.operation, req.indirect_op, req.nr_segments, req.id, req.sector_number, req.handle) == (
        BLKIF_OP_INDIRECT, BLKIF_OP_WRITE, 600, 0x1122334455667788, 64, 51712)
    assert req.indirect_grefs == (70, 71) and req.response_op == BLKIF_OP_WRITE
    disk = DiskInfo(sectors=8192, max_indirect_segments=1024)
    check_indirect(req, disk)
    segs = [Segment(1000 + i, 0, 0) for i in range(600)]
    page = pack_segments(segs)
    full = parse_indirect_segments(req, [page[:4096], page[4096:] + bytes(8192 - len(page))])
    io = validate(full, disk)
    assert (io.kind, io.offset, io.length, io.segments[599].gref) == ("write", 64 * 512, 600 * 512, 1599)
    with pytest.raises(BlkifRequestError, match="nr_segments"):
        check_indirect(req, DiskInfo(sectors=8192, max_indirect_segments=256))
    with pytest.raises(BlkifRequestError) as e:
        check_indirect(req, DiskInfo(sectors=8192))
    assert e.value.status == BLKIF_RSP_EOPNOTSUPP


@pytest.mark.parametrize(
    ("sector", "segs", "ok"),
    [(8, [(1, 0, 7)], True), (9, [(1, 0, 7)], False), (8, [(1, 0, 3)], False), (8, [(1, 4, 7)], False),
     (0, [(1, 0, 7), (2, 0, 7)], True)],
)
def test_4k_logical_sectors_refuse_partial_sectors(sector: int, segs: list[tuple[int, int, int]], ok: bool) -> None:
    disk = DiskInfo(sectors=2048, sector_size=4096)
    req = parse_request(ABI_NATIVE, build_request(ABI_NATIVE, BLKIF_OP_READ, 1, sector, [Segment(*s) for s in segs]))
    if ok:
        assert validate(req, disk).length == 4096 * len(segs)
    else:
        with pytest.raises(BlkifRequestError) as e:
            validate(req, disk)
        assert e.value.status == BLKIF_RSP_ERROR
    d = parse_request(ABI_NATIVE, build_discard(ABI_NATIVE, 2, sector, 8 * len(segs)))
    if sector % 8:
        with pytest.raises(BlkifRequestError):
            validate(d, DiskInfo(sectors=2048, sector_size=4096, feature_discard=True))


def test_indirect_pages_for_a_request() -> None:
    # Up to 11 pages fit a direct request; beyond, 512 segments fill an indirect page.
    assert [indirect_pages_for(n) for n in (0, 1, 11, 12, 32, 512, 513)] == [0, 0, 0, 1, 1, 1, 2]


@given(
    st.lists(st.integers(0, 0xFFFFFFFF), min_size=1, max_size=256),
    st.integers(1, 8),
)
@settings(max_examples=300)
def test_page_segments_packed_straight_are_pack_segments_bytes(grefs: list[int], last_sectors: int) -> None:
    # `nbytes` covers every page but the last whole, the last one `last_sectors` sectors
    nbytes = (len(grefs) - 1) * 4096 + last_sectors * 512
    segs = page_segments(grefs, nbytes)
    assert len(segs) == len(grefs) and segs[-1] == Segment(grefs[-1], 0, last_sectors - 1)
    assert all(s == Segment(g, 0, 7) for s, g in zip(segs[:-1], grefs, strict=False))
    assert pack_page_segments(grefs, nbytes) == pack_segments(segs)


@given(
    st.lists(st.tuples(st.integers(0, 0xFFFFFFFF), st.integers(0, 255), st.integers(0, 255)), min_size=1, max_size=64),
    st.sampled_from([(0, 0), (0, 7)]),
    st.sampled_from([512, 4096]),
)
@settings(max_examples=400)
def test_the_whole_pages_shortcut_decides_as_the_segment_by_segment_check(
    segs: list[tuple[int, int, int]], whole: tuple[int, int], sector_size: int
) -> None:
    # Mostly whole pages (the shortcut's case), some segments as the hostile frontend chose.
    segs = [s if k % 3 else (s[0], *whole) for k, s in enumerate(segs)]
    disk = DiskInfo(sectors=1 << 20, max_indirect_segments=64, sector_size=sector_size)
    req = parse_request(ABI_NATIVE, build_indirect(ABI_NATIVE, BLKIF_OP_WRITE, 1, 64, len(segs), [70]))
    page = pack_segments([Segment(*s) for s in segs])
    parsed = parse_indirect_segments(req, [page + bytes(4096 - len(page))])
    assert parsed.whole_pages == all((f, last) == (0, 7) for _, f, last in segs)
    slow = dataclasses.replace(parsed, whole_pages=False)
    outcomes = []
    for r in (parsed, slow):
        try:
            io = validate(r, disk)
            outcomes.append((io.kind, io.offset, io.length, io.segments))
        except BlkifRequestError as e:
            outcomes.append((e.field, e.status))
    assert outcomes[0] == outcomes[1]


def test_whole_page_segments_read_from_indirect_pages_are_the_segments_packed() -> None:
    # The whole-page path makes each gref's Segment once; what it returns must be what the
    # pages say, request after request, and a frontend naming ever new references must not
    # grow what it keeps.
    from pvio.blk import request as rq

    req = parse_request(ABI_NATIVE, build_indirect(ABI_NATIVE, BLKIF_OP_WRITE, 1, 64, 256, [70]))
    for first in range(0, 40_000, 256):
        segs = [Segment(first + k, 0, 7) for k in range(256)]
        page = pack_segments(segs)
        for _ in range(2):
            parsed = parse_indirect_segments(req, [page + bytes(4096 - len(page))])
            assert parsed.whole_pages and list(parsed.segments) == segs
        assert len(rq._whole_segments) <= rq._WHOLE_SEGMENTS_MAX + 257
    assert len(rq._whole_segments) > 0  # first: it does keep segments
