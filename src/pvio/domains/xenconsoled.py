"""`pvio xenconsoled`: the Xen guests' consoles, from their pages to ptys (xenconsoled's job).

Theory of operation
-------------------
Like Xen's xenconsoled, the daemon learns of domains' consoles from XenStore: it
watches ``/local/domain`` and looks again at a domain's ``console`` directory whenever
an event names it (or the domain's home), where the toolstack wrote what libxl writes
(`pvio.toolstack.xenpages.console_keys`).  (xenconsoled watches @introduceDomain and
asks the hypervisor for the list of domains; pvio's hypervisor has no such list, and a
domain's keys are written after its introduction anyway.)

    console/ring-ref  the page's frame         console/port    the event channel port
    console/type      "xenconsoled" (ours)     console/limit   the output buffer bound
    console/output    "pty"                    console/tty     written here: the pty

For a domain whose keys are all there the daemon -- a domain of the hypervisor with a
fixed domid (`pvio up`: XENCONSOLED_DOMID), written to ``/tool/xenconsoled/domid`` --
maps grant 0 (GNTTAB_RESERVED_CONSOLE) of the domain and binds the port, opens a pty
(raw, its slave kept open so that output waits in the pty when nobody reads), and writes
the slave's path to ``console/tty``, where `pvio console NAME` (and `xl console`) find
it.  With ``--log-dir`` each line of output is also appended to
``<dir>/guest-<name>.log`` after a timestamp (xenconsoled's ``--timestamp=guest``).

Overflow, as xenconsoled: the guest never waits.  On every kick the daemon empties the
guest's output ring into the domain's buffer; when nobody reads the pty the buffer grows
to ``console/limit`` bytes (1 MiB by default, libxl's) and then the oldest output is
discarded and counted (`statistics`).  Input goes the other way only while the guest's
input ring has room: the daemon stops reading the pty until the guest has consumed.

A domain's console ends when the domain dies (the hypervisor's domain_dead push: the
mapping goes at once, so the dead domain is not kept), when its keys go (RELEASE, or
``rm`` of its home), or when the daemon stops.  A domain that breaks its rings loses its
console only.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import termios
import time
import tty
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pvio.abi.grant_table import GNTTAB_RESERVED_CONSOLE
from pvio.hypervisor.client import Domain, GrantMapping
from pvio.ring.bytering import ByteRingPair, console_backend
from pvio.ring.errors import RingBroken
from pvio.xenstore.client import AsyncClient, WatchStream
from pvio.xenstore.errors import XsError

log = logging.getLogger("pvio.xenconsoled")

#: libxl's LIBXL_XENCONSOLE_LIMIT: the default output bound per console.
DEFAULT_LIMIT = 1 << 20
#: Output taken from one guest per kick before the daemon serves the others.
DRAIN_PER_KICK = 64 << 10
CONSOLED_DOMID_KEY = "/tool/xenconsoled/domid"
DOMAINS = "/local/domain"


class OutputBuffer:
    """Output waiting for the pty, bounded: past `limit` the oldest is discarded."""

    def __init__(self, limit: int) -> None:
        self.limit = max(limit, 1)
        self.data = bytearray()
        self.discarded = 0

    def append(self, data: bytes) -> None:
        self.data += data
        excess = len(self.data) - self.limit
        if excess > 0:
            del self.data[:excess]
            self.discarded += excess


class TimestampedLog:
    """A guest's output, each line after ``[YYYY-mm-dd HH:MM:SS] ``."""

    def __init__(self, path: Path) -> None:
        self.file: IO[bytes] = open(path, "ab")  # noqa: SIM115 - closed in close()
        self.at_line_start = True

    def write(self, data: bytes) -> None:
        stamp = time.strftime("[%Y-%m-%d %H:%M:%S] ").encode()
        out = bytearray()
        for piece in data.splitlines(keepends=True):
            if self.at_line_start:
                out += stamp
            out += piece
            self.at_line_start = piece.endswith(b"\n")
        self.file.write(out)
        self.file.flush()

    def close(self) -> None:
        self.file.close()


@dataclass
class Console:
    """One domain's console as the daemon serves it."""

    domid: int
    name: str
    port: int  # ours, bound to `remote_port`
    remote_port: int  # the guest's, as console/port names it
    mapping: GrantMapping
    rings: ByteRingPair
    buffer: OutputBuffer
    master: int
    slave: int
    tty: str
    logfile: TimestampedLog | None = None
    reading_pty: bool = False
    writing_pty: bool = False
    broken: str = ""
    statistics: dict[str, int] = field(default_factory=lambda: {"out": 0, "in": 0})


