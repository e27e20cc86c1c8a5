"""Debian's libxenevtchn and libxengnttab, unmodified, on pvio through the device layer.

A small C program written against those libraries (xendev_peer.c) runs as pvio domains
of a real `pvio hypervisor`, with libpvio-xen.so preloaded: the evtchn device's
semantics in one domain; two domains sharing pages (gntalloc), mapping them (gntdev),
copying through them (GRANT_COPY) and signalling each other; and a third domain that
tries the same grants and gets Xen's errors.  Every test runs plainly and under
AddressSanitizer/UBSan (program and layer both).
"""

from __future__ import annotations

import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from native.devlayer import VARIANTS, build_layer, build_peer, check_output, domain_env, hypervisor


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    build_layer()
    out = tmp_path_factory.mktemp("peers")
    return {v: build_peer("xendev_peer", out, v, ["-lxenevtchn", "-lxengnttab"]) for v in VARIANTS}


@pytest.fixture
def hv(tmp_path: Path) -> Iterator[Path]:
    with hypervisor(tmp_path) as path:
        yield path


def run(exe: Path, env: dict[str, str], *args: str) -> list[str]:
    proc = subprocess.run([str(exe), *args], env=env, capture_output=True, text=True, timeout=60)
    return check_output(proc, proc.stdout, proc.stderr)


@pytest.mark.parametrize("variant", VARIANTS)
def test_evtchn_device_semantics(peers: dict[str, Path], hv: Path, variant: str) -> None:
    done = run(peers[variant], domain_env(hv, 3, variant), "evtchn")
    assert done == ["bind", "mask-on-delivery", "both-ways", "read", "blocking-read", "reset", "errors",
                    "virq", "per-open", "unbind"]


@pytest.mark.parametrize(("variant", "transport"), [("plain", "map"), ("plain", "copy"), ("asan", "copy")])
def test_two_domains_share_map_copy_and_signal(peers: dict[str, Path], hv: Path, variant: str, transport: str) -> None:
    exe = peers[variant]
    granter = subprocess.Popen([str(exe), "share", "6"], env=domain_env(hv, 5, variant), text=True,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert granter.stdout is not None and granter.stdin is not None
        words = granter.stdout.readline().split()
        assert words[:1] == ["refs"], words
        r0, r1, ro, port = words[1], words[2], words[4], words[6]
        # A third domain: the grants are not for it.
        assert run(exe, domain_env(hv, 7, variant), "steal", "5", r0) == ["steal"]
        mapped = run(exe, domain_env(hv, 6, variant, transport), "map", "5", r0, r1, ro, port)
        assert mapped == ["map", "readonly", "ungranted", "grant-copy", "threads", "events", "done"]
        out, err = granter.communicate("\n", timeout=30)
    finally:
        if granter.poll() is None:
            granter.kill()
            granter.wait()
    assert check_output(granter, out, err) == ["shared", "done"]


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_forked_child_is_the_domain_an_inherited_device_is_not(peers: dict[str, Path], hv: Path,
                                                                variant: str) -> None:
    done = run(peers[variant], domain_env(hv, 4, variant), "fork")
    assert done[-2:] == ["child-first", "inherited"]


def test_without_a_hypervisor_there_is_no_xen(peers: dict[str, Path], tmp_path: Path) -> None:
    env = domain_env(tmp_path / "nothing.sock", 3, "plain")
    proc = subprocess.run([str(peers["plain"]), "evtchn"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "FAIL open" in proc.stdout and "No such file" in proc.stdout
    del env["PVIO_HYPERVISOR_SOCKET"]
    proc = subprocess.run([str(peers["plain"]), "evtchn"], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1 and "FAIL open" in proc.stdout


@pytest.mark.parametrize("answer", [b"", b"\x00" * 7, b"PVHC" + b"\xff" * 60, b"\x50\x56\x48\x43" + bytes(12)])
def test_a_hostile_hypervisor_gets_an_errno_not_a_crash(peers: dict[str, Path], tmp_path: Path, answer: bytes) -> None:
    path = tmp_path / "hostile.sock"
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srv.bind(str(path))
    srv.listen(1)

    def serve() -> None:
        conn, _ = srv.accept()
        with conn:
            conn.recv(65536)
            if answer:
                conn.send(answer)

    t = threading.Thread(target=serve)
    t.start()
    try:
        proc = subprocess.run([str(peers["asan"]), "evtchn"], env=domain_env(path, 3, "asan"),
                              capture_output=True, text=True, timeout=30)
    finally:
        t.join(10)
        srv.close()
    assert proc.returncode == 1, proc.stderr
    assert "FAIL open" in proc.stdout
