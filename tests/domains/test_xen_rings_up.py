"""`pvio up`'s Xen-style domains reach XenStore over their pages by default: each is
introduced with its page and port, which its home names as libxl writes them; the
socket transport stays selectable."""

from __future__ import annotations

from pathlib import Path

from pvio.testing.up import UpProcess
from pvio.toolstack.xenpages import XENSTORED_DOMID
from pvio.xenstore.client import Client


def test_domains_are_introduced_with_their_pages(tmp_path: Path) -> None:
    up = UpProcess(tmp_path / "s", "--disk", f"vdev=xvda, size=4M, target={tmp_path / 'a.img'}").start()
    try:
        with Client(str(up.paths.xenstored_socket)) as xs:
            assert xs.read("/tool/xenstored/domid") == str(XENSTORED_DOMID).encode()
            for domid in (0, 1):
                ref = int(xs.read(f"/local/domain/{domid}/store/ring-ref"))
                port = int(xs.read(f"/local/domain/{domid}/store/port"))
                assert ref >= 1 << 24 and port > 0  # a shareable page, a real port
            assert xs.read("/local/domain/1/device/vbd/51712/state") == b"4"
    finally:
        rc = up.stop()
    assert rc == 0, up.output()


def test_the_socket_transport_is_still_there(tmp_path: Path) -> None:
    up = UpProcess(tmp_path / "s", "--xenstore-transport", "socket",
                   "--disk", f"vdev=xvda, size=4M, target={tmp_path / 'a.img'}").start()
    try:
        with Client(str(up.paths.xenstored_socket)) as xs:
            assert not xs.exists("/local/domain/1/store/ring-ref")
            assert xs.read("/local/domain/1/device/vbd/51712/state") == b"4"
    finally:
        rc = up.stop()
    assert rc == 0, up.output()
