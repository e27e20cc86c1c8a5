"""`pvio bench`: one subcommand per layer."""

from __future__ import annotations

import click

from pvio.cli.lazy import LazyGroup

#: name -> ("module:command", one-line help).  Each layer adds its line here.
BENCHMARKS: dict[str, tuple[str, str]] = {
    "ring": ("pvio.bench.ring:ring", "Round trips/s through an io/ring.h front/back pair."),
    "lguest": ("pvio.bench.lguest:lguest", "TCP/ping across the lguest LAN vs veth; block IOPS."),
    "hypervisor": ("pvio.bench.hypervisor:hypervisor", "Hypercalls, batched grant maps, copies, event latency."),
    "xenstore": ("pvio.bench.xenstore:xenstore", "XenStore latency vs a UNIX-socket echo."),
}


@click.group(cls=LazyGroup, lazy=BENCHMARKS)
def bench() -> None:
    """Benchmarks: pvio next to what users would pick instead, as ratios in one run."""
