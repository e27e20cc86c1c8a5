"""xl disk specifications as `pvio up --disk` takes them."""

from __future__ import annotations

import pytest

from pvio.toolstack.diskspec import DiskSpecError, parse


def test_keyword_form() -> None:
    d = parse("format=raw, vdev=xvda, access=rw, target=/path/disk.img")
    assert (d.target, d.format, d.vdev.name, d.access, d.read_only) == (
        "/path/disk.img", "raw", "xvda", "rw", False)


def test_positional_form_and_readonly() -> None:
    d = parse("/img/a.qcow2,qcow2,xvdb,r")
    assert (d.target, d.format, d.vdev.name, d.access, d.read_only) == (
        "/img/a.qcow2", "qcow2", "xvdb", "ro", True)


def test_target_swallows_commas() -> None:
    d = parse("vdev=xvdc, target=/odd,name,disk.img")
    assert d.target == "/odd,name,disk.img"


def test_cdrom_is_read_only() -> None:
    d = parse("vdev=hdc, cdrom, target=/x.iso")
    assert d.devtype == "cdrom" and d.read_only


def test_default_vdev() -> None:
    assert parse("target=/d.img", default_vdev="xvdb").vdev.name == "xvdb"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("vdev=xvda", "no target"),
        ("target=/x", "no vdev"),
        ("formt=raw, vdev=xvda, target=/x", "unknown disk spec key 'formt'"),
        ("format=vmdk, vdev=xvda, target=/x", "unknown disk format"),
        ("access=rx, vdev=xvda, target=/x", "unknown access"),
        ("vdev=xvda, vdev=xvdb, target=/x", "twice"),
        ("vdev=zzz, target=/x", "not a virtual-device"),
        ("/a,raw,xvda,rw,extra", "too many positional"),
    ],
)
def test_errors_name_the_problem(spec: str, needle: str) -> None:
    with pytest.raises(DiskSpecError, match=needle):
        parse(spec)


def test_sector_size_is_pvios_addition() -> None:
    assert parse("vdev=xvda, target=/x.img").sector_size == 512
    assert parse("vdev=xvda, sector-size=4096, target=/x.img").sector_size == 4096
    for bad in ("1000", "8192", "4k", ""):
        with pytest.raises(DiskSpecError, match="sector-size"):
            parse(f"vdev=xvda, sector-size={bad}, target=/x.img")
