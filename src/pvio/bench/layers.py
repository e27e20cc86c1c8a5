"""Suite adapters for layers whose benchmark module does not define ``SUITE`` itself.

`pvio.bench.suite.load_benchmark` looks here when a layer's module has no ``SUITE`` (or
the layer has no subcommand, as the NBD export's helper).  An adapter calls the layer's
own measuring functions and turns their numbers into figures; it never re-implements a
measurement, and it skips itself ("not built yet") while the layer's module is absent.
When a layer defines its own ``SUITE``, its adapter here is no longer used: delete it.

What each layer's own ``SUITE`` should do better than its adapter here:

- lguest: uses the private ``_network`` and ``_block``, once per run, to get samples;
  a ``SUITE`` in `pvio.bench.lguest` should return them directly.
"""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Callable
from typing import Any

from pvio.bench import block
from pvio.bench.suite import Benchmark, Context, Figure, Params, compare


def _absent(module: str, layer: str) -> Callable[[], str | None]:
    def check() -> str | None:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as exc:
            if exc.name is not None and module.startswith(exc.name):
                return f"pvio bench {layer} is not built yet"
            raise
        return None

    return check


# -- lguest ----------------------------------------------------------------------------------


def _lguest(params: Params, ctx: Context) -> list[Figure]:
    lg: Any = importlib.import_module("pvio.bench.lguest")
    runs, seconds = int(params["runs"]), float(params["seconds"])
    ctx.command(["ip", "netns", "exec", "<client>", "iperf3", "-c", "10.0.0.2", "-p", "5201",
                 "-t", str(seconds), "-J"])
    ctx.command(["ip", "netns", "exec", "<client>", "ping", "-q", "-c", "20", "-i", "0.01",
                 "-W", "2", "10.0.0.2"])
    samples: dict[str, dict[str, list[float]]] = {}
    units: dict[str, str] = {}
    for i in range(runs):  # one run each time, so that every run is a sample
        ctx.progress(f"run {i + 1} of {runs}: TCP and ping, lguest LAN and veth")
        rows = asyncio.run(lg._network(seconds, 1)) + lg._block(seconds, 1)
        for row in rows:
            units[row.scenario] = row.unit
            per = samples.setdefault(row.scenario, {"pvio": [], "baseline": []})
            per["pvio"].append(row.pvio)
            per["baseline"].append(row.baseline)
    labels = {"TCP": "veth pair", "ping": "veth pair", "block": "os.pread"}
    figures = []
    for scenario, per in samples.items():
        label = next((v for k, v in labels.items() if scenario.startswith(k)), "baseline")
        unit = "µs" if units[scenario] == "us" else units[scenario]
        figures.append(compare(scenario, unit, {"pvio": per["pvio"], label: per["baseline"]},
                               higher_is_better=unit != "µs"))
    return figures


LGUEST = Benchmark(
    name="lguest",
    title="lguest LAN (iperf3, ping) vs a veth pair; lguest block reads vs pread",
    run=_lguest,
    quick={"runs": 2, "seconds": 1.0},
    full={"runs": 3, "seconds": 3.0},
    tools=("iperf3", "ping", "ip"),
    needs_root=True,
    requires=_absent("pvio.bench.lguest", "lguest"),
)


# -- the NBD export (until pvio bench blk measures pvio up end to end) -------------------------


def _nbd(params: Params, ctx: Context) -> list[Figure]:
    fio_nbd: Any = block.helper()

    def server(image: Any, sock: Any) -> Any:
        ctx.command([sys.executable, "-m", "pvio", "nbd", "serve", str(image), "--socket",
                     str(sock)])
        return fio_nbd.pvio_nbd_server(image, sock)

    return block.block_matrix(ctx, {"pvio nbd export": server},
                              workloads=params["workloads"], runs=int(params["runs"]),
                              runtime=float(params["runtime"]), size=str(params["size"]))


NBD = Benchmark(
    name="nbd",
    title="pvio's NBD export vs qemu-nbd vs fio on the file (io_uring), fio's nbd engine",
    run=_nbd,
    quick={"runs": 2, "runtime": 1.0, "size": "64m", "workloads": list(block.QUICK_WORKLOADS)},
    full={"runs": 3, "runtime": 4.0, "size": "256m",
          "workloads": [w.name for w in block.WORKLOADS]},
    tools=("fio", "qemu-nbd"),
    requires=block.helper_missing,
)


#: layer name -> adapter.
ADAPTERS: dict[str, Benchmark] = {b.name: b for b in (NBD, LGUEST)}
