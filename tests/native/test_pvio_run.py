"""`pvio run`: programs built on Xen's libraries as domains of a running `pvio up`.

One `pvio up` (a guest with a small disk) serves the module.  Xen's own xenstore-read
and xenstore-write, run with `pvio run --domid N`, see domain N's XenStore home and
permissions; two runs of the libxenevtchn/libxengnttab peer are two domains sharing
pages and event channels; the program's exit status is pvio run's; afterwards the
domain is gone from XenStore.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from native.devlayer import build_layer, build_peer, check_output, library, preload
from pvioup import PvioUp

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PvioUp]:
    build_layer()
    root = tmp_path_factory.mktemp("run")
    p = PvioUp(root / "state", "--disk", f"vdev=xvda, size=16M, target={root / 'a.img'}")
    p.start()
    try:
        yield p
    finally:
        try:
            p.stop()
        finally:
            p.kill()


@pytest.fixture(scope="module")
def peer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_peer("xendev_peer", tmp_path_factory.mktemp("peer"), "plain", ["-lxenevtchn", "-lxengnttab"])


def pvio_run(up: PvioUp, domid: int, *argv: str, transport: str = "copy", **kw: object) -> list[str]:
    return [sys.executable, "-m", "pvio", "run", "--state-dir", str(up.state_dir), "--domid", str(domid),
            "--transport", transport, "--", *argv]


def sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_the_program_is_domain_n_in_xenstore(up: PvioUp) -> None:
    got = sh(*pvio_run(up, 11, "sh", "-c", "xenstore-read domid name; xenstore-write data/x hello; xenstore-read data/x"))
    assert got.returncode == 0, got.stderr
    assert got.stdout.split() == ["11", "sh", "hello"]
    denied = sh(*pvio_run(up, 11, "xenstore-write", "/local/domain/0/stolen", "x"))
    assert denied.returncode != 0 and "could not write" in denied.stderr
    for path in ("/local/domain/0/stolen", "/local/domain/11"):  # refused; released
        assert subprocess.run(["xenstore-exists", path], env=up.xs_env(), capture_output=True).returncode != 0


def test_exit_status_passes_through(up: PvioUp) -> None:
    assert sh(*pvio_run(up, 12, "sh", "-c", "exit 7")).returncode == 7
    assert sh(*pvio_run(up, 12, "sh", "-c", "kill -TERM $$")).returncode == 128 + 15


def test_refusals_are_said(up: PvioUp) -> None:
    taken = sh(*pvio_run(up, 1, "true"))
    assert taken.returncode != 0 and "guest1" in taken.stderr
    missing = sh(*pvio_run(up, 13, "/nonexistent/program"))
    assert missing.returncode != 0 and "cannot run" in missing.stderr


@pytest.mark.parametrize("transport", ["copy", "map"])
def test_two_programs_are_two_domains(up: PvioUp, peer: Path, transport: str) -> None:
    granter = subprocess.Popen(pvio_run(up, 21, str(peer), "share", "22"), text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert granter.stdout is not None
        words = granter.stdout.readline().split()
        assert words[:1] == ["refs"], (words, granter.stderr.read() if granter.stderr else "")
        mapper = sh(*pvio_run(up, 22, str(peer), "map", "21", words[1], words[2], words[4], words[6], transport=transport))
        assert check_output(mapper, mapper.stdout, mapper.stderr)[-1] == "done"
        out, err = granter.communicate("\n", timeout=30)
    finally:
        if granter.poll() is None:
            granter.kill()
            granter.wait()
    assert check_output(granter, out, err) == ["shared", "done"]


def wait_introduced(up: PvioUp, domid: int) -> None:
    up.wait_for(lambda: subprocess.run(["xenstore-exists", f"/local/domain/{domid}/name"], env=up.xs_env()).returncode == 0,
                timeout=30, what=f"domain {domid} in XenStore")


@pytest.mark.parametrize(("variant", "mib", "ending"), [("plain", 100, "close"), ("asan", 4, "close"),
                                                         ("plain", 4, "exit")])
def test_libxenvchan_between_two_domains(up: PvioUp, tmp_path: Path, variant: str, mib: int, ending: str) -> None:
    """100 MiB each way through Xen's own libxenvchan; the client's close is seen by the
    server, and a server that exits without closing is seen by the client (the device
    layer runs its unmap notifications at exit, as Linux when a process goes)."""
    exe = build_peer("vchan_peer", tmp_path, variant, ["-lxenvchan", "-lxenstore", "-lxenevtchn", "-lxengnttab"])
    size = str(mib << 20)
    path = "/local/domain/31/data/vchan"
    env = os.environ | ({"PVIO_XEN_PRELOAD": str(library("asan")), "LD_PRELOAD": preload("asan"),
                         "ASAN_OPTIONS": "detect_leaks=0"} if variant == "asan" else {})
    # The client's domain must exist before the server names it in the keys' permissions.
    more = ["exit"] if ending == "exit" else []
    client = subprocess.Popen(pvio_run(up, 32, str(exe), "client", "31", path, size, *more), env=env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    server = None
    try:
        wait_introduced(up, 32)
        server = subprocess.Popen(pvio_run(up, 31, str(exe), "server", "32", path, size, *more), env=env, text=True,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        s_out, s_err = server.communicate(timeout=240)
        c_out, c_err = client.communicate(timeout=30)
    finally:
        for p in (client, server):
            if p is not None and p.poll() is None:
                p.kill()
                p.wait()
    assert server.returncode == 0 and client.returncode == 0, f"server:\n{s_out}{s_err}\nclient:\n{c_out}{c_err}"
    s_sum = next(line.split()[1:] for line in s_out.splitlines() if line.startswith("sum "))
    c_sum = next(line.split()[1:] for line in c_out.splitlines() if line.startswith("sum "))
    assert s_sum == c_sum[::-1]  # what one sent is what the other received, both ways
    assert "ok closed" in c_out and ("ok closed" in s_out or ending == "exit")
    print(next(line for line in s_out.splitlines() if line.startswith("rate")))
