"""blkfront's shadow table and its hostile-backend checks."""

from __future__ import annotations

import pytest

from pvio.blk.shadow import BackendProtocolError, ShadowTable, page_runs
from pvio.hypervisor.domain import PAGE_SIZE


def test_ids_are_reused_and_bounded() -> None:
    t = ShadowTable(4)
    shadows = [t.alloc(0, i, lambda rid: rid.to_bytes(8, "little")) for i in range(4)]
    assert [s.id for s in shadows] == [0, 1, 2, 3]
    assert shadows[2].request == (2).to_bytes(8, "little")
    with pytest.raises(RuntimeError):
        t.alloc(0, 9, bytes)
    assert t.complete(2, 0).sector_number == 2
    assert t.alloc(1, 5, lambda rid: b"x").id == 2
    assert len(t) == 4 and t.free == 0


def test_hostile_responses() -> None:
    t = ShadowTable(4)
    t.alloc(1, 0, lambda rid: b"")
    with pytest.raises(BackendProtocolError, match="not a request id"):
        t.complete(4, 1)
    with pytest.raises(BackendProtocolError, match="no request in flight"):
        t.complete(1, 1)
    with pytest.raises(BackendProtocolError, match="operation"):
        t.complete(0, 0)
    t.complete(0, 1)
    with pytest.raises(BackendProtocolError, match="no request in flight"):
        t.complete(0, 1)  # duplicate


def test_build_failure_returns_the_id() -> None:
    t = ShadowTable(1)

    def boom(rid: int) -> bytes:
        raise ValueError("no")

    with pytest.raises(ValueError):
        t.alloc(0, 0, boom)
    assert t.free == 1


def test_reset_returns_in_flight_in_id_order() -> None:
    t = ShadowTable(8)
    for i in range(5):
        t.alloc(0, i, lambda rid: b"")
    t.complete(1, 0)
    assert [s.id for s in t.reset()] == [0, 2, 3, 4]
    assert len(t) == 0


def test_page_runs_join_consecutive_frames() -> None:
    P = PAGE_SIZE
    # 5 pages' worth less 100 bytes in frames 5, 6, 7, 9, 10: two runs, the last one short.
    assert page_runs([5, 6, 7, 9, 10], 5 * P - 100) == [[0, 5 * P, 3 * P], [3 * P, 9 * P, 2 * P - 100]]
    assert page_runs([3, 2, 1], 3 * P) == [[0, 3 * P, P], [P, 2 * P, P], [2 * P, P, P]]  # descending: no run
    assert page_runs([8], 512) == [[0, 8 * P, 512]]
    # Frames past the data (an indirect request's own pages) are not part of it.
    assert page_runs([1, 2, 3, 4], 2 * P) == [[0, P, 2 * P]]
    assert page_runs([], 0) == []
