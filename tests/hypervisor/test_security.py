"""Hostile domains: garbage on the socket, forbidden fds, memory out of reach.

Each scenario runs against the daemon in this process (so its tables can be inspected)
with a well-behaved pair of domains alongside, which must keep being served.
"""

from __future__ import annotations

import array
import asyncio
import errno
import os
import socket
import struct

import pytest

from hv_harness import run_with
from pvio.abi import grant_table as gt
from pvio.hypervisor import wire
from pvio.hypervisor.aio import recv_frame
from pvio.hypervisor.errors import HypercallError
from pvio.hypervisor.session import createdomain_op
from pvio.hypervisor.wire import Op
from pvio.testing.hypervisor import DomainFactory, check_grant_map_rw


async def _raw(path: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, path)
    return sock


async def _recv(sock: socket.socket) -> tuple[bytes, list[int]]:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[None] = loop.create_future()
    loop.add_reader(sock.fileno(), lambda: fut.done() or fut.set_result(None))
    try:
        await asyncio.wait_for(fut, 5)
    finally:
        loop.remove_reader(sock.fileno())
    data, fds, _ = recv_frame(sock)
    return data, fds


def _socket_path(make: DomainFactory) -> str:
    path: str = make.socket_path  # type: ignore[attr-defined]
    return path


async def _garbage_scenario(make: DomainFactory, path: str) -> None:
    sock = await _raw(path)
    try:
        for junk in (b"", b"\0" * 3, os.urandom(200), b"PVHC" * 10):
            sock.send(junk)
            data, _ = await _recv(sock)
            frame = wire.decode_frame(data)
            assert frame.kind == wire.FRAME_ERROR and frame.ops[0].rc == -errno.EINVAL
        # An oversized frame arrives truncated: -E2BIG.
        sock.setblocking(True)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        sock.send(struct.pack("<IIIHH", wire.PVIO_HC_MAGIC, wire.MAX_FRAME + 4096, 1, 1, 0) + bytes(wire.MAX_FRAME + 4080))
        sock.setblocking(False)
        data, _ = await _recv(sock)
        assert wire.decode_frame(data).ops[0].rc == -errno.E2BIG
        # Descriptors sent to the hypervisor are closed unread; the frame is still served.
        r, w = os.pipe()
        req = wire.encode_frame(wire.FRAME_REQUEST, 2, [createdomain_op("hostile", 4, 1, "map", None)])
        sock.sendmsg([req], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r, w]).tobytes())])
        os.close(r)
        os.close(w)
        data, fds = await _recv(sock)
        assert wire.decode_frame(data).ops[0].rc == 0 and len(fds) == 2
        for fd in fds:
            os.close(fd)
        # Claiming domain 0 when it is taken, or a reserved domid, is refused.
        # Meanwhile, the well-behaved pair is served.
        await check_grant_map_rw(make, "map")
    finally:
        sock.close()


def test_garbage_and_oversized_frames() -> None:
    async def body(make: DomainFactory) -> None:
        await _garbage_scenario(make, _socket_path(make))

    asyncio.run(run_with("daemon", body))


def test_domid_zero_only_once() -> None:
    async def body(make: DomainFactory) -> None:
        d0 = await make("control", domid=0)
        assert d0.domid == 0
        with pytest.raises(HypercallError) as info:
            await make("impostor", domid=0)
        assert info.value.rc == -errno.EEXIST
        with pytest.raises(HypercallError):
            await make("reserved", domid=gt.DOMID_SELF)
        # Domain 0 hears of every other domain's death (@releaseDomain for XenStore).
        dead: list[int] = []
        d0.on_domain_dead = dead.append
        other = await make("short-lived")
        await other.close()
        for _ in range(500):
            if dead:
                break
            await asyncio.sleep(0.002)
        assert dead == [other.domid]

    for impl in ("inprocess", "daemon"):
        asyncio.run(run_with(impl, body))


