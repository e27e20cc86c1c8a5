"""What one connection can make xenstored hold: a watcher that stops reading, dom0 or a
domain, costs the daemon a bounded backlog of events, never its memory, and never the
service of the connection that writes.  Each flood asserts the daemon's RSS growth."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest

from pvio.abi.xs_wire import XsdSockmsgType as T
from pvio.xenstore.client import Client
from pvio.xenstore.daemon import XenStoreDaemon, attach_domain
from pvio.xenstore.watches import Watch, rescan_event
from pvio.xenstore.wire import FrameDecoder, Packet, encode
from xs_harness import run_daemon

#: The daemon may grow by this much under a flood (it holds at most about 1 MiB of events
#: per stalled watcher; unbounded, the floods below take it past 100 MiB).
RSS_GROWTH_LIMIT = 64 << 20
#: Each batch of requests must be answered within this (it takes milliseconds).
BATCH_DEADLINE = 5.0
#: Big tokens make every event about 2 KiB, so a short flood is a lot of memory.
TOKEN = b"t" * 2000

R = TypeVar("R")


def rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) << 10
    raise AssertionError(f"no VmRSS for {pid}")


class Peer:
    """A blocking xs_wire connection that reads only when told to."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.dec = FrameDecoder()
        self.events: list[tuple[bytes, bytes]] = []

    @classmethod
    def dom0(cls, path: Path) -> Peer:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect(str(path))
        return cls(s)

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self, deadline: float, what: str) -> list[Packet]:
        """Read what has arrived (waiting until `deadline`); keep events, return replies."""
        left = deadline - time.monotonic()
        assert left > 0, f"no {what} by the deadline"
        self.sock.settimeout(left)
        try:
            data = self.sock.recv(1 << 16)
        except TimeoutError:
            return []
        assert data, "the daemon closed the connection"
        self.dec.feed(data)
        got = []
        for p in self.dec.packets():
            if p.type == T.XS_WATCH_EVENT:
                path, token = p.payload.split(b"\0")[:2]
                self.events.append((path, token))
            else:
                assert p.type != T.XS_ERROR, p.payload
                got.append(p)
        return got

    def replies(self, n: int, timeout: float = BATCH_DEADLINE) -> list[Packet]:
        """Read until `n` replies arrived (events are kept in `self.events`)."""
        deadline = time.monotonic() + timeout
        got: list[Packet] = []
        while len(got) < n:
            got += self._read(deadline, f"{n} replies (got {len(got)})")
        return got

    def until_event(self, event: tuple[bytes, bytes], timeout: float = BATCH_DEADLINE) -> None:
        """Read until `event` is among the events received after the first one."""
        deadline = time.monotonic() + timeout
        while event not in self.events[1:]:
            assert not self._read(deadline, f"event {event[0]!r}")

    def watch(self, path: bytes, token: bytes) -> None:
        self.send(encode(T.XS_WATCH, path + b"\0" + token + b"\0", req_id=1))
        self.replies(1)

    def close(self) -> None:
        self.sock.close()


def flood(writer: Peer, requests: Iterator[bytes], batches: int, batch: int, pid: int) -> int:
    """Send `batches` batches of pipelined requests, each answered within the deadline;
    stop early (and fail) once the daemon grew past the limit.  The growth."""
    base = rss(pid)
    for _ in range(batches):
        writer.send(b"".join(next(requests) for _ in range(batch)))
        writer.replies(batch)
        grown = rss(pid) - base
        assert grown < RSS_GROWTH_LIMIT, f"xenstored grew by {grown >> 20} MiB"
    return rss(pid) - base


def writes(paths: list[str]) -> Iterator[bytes]:
    """XS_WRITE requests to `paths` in turn, for ever."""
    i = 0
    while True:
        path = paths[i % len(paths)]
        yield encode(T.XS_WRITE, f"{path}\0v{i}".encode(), req_id=i & 0xFFFF)
        i += 1


def test_two_stalled_dom0_watchers_of_the_root_do_not_grow_the_daemon(tmp_path: Path) -> None:
    """Two dom0 connections WATCH / and never read while a third writes: the daemon holds
    a bounded backlog for each, and the writer is answered throughout."""
    with run_daemon(tmp_path) as d:
        stalled = [Peer.dom0(d.socket) for _ in range(2)]
        writer = Peer.dom0(d.socket)
        try:
            for s in stalled:
                s.watch(b"/", TOKEN)  # from here on they never read
            requests = writes([f"/flood/n{i}" for i in range(64)])
            flood(writer, requests, 2, 500, d.proc.pid)  # warm up: nodes, buffers
            flood(writer, requests, 100, 500, d.proc.pid)  # 100,000 events of 2 KiB
        finally:
            for p in [*stalled, writer]:
                p.close()


def test_a_guest_rewriting_its_node_under_a_stalled_backend_watch(tmp_path: Path) -> None:
    """Domain 5 rewrites one of its own nodes (within every quota) while a dom0 client
    that watches its frontend directory, as blkback does, stops reading: the daemon
    stays bounded and the guest keeps being served."""
    with run_daemon(tmp_path) as d:
        with Client(str(d.socket)) as tool:
            tool.introduce(5)
            tool.write("/local/domain/5", "")
            tool.set_perms("/local/domain/5", ["n5"])
        guest = Peer(attach_domain(d.control, 5))
        backend = Peer.dom0(d.socket)
        try:
            guest.send(encode(T.XS_WRITE, b"device/vbd/768/state\0" + b"1"))
            guest.replies(1)
            backend.watch(b"/local/domain/5/device", TOKEN)  # and stops reading
            requests = writes(["device/vbd/768/state"])
            flood(guest, requests, 2, 500, d.proc.pid)
            flood(guest, requests, 100, 500, d.proc.pid)  # 50,000 events of 2 KiB
        finally:
            guest.close()
            backend.close()