class ConsoleDaemon:
    """The consoles of every domain the toolstack gave one (see the module notes)."""

    def __init__(self, xs: AsyncClient, dom: Domain, log_dir: Path | None = None) -> None:
        self.xs = xs
        self.dom = dom
        self.log_dir = log_dir
        self.consoles: dict[int, Console] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        dom.on_domain_dead = self._domain_dead

    # -- discovery through XenStore ----------------------------------------------

    async def start(self) -> None:
        await self.xs.write(CONSOLED_DOMID_KEY, str(self.dom.domid))
        self._spawn(self._follow(await self.xs.watch(DOMAINS)))

    async def _follow(self, stream: WatchStream) -> None:
        async for event in stream:
            domids: set[int] = set()
            for ev in [event, *stream.drain()]:
                parts = ev.path[len(DOMAINS):].split("/")
                if len(parts) < 2 or not parts[1].isdigit():
                    domids.add(-1)  # /local/domain itself (or a watch firing again): all
                elif len(parts) == 2 or parts[2] == "console":
                    domids.add(int(parts[1]))
            if -1 in domids:
                await self.scan()
            for domid in sorted(domids - {-1}):
                await self.refresh(domid)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def scan(self) -> None:
        """Look at every domain's console, and at those of domains gone."""
        try:
            domids = {int(d) for d in await self.xs.directory(DOMAINS) if d.isdigit()}
        except XsError:  # no domain yet
            domids = set()
        for domid in sorted(domids | set(self.consoles)):
            await self.refresh(domid)

    async def _keys(self, domid: int) -> dict[str, bytes] | None:
        base = f"/local/domain/{domid}/console"
        keys: dict[str, bytes] = {}
        for key in ("ring-ref", "port", "type"):
            value = await self.xs.read_or(f"{base}/{key}")
            if value is None:
                return None
            keys[key] = value
        keys["limit"] = await self.xs.read_or(f"{base}/limit", b"") or b""
        keys["name"] = await self.xs.read_or(f"/local/domain/{domid}/name", b"") or b""
        return keys

    async def refresh(self, domid: int) -> None:
        """Attach, keep, or detach `domid`'s console, as its keys now say."""
        async with self._lock:
            keys = await self._keys(domid)
            wanted = keys is not None and keys["type"] == b"xenconsoled" and \
                keys["port"].isdigit() and keys["ring-ref"].isdigit()
            con = self.consoles.get(domid)
            if con is not None and (not wanted or keys is None or int(keys["port"]) != con.remote_port or con.broken):
                await self._detach(domid)
                con = None
            if con is None and wanted and keys is not None:
                await self._attach(domid, keys)

    # -- one console -------------------------------------------------------------

    async def _attach(self, domid: int, keys: dict[str, bytes]) -> None:
        port = int(keys["port"])
        mapping: GrantMapping | None = None
        try:
            (mapping,) = await self.dom.map_grants(domid, [GNTTAB_RESERVED_CONSOLE])
            assert mapping.view is not None
            rings = console_backend(mapping.view)
            local = await self.dom.bind_interdomain(domid, port)
        except Exception as e:
            log.warning("domain %d: cannot reach its console (grant %d, port %d): %s",
                        domid, GNTTAB_RESERVED_CONSOLE, port, e)
            if mapping is not None:
                with contextlib.suppress(Exception):
                    await self.dom.unmap_grants([mapping])
            return
        master, slave = os.openpty()
        tty.setraw(slave, termios.TCSANOW)
        os.set_blocking(master, False)
        name = keys["name"].decode(errors="replace") or f"d{domid}"
        limit = int(keys["limit"]) if keys["limit"].isdigit() else DEFAULT_LIMIT
        con = Console(domid, name, local, port, mapping, rings, OutputBuffer(limit), master, slave, os.ttyname(slave))
        if self.log_dir is not None:
            con.logfile = TimestampedLog(self.log_dir / f"guest-{name}.log")
        self.consoles[domid] = con
        self.dom.set_handler(local, lambda _p: self._kicked(con))
        self._read_pty(con, True)
        await self.xs.write(f"/local/domain/{domid}/console/tty", con.tty)
        log.info("domain %d (%s): console on %s", domid, name, con.tty)
        self._kicked(con)

    async def _detach(self, domid: int) -> None:
        con = self.consoles.pop(domid, None)
        if con is None:
            return
        self._read_pty(con, False)
        self._write_pty(con, False)
        with contextlib.suppress(Exception):
            self.dom.set_handler(con.port, None)
            await self.dom.close_port(con.port)
        with contextlib.suppress(Exception):
            await self.dom.unmap_grants([con.mapping])
        os.close(con.master)
        os.close(con.slave)
        if con.logfile is not None:
            con.logfile.close()

    def _domain_dead(self, domid: int) -> None:
        if domid in self.consoles:
            self.consoles[domid].broken = "dead"
            self._spawn(self._detach(domid))

    # T:920 Consoles: a guest never waits for its reader
    # A Xen guest's console is a 2 KiB output ring and a 1 KiB input ring in a page it
    # granted at reference 0.  xenconsoled's rule is kept: every kick empties the output
    # ring into the console's buffer, whether or not anyone reads the pty, so the guest
    # never blocks; a buffer past its `limit` loses its oldest bytes, counted.  Input
    # moves the other way only while the guest's input ring has room.
    # :T
    def _kicked(self, con: Console) -> None:
        """The guest wrote output or consumed input: drain, flush, feed."""
        if con.broken:
            return
        try:
            taken = 0
            while taken < DRAIN_PER_KICK and (data := con.rings.rx.read()):
                taken += len(data)
                con.statistics["out"] += len(data)
                con.buffer.append(data)
                if con.logfile is not None:
                    con.logfile.write(data)
            if taken:
                self.dom.notify(con.port)  # room in its output ring
            if taken >= DRAIN_PER_KICK:  # a flood: the rest on the next turn
                asyncio.get_running_loop().call_soon(self._kicked, con)
            self._flush_pty(con)
            self._read_pty(con, con.rings.tx.writable() > 0)
        except RingBroken as e:
            log.warning("domain %d broke its console ring: %s", con.domid, e)
            con.broken = str(e)
            self._read_pty(con, False)

    def _flush_pty(self, con: Console) -> None:
        if con.buffer.data:
            try:
                n = os.write(con.master, con.buffer.data)
            except BlockingIOError:
                n = 0
            except OSError:
                n = len(con.buffer.data)  # the pty is gone: nothing to keep it for
            del con.buffer.data[:n]
        self._write_pty(con, bool(con.buffer.data))

    def _pty_readable(self, con: Console) -> None:
        room = con.rings.tx.writable()
        if room <= 0:
            self._read_pty(con, False)
            return
        try:
            data = os.read(con.master, room)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if data:
            con.statistics["in"] += con.rings.tx.write(data)
            self.dom.notify(con.port)

    def _read_pty(self, con: Console, on: bool) -> None:
        loop = asyncio.get_running_loop()
        if on and not con.reading_pty:
            loop.add_reader(con.master, self._pty_readable, con)
        elif not on and con.reading_pty:
            loop.remove_reader(con.master)
        con.reading_pty = on

    def _write_pty(self, con: Console, on: bool) -> None:
        loop = asyncio.get_running_loop()
        if on and not con.writing_pty:
            loop.add_writer(con.master, self._flush_pty, con)
        elif not on and con.writing_pty:
            loop.remove_writer(con.master)
        con.writing_pty = on

    # -- the end -----------------------------------------------------------------

    def statistics(self) -> dict[str, dict[str, int]]:
        return {c.name: {**c.statistics, "buffered": len(c.buffer.data), "discarded": c.buffer.discarded}
                for c in self.consoles.values()}

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for domid in list(self.consoles):
            await self._detach(domid)


