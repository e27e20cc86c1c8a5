"""A guest's network end: a TAP interface in its own network namespace ``pvio-<name>``.

Theory of operation
-------------------
Each lguest guest's network device ends in a TAP interface inside a network namespace
of its own, so the kernel's TCP/IP stack in that namespace is the guest's network stack:
``ip netns exec pvio-g1 ping 10.0.0.2`` sends real frames, which pvio reads from the TAP
and hands to the guest's lguest network driver, and frames the driver receives are
written back into the TAP.

`create_tap` makes the namespace with iproute2 (``ip netns add``), then opens
/dev/net/tun from *inside* it: a short-lived thread enters the namespace with setns(2)
(Python 3.11 has no os.setns, so through libc by ctypes) and issues TUNSETIFF with
IFF_TAP | IFF_NO_PI, so the interface is born in the namespace and the process's other
threads never change namespace.  The address, netmask, MAC and link state are set with
``ip -n``.  The fd is non-blocking, for asyncio (`TapLink`).  A TAP opened with
IFF_MULTI_QUEUE (a Xen vif of several queues) gets more queues with `open_queue`: one
more fd each, over which the kernel spreads the flows it sends.

Cleanup is by name and idempotent: the interface is not persistent, so it vanishes when
its fd is closed (also when the process dies); the namespace is a bind mount that
outlives a crash, so `remove_namespace` deletes it if present and does nothing if not,
and `create_tap` first removes a leftover namespace of the same name.

Rejected: creating the TAP in the root namespace and moving it with ``ip link set netns``
(a window in which the host sees the interface, and a moved TAP keeps no carrier state
worth having); a persistent TAP (TUNSETPERSIST) that a crash would leave behind; the
pyroute2 package (iproute2 is already a dependency of the tests and simpler to read).
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import fcntl
import os
import re
import struct
import subprocess
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pvio.abi.linux_if import (
    IFF_MULTI_QUEUE,
    IFF_NO_PI,
    IFF_TAP,
    IFF_VNET_HDR,
    IFNAMSIZ,
    IFREQ_FLAGS,
    TUN_F_CSUM,
    TUNSETIFF,
    TUNSETOFFLOAD,
    VIRTIO_NET_HDR,
    VIRTIO_NET_HDR_F_NEEDS_CSUM,
)
from pvio.abi.native import setns

NETNS_PREFIX = "pvio-"
NETNS_DIR = "/run/netns"
CLONE_NEWNET = 0x40000000
#: Frames waiting for a TAP that will not take them; beyond this they are dropped.
TAP_QUEUE_LIMIT = 256
#: Frames read per wake-up before yielding to the loop (one busy TAP cannot hog it).
READ_BATCH = 64
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,40}$")
#: A frame from a TAP: bytes, or a view past a NOCSUM TAP's virtio_net_hdr (no copy).
Frame = bytes | memoryview
_HDR = VIRTIO_NET_HDR.size
_NO_CSUM = VIRTIO_NET_HDR.pack()
_CSUM_OFFSET = {6: 16, 17: 6}  # IP protocol -> checksum offset in its header (TCP, UDP)
_IPV4_ADDRS = struct.Struct("!4H")  # source and destination, as 16-bit words
_IPV6_ADDRS = struct.Struct("!16H")


def checksum_header(frame: Frame) -> bytes:
    """The virtio_net_hdr that writes `frame` to a NOCSUM TAP.

    A TCP or UDP packet (IPv4, or IPv6 without extension headers) whose checksum field
    holds only the pseudo-header's sum was left unfinished by the sender's kernel: the
    header says "needs checksum" from the transport header on, which the receiving
    stack takes as checked (and would finish if it forwarded the packet).  Anything else
    — a finished checksum, a fragment, other protocols — gets no flags, and the
    receiving kernel checks it as usual."""
    if len(frame) < 34:
        return _NO_CSUM
    ethertype = (frame[12] << 8) | frame[13]
    if ethertype == 0x0800:
        ihl = (frame[14] & 0x0F) * 4
        if ihl < 20 or frame[20] & 0x3F or frame[21]:
            return _NO_CSUM  # a fragment (or MF set): the sender finished its checksum
        start, proto = 14 + ihl, frame[23]
        length = ((frame[16] << 8) | frame[17]) - ihl
        pseudo = sum(_IPV4_ADDRS.unpack_from(frame, 26)) + proto + length
    elif ethertype == 0x86DD and len(frame) >= 54:
        start, proto = 54, frame[20]
        length = (frame[18] << 8) | frame[19]
        pseudo = sum(_IPV6_ADDRS.unpack_from(frame, 22)) + proto + length
    else:
        return _NO_CSUM
    offset = _CSUM_OFFSET.get(proto)
    if offset is None or length <= 0 or start + offset + 2 > len(frame):
        return _NO_CSUM
    field = (frame[start + offset] << 8) | frame[start + offset + 1]
    while pseudo > 0xFFFF:
        pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
    if field != pseudo and not (field == 0xFFFF and pseudo == 0) and not (field == 0 and pseudo == 0xFFFF):
        return _NO_CSUM  # finished (or absent, UDP's 0): the kernel checks it
    return VIRTIO_NET_HDR.pack(flags=VIRTIO_NET_HDR_F_NEEDS_CSUM, csum_start=start, csum_offset=offset)


class TapError(Exception):
    """Creating or configuring a namespace or TAP failed (the host's side)."""


def lan_interface(lan: str) -> str:
    """The host's interface on lguest LAN `lan`: ``pvio-<lan>``, in the host's namespace."""
    return NETNS_PREFIX + lan


def netns_name(name: str) -> str:
    """The namespace of guest `name`: ``pvio-<name>``."""
    if not _NAME.match(name):
        raise TapError(f"bad guest name {name!r}")
    return NETNS_PREFIX + name


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if check and proc.returncode != 0:
        raise TapError(f"ip {' '.join(args)}: {proc.stderr.strip()}")
    return proc


def namespace_exists(netns: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, netns))


