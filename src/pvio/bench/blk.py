"""`pvio bench blk`: a guest's disk through `pvio up`, next to qemu-nbd and the file itself.

Theory of operation
-------------------
This is the block driver measured the way a user meets it: ``pvio up`` runs the
hypervisor, XenStore, a driver domain (blkback) and a guest (blkfront and its NBD
export) as separate processes, and fio's nbd engine drives the guest's export, so each
request crosses NBD socket → blkfront → shared ring → blkback → image and back.  Two
``pvio up`` instances serve the same raw image, one per transport:

- ``pvio map``: blkback maps the granted pages and preadv/pwritev straight into them;
- ``pvio copy``: blkback never maps guest memory; GNTTABOP_copy moves the data;

and `pvio.bench.harness.fio.block_matrix` runs every workload (4 KiB random read and write at
queue depth 1 and 32, 64 KiB and 1 MiB sequential read and write) against both, against
``qemu-nbd -f raw`` on an identical copy of the image (what a user would run instead) and with fio's
io_uring engine on the file itself (the limit on this machine), interleaved run by run,
and reports medians with min and max and the ratios pvio / qemu-nbd and pvio / direct.

Per-request counters come from blkback's own statistics (`pvio.blk.backend.BlkbackStats`),
which the driver domain writes into its status file every second, and from blkfront's
(`pvio.blk.front_queue.BlkfrontStats`), which the guest writes into its own: after each fio
run the benchmark waits for the next refresh and takes the difference from the previous
one, so each run's counters are exactly that run's (plus the handful of requests of
fio's NBD connection set-up).  Reported per subject and workload (``extra.counters``),
and, for the notifications, as figures:

- notifications per request: blkback's kicks to the frontend plus blkfront's kicks to
  the backend, over the blkif requests served (a 1 MiB NBD read is some 24 blkif
  requests of at most 11 pages).  blkfront counts every kick it sends; should the
  guest's status file lack its counters, blkback's wake-ups (``notify_received``) stand
  in, a lower bound, since kicks written while blkback is busy coalesce into one wake-up
  (``frontend_kicks_exact`` says which was used);
- requests per batch: requests taken off the ring per batch;
- grant hypercalls per request: GNTTABOP map/unmap/copy hypercalls (each one a batch of
  grant operations) per request.

The targets (reported, never asserted) are those of the block issue: 4 KiB random read at
queue depth 32 at least as many IOPS as qemu-nbd, 1 MiB sequential read bandwidth at
least qemu-nbd's, and at most 0.1 notifications per request at queue depth 32;
`targets` evaluates them from the figures.

Deliberately not here: no O_DIRECT (every subject goes through the page cache, so the
ratios compare serving costs, not the disk), and no warm-up beyond fio's ramp time and the prefill.  Alternatives rejected: reading
the counters from XenStore (``statistics/`` under the backend directory carries the same
values at the same once-a-second rate, through one more client), and running the two
transports one after the other (the interleaving is what makes the ratios fair).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from pvio.bench.harness import fio
from pvio.bench.harness.benchmark import Benchmark, Context, Params
from pvio.bench.harness.figures import Figure, Stats
from pvio.jsonfile import read_json
from pvio.testing.up import UpFailed, UpProcess
from pvio.toolstack.qdisk import QDISK_DOMID_BASE, QEMU_BINARY
from pvio.toolstack.top import proc_times

#: pvio's subjects: label -> `pvio up --transport`.
TRANSPORTS: dict[str, str] = {"pvio map": "map", "pvio copy": "copy"}
#: QEMU's qdisk (Debian's qemu-system-xen) serving the guest's disk on the /dev/xen device
#: layer (`backendtype=qdisk`; GRANT_COPY, one hypervisor round trip per request):
#: measured when QEMU is installed.  blkback's counters are not QEMU's: for it, blkfront's
#: and the hypervisor's round trips of QEMU's domain.
QDISK = "qemu qdisk"

#: How long `pvio up` may take to say ready, and to stop after SIGINT.
READY_TIMEOUT = 90.0
STOP_TIMEOUT = 30.0
#: The driver domain refreshes its status file once a second; wait this long for a refresh.
STATS_TIMEOUT = 3.0

VDEV = "xvda"


# -- blkback's counters ----------------------------------------------------------------------


@dataclass(frozen=True)
class Counters:
    """blkback's cumulative counters for one device (see `pvio.blk.backend.BlkbackStats`)."""

    requests: int = 0
    batches: int = 0
    notify_sent: int = 0
    notify_received: int = 0
    grant_ops: int = 0
    #: blkfront's own counts (the guest's status file): every kick it sends, exactly,
    #: where blkback's `notify_received` sees only the wake-ups they coalesce into
    frontend_requests: int = 0
    frontend_notify_sent: int = 0
    #: hypervisor round trips (request frames) of the backend's domain: blkback's driver
    #: domain, or QEMU's (the hypervisor's census)
    backend_round_trips: int = 0
    #: CPU time (user + system, clock ticks of /proc/<pid>/stat) of the guest process
    #: (NBD export + blkfront), the backend (blkback's driver domain, or QEMU) and the
    #: hypervisor process
    guest_cpu_ticks: int = 0
    backend_cpu_ticks: int = 0
    hypervisor_cpu_ticks: int = 0

    #: The statistics keys that make up `requests` (BlkbackStats.requests).
    REQUEST_KEYS = ("rd_req", "wr_req", "f_req", "ds_req", "err_req")

    @classmethod
    def from_statistics(cls, stats: Mapping[str, Mapping[str, str]]) -> Counters:
        """The sum over every device of a driver domain's ``statistics`` status entry."""
        total = cls()
        for keys in stats.values():
            def get(name: str, keys: Mapping[str, str] = keys) -> int:
                return int(keys.get(name, "0"))

            total = total + cls(
                requests=sum(get(k) for k in cls.REQUEST_KEYS),
                batches=get("batches"),
                notify_sent=get("notify_sent"),
                notify_received=get("notify_received"),
                grant_ops=get("grant_ops"),
            )
        return total

    @classmethod
    def from_guest_status(cls, status: Mapping[str, Any]) -> Counters:
        """blkfront's counters, summed over the disks of a guest's status file."""
        total = cls()
        for disk in status.get("disks", []):
            stats = disk.get("statistics") or {}
            total = total + cls(
                frontend_requests=int(stats.get("requests", 0)),
                frontend_notify_sent=int(stats.get("notify_sent", 0)),
            )
        return total

    def __add__(self, other: Counters) -> Counters:
        return Counters(*(a + b for a, b in zip(_values(self), _values(other), strict=True)))

    def __sub__(self, other: Counters) -> Counters:
        return Counters(*(a - b for a, b in zip(_values(self), _values(other), strict=True)))

    def per_request(self) -> dict[str, float | int]:
        """Per blkif request.  The frontend's kicks are blkfront's own count when the
        guest published it, else blkback's wake-ups (a lower bound: kicks sent while
        blkback is busy coalesce into one wake-up)."""
        n = max(self.requests or self.frontend_requests, 1)  # QEMU has no blkback counters
        kicks = self.frontend_notify_sent if self.frontend_requests else self.notify_received
        return {
            "requests": self.requests,
            "notifications_per_request": (self.notify_sent + kicks) / n,
            "notify_to_frontend_per_request": self.notify_sent / n,
            "notify_from_frontend_per_request": kicks / n,
            # 1: the frontend's kicks are blkfront's exact count; 0: blkback's lower bound
            "frontend_kicks_exact": 1 if self.frontend_requests else 0,
            "requests_per_batch": self.requests / max(self.batches, 1),
            "grant_hypercalls_per_request": self.grant_ops / n,
            "backend_round_trips_per_request": self.backend_round_trips / n,
            "guest_cpu_us_per_request": self.guest_cpu_ticks * _US_PER_TICK / n,
            "backend_cpu_us_per_request": self.backend_cpu_ticks * _US_PER_TICK / n,
            "hypervisor_cpu_us_per_request": self.hypervisor_cpu_ticks * _US_PER_TICK / n,
        }


