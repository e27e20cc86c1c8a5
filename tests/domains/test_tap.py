"""TAP interfaces in network namespaces, joined by lguest guests' network drivers.

Real kernel, as root: two namespaces, a TAP in each, and between them two in-process
lguest guests on one LAN page — frames the kernel writes to a TAP take the frame path
the guest processes run (pvio.domains.netpath) through that guest's driver, are DMAed by
the hypervisor's core (in this process) into the other guest's receive buffers, and are
written to the other TAP.  Real `ping` and real TCP (iperf3) cross it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cprobe import build, run
from pvio.abi.linux_if import (
    IFF_MULTI_QUEUE,
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    IFREQ_FLAGS,
    TUN_F_CSUM,
    TUNSETIFF,
    TUNSETOFFLOAD,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
)
from pvio.domains.netpath import NetPath
from pvio.domains.tap import (
    TapError,
    TapInterface,
    checksum_header,
    create_tap,
    namespace_exists,
    netns_name,
    remove_namespace,
    stale_namespaces,
)
from pvio.testing.lguest_world import Lan, LguestWorld, build_guest, net_path

pytestmark = pytest.mark.root


def _require_root() -> None:
    if os.geteuid() != 0:
        raise AssertionError("TAP and namespace tests need root (CI runs them as root)")
    for tool in ("ip", "ping", "iperf3"):
        if shutil.which(tool) is None:
            raise AssertionError(f"{tool} not found: apt-get install iproute2 iputils-ping iperf3")


@pytest.fixture
def names() -> Iterator[list[str]]:
    _require_root()
    tag = secrets.token_hex(3)
    made = [f"t1-{tag}", f"t2-{tag}", f"th-{tag}"]
    yield made
    for name in made:
        remove_namespace(netns_name(name))
    assert not [n for n in stale_namespaces() if tag in n]


def test_tun_constants_and_ifreq_match_the_headers(tmp_path: Path) -> None:
    src = """
