"""The servers `pvio bench xenstore` starts: pvio's xenstored on a `pvio hypervisor`, the
asyncio echo, and Xen's C xenstored on a hypervisor of its own.

Theory of operation
-------------------
Each server is a process of its own, started by `serve`, which returns once the server
answers on its socket (or raises with the server's log if it died or never answered)
and stops it at the end (`harness.fio.stop`: SIGTERM, then SIGKILL past 10 s).

Xen's xenstored (Debian's xen-utils-4.17, unmodified) runs exactly as `pvio up
--xenstored xen` runs it (`pvio.toolstack.xen_daemons.xen_xenstored_argv`): the /dev/xen
device layer preloaded, the XenStore domain of its hypervisor (domid
`XENSTORED_DOMID`), listening on the state directory's XenStore socket.  It gets a
hypervisor of its own because pvio's xenstored is that same domid on the other one.
`xen_missing` says why it cannot run here (not installed, the device layer not built):
the bench then measures without it and says so.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import click

from pvio.bench.harness.fio import stop
from pvio.toolstack.children import UpError
from pvio.toolstack.paths import StatePaths
from pvio.toolstack.run_cli import preload_library
from pvio.toolstack.xen_daemons import xen_binary, xen_xenstored_argv
from pvio.toolstack.xenpages import XENSTORED_DOMID

ECHO_SERVER = """
import asyncio, sys
class Echo(asyncio.Protocol):
    def connection_made(self, t): self.t = t
    def data_received(self, d): self.t.write(d)
async def main():
    await asyncio.get_running_loop().create_unix_server(Echo, path=sys.argv[1])
    await asyncio.Event().wait()
asyncio.run(main())
"""


def _answers(path: Path, kind: int) -> bool:
    with socket.socket(socket.AF_UNIX, kind) as s:
        try:
            s.connect(str(path))
        except OSError:
            return False
        return True


@contextlib.contextmanager
def serve(argv: list[str], path: Path, log: Path, kind: int = socket.SOCK_STREAM,
          timeout: float = 20.0) -> Iterator[subprocess.Popen[bytes]]:
    """`argv` running, once it answers on `path`; its output goes to `log`."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while not _answers(path, kind):
            if proc.poll() is not None or time.monotonic() > deadline:
                raise click.ClickException(f"{argv[0]} did not start on {path}:\n{log.read_text()[-2000:]}")
            time.sleep(0.02)
        yield proc
    finally:
        stop(proc)


def hypervisor(path: Path, log: Path) -> contextlib.AbstractContextManager[subprocess.Popen[bytes]]:
    """`pvio hypervisor` on `path`."""
    return serve([sys.executable, "-m", "pvio", "hypervisor", "--socket", str(path)], path, log,
                 socket.SOCK_SEQPACKET)


@contextlib.contextmanager
def pvio_servers(tmp: Path) -> Iterator[tuple[Path, Path, Path]]:
    """pvio's hypervisor, its xenstored (a domain of it) and the echo: their sockets."""
    hv, xs, echo = tmp / "hv.sock", tmp / "xs.sock", tmp / "echo.sock"
    with (hypervisor(hv, tmp / "hypervisor.log"),
          serve([sys.executable, "-m", "pvio", "xenstored", "--socket", str(xs), "--hypervisor", str(hv),
                 "--domid", str(XENSTORED_DOMID)], xs, tmp / "xenstored.log"),
          serve([sys.executable, "-c", ECHO_SERVER, str(echo)], echo, tmp / "echo.log")):
        yield hv, xs, echo


def xen_missing() -> str | None:
    """Why Xen's xenstored cannot run here, or None."""
    try:
        xen_binary("xenstored")
        preload_library()
    except (UpError, click.ClickException) as e:
        return str(getattr(e, "message", e))
    return None


@contextlib.contextmanager
def xen_xenstored(root: Path) -> Iterator[StatePaths]:
    """A hypervisor and Xen's xenstored as its XenStore domain, under the state directory
    `root`, as `pvio up --xenstored xen` starts them."""
    paths = StatePaths(root)
    paths.make()
    with (hypervisor(paths.hypervisor_socket, paths.log("hypervisor")),
          serve(xen_xenstored_argv(paths), paths.xenstored_socket, paths.log("xenstored"))):
        yield paths
