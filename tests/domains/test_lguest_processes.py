"""lguest end to end: guests and Launchers as real domain processes over `pvio hypervisor`.

The processes are started by a real `pvio up` on a configuration written for the test
(`lan.lguest_up`); the peers are real: the kernel's TCP/IP stacks in
namespaces pvio-g1/pvio-g2 (ping, iperf3), qemu-io over the NBD export of g1's lguest
disk, a shell behind g1's console driven through `pvio console` in a pipe.  g3 is
hostile: it breaks the DMA rules on its block device and console, sends runt and
oversized frames to its peers and floods the LAN.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from domains.lan import Guest, LguestUp, lguest_up, netns_exec
from pvio.domains.tap import stale_namespaces

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (namespaces, TAP)"
)
S_FAILED = 0x80


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LguestUp]:
    state = tmp_path_factory.mktemp("lguest-e2e") / "state"
    guests = [
        Guest("g1", "10.0.0.1/24"),
        Guest("g2", "10.0.0.2/24"),
        Guest("g3", "10.0.0.3/24", misbehave=["block-bad-dma", "console-past-memory", "runt-frames",
                                               "oversized-frames", "lan-bad-dma", "flood"]),
    ]
    c = lguest_up(state, guests)
    try:
        yield c
    finally:
        assert c.stop() == 0, c.output()
    leftovers = [ns for ns in stale_namespaces() if ns in ("pvio-g1", "pvio-g2", "pvio-g3")]
    assert leftovers == []
    assert not (state / "lguest" / "g1.launcher.json").exists()
    assert not os.path.exists(c.console_socket("g1"))


def test_ping_between_guests(cluster: LguestUp) -> None:
    r = netns_exec("g1", "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.0.2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0% packet loss" in r.stdout


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")
def test_tcp_with_iperf3(cluster: LguestUp) -> None:
    assert iperf3("g1", "pvio-g2", "10.0.0.2", 5299) > 100_000


def iperf3(client: str, server_netns: str, address: str, port: int) -> int:
    """Bytes one second of iperf3 moves from guest `client` to a server listening on
    `address` in `server_netns` ("" for the host's namespace)."""
    prefix = ["ip", "netns", "exec", server_netns] if server_netns else []
    server = subprocess.Popen([*prefix, "iperf3", "-s", "-1", "-p", str(port), "-B", address],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: listening(server_netns, port), f"iperf3 listening on {port}")
        r = netns_exec(client, "iperf3", "-c", address, "-p", str(port), "-t", "1", "-J", timeout=30)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
        moved: int = json.loads(r.stdout)["end"]["sum_received"]["bytes"]
        return moved
    finally:
        server.kill()
        server.wait()


def wait_until(condition: Callable[[], object], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def listening(netns: str, port: int) -> bool:
    prefix = ["ip", "netns", "exec", netns] if netns else []
    r = subprocess.run([*prefix, "ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True)
    return bool(r.stdout.strip())


def test_console_through_a_pipe(cluster: LguestUp) -> None:
    r = subprocess.run([sys.executable, "-m", "pvio", "console", "g1", "--state-dir", str(cluster.state_dir),
                        "--linger", "1.5"],
                       input="echo hel''lo; ip -o addr\n", capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "hello" in r.stdout
    assert "10.0.0.1/24" in r.stdout  # the shell runs inside g1's namespace


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
def test_qemu_io_verify_through_the_nbd_export(cluster: LguestUp) -> None:
    uri = cluster.nbd_uri("g1")
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 65536 192k", "-c", "read -P 0x5a 65536 192k",
                        "-c", "read -P 0 0 64k", uri], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Pattern verification failed" not in r.stdout
    image = cluster.lguest_block("g1")["target"]
    with open(image, "rb") as f:
        f.seek(65536)
        assert f.read(192 * 1024) == b"\x5a" * 192 * 1024  # it reached the Launcher's image


def _devices(cluster: LguestUp, name: str) -> dict[str, int]:
    return {k: int(v) for k, v in cluster.domain_status(name).get("devices", {}).items()}


def test_hostile_guest_fails_its_devices_and_others_keep_working(cluster: LguestUp) -> None:
    # g3 misbehaves once it is ready; its status file shows the outcome when refreshed
    wait_until(lambda: len(cluster.domain_status("g3").get("stats", {}).get("misbehave", {})) == 6
               and all(v & S_FAILED for v in _devices(cluster, "g3").values())
               and cluster.domain_status("g3-launcher").get("stats", {}).get("failed") == [0, 1, 2],
               "g3's devices FAILED")
    devices = _devices(cluster, "g3")
    # console (0), block (1) and network (2) were broken by g3: FAILED by its Launcher
    assert devices["0"] & S_FAILED and devices["1"] & S_FAILED and devices["2"] & S_FAILED, devices
    assert not any(v & S_FAILED for v in _devices(cluster, "g1").values())
    r = netns_exec("g1", "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.0.2")
    assert r.returncode == 0, r.stdout + r.stderr
    launcher = cluster.domain_status("g3-launcher").get("stats", {})
    assert launcher["violations"] >= 3 and launcher["failed"] == [0, 1, 2], launcher
    assert cluster.domain_status("g1-launcher")["stats"]["violations"] == 0
    g3 = cluster.domain_status("g3").get("stats", {})
    # each rule break was refused by the hypervisor: runts and oversized frames reached
    # nobody; the flood went on until its sender passed FLOOD_DROPS_PER_SECOND
    assert g3["misbehave"] == {"block-bad-dma": "EINVAL", "console-past-memory": "EINVAL",
                             "runt-frames": "EINVAL", "oversized-frames": "EINVAL", "lan-bad-dma": "EINVAL",
                             "flood": "ENOBUFS"}, g3
    assert g3["net_open"] is False  # g3's driver saw FAILED and let go of the device
    stats = cluster.domain_status("g1").get("stats", {})
    assert stats["net"]["rx_length_errors"] == 0  # no runt or oversized frame reached g1


def test_console_on_a_terminal_quits_on_three_ctrl_c(cluster: LguestUp) -> None:
    import pty
    import select
    import termios

    master, slave = pty.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen([sys.executable, "-m", "pvio", "console", "g2", "--state-dir", str(cluster.state_dir)],
                            stdin=slave, stdout=slave, stderr=subprocess.PIPE)
    try:
        out = b""
        deadline = time.monotonic() + 20
        sent = False
        while b"ping-pong" not in out and time.monotonic() < deadline:
            if not sent and time.monotonic() > deadline - 19:  # give the client a moment to attach
                os.write(master, b"echo ping-''pong\r")
                sent = True
            r, _, _ = select.select([master], [], [], 0.2)
            if r:
                out += os.read(master, 4096)
        assert b"ping-pong" in out, out
        raw = termios.tcgetattr(slave)
        assert not raw[3] & (termios.ICANON | termios.ECHO | termios.ISIG)  # raw, as lguest
        os.write(master, b"\x03\x03\x03")
        assert proc.wait(10) == 0
        assert termios.tcgetattr(slave)[3] == before[3]  # the terminal's mode is restored
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stderr is not None:
            proc.stderr.close()
        os.close(master)
        os.close(slave)


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")
def test_a_lan_with_the_largest_mtu(tmp_path_factory: pytest.TempPathFactory) -> None:
    # Frames of up to 65535 bytes (16 pages, one SEND_DMA each): a ping that may not be
    # fragmented (-M do) carries 65000 bytes, and TCP moves its segments whole.
    from pvio.lguest.net import MAX_MTU

    state = tmp_path_factory.mktemp("lguest-jumbo") / "state"
    c = lguest_up(state, [Guest("j1", "10.0.0.1/24", lan="big", mtu=MAX_MTU),
                          Guest("j2", "10.0.0.2/24", lan="big", mtu=MAX_MTU)])
    try:
        link = subprocess.run(["ip", "-n", "pvio-j1", "link", "show", "eth0"], capture_output=True, text=True)
        assert f"mtu {MAX_MTU}" in link.stdout
        r = netns_exec("j1", "ping", "-c", "2", "-i", "0.2", "-W", "2", "-M", "do", "-s", "65000", "10.0.0.2")
        assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
        assert iperf3("j1", "pvio-j2", "10.0.0.2", 5298) > 1_000_000

        def net() -> dict[str, int]:
            return dict(c.domain_status("j2").get("stats", {}).get("net", {}))

        # the guest's status is refreshed every second: wait for iperf3's frames to show
        wait_until(lambda: net().get("rx_bytes", 0) > 1_000_000, "j2's counters")
        stats = net()
        assert stats["rx_length_errors"] == 0
        assert stats["rx_bytes"] / stats["rx_packets"] > 9000  # on average, frames far above 1514
    finally:
        assert c.stop() == 0, c.output()


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")
def test_the_host_as_a_peer_on_the_lan(tmp_path_factory: pytest.TempPathFactory) -> None:
    # [lan.<name>] host = CIDR: the LAN owner's Launcher joins the LAN for the host
    # through TAP pvio-<name> in the host's namespace (lguest's --tunnet).
    state = tmp_path_factory.mktemp("lguest-host") / "state"
    c = lguest_up(state, [Guest("k1", "10.79.0.1/24", lan="hostlan"), Guest("k2", "10.79.0.2/24", lan="hostlan")],
                  lans={"hostlan": "10.79.0.254/24"})
    try:
        assert os.path.exists("/sys/class/net/pvio-hostlan")
        r = subprocess.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.79.0.2"], capture_output=True,
                           text=True, timeout=20)
        assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
        r = netns_exec("k1", "ping", "-c", "2", "-i", "0.2", "-W", "2", "10.79.0.254")
        assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
        assert iperf3("k2", "", "10.79.0.254", 5297) > 100_000  # to a server on the host

        def peer() -> dict[str, Any]:
            return dict(c.domain_status("k1-launcher").get("stats", {}).get("host_peer", {}))

        wait_until(lambda: peer().get("net", {}).get("rx_packets", 0) > 0, "the host peer's counters")
        assert peer()["interface"] == "pvio-hostlan"
    finally:
        assert c.stop() == 0, c.output()
    assert not os.path.exists("/sys/class/net/pvio-hostlan")  # gone with its Launcher


def test_unplug_takes_each_device_away_and_the_other_guest_carries_on(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    state = tmp_path_factory.mktemp("lguest-unplug") / "state"
    c = lguest_up(state, [Guest("u1", "10.0.0.1/24", lan="ulan"), Guest("u2", "10.0.0.2/24", lan="ulan")])
    unplug = [sys.executable, "-m", "pvio", "unplug", "--state-dir", str(state)]
    try:
        assert netns_exec("u2", "ping", "-c", "1", "-W", "2", "10.0.0.1").returncode == 0
        r = subprocess.run([*unplug, "u1", "net"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and "net device" in r.stdout, r.stdout + r.stderr
        link = subprocess.run(["ip", "-n", "pvio-u1", "link", "show", "eth0"], capture_output=True, text=True)
        assert link.returncode != 0  # the interface went with the device; the namespace stays
        assert netns_exec("u2", "ping", "-c", "1", "-W", "1", "10.0.0.1").returncode != 0
        r = subprocess.run([*unplug, "u1", "net"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 1 and "removed already" in r.stderr, r.stderr
        r = subprocess.run([*unplug, "u1", "block"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        assert not os.path.exists(c.nbd_socket("u1"))  # the export went with the disk
        r = subprocess.run([*unplug, "u1", "console"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0, r.stderr
        # REMOVED|REMOVED_ACK on all three, once the guest's status is refreshed
        wait_until(lambda: len(_devices(c, "u1")) == 3 and all(v & 0x18 == 0x18 for v in _devices(c, "u1").values()),
                   "u1's devices REMOVED and acknowledged")
        # pvio list leaves the unplugged devices out (and says so), pvio console refuses
        def listed() -> dict[str, Any]:
            out = subprocess.run([sys.executable, "-m", "pvio", "list", "--json", "--state-dir", str(state)],
                                 capture_output=True, text=True, timeout=30).stdout
            return next(d for d in json.loads(out)["domains"] if d["name"] == "u1")

        wait_until(lambda: listed()["unplugged"] == ["block", "console", "net"], "pvio list to see the unplug")
        assert listed()["devices"] == []
        u2 = subprocess.run([sys.executable, "-m", "pvio", "list", "--json", "--state-dir", str(state)],
                            capture_output=True, text=True, timeout=30).stdout
        assert len(next(d for d in json.loads(u2)["domains"] if d["name"] == "u2")["devices"]) == 3
        r = subprocess.run([sys.executable, "-m", "pvio", "console", "u1", "--state-dir", str(state)],
                           capture_output=True, text=True, timeout=30, stdin=subprocess.DEVNULL)
        assert r.returncode == 1 and "unplugged" in r.stderr, r.stdout + r.stderr
        assert c.domain_status("u1-launcher")["stats"]["violations"] == 0
        # u2 keeps its disk and its console
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "read -P 0x11 0 64k",
                            c.nbd_uri("u2")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
        r = subprocess.run([*unplug, "u2", "gpu"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "gpu" in r.stderr  # not a device kind
    finally:
        assert c.stop() == 0, c.output()


def test_a_dead_guest_or_launcher_is_restarted_and_the_lan_carries_on(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    state = tmp_path_factory.mktemp("lguest-restart") / "state"
    c = lguest_up(state, [Guest("r1", "10.0.0.1/24", lan="rlan"), Guest("r2", "10.0.0.2/24", lan="rlan")])
    try:
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", c.nbd_uri("r2")],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stdout + r.stderr
        # the guest, then its Launcher, then the Launcher that holds the LAN's page (r1's)
        for victim, name in (("r2", "r2"), ("r2-launcher", "r2"), ("r1-launcher", "r2")):
            before = c.domain(name)["pid"]
            os.kill(c.domain(victim)["pid"], signal.SIGKILL)
            wait_until(lambda before=before, name=name: c.domain(name)["state"] == "running"  # type: ignore[misc]
                       and c.domain(name)["pid"] != before
                       and netns_exec("r1", "ping", "-c", "1", "-W", "1", "10.0.0.2").returncode == 0,
                       f"{name} back on the LAN after {victim} died", timeout=60)
            r = subprocess.run(["qemu-io", "-f", "raw", "-c", "read -P 0x77 0 64k", c.nbd_uri("r2")],
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
        out = c.output()
        assert "domain r2 is back" in out and "domain r2-launcher is back" in out, out
        assert "domain r1-launcher is back" in out and "domain r1 is back" in out, out
    finally:
        assert c.stop() == 0, c.output()
