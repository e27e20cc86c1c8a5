"""`pvio bench` with no subcommand: run the suite, show progress, print one table, write
results.json and the PNG plots into the output directory.

Layout of the output directory::

    results.json          every figure, the machine, tool versions, the exact commands
    results.md            the table in Markdown, with the machine, for the README
    <benchmark>.png       pvio vs its baselines, one panel per unit (needs matplotlib)
    ratios.png            every pvio/baseline ratio of the run on one log axis
    profile/              with --profile: per benchmark, a speedscope file and a summary

The progress display is rich's on a terminal and one plain line per event otherwise
(CI logs, pipes), so a log shows which benchmark was running when something went wrong.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from types import TracebackType

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table
from rich.text import Text

from pvio.bench.harness import registry, runner
from pvio.bench.harness.benchmark import Mode, Result
from pvio.bench.harness.runner import Observer, SuiteReport


def fmt(value: float) -> str:
    """A figure with as many digits as it deserves."""
    if not math.isfinite(value):
        return str(value)
    mag = abs(value)
    if mag >= 1000:
        return f"{value:,.0f}"
    if mag >= 100:
        return f"{value:.0f}"
    if mag >= 10:
        return f"{value:.1f}"
    if mag >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def fmt_ratio(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if value >= 0.1 else f"{value:.2g}"


def default_out_dir(now: datetime | None = None) -> Path:
    """./bench-results/<timestamp>, made absolute here: the benchmarks hand paths under it
    to processes that may run elsewhere (pvio up's domains, qemu-nbd)."""
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    return Path.cwd() / "bench-results" / stamp


class PlainObserver(Observer):
    def __init__(self, console: Console) -> None:
        self.console = console

    def started(self, index: int, total: int, name: str) -> None:
        self.console.print(f"[{index + 1}/{total}] {name}: running", highlight=False, markup=False)

    def step(self, name: str, message: str) -> None:
        self.console.print(f"      {name}: {message}", highlight=False, markup=False)

    def finished(self, result: Result) -> None:
        what = result.status if result.status == "ok" else f"{result.status}: {result.reason}"
        self.console.print(f"      {result.name}: {what} ({result.duration_s:.1f} s)",
                           highlight=False, markup=False)


class RichObserver(Observer):
    """A bar over the benchmarks with the current step, and a line as each one ends."""

    def __init__(self, console: Console, total: int) -> None:
        self.progress = Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(), console=console,
                                 transient=True)
        self.task = self.progress.add_task("pvio bench", total=total)

    def __enter__(self) -> RichObserver:
        self.progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.progress.stop()

    def started(self, index: int, total: int, name: str) -> None:
        self.progress.update(self.task, description=f"{name}")

    def step(self, name: str, message: str) -> None:
        self.progress.update(self.task, description=escape(f"{name}: {message}"))

    def finished(self, result: Result) -> None:
        what = result.status if result.status == "ok" else f"{result.status}: {result.reason}"
        self.progress.console.print(f"{result.name}: {what} ({result.duration_s:.1f} s)",
                                    highlight=False, markup=False)
        self.progress.advance(self.task)


def short(value: float) -> str:
    """A figure in at most five characters or so: 2.1M, 125k, 21.6, 0.26."""
    mag = abs(value)
    if mag >= 1e9:
        return f"{value / 1e9:.3g}G"
    if mag >= 1e6:
        return f"{value / 1e6:.3g}M"
    if mag >= 1e4:
        return f"{value / 1e3:.0f}k"
    return fmt(value)


def compact_table(report: SuiteReport) -> Table:
    """The table for a narrow terminal: medians and ratios only (results.md has it all)."""
    t = Table(title=f"pvio bench ({report.mode}): medians; ratio = pvio / baseline")
    t.add_column("layer")
    t.add_column("figure", min_width=16, ratio=1)
    t.add_column("unit")
    t.add_column("pvio", justify="right", no_wrap=True)
    t.add_column("baseline", min_width=12, ratio=1)
    t.add_column("ratio", justify="right", no_wrap=True)
    for r in report.results:
        if r.status != "ok":
            t.add_row(r.name, Text(f"{r.status}: {r.reason}"), end_section=True,
                      style="dim" if r.status == "skipped" else "red")
            continue
        for i, f in enumerate(r.figures):
            name = Text(f.name if f.subject == "pvio" else f"{f.name} [{f.subject}]")
            head = [r.name if i == 0 else "", name, f.unit + ("" if f.higher_is_better
                                                               else " ↓"), short(f.stats.median)]
            for j, b in enumerate(f.baselines or (None,)):
                tail = ["", ""] if b is None else [Text(f"{b.subject} {short(b.stats.median)}"),
                                                   fmt_ratio(b.ratio)]
                t.add_row(*(head if j == 0 else ["", "", "", ""]), *tail,
                          end_section=i == len(r.figures) - 1
                          and j == max(len(f.baselines) - 1, 0))
    t.caption = "↓: lower is better; the full table is in results.md"
    return t


