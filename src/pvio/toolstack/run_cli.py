"""`pvio run --domid N -- PROGRAM ARGS...`: run any program as a domain of a running `pvio up`.

Theory of operation
-------------------
The program is unmodified and linked against Xen's own libraries (libxenevtchn,
libxengnttab, libxenstore, libxenvchan, ...).  It becomes pvio domain N with what a
toolstack gives a domain on Xen:

- devices: native/'s `libpvio-xen.so` is preloaded (LD_PRELOAD, before any the caller
  set), and PVIO_HYPERVISOR_SOCKET, PVIO_DOMID, PVIO_TRANSPORT and PVIO_NAME tell it
  which hypervisor and which domain; the layer connects at the program's first open of
  /dev/xen/*, and the hypervisor's domain N is that connection: it ends with the
  process, and every grant, mapping and port with it;
- XenStore: like libxl, `pvio run` INTRODUCEs domain N and writes its directory
  (/local/domain/N with its own data/ and friends, `xslayout.domain_add`); then it
  serves a private socket (XENSTORED_PATH, in a 0700 directory) on which every
  connection the program makes is relayed to a xenstored connection attached as
  domain N.  The program never claims its identity, and sees exactly domain N's
  permissions;
- at exit, its XenStore directory is removed and the domain released (@releaseDomain
  fires for the watchers, as on Xen), and the program's exit status is `pvio run`'s
  (128 + the signal if a signal ended it).  SIGINT and SIGTERM are passed to it.

Two programs run this way are two domains: they grant each other pages, map them and
bind event channels across, exactly as two Xen domains do, and every check is the
hypervisor's.

Deliberately not here: several processes as one domain (a domain is one connection to
the hypervisor: a second process of the same domain that opens a device is refused
with EEXIST), and domid 0 (the driver domain of `pvio up`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from pvio.toolstack import xslayout
from pvio.toolstack.paths import StatePaths, default_state_dir
from pvio.toolstack.status import load_up_status

if TYPE_CHECKING:
    from pvio.xenstore.client import AsyncClient

#: Where the device layer is built (tools/install.sh: make -C native).
NATIVE_BUILD = Path(__file__).resolve().parents[3] / "native" / "build"


def preload_library() -> Path:
    """The device layer: $PVIO_XEN_PRELOAD, else native/build/libpvio-xen.so of this checkout."""
    given = os.environ.get("PVIO_XEN_PRELOAD")
    lib = Path(given) if given else NATIVE_BUILD / "libpvio-xen.so"
    if not lib.is_file():
        raise click.ClickException(f"the /dev/xen device layer is not built: {lib} is missing "
                                   "(run `make -C native` or `bash tools/install.sh`)")
    return lib


def domain_environment(env: dict[str, str], paths: StatePaths, domid: int, transport: str, name: str,
                       lib: Path, xenstored_path: str) -> dict[str, str]:
    """`env` as the program sees it when it is domain `domid`.

    The layer is preloaded before anything the caller preloads, except a sanitizer's
    runtime (ASan, UBSan, TSan), which must come first of all."""
    given = env.get("LD_PRELOAD", "").replace(":", " ").split()
    runtimes = [p for p in given if Path(p).name.startswith(("libasan", "libubsan", "libtsan"))]
    preload = " ".join([*runtimes, str(lib), *(p for p in given if p not in runtimes)])
    return env | {
        "LD_PRELOAD": preload,
        "PVIO_HYPERVISOR_SOCKET": str(paths.hypervisor_socket),
        "PVIO_DOMID": str(domid),
        "PVIO_TRANSPORT": transport,
        "PVIO_NAME": name,
        "XENSTORED_PATH": xenstored_path,
    }


class XenStoreRelay:
    """A private socket whose connections are relayed to xenstored as domain `domid`."""

    def __init__(self, control: Path, domid: int, path: Path) -> None:
        self.control = control
        self.domid = domid
        self.path = path
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._accepted, path=str(self.path))
        os.chmod(self.path, 0o600)

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        from pvio.xenstore.daemon import attach_domain

        try:
            sock = await asyncio.to_thread(attach_domain, self.control, self.domid)
        except Exception as e:  # xenstored gone or refusing: the client sees a closed socket
            print(f"pvio run: cannot attach a XenStore connection for d{self.domid}: {e}", file=sys.stderr)
            writer.close()
            return
        xs_reader, xs_writer = await asyncio.open_unix_connection(sock=sock)
        both = [asyncio.create_task(_pump(reader, xs_writer)), asyncio.create_task(_pump(xs_reader, writer))]
        for t in both:
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)
        await asyncio.wait(both, return_when=asyncio.FIRST_COMPLETED)
        for t in both:
            t.cancel()
        for w in (writer, xs_writer):
            w.close()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for t in list(self._tasks):
            t.cancel()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


def _domain_in_use(status: dict[str, Any], domid: int) -> str:
    for d in status.get("domains") or []:
        if isinstance(d, dict) and d.get("domid") == domid:
            return str(d.get("name"))
    return ""


async def run_domain(paths: StatePaths, domid: int, transport: str, name: str, argv: list[str]) -> int:
    """Make domain `domid`, run `argv` as it, release it; the program's exit status."""
    from pvio.xenstore.client import AsyncClient
    from pvio.xenstore.errors import XsError

    lib = preload_library()
    xs = await AsyncClient.open(str(paths.xenstored_socket))
    try:
        with contextlib.suppress(XsError):
            await xs.read(f"/local/domain/{domid}/name")
            raise click.ClickException(f"domain {domid} exists already (/local/domain/{domid})")
        await xs.introduce(domid)
        try:
            await xs.transact(lambda tx: _write_domain(xs, tx, domid, name))
            with tempfile.TemporaryDirectory(prefix=f"pvio-run-d{domid}-") as tmp:
                relay = XenStoreRelay(paths.xenstored_control, domid, Path(tmp) / "xenstored.sock")
                await relay.start()
                try:
                    env = domain_environment(dict(os.environ), paths, domid, transport, name, lib, str(relay.path))
                    return await _run_program(argv, env)
                finally:
                    await relay.close()
        finally:
            with contextlib.suppress(Exception):
                await xs.rm(f"/local/domain/{domid}")
            with contextlib.suppress(Exception):
                await xs.release(domid)
    finally:
        await xs.close()


