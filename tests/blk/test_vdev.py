"""xen-vbd-interface(7) names and numbers, both ways."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pvio.blk import vdev


@pytest.mark.parametrize(
    ("name", "kind", "disk", "part", "number"),
    [
        ("xvda", "xvd", 0, 0, 202 << 8),
        ("d0", "xvd", 0, 0, 202 << 8),
        ("d0p0", "xvd", 0, 0, 202 << 8),
        ("xvdb2", "xvd", 1, 2, 202 << 8 | 1 << 4 | 2),
        ("d1p2", "xvd", 1, 2, 202 << 8 | 1 << 4 | 2),
        ("xvdp", "xvd", 15, 0, 202 << 8 | 15 << 4),
        ("xvdq", "xvd", 16, 0, 1 << 28 | 16 << 8),
        ("xvda16", "xvd", 0, 16, 1 << 28 | 16),
        ("xvdtq37", "xvd", 536, 37, 1 << 28 | 536 << 8 | 37),
        ("d536p37", "xvd", 536, 37, 1 << 28 | 536 << 8 | 37),
        ("sdb3", "sd", 1, 3, 8 << 8 | 1 << 4 | 3),
        ("hda", "hd", 0, 0, 3 << 8),
        ("hdb63", "hd", 1, 63, 3 << 8 | 1 << 6 | 63),
        ("hdc2", "hd", 2, 2, 22 << 8 | 0 << 6 | 2),
        ("hdd", "hd", 3, 0, 22 << 8 | 1 << 6),
    ],
)
def test_man_page_examples(name: str, kind: str, disk: int, part: int, number: int) -> None:
    v = vdev.parse(name)
    assert (v.kind, v.disk, v.partition) == (kind, disk, part)
    assert v.number == number
    assert vdev.decode(number) == v


def test_bare_numbers_are_decoded() -> None:
    assert vdev.parse("51712").name == "xvda"
    assert vdev.parse("0xca00").name == "xvda"
    assert vdev.parse("0145000").name == "xvda"  # octal 0145000 == 51712


@pytest.mark.parametrize(
    "bad", ["", "xvd", "vda", "sdq", "sda16", "hde", "hda64", "xvda01", "d1p256", "2147483648", "-1", "x"]
)
def test_invalid_names_are_refused(bad: str) -> None:
    with pytest.raises(vdev.VdevError):
        vdev.parse(bad)


def test_deprecated_numbers_are_refused() -> None:
    with pytest.raises(vdev.VdevError):
        vdev.decode(7 << 8)  # loop major: not an encoding
    with pytest.raises(vdev.VdevError):
        vdev.decode(2 << 28)


@given(st.integers(0, (1 << 20) - 1), st.integers(0, 255))
def test_xvd_round_trip(disk: int, part: int) -> None:
    v = vdev.Vdev("xvd", disk, part)
    assert vdev.decode(v.number) == v
    assert vdev.parse(v.name) == v
    assert vdev.letters_disk(vdev.disk_letters(disk)) == disk
