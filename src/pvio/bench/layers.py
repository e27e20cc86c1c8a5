"""Suite adapters for layers whose benchmark module does not define ``SUITE`` itself.

`pvio.bench.suite.load_benchmark` looks here when a layer's module has no ``SUITE`` (or
the layer has no subcommand, as the NBD export's helper).  An adapter calls the layer's
own measuring functions and turns their numbers into figures; it never re-implements a
measurement, and it skips itself ("not built yet") while the layer's module is absent.
When a layer defines its own ``SUITE``, its adapter here is no longer used: delete it.

The NBD export's fio helper has no subcommand of its own, so its adapter stays.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from typing import Any

from pvio.bench import block
from pvio.bench.suite import Benchmark, Context, Figure, Params


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
ADAPTERS: dict[str, Benchmark] = {b.name: b for b in (NBD,)}
