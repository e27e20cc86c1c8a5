"""`pvio nbd`: serve raw images over NBD, and look at an NBD server's exports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import ssl
from pathlib import Path

import click

from pvio.hypervisor.aio import run
from pvio.nbd.address import NbdAddress
from pvio.nbd.client_asyncio import NbdClient
from pvio.nbd.server_asyncio import DEFAULT_IDLE_TIMEOUT, NbdServer
from pvio.nbd.tls import TlsCredsError, server_context
from pvio.storage.backend import BlockBackend
from pvio.storage.rawfile import RawFile


@click.group()
def nbd() -> None:
    """NBD exports: serve raw images to NBD clients (qemu-img, qemu-io, nbdinfo, fio, nbdfuse)."""


@nbd.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--socket", "socket_path", required=True, type=click.Path(), help="UNIX socket to listen on.")
@click.option(
    "--tcp", "tcp_port", type=click.IntRange(0, 65535), default=None,
    help="Also listen on this TCP port on 127.0.0.1; needs --tls-creds or --tcp-insecure.",
)  # fmt: skip
@click.option(
    "--tls-creds", type=click.Path(file_okay=False), default=None, metavar="DIR",
    help="TLS on the TCP port: ca-cert.pem, server-cert.pem, server-key.pem in DIR (QEMU's x509 "
    "layout); clients need a certificate the CA signed.",
)  # fmt: skip
@click.option(
    "--tcp-insecure", is_flag=True,
    help="TCP without TLS: every local user can read and write the exports.",
)  # fmt: skip
@click.option(
    "--idle-timeout", type=click.FloatRange(0), default=DEFAULT_IDLE_TIMEOUT, show_default=True,
    help="Seconds without a command after which a connection gives its slot to a new client that finds the server or export full (0: never).",
)  # fmt: skip
@click.option("--read-only", "-r", is_flag=True, help="Export read-only.")
@click.option(
    "--name", "names", multiple=True, help="Export name per image (default: the file name); the first is the default export."
)
def serve(
    images: tuple[str, ...],
    socket_path: str,
    tcp_port: int | None,
    tls_creds: str | None,
    tcp_insecure: bool,
    idle_timeout: float,
    read_only: bool,
    names: tuple[str, ...],
) -> None:
    """Serve IMAGES (raw files or block devices) until SIGINT or SIGTERM."""
    if names and len(names) != len(images):
        raise click.UsageError("give one --name per image, or none")
    export_names = list(names) if names else [Path(p).name for p in images]
    if len(set(export_names)) != len(export_names):
        raise click.UsageError("export names must be unique")
    tls = tcp_tls_context(tcp_port is not None, tls_creds, tcp_insecure, "--tcp", "--tls-creds", "--tcp-insecure")
    # on uvloop, as pvio's domains run (`pvio.hypervisor.aio.run`): 4 KiB writes at QD32
    # came 1.12-1.17x the standard loop's IOPS
    run(_serve(images, export_names, socket_path, tcp_port, tls, idle_timeout or None, read_only))


def tcp_tls_context(
    tcp: bool, tls_creds: str | None, insecure: bool, tcp_opt: str, tls_opt: str, insecure_opt: str
) -> ssl.SSLContext | None:
    """The TLS context NBD over TCP is to use (None: plain TCP, which `insecure` allowed).

    TCP needs TLS or an explicit `insecure_opt`: any local user can connect to 127.0.0.1,
    whatever the image's own permissions.  A wrong combination, or credentials that do
    not load, is one line (a `click.ClickException`) naming the option."""
    if not tcp:
        if tls_creds or insecure:
            raise click.ClickException(f"{tls_opt if tls_creds else insecure_opt} is for {tcp_opt} PORT; give that too")
        return None
    if tls_creds and insecure:
        raise click.ClickException(f"give {tls_opt} or {insecure_opt}, not both")
    if not tls_creds:
        if insecure:
            return None
        raise click.ClickException(
            f"{tcp_opt} lets every local user read and write the disk: give {tls_opt} DIR "
            f"(TLS with client certificates), or {insecure_opt} to accept that"
        )
    try:
        return server_context(tls_creds)
    except TlsCredsError as e:
        raise click.ClickException(f"{tls_opt}: {e}") from None


async def _serve(
    images: tuple[str, ...],
    names: list[str],
    socket_path: str,
    tcp_port: int | None,
    tls: ssl.SSLContext | None,
    idle_timeout: float | None,
    read_only: bool,
) -> None:
    backends = [RawFile(p, read_only=read_only) for p in images]
    exports: dict[str, BlockBackend] = dict(zip(names, backends, strict=True))
    server = NbdServer(exports, idle_timeout=idle_timeout)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        path = await server.listen_unix(socket_path)
        click.echo(f"serving {', '.join(names)}")
        for name in names:
            click.echo(f"  {NbdAddress(export=name, socket_path=os.path.abspath(path)).uri()}")
        if tcp_port is not None:
            host, port = await server.listen_tcp("127.0.0.1", tcp_port, tls=tls)
            click.echo(f"  {'nbds' if tls else 'nbd'}://{host}:{port}/{names[0]}")
        await stop.wait()
    finally:
        await server.close()
        for backend in backends:
            with contextlib.suppress(Exception):
                await backend.close()


@nbd.command("list")
@click.argument("uri")
def list_(uri: str) -> None:
    """List the exports of the NBD server at URI (nbd+unix:///?socket=PATH or nbd://HOST:PORT)."""

    async def main() -> list[tuple[str, str]]:
        return await NbdClient.list_exports(uri)

    for name, description in asyncio.run(main()):
        click.echo(f"{name}\t{description}" if description else name)
