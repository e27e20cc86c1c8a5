"""blkback's parts of a batch (`in_parts`): order kept, nothing lost, each part within its
pages unless one request alone is larger."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from pvio.abi.blkif import BLKIF_OP_READ
from pvio.blk.back_io import MAP_PIECE_PAGES, in_parts
from pvio.blk.request import BlkifRequest, DiskIO, Segment


def _IO(n: int) -> DiskIO:
    """A READ of `n` whole pages (real objects: the compiled build checks types)."""
    segments = (Segment(0, 0, 7),) * n
    request = BlkifRequest(BLKIF_OP_READ, n, 0, 0, 0, segments)
    return DiskIO(request, "read", 0, n * 4096, segments)


@given(st.lists(st.integers(0, 300), max_size=40), st.integers(1, 256))
def test_parts_keep_every_request_in_order_within_the_limit(sizes: list[int], pages: int) -> None:
    group = [_IO(n) for n in sizes]
    parts = in_parts(group, pages)
    assert [io for part in parts for io in part] == group
    for part in parts:
        assert part
        total = sum(len(io.segments) for io in part)
        assert total <= pages or len(part) == 1
    # No two neighbours could have been one part.
    for a, b in itertools.pairwise(parts):
        assert sum(len(io.segments) for io in a) + len(b[0].segments) > pages


def test_a_batch_of_small_requests_is_one_part() -> None:
    group = [_IO(1) for _ in range(32)]
    assert in_parts(group, 128) == [group]
    assert in_parts(group, 32) == [group]  # the map transport's parts: 4 KiB at QD32 stays whole
    assert in_parts([], 128) == []


def test_the_map_transports_parts_split_large_requests_and_zero_means_whole() -> None:
    reads_64k = [_IO(16) for _ in range(8)]
    assert [len(p) for p in in_parts(reads_64k, MAP_PIECE_PAGES)] == [2, 2, 2, 2]
    assert in_parts(reads_64k, 0) == [reads_64k] and in_parts([], 0) == []