def remove_namespace(netns: str) -> None:
    """Delete namespace `netns` if it exists (idempotent: safe after a crash)."""
    if namespace_exists(netns):
        _ip("netns", "delete", netns, check=False)
    if namespace_exists(netns):
        raise TapError(f"could not remove namespace {netns}")


def stale_namespaces(prefix: str = NETNS_PREFIX) -> list[str]:
    """Namespaces named `prefix`... that exist now (left over by a crash, or in use)."""
    try:
        return sorted(n for n in os.listdir(NETNS_DIR) if n.startswith(prefix))
    except FileNotFoundError:
        return []


def _open_tap(ifname: str, nocsum: bool, multi_queue: bool = False, first: bool = True) -> int:
    """/dev/net/tun as TAP `ifname` in the calling thread's namespace (with
    `multi_queue`, a TAP that exists already gets one more queue: this fd, not `first`,
    which leaves the device's offloads as they are: TUNSETOFFLOAD is the device's)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | (IFF_VNET_HDR if nocsum else 0) | (IFF_MULTI_QUEUE if multi_queue else 0)
        ifr = IFREQ_FLAGS.pack(ifr_name=ifname.encode(), ifr_flags=flags)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        if nocsum and first:
            fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_tap_in(netns: str, ifname: str, nocsum: bool = False, multi_queue: bool = False,
                 first: bool = True) -> int:
    """Open a TAP named `ifname` from inside `netns`, in a thread of its own."""
    result: list[int] = []
    failure: list[BaseException] = []

    def work() -> None:
        try:
            ns_fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
            try:
                setns(ns_fd, CLONE_NEWNET)  # this thread only; it ends right after
            finally:
                os.close(ns_fd)
            result.append(_open_tap(ifname, nocsum, multi_queue, first))
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=work, name=f"tap-{netns}")
    thread.start()
    thread.join()
    if failure:
        raise TapError(f"opening a TAP in {netns}: {failure[0]}") from failure[0]
    return result[0]


@dataclass
class TapInterface:
    """A TAP interface in its own namespace; `close()` removes both."""

    netns: str
    ifname: str
    fd: int
    mac: bytes
    address: str
    nocsum: bool = False  # frames carry a virtio_net_hdr; checksums are left undone
    multi_queue: bool = False  # IFF_MULTI_QUEUE: `open_queue` adds queues (fds)

    def read_frame(self) -> Frame | None:
        """One frame, or None when none is waiting."""
        try:
            data = os.read(self.fd, 65536 + _HDR)
        except BlockingIOError:
            return None
        return memoryview(data)[_HDR:] if self.nocsum else data

    def write_frame(self, frame: Frame) -> bool:
        """Write one frame; False if the TAP would block."""
        try:
            if self.nocsum:
                os.writev(self.fd, (checksum_header(frame), frame))
            else:
                os.write(self.fd, frame)
        except BlockingIOError:
            return False
        return True

    def write_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> bool:
        """Write one frame given in pieces; False if the TAP would block."""
        return self.write_frame(b"".join(parts))

    def close(self) -> None:
        self.close_device()
        if self.netns:
            remove_namespace(self.netns)

    def close_device(self) -> None:
        """The interface goes (it dies with its fd); the namespace stays."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> TapInterface:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# T:890 The guest's end of the LAN: a TAP in its own namespace