#include <stdio.h>
#include <stddef.h>
#include <net/if.h>
#include <sys/ioctl.h>
#include <linux/if_tun.h>
#include <linux/virtio_net.h>
int main(void) {
    printf("%lu %d %d %zu %zu\\n", (unsigned long)TUNSETIFF, IFF_TAP, IFF_NO_PI,
           sizeof(struct ifreq), offsetof(struct ifreq, ifr_flags));
    printf("%d %lu %d %d %d\\n", IFF_VNET_HDR, (unsigned long)TUNSETOFFLOAD, TUN_F_CSUM,
           VIRTIO_NET_HDR_F_NEEDS_CSUM, IFF_MULTI_QUEUE);
    return 0;
}
"""
    out = run(build(src, tmp_path, "tunprobe")).split()
    assert [int(x) for x in out] == [TUNSETIFF, IFF_TAP, IFF_NO_PI, IFREQ_FLAGS.size,
                                     IFREQ_FLAGS.offset("ifr_flags"),
                                     IFF_VNET_HDR, TUNSETOFFLOAD, TUN_F_CSUM, VIRTIO_NET_HDR_F_NEEDS_CSUM,
                                     IFF_MULTI_QUEUE]


def test_create_and_remove_a_tap(names: list[str]) -> None:
    mac = bytes.fromhex("020000aa0001")
    tap = create_tap(names[0], address="10.9.0.1/24", mac=mac)
    ns = netns_name(names[0])
    try:
        assert namespace_exists(ns)
        out = subprocess.run(["ip", "-n", ns, "-o", "addr", "show", "dev", "eth0"],
                             capture_output=True, text=True, check=True).stdout
        assert "10.9.0.1/24" in out
        link = subprocess.run(["ip", "-n", ns, "-o", "link", "show", "dev", "eth0"],
                              capture_output=True, text=True, check=True).stdout
        assert "02:00:00:aa:00:01" in link and "UP" in link
        # The TAP is not in the host's namespace.
        host = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert ns not in host
        # Non-blocking: reading drains whatever the kernel sent (IPv6 solicitations,
        # perhaps) and then answers None instead of waiting.
        frames = [tap.read_frame() for _ in range(50)]
        assert frames[-1] is None
    finally:
        tap.close()
    assert not namespace_exists(ns)
    tap.close()  # idempotent
    remove_namespace(ns)


def test_a_leftover_namespace_is_replaced(names: list[str]) -> None:
    ns = netns_name(names[0])
    subprocess.run(["ip", "netns", "add", ns], check=True)  # as a crash would leave it
    with create_tap(names[0], address="10.9.0.1/24", mac=bytes.fromhex("020000aa0002")) as tap:
        assert tap.netns == ns
    assert not namespace_exists(ns)


def test_bad_names_are_refused() -> None:
    with pytest.raises(TapError):
        netns_name("../etc")
    with pytest.raises(TapError):
        create_tap("ok", address="10.0.0.1/24", mac=b"\x01" * 6)  # multicast MAC


async def _run(*cmd: str, timeout: float) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(errors="replace")


def test_ping_and_tcp_across_the_lguest_lan(names: list[str]) -> None:
    lan = Lan(LguestWorld())
    rigs = [build_guest(lan.world, name, lan=lan, console=False) for name in names[:2]]
    taps: list[TapInterface] = []
    try:
        for i, rig in enumerate(rigs):
            assert rig.net is not None
            rig.net.open()
            taps.append(create_tap(names[i], address=f"10.0.0.{i + 1}/24", mac=rig.net.mac))
        ns1, ns2 = (t.netns for t in taps)

        async def scenario() -> tuple[str, dict[str, object]]:
            loop = asyncio.get_running_loop()
            paths = [net_path(rig, tap, loop) for rig, tap in zip(rigs, taps, strict=True)]
            server = await asyncio.create_subprocess_exec(
                "ip", "netns", "exec", ns2, "iperf3", "-s", "-1", "-p", "5201",
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
            try:
                code, ping = await _run("ip", "netns", "exec", ns1, "ping", "-c", "3", "-i", "0.2",
                                        "-W", "3", "10.0.0.2", timeout=30)
                assert code == 0, ping
                report: dict[str, object] = {}
                for _attempt in range(5):
                    code, out = await _run("ip", "netns", "exec", ns1, "iperf3", "-c", "10.0.0.2",
                                           "-p", "5201", "-t", "1", "-J", timeout=30)
                    if code == 0:
                        report = json.loads(out)
                        break
                    await asyncio.sleep(0.3)  # the server was not listening yet
                assert report, out
                return ping, report
            finally:
                if server.returncode is None:
                    server.kill()
                await server.wait()
                for path in paths:
                    path.stop()

        ping, report = asyncio.run(asyncio.wait_for(scenario(), 90))
        assert " 0% packet loss" in ping and "3 received" in ping
        end = report["end"]
        assert isinstance(end, dict)
        received = end["sum_received"]["bytes"]
        assert received > 100_000, received  # real TCP moved real data
        # The frames went through the lguest drivers, counted on both sides.
        n1, n2 = rigs[0].net, rigs[1].net
        assert n1 is not None and n2 is not None
        assert n1.stats.tx_packets > 50 and n2.stats.rx_packets > 50
        assert n1.stats.rx_length_errors == 0 and n2.stats.rx_length_errors == 0
    finally:
        for tap in taps:
            tap.close()
        for name in names:
            remove_namespace(netns_name(name))
    assert not any(namespace_exists(netns_name(n)) for n in names)


def test_the_host_peer_reaches_the_guests(names: list[str]) -> None:
    """lguest's --tunnet: the host is one more peer on the LAN, with a TAP of its own."""
    lan = Lan(LguestWorld())
    rigs = [build_guest(lan.world, name, lan=lan, console=False) for name in names[:2]]
    host_mac = bytes.fromhex("02aaaaaaaa01")
    host = lan.add_host(host_mac)
    taps: list[TapInterface] = []
    try:
        for i, rig in enumerate(rigs):
            assert rig.net is not None
            rig.net.open()
            taps.append(create_tap(names[i], address=f"10.0.0.{i + 1}/24", mac=rig.net.mac))
        host_tap = create_tap(names[2], address="10.0.0.254/24", mac=host_mac)
        taps.append(host_tap)

        async def scenario() -> list[tuple[int, str]]:
            loop = asyncio.get_running_loop()
            paths: list[NetPath] = [net_path(rig, tap, loop) for rig, tap in zip(rigs, taps, strict=False)]
            paths.append(net_path(host, host_tap, loop))
            try:
                return [
                    await _run("ip", "netns", "exec", host_tap.netns, "ping", "-c", "2", "-i",
                               "0.2", "-W", "3", "10.0.0.2", timeout=30),
                    await _run("ip", "netns", "exec", taps[0].netns, "ping", "-c", "2", "-i",
                               "0.2", "-W", "3", "10.0.0.254", timeout=30),
                ]
            finally:
                for path in paths:
                    path.stop()

        for code, out in asyncio.run(asyncio.wait_for(scenario(), 60)):
            assert code == 0 and "2 received" in out, out
        assert host.net.stats.tx_packets > 0 and host.net.stats.rx_packets > 0
    finally:
        for tap in taps:
            tap.close()


