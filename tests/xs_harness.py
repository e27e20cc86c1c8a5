"""Helpers for XenStore tests: drive the sans-IO server by named connections, and run
`pvio xenstored` as a real process for the tests with Xen's own clients.

`Harness(transport="ring")` carries every domain connection's bytes through a
xenstore_domain_interface page instead (`pvio.xenstore.ring`'s two ends over one page,
each direction pumped through its 1 KiB ring as space allows), dom0's as a socket
would; tests/xenstore/conftest.py runs the watch, transaction, quota and advisory
suites both ways."""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pvio.abi.xs_wire import XsdSockmsgType as T
from pvio.xenstore.quotas import Quotas
from pvio.xenstore.ring import GuestEnd, ServerEnd
from pvio.xenstore.server import Close, Send, XenStoreServer
from pvio.xenstore.wire import FrameDecoder, Packet, encode, join_args

OK = b"OK\0"
#: The transport a Harness uses when none is given (set by tests/xenstore/conftest.py).
DEFAULT_TRANSPORT = ["socket"]


@dataclass
class RingPair:
    """Both ends of one domain's page, in one process."""

    server: ServerEnd
    guest: GuestEnd
    to_guest: bytearray = field(default_factory=bytearray)

    @classmethod
    def new(cls) -> RingPair:
        page = memoryview(bytearray(4096))
        return cls(ServerEnd(page), GuestEnd(page))


@dataclass
class Harness:
    """Named connections ("dom0", "d1", ...) onto one in-process server."""

    quotas: Quotas | None = None
    transport: str = field(default_factory=lambda: DEFAULT_TRANSPORT[0])
    rings: dict[int, RingPair] = field(default_factory=dict)
    server: XenStoreServer = field(init=False)
    conns: dict[str, int] = field(default_factory=dict)
    decoders: dict[int, FrameDecoder] = field(default_factory=dict)
    events: dict[str, list[tuple[str, str]]] = field(default_factory=dict)
    closed: set[str] = field(default_factory=set)
    #: Every packet each connection received, in order (replies and events).
    log: dict[str, list[Packet]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.server = XenStoreServer(quotas=self.quotas)

    def conn(self, name: str, domid: int | None = None) -> int:
        if name not in self.conns:
            if domid is None:
                domid = 0 if name == "dom0" else int(name.lstrip("d"))
            if domid and domid not in self.server.domains:
                self.server.introduce(domid)
            cid = self.server.connect(domid)
            if self.transport == "ring" and domid != 0:
                self.rings[cid] = RingPair.new()
            self.conns[name] = cid
            self.decoders[cid] = FrameDecoder()
            self.events[name] = []
            self.log[name] = []
        return self.conns[name]

    def _name(self, cid: int) -> str:
        return next(n for n, c in self.conns.items() if c == cid)

    def dispatch(self, outputs: list[Send | Close]) -> None:
        for out in outputs:
            name = self._name(out.conn_id)
            if isinstance(out, Close):
                self.closed.add(name)
                continue
            dec = self.decoders[out.conn_id]
            dec.feed(self._through_ring(out.conn_id, out.data))
            for pkt in dec.packets():
                self.log[name].append(pkt)
                if pkt.type == T.XS_WATCH_EVENT:
                    path, token = pkt.payload.split(b"\0")[:2]
                    self.events[name].append((path.decode(), token.decode()))

    def _through_ring(self, cid: int, data: bytes) -> bytes:
        """What the guest reads of `data` sent to it (all of it, over a socket)."""
        ring = self.rings.get(cid)
        if ring is None:
            return data
        ring.to_guest += data
        got = bytearray()
        while ring.to_guest:  # the daemon writes what fits, the guest reads it, again
            n = ring.server.send(ring.to_guest)
            del ring.to_guest[:n]
            got += ring.guest.receive()
        return bytes(got)

    def raw(self, name: str, data: bytes) -> list[Packet]:
        """Send raw bytes; return the replies (not events) this connection got."""
        cid = self.conn(name)
        before = len(self.log[name])
        ring = self.rings.get(cid)
        if ring is None:
            self.dispatch(self.server.receive(cid, data))
        while ring is not None and data:  # the guest writes what fits, the daemon reads it
            n = ring.guest.send(data)
            data = data[n:]
            self.dispatch(self.server.receive(cid, ring.server.receive()))
        return [p for p in self.log[name][before:] if p.type != T.XS_WATCH_EVENT]

    def req(self, name: str, type_: int, payload: bytes, tx: int = 0, req_id: int = 7) -> bytes | str:
        """One request; the reply payload, or the errno name of an XS_ERROR."""
        replies = self.raw(name, encode(type_, payload, req_id=req_id, tx_id=tx))
        assert len(replies) == 1, replies
        pkt = replies[0]
        assert pkt.req_id == req_id and pkt.tx_id == tx
        if pkt.type == T.XS_ERROR:
            return pkt.payload.rstrip(b"\0").decode()
        assert pkt.type == type_, (pkt.type, type_)
        return pkt.payload

    # conveniences -----------------------------------------------------------------
    def write(self, name: str, path: str, value: bytes | str = b"", tx: int = 0) -> bytes | str:
        v = value.encode() if isinstance(value, str) else value
        return self.req(name, T.XS_WRITE, path.encode() + b"\0" + v, tx)

    def read(self, name: str, path: str, tx: int = 0) -> bytes | str:
        return self.req(name, T.XS_READ, join_args(path), tx)

    def start(self, name: str) -> int:
        r = self.req(name, T.XS_TRANSACTION_START, b"\0")
        assert isinstance(r, bytes), r
        return int(r.rstrip(b"\0"))

    def end(self, name: str, tx: int, commit: bool = True) -> bytes | str:
        return self.req(name, T.XS_TRANSACTION_END, b"T\0" if commit else b"F\0", tx)

    def check(self) -> None:
        assert self.server.store.check() == []
        assert self.server.internal_errors == 0


# -- a real daemon process ---------------------------------------------------------------


@dataclass
class DaemonProcess:
    socket: Path
    control: Path
    proc: subprocess.Popen[bytes]

    @property
    def env(self) -> dict[str, str]:
        return {**os.environ, "XENSTORED_PATH": str(self.socket)}


def wait_for_socket(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            try:
                s.connect(str(path))
                return
            except OSError:
                time.sleep(0.02)
    raise AssertionError(f"xenstored did not listen on {path}")


async def until(predicate: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Wait on the event loop until `predicate()` holds; fail after `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


@contextlib.contextmanager
def run_daemon(tmp: Path, *args: str, name: str = "xs.sock") -> Iterator[DaemonProcess]:
    sock = tmp / name
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvio", "xenstored", "--socket", str(sock), *args],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_socket(sock)
        yield DaemonProcess(sock, Path(f"{sock}.control"), proc)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        err = proc.stderr.read().decode()
        proc.stderr.close()
        assert "Traceback" not in err, err