async def serve(xenstored: str, hypervisor: str, domid: int | None, log_dir: Path | None,
                ready: asyncio.Event | None = None) -> None:
    """Run the daemon until cancelled: a domain of the hypervisor, a dom0 XenStore client."""
    from pvio.xenstore.daemon_ring import connect_as_domain

    dom = await connect_as_domain(hypervisor, domid, name="xenconsoled")
    xs = await AsyncClient.open(xenstored, reconnect=True)
    daemon = ConsoleDaemon(xs, dom, log_dir)
    try:
        await daemon.start()
        await daemon.scan()
        if ready is not None:
            ready.set()
        await asyncio.Event().wait()
    finally:
        await daemon.close()
        await xs.close()
        await dom.close()


def _command() -> object:
    import signal

    import click

    @click.command("xenconsoled")
    @click.option("--xenstored", required=True, type=click.Path(dir_okay=False),
                  help="xenstored's socket (XENSTORED_PATH).")
    @click.option("--hypervisor", required=True, type=click.Path(dir_okay=False), help="The hypervisor's socket.")
    @click.option("--domid", type=int, default=None, help="The domid to be (the one guests grant their console page to).")
    @click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Also append each guest's output to DIR/guest-NAME.log, each line timestamped.")
    def xenconsoled(xenstored: str, hypervisor: str, domid: int | None, log_dir: Path | None) -> None:
        """Serve Xen-style guests' consoles on ptys, as Xen's xenconsoled does."""
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)

        async def main() -> None:
            task = asyncio.current_task()
            assert task is not None
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(sig, task.cancel)
            ready = asyncio.Event()
            waiter = asyncio.ensure_future(ready.wait())
            waiter.add_done_callback(lambda _: click.echo("xenconsoled: serving consoles", err=True))
            with contextlib.suppress(asyncio.CancelledError):
                await serve(xenstored, hypervisor, domid, log_dir, ready)

        asyncio.run(main())

    return xenconsoled


xenconsoled = _command()
