"""The layers `pvio bench` measures, named by module, and the benchmarks added at run time.

The harness never imports a layer at import time: `LAYERS` names each layer's module as
a string, and `load_benchmark` imports it only when that layer is about to run (or `pvio
bench <layer>` is asked for).  Layers import the harness, never the reverse, so the
bench package's imports go one way.  A layer's module defines ``SUITE`` (a `Benchmark`)
and, when it has a subcommand, a click command named as the layer.

`register` adds a benchmark for this process only: tests add fakes, and a layer's
subcommand registers a variant of its ``SUITE`` with the user's options.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from pvio.bench.harness.benchmark import Benchmark


@dataclass(frozen=True)
class Layer:
    module: str  # defines SUITE, and the click command named as the layer if `help` is set
    help: str = ""  # one line for `pvio bench --help`; "": no subcommand (use --only)


#: The layers of the full matrix, in the order the data flows.
LAYERS: dict[str, Layer] = {
    "ring": Layer("pvio.bench.ring", "Round trips/s through an io/ring.h front/back pair."),
    "hypervisor": Layer("pvio.bench.hypervisor",
                        "Hypercalls, batched grant maps, copies, event latency."),
    "xenstore": Layer("pvio.bench.xenstore", "XenStore latency vs a UNIX-socket echo."),
    "blk": Layer("pvio.bench.blk", "fio through pvio up (map, copy) vs qemu-nbd vs io_uring."),
    "nbd": Layer("pvio.bench.nbd"),
    "net": Layer("pvio.bench.net", "TCP/ping between Xen guests' vifs on a bridge vs veth."),
    "lguest": Layer("pvio.bench.lguest", "TCP/ping across the lguest LAN vs veth; block IOPS."),
    "trace": Layer("pvio.bench.trace", "fio IOPS through pvio up, tracing never on / off / on."),
}

MATRIX: tuple[str, ...] = tuple(LAYERS)

#: Benchmarks registered in this process; they take the place of a layer of the same name,
#: and the others run after MATRIX.
_REGISTERED: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    _REGISTERED[benchmark.name] = benchmark
    return benchmark


def unregister(name: str) -> None:
    _REGISTERED.pop(name, None)


def known_names() -> list[str]:
    return [*MATRIX, *(n for n in _REGISTERED if n not in MATRIX)]


def load_benchmark(name: str) -> Benchmark:
    """The benchmark called `name`: registered in this process, else its layer's SUITE.
    A layer whose module does not import, or defines no SUITE, is a bug: it raises."""
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in LAYERS:
        raise ValueError(f"no benchmark called {name!r}; known: {', '.join(known_names())}")
    module = importlib.import_module(LAYERS[name].module)
    suite = getattr(module, "SUITE", None)
    if not isinstance(suite, Benchmark):
        raise TypeError(f"{LAYERS[name].module}.SUITE is not a "
                        "pvio.bench.harness.benchmark.Benchmark")
    return suite
