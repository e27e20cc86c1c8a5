"""`pvio bench trace`: what `pvio trace` costs on the block path — fio's IOPS through
`pvio up` with tracing never on, off after a session, and on.

Theory of operation
-------------------
Two `pvio up` stacks (map transport, the default) serve identical copies of one
prefilled image; fio's nbd engine drives each guest's export as `pvio bench blk` does.
Stack A is never traced.  Stack B is traced in some runs, by the same session file
`pvio trace` writes (`pvio.toolstack.trace_cli.begin`/`end`), while the system runs.

1. Calibration: A and B, neither ever traced, interleaved run by run.  B / A is how much
   two identical stacks differ on this machine by themselves: the floor under any
   smaller effect.
2. One session on B, not measured, so that "off" below is off *after* tracing was on
   (the recorders emptied, the trace points back to one attribute test each).
3. Rounds of three runs, interleaved, the order rotating each round so that none
   always follows another: A (never on), B off, B on (a session open for the whole
   fio run; the processes are given `NOTICE` to switch on before fio starts, and the
   session is closed and its events gathered after it).

Figures per workload (medians, with min and max): off / never on (the cost of the trace
points when off; the block issue asks ≤ 2%), on / off (the cost of recording), and the
calibration's B / A.  ``extra`` has the events recorded per second while on and the
off / never ratio divided by the calibration's.

Deliberately not here: a build without trace points (pvio has none; "never on" runs the
same code with every trace point's test false, which is what "off" must match).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from pvio.bench.blk import PvioUp
from pvio.bench.harness import fio
from pvio.bench.harness.benchmark import Benchmark, Context, Params
from pvio.bench.harness.figures import Figure, compare, ratio
from pvio.toolstack.trace_cli import NOTICE, begin, end

NEVER, CAL, OFF, ON = "never on", "never on (stack B)", "off (after a session)", "on"


@contextlib.contextmanager
def _stacks(ctx: Context, size: str) -> Iterator[dict[str, tuple[PvioUp, str]]]:
    """Stacks A and B on copies of one prefilled image: label -> (pvio up, NBD URI)."""
    short = Path(tempfile.mkdtemp(prefix="pvio-trace-"))  # UNIX socket paths are short
    image = ctx.workdir / "disk.img"
    with open(image, "wb") as f:
        f.truncate(fio.size_bytes(size))
    prefill = fio.FioJob("prefill", "write", "1m", 8, runtime=0, size=size)
    argv = ctx.command([a for a in fio.direct_command(image, prefill) if a != "--time_based"])
    subprocess.run(argv, capture_output=True, check=True, timeout=300)
    ups: dict[str, tuple[PvioUp, str]] = {}
    try:
        for name in ("a", "b"):
            copy = ctx.workdir / f"disk-{name}.img"
            shutil.copyfile(image, copy)
            up = PvioUp(copy, short / f"{name}.sock", "map", short / name)
            ctx.command(["pvio", "up", *up.args, "--state-dir", str(up.state_dir)])
            ctx.progress(f"starting pvio up (stack {name.upper()})")
            ups[name] = (up, up.serve())
        yield ups
    finally:
        for up, _ in ups.values():
            code = up.close()
            if code not in (0, None):
                ctx.extra.setdefault("pvio_up_exit", {})[str(up.state_dir.name)] = code
        shutil.rmtree(short, ignore_errors=True)


class _Session:
    """Sessions on one stack, and what they recorded."""

    def __init__(self, up: PvioUp) -> None:
        self.up = up
        self.events = 0
        self.seconds = 0.0
        self.missing: set[str] = set()

    def traced(self, run: Callable[[], float]) -> float:
        session, status = begin(self.up.paths)
        try:
            time.sleep(NOTICE + 0.5)  # every process has seen the session (its status loop)
            t0 = time.monotonic()
            result = run()
            self.seconds += time.monotonic() - t0
        finally:
            dumps, missing = end(self.up.paths, session, status)
        self.events += sum(len(d["events"]) for d in dumps)
        self.missing |= missing
        return result


def _suite(params: Params, ctx: Context) -> list[Figure]:
    runs, runtime, size = int(params["runs"]), float(params["runtime"]), str(params["size"])
    jobs = {j.name: j for j in fio.STANDARD_JOBS}
    figures: list[Figure] = []
    with _stacks(ctx, size) as ups:
        uri_a, (b, uri_b) = ups["a"][1], ups["b"]
        session = _Session(b)
        for name in params["workloads"]:
            job = dataclasses.replace(jobs[name], runtime=runtime, size=size)

            def iops(uri: str, job: fio.FioJob = job) -> float:
                ctx.command(fio.fio_command(uri, job))
                return fio.run_fio(uri, job).iops

            ctx.progress(f"{name}: calibration, {runs} rounds")
            cal: dict[str, list[float]] = {CAL: [], NEVER: []}
            for _ in range(runs):
                cal[NEVER].append(iops(uri_a))
                cal[CAL].append(iops(uri_b))
            if not session.events:
                session.traced(lambda: iops(uri_b))  # tracing has been on: now "off" means off again
            samples: dict[str, list[float]] = {OFF: [], NEVER: [], ON: []}
            subjects: dict[str, Callable[[], float]] = {
                NEVER: lambda: iops(uri_a), OFF: lambda: iops(uri_b),
                ON: lambda: session.traced(lambda: iops(uri_b))}
            order = list(subjects)
            ctx.progress(f"{name}: never on / off / on, {runs} rounds")
            for r in range(runs):
                for label in order[r % 3:] + order[: r % 3]:
                    samples[label].append(subjects[label]())
            figures += [
                compare(f"{name} off", "IOPS", {OFF: samples[OFF], NEVER: samples[NEVER]},
                        note="tracing off after a session / never on (same stack, B / A)"),
                compare(f"{name} on", "IOPS", {ON: samples[ON], OFF: samples[OFF]},
                        note="a session open for the whole run / off"),
                compare(f"{name} calibration", "IOPS", cal,
                        note="two stacks, neither ever traced: B / A, the floor under the off figure"),
            ]
            off = figures[-3].baselines[0].ratio
            floor = figures[-1].baselines[0].ratio
            ctx.extra.setdefault("off_vs_never_calibrated", {})[name] = (
                ratio(off, floor) if off is not None and floor is not None else None)
    ctx.extra["events_per_second_on"] = round(session.events / session.seconds) if session.seconds else 0
    if session.missing:
        ctx.extra["processes_without_events"] = sorted(session.missing)
    return figures


SUITE = Benchmark(
    name="trace",
    title="pvio trace's cost: fio IOPS through pvio up, tracing never on / off after a session / on",
    run=_suite,
    quick={"runs": 1, "runtime": 0.5, "size": "32m", "workloads": ["4k-randread-qd32"]},
    full={"runs": 5, "runtime": 3.0, "size": "128m", "workloads": ["4k-randread-qd32", "4k-randwrite-qd1"]},
    tools=("fio",),
)


@click.command("trace")
@click.option("--quick", is_flag=True, help="One round of 0.5 s runs, one workload.")
@click.option("--runs", type=int, default=None, help="Rounds (each: never on, off, on).")
@click.option("--runtime", type=float, default=None, help="Seconds per fio run.")
@click.option("--workloads", default=None, metavar="NAMES",
              help="Comma-separated, of " + ",".join(w.name for w in fio.STANDARD_JOBS) + ".")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Directory for results.json [default: ./bench-results/<time>].")
def trace(quick: bool, runs: int | None, runtime: float | None, workloads: str | None,
          out: Path | None) -> None:
    """fio IOPS through pvio up with tracing never on, off after a session, and on."""
    from pvio.bench.harness import registry, report
    from pvio.bench.harness.benchmark import Mode

    mode: Mode = "quick" if quick else "full"
    params: dict[str, Any] = dict(SUITE.params(mode))
    for key, value in (("runs", runs), ("runtime", runtime)):
        if value is not None:
            params[key] = value
    if workloads:
        names = [w.strip() for w in workloads.split(",") if w.strip()]
        unknown = [n for n in names if n not in {w.name for w in fio.STANDARD_JOBS}]
        if unknown:
            raise click.BadParameter(f"unknown {unknown}", param_hint="--workloads")
        params["workloads"] = names
    registry.register(dataclasses.replace(SUITE, quick=params, full=params))
    argv = ["pvio", "bench", "trace", *sys.argv[sys.argv.index("trace") + 1:]] \
        if "trace" in sys.argv else ["pvio", "bench", "trace"]
    try:
        result = report.run(["trace"], mode, out.resolve() if out is not None else report.default_out_dir(),
                            False, argv)
    finally:
        registry.unregister("trace")
    r = result.results[0]
    for name, value in (r.extra.get("off_vs_never_calibrated") or {}).items():
        click.echo(f"{name}: off / never on, over the two stacks' own difference: "
                   f"{'-' if value is None else f'{value:.3f}'}")
    if r.status != "ok":
        sys.exit(1)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    trace()
