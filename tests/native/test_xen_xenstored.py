"""Xen's own C xenstored and xenconsoled (Debian's xen-utils-4.17, unmodified) serving pvio.

Below `pvio up`: the daemon as the XenStore domain over a real hypervisor, serving a pvio
domain's ring (the page granted at GNTTAB_RESERVED_XENSTORE, mapped through gntdev), and
hearing of that domain's death as VIRQ_DOM_EXC alone -- nobody sends XS_RELEASE -- which
it answers by asking the hypervisor (getdomaininfo) and firing @releaseDomain.  Under
both builds of the device layer (plain, ASan/UBSan).

With `pvio up --xenstored xen` and/or `--console-daemon xen`: the guest's disk passes
qemu-io's verify over NBD, Xen's XenStore tools read the tree, `pvio console` reaches the
guest's shell and xenconsoled's log has it timestamped; a killed guest comes back with
its disk and console; what only pvio's xenstored can serve is refused up front.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from native.devlayer import VARIANTS, build_layer, hypervisor, preload
from pvio.abi.xs_wire import XsdSockmsgType
from pvio.hypervisor.aio import connect
from pvio.toolstack.paths import StatePaths
from pvio.toolstack.xen_daemons import XEN_BIN, xen_xenstored_argv
from pvio.toolstack.xenpages import XENSTORED_DOMID
from pvio.xenstore.client import AsyncClient
from pvio.xenstore.client_ring import build_store_page, open_ring_client
from pvio.xenstore.wire import join_args
from pvioup import PvioUp

pytestmark = pytest.mark.slow
XENSTORED = XEN_BIN / "xenstored"
XENCONSOLED = XEN_BIN / "xenconsoled"


def need_xenstored() -> None:
    assert os.access(XENSTORED, os.X_OK), f"{XENSTORED} is not installed (bash tools/install.sh installs it)"


@contextlib.contextmanager
def xen_xenstored(root: Path, hv_sock: Path, variant: str) -> Iterator[Path]:
    """Xen's xenstored as `pvio up --xenstored xen` starts it, on the hypervisor at
    `hv_sock`; yields its socket and checks at the end that it exited cleanly."""
    paths = StatePaths(root)
    paths.make()
    argv = xen_xenstored_argv(paths)
    env = os.environ | {"PVIO_HYPERVISOR_SOCKET": str(hv_sock), "LD_PRELOAD": preload(variant),
                        "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:exitcode=99"}
    argv = [a for a in argv if not a.startswith(("PVIO_HYPERVISOR_SOCKET=", "LD_PRELOAD="))]
    log_path = root / "xenstored.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 20
        while True:
            with contextlib.suppress(OSError), socket.socket(socket.AF_UNIX) as s:
                s.connect(str(paths.xenstored_socket))
                break
            assert proc.poll() is None and time.monotonic() < deadline, log_path.read_text()
            time.sleep(0.05)
        yield paths.xenstored_socket
        assert proc.poll() is None, f"xenstored exited {proc.returncode}:\n{log_path.read_text()}"
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)
    assert proc.returncode in (0, -signal.SIGTERM), log_path.read_text()


async def serve_and_lose_a_domain(hv_sock: Path, xs_sock: Path) -> None:
    # Domain 0 first, with its own page, as pvio up introduces its driver domain:
    # xenstored charges socket connections to domain 0, and refuses their watches
    # until it knows it (on Xen, dom0 is there before xenstored starts).
    dom0 = await connect(str(hv_sock), "dom0", 16, domid=0)
    page0 = await build_store_page(dom0, XENSTORED_DOMID)
    tool = await AsyncClient.open(str(xs_sock))
    await tool.introduce(0, page0.frame, page0.port)
    dom = await connect(str(hv_sock), "guest7", 64, domid=7)
    page = await build_store_page(dom, XENSTORED_DOMID)
    await tool.introduce(7, page.frame, page.port)
    await tool.write("/local/domain/7", "")
    await tool.set_perms("/local/domain/7", ["n7"])
    guest = await open_ring_client(dom, page.view, page.port)
    # The domain's own requests arrive over its ring, as domain 7: relative paths are
    # its home, and it cannot read what it was not given.
    await guest.write("data/greeting", "over the ring")
    assert await tool.read("/local/domain/7/data/greeting") == b"over the ring"
    assert (await guest.get_domain_path(7)) == "/local/domain/7"
    with pytest.raises(Exception, match="EACCES"):
        await guest.read("/local/domain/0")
    released = await tool.watch("@releaseDomain")
    await asyncio.wait_for(released.get(), 10)  # the first event fires at registration
    # The domain dies (its connection to the hypervisor closes), and nothing else is said.
    with contextlib.suppress(Exception):
        await guest.close()
    await dom.close()
    event = await asyncio.wait_for(released.get(), 20)
    assert event.path == "@releaseDomain"
    # xenstored forgot the domain: it is no longer introduced.
    assert await tool.call(XsdSockmsgType.XS_IS_DOMAIN_INTRODUCED, join_args("7")) == b"F\0"
    await tool.close()
    await dom0.close()


@pytest.mark.parametrize("variant", VARIANTS)
def test_xen_xenstored_serves_a_ring_and_hears_a_domain_die(tmp_path: Path, variant: str) -> None:
    need_xenstored()
    build_layer()
    with hypervisor(tmp_path) as hv_sock, xen_xenstored(tmp_path / "state", hv_sock, variant) as xs_sock:
        asyncio.run(serve_and_lose_a_domain(hv_sock, xs_sock))
        # Xen's own tool reads the tree: Xen's xenstored made /tool/xenstored, owned by
        # its master domain (itself), and dropped what the dead domain owned.
        out = subprocess.run(["xenstore-ls", "-p", "/"], env=os.environ | {"XENSTORED_PATH": str(xs_sock)},
                             capture_output=True, text=True, timeout=30)
        assert out.returncode == 0 and "xenstored" in out.stdout and f"(n{XENSTORED_DOMID})" in out.stdout, out
        assert "greeting" not in out.stdout, out


def say_hello(up: PvioUp, word: str) -> None:
    """`pvio console` reaches the guest's shell, and the console daemon logs it."""
    con = subprocess.run([sys.executable, "-m", "pvio", "console", "guest1", "--state-dir", str(up.state_dir),
                          "--linger", "1.5"], input=f"echo {word}-$((6*7))\n".encode(), capture_output=True, timeout=60)
    assert f"{word}-42".encode() in con.stdout, con
    log = up.paths.logs / "consoles" / "guest-guest1.log"
    up.wait_for(lambda: re.search(rf"^\[\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d\] {word}-42", log.read_text(), re.M),
                what=f"{word}-42 in {log}")