async def _write_domain(xs: AsyncClient, tx: int, domid: int, name: str) -> None:
    for op in xslayout.domain_add(domid, name):
        if op.op == "mkdir":
            await xs.mkdir(op.path, tx)
        elif op.op == "write":
            await xs.write(op.path, op.value, tx)
        elif op.op == "set_perms":
            await xs.set_perms(op.path, list(op.perms), tx)


async def _run_program(argv: list[str], env: dict[str, str]) -> int:
    try:
        proc = await asyncio.create_subprocess_exec(*argv, env=env)
    except OSError as e:
        raise click.ClickException(f"cannot run {argv[0]}: {e.strerror}") from None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, proc.send_signal, sig)
    try:
        code = await proc.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 128 - code if code < 0 else code


@click.command("run", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The running pvio up's state directory (default: as pvio up's).")
@click.option("--domid", type=click.IntRange(1, 0x7FEF), required=True, help="The domain id the program runs as.")
@click.option("--transport", type=click.Choice(["map", "copy"]), default="copy", show_default=True,
              help="copy: the program never holds another domain's memory; map: it may map granted frames live.")
@click.option("--name", default=None, help="The domain's name (default: the program's).")
@click.argument("argv", nargs=-1, required=True, type=click.UNPROCESSED)
def run(state_dir: Path | None, domid: int, transport: str, name: str | None, argv: tuple[str, ...]) -> None:
    """Run PROGRAM as a Xen domain of a running `pvio up`: pvio run --domid N -- PROGRAM ARGS...

    The program's /dev/xen devices and XenStore connection are domain N's; its exit
    status is this command's.
    """
    paths = StatePaths((state_dir or default_state_dir()).resolve())
    status = load_up_status(paths)
    if not status or not status.get("ready") or not paths.hypervisor_socket.exists():
        raise click.ClickException(f"no running pvio up with state directory {paths.root} (start one, or give --state-dir)")
    taken = _domain_in_use(status, domid)
    if taken:
        raise click.ClickException(f"domid {domid} is pvio up's domain {taken!r}: pick another")
    code = asyncio.run(run_domain(paths, domid, transport, name or Path(argv[0]).name, list(argv)))
    sys.exit(code)
