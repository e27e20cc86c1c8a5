"""blkfront's shadow table and its hostile-backend checks."""

from __future__ import annotations

import pytest

from pvio.blk.shadow import BackendProtocolError, ShadowTable


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