_US_PER_TICK = 1e6 / os.sysconf("SC_CLK_TCK")


def _cpu_ticks(pid: int) -> int:
    """CPU ticks (user + system) a process has used; 0 if it is gone."""
    times = proc_times(pid) if pid else None
    return times[0] if times is not None else 0


def _values(c: Counters) -> tuple[int, ...]:
    return tuple(getattr(c, f.name) for f in dataclasses.fields(c))


# -- pvio up as a server -----------------------------------------------------------------------


class PvioUp(UpProcess):
    """One `pvio up --transport T` serving `image` as xvda, in its own state directory."""

    def __init__(self, image: Path, sock: Path, transport: str, state_dir: Path, backendtype: str = "phy") -> None:
        super().__init__(state_dir, "--disk",
                         f"format=raw, vdev={VDEV}, access=rw, backendtype={backendtype}, target={image}",
                         "--nbd-socket", str(sock), "--transport", transport)
        self.image, self.sock, self.transport, self.backendtype = image, sock, transport, backendtype
        self.driver_status: Path | None = None
        self.guest_status: Path | None = None
        self.backend_domid = 0  # blkback's driver domain, or the guest's QEMU
        self.pids = {"guest": 0, "backend": 0, "hypervisor": 0}

    def serve(self) -> str:
        """Start it and wait until ready; returns the guest's NBD URI for xvda."""
        try:
            self.start(READY_TIMEOUT)
        except UpFailed as e:
            raise RuntimeError(f"pvio up --transport {self.transport}: {e}") from None
        uri = None
        for dom in self.status.get("domains", []):
            if dom.get("role") == "driver":
                self.driver_status = self.paths.status(dom["name"])
                self.pids["backend"] = int(dom.get("pid") or 0)
            if dom.get("role") == "guest":
                self.guest_status = self.paths.status(dom["name"])
                self.pids["guest"] = int(dom.get("pid") or 0)
                if self.backendtype == "qdisk":
                    self.backend_domid = QDISK_DOMID_BASE + int(dom["domid"])
            for dev in dom.get("devices", []):
                if dev.get("type") == "vbd" and dev.get("vdev") == VDEV and dev.get("nbd"):
                    uri = str(dev["nbd"])
        for svc in self.status.get("services", []):
            if svc.get("name") == "hypervisor" or (
                    self.backendtype == "qdisk" and str(svc.get("name", "")).startswith("qdisk-")):
                self.pids["hypervisor" if svc["name"] == "hypervisor" else "backend"] = int(svc.get("pid") or 0)
        if uri is None:
            raise RuntimeError(f"pvio up's status names no NBD export of {VDEV}: {self.status}")
        return uri

    def counters(self, newer_than: float = 0.0) -> Counters | None:
        """blkback's counters from the driver domain's status file (none for QEMU) and
        the backend domain's round trips from the hypervisor's, once both have been
        rewritten after `newer_than` (time.time()); None if they never are."""
        if self.driver_status is None:
            return None
        deadline = time.monotonic() + STATS_TIMEOUT
        backend: Counters | None = Counters() if self.backendtype == "qdisk" else None
        trips: Counters | None = None
        while True:
            with contextlib.suppress(OSError):
                if backend is None and self.driver_status.stat().st_mtime > newer_than:
                    status = read_json(self.driver_status)
                    if status is not None and status.get("statistics"):
                        backend = Counters.from_statistics(status["statistics"])
                hv_status = self.paths.status("hypervisor")
                if trips is None and hv_status.stat().st_mtime > newer_than:
                    census = read_json(hv_status) or {}
                    trips = Counters(backend_round_trips=sum(
                        int(d.get("hypercall_frames", 0)) for d in census.get("domains", [])
                        if d.get("domid") == self.backend_domid))
            if backend is not None and trips is not None:
                front = self._guest_counters(newer_than)
                if front is not None or time.monotonic() > deadline:
                    cpu = Counters(**{f"{k}_cpu_ticks": _cpu_ticks(pid) for k, pid in self.pids.items()})
                    return backend + trips + (front or Counters()) + cpu
            if time.monotonic() > deadline:
                return None
            time.sleep(0.05)

    def _guest_counters(self, newer_than: float) -> Counters | None:
        """blkfront's counters once the guest's status file is newer than `newer_than`."""
        if self.guest_status is None:
            return None
        with contextlib.suppress(OSError):
            if self.guest_status.stat().st_mtime > newer_than:
                status = read_json(self.guest_status)
                if status is not None:
                    return Counters.from_guest_status(status)
        return None

    def close(self) -> int | None:
        """SIGINT, as a user stops it (orderly XenBus close, flush); kill if it hangs."""
        if self.proc is None:
            return None
        try:
            return self.stop(STOP_TIMEOUT)
        except UpFailed:
            return None


