"""tests/c/xen_blkfront.c: a blkif frontend written against Xen's own libraries only
(libxenstore, libxengntshr, libxenevtchn), run as a pvio domain with `pvio run`, gets a
disk from pvio's blkback through the whole XenBus handshake, as a Xen guest's driver
would: the toolstack writes the vbd's directories (libxl's layout), the frontend grants
its ring and a data page through gntalloc, binds an event channel, writes its keys,
connects, writes, reads back, flushes and closes.  Nothing pvio-specific is in the C."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from domains.harness import apply_ops
from native.devlayer import build_layer
from pvio.toolstack import xslayout
from pvio.toolstack.diskspec import parse
from pvio.xenstore.client import Client
from pvioup import PvioUp

pytestmark = pytest.mark.slow
SOURCE = Path(__file__).resolve().parents[1] / "c" / "xen_blkfront.c"
DOMID = 40
PATTERN = bytes((i * 7 + 1) & 0xFF for i in range(4096))


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PvioUp]:
    build_layer()
    root = tmp_path_factory.mktemp("xen-blkfront")
    p = PvioUp(root / "state", "--disk", f"vdev=xvda, size=4M, target={root / 'a.img'}")
    with p.serving():
        yield p


def test_a_frontend_on_xens_libraries_gets_a_disk_from_blkback(up: PvioUp, tmp_path: Path) -> None:
    exe = tmp_path / "xen_blkfront"
    cc = subprocess.run(["gcc", "-std=gnu11", "-O1", "-g", "-Wall", "-Wextra", "-Werror", "-o", str(exe), str(SOURCE),
                         "-lxenstore", "-lxengnttab", "-lxenevtchn"], capture_output=True, text=True)
    assert cc.returncode == 0, cc.stderr
    image = tmp_path / "b.img"
    image.write_bytes(b"\0" * (1 << 20))
    spec = parse(f"vdev=xvdb, target={image}")
    front = subprocess.Popen([sys.executable, "-m", "pvio", "run", "--state-dir", str(up.state_dir), "--domid",
                              str(DOMID), "--", str(exe), str(spec.vdev.number)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with Client(up.xenstored_path) as xs:
            # `pvio run` introduces the domain; then the toolstack writes its vbd (libxl's order)
            up.wait_for(lambda: xs.read(f"/local/domain/{DOMID}/name"), what=f"domain {DOMID}")
            with xs.transaction() as tx:
                apply_ops(xs, tx, xslayout.vbd_add(DOMID, spec, str(image)))
            out, err = front.communicate(timeout=60)
            assert front.returncode == 0 and out.startswith("ok sectors=2048"), out + err
            assert image.read_bytes()[:4096] == PATTERN  # it reached the image, through blkback
            be = xslayout.backend_path(0, DOMID, spec.vdev.number)
            up.wait_for(lambda: xs.read(f"{be}/state") == b"6", what="blkback Closed")
            with xs.transaction() as tx:
                apply_ops(xs, tx, xslayout.vbd_destroy(DOMID, spec.vdev.number))
    finally:
        if front.poll() is None:
            front.kill()
            front.wait()

