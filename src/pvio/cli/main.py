"""The `pvio` command: one entry point, subcommands loaded lazily."""

from __future__ import annotations

import click

from pvio import __version__, compiled
from pvio.cli.lazy import LazyGroup

#: name -> ("module:command", one-line help).  Each subsystem adds its line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("pvio.toolstack.cli:up", "Run guests with paravirtual disks exported over NBD (the main job)."),
    "list": ("pvio.toolstack.cli:list_", "Show the running domains, their devices and NBD URIs."),
    "bench": ("pvio.cli.bench:bench", "Benchmarks: pvio next to the tools users would pick instead."),
    "nbd": ("pvio.nbd.cli:nbd", "NBD exports: serve raw images to NBD clients, list a server's exports."),
    "hypervisor": ("pvio.hypervisor.daemon:hypervisor", "Run the hypervisor: domains, grants, event channels, lguest DMA."),
    "console": ("pvio.toolstack.console_cli:console", "Attach the terminal to a guest's console (lguest or Xen-style)."),
    "top": ("pvio.toolstack.top_cli:top", "Show a running pvio up's domains and devices live, as xentop does."),
    "trace": ("pvio.toolstack.trace_cli:trace", "Record a running pvio up's rings, grants and notifies as a Perfetto trace."),
    "unplug": ("pvio.toolstack.unplug_cli:unplug", "Unplug a device from a running guest (lguest's console, block, net; a Xen vif)."),
    "run": ("pvio.toolstack.run_cli:run", "Run a program built on Xen's libraries as a domain of a running pvio up."),
    "xenstored": ("pvio.xenstore.cli:xenstored", "Serve XenStore (xs_wire) on a UNIX socket."),
    "xenconsoled": ("pvio.domains.xenconsoled:xenconsoled", "Serve Xen-style guests' consoles on ptys."),
    "block-attach": ("pvio.toolstack.block_cli:block_attach", "Attach a disk (xl disk spec) to a running Xen guest."),
    "block-detach": ("pvio.toolstack.block_cli:block_detach", "Detach a disk from a running Xen guest."),
    "block-list": ("pvio.toolstack.block_cli:block_list", "List the disks of running Xen guests."),
    "block-resize": ("pvio.toolstack.block_cli:block_resize", "Grow a running Xen guest's disk."),
    "network-attach": ("pvio.toolstack.net_cli:network_attach", "Attach a vif (xl vif spec) to a running Xen guest."),
    "network-detach": ("pvio.toolstack.net_cli:network_detach", "Detach a vif from a running Xen guest."),
    "network-list": ("pvio.toolstack.net_cli:network_list", "List the vifs of running Xen guests."),
}


@click.group(cls=LazyGroup, lazy=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
# The build says how fast the block path runs: compiled, or the Python and why (pvio.compiled)
@click.version_option(__version__, prog_name="pvio",
                      message=f"%(prog)s %(version)s, {compiled.status().describe()}")
def cli() -> None:
    """pvio: paravirtual I/O (Xen split drivers and lguest devices) between Linux processes.

    Start with `pvio up`; the guided tour of the code is TOUR.md.
    """


def main() -> None:
    cli()
