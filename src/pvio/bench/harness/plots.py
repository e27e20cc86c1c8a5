"""PNG plots of a suite run: one per benchmark, and one of every ratio.

Per benchmark, one panel per unit (round trips/s, µs, IOPS, MiB/s...): for each figure
name (a scenario or workload) a group of bars, one per subject: pvio's subjects first
(e.g. "pvio map", "pvio copy"), then each baseline ("qemu-nbd", "direct (io_uring)",
"UNIX socketpair"), with error bars from the min to the max of the runs.  The ratio plot
puts every pvio/baseline ratio of the run on one log axis, with 1 marked, so a reader
sees at a glance where pvio stands.

matplotlib is optional (``pip install 'pvio[bench]'``): `available` says whether it is
there, and the suite writes its JSON without plots when it is not.  The Agg backend is
forced: no display is needed or used.
"""

from __future__ import annotations

import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pvio.bench.harness.benchmark import Result
from pvio.bench.harness.figures import Figure, Stats

INSTALL_HINT = "pip install 'pvio[bench]' (or: pip install matplotlib)"


def available() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _series(figures: Sequence[Figure]) -> tuple[list[str], list[str], dict[tuple[str, str], Stats]]:
    """Figure names, subjects (pvio's first) and the stats of each (name, subject)."""
    names: list[str] = []
    ours: list[str] = []
    theirs: list[str] = []
    cells: dict[tuple[str, str], Stats] = {}
    for f in figures:
        if f.name not in names:
            names.append(f.name)
        if f.subject not in ours:
            ours.append(f.subject)
        cells[(f.name, f.subject)] = f.stats
        for b in f.baselines:
            if b.subject not in theirs:
                theirs.append(b.subject)
            cells.setdefault((f.name, b.subject), b.stats)
    return names, ours + [s for s in theirs if s not in ours], cells


def plot_result(result: Result, path: Path) -> Path | None:
    """Bars of pvio vs its baselines for one benchmark; None when it has no figures."""
    if not result.figures:
        return None
    plt = _pyplot()
    units: list[str] = []
    for f in result.figures:
        if f.unit not in units:
            units.append(f.unit)
    fig, axes = plt.subplots(len(units), 1, figsize=(9, 2.6 * len(units) + 0.6), squeeze=False)
    colours = plt.get_cmap("tab10")
    for ax, unit in zip(axes[:, 0], units, strict=True):
        figures = [f for f in result.figures if f.unit == unit]
        names, subjects, cells = _series(figures)
        labelled: set[str] = set()
        for i, name in enumerate(names):  # each group as wide as the subjects it has
            present = [subj for subj in subjects if (name, subj) in cells]
            width = 0.8 / len(present)
            for j, subject in enumerate(present):
                st = cells[(name, subject)]
                colour = colours(subjects.index(subject) % 10)
                ax.bar(i - 0.4 + width * (j + 0.5), st.median, width,
                       yerr=[[st.median - st.min], [st.max - st.median]], capsize=2,
                       color=colour, edgecolor="black", linewidth=0.4,
                       label=None if subject in labelled else subject)
                labelled.add(subject)
        medians = [st.median for st in cells.values() if st.median > 0]
        if medians and max(medians) / min(medians) > 30:  # batch 1 next to batch 512
            ax.set_yscale("log")
        better = "higher" if figures[0].higher_is_better else "lower"
        ax.set_ylabel(f"{unit}\n({better} is better)", fontsize=8)
        ax.set_xticks(range(len(names)))
        wrap = max(10, 110 // max(len(names), 1))
        ax.set_xticklabels([textwrap.fill(n, wrap) for n in names], fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    runs = max((f.stats.runs for f in result.figures), default=0)
    fig.suptitle(f"pvio bench {result.name} ({result.mode}): medians of {runs} runs, "
                 "bars min–max", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def plot_ratios(results: Sequence[Result], path: Path) -> Path | None:
    """Every pvio/baseline ratio of the run on one log axis; None when there is none."""
    rows: list[tuple[str, float, bool]] = []
    for r in results:
        for f in r.figures:
            for b in f.baselines:
                if b.ratio is not None and b.ratio > 0:
                    label = f"{r.name}: {f.name}" + (f" [{f.subject}]" if f.subject != "pvio"
                                                      else "") + f" vs {b.subject}"
                    rows.append((label, b.ratio, f.higher_is_better))
    if not rows:
        return None
    plt = _pyplot()
    from matplotlib.ticker import FormatStrFormatter

    fig, ax = plt.subplots(figsize=(9, 0.25 * len(rows) + 1.4))
    ys = range(len(rows))
    colours = ["tab:green" if hib else "tab:orange" for _, _, hib in rows]
    values = [v for _, v, _ in rows]
    ax.barh(list(ys), values, color=colours, edgecolor="black", linewidth=0.4)
    for y, v in zip(ys, values, strict=True):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=6)
    ax.set_xscale("log")
    ax.set_xlim(min(*values, 0.5) / 1.5, max(*values, 2.0) * 2)
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.axvline(1.0, color="black", linewidth=0.8)
    ax.set_yticks(list(ys))
    ax.set_yticklabels([label for label, _, _ in rows], fontsize=6)
    ax.invert_yaxis()
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("pvio / baseline, medians measured in the same run", fontsize=9)
    ax.set_xlabel("green: rates (above 1 pvio is faster); orange: times (above 1 pvio is "
                  "slower)", fontsize=7)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path
