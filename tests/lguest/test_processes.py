"""lguest end to end: guests and Launchers as real domain processes over `pvio hypervisor`.

The processes are started the toolstack's way (`python -m pvio.toolstack.domain SPEC`)
by `pvio.testing.lguest_cluster`; the peers are real: the kernel's TCP/IP stacks in
namespaces pvio-g1/pvio-g2 (ping, iperf3), qemu-io over the NBD export of g1's lguest
disk, a shell behind g1's console driven through `pvio console` in a pipe.  g3 is
hostile: it breaks the DMA rules on its block device and console, sends runt and
oversized frames to its peers and floods the LAN.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from pvio.domains.tap import stale_namespaces
from pvio.testing.lguest_cluster import GuestDef, LguestCluster, netns_exec

pytestmark = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("ip") is None, reason="needs root and iproute2 (namespaces, TAP)"
)
S_FAILED = 0x80


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LguestCluster]:
    state = tmp_path_factory.mktemp("lguest-e2e")
    guests = [
        GuestDef("g1", "10.0.0.1/24"),
        GuestDef("g2", "10.0.0.2/24"),
        GuestDef("g3", "10.0.0.3/24", hostile=["block-bad-dma", "console-past-memory", "runt-frames", "oversized-frames",
                                                 "lan-bad-dma", "flood"]),
    ]
    c = LguestCluster(state, guests)
    with c:
        yield c
    leftovers = [ns for ns in stale_namespaces() if ns in ("pvio-g1", "pvio-g2", "pvio-g3")]
    assert leftovers == []
    assert not (state / "lguest" / "g1.launcher.json").exists()
    assert not os.path.exists(c.console_socket("g1"))


def test_ping_between_guests(cluster: LguestCluster) -> None:
    r = netns_exec("g1", "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.0.2")
    assert r.returncode == 0, r.stdout + r.stderr
    assert " 0% packet loss" in r.stdout


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")
def test_tcp_with_iperf3(cluster: LguestCluster) -> None:
    assert iperf3("g1", "pvio-g2", "10.0.0.2", 5299) > 100_000


def iperf3(client: str, server_netns: str, address: str, port: int) -> int:
    """Bytes one second of iperf3 moves from guest `client` to a server listening on
    `address` in `server_netns` ("" for the host's namespace)."""
    prefix = ["ip", "netns", "exec", server_netns] if server_netns else []
    server = subprocess.Popen([*prefix, "iperf3", "-s", "-1", "-p", str(port), "-B", address],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.3)
        r = netns_exec(client, "iperf3", "-c", address, "-p", str(port), "-t", "1", "-J", timeout=30)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
        moved: int = json.loads(r.stdout)["end"]["sum_received"]["bytes"]
        return moved
    finally:
        server.kill()
        server.wait()


def test_console_through_a_pipe(cluster: LguestCluster) -> None:
    r = subprocess.run([sys.executable, "-m", "pvio", "console", "g1", "--state-dir", str(cluster.state_dir),
                        "--linger", "1.5"],
                       input="echo hel''lo; ip -o addr\n", capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert "hello" in r.stdout
    assert "10.0.0.1/24" in r.stdout  # the shell runs inside g1's namespace


@pytest.mark.skipif(shutil.which("qemu-io") is None, reason="needs qemu-io")
def test_qemu_io_verify_through_the_nbd_export(cluster: LguestCluster) -> None:
    uri = cluster.nbd_uri("g1")
    r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x5a 65536 192k", "-c", "read -P 0x5a 65536 192k",
                        "-c", "read -P 0 0 64k", uri], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Pattern verification failed" not in r.stdout
    image = cluster.state_dir / "g1-disk.img"
    with open(image, "rb") as f:
        f.seek(65536)
        assert f.read(192 * 1024) == b"\x5a" * 192 * 1024  # it reached the Launcher's image


def _devices(cluster: LguestCluster, name: str) -> dict[str, int]:
    deadline = time.monotonic() + 10
    while True:
        st = cluster.status(name)
        if "stats" in st or time.monotonic() > deadline:
            return {k: int(v) for k, v in st.get("devices", {}).items()}
        time.sleep(0.2)


def test_hostile_guest_fails_its_devices_and_others_keep_working(cluster: LguestCluster) -> None:
    time.sleep(1.5)  # g3 has misbehaved once it was ready; its status refreshes every second
    devices = _devices(cluster, "g3")
    # console (0), block (1) and network (2) were broken by g3: FAILED by its Launcher
    assert devices["0"] & S_FAILED and devices["1"] & S_FAILED and devices["2"] & S_FAILED, devices
    assert not any(v & S_FAILED for v in _devices(cluster, "g1").values())
    r = netns_exec("g1", "ping", "-c", "3", "-i", "0.2", "-W", "2", "10.0.0.2")
    assert r.returncode == 0, r.stdout + r.stderr
    deadline = time.monotonic() + 10
    while "stats" not in cluster.status("g1-launcher") and time.monotonic() < deadline:
        time.sleep(0.2)
    launcher = cluster.status("g3-launcher").get("stats", {})
    assert launcher["violations"] >= 3 and launcher["failed"] == [0, 1, 2], launcher
    assert cluster.status("g1-launcher")["stats"]["violations"] == 0
    g3 = cluster.status("g3").get("stats", {})
    # each rule break was refused by the hypervisor: runts and oversized frames reached
    # nobody; the flood went on until its sender passed FLOOD_DROPS_PER_SECOND
    assert g3["hostile"] == {"block-bad-dma": "EINVAL", "console-past-memory": "EINVAL",
                             "runt-frames": "EINVAL", "oversized-frames": "EINVAL", "lan-bad-dma": "EINVAL",
                             "flood": "ENOBUFS"}, g3
    assert g3["net_open"] is False  # g3's driver saw FAILED and let go of the device
    stats = cluster.status("g1").get("stats", {})
    assert stats["net"]["rx_length_errors"] == 0  # no runt or oversized frame reached g1


def test_console_on_a_terminal_quits_on_three_ctrl_c(cluster: LguestCluster) -> None:
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

    state = tmp_path_factory.mktemp("lguest-jumbo")
    c = LguestCluster(state, [GuestDef("j1", "10.0.0.1/24", lan="big", mtu=MAX_MTU),
                              GuestDef("j2", "10.0.0.2/24", lan="big", mtu=MAX_MTU)])
    with c:
        link = subprocess.run(["ip", "-n", "pvio-j1", "link", "show", "eth0"], capture_output=True, text=True)
        assert f"mtu {MAX_MTU}" in link.stdout
        r = netns_exec("j1", "ping", "-c", "2", "-i", "0.2", "-W", "2", "-M", "do", "-s", "65000", "10.0.0.2")
        assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
        assert iperf3("j1", "pvio-j2", "10.0.0.2", 5298) > 1_000_000
        time.sleep(1.2)  # the guest's status is refreshed every second
        stats = c.status("j2")["stats"]["net"]
        assert stats["rx_length_errors"] == 0
        assert stats["rx_bytes"] / stats["rx_packets"] > 9000  # on average, frames far above 1514


@pytest.mark.skipif(shutil.which("iperf3") is None, reason="needs iperf3")
def test_the_host_as_a_peer_on_the_lan(tmp_path_factory: pytest.TempPathFactory) -> None:
    # [lan.<name>] host = CIDR: the LAN owner's Launcher joins the LAN for the host
    # through TAP pvio-<name> in the host's namespace (lguest's --tunnet).
    state = tmp_path_factory.mktemp("lguest-host")
    c = LguestCluster(state, [GuestDef("k1", "10.79.0.1/24", lan="hostlan"),
                              GuestDef("k2", "10.79.0.2/24", lan="hostlan")],
                      lan_hosts={"hostlan": "10.79.0.254/24"})
    with c:
        assert os.path.exists("/sys/class/net/pvio-hostlan")
        r = subprocess.run(["ping", "-c", "2", "-i", "0.2", "-W", "2", "10.79.0.2"], capture_output=True,
                           text=True, timeout=20)
        assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
        r = netns_exec("k1", "ping", "-c", "2", "-i", "0.2", "-W", "2", "10.79.0.254")
        assert r.returncode == 0 and " 0% packet loss" in r.stdout, r.stdout + r.stderr
        assert iperf3("k2", "", "10.79.0.254", 5297) > 100_000  # to a server on the host
        time.sleep(1.2)
        peer = c.status("k1-launcher")["stats"]["host_peer"]
        assert peer["interface"] == "pvio-hostlan" and peer["net"]["rx_packets"] > 0
    assert not os.path.exists("/sys/class/net/pvio-hostlan")  # gone with its Launcher


def test_unplug_takes_each_device_away_and_the_other_guest_carries_on(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    state = tmp_path_factory.mktemp("lguest-unplug")
    c = LguestCluster(state, [GuestDef("u1", "10.0.0.1/24", lan="ulan"), GuestDef("u2", "10.0.0.2/24", lan="ulan")])
    unplug = [sys.executable, "-m", "pvio", "unplug", "--state-dir", str(state)]
    with c:
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
        time.sleep(1.2)
        statuses = c.status("u1")["devices"]
        assert len(statuses) == 3 and all(v & 0x18 == 0x18 for v in statuses.values())  # REMOVED|REMOVED_ACK
        assert c.status("u1-launcher")["stats"]["violations"] == 0
        # u2 keeps its disk and its console
        r = subprocess.run(["qemu-io", "-f", "raw", "-c", "write -P 0x11 0 64k", "-c", "read -P 0x11 0 64k",
                            c.nbd_uri("u2")], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0 and "verification failed" not in r.stdout, r.stdout + r.stderr
        r = subprocess.run([*unplug, "u2", "gpu"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "gpu" in r.stderr  # not a device kind