async def off_loop(fn: Callable[[], R]) -> R:
    """Run a blocking client call in a thread while the daemon serves on this loop."""
    return await asyncio.get_running_loop().run_in_executor(None, fn)


async def _stall_then_catch_up(d: XenStoreDaemon) -> None:
    slow, writer, tool = (Peer.dom0(d.socket_path) for _ in range(3))
    await off_loop(lambda: slow.watch(b"/flood", TOKEN))  # then it stops reading
    n = 3000  # 6 MB of events
    requests = writes([f"/flood/n{i}" for i in range(10)])
    for _ in range(n // 500):
        await off_loop(lambda: writer.send(b"".join(next(requests) for _ in range(500))))
        await off_loop(lambda: writer.replies(500))
    stats = d.statistics()
    assert stats["events_dropped"] > 0 and stats["connections_behind"] == 1
    # The watcher reads again: it is told to look again at what it watches, once, after
    # whatever was still queued, and then hears about later changes as usual.
    rescan = (b"/flood", TOKEN)
    await off_loop(lambda: slow.until_event(rescan))
    first, *rest = slow.events
    assert first == rescan  # the registration's own event
    assert rest.count(rescan) == 1 and rest[-1] == rescan
    assert len(rest) < n  # most were dropped
    assert d.statistics()["connections_behind"] == 0
    await off_loop(lambda: tool.send(encode(T.XS_WRITE, b"/flood/after\0x")))
    await off_loop(lambda: tool.replies(1))
    await off_loop(lambda: slow.until_event((b"/flood/after", TOKEN)))
    for p in (slow, writer, tool):
        p.close()


def test_a_stalled_watcher_that_reads_again_is_told_to_rescan(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Past the backlog a dom0 watcher's events are dropped and counted, with one log
    line for the whole episode; when it catches up each watch that lost events fires
    once on its own path, and later events flow as before."""

    async def main() -> None:
        d = XenStoreDaemon(tmp_path / "xs.sock")
        await d.start()
        try:
            await asyncio.wait_for(_stall_then_catch_up(d), 60)
        finally:
            await d.close()

    with caplog.at_level(logging.WARNING, logger="pvio.xenstore.daemon"):
        asyncio.run(main())
    lines = [r for r in caplog.records if r.name == "pvio.xenstore.daemon"]
    assert len(lines) == 1, [r.getMessage() for r in lines]
    assert "stopped reading" in lines[0].getMessage()


def test_the_rescan_event_is_the_watch_as_its_client_gave_it() -> None:
    relative = Watch(1, "/local/domain/5/device", b"be", relative=True)
    absolute = Watch(1, "/local/domain/5/device", b"be", relative=False)
    special = Watch(1, "@releaseDomain", b"rel", relative=False)
    assert rescan_event(relative, 5) == encode(T.XS_WATCH_EVENT, b"device\0be\0")
    assert rescan_event(absolute, 5) == encode(T.XS_WATCH_EVENT, b"/local/domain/5/device\0be\0")
    assert rescan_event(special, 0) == encode(T.XS_WATCH_EVENT, b"@releaseDomain\0rel\0")


def test_accept_out_of_descriptors_backs_off_and_logs_once(tmp_path: Path) -> None:
    """xenstored's descriptor table made full from outside (its soft RLIMIT_NOFILE lowered
    to its lowest free descriptor): a new client's accept() fails with EMFILE on a
    level-triggered listener.  It is logged once, not per attempt (nor with a traceback),
    and the waiting client is served once there is room again."""
    import os
    import resource
    import socket as socketlib
    import subprocess
    import sys
    import time

    from xs_harness import wait_for_socket

    sock, log = tmp_path / "xs.sock", tmp_path / "xenstored.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "pvio", "xenstored", "--socket", str(sock)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_socket(sock)
        soft, hard = resource.prlimit(proc.pid, resource.RLIMIT_NOFILE)
        used = {int(n) for n in os.listdir(f"/proc/{proc.pid}/fd")}
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (min(set(range(len(used) + 1)) - used), hard))
        late = socketlib.socket(socketlib.AF_UNIX, socketlib.SOCK_STREAM)
        late.connect(str(sock))  # queued in the backlog; accept() fails
        deadline = time.monotonic() + 10
        while "accept" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, log.read_text(errors="replace")
            time.sleep(0.02)
        time.sleep(0.5)  # a listener that stays readable: without back-off, a flood of lines
        size = log.stat().st_size
        resource.prlimit(proc.pid, resource.RLIMIT_NOFILE, (soft, hard))
        late.settimeout(5)
        late.sendall(b"\x01\x00\x00\x00" + bytes(8) + b"\x02\x00\x00\x00" + b"/\x00")  # XS_DIRECTORY "/"
        assert len(late.recv(4096)) >= 16  # served
        late.close()
        assert size < 1024, log.read_text(errors="replace")[:2000]
        text = log.read_text(errors="replace")
        # Logged once per episode (a descriptor the daemon frees meanwhile, such as the
        # probe connection's, may end one and start another), never per attempt.
        assert 1 <= text.count("accept: ") <= 2 and "Traceback" not in text, text[:2000]
    finally:
        proc.terminate()
        proc.wait(10)