def table(report: SuiteReport) -> Table:
    t = Table(title=f"pvio bench ({report.mode}): medians of n runs; "
                    "ratio = pvio / baseline, measured in the same run")
    for col in ("layer", "figure", "unit", "pvio", "min..max", "n", "baseline (same run)",
                "median", "ratio"):
        numeric = col in ("pvio", "min..max", "n", "median", "ratio")
        t.add_column(col, justify="right" if numeric else "left", no_wrap=numeric)
    for r in report.results:
        if r.status != "ok":
            t.add_row(r.name, Text(f"{r.status}: {r.reason}"), style="dim" if r.status == "skipped"
                      else "red", end_section=True)
            continue
        for i, f in enumerate(r.figures):
            name = Text(f.name if f.subject == "pvio" else f"{f.name} [{f.subject}]")
            unit = f.unit + ("" if f.higher_is_better else " ↓")
            head = [r.name if i == 0 else "", name, unit, fmt(f.stats.median),
                    f"{fmt(f.stats.min)}..{fmt(f.stats.max)}", str(f.stats.runs)]
            for j, b in enumerate(f.baselines or (None,)):
                tail = (["", "", ""] if b is None else
                        [Text(b.subject), fmt(b.stats.median), fmt_ratio(b.ratio)])
                t.add_row(*(head if j == 0 else [""] * 6), *tail,
                          end_section=i == len(r.figures) - 1
                          and j == max(len(f.baselines) - 1, 0))
    t.caption = "↓: lower is better (a time); otherwise higher is better (a rate)"
    return t


def markdown(report: SuiteReport) -> str:
    """The table as Markdown, headed by the command, the date and the machine."""
    m = report.machine
    lines = [
        f"`{' '.join(report.argv)}`, {report.started:%Y-%m-%d %H:%M} UTC; {m['cores']} cores "
        f"({m['cpu_model']}), {m['memory_bytes'] / 2**30:.0f} GiB, Linux {m['kernel']}, "
        f"Python {m['python']}; pvio {m.get('pvio_build', 'build not recorded')}.",
        "",
        "| layer | figure | unit | pvio | min..max | n | baseline (same run) | median | ratio |",
        "|---|---|---|--:|--:|--:|---|--:|--:|",
    ]
    for r in report.results:
        if r.status != "ok":
            lines.append(f"| {r.name} | {r.status}: {r.reason} | | | | | | | |")
            continue
        for f in r.figures:
            name = f.name if f.subject == "pvio" else f"{f.name} [{f.subject}]"
            unit = f.unit + ("" if f.higher_is_better else " ↓")
            head = [r.name, name, unit, fmt(f.stats.median),
                    f"{fmt(f.stats.min)}..{fmt(f.stats.max)}", str(f.stats.runs)]
            bases = f.baselines or (None,)
            for i, b in enumerate(bases):
                cells = head if i == 0 else ["", "", "", "", "", ""]
                tail = (["", "", ""] if b is None else
                        [b.subject, fmt(b.stats.median), fmt_ratio(b.ratio)])
                lines.append("| " + " | ".join(cells + tail) + " |")
    lines += ["", "↓: lower is better (a time); otherwise higher is better (a rate). "
                  "ratio = pvio median / baseline median."]
    return "\n".join(lines) + "\n"


def write_outputs(report: SuiteReport, out: Path, console: Console) -> Path:
    """Plots (when matplotlib is there) and results.json; returns the JSON's path."""
    from pvio.bench.harness import plots

    out.mkdir(parents=True, exist_ok=True)
    if plots.available():
        for r in report.results:
            if r.status == "ok" and r.figures:
                try:
                    path = plots.plot_result(r, out / f"{r.name}.png")
                    r.plot = path.name if path else None
                except Exception as exc:  # a plot must never lose the figures
                    report.notes.append(f"{r.name}: plot failed: {exc!r}")
        try:
            plots.plot_ratios(report.results, out / "ratios.png")
        except Exception as exc:
            report.notes.append(f"ratios plot failed: {exc!r}")
    else:
        note = f"plots skipped: matplotlib is not installed; {plots.INSTALL_HINT}"
        report.notes.append(note)
    (out / "results.md").write_text(markdown(report))
    path = out / "results.json"
    # Strict JSON: figures are finite by construction (Stats), extra and params made so.
    path.write_text(json.dumps(report.to_json(), indent=2, ensure_ascii=False,
                               allow_nan=False) + "\n")
    return path


def resolve_names(only: str | None) -> list[str]:
    known = registry.known_names()
    if not only:
        return known
    names = [n.strip() for n in only.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {', '.join(unknown)}; known: {', '.join(known)}")
    return names


def run(names: Sequence[str], mode: Mode, out: Path, profile: bool,
        argv: Sequence[str], console: Console | None = None) -> SuiteReport:
    console = console or Console()
    if not console.is_terminal:  # piped or captured: do not squeeze the table into 80
        console = Console(file=console.file, width=max(console.width, 150))
    out.mkdir(parents=True, exist_ok=True)
    profiler = None
    if profile:
        from pvio.bench.harness import profile as profiling

        profiler = profiling.choose(out / "profile")
        console.print(f"profiling with {profiler.name} into {out / 'profile'}", highlight=False, markup=False)
    wrap = profiler.wrap if profiler is not None else None
    if console.is_terminal:
        with RichObserver(console, len(names)) as observer:
            report = runner.run_suite(names, mode, out, observer, argv, wrap)
    else:
        report = runner.run_suite(names, mode, out, PlainObserver(console), argv, wrap)
    if profiler is not None:
        report.profiler = profiler.name
        report.notes += profiler.notes
        report.notes.append("profiled run: the figures include the profiler's overhead")
    path = write_outputs(report, out, console)
    console.print(table(report) if console.width >= 130 else compact_table(report))
    for note in report.notes:
        console.print(f"note: {note}", highlight=False, markup=False, soft_wrap=True)
    console.print(f"results: {path}  ({report.to_json()['duration_s']:.0f} s, "
                  f"{report.machine['cores']} cores, {report.machine['cpu_model']}; "
                  f"pvio {report.machine.get('pvio_build', 'build not recorded')})",
                  highlight=False, markup=False)
    return report