class CounterLog:
    """Each pvio run's counters: the difference between refreshes around it."""

    def __init__(self) -> None:
        self.ups: dict[str, PvioUp] = {}
        self.last: dict[str, Counters | None] = {}
        self.runs: dict[str, dict[str, list[dict[str, float | int]]]] = {}
        self.missing: list[str] = []

    def serving(self, subject: str, up: PvioUp) -> None:
        self.ups[subject] = up
        self.last[subject] = up.counters()

    def after_run(self, subject: str, workload: str) -> None:
        up = self.ups.get(subject)
        if up is None:
            return
        now = up.counters(newer_than=time.time())
        before = self.last.get(subject)
        self.last[subject] = now
        if now is None or before is None:
            self.missing.append(f"{subject} {workload}")
            return
        self.runs.setdefault(subject, {}).setdefault(workload, []).append(
            (now - before).per_request())

    def figures(self) -> list[Figure]:
        """Notifications per request, per workload and subject (lower is better)."""
        out = []
        for subject, per in self.runs.items():
            for workload, runs in per.items():
                values = [float(r["notifications_per_request"]) for r in runs]
                out.append(Figure(workload, "notifications/request", Stats.of(values), subject,
                                  higher_is_better=False,
                                  note="kicks blkback sent + kicks blkfront sent, over blkif requests"))
        return out

    def summary(self) -> dict[str, dict[str, dict[str, float]]]:
        """Median of each counter over the runs, per subject and workload."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for subject, per in self.runs.items():
            for workload, runs in per.items():
                out.setdefault(subject, {})[workload] = {
                    key: Stats.of(float(r[key]) for r in runs).median for key in runs[0]}
        return out


# -- the benchmark -----------------------------------------------------------------------------


def _suite(params: Params, ctx: Context) -> list[Figure]:
    with contextlib.ExitStack() as stack:
        return _measure(params, ctx, stack)


def _measure(params: Params, ctx: Context, stack: contextlib.ExitStack) -> list[Figure]:
    log = CounterLog()

    # UNIX socket paths are limited to 107 bytes: the state directories (with the
    # hypervisor's and xenstored's sockets) and the exports' sockets live in a short
    # directory of their own, not under the user's --out.
    short = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pvio-blk-")))

    def server_for(subject: str, transport: str, backendtype: str = "phy") -> fio.Server:
        @contextlib.contextmanager
        def serve(image: Path, sock: Path) -> Iterator[str]:
            name = transport if backendtype == "phy" else backendtype
            up = PvioUp(image, short / f"{name}.sock", transport, short / name, backendtype)
            ctx.command(["pvio", "up", *up.args, "--state-dir", str(up.state_dir)])
            ctx.progress(f"starting pvio up --transport {transport}")
            try:
                uri = up.serve()
                log.serving(subject, up)
                yield uri
            finally:
                code = up.close()
                if code not in (0, None):
                    ctx.extra.setdefault("pvio_up_exit", {})[subject] = code

        return serve

    servers = {subject: server_for(subject, t) for subject, t in TRANSPORTS.items()
               if subject in params.get("subjects", TRANSPORTS)}
    if QDISK in params.get("subjects", [QDISK]) and os.access(QEMU_BINARY, os.X_OK):
        servers[QDISK] = server_for(QDISK, "copy", "qdisk")
    figures = fio.block_matrix(ctx, servers, workloads=params["workloads"],
                                 runs=int(params["runs"]), runtime=float(params["runtime"]),
                                 size=str(params["size"]), after_run=log.after_run)
    figures += log.figures()
    ctx.extra["counters"] = log.summary()
    ctx.extra["counter_definitions"] = {
        "notifications_per_request": "blkback's notify_sent + notify_received over requests",
        "notify_to_frontend_per_request": "blkback -> blkfront event-channel kicks",
        "notify_from_frontend_per_request": "blkfront -> blkback kicks that woke blkback",
        "requests_per_batch": "requests taken off the ring per batch",
        "grant_hypercalls_per_request": "GNTTABOP map/unmap/copy hypercalls (batches)",
        "backend_round_trips_per_request": "hypervisor round trips (request frames) of the backend's domain",
        "guest_cpu_us_per_request": "CPU µs (user + system) of the guest process (NBD export + blkfront)",
        "backend_cpu_us_per_request": "CPU µs of blkback's driver domain (or QEMU for qdisk)",
        "hypervisor_cpu_us_per_request": "CPU µs of the hypervisor process",
    }
    if log.missing:
        ctx.extra["counters_missing"] = log.missing
    ctx.extra["targets"] = targets(figures)
    return figures


def targets(figures: Sequence[Figure]) -> list[dict[str, Any]]:
    """The block issue's targets, evaluated (reported, never asserted)."""
    out: list[dict[str, Any]] = []

    def ratio_target(name: str, unit: str, what: str) -> None:
        for f in figures:
            if f.name != name or f.unit != unit:
                continue
            for b in f.baselines:
                if b.subject == fio.QEMU_NBD and b.ratio is not None:
                    out.append({"target": f"{what} ratio vs qemu-nbd >= 1.0",
                                "subject": f.subject, "value": b.ratio, "met": b.ratio >= 1.0})

    ratio_target("4k-randread-qd32", "IOPS", "4 KiB randread QD32 IOPS")
    ratio_target("1m-read-qd8", "MiB/s", "1 MiB sequential read bandwidth")
    for f in figures:
        if f.unit == "notifications/request" and f.name.endswith("qd32"):
            out.append({"target": f"{f.name} notifications per request <= 0.1",
                        "subject": f.subject, "value": f.stats.median,
                        "met": f.stats.median <= 0.1})
    return out


