"""vbd XenStore keys: what each end reads from the other is checked."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvio.abi.blkif import ABI_NATIVE, ABI_X86_32_BLKIF
from pvio.blk.keys import (
    KeyValueError,
    backend_disk_keys,
    parse_backend_disk,
    parse_frontend_ring,
)


def test_single_page_ring() -> None:
    r = parse_frontend_ring({"ring-ref": "8", "event-channel": "5", "protocol": "x86_32-abi"})
    assert (r.ring_refs, r.ring_page_order, r.event_channel, r.abi) == ((8,), 0, 5, ABI_X86_32_BLKIF)
    assert parse_frontend_ring({"ring-ref": "8", "event-channel": "5"}).abi == ABI_NATIVE


def test_multi_page_ring() -> None:
    values = {"ring-page-order": "2", "event-channel": "9"} | {f"ring-ref{i}": str(10 + i) for i in range(4)}
    r = parse_frontend_ring(values)
    assert r.ring_refs == (10, 11, 12, 13) and r.ring_page_order == 2


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"event-channel": "5"}, "ring-ref"),
        ({"ring-ref": "8"}, "event-channel"),
        ({"ring-ref": "-1", "event-channel": "5"}, "ring-ref"),
        ({"ring-ref": "0x8", "event-channel": "5"}, "ring-ref"),
        ({"ring-ref": "4294967296", "event-channel": "5"}, "ring-ref"),
        ({"ring-ref": "8", "event-channel": "5", "protocol": "sparc-abi"}, "protocol"),
        ({"ring-page-order": "5", "ring-ref0": "1", "event-channel": "5"}, "ring-page-order"),
        ({"ring-page-order": "1", "ring-ref0": "1", "event-channel": "5"}, "ring-ref1"),
        ({"ring-ref": "9" * 400, "event-channel": "5"}, "ring-ref"),
        ({"ring-ref": "\u00b2", "event-channel": "5"}, "ring-ref"),
    ],
)
def test_hostile_frontend_values(values: dict[str, str], key: str) -> None:
    with pytest.raises(KeyValueError) as info:
        parse_frontend_ring(values)
    assert info.value.key == key


def test_backend_keys_round_trip() -> None:
    keys = backend_disk_keys(2097152, read_only=True, cdrom=True, discard=True)
    d = parse_backend_disk(keys)
    assert (d.sectors, d.read_only, d.cdrom, d.removable, d.size) == (2097152, True, True, False, 1 << 30)
    assert d.feature_flush_cache and d.feature_barrier and d.feature_discard


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({}, "sectors"),
        ({"sectors": "x"}, "sectors"),
        ({"sectors": "8", "sector-size": "1000"}, "sector-size"),
        ({"sectors": "8", "sector-size": "4096", "physical-sector-size": "512"}, "physical-sector-size"),
    ],
)
def test_hostile_backend_values(values: dict[str, str], key: str) -> None:
    with pytest.raises(KeyValueError) as info:
        parse_backend_disk(values)
    assert info.value.key == key


@given(st.dictionaries(st.sampled_from(["ring-ref", "ring-page-order", "ring-ref0", "ring-ref1",
                                        "event-channel", "protocol"]), st.text(max_size=30)))
def test_arbitrary_frontend_values_never_crash(values: dict[str, str]) -> None:
    try:
        parse_frontend_ring(values)
    except KeyValueError:
        pass
