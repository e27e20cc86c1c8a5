"""QEMU's qdisk (Debian's qemu-system-xen, unmodified) serving a pvio guest's disks.

`pvio up --disk '..., backendtype=qdisk, ...'` runs one QEMU as the guest's backend
domain, on the /dev/xen device layer; the guest's pvio blkfront connects to it, and the
guest exports the disk over NBD as always.  What pvio's own blkback passes must pass
here: qemu-io patterns reaching the image, fio crc32c verify, a qcow2 image served by
QEMU itself, the kernel's ext4 (root), and a SIGKILL of QEMU in the middle of a fio
verify run (pvio up restarts it, blkfront recovers, fio finishes clean).  A read-only
qdisk is refused with the reason: Debian's QEMU 7.2 cannot realize one.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from kernelpath import ext4_round_trip, kernel_path_missing, sh
from native.devlayer import build_layer
from pvio.testing.up import UpFailed
from pvio.toolstack.qdisk import QDISK_DOMID_BASE, QEMU_BINARY
from pvioup import PvioUp

pytestmark = pytest.mark.slow
MiB = 1 << 20


def need(*tools: str) -> None:
    missing = [t for t in tools if shutil.which(t) is None and not os.access(t, os.X_OK)]
    assert not missing, f"not installed: {missing} (bash tools/install.sh installs them)"


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PvioUp]:
    need(QEMU_BINARY, "qemu-img")
    build_layer()
    root = tmp_path_factory.mktemp("qdisk")
    qcow = root / "xvdc.qcow2"
    sh("qemu-img", "create", "-q", "-f", "qcow2", str(qcow), "64M")
    p = PvioUp(
        root / "state",
        "--disk", f"format=raw, vdev=xvda, access=rw, size=256M, backendtype=qdisk, target={root / 'xvda.img'}",
        "--disk", f"format=qcow2, vdev=xvdc, access=rw, backendtype=qdisk, target={qcow}",
    )  # fmt: skip
    with p.serving():
        yield p


def qemu_pid(up: PvioUp) -> int:
    (svc,) = [s for s in up.refresh()["services"] if s["name"] == "qdisk-guest1"]
    return int(svc["pid"])


def test_qemu_is_the_backend_domain(up: PvioUp) -> None:
    pid = qemu_pid(up)
    assert Path(f"/proc/{pid}/exe").resolve() == Path(QEMU_BINARY).resolve()
    listing = sh(sys.executable, "-m", "pvio", "list", "--state-dir", str(up.state_dir)).stdout
    assert "qdisk backend (QEMU)" in listing and str(pid) in listing and str(QDISK_DOMID_BASE + 1) in listing
    env = up.xs_env()
    be = f"/local/domain/{QDISK_DOMID_BASE + 1}/backend/qdisk/1/51712"
    got = subprocess.run(["xenstore-read", f"{be}/params", f"{be}/type", f"{be}/state",
                          "/local/domain/1/device/vbd/51712/backend"], env=env, capture_output=True, text=True)
    params, kind, state, fe_backend = got.stdout.split()
    assert params.startswith("aio:/") and params.endswith("xvda.img")
    assert (kind, state, fe_backend) == ("qdisk", "4", be)
    qcow = subprocess.run(["xenstore-read", f"/local/domain/{QDISK_DOMID_BASE + 1}/backend/qdisk/1/51744/params"],
                          env=env, capture_output=True, text=True).stdout
    assert qcow.startswith("qcow2:/")


def test_qemu_io_patterns_reach_the_image(up: PvioUp) -> None:
    uri = up.nbd_uri()
    writes = ["write -P 0x5a 1 7", "write -P 0xa5 4095 4098", "write -P 0x3c 1048575 65537",
              "write -P 0x11 200000000 300000", "flush"]
    sh("qemu-io", "-f", "raw", *[a for c in writes for a in ("-c", c)], uri)
    reads = ["read -P 0x5a 1 7", "read -P 0xa5 4095 4098", "read -P 0x3c 1048575 65537",
             "read -P 0x11 200000000 300000", "read -P 0 8 4087"]
    proc = sh("qemu-io", "-r", "-f", "raw", *[a for c in reads for a in ("-c", c)], uri)
    assert "Pattern verification failed" not in proc.stdout
    image = Path(up.device("guest1", vdev="xvda")["target"])
    with open(image, "rb") as f:
        f.seek(4095)
        assert f.read(4098) == b"\xa5" * 4098
        f.seek(200000000)
        assert f.read(300000) == b"\x11" * 300000


def test_fio_random_writes_verify_crc32c(up: PvioUp) -> None:
    proc = sh("fio", "--name=verify", "--ioengine=nbd", f"--uri={up.nbd_uri()}", "--offset=128m",
              "--rw=randwrite", "--bs=16k", "--size=32m", "--iodepth=16", "--verify=crc32c", "--do_verify=1",
              "--verify_fatal=1", "--verify_state_save=0", "--output-format=json", timeout=300)
    job = json.loads(proc.stdout[proc.stdout.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["total_ios"] == job["write"]["total_ios"] > 0


def test_a_read_only_qdisk_is_refused_with_the_reason(tmp_path: Path) -> None:
    ro = tmp_path / "ro.img"
    ro.write_bytes(bytes(MiB))
    p = PvioUp(tmp_path / "state", "--disk", f"vdev=xvda, access=ro, backendtype=qdisk, target={ro}")
    try:
        with pytest.raises(UpFailed) as failed:
            p.start()
        # The reason is on the first line, which is all a one-line report (pvio bench's) shows.
        assert "access=ro with backendtype=qdisk" in str(failed.value).splitlines()[0]
    finally:
        p.kill()


def test_qcow2_is_served_by_qemu_itself(up: PvioUp) -> None:
    uri = up.nbd_uri(vdev="xvdc")
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x42 1M 1M", "-c", "flush", uri)
    assert "Pattern verification failed" not in sh("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x42 1M 1M", uri).stdout
    image = up.device("guest1", vdev="xvdc")["target"]
    info = json.loads(sh("qemu-img", "info", "-U", "--output=json", image).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == 64 * MiB


@pytest.mark.root
def test_kernel_ext4_through_nbdfuse_and_loop(up: PvioUp, tmp_path: Path) -> None:
    reason = kernel_path_missing()
    if reason:
        pytest.skip(reason)
    ext4_round_trip(up.nbd_uri(), tmp_path, files=4, file_size=2 * MiB)


def test_qemu_killed_during_fio_verify(up: PvioUp) -> None:
    """SIGKILL QEMU in the middle of a write-heavy fio verify run: pvio up restarts it,
    blkfront re-issues what was in flight to the new QEMU, fio sees no error.  (The write
    phase is rate-limited, 32 MiB at 8 MiB/s, so the kill lands in its middle.)"""
    pid = qemu_pid(up)
    fio = subprocess.Popen(
        ["fio", "--name=kill", "--ioengine=nbd", f"--uri={up.nbd_uri()}", "--rw=randwrite", "--bs=16k",
         "--size=32m", "--rate=,8m", "--iodepth=16", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1",
         "--verify_state_save=0", "--output-format=json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        time.sleep(1.5)
        assert fio.poll() is None, "fio finished before QEMU could be killed; make the job bigger"
        os.kill(pid, signal.SIGKILL)
        up.wait_for(lambda: qemu_pid(up) != pid and "QEMU for guest1 is back" in up.output(), timeout=60,
                    what="QEMU to be restarted")
        out, err = fio.communicate(timeout=300)
    finally:
        if fio.poll() is None:
            fio.kill()
            fio.wait()
    assert fio.returncode == 0, err
    job = json.loads(out[out.index("{"):])["jobs"][0]
    assert job["error"] == 0 and job["read"]["total_ios"] == job["write"]["total_ios"] > 0


def test_a_restarted_guest_gets_a_new_qemu(up: PvioUp) -> None:
    """The guest dies: pvio up makes it again with a new QEMU (libxl makes a new device
    model when it recreates a domain), both disks are served, and what was written
    before is there."""
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x6b 150000000 65536", "-c", "flush", up.nbd_uri())
    qemu, guest = qemu_pid(up), up.domain("guest1")["pid"]
    os.kill(guest, signal.SIGKILL)
    up.wait_for(lambda: "domain guest1 is back" in up.output(), timeout=90, what="guest1 to come back")
    assert qemu_pid(up) != qemu
    proc = sh("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x6b 150000000 65536", up.nbd_uri())
    assert "Pattern verification failed" not in proc.stdout
    sh("qemu-io", "-f", "raw", "-c", "write -P 0x1e 0 64k", "-c", "read -P 0x1e 0 64k", up.nbd_uri(vdev="xvdc"))