#: The two workloads the targets name (the NBD layer's quick set has the writes).
QUICK_WORKLOADS = ("4k-randread-qd32", "1m-read-qd8")

SUITE = Benchmark(
    name="blk",
    title="A guest disk through pvio up (map, copy) vs qemu-nbd vs the file (io_uring), fio",
    run=_suite,
    quick={"runs": 1, "runtime": 0.5, "size": "32m", "workloads": list(QUICK_WORKLOADS)},
    # Runs of 5 s after a 1 s ramp: with 2 s runs the ratio to qemu-nbd moved by ±20% from
    # run to run and came out lower (docs/blk.md, "What the figure is").
    full={"runs": 3, "runtime": 5.0, "size": "256m",
          "workloads": [w.name for w in fio.STANDARD_JOBS]},
    tools=("fio", "qemu-nbd"),
)


@click.command("blk")
@click.option("--quick", is_flag=True,
              help="The reduced set (the two target workloads, one run of 0.5 s each).")
@click.option("--runs", type=int, default=None, help="Runs of each workload per subject.")
@click.option("--runtime", type=float, default=None, help="Seconds per fio run.")
@click.option("--size", default=None, help="Image size (fio --size), e.g. 64m.")
@click.option("--workloads", default=None, metavar="NAMES",
              help="Comma-separated, of " + ",".join(w.name for w in fio.STANDARD_JOBS) + ".")
