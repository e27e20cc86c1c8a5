"""fio's nbd engine against an NBD URI, and pvio's export next to qemu-nbd on one raw file.

Theory of operation
-------------------
`run_fio(uri, job)` runs one fio job with ``--ioengine=nbd --uri=URI`` and
``--output-format=json`` and returns a `FioResult` (IOPS, bandwidth, mean and p99
completion latency).  `STANDARD_JOBS` are the shapes every block benchmark in pvio
reports: 4 KiB random read and write at queue depth 1 and 32, 64 KiB and 1 MiB sequential.

`compare_with_qemu_nbd(image)` serves the same raw file with pvio (``pvio nbd serve``
in its own process, as a deployment would run it) and with ``qemu-nbd -f raw``, one
after the other, runs every job `runs` times against each alternately, and reports the
medians and the ratio pvio / qemu-nbd.  Both servers are measured in one run on the same
file with the page cache warmed by the same prefill, so the ratio is meaningful even on
a noisy shared machine; absolute numbers are not.

This module is a helper: `pvio bench blk` (the block driver's benchmark) reuses it for
its export; run it by hand with ``python -m pvio.bench.fio_nbd IMAGE``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path


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
        [f"--runtime={job.runtime}", "--time_based", "--ramp_time=0.5"] if job.runtime > 0 else []
    )


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


def _listening(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX) as probe:
        try:
            probe.connect(str(path))
        except OSError:
            return False
    return True


def _wait_for_socket(path: Path, proc: subprocess.Popen[bytes], timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not _listening(path):  # the file appears a moment before listen()
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited {proc.returncode} before listening")
        if time.monotonic() > deadline:
            raise TimeoutError(f"{proc.args!r} did not create {path}")
        time.sleep(0.02)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@contextlib.contextmanager
def pvio_nbd_server(image: Path, sock: Path) -> Iterator[str]:
    """`pvio nbd serve IMAGE` in its own process; yields the NBD URI."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvio", "nbd", "serve", str(image), "--socket", str(sock)],
        stdout=subprocess.DEVNULL,
    )
    try:
        _wait_for_socket(sock, proc)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        _stop(proc)


@contextlib.contextmanager
def qemu_nbd_server(image: Path, sock: Path) -> Iterator[str]:
    """`qemu-nbd -f raw IMAGE` (defaults: writeback cache, thread-pool AIO); yields the URI."""
    proc = subprocess.Popen(
        ["qemu-nbd", "-f", "raw", "--persistent", "--shared=16", f"--socket={sock}", str(image)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,  # "Broken pipe" each time fio hangs up
    )
    try:
        _wait_for_socket(sock, proc)
        yield f"nbd+unix:///?socket={sock}"
    finally:
        _stop(proc)


@dataclass(frozen=True)
class Comparison:
    job: FioJob
    pvio: FioResult
    qemu_nbd: FioResult

    @property
    def iops_ratio(self) -> float:
        return self.pvio.iops / self.qemu_nbd.iops if self.qemu_nbd.iops else 0.0

    @property
    def bw_ratio(self) -> float:
        return self.pvio.bw_bytes / self.qemu_nbd.bw_bytes if self.qemu_nbd.bw_bytes else 0.0


def _median(results: Sequence[FioResult]) -> FioResult:
    return FioResult(
        statistics.median(r.iops for r in results),
        statistics.median(r.bw_bytes for r in results),
        statistics.median(r.lat_mean_us for r in results),
        statistics.median(r.lat_p99_us for r in results),
    )


def compare_with_qemu_nbd(
    image: Path, jobs: Sequence[FioJob] = STANDARD_JOBS, runs: int = 3, workdir: Path | None = None
) -> list[Comparison]:
    """Run `jobs` against pvio's export and qemu-nbd on `image`; medians of `runs` each."""
    for tool in ("fio", "qemu-nbd"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} is not installed (tools/install.sh installs it)")
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        pvio_sock, qemu_sock = Path(tmp, "pvio.sock"), Path(tmp, "qemu.sock")
        with pvio_nbd_server(image, pvio_sock) as pvio_uri, qemu_nbd_server(image, qemu_sock) as qemu_uri:
            # Prefill once so that reads find data, through the same page cache for both.
            size = max((j.size for j in jobs), key=_size_bytes)
            run_fio(qemu_uri, FioJob("prefill", "write", "1m", 8, runtime=0, size=size), timeout=300)
            results: dict[str, dict[str, list[FioResult]]] = {}
            for job in jobs:
                per = results.setdefault(job.name, {"pvio": [], "qemu": []})
                for _ in range(runs):  # alternate, so drift hits both alike
                    per["pvio"].append(run_fio(pvio_uri, job))
                    per["qemu"].append(run_fio(qemu_uri, job))
    return [
        Comparison(job, _median(results[job.name]["pvio"]), _median(results[job.name]["qemu"]))
        for job in jobs
    ]


def _size_bytes(size: str) -> int:
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    return int(size[:-1]) * units[size[-1].lower()] if size[-1].lower() in units else int(size)


def format_table(comparisons: Sequence[Comparison]) -> str:
    lines = [
        f"{'job':<20} {'pvio IOPS':>10} {'qemu IOPS':>10} {'pvio MiB/s':>11} {'qemu MiB/s':>11} {'ratio':>6}"
    ]
    for c in comparisons:
        lines.append(
            f"{c.job.name:<20} {c.pvio.iops:>10.0f} {c.qemu_nbd.iops:>10.0f} "
            f"{c.pvio.bw_mib:>11.1f} {c.qemu_nbd.bw_mib:>11.1f} {c.iops_ratio:>6.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    parser.add_argument("image", type=Path, help="raw image (created sparse if missing)")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--runtime", type=float, default=5.0)
    parser.add_argument("--size", default="256m")
    args = parser.parse_args(argv)
    if not args.image.exists():
        with open(args.image, "wb") as f:
            f.truncate(_size_bytes(args.size))
    jobs = [
        FioJob(j.name, j.rw, j.bs, j.iodepth, runtime=args.runtime, size=args.size) for j in STANDARD_JOBS
    ]
    print(format_table(compare_with_qemu_nbd(args.image, jobs, runs=args.runs)))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
