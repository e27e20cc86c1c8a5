"""`pvio up` end to end: real processes, real NBD clients, Xen's XenStore tools, the kernel.

One `pvio up` runs for the module (two disks: a read-write xvda and a read-only xvdb);
the tests that kill the driver domain get their own.  Every check goes through the
guest's NBD export, so each byte crosses blkfront → ring → blkback → image and back.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernelpath import ext4_round_trip, kernel_path_missing, sh
from nbd.tlscerts import make_creds
from pvioup import PvioUp

MiB = 1 << 20


def _free_port_pair() -> int:
    """A port P such that P and P+1 are free on 127.0.0.1 right now."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return int(port)
    raise AssertionError("no two consecutive free ports")


def _commands(cmds: list[str]) -> list[str]:
    return [arg for c in cmds for arg in ("-c", c)]


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None]
    assert not missing, f"not installed: {missing} (bash tools/install.sh installs them)"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PvioUp]:
    root = tmp_path_factory.mktemp("up")
    rw = root / "xvda.img"
    ro = root / "xvdb.img"
    with open(ro, "wb") as f:
        f.write(bytes(range(256)) * (16 * MiB // 256))
    p = PvioUp(
        root / "state",
        "--disk", f"format=raw, vdev=xvda, access=rw, size=256M, target={rw}",
        "--disk", f"format=raw, vdev=xvdb, access=ro, target={ro}",
        "--nbd-tcp", str(_free_port_pair()), "--nbd-tls-creds", str(make_creds(root / "tls")),
    )  # fmt: skip
    with p.serving():
        yield p
    assert not (root / "state" / "xenstored.sock").exists()
    assert not (root / "state" / "hypervisor.sock").exists()


def test_banner_and_list(up: PvioUp) -> None:
    out = up.output()
    assert "nbd+unix:///xvda?socket=" in out and "export XENSTORED_PATH=" in out and "qemu-io" in out
    proc = subprocess.run(
        [sys.executable, "-m", "pvio", "list", "--state-dir", str(up.state_dir), "--json"],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    data = json.loads(proc.stdout)
    names = {d["name"]: d for d in data["domains"]}
    assert names["driver"]["domid"] == 0 and names["guest1"]["domid"] == 1
    assert all(d["state"] == "running" for d in data["domains"])
    assert {dev["vdev"] for dev in names["guest1"]["devices"]} == {"xvda", "xvdb"}


def test_nbdinfo_sees_the_disks(up: PvioUp) -> None:
    need("nbdinfo")
    info = json.loads(sh("nbdinfo", "--json", up.nbd_uri(vdev="xvda")).stdout)
    assert info["exports"][0]["export-size"] == 256 * MiB
    info = json.loads(sh("nbdinfo", "--json", up.nbd_uri(vdev="xvdb")).stdout)
    assert info["exports"][0]["export-size"] == 16 * MiB
    assert info["exports"][0]["is_read_only"] is True


def test_nbd_over_localhost_tcp_with_tls(up: PvioUp) -> None:
    need("qemu-io", "nbdinfo")
    devices = {d["vdev"]: d for d in up.domain("guest1")["devices"]}
    tcp = devices["xvda"]["nbd_tcp"]
    assert tcp.startswith("nbds://127.0.0.1:") and devices["xvdb"]["nbd_tcp"] != tcp
    creds = up.state_dir.parent / "tls"
    info = json.loads(sh("nbdinfo", "--json", f"{tcp}?tls-certificates={creds}").stdout)
    assert info["exports"][0]["export-size"] == 256 * MiB
    port = tcp.split(":")[2].split("/")[0]
    sh(
        "qemu-io", "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={creds}",
        "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},export=xvda,tls-creds=tls0",
        "-c", "write -P 0x6b 64M 128k",
    )  # fmt: skip
    plain = subprocess.run(
        ["qemu-io", "-r", "-f", "raw", "-c", "read 0 4k", f"nbd://127.0.0.1:{port}/xvda"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert plain.returncode != 0 and "requires TLS" in plain.stderr
    proc = sh("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x6b 64M 128k", up.nbd_uri())  # same disk, UNIX socket
    assert "Pattern verification failed" not in proc.stdout


def test_xenstore_ls_shows_libxl_layout(up: PvioUp) -> None:
    need("xenstore-ls", "xenstore-read")
    env = up.xs_env()
    be = "/local/domain/0/backend/vbd/1/51712"
    fe = "/local/domain/1/device/vbd/51712"
    out = subprocess.run(["xenstore-ls", "-p", be], capture_output=True, text=True, env=env, timeout=30).stdout
    for key in ("frontend", "params", "mode", "sectors", "info", "feature-flush-cache", "state"):
        assert key in out, out
    read = lambda path: subprocess.run(  # noqa: E731
        ["xenstore-read", path], capture_output=True, text=True, env=env, timeout=30
    ).stdout.strip()
    assert read(f"{be}/state") == "4" and read(f"{fe}/state") == "4"  # both Connected
    assert read(f"{be}/sectors") == str(256 * MiB // 512)
    assert read(f"{fe}/backend") == be and read(f"{fe}/ring-ref").isdigit()
    assert read("/local/domain/1/name") == "guest1"
    # the guest can read its own device directories (inherited from device/, as in libxl)
    perms = subprocess.run(
        ["xenstore-ls", "-p", "/local/domain/1/device"], capture_output=True, text=True, env=env, timeout=30
    ).stdout
    assert any(line.strip().startswith("vbd =") and "(n0,r1)" in line for line in perms.splitlines()), perms


def test_qemu_io_patterns_at_unaligned_offsets(up: PvioUp) -> None:
    need("qemu-io")
    uri = up.nbd_uri()
    cmds = [
        "write -P 0x5a 1 7",  # inside one sector, unaligned
        "write -P 0xa5 4095 4098",  # across pages
        "write -P 0x3c 1048575 65537",  # across the 1 MiB boundary
        "write -P 0x11 200000000 300000",
    ]
    sh("qemu-io", "-f", "raw", *_commands(cmds), uri)
    reads = [
        "read -P 0x5a 1 7",
        "read -P 0xa5 4095 4098",
        "read -P 0x3c 1048575 65537",
        "read -P 0x11 200000000 300000",
        "read -P 0 0 1",
        "read -P 0 8 4087",
    ]
    proc = sh("qemu-io", "-r", "-f", "raw", *_commands(reads), uri)
    assert "Pattern verification failed" not in proc.stdout
    # flush, then the image itself holds exactly those bytes
    sh("qemu-io", "-f", "raw", "-c", "flush", uri)
    image = Path(up.domain("guest1")["devices"][0]["target"])
    with open(image, "rb") as f:
        f.seek(1)
        assert f.read(7) == b"\x5a" * 7
        f.seek(4095)
        assert f.read(4098) == b"\xa5" * 4098
        f.seek(200000000)
        assert f.read(300000) == b"\x11" * 300000


@pytest.mark.parametrize(("bs", "size"), [("4k", "16m"), ("64k", "64m")])
def test_fio_random_writes_verify_crc32c(up: PvioUp, bs: str, size: str) -> None:
    need("fio")
    proc = sh(
        "fio", "--name=verify", "--ioengine=nbd", f"--uri={up.nbd_uri()}", "--offset=128m",
        "--rw=randwrite", f"--bs={bs}", f"--size={size}", "--iodepth=16",
        "--verify=crc32c", "--do_verify=1", "--verify_fatal=1", "--verify_state_save=0",
        "--output-format=json", timeout=300,
    )  # fmt: skip
    job = json.loads(proc.stdout[proc.stdout.index("{") :])["jobs"][0]
    assert job["error"] == 0
    assert job["write"]["total_ios"] > 0 and job["read"]["total_ios"] == job["write"]["total_ios"]


def test_read_only_disk_refuses_writes(up: PvioUp) -> None:
    need("qemu-io")
    uri = up.nbd_uri(vdev="xvdb")
    image = Path(up.domain("guest1")["devices"][1]["target"])
    before = image.read_bytes()
    proc = sh("qemu-io", "-f", "raw", "-c", "write -P 0x1 0 512", uri, check=False)
    assert proc.returncode != 0 or "failed" in (proc.stdout + proc.stderr).lower()
    sh("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x00 0 1", "-c", "read -P 0xff 255 1", uri)
    assert image.read_bytes() == before


@pytest.mark.root
def test_kernel_ext4_through_nbdfuse_and_loop(up: PvioUp, tmp_path: Path) -> None:
    reason = kernel_path_missing()
    if reason:
        pytest.skip(reason)
    ext4_round_trip(up.nbd_uri(), tmp_path, files=4, file_size=2 * MiB)


# --- the backend dies ------------------------------------------------------------------


@pytest.fixture
def up_one(tmp_path: Path) -> Iterator[PvioUp]:
    p = PvioUp(tmp_path / "state", "--disk", f"vdev=xvda, size=128M, target={tmp_path / 'a.img'}")
    with p.serving():
        yield p


def _kill_driver(up: PvioUp) -> int:
    pid = up.domain("driver")["pid"]
    os.kill(pid, signal.SIGKILL)
    up.wait_for(lambda: up.domain("driver")["pid"] != pid and up.domain("driver")["state"] == "running",
                what="the driver domain to be restarted")
    return int(up.domain("driver")["restarts"])


def test_acknowledged_flushed_data_survives_a_backend_kill(up_one: PvioUp) -> None:
    need("qemu-io")
    uri = up_one.nbd_uri()
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 1M", "-c", "flush", uri)
    assert _kill_driver(up_one) == 1
    assert "driver domain exited" in up_one.output()
    proc = sh("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x77 0 1M", uri, timeout=120)
    assert "Pattern verification failed" not in proc.stdout


def test_backend_killed_during_fio_verify(up_one: PvioUp) -> None:
    """SIGKILL the driver domain in the middle of a write-heavy fio verify run: blkfront
    re-issues its in-flight requests to the restarted backend, fio sees no error.

    The write phase is rate-limited (32 MiB at 8 MiB/s: about 4 s, whatever the machine's
    speed), so the kill at 1.5 s always lands in the middle of it."""
    need("fio")
    fio = subprocess.Popen(
        ["fio", "--name=kill", "--ioengine=nbd", f"--uri={up_one.nbd_uri()}", "--rw=randwrite", "--bs=16k",
         "--size=32m", "--rate=,8m", "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
         "--verify_state_save=0", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.5)
        assert fio.poll() is None, "fio finished before the backend could be killed; make the job bigger"
        _kill_driver(up_one)
        out, err = fio.communicate(timeout=300)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, err
    job = json.loads(out[out.index("{") :])["jobs"][0]
    assert job["error"] == 0 and job["read"]["total_ios"] == job["write"]["total_ios"] > 0


# --- formats other than raw -----------------------------------------------------------


def test_qcow2_disk_is_served_through_qemu_nbd(tmp_path: Path) -> None:
    """A qcow2 image is never served as raw bytes: pvio up puts qemu-nbd in front of it
    and blkback reaches it over NBD; afterwards the image is a clean qcow2 holding the
    guest's writes."""
    need("qemu-img", "qemu-io", "qemu-nbd")
    image = tmp_path / "disk.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(image), "64M")
    p = PvioUp(tmp_path / "state", "--disk", f"format=qcow2, vdev=xvda, target={image}").start()
    try:
        uri = p.nbd_uri()
        info = json.loads(sh("nbdinfo", "--json", uri).stdout)
        assert info["exports"][0]["export-size"] == 64 * MiB  # the virtual size, not the file's
        sh("qemu-io", "-f", "raw", "-c", "write -P 0x42 1M 256k", "-c", "flush", uri)
        sh("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x42 1M 256k", "-c", "read -P 0 0 4k", uri)
    finally:
        code = p.stop()
        p.kill()
    assert code == 0, p.output()
    sh("qemu-img", "check", "-q", str(image))
    proc = sh("qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x42 1M 256k", str(image))
    assert "Pattern verification failed" not in proc.stdout
