"""`pvio bench` as a suite: it runs, skips what cannot run, reports failures, and writes a
results.json that matches its schema and valid PNG plots.  Figures are never asserted."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from pvio.bench import suite
from pvio.bench.cli import BENCHMARKS
from pvio.bench.profile import summarise_speedscope
from pvio.bench.suite import Benchmark, Context, Figure, Params, Stats, compare
from pvio.cli.main import cli

CHILD_WORK = "import time\nt = time.time()\nwhile time.time() - t < 0.3: sorted(range(500))"


def _busy_in_the_suite(seconds: float) -> None:
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        sorted(range(500))


def _fake_run(params: Params, ctx: Context) -> list[Figure]:
    ctx.progress("measuring the fake")
    _busy_in_the_suite(0.3)  # something for a profiler to see in this process
    argv = ctx.command([sys.executable, "-c", CHILD_WORK])
    subprocess.run(argv, check=True, timeout=30)
    (ctx.workdir / "scratch").write_text("x")
    ctx.extra["counters"] = {"notifications_per_request": 0.5}
    runs = int(params["runs"])
    samples = suite.interleave(runs, {"pvio": lambda: 2.0, "echo": lambda: 1.0,
                                      "direct": lambda: 4.0})
    return [
        compare("read", "µs", samples, higher_is_better=False),
        compare("4k-randread-qd1", "IOPS", {"pvio map": [10.0, 12.0, 11.0],
                                            "qemu-nbd": [20.0, 21.0, 19.0]}),
        compare("4k-randread-qd1", "IOPS", {"pvio copy": [8.0, 9.0, 7.0],
                                            "qemu-nbd": [20.0, 21.0, 19.0]}),
        compare("no baseline", "count", {"pvio": [1.0]}),
    ]


def _broken_run(params: Params, ctx: Context) -> list[Figure]:
    raise RuntimeError("the fake daemon died")


def _hanging_run(params: Params, ctx: Context) -> list[Figure]:
    subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # never stopped
    time.sleep(60)
    return []


FAKE = Benchmark("fake", "a fast fake", _fake_run, quick={"runs": 3}, full={"runs": 5})
SKIPPED = Benchmark("fake-skipped", "needs a tool", _fake_run, quick={"runs": 1},
                    full={"runs": 1}, tools=("no-such-tool-pvio-bench",))
BROKEN = Benchmark("fake-broken", "raises", _broken_run, quick={}, full={})
HANGING = Benchmark("fake-hanging", "hangs", _hanging_run, quick={"timeout_s": 1.5}, full={})


@pytest.fixture(autouse=True)
def fakes() -> Iterator[None]:
    for b in (FAKE, SKIPPED, BROKEN, HANGING):
        suite.register(b)
    yield
    for b in (FAKE, SKIPPED, BROKEN, HANGING):
        suite.unregister(b.name)


def _is_png(path: Path) -> bool:
    """PNG signature, an IHDR with a sane size, and every chunk's CRC right."""
    data = path.read_bytes()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return False
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        if zlib.crc32(kind + body) != crc:
            return False
        kinds.append(kind)
        pos += 12 + length
    width, height = struct.unpack(">II", data[16:24])
    return kinds[0] == b"IHDR" and kinds[-1] == b"IEND" and 0 < width < 5000 and 0 < height < 5000


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, ["bench", *args], catch_exceptions=False)


