"""Figures: what a benchmark measured on pvio, beside the baselines of the same run.

A figure is one thing measured on pvio (its *subject*, usually "pvio"; the block layer
has "pvio map" and "pvio copy") as the median of several runs, with the min and max and
every sample, next to zero or more *baselines* measured in the same run, interleaved with
it, so that drift on a shared machine hits both alike.  The ratio is always
pvio median / baseline median, whatever the unit: with ``higher_is_better`` false (a
latency) a ratio above 1 means pvio is slower.  Absolute numbers depend on the machine;
the ratios are what a reader should compare between machines.

Every number here is finite: a sample that is NaN or infinite is a failed measurement,
refused where the `Stats` are made, so results.json is always strict JSON.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pvio.bench.harness.jsondoc import Fields


@dataclass(frozen=True)
class Stats:
    """Several runs of one measurement: the median with the min and max, and the samples."""

    median: float
    min: float
    max: float
    runs: int
    samples: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if not all(math.isfinite(v) for v in (self.median, self.min, self.max, *self.samples)):
            raise ValueError(f"a measurement is not a finite number: {self}")

    @classmethod
    def of(cls, samples: Iterable[float]) -> Stats:
        values = tuple(float(s) for s in samples)
        if not values:
            raise ValueError("no samples to summarise")
        return cls(statistics.median(values), min(values), max(values), len(values), values)

    def to_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.min, "max": self.max, "runs": self.runs,
                "samples": list(self.samples)}

    @classmethod
    def from_json(cls, f: Fields) -> Stats:
        return cls(f.number("median"), f.number("min"), f.number("max"), f.integer("runs"),
                   tuple(s.as_number() for s in f.items("samples")))


def ratio(ours: float, theirs: float) -> float | None:
    """ours / theirs, or None when it means nothing (a zero or non-finite denominator)."""
    if theirs == 0 or not math.isfinite(theirs) or not math.isfinite(ours):
        return None
    return ours / theirs


@dataclass(frozen=True)
class Baseline:
    """What pvio is compared with, measured in the same run; ratio = pvio / this."""

    subject: str
    stats: Stats
    ratio: float | None

    def to_json(self) -> dict[str, Any]:
        return {"subject": self.subject, **self.stats.to_json(), "ratio": self.ratio}

    @classmethod
    def from_json(cls, f: Fields) -> Baseline:
        return cls(f.string("subject"), Stats.from_json(f), f.optional_number("ratio"))


@dataclass(frozen=True)
class Figure:
    name: str  # the scenario: "1 page, batch 32", "4k-randread-qd1"
    unit: str  # "round trips/s", "µs", "IOPS", "MiB/s"
    stats: Stats
    subject: str = "pvio"
    higher_is_better: bool = True
    baselines: tuple[Baseline, ...] = ()
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "unit": self.unit, "subject": self.subject,
                "higher_is_better": self.higher_is_better, **self.stats.to_json(),
                "baselines": [b.to_json() for b in self.baselines], "note": self.note}

    @classmethod
    def from_json(cls, f: Fields) -> Figure:
        return cls(f.string("name"), f.string("unit"), Stats.from_json(f), f.string("subject"),
                   f.boolean("higher_is_better"),
                   tuple(Baseline.from_json(b) for b in f.items("baselines")), f.string("note"))


def compare(name: str, unit: str, samples: Mapping[str, Sequence[float]], *,
            subject: str | None = None, higher_is_better: bool = True, note: str = "",
            ) -> Figure:
    """A figure from samples keyed by subject: `subject` (default: the first key) is pvio's,
    every other key is a baseline measured in the same run."""
    if not samples:
        raise ValueError("no subjects")
    ours = subject if subject is not None else next(iter(samples))
    mine = Stats.of(samples[ours])
    baselines = tuple(
        Baseline(label, st, ratio(mine.median, st.median))
        for label, st in ((label, Stats.of(v)) for label, v in samples.items() if label != ours)
    )
    return Figure(name, unit, mine, ours, higher_is_better, baselines, note)


def interleave(runs: int, subjects: Mapping[str, Callable[[], float]]) -> dict[str, list[float]]:
    """`runs` samples of each subject, taken round-robin (pvio, baseline, pvio, ...) so that
    a change in the machine's load during the run affects every subject alike."""
    out: dict[str, list[float]] = {label: [] for label in subjects}
    for _ in range(runs):
        for label, fn in subjects.items():
            out[label].append(fn())
    return out
