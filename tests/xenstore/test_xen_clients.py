"""Xen's own clients against a real `pvio xenstored` process: the xenstore-utils
commands, libxenstore's DIRECTORY_PART fallback, pyxs (under the system Python, where
Debian installs it) and Xen's test-xenstore (built by tools/build-test-xenstore.sh from
Debian's xen source package)."""

from __future__ import annotations

import subprocess
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from xs_harness import DaemonProcess, run_daemon

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def xsd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DaemonProcess]:
    with run_daemon(tmp_path_factory.mktemp("xsd")) as d:
        yield d


def sh(d: DaemonProcess, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(cmd, env=d.env, capture_output=True, text=True, timeout=30)
    if check:
        assert proc.returncode == 0, (cmd, proc.stdout, proc.stderr)
    return proc


def test_write_read_list_exists(xsd: DaemonProcess) -> None:
    sh(xsd, "xenstore-write", "/u/a", "1", "/u/b/c", "hello world")
    assert sh(xsd, "xenstore-read", "/u/a", "/u/b/c").stdout == "1\nhello world\n"
    assert sh(xsd, "xenstore-list", "/u").stdout == "a\nb\n"
    assert sh(xsd, "xenstore-exists", "/u/a").returncode == 0
    assert sh(xsd, "xenstore-exists", "/u/nope", check=False).returncode == 1
    missing = sh(xsd, "xenstore-read", "/u/nope", check=False)
    assert missing.returncode == 1 and "couldn't read path /u/nope" in missing.stderr


def test_ls_with_permissions_and_chmod(xsd: DaemonProcess) -> None:
    sh(xsd, "xenstore-write", "/p/x", "v", "/p/y", "w")
    sh(xsd, "xenstore-chmod", "/p/x", "n0", "r5")
    lines = sh(xsd, "xenstore-ls", "-p", "/p").stdout.splitlines()
    assert lines[0].startswith('x = "v"') and lines[0].endswith("(n0,r5)")
    assert lines[1].startswith('y = "w"') and lines[1].endswith("(n0)")
    sh(xsd, "xenstore-chmod", "-r", "/p", "b0", "r7")
    lines = sh(xsd, "xenstore-ls", "-p", "/p").stdout.splitlines()
    assert all(line.endswith("(b0,r7)") for line in lines), lines
    bad = sh(xsd, "xenstore-chmod", "/p/x", "q5", check=False)
    assert bad.returncode != 0


def test_ls_of_the_whole_store(xsd: DaemonProcess) -> None:
    sh(xsd, "xenstore-write", "/full/k", "v")
    out = sh(xsd, "xenstore-ls", "-f", "/").stdout
    assert '/tool/xenstored = ""' in out and '/full/k = "v"' in out


def test_rm_and_rm_t(xsd: DaemonProcess) -> None:
    sh(xsd, "xenstore-write", "/r/keep", "k", "/r/deep/er/leaf", "x")
    sh(xsd, "xenstore-rm", "/r/keep")
    assert sh(xsd, "xenstore-exists", "/r/keep", check=False).returncode == 1
    sh(xsd, "xenstore-rm", "-t", "/r/deep/er/leaf")
    assert sh(xsd, "xenstore-exists", "/r", check=False).returncode == 1  # emptied upwards
    assert sh(xsd, "xenstore-rm", "/r/never", check=False).returncode == 1  # no parent: ENOENT
    sh(xsd, "xenstore-rm", "/tool/never")  # parent exists: fine, as in Xen


def test_watch(xsd: DaemonProcess) -> None:
    proc = subprocess.Popen(
        ["xenstore-watch", "-n", "3", "/wt"], env=xsd.env, stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    try:
        first = proc.stdout.readline()  # the registration event: the watch is in place
        sh(xsd, "xenstore-write", "/wt/x", "1")
        sh(xsd, "xenstore-rm", "/wt/x")
        out, _ = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert [first.strip(), *out.splitlines()] == ["/wt", "/wt/x", "/wt/x"]


def test_directory_part_fallback_for_a_huge_directory(xsd: DaemonProcess) -> None:
    names = [f"a-rather-long-child-name-number-{i:05d}" for i in range(300)]
    args = [x for n in names for x in (f"/huge/{n}", "")]
    for i in range(0, len(args), 100):
        sh(xsd, "xenstore-write", *args[i : i + 100])
    assert sh(xsd, "xenstore-list", "/huge").stdout.splitlines() == names


PYXS_SCENARIO = textwrap.dedent(
    """
    import sys
    from pyxs import Client
    with Client(unix_socket_path=sys.argv[1]) as c:
        m = c.monitor()
        m.watch(b"/pyxs", b"tok")
        events = m.wait()
        assert next(events) == (b"/pyxs", b"tok")
        c.transaction()
        c.write(b"/pyxs/a", b"1")
        c.write(b"/pyxs/b", b"2")
        assert c.read(b"/pyxs/a") == b"1"
        assert c.commit()
        seen = {next(events)[0], next(events)[0]}
        assert seen == {b"/pyxs/a", b"/pyxs/b"}, seen
        # a conflicting transaction reports False and changes nothing
        c.transaction()
        c.read(b"/pyxs/a")
        with Client(unix_socket_path=sys.argv[1]) as other:
            other.write(b"/pyxs/a", b"other")
        c.write(b"/pyxs/a", b"mine")
        assert not c.commit()
        assert c.read(b"/pyxs/a") == b"other"
        c.mkdir(b"/pyxs/dir")
        c.set_perms(b"/pyxs/dir", [b"n0", b"r3"])
        assert c.get_perms(b"/pyxs/dir") == [b"n0", b"r3"]
        assert c.list(b"/pyxs") == [b"a", b"b", b"dir"]
        assert c.exists(b"/pyxs/dir") and not c.exists(b"/pyxs/nope")
        assert c.get_domain_path(3) == b"/local/domain/3"
        assert not c.is_domain_introduced(3)
        c.delete(b"/pyxs")
        m.unwatch(b"/pyxs", b"tok")
    print("pyxs ok")
    """
)


def test_pyxs_transaction_and_watch(xsd: DaemonProcess, tmp_path: Path) -> None:
    script = tmp_path / "scenario.py"
    script.write_text(PYXS_SCENARIO)
    proc = subprocess.run(
        ["/usr/bin/python3", str(script), str(xsd.socket)],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "pyxs ok", proc.stderr


@pytest.fixture(scope="module")
def test_xenstore() -> str:
    proc = subprocess.run(
        ["bash", str(ROOT / "tools" / "build-test-xenstore.sh")],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, f"building test-xenstore failed:\n{proc.stderr}"
    return proc.stdout.strip().splitlines()[-1]


TESTS = ["read 1", "read 2000", "write 1", "write 2000", "dir", "rm node", "rm dir",
         "ta empty", "ta empty x", "ta rmw", "ta rmw x", "ta err"]


def test_xen_test_xenstore_all_tests(xsd: DaemonProcess, test_xenstore: str) -> None:
    proc = sh(xsd, test_xenstore, "-i", "10")
    for name in TESTS:
        line = next(ln for ln in proc.stdout.splitlines() if ln.startswith(f"{name:<10}:"))
        assert "avg:" in line, line


@pytest.mark.slow
def test_xen_test_xenstore_random_30s(xsd: DaemonProcess, test_xenstore: str) -> None:
    """`-r 30`, twice at once: test-xenstore works below its own pid, so two instances
    share the daemon (and its transactions' conflicts) without sharing nodes."""
    procs = [
        subprocess.Popen([test_xenstore, "-r", "30"], env=xsd.env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(2)
    ]
    for proc in procs:
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0, (out[-2000:], err[-2000:])
    # each instance removed what it created, and the last one the common parent
    assert sh(xsd, "xenstore-exists", "/local/domain/0/xenstore-test", check=False).returncode == 1