# A guest's network device ends in the kernel: a TAP interface inside a network
# namespace `pvio-<name>`, so that namespace's TCP/IP stack is the guest's.  The
# namespace is made with iproute2; the TAP is opened from inside it by a thread that
# setns()es there and asks /dev/net/tun for IFF_TAP|IFF_NO_PI (raw Ethernet frames, no
# header), then given the guest's MAC — the one its driver publishes in the LAN page, so
# the unicast frames the page routes are the ones the kernel answers — its address, and
# a link that is up.  Frames the kernel sends become the driver's transmits; frames the
# driver receives are written back.  The TAP dies with its fd; the namespace, which
# would outlive a crash, is removed by name, idempotently.
# :T
def create_tap(name: str, *, address: str, mac: bytes, ifname: str = "eth0",
               mtu: int = 1500, nocsum: bool = False, multi_queue: bool = False) -> TapInterface:
    """Namespace ``pvio-<name>`` holding TAP `ifname` with `address` (CIDR) and `mac`."""
    netns = netns_name(name)
    _check_link(ifname, mac)
    remove_namespace(netns)  # a leftover from a crash
    _ip("netns", "add", netns)
    fd = -1
    try:
        fd = _open_tap_in(netns, ifname, nocsum, multi_queue)
        _configure(["-n", netns], ifname, mac, mtu, address)
        _ip("-n", netns, "link", "set", "dev", "lo", "up")
        os.set_blocking(fd, False)
    except BaseException:
        if fd >= 0:
            os.close(fd)
        remove_namespace(netns)
        raise
    return TapInterface(netns, ifname, fd, mac, address, nocsum, multi_queue)


def add_tap(netns: str, *, ifname: str, address: str, mac: bytes, mtu: int = 1500,
            nocsum: bool = False, multi_queue: bool = False) -> TapInterface:
    """One more TAP `ifname` in existing namespace `netns` (a guest's second interface).
    Close it with `close_device`: `close` would remove the namespace, which the guest's
    first TAP owns."""
    _check_link(ifname, mac)
    fd = _open_tap_in(netns, ifname, nocsum, multi_queue)
    try:
        _configure(["-n", netns], ifname, mac, mtu, address)
        os.set_blocking(fd, False)
    except BaseException:
        os.close(fd)
        raise
    return TapInterface(netns, ifname, fd, mac, address, nocsum, multi_queue)


def create_host_tap(ifname: str, *, address: str, mac: bytes, mtu: int = 1500,
                    nocsum: bool = False, multi_queue: bool = False) -> TapInterface:
    """TAP `ifname` in the host's own namespace, with `address` (CIDR) and `mac`: the
    host's end of a LAN (lguest's ``--tunnet``).  It vanishes when closed; `netns` is ""
    and `close()` removes no namespace."""
    _check_link(ifname, mac)
    if os.path.exists(f"/sys/class/net/{ifname}"):
        raise TapError(f"interface {ifname} exists already (another pvio up on this LAN?)")
    try:
        fd = _open_tap(ifname, nocsum, multi_queue)
    except OSError as exc:
        raise TapError(f"opening TAP {ifname}: {exc}") from exc
    try:
        _configure([], ifname, mac, mtu, address)
        os.set_blocking(fd, False)
    except BaseException:
        os.close(fd)
        raise
    return TapInterface("", ifname, fd, mac, address, nocsum, multi_queue)


def open_queue(tap: TapInterface) -> TapInterface:
    """One more queue of multi-queue TAP `tap`: the same interface through a new fd,
    which gets the flows the kernel steers to it.  Close it with `close_device` (the
    interface goes only when its last queue does)."""
    if not tap.multi_queue:
        raise TapError(f"{tap.ifname} was not opened with IFF_MULTI_QUEUE")
    try:
        if tap.netns:
            fd = _open_tap_in(tap.netns, tap.ifname, tap.nocsum, True, first=False)
        else:
            fd = _open_tap(tap.ifname, tap.nocsum, True, first=False)
    except OSError as exc:
        raise TapError(f"adding a queue to TAP {tap.ifname}: {exc}") from exc
    os.set_blocking(fd, False)
    return dataclasses.replace(tap, fd=fd)


