"""The block matrix: fio workloads against pvio's NBD servers, qemu-nbd, and the file itself.

Theory of operation
-------------------
A user who wants a disk served over NBD would otherwise run ``qemu-nbd`` on the image,
and no server at all beats reading the file directly.  `block_matrix` therefore measures,
for each fio workload (4 KiB random read and write at queue depth 1 and 32, 64 KiB and
1 MiB sequential read and write) and in the same run, interleaved:

- each of pvio's servers given by the caller (the NBD export today; ``pvio up`` in map
  and in copy mode once the block driver lands), through fio's nbd engine;
- ``qemu-nbd -f raw`` on the same image, through fio's nbd engine (the peer);
- fio on the image file itself with the io_uring engine (the limit on this machine).

Every server and the direct job go through the page cache (qemu-nbd's default
writeback cache, pvio's buffered pread/pwrite, fio without ``--direct``), so the ratios
compare the cost of serving, not of the disk: ratio pvio / qemu-nbd and pvio / direct.
The image is prefilled once with a sequential write so that reads find data.

It reuses the NBD helper `pvio.bench.fio_nbd` (the fio command for the nbd engine, the
JSON parser, and the context managers that start ``pvio nbd serve`` and ``qemu-nbd``):
imported at run time, since it lives with the NBD export.  This module adds only the
direct io_uring job, the matrix and the conversion into suite figures.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from pvio.bench.fio_nbd import STANDARD_JOBS
from pvio.bench.suite import Context, Figure, compare

HELPER = "pvio.bench.fio_nbd"

QEMU_NBD = "qemu-nbd"
DIRECT = "direct (io_uring)"

#: A server under test: given the image and a socket path, a context manager yielding the
#: NBD URI it serves the image at.
Server = Callable[[Path, Path], contextlib.AbstractContextManager[str]]


#: The issue's workloads, in this order in the table and plots: fio_nbd's standard jobs,
#: declared there once.
WORKLOADS = STANDARD_JOBS
QUICK_WORKLOADS = ("4k-randread-qd1", "4k-randwrite-qd32", "1m-read-qd8")


def helper() -> ModuleType:
    return importlib.import_module(HELPER)


def helper_missing() -> str | None:
    """Why the block matrix cannot run on this build, or None."""
    try:
        helper()
    except ModuleNotFoundError:
        return f"{HELPER} (the NBD export's fio helper) is not built yet"
    return None


def direct_command(image: Path, job: Any) -> list[str]:
    """fio on the file itself with io_uring; the same job options as the nbd engine's."""
    nbd = helper().fio_command("URI", job)
    argv = [a for a in nbd if a != "--ioengine=nbd" and not a.startswith("--uri=")]
    return [argv[0], "--ioengine=io_uring", f"--filename={image}", *argv[1:]]


def _run(ctx: Context, argv: Sequence[str], timeout: float) -> Any:
    cmd = ctx.command(argv)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return helper().parse_fio_json(proc.stdout)


@contextlib.contextmanager
def _serving(servers: dict[str, Server], image: Path, workdir: Path) -> Iterator[dict[str, str]]:
    with contextlib.ExitStack() as stack:
        uris = {}
        for i, (subject, server) in enumerate(servers.items()):
            uris[subject] = stack.enter_context(server(image, workdir / f"nbd{i}.sock"))
        yield uris


def block_matrix(ctx: Context, servers: dict[str, Server], *, workloads: Sequence[str],
                 runs: int, runtime: float, size: str,
                 after_run: Callable[[str, str], None] | None = None) -> list[Figure]:
    """IOPS and MiB/s per workload for pvio's `servers`, qemu-nbd and direct io_uring.

    `after_run(subject, workload)`, if given, is called after each fio run (the block
    benchmark reads pvio's per-request counters there)."""
    fio_nbd = helper()
    image = ctx.workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(fio_nbd._size_bytes(size))
    prefill = fio_nbd.FioJob("prefill", "write", "1m", 8, runtime=0, size=size)
    argv = [a for a in direct_command(image, prefill) if a != "--time_based"]
    ctx.progress(f"prefilling a {size} image")
    _run(ctx, argv, timeout=300)
    def qemu(image: Path, sock: Path) -> contextlib.AbstractContextManager[str]:
        ctx.command(["qemu-nbd", "-f", "raw", "--persistent", "--shared=16",
                     f"--socket={sock}", str(image)])  # as fio_nbd.qemu_nbd_server runs it
        return fio_nbd.qemu_nbd_server(image, sock)  # type: ignore[no-any-return]

    everyone: dict[str, Server] = {**servers, QEMU_NBD: qemu}
    figures: list[Figure] = []
    by_name = {w.name: w for w in WORKLOADS}
    with _serving(everyone, image, ctx.workdir) as uris:
        for subject, uri in uris.items():  # the exact server commands are not ours to see
            ctx.extra.setdefault("servers", {})[subject] = uri
        for name in workloads:
            w = by_name[name]
            job = dataclasses.replace(w, runtime=runtime, size=size)
            ctx.progress(f"{w.name}: {runs} runs of {len(uris) + 1} subjects")
            iops: dict[str, list[float]] = {s: [] for s in [*uris, DIRECT]}
            mibs: dict[str, list[float]] = {s: [] for s in iops}
            for _ in range(runs):  # interleaved, so drift hits every subject alike
                for subject in iops:
                    cmd = (direct_command(image, job) if subject == DIRECT
                           else fio_nbd.fio_command(uris[subject], job))
                    r = _run(ctx, cmd, timeout=runtime * 4 + 60)
                    iops[subject].append(r.iops)
                    mibs[subject].append(r.bw_bytes / (1 << 20))
                    if after_run is not None:
                        after_run(subject, w.name)
            for subject in servers:
                others = [s for s in iops if s not in servers]
                figures.append(compare(w.name, "IOPS", {subject: iops[subject],
                                                        **{o: iops[o] for o in others}}))
                figures.append(compare(w.name, "MiB/s", {subject: mibs[subject],
                                                         **{o: mibs[o] for o in others}}))
    figures.sort(key=lambda f: f.unit != "IOPS")  # IOPS panel first, as the table reads
    return figures
