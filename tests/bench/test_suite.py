"""`pvio bench` as a suite: it runs, skips what cannot run, reports failures, and writes a
results.json that reads back into the harness's types, and valid PNG plots.  Figures are
never asserted."""

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

from pvio.bench.harness import registry, runner
from pvio.bench.harness.benchmark import Benchmark, Context, Params
from pvio.bench.harness.figures import Figure, Stats, compare, interleave, ratio
from pvio.bench.harness.jsondoc import DocumentError
from pvio.bench.harness.profile import summarise_speedscope
from pvio.bench.harness.registry import LAYERS, MATRIX, Layer
from pvio.bench.harness.runner import SuiteReport
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
    samples = interleave(runs, {"pvio": lambda: 2.0, "echo": lambda: 1.0,
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
        registry.register(b)
    yield
    for b in (FAKE, SKIPPED, BROKEN, HANGING):
        registry.unregister(b.name)


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


def _read(path: Path) -> dict[str, Any]:
    """results.json, after checking that it reads back into a SuiteReport."""
    doc: dict[str, Any] = json.loads(path.read_text())
    SuiteReport.from_json(doc)
    return doc


def _invoke(*args: str) -> Any:
    return CliRunner().invoke(cli, ["bench", *args], catch_exceptions=False)


def test_quick_suite_writes_valid_json_and_plots(tmp_path: Path) -> None:
    out = tmp_path / "results"
    result = _invoke("--quick", "--only", "ring,fake,fake-skipped", "--out", str(out))
    assert result.exit_code == 0, result.output
    assert "[1/3] ring: running" in result.output  # plain progress lines off a terminal
    assert "fake: measuring the fake" in result.output
    assert "skipped: no-such-tool-pvio-bench is not installed" in result.output

    doc = _read(out / "results.json")
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
    return registry.load_benchmark(name).quick


def test_a_failing_benchmark_is_reported_and_the_suite_goes_on(tmp_path: Path) -> None:
    result = _invoke("--quick", "--only", "fake-broken,fake", "--out", str(tmp_path))
    assert result.exit_code == 1
    assert "failed: RuntimeError: the fake daemon died" in result.output
    doc = _read(tmp_path / "results.json")
    broken, fake = doc["benchmarks"]
    assert broken["status"] == "failed" and "the fake daemon died" in broken["extra"]["traceback"]
    assert fake["status"] == "ok"


def test_a_hanging_benchmark_times_out_and_its_processes_are_stopped(tmp_path: Path) -> None:
    t0 = time.monotonic()
    result = runner.run_benchmark("fake-hanging", "quick", tmp_path, runner.Observer())
    assert time.monotonic() - t0 < 20
    assert result.status == "failed" and result.reason == "BenchmarkTimeout: timed out after 1.5 s"
    (leftover,) = result.extra["stopped_leftover_processes"]
    assert "time.sleep(60)" in leftover
    assert not any("time.sleep(60)" in cmd for cmd in runner.children().values())


def test_without_matplotlib_the_json_is_still_written(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    result = _invoke("--quick", "--only", "fake", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    assert "pip install 'pvio[bench]'" in result.output
    doc = _read(tmp_path / "results.json")
    assert doc["benchmarks"][0]["plot"] is None
    assert any("matplotlib is not installed" in n for n in doc["notes"])
    assert not list(tmp_path.glob("*.png"))


def test_every_layer_has_its_suite() -> None:
    for name in MATRIX:
        loaded = registry.load_benchmark(name)
        assert isinstance(loaded, Benchmark) and loaded.name == name


def test_a_layer_without_suite_fails_to_load(tmp_path: Path,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(LAYERS, "nosuite", Layer("pvio.bench.harness.plots"))
    result = runner.run_benchmark("nosuite", "quick", tmp_path, runner.Observer())
    assert result.status == "failed"
    assert "pvio.bench.harness.plots.SUITE is not a" in result.reason


def test_usage_errors() -> None:
    result = CliRunner().invoke(cli, ["bench", "--only", "ring,nonesuch"])
    assert result.exit_code == 2 and "nonesuch" in result.output
    result = CliRunner().invoke(cli, ["bench", "--quick", "ring"])
    assert result.exit_code == 2 and "whole suite" in result.output


def test_profile_writes_a_profile_per_benchmark(tmp_path: Path) -> None:
    result = _invoke("--quick", "--only", "fake", "--profile", "--out", str(tmp_path))
    assert result.exit_code == 0, result.output
    doc = _read(tmp_path / "results.json")
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
    with pytest.raises(ValueError, match="not a finite number"):
        Stats.of([1.0, math.nan])  # a failed measurement, never a figure
    assert ratio(1.0, 0.0) is None and ratio(math.inf, 1.0) is None
    order: list[str] = []
    interleave(2, {"a": lambda: order.append("a") or 1.0,
                         "b": lambda: order.append("b") or 1.0})
    assert order == ["a", "b", "a", "b"]
    fig = compare("x", "u", {"base": [1.0], "pvio": [3.0]}, subject="pvio")
    assert fig.subject == "pvio" and fig.baselines[0].ratio == 3.0


def _valid_doc(tmp_path: Path) -> dict[str, Any]:
    report = runner.run_suite(["fake", "fake-skipped"], "quick", tmp_path, runner.Observer())
    doc: dict[str, Any] = json.loads(json.dumps(report.to_json()))
    return doc


def _median(d: dict[str, Any]) -> None:
    d["benchmarks"][0]["figures"][0]["median"] = "fast"


@pytest.mark.parametrize(
    ("mutate", "expected"),
    [
        (lambda d: d.pop("machine"), "$: missing 'machine'"),
        (lambda d: d.update(mode="slow"), "$.mode: expected one of quick, full"),
        (lambda d: d["machine"].update(cores="two"), "$.machine.cores: expected an integer"),
        (lambda d: d["benchmarks"][1].update(status="maybe"),
         "$.benchmarks[1].status: expected one of ok, skipped, failed"),
        (_median, "$.benchmarks[0].figures[0].median: expected a finite number, got str"),
        (lambda d: d["benchmarks"][0]["figures"][1]["baselines"][0].pop("ratio"),
         "$.benchmarks[0].figures[1].baselines[0]: missing 'ratio'"),
        (lambda d: d["tools"].update(fio=3), "$.tools.fio: expected a string"),
    ],
)
def test_reading_back_names_what_is_wrong(mutate: Any, expected: str, tmp_path: Path) -> None:
    doc = _valid_doc(tmp_path)
    back = SuiteReport.from_json(doc)
    assert [r.to_json() for r in back.results] == doc["benchmarks"]  # the same document
    mutate(doc)
    with pytest.raises(DocumentError) as error:
        SuiteReport.from_json(doc)
    assert str(error.value).startswith(expected), error.value


@pytest.mark.parametrize("width", [80, 150])
def test_the_table_fits_narrow_and_wide_terminals(width: int, tmp_path: Path) -> None:
    from rich.console import Console

    from pvio.bench.harness import report

    rep = runner.run_suite(["fake", "fake-skipped"], "quick", tmp_path, runner.Observer())
    console = Console(width=width, record=True, file=open(os.devnull, "w"))  # noqa: SIM115
    console.print(report.table(rep) if width >= 130 else report.compact_table(rep))
    text = console.export_text()
    console.file.close()
    assert max(len(line) for line in text.splitlines()) <= width
    assert "qemu-nbd" in text and "fake-skipped" in text and "skipped:" in text
    for shown in ("2.00", "0.50", "0.55", "0.40"):  # echo, direct; map, copy / qemu-nbd
        assert shown in text


def _forking_run(params: Params, ctx: Context) -> list[Figure]:
    pid = os.fork()
    if pid == 0:  # the child raises into the suite's code, which must not go on in it
        raise RuntimeError("a forked child escaped its benchmark")
    _, status = os.waitpid(pid, 0)
    return [compare("the child's exit code", "code", {"pvio": [os.waitstatus_to_exitcode(status)]})]


def test_a_forked_child_never_runs_the_rest_of_the_suite(tmp_path: Path) -> None:
    registry.register(Benchmark("fake-fork", "forks", _forking_run, quick={}, full={}))
    try:
        result = runner.run_benchmark("fake-fork", "quick", tmp_path, runner.Observer())
    finally:
        registry.unregister("fake-fork")
    assert result.status == "ok", result.reason
    assert result.figures[0].stats.median == 1


def test_a_relative_out_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = _invoke("--quick", "--only", "fake", "--out", "rel")
    assert result.exit_code == 0, result.output
    assert f"results: {tmp_path / 'rel' / 'results.json'}" in result.output
    assert _read(tmp_path / "rel" / "results.json")["benchmarks"][0]["status"] == "ok"
