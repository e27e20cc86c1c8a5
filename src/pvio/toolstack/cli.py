"""`pvio up` and `pvio list`."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from pvio.domains.lguest_settings import EXPORT_NAME
from pvio.domains.spec import pid_alive, read_status
from pvio.nbd.cli import tcp_tls_context
from pvio.toolstack.config import ConfigError, default_config, from_disk_options, load, xen_vifs
from pvio.toolstack.paths import StatePaths, default_state_dir
from pvio.toolstack.status import load_up_status, merge_guest_disks, merge_guest_vifs
from pvio.toolstack.up import Toolstack, run_up

STATE_DIR_HELP = "Directory for sockets, logs and default images (default: ~/.local/state/pvio)."


class BadInput(click.ClickException):
    """A mistake in what the user gave: one line, exit status 2."""

    exit_code = 2


@click.command()
@click.argument("config_file", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help=STATE_DIR_HELP)
@click.option(
    "--disk",
    "disks",
    multiple=True,
    metavar="SPEC",
    help="A disk in xl's syntax, e.g. 'format=raw, vdev=xvda, access=rw, target=/path/disk.img' (repeatable).",
)
@click.option(
    "--vif",
    "vifs",
    multiple=True,
    help="A network interface in xl's syntax, e.g. 'mac=00:16:3e:00:00:01, bridge=pvbr0, ip=10.0.1.2/24' (repeatable).",
)
@click.option("--nbd-socket", type=click.Path(dir_okay=False), default=None, help="UNIX socket for the first disk's NBD export.")
@click.option(
    "--nbd-tcp",
    type=click.IntRange(1, 65535),
    default=None,
    metavar="PORT",
    help="Also export the disks over TCP on 127.0.0.1, from PORT upwards (one port per disk); "
    "needs --nbd-tls-creds or --nbd-tcp-insecure.",
)
@click.option(
    "--nbd-tls-creds",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="TLS for --nbd-tcp: ca-cert.pem, server-cert.pem, server-key.pem in DIR (QEMU's x509 layout); "
    "clients need a certificate the CA signed.",
)
@click.option("--nbd-tcp-insecure", is_flag=True, help="--nbd-tcp without TLS: every local user can read and write the disks.")
@click.option(
    "--transport",
    type=click.Choice(["map", "copy"]),
    default=None,
    help="How the driver domain reaches guest pages: map (fast, trusted backend) or copy (grant copies only).",
)
@click.option("--xenstore-transport", type=click.Choice(["ring", "socket"]), default="ring", show_default=True,
              help="How Xen-style domains reach XenStore: their shared page and event channel, or a socket.")
@click.option("--xenstored", type=click.Choice(["pvio", "xen"]), default="pvio", show_default=True,
              help="Which XenStore daemon: pvio's, or Xen's own C xenstored (xen-utils-4.17) as the XenStore "
              "domain, through the /dev/xen device layer (Xen-style domains only).")
@click.option("--console-daemon", type=click.Choice(["pvio", "xen"]), default="pvio", show_default=True,
              help="Which daemon serves Xen-style guests' consoles: pvio's, or Xen's own xenconsoled "
              "(xen-utils-4.17), through the /dev/xen device layer.")
def up(
    config_file: Path | None,
    state_dir: Path | None,
    disks: tuple[str, ...],
    vifs: tuple[str, ...],
    nbd_socket: str | None,
    nbd_tcp: int | None,
    nbd_tls_creds: str | None,
    nbd_tcp_insecure: bool,
    transport: str | None,
    xenstore_transport: str,
    xenstored: str,
    console_daemon: str,
) -> None:
    """Run the hypervisor, XenStore, a driver domain and guests; export guest disks over NBD.

    With no arguments: one guest with a 1 GiB sparse raw disk xvda in the state directory,
    exported over NBD.  With --disk: one guest with those disks.  With CONFIG_FILE: the
    domains a TOML file describes (see examples/).  Runs until Ctrl-C or SIGTERM.
    """
    root = (state_dir or default_state_dir()).resolve()
    tcp_tls_context(nbd_tcp is not None, nbd_tls_creds, nbd_tcp_insecure, "--nbd-tcp", "--nbd-tls-creds", "--nbd-tcp-insecure")
    try:
        if config_file and (disks or vifs):
            raise ConfigError("give a CONFIG_FILE or --disk/--vif options, not both")
        if config_file:
            config = load(config_file, root)
        elif disks:
            config = from_disk_options(list(disks), root, vifs=list(vifs))
        else:
            config = default_config(root)
            config.domains[0].vifs = xen_vifs(list(vifs), "--vif")
    except ConfigError as e:
        raise BadInput(str(e)) from None
    if transport:
        config.transport = transport
    tls_creds = str(Path(nbd_tls_creds).resolve()) if nbd_tls_creds else ""
    toolstack = Toolstack(config, StatePaths(root), nbd_socket=nbd_socket, nbd_tcp=nbd_tcp or 0, nbd_tls_creds=tls_creds,
                          xenstore_transport=xenstore_transport, xenstored=xenstored,
                          console_daemon=console_daemon)
    sys.exit(asyncio.run(run_up(toolstack)))


@click.command(name="list")
@click.option("--state-dir", type=click.Path(file_okay=False, path_type=Path), default=None, help=STATE_DIR_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_(state_dir: Path | None, as_json: bool) -> None:
    """Show the running domains, like `xl list`, with their devices and NBD URIs."""
    paths = StatePaths((state_dir or default_state_dir()).resolve())
    status = load_up_status(paths)
    if status is None or not pid_alive(status.get("pid")):
        if as_json:
            click.echo(json.dumps({"running": False, "domains": []}))
            return
        raise click.ClickException(f"no pvio up is running with state directory {paths.root}")
    kinds = {"console": "console", "lguest-block": "block", "lguest-net": "net"}
    for d in status["domains"]:
        if d.get("state") == "running" and not pid_alive(d.get("pid")):
            d["state"] = "dead"
        merge_guest_disks(paths, d)  # a Xen guest's disks attached or detached since
        if d.get("role") == "lguest-guest":  # what was unplugged since, as its Launcher says
            launcher = read_status(paths.status(f"{d['name']}-launcher")) or {}
            gone = set(launcher.get("stats", {}).get("removed", []))
            d["devices"] = [dev for dev in d["devices"] if kinds.get(dev["type"]) not in gone]
            d["unplugged"] = sorted(gone)
        merge_guest_vifs(paths, d)  # the vifs it serves now, as its status file says
    if as_json:
        click.echo(json.dumps({"running": True} | status, indent=2))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"pvio domains ({paths.root})")
    for col in ("Name", "ID", "PID", "Role", "State", "Devices"):
        table.add_column(col)
    for d in status["domains"]:
        devices = []
        for dev in d["devices"]:
            if dev["type"] == "vbd":
                devices.append(f"{dev['vdev']} {dev['mode']} {dev['nbd']}"
                               + (" (attached at run time)" if dev.get("attached") else ""))
                if dev.get("nbd_tcp"):
                    devices.append(f"     {dev['nbd_tcp']}")
            elif dev["type"] == "lguest-block":
                devices.append(f"{EXPORT_NAME} {dev['nbd']}")
            elif dev["type"] == "vif":
                queues = f" queues {dev['queues']}" if dev.get("queues", 1) > 1 else ""
                devices.append(f"vif {dev['ifname']} {dev['mac']} {dev['ip'] or '-'} bridge {dev['bridge']} "
                               f"netns {dev['netns']}{queues}"
                               + (" (attached at run time)" if dev.get("attached") else ""))
            elif dev["type"] == "lguest-net":
                devices.append(f"net {dev['address']} netns {dev['netns']}")
            elif dev["type"] == "console":
                devices.append("console")
        devices += [f"({kind} unplugged)" for kind in d.get("unplugged", [])]
        devices += [f"({kind} failed: {why})" for kind, why in d.get("failed", {}).items()]
        table.add_row(d["name"], str(d["domid"]), str(d["pid"]), d["role"], d["state"], "\n".join(devices))
    from pvio.toolstack.qdisk import table_rows

    for row in table_rows(status):  # each guest's QEMU, if it has qdisks
        table.add_row(*row)
    Console(width=200 if not sys.stdout.isatty() else None).print(table)
    click.echo(f"XENSTORED_PATH={status['xenstored_path']}")

