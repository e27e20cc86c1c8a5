"""fio against NBD servers: the block matrix that the blk and nbd layers share.

Theory of operation
-------------------
A user who wants a disk served over NBD would otherwise run ``qemu-nbd`` on the image,
and no server at all beats reading the file directly.  `block_matrix` therefore measures,
for each fio workload (`STANDARD_JOBS`: 4 KiB random read and write at queue depth 1 and
32, 64 KiB and 1 MiB sequential read and write) and in the same run, interleaved:

- each of pvio's servers given by the caller (``pvio nbd serve`` for the nbd layer; a
  guest's export through ``pvio up`` in map and in copy mode for the blk layer), through
  fio's nbd engine (``--ioengine=nbd --uri=URI --output-format=json``);
- ``qemu-nbd -f raw`` on an identical copy of the image (servers lock their images), through fio's nbd engine (the peer);
- fio on the image file itself with the io_uring engine (the limit on this machine).

Every server and the direct job go through the page cache (qemu-nbd's default
writeback cache, pvio's buffered pread/pwrite, fio without ``--direct``), so the ratios
compare the cost of serving, not of the disk: ratio pvio / qemu-nbd and pvio / direct.
The image is prefilled once with a sequential write so that reads find data.  The
servers' UNIX sockets live in a short directory of their own under /tmp (a socket's path
is limited to 107 bytes, and qemu-nbd wants it absolute), never under the output folder.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from pvio.bench.harness.benchmark import Context
from pvio.bench.harness.figures import Figure, compare


@dataclass(frozen=True)
class FioJob:
    name: str
    rw: str  # randread, randwrite, read, write
    bs: str
    iodepth: int
    runtime: float = 5.0
    size: str = "256m"


STANDARD_JOBS: tuple[FioJob, ...] = (
    FioJob("4k-randread-qd1", "randread", "4k", 1),
    FioJob("4k-randread-qd32", "randread", "4k", 32),
    FioJob("4k-randwrite-qd1", "randwrite", "4k", 1),
    FioJob("4k-randwrite-qd32", "randwrite", "4k", 32),
    FioJob("64k-read-qd8", "read", "64k", 8),
    FioJob("64k-write-qd8", "write", "64k", 8),
    FioJob("1m-read-qd8", "read", "1m", 8),
    FioJob("1m-write-qd8", "write", "1m", 8),
)


@dataclass(frozen=True)
class FioResult:
    iops: float
    bw_bytes: float  # bytes per second
    lat_mean_us: float
    lat_p99_us: float

    @property
    def bw_mib(self) -> float:
        return self.bw_bytes / (1 << 20)


def fio_command(uri: str, job: FioJob) -> list[str]:
    return [
        "fio",
        f"--name={job.name}",
        "--ioengine=nbd",
        f"--uri={uri}",
        f"--rw={job.rw}",
        f"--bs={job.bs}",
        f"--iodepth={job.iodepth}",
        f"--size={job.size}",
        "--output-format=json",
    ] + (
        # A timed job loops over its region; runtime 0 means one pass over it, untimed.
        # The ramp (not counted) lets a server reach its steady state first: pvio's
        # persistent grants and pools filled, the processes' caches warm.
        [f"--runtime={job.runtime}", "--time_based", f"--ramp_time={ramp_time(job.runtime)}"]
        if job.runtime > 0 else []
    )


def ramp_time(runtime: float) -> float:
    """Seconds fio runs a timed job before it counts: 1 s for runs of 4 s or more, else 0.5."""
    return 1.0 if runtime >= 4 else 0.5


def parse_fio_json(text: str) -> FioResult:
    """The result of a one-job fio run (fio may print warnings before the JSON)."""
    data = json.loads(text[text.index("{") :])
    job = data["jobs"][0]
    if job.get("error"):
        raise RuntimeError(f"fio job failed with error {job['error']}")
    iops = bw = 0.0
    lat_mean = lat_p99 = 0.0
    for direction in ("read", "write"):
        d = job[direction]
        if d["total_ios"] == 0:
            continue
        iops += d["iops"]
        bw += d["bw_bytes"]
        lat_mean = max(lat_mean, d["clat_ns"]["mean"] / 1000)
        pct = d["clat_ns"].get("percentile", {})
        lat_p99 = max(lat_p99, pct.get("99.000000", 0) / 1000)
    return FioResult(iops, bw, lat_mean, lat_p99)


def run_fio(uri: str, job: FioJob, timeout: float | None = None) -> FioResult:
    proc = subprocess.run(
        fio_command(uri, job),
        capture_output=True,
        text=True,
        timeout=timeout or job.runtime * 4 + 30,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"fio {job.name} exited {proc.returncode}: {proc.stderr.strip()}")
    return parse_fio_json(proc.stdout)


def listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not listening(path):  # the file appears a moment before listen()
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.args!r} did not create {path}")
        time.sleep(0.02)


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def qemu_nbd_argv(image: Path, sock: Path) -> list[str]:
    """qemu-nbd as a user would serve a raw image (defaults: writeback cache, thread-pool
    AIO), shared by up to 16 clients."""
    return ["qemu-nbd", "-f", "raw", "--persistent", "--shared=16", f"--socket={sock}",
            str(image)]


@contextlib.contextmanager
def qemu_nbd_server(image: Path, sock: Path) -> Iterator[str]:
    """`qemu_nbd_argv` running; yields the NBD URI."""
    proc = subprocess.Popen(
        qemu_nbd_argv(image, sock),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # "Broken pipe" each time fio hangs up
    )
    try:
        wait_for_socket(sock, proc)
        yield nbd_uri(sock)
    finally:
        stop(proc)


def nbd_uri(sock: Path) -> str:
    """The NBD URI of the default export on a UNIX socket."""
    return f"nbd+unix:///?socket={sock}"


def size_bytes(size: str) -> int:
    """fio's size notation ("64m", "1g", "4096") in bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(size[:-1]) * units[size[-1].lower()] if size[-1].lower() in units else int(size)


