"""The vbd directories pvio's toolstack writes, compared with libxl's."""

from __future__ import annotations

from pathlib import Path

from pvio.toolstack.config import from_disk_options
from pvio.toolstack.diskspec import parse
from pvio.toolstack.xslayout import vbd_add, vbd_destroy, vbd_remove_request


def test_vbd_add_matches_libxl() -> None:
    ops = vbd_add(3, parse("vdev=xvda, access=ro, target=/d.img"), "/d.img")
    writes = {op.path: op.value for op in ops if op.op == "write"}
    fe, be = "/local/domain/3/device/vbd/51712", "/local/domain/0/backend/vbd/3/51712"
    assert writes[f"{fe}/backend"] == be and writes[f"{be}/frontend"] == fe
    assert writes[f"{fe}/virtual-device"] == "51712"
    assert writes[f"{fe}/state"] == writes[f"{be}/state"] == "1"
    assert writes[f"{be}/mode"] == "r" and writes[f"{be}/params"] == "/d.img"
    assert writes[f"{be}/frontend-id"] == "3" and writes[f"{fe}/backend-id"] == "0"
    assert writes["/libxl/3/device/vbd/51712/backend"] == be
    perms = {op.path: op.perms for op in ops if op.op == "set_perms"}
    assert perms == {fe: ("n3", "r0"), be: ("n0", "r3")}
    # each directory is removed and re-made before its keys are written
    order = [(op.op, op.path) for op in ops]
    assert order.index(("rm", fe)) < order.index(("mkdir", fe)) < order.index(("write", f"{fe}/backend"))


def test_remove_and_destroy() -> None:
    be = "/local/domain/0/backend/vbd/3/51728"
    assert [(o.path, o.value) for o in vbd_remove_request(3, 51728)] == [
        (f"{be}/online", "0"), (f"{be}/state", "5")]
    assert {o.path for o in vbd_destroy(3, 51728)} == {
        "/local/domain/3/device/vbd/51728", be, "/libxl/3/device/vbd/51728"}


def test_pvio_up_disk_option_takes_sector_size(tmp_path: Path) -> None:
    cfg = from_disk_options(["format=raw, vdev=xvda, sector-size=4096, size=64M, target=a.img"], tmp_path)
    (disk,) = cfg.domains[0].disks
    assert disk.spec.sector_size == 4096 and disk.size == 64 << 20
    ops = {op.path.rsplit("/", 1)[-1]: op.value for op in vbd_add(1, disk.spec, "a.img") if op.op == "write"}
    assert ops["logical-block-size"] == "4096"
    plain = from_disk_options(["format=raw, vdev=xvda, target=a.img"], tmp_path).domains[0].disks[0]
    assert "logical-block-size" not in {op.path.rsplit("/", 1)[-1] for op in vbd_add(1, plain.spec, "a")}