def test_cleanup_after_a_crash(names: list[str]) -> None:
    """A process that dies holding a TAP leaves only its namespace; removal by name works."""
    import sys

    code = (
        "import sys, time\n"
        "from pvio.domains.tap import create_tap\n"
        f"create_tap({names[0]!r}, address='10.9.0.1/24', mac=bytes.fromhex('020000aa0003'))\n"
        "print('ready', flush=True)\n"
        "time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "ready"
        ns = netns_name(names[0])
        links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True,
                               check=True).stdout
        assert "eth0" in links
        proc.kill()
        proc.wait(10)
        # The TAP went with its fd; the namespace outlived the process.
        assert namespace_exists(ns)
        links = subprocess.run(["ip", "-n", ns, "-o", "link"], capture_output=True, text=True,
                               check=True).stdout
        assert "eth0" not in links
        assert ns in stale_namespaces()
        remove_namespace(ns)
        assert not namespace_exists(ns)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _eth(ethertype: int, payload: bytes) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + ethertype.to_bytes(2, "big") + payload


def _fold(total: int) -> int:
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def _words(data: bytes) -> int:
    return sum(int.from_bytes(data[i : i + 2], "big") for i in range(0, len(data), 2))


def _ipv4(proto: int, l4: bytearray, *, ihl: int = 5, frag: int = 0, check: str = "partial") -> bytes:
    """An IPv4 packet around transport header+payload `l4`, its checksum field holding
    the pseudo-header's sum ("partial", what an offloading sender leaves), the finished
    checksum ("full"), or 0."""
    src, dst = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    total = ihl * 4 + len(l4)
    ip = bytes([0x40 | ihl, 0]) + total.to_bytes(2, "big") + bytes(2) + frag.to_bytes(2, "big")
    ip += bytes([64, proto]) + bytes(2) + src + dst + bytes(ihl * 4 - 20)
    at = _CSUM_AT.get(proto, 2)  # ICMP's checksum is at 2
    pseudo = _fold(_words(src + dst) + proto + len(l4))
    l4[at : at + 2] = bytes(2)
    if check == "partial":
        l4[at : at + 2] = pseudo.to_bytes(2, "big")
    elif check == "full":
        l4[at : at + 2] = (~_fold(pseudo + _words(bytes(l4))) & 0xFFFF).to_bytes(2, "big")
    return _eth(0x0800, ip + bytes(l4))


def _ipv6_tcp(l4: bytearray) -> bytes:
    src, dst = bytes(15) + b"\x01", bytes(15) + b"\x02"
    l4[16:18] = _fold(_words(src + dst) + 6 + len(l4)).to_bytes(2, "big")
    return _eth(0x86DD, bytes([0x60, 0, 0, 0]) + len(l4).to_bytes(2, "big") + bytes([6, 64]) + src + dst
                + bytes(l4))


_CSUM_AT = {6: 16, 17: 6}
_TCP = bytearray(20 + 100)
_UDP = bytearray(8 + 100)


@pytest.mark.parametrize(
    ("frame", "start", "offset"),
    [
        (_ipv4(6, bytearray(_TCP)), 34, 16),  # TCP left unfinished by the sender
        (_ipv4(17, bytearray(_UDP), ihl=6), 38, 6),  # UDP, with IP options
        (_ipv6_tcp(bytearray(_TCP)), 54, 16),  # IPv6 TCP
        (_ipv4(6, bytearray(_TCP), check="full"), 0, 0),  # finished: the kernel checks it
        (_ipv4(17, bytearray(_UDP), check="zero"), 0, 0),  # UDP without a checksum
        (_ipv4(6, bytearray(_TCP), frag=0x2000), 0, 0),  # a first fragment (MF)
        (_ipv4(6, bytearray(_TCP), frag=0x0010), 0, 0),  # a later fragment
        (_ipv4(1, bytearray(_TCP)), 0, 0),  # ICMP: nothing
        (_eth(0x0806, bytes(28)), 0, 0),  # ARP
        (_eth(0x0800, bytes([0x4F]) + bytes(8) + bytes([6]) + bytes(30)), 0, 0),  # header past the end
        (b"\x02" * 20, 0, 0),  # a runt
    ],
)
def test_checksum_header_of_a_frame_for_a_nocsum_tap(frame: bytes, start: int, offset: int) -> None:
    # A NOCSUM LAN carries the checksums the sender's kernel left to finish; the receiving
    # TAP is told where they are, and its kernel takes the packet as checked.  A finished
    # checksum is left for the kernel to check.
    hdr = VIRTIO_NET_HDR.unpack(checksum_header(frame))
    assert (hdr["flags"], hdr["csum_start"], hdr["csum_offset"]) == (
        (VIRTIO_NET_HDR_F_NEEDS_CSUM if start else 0), start, offset)
    assert hdr["gso_type"] == 0  # never segmentation: a frame crosses the LAN whole