# -- the block matrix ----------------------------------------------------------------------

QEMU_NBD = "qemu-nbd"
DIRECT = "direct (io_uring)"

#: A server under test: given the image and a socket path, a context manager yielding the
#: NBD URI it serves the image at.
Server = Callable[[Path, Path], contextlib.AbstractContextManager[str]]


def direct_command(image: Path, job: FioJob) -> list[str]:
    """fio on the file itself with io_uring; the same job options as the nbd engine's."""
    nbd = fio_command("URI", job)
    argv = [a for a in nbd if a != "--ioengine=nbd" and not a.startswith("--uri=")]
    return [argv[0], "--ioengine=io_uring", f"--filename={image}", *argv[1:]]


def _run(ctx: Context, argv: Sequence[str], timeout: float) -> FioResult:
    cmd = ctx.command(argv)
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[0]} exited {proc.returncode}: {proc.stderr.strip()[-300:]}")
    return parse_fio_json(proc.stdout)


@contextlib.contextmanager
def _serving(servers: dict[str, Server], image: Path) -> Iterator[dict[str, str]]:
    """Every server running, each on its own copy of `image`: a server that writes locks
    its image (QEMU and pvio alike), so two cannot share one file."""
    with contextlib.ExitStack() as stack:
        sockets = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pvio-nbd-")))
        uris = {}
        for i, (subject, server) in enumerate(servers.items()):
            copy = image.with_name(f"{image.stem}.{i}{image.suffix}")
            shutil.copyfile(image, copy)
            stack.callback(copy.unlink, missing_ok=True)
            uris[subject] = stack.enter_context(server(copy, sockets / f"nbd{i}.sock"))
        yield uris


def block_matrix(ctx: Context, servers: dict[str, Server], *, workloads: Sequence[str],
                 runs: int, runtime: float, size: str,
                 after_run: Callable[[str, str], None] | None = None) -> list[Figure]:
    """IOPS and MiB/s per workload for pvio's `servers`, qemu-nbd and direct io_uring,
    each on an identical copy of one prefilled image.

    `after_run(subject, workload)`, if given, is called after each fio run (the blk
    layer reads pvio's per-request counters there)."""
    image = ctx.workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(size_bytes(size))
    prefill = FioJob("prefill", "write", "1m", 8, runtime=0, size=size)
    argv = [a for a in direct_command(image, prefill) if a != "--time_based"]
    ctx.progress(f"prefilling a {size} image")
    _run(ctx, argv, timeout=300)

    def qemu(image: Path, sock: Path) -> contextlib.AbstractContextManager[str]:
        ctx.command(qemu_nbd_argv(image, sock))
        return qemu_nbd_server(image, sock)

    everyone: dict[str, Server] = {**servers, QEMU_NBD: qemu}
    figures: list[Figure] = []
    by_name = {w.name: w for w in STANDARD_JOBS}
    with _serving(everyone, image) as uris:
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
                           else fio_command(uris[subject], job))
                    r = _run(ctx, cmd, timeout=runtime * 4 + 60)
                    iops[subject].append(r.iops)
                    mibs[subject].append(r.bw_mib)
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