def _check_link(ifname: str, mac: bytes) -> None:
    if not 0 < len(ifname) < IFNAMSIZ or not _NAME.match(ifname):
        raise TapError(f"bad interface name {ifname!r}")
    if len(mac) != 6 or mac[0] & 1:
        raise TapError(f"bad MAC {mac.hex(':')}")


def _configure(where: list[str], ifname: str, mac: bytes, mtu: int, address: str) -> None:
    """The TAP's MAC, MTU and address, and its link up (`where`: ``-n NETNS`` or none)."""
    _ip(*where, "link", "set", "dev", ifname, "address", mac.hex(":"), "mtu", str(mtu))
    if address:  # "": no address (a Xen vif's end, attached to a bridge)
        _ip(*where, "addr", "add", address, "dev", ifname)
    _ip(*where, "link", "set", "dev", ifname, "up")


@dataclass
class TapStatistics:
    rx_frames: int = 0  # read from the TAP
    tx_frames: int = 0  # written to the TAP
    tx_dropped: int = 0  # the TAP's queue was full


@dataclass
class TapLink:
    """asyncio glue: frames from the TAP go to `on_frame`; `send` writes to the TAP.

    Writes the TAP refuses wait in a bounded queue (TAP_QUEUE_LIMIT); beyond it they
    are dropped and counted, so a flood toward one guest cannot grow memory."""

    tap: TapInterface
    on_frame: Callable[[Frame], None]
    queue_limit: int = TAP_QUEUE_LIMIT
    stats: TapStatistics = field(default_factory=TapStatistics)
    _queue: deque[Frame] = field(default_factory=deque)
    _loop: asyncio.AbstractEventLoop | None = None
    _writing: bool = False
    #: reading stopped until `resume`: the consumer has no room (back-pressure)
    paused: bool = False

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        if not self.paused:
            loop.add_reader(self.tap.fd, self._readable)

    def stop(self) -> None:
        if self._loop is not None:
            if not self.paused:
                self._loop.remove_reader(self.tap.fd)
            if self._writing:
                self._loop.remove_writer(self.tap.fd)
            self._loop = None

    def pause(self) -> None:
        """Read no more frames until `resume`: the kernel keeps them in the TAP's queue
        and its qdisc, and TCP is slowed where it sends instead of losing segments."""
        if not self.paused:
            self.paused = True
            if self._loop is not None:
                self._loop.remove_reader(self.tap.fd)

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            if self._loop is not None:
                self._loop.add_reader(self.tap.fd, self._readable)

    def _readable(self) -> None:
        for _ in range(READ_BATCH):
            if self.paused:
                return
            try:
                frame = self.tap.read_frame()
            except OSError as exc:
                if exc.errno in (errno.EBADF, errno.EIO):
                    self.stop()
                    return
                raise
            if frame is None:
                return
            self.stats.rx_frames += 1
            self.on_frame(frame)

    def send(self, frame: Frame) -> None:
        if not self._queue and self.tap.write_frame(frame):
            self.stats.tx_frames += 1
            return
        self._enqueue(frame)

    def _enqueue(self, frame: Frame) -> None:
        if len(self._queue) >= self.queue_limit:
            self.stats.tx_dropped += 1
            return
        self._queue.append(frame)
        if self._loop is not None and not self._writing:
            self._writing = True
            self._loop.add_writer(self.tap.fd, self._writable)

    def send_parts(self, parts: Sequence[bytes | bytearray | memoryview]) -> None:
        """`send` for a frame in pieces, which may be views valid only during the call:
        written at once, or copied into the queue."""
        if not self._queue and self.tap.write_parts(parts):
            self.stats.tx_frames += 1
            return
        self._enqueue(b"".join(parts))

    def _writable(self) -> None:
        while self._queue:
            if not self.tap.write_frame(self._queue[0]):
                return
            self._queue.popleft()
            self.stats.tx_frames += 1
        if self._loop is not None:
            self._loop.remove_writer(self.tap.fd)
        self._writing = False