def test_quick_suite_writes_valid_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = _invoke("--quick", "--only", "ring,fake,fake-skipped", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "[1/3] ring: running" in result.output  # plain progress lines off a terminal
    assert "fake: measuring the fake" in result.output
    assert "skipped: no-such-tool-pvio-bench is not installed" in result.output

    doc = json.loads((out / "results.json").read_text())
    assert suite.validate(doc) == []
    assert doc["mode"] == "quick" and doc["command"][:2] == ["pvio", "bench"]
    assert doc["machine"]["cores"] >= 1 and doc["machine"]["memory_bytes"] > 0
    assert "fio" not in doc["tools"] or doc["tools"]["fio"].startswith("fio")
    by_name = {b["name"]: b for b in doc["benchmarks"]}
    assert [b["name"] for b in doc["benchmarks"]] == ["ring", "fake", "fake-skipped"]
    assert by_name["fake-skipped"]["status"] == "skipped"
    assert by_name["fake-skipped"]["figures"] == []

    ring = by_name["ring"]
    assert ring["status"] == "ok" and ring["params"] == dict(suite_params("ring"))
    assert {f["unit"] for f in ring["figures"]} == {"round trips/s", "ns per call"}
    for f in ring["figures"]:
        assert f["runs"] == len(f["samples"]) == 3
        assert f["min"] <= f["median"] <= f["max"]
        assert all(b["ratio"] == pytest.approx(f["median"] / b["median"])
                   for b in f["baselines"])

    fake = by_name["fake"]
    assert fake["status"] == "ok"
    assert fake["commands"] == [[sys.executable, "-c", CHILD_WORK]]
    assert fake["extra"]["counters"] == {"notifications_per_request": 0.5}
    read = fake["figures"][0]
    assert read["higher_is_better"] is False and read["samples"] == [2.0, 2.0, 2.0]
    assert [(b["subject"], b["ratio"]) for b in read["baselines"]] == [("echo", 2.0),
                                                                       ("direct", 0.5)]
    assert fake["figures"][3]["baselines"] == []

    for name in ("ring", "fake"):
        assert by_name[name]["plot"] == f"{name}.png"
        assert _is_png(out / f"{name}.png")
    assert _is_png(out / "ratios.png")
    md = (out / "results.md").read_text()
    assert "| fake | read | µs ↓ | 2.00 | 2.00..2.00 | 3 | echo | 1.00 | 2.00 |" in md
    assert "|  |  |  |  |  |  | direct | 4.00 | 0.50 |" in md
    assert "| fake-skipped | skipped: no-such-tool-pvio-bench is not installed" in md
    assert not list(out.glob("pvio-bench-*"))  # scratch directories are removed


def suite_params(name: str) -> Params:
    loaded = suite.load_benchmark(name)
    assert isinstance(loaded, Benchmark)
    return loaded.quick


def test_a_failing_benchmark_is_reported_and_the_suite_goes_on(tmp_path: Path) -> None:
    result = _invoke("--quick", "--only", "fake-broken,fake", "--out", str(tmp_path))
    assert result.exit_code == 1
    assert "failed: RuntimeError: the fake daemon died" in result.output
    doc = json.loads((tmp_path / "results.json").read_text())
    assert suite.validate(doc) == []
    broken, fake = doc["benchmarks"]
    assert broken["status"] == "failed" and "the fake daemon died" in broken["extra"]["traceback"]
    assert fake["status"] == "ok"


def test_a_hanging_benchmark_times_out_and_its_processes_are_stopped(tmp_path: Path) -> None:
    t0 = time.monotonic()
    result = suite.run_benchmark("fake-hanging", "quick", tmp_path, suite.Observer())
    assert time.monotonic() - t0 < 20
    assert result.status == "failed" and result.reason == "BenchmarkTimeout: timed out after 1.5 s"
    (leftover,) = result.extra["stopped_leftover_processes"]
    assert "time.sleep(60)" in leftover
    assert not any("time.sleep(60)" in cmd for cmd in suite.children().values())


def test_without_matplotlib_the_json_is_still_written(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = _invoke("--quick", "--only", "fake", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "pip install 'pvio[bench]'" in result.output
    doc = json.loads((tmp_path / "results.json").read_text())
    assert suite.validate(doc) == []
    assert doc["benchmarks"][0]["plot"] is None
    assert any("matplotlib is not installed" in n for n in doc["notes"])
    assert not list(tmp_path.glob("*.png"))


def test_layers_not_built_are_skipped_with_the_reason(tmp_path: Path) -> None:
    for name in suite.MATRIX:
        loaded = suite.load_benchmark(name)
        if isinstance(loaded, str):
            assert loaded == f"pvio bench {name} is not built yet"
        elif loaded.requires() is not None:  # an adapter waiting for its layer
            result = suite.run_benchmark(name, "quick", tmp_path, suite.Observer())
            assert result.status == "skipped" and result.reason == loaded.requires()
    blk = suite.load_benchmark("blk")
    assert isinstance(blk, Benchmark) and blk.name == "blk"


def test_a_module_without_suite_is_skipped(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(BENCHMARKS, "nosuite", ("pvio.bench.plots:available", "no SUITE here"))
    reason = suite.load_benchmark("nosuite")
    assert isinstance(reason, str) and "pvio.bench.plots defines no SUITE" in reason


def test_usage_errors() -> None:
    result = CliRunner().invoke(cli, ["bench", "--only", "ring,nonesuch"])
    assert result.exit_code == 2 and "nonesuch" in result.output
    result = CliRunner().invoke(cli, ["bench", "--quick", "ring"])
    assert result.exit_code == 2 and "whole suite" in result.output


def test_profile_writes_a_profile_per_benchmark(tmp_path: Path) -> None:
    result = _invoke("--quick", "--only", "fake", "--profile", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    doc = json.loads((tmp_path / "results.json").read_text())
    assert suite.validate(doc) == []
    files = [Path(p) for p in doc["benchmarks"][0]["profile"]]
    assert files and all(p.exists() for p in files)
    summary = tmp_path / "profile" / "fake.txt"
    assert summary in files
    if doc["profiler"] == "py-spy" and (tmp_path / "profile" / "fake.speedscope.json").exists():
        text = summary.read_text()
        assert "_busy_in_the_suite" in text  # the suite's process
        assert CHILD_WORK.splitlines()[0] in text or "<module>" in text  # the child's
    else:
        assert doc["profiler"] in ("cProfile", "py-spy")
        assert (tmp_path / "profile" / "fake.pstats").exists()


def test_summarise_speedscope() -> None:
    doc = {
        "shared": {"frames": [
            {"name": 'process 7:"pvio xenstored"', "file": "", "line": 0},
            {"name": "serve", "file": "server.py", "line": 10},
            {"name": "parse", "file": "codec.py", "line": 20},
            {"name": 'process 6:"pvio bench"', "file": "", "line": 0},
        ]},
        "profiles": [{"name": 'Process 7 Thread 7 ""',
                      "samples": [[3, 0, 1, 2], [3, 0, 1, 2], [3, 0, 1], []],
                      "weights": [1, 1, 1, 1]}],
    }
    text = summarise_speedscope(doc)
    assert '== process 7:"pvio xenstored"  (3 samples' in text  # the child, not its parent
    assert "pvio bench" not in text
    self_part = text.split("self:")[1].split("total:")[0]
    total_part = text.split("left out):")[1]
    assert self_part.splitlines()[1].split() == ["2", "parse", "codec.py:20"]
    assert total_part.splitlines()[1].split() == ["3", "serve", "server.py:10"]


def test_stats_ratio_and_interleave() -> None:
    st = Stats.of([3, 1, 2, 10])
    assert (st.median, st.min, st.max, st.runs) == (2.5, 1, 10, 4)
    with pytest.raises(ValueError):
        Stats.of([])
    assert suite.ratio(1.0, 0.0) is None and suite.ratio(math.inf, 1.0) is None
    order: list[str] = []
    suite.interleave(2, {"a": lambda: order.append("a") or 1.0,
                         "b": lambda: order.append("b") or 1.0})
    assert order == ["a", "b", "a", "b"]
    fig = compare("x", "u", {"base": [1.0], "pvio": [3.0]}, subject="pvio")
    assert fig.subject == "pvio" and fig.baselines[0].ratio == 3.0


def _valid_doc() -> dict[str, Any]:
    report = suite.run_suite(["fake-skipped"], "quick", Path("."), suite.Observer())
    return report.to_json()


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.pop("machine"), "missing 'machine'"),
        (lambda d: d.update(mode="slow"), "'slow' is not one of"),
        (lambda d: d["machine"].update(cores="two"), "$.machine.cores: expected integer"),
        (lambda d: d["benchmarks"][0].update(status="maybe"), "is not one of"),
        (lambda d: d["benchmarks"][0]["figures"].append(
            {"name": "x", "unit": "u", "subject": "pvio", "higher_is_better": True,
             "median": math.nan, "min": 1, "max": 1, "runs": 1, "samples": [1],
             "baselines": [], "note": ""}), "figures[0].median: expected number"),
        (lambda d: d["tools"].update(fio=3), "$.tools.fio: expected string"),
    ],
)
def test_validate_finds_what_is_wrong(mutate: Any, expected: str) -> None:
    doc = _valid_doc()
    assert suite.validate(doc) == []
    mutate(doc)
    problems = suite.validate(doc)
    assert any(expected in p for p in problems), problems


@pytest.mark.parametrize("width", [80, 150])
def test_the_table_fits_narrow_and_wide_terminals(width: int, tmp_path: Path) -> None:
    from rich.console import Console

    from pvio.bench import report

    rep = suite.run_suite(["fake", "fake-skipped"], "quick", tmp_path, suite.Observer())
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(report.table(rep) if width >= 130 else report.compact_table(rep))
    text = console.export_text()
    console.file.close()
    assert max(len(line) for line in text.splitlines()) <= width
    assert "qemu-nbd" in text and "fake-skipped" in text and "skipped:" in text
    for ratio in ("2.00", "0.50", "0.55", "0.40"):  # echo, direct; map, copy / qemu-nbd
        assert ratio in text


def _forking_run(params: Params, ctx: Context) -> list[Figure]:
    pid = os.fork()
    if pid == 0:  # the child raises into the suite's code, which must not go on in it
        raise RuntimeError("a forked child escaped its benchmark")
    _, status = os.waitpid(pid, 0)
    return [compare("the child's exit code", "code", {"pvio": [os.waitstatus_to_exitcode(status)]})]


def test_a_forked_child_never_runs_the_rest_of_the_suite(tmp_path: Path) -> None:
    suite.register(Benchmark("fake-fork", "forks", _forking_run, quick={}, full={}))
    try:
        result = suite.run_benchmark("fake-fork", "quick", tmp_path, suite.Observer())
    finally:
        suite.unregister("fake-fork")
    assert result.status == "ok", result.reason
    assert result.figures[0].stats.median == 1
