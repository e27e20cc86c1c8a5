"""The nbd layer: pvio's NBD export (``pvio nbd serve``) next to qemu-nbd and the file.

`pvio.bench.harness.fio.block_matrix` runs fio's nbd engine against ``pvio nbd serve``
on a raw image, in its own process as a deployment would run it, against ``qemu-nbd -f
raw`` on an identical copy of the image and with io_uring on the file itself, interleaved run by run;
the ratios are pvio / qemu-nbd and pvio / direct.  The quick set has the writes that
the blk layer's quick set leaves out.  This layer has no subcommand: run it with
``pvio bench --only nbd``.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

from pvio.bench.harness import fio
from pvio.bench.harness.benchmark import Benchmark, Context, Params
from pvio.bench.harness.figures import Figure

QUICK_WORKLOADS = ("4k-randread-qd1", "4k-randwrite-qd32", "1m-read-qd8")


def serve_argv(image: Path, sock: Path) -> list[str]:
    return [sys.executable, "-m", "pvio", "nbd", "serve", str(image), "--socket", str(sock)]


@contextlib.contextmanager
def pvio_nbd_server(image: Path, sock: Path) -> Iterator[str]:
    """`pvio nbd serve IMAGE` in its own process; yields the NBD URI."""
    proc = subprocess.Popen(serve_argv(image, sock), stdout=subprocess.DEVNULL)
    try:
        fio.wait_for_socket(sock, proc)
        yield fio.nbd_uri(sock)
    finally:
        fio.stop(proc)


def _suite(params: Params, ctx: Context) -> list[Figure]:
    def server(image: Path, sock: Path) -> contextlib.AbstractContextManager[str]:
        ctx.command(serve_argv(image, sock))
        return pvio_nbd_server(image, sock)

    return fio.block_matrix(ctx, {"pvio nbd export": server},
                            workloads=params["workloads"], runs=int(params["runs"]),
                            runtime=float(params["runtime"]), size=str(params["size"]))


SUITE = Benchmark(
    name="nbd",
    title="pvio's NBD export vs qemu-nbd vs fio on the file (io_uring), fio's nbd engine",
    run=_suite,
    quick={"runs": 1, "runtime": 0.5, "size": "32m", "workloads": list(QUICK_WORKLOADS)},
    full={"runs": 3, "runtime": 4.0, "size": "256m",
          "workloads": [w.name for w in fio.STANDARD_JOBS]},
    tools=("fio", "qemu-nbd"),
)
