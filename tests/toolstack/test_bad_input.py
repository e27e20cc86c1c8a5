"""Every bad input to `pvio up` is one line naming the cause, a non-zero exit, no traceback,
nothing left running — checked on the real command, as a user meets it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from pvio.testing.up import UpProcess

ROOT = Path(__file__).resolve().parents[2]


def up(state: Path, *args: str, user: str | None = None, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "pvio", "up", *args, "--state-dir", str(state)]
    if user is not None:
        argv = ["setpriv", "--reuid", user, "--regid", user, "--clear-groups", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL,
                          env=os.environ | {"PYTHONDONTWRITEBYTECODE": "1"})


def one_line(r: subprocess.CompletedProcess[str], needle: str) -> None:
    out = (r.stdout + r.stderr).strip()
    assert r.returncode not in (0, None), out
    assert "Traceback" not in out, out
    lines = [line for line in out.splitlines() if line.strip()]
    assert len(lines) == 1 and needle in lines[0], out


def disk(target: Path | str, extra: str = "") -> tuple[str, str]:
    return "--disk", f"format=raw, vdev=xvda, access=rw, size=16M, target={target}{extra}"


def test_a_directory_as_target(tmp_path: Path) -> None:
    one_line(up(tmp_path / "s", *disk(tmp_path)), "is a directory")


def test_a_target_in_a_missing_directory(tmp_path: Path) -> None:
    one_line(up(tmp_path / "s", *disk(tmp_path / "nope" / "x.img")), "does not exist")
    assert not (tmp_path / "nope").exists()


def test_a_read_only_disk_whose_image_does_not_exist(tmp_path: Path) -> None:
    r = up(tmp_path / "s", "--disk", f"vdev=xvda, access=ro, target={tmp_path / 'ro.img'}")
    one_line(r, "must exist")
    assert not (tmp_path / "ro.img").exists()  # no empty image was made


def test_one_image_as_two_writable_disks(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(bytes(1 << 20))
    r = up(tmp_path / "s", "--disk", f"vdev=xvda, target={img}", "--disk", f"vdev=xvdb, target={img}")
    one_line(r, "one writer")


def test_a_state_directory_that_cannot_be_one(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    one_line(up(blocker / "state", *disk(tmp_path / "a.img")), "state directory")


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a read-only tmpfs (root)")
def test_a_read_only_state_directory(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)], check=True)
    try:
        one_line(up(ro, *disk(tmp_path / "a.img")), "state directory")
    finally:
        subprocess.run(["umount", str(ro)], check=True)


@pytest.mark.parametrize(("toml", "needle"), [
    ('[[domain]]\nname = "g1"\ndisks = "vdev=xvda, target=a.img"\n', "disks must be a list"),
    ('[pvio]\ntransprot = "copy"\n[[domain]]\nname = "g1"\n', "unknown keys ['transprot']"),
    ('[[domain]]\nname = "driver"\n', "pvio's own"),
    ('[[domain]]\nname = "g1"\ntype = "lguest"\ndisk = "g1.img"\n', "disk must be a table"),
])
def test_configuration_mistakes(tmp_path: Path, toml: str, needle: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(toml)
    r = up(tmp_path / "s", str(config))
    one_line(r, needle)
    assert r.returncode == 2


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="runs as nobody (root, setpriv)")
def test_the_lguest_example_as_a_user() -> None:
    with tempfile.TemporaryDirectory() as tmp:  # where a user may write (pytest's is root's)
        os.chmod(tmp, 0o777)
        r = up(Path(tmp) / "s", str(ROOT / "examples" / "lguest-lan.toml"), user="65534")
    one_line(r, "need root")


def test_an_image_another_stack_writes(tmp_path: Path) -> None:
    img = tmp_path / "shared.img"
    first = UpProcess(tmp_path / "s1", *disk(img)).start()
    try:
        one_line(up(tmp_path / "s2", *disk(img)), "in use")
        one_line(up(tmp_path / "s2", "--disk", f"vdev=xvda, access=ro, target={img}"), "in use")
    finally:
        assert first.stop() == 0, first.output()
    assert not list((tmp_path / "s2").glob("*.sock"))  # nothing was started
