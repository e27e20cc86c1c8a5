"""`pvio nbd`: serve raw images over NBD, and look at an NBD server's exports."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path

import click

from pvio.nbd.address import NbdAddress
from pvio.nbd.client_asyncio import NbdClient
from pvio.nbd.server_asyncio import NbdServer
from pvio.storage.backend import BlockBackend
from pvio.storage.rawfile import RawFile


@click.group()
def nbd() -> None:
    """NBD exports: serve raw images to NBD clients (qemu-img, qemu-io, nbdinfo, fio, nbdfuse)."""


@nbd.command()
@click.argument("images", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--socket", "socket_path", required=True, type=click.Path(), help="UNIX socket to listen on.")
@click.option("--tcp", "tcp_port", type=int, default=None, help="Also listen on this TCP port (localhost only).")
@click.option("--read-only", "-r", is_flag=True, help="Export read-only.")
@click.option(
    "--name", "names", multiple=True, help="Export name per image (default: the file name); the first is the default export."
)
def serve(images: tuple[str, ...], socket_path: str, tcp_port: int | None, read_only: bool, names: tuple[str, ...]) -> None:
    """Serve IMAGES (raw files or block devices) until SIGINT or SIGTERM."""
    if names and len(names) != len(images):
        raise click.UsageError("give one --name per image, or none")
    export_names = list(names) if names else [Path(p).name for p in images]
    if len(set(export_names)) != len(export_names):
        raise click.UsageError("export names must be unique")
    asyncio.run(_serve(images, export_names, socket_path, tcp_port, read_only))


async def _serve(
    images: tuple[str, ...], names: list[str], socket_path: str, tcp_port: int | None, read_only: bool
) -> None:
    backends = [RawFile(p, read_only=read_only) for p in images]
    exports: dict[str, BlockBackend] = dict(zip(names, backends, strict=True))
    server = NbdServer(exports)
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
            host, port = await server.listen_tcp("127.0.0.1", tcp_port)
            click.echo(f"  nbd://{host}:{port}/{names[0]}")
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