@click.option("--transport", "transports", multiple=True, type=click.Choice(["map", "copy", "qdisk"]),
              help="Only these pvio transports, or qdisk for QEMU's (repeatable; default all).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for results.json and the plot [default: ./bench-results/<time>].")
def blk(quick: bool, runs: int | None, runtime: float | None, size: str | None,
        workloads: str | None, transports: tuple[str, ...], out: Path | None) -> None:
    """fio through `pvio up`'s NBD export (map, copy) vs qemu-nbd vs io_uring on the file."""
    from pvio.bench.harness import registry, report
    from pvio.bench.harness.benchmark import Mode

    mode: Mode = "quick" if quick else "full"
    params = dict(SUITE.params(mode))
    for key, value in (("runs", runs), ("runtime", runtime), ("size", size)):
        if value is not None:
            params[key] = value
    if workloads:
        names = [w.strip() for w in workloads.split(",") if w.strip()]
        known = {w.name for w in fio.STANDARD_JOBS}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise click.BadParameter(f"unknown {unknown}; known: {sorted(known)}",
                                     param_hint="--workloads")
        params["workloads"] = names
    if transports:
        params["subjects"] = [s for s, t in [*TRANSPORTS.items(), (QDISK, "qdisk")] if t in transports]
    variant = dataclasses.replace(SUITE, quick=params, full=params)
    registry.register(variant)
    argv = ["pvio", "bench", "blk", *sys.argv[sys.argv.index("blk") + 1:]] \
        if "blk" in sys.argv else ["pvio", "bench", "blk"]
    try:
        out = out.resolve() if out is not None else report.default_out_dir()
        result = report.run(["blk"], mode, out, False, argv)
    finally:
        registry.unregister("blk")
    blk_result = result.results[0]
    for t in blk_result.extra.get("targets", []):
        click.echo(f"target: {t['subject']}: {t['target']}: {t['value']:.3g} "
                   f"({'met' if t['met'] else 'NOT met'})")
    if blk_result.status != "ok":
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    blk()