@pytest.mark.parametrize("impl", ["inprocess", "daemon"])
def test_memory_fd_policy(impl: str) -> None:
    async def body(make: DomainFactory) -> None:
        a = await make("granter")
        b = await make("mapper")
        c = await make("copier", transport="copy")
        ask = Op(wire.PVIO_HYPERVISOR_domctl, wire.PVIO_DOMCTL_memory_fd, 1, wire.PVIO_MEMORY_FD.pack(domid=a.domid))
        (reply,) = await b.hypercall([ask])
        assert reply.rc == -errno.EPERM and not reply.fds, "memory without a mapping"
        (frame,) = a.alloc_pages(1)
        (ref_b,) = await a.grant_access(b.domid, [frame])
        (ref_c,) = await a.grant_access(c.domid, [frame])
        maps_b = await b.map_grants(a.domid, [ref_b])
        maps_c = await c.map_grants(a.domid, [ref_c])
        (reply,) = await c.hypercall([ask])
        assert reply.rc == -errno.EPERM and not reply.fds, "a copy-transport domain got memory"
        # The map view is exactly the granted page, nothing around it.
        view = maps_b[0].view
        assert view is not None and len(view) == 4096
        with pytest.raises((IndexError, ValueError)):
            view[4096:4097] = b"x"
        # The copy-transport "mapping" is a page of c's own memory.
        assert maps_c[0].bounce_frame >= 0
        await b.unmap_grants(maps_b)
        await c.unmap_grants(maps_c)
        assert view.__class__ is memoryview
        with pytest.raises(ValueError):
            bytes(view)  # released at unmap
        a.end_access([ref_b, ref_c])

    asyncio.run(run_with(impl, body))


def test_domain_without_reading_does_not_block_others() -> None:
    """A client that sends and never reads is no longer read once a reply waits for it
    (its own sends then block): it holds one reply, not a queue; others are served."""

    async def body(make: DomainFactory) -> None:
        path = _socket_path(make)
        sock = await _raw(path)
        try:
            sock.send(wire.encode_frame(wire.FRAME_REQUEST, 1, [createdomain_op("mute", 4, 1, "map", None)]))
            q = Op(wire.HYPERVISOR_grant_table_op, gt.GNTTABOP_query_size, 1, gt.GNTTAB_QUERY_SIZE.pack(dom=gt.DOMID_SELF))
            frame = wire.encode_frame(wire.FRAME_REQUEST, 2, [q] * 400)
            blocked = 0
            for _ in range(5000):  # never read a reply
                try:
                    sock.send(frame)
                    blocked = 0
                except BlockingIOError:
                    blocked += 1
                    if blocked > 50:  # the daemon stopped reading us
                        break
                    await asyncio.sleep(0.001)
                except (BrokenPipeError, ConnectionResetError):
                    break
                await asyncio.sleep(0)
            else:
                raise AssertionError("a client that never reads was read forever")
            await check_grant_map_rw(make, "copy")
        finally:
            sock.close()

    asyncio.run(run_with("daemon", body))


def test_release_hook_and_a_failing_hook() -> None:
    """Teardown runs every release hook (XenStore's @releaseDomain), even after one fails."""
    from pvio.hypervisor.inprocess import InProcessHypervisor

    async def body() -> None:
        ihv = InProcessHypervisor()
        released: list[int] = []

        def broken(domid: int) -> None:
            raise RuntimeError("a buggy hook")

        ihv.hv.release_hooks.extend([broken, released.append])
        a = await ihv.create_domain("a", 16)
        b = await ihv.create_domain("b", 16)
        port = await b.alloc_unbound(a.domid)
        await a.bind_interdomain(b.domid, port)
        await a.close()
        assert released == [a.domid]
        await b.close()
        assert released == [a.domid, b.domid]
        assert ihv.hv.is_empty() and ihv.platform.open_fds() == 0

    asyncio.run(body())


def test_out_of_descriptors_is_an_in_band_error() -> None:
    from pvio.abi import event_channel as ev
    from pvio.hypervisor.core import Hypervisor
    from pvio.testing.hypervisor import FakePlatform

    platform = FakePlatform()
    hv = Hypervisor(platform, lambda fd: fd)
    a = hv.create_domain("a", 4)
    platform.eventfd_error = OSError(errno.EMFILE, "Too many open files")
    op = Op(wire.HYPERVISOR_event_channel_op, ev.EVTCHNOP_alloc_unbound, 1, ev.EVTCHN_ALLOC_UNBOUND.pack(dom=gt.DOMID_SELF, remote_dom=0))
    (reply,) = hv.execute(a.domid, [op])
    assert reply.rc == -errno.EMFILE and not a.ports
    platform.eventfd_error = None
    (reply,) = hv.execute(a.domid, [op])
    assert reply.rc == 0 and len(a.ports) == 1
    hv.destroy_domain(a.domid)
    assert hv.is_empty() and not platform.open