@pytest.mark.parametrize(("xenstored", "console_daemon"), [("xen", "pvio"), ("xen", "xen"), ("pvio", "xen")])
def test_pvio_up_with_xens_daemons(tmp_path: Path, xenstored: str, console_daemon: str) -> None:
    need_xenstored()
    build_layer()
    up = PvioUp(tmp_path / "s", "--xenstored", xenstored, "--console-daemon", console_daemon,
                "--disk", f"vdev=xvda, size=16M, target={tmp_path / 'a.img'}")
    with up.serving():
        for name, binary, daemon in (("xenstored", XENSTORED, xenstored), ("xenconsoled", XENCONSOLED, console_daemon)):
            svc = next(s for s in up.status["services"] if s["name"] == name)
            assert (os.readlink(f"/proc/{svc['pid']}/exe") == str(binary)) == (daemon == "xen"), svc
        uri = up.nbd_uri()
        verify = ["qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M", uri]
        out = subprocess.run(verify, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "Pattern verification failed" not in out.stdout + out.stderr, out
        ls = subprocess.run(["xenstore-ls", "-f", "/local/domain/1"], env=up.xs_env(), capture_output=True, text=True)
        assert "/local/domain/1/store/ring-ref" in ls.stdout and "/local/domain/1/device/vbd/51712/state = \"4\"" in ls.stdout, ls
        up.wait_for(lambda: "/dev/pts/" in subprocess.run(["xenstore-read", "/local/domain/1/console/tty"], env=up.xs_env(),
                                                          capture_output=True, text=True).stdout, what="console/tty")
        say_hello(up, "hello")
        # A killed guest: xenstored hears it die, pvio up restarts it, the disk serves again.
        pid = next(d for d in up.status["domains"] if d["name"] == "guest1")["pid"]
        os.kill(pid, signal.SIGKILL)
        up.wait_for(lambda: "domain guest1 is back" in up.output(), what="guest1 back")
        out = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x5a 0 1M", up.nbd_uri()],
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0 and "Pattern verification failed" not in out.stdout + out.stderr, out
        say_hello(up, "again")


@pytest.mark.parametrize(("args", "said"), [
    (["--xenstore-transport", "socket"], "cannot be combined with --xenstore-transport socket"),
    (["--disk", "vdev=xvda, size=4M, backendtype=qdisk, target={tmp}/q.img"], "backendtype=qdisk"),
    (["--xenstored", "pvio", "--console-daemon", "xen", "--xenstore-transport", "socket"],
     "--console-daemon xen serves the consoles"),
])
def test_what_only_pvios_xenstored_serves_is_refused(tmp_path: Path, args: list[str], said: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    out = subprocess.run([sys.executable, "-m", "pvio", "up", "--xenstored", "xen", "--state-dir", str(tmp_path / "s"),
                          *args], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and said in out.stdout + out.stderr, out
    assert not (tmp_path / "s" / "xenstored.sock").exists()


def test_a_dead_driver_domain_ends_the_run_with_xen_xenstored(tmp_path: Path) -> None:
    """Xen's xenstored removes what a dead domain owned -- the driver domain's backend
    directories -- so pvio up says so and stops, rather than restart a driver domain
    whose devices are gone."""
    need_xenstored()
    build_layer()
    up = PvioUp(tmp_path / "s", "--xenstored", "xen", "--disk", f"vdev=xvda, size=4M, target={tmp_path / 'a.img'}")
    up.start()
    try:
        pid = next(d for d in up.status["domains"] if d["role"] == "driver")["pid"]
        os.kill(pid, signal.SIGKILL)
        assert up.proc is not None
        code = up.proc.wait(60)  # it stops by itself, cleaning up as at Ctrl-C
    finally:
        up.kill()
    assert code == 1 and "it is not restarted" in up.output(), up.output()
    assert not up.paths.xenstored_socket.exists()


def test_bench_xenstore_measures_xen_xenstored(tmp_path: Path) -> None:
    """`pvio bench xenstore`, tiny: a domain's ring and socket requests to pvio's
    xenstored and, in the same run, to Xen's serving the same kind of ring."""
    need_xenstored()
    build_layer()
    out = tmp_path / "xs.json"
    proc = subprocess.run([sys.executable, "-m", "pvio", "bench", "xenstore", "--iterations", "50", "--runs", "2",
                           "--idle", "10", "--json", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    for line in ("C xenstored, ring", "C xenstored, socket", "pvio ring / C xenstored ring: read x"):
        assert line in proc.stdout, proc.stdout
    ns = json.loads(out.read_text())["ns"]
    assert all(len(ns[f"{d}_{t}_{r}"]) == 2 for d in ("pvio", "xen") for t in ("ring", "socket")
               for r in ("read", "transaction")), ns.keys()
