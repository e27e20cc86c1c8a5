"""`pvio bench blk`: blkback's and blkfront's counters turned into per-request figures,
and the targets.  Figures are never asserted; the counters' arithmetic is.  The layer's
run through real `pvio up` instances, qemu-nbd and fio is checked by tests/bench/test_quick.py."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from pvio.bench import blk
from pvio.bench.blk import CounterLog, Counters, PvioUp
from pvio.bench.harness import fio
from pvio.bench.harness.benchmark import Context, Params
from pvio.bench.harness.figures import Baseline, Figure, Stats
from pvio.cli.main import cli

#: A driver domain's ``statistics`` entry as BlkbackStats.as_keys() writes it.
STATUS_STATS = {
    "/local/domain/0/backend/vbd/1/51712": {
        "oo_req": "0", "rd_req": "900", "wr_req": "80", "f_req": "10", "ds_req": "0",
        "rd_sect": "7200", "wr_sect": "640", "err_req": "10", "batches": "100",
        "notify_sent": "30", "notify_received": "20", "grant_ops": "200",
        "notify_per_req": "0.030", "req_per_batch": "10.000", "grant_ops_per_req": "0.200",
    },
}


def test_counters_from_a_driver_domains_statistics() -> None:
    c = Counters.from_statistics(STATUS_STATS)
    assert c == Counters(requests=1000, batches=100, notify_sent=30, notify_received=20,
                         grant_ops=200)
    two = Counters.from_statistics({**STATUS_STATS, "/other": STATUS_STATS[
        "/local/domain/0/backend/vbd/1/51712"]})
    assert two == c + c and two - c == c
    per = (two - c).per_request()
    assert per == {"requests": 1000, "notifications_per_request": 0.05,
                   "notify_to_frontend_per_request": 0.03,
                   "notify_from_frontend_per_request": 0.02,
                   "frontend_kicks_exact": 0,
                   "requests_per_batch": 10.0, "grant_hypercalls_per_request": 0.2,
                   "backend_round_trips_per_request": 0.0, "guest_cpu_us_per_request": 0.0,
                   "backend_cpu_us_per_request": 0.0, "hypervisor_cpu_us_per_request": 0.0}
    assert Counters().per_request()["notifications_per_request"] == 0  # no division by zero
    ticks = 1e6 / os.sysconf("SC_CLK_TCK")  # CPU time: clock ticks of /proc/<pid>/stat
    cpu = Counters(requests=100, guest_cpu_ticks=3, backend_cpu_ticks=2, hypervisor_cpu_ticks=1).per_request()
    assert cpu["guest_cpu_us_per_request"] == pytest.approx(3 * ticks / 100)
    assert cpu["backend_cpu_us_per_request"] == pytest.approx(2 * ticks / 100)
    assert cpu["hypervisor_cpu_us_per_request"] == pytest.approx(ticks / 100)


def test_cpu_ticks_of_a_process_and_of_none() -> None:
    assert blk._cpu_ticks(os.getpid()) >= 0 and blk._cpu_ticks(0) == 0
    start = blk._cpu_ticks(os.getpid())
    deadline = time.monotonic() + 10
    while blk._cpu_ticks(os.getpid()) == start:  # burn CPU until a tick is counted
        assert time.monotonic() < deadline
        sum(range(10000))


class FakeUp:
    """Stands in for PvioUp: counters() returns the next snapshot."""

    def __init__(self, snapshots: list[Counters | None]) -> None:
        self.snapshots = snapshots

    def counters(self, newer_than: float = 0.0) -> Counters | None:
        return self.snapshots.pop(0)


def test_counter_log_takes_each_runs_difference() -> None:
    log = CounterLog()
    start = Counters(requests=5, batches=5, notify_sent=5, notify_received=5)
    run1 = start + Counters(requests=1000, batches=50, notify_sent=10, notify_received=30)
    run2 = run1 + Counters(requests=2000, batches=100, notify_sent=20, notify_received=20)
    log.serving("pvio map", FakeUp([start, run1, run2, None]))  # type: ignore[arg-type]
    log.after_run("pvio map", "4k-randread-qd32")
    log.after_run("qemu-nbd", "4k-randread-qd32")  # not pvio's: ignored
    log.after_run("pvio map", "4k-randread-qd32")
    log.after_run("pvio map", "1m-read-qd8")  # the status file was not refreshed
    assert log.missing == ["pvio map 1m-read-qd8"]
    (fig,) = log.figures()
    assert (fig.name, fig.subject, fig.unit) == ("4k-randread-qd32", "pvio map",
                                                 "notifications/request")
    assert fig.stats.samples == (0.04, 0.02) and not fig.higher_is_better
    summary = log.summary()["pvio map"]["4k-randread-qd32"]
    assert summary["requests_per_batch"] == 20.0 and summary["requests"] == 1500


def test_targets_are_evaluated_not_asserted() -> None:
    def fig(name: str, unit: str, ours: float, qemu: float) -> Figure:
        return Figure(name, unit, Stats.of([ours]), "pvio map",
                      baselines=(Baseline(fio.QEMU_NBD, Stats.of([qemu]), ours / qemu),))

    figures = [fig("4k-randread-qd32", "IOPS", 9000, 10000),
               fig("1m-read-qd8", "MiB/s", 2200, 2000),
               Figure("4k-randread-qd32", "notifications/request", Stats.of([0.05]),
                      "pvio map", higher_is_better=False)]
    got = {(t["target"].split(" ")[0], t["met"]) for t in blk.targets(figures)}
    assert got == {("4", False), ("1", True), ("4k-randread-qd32", True)}


def test_pvio_up_counters_read_the_driver_status_file(tmp_path: Path) -> None:
    up = PvioUp(tmp_path / "d.img", tmp_path / "n.sock", "map", tmp_path / "state")
    assert up.counters() is None  # no driver domain known yet
    up.driver_status = tmp_path / "driver.status"
    up.driver_status.write_text(json.dumps({"ready": True, "statistics": STATUS_STATS}))
    up.paths.make()
    census = {"domains": [{"domid": 0, "hypercall_frames": 250}, {"domid": 1, "hypercall_frames": 9}]}
    up.paths.status("hypervisor").write_text(json.dumps(census))
    got = up.counters(newer_than=0)
    assert got is not None and (got.requests, got.backend_round_trips) == (1000, 250)  # the driver domain's
    t0 = time.monotonic()
    assert up.counters(newer_than=time.time() + 60) is None  # never refreshed: gives up
    assert time.monotonic() - t0 < blk.STATS_TIMEOUT + 1
    assert "--transport" in up.args and "copy" not in up.args


def test_usage_errors() -> None:
    result = CliRunner().invoke(cli, ["bench", "blk", "--workloads", "4k-nonesuch"])
    assert result.exit_code == 2 and "4k-nonesuch" in result.output
    result = CliRunner().invoke(cli, ["bench", "blk", "--help"])
    assert result.exit_code == 0 and "qemu-nbd" in result.output


def test_frontend_kicks_are_blkfronts_own_count() -> None:
    """With the guest's counters, the frontend's kicks are exact (blkback's wake-ups can
    only under-count them); without, blkback's count is the fallback."""
    guest = {"disks": [{"statistics": {"requests": 1000, "notify_sent": 40}},
                       {"statistics": {"requests": 10, "notify_sent": 10}}]}
    front = Counters.from_guest_status(guest)
    assert (front.frontend_requests, front.frontend_notify_sent) == (1010, 50)
    back = Counters(requests=1010, batches=50, notify_sent=30, notify_received=20)
    per = (back + front).per_request()
    assert per["notify_from_frontend_per_request"] == 50 / 1010
    assert per["notifications_per_request"] == (30 + 50) / 1010 and per["frontend_kicks_exact"] == 1
    only_back = back.per_request()
    assert only_back["notify_from_frontend_per_request"] == 20 / 1010 and only_back["frontend_kicks_exact"] == 0


def test_qemus_round_trips_are_over_blkfronts_requests() -> None:
    """QEMU has no blkback counters: its domain's hypervisor round trips are counted
    per request blkfront sent."""
    qemu = Counters(backend_round_trips=1010) + Counters(frontend_requests=1010, frontend_notify_sent=101)
    per = qemu.per_request()
    assert per["backend_round_trips_per_request"] == 1.0 and per["requests"] == 0
    assert per["notify_from_frontend_per_request"] == 0.1


def test_the_subcommand_passes_its_options_and_resolves_out(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pvio bench blk` runs the layer's SUITE with the user's options, into a relative
    --out made absolute; the measurement itself is faked (tests/bench/test_quick.py runs it)."""
    seen: list[tuple[dict[str, object], Path]] = []

    def fake(params: Params, ctx: Context) -> list[Figure]:
        seen.append((dict(params), ctx.workdir))
        ctx.extra["targets"] = [{"target": "t", "subject": "pvio map", "value": 2.0,
                                 "met": True}]
        return [Figure("4k-randread-qd32", "IOPS", Stats.of([1.0]), "pvio map")]

    monkeypatch.setattr(blk, "SUITE", dataclasses.replace(blk.SUITE, run=fake, tools=()))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(cli, ["bench", "blk", "--quick", "--runs", "1", "--transport",
                                      "map", "--workloads", "1m-read-qd8", "--out", "rel"])
    assert result.exit_code == 0, result.output
    ((params, workdir),) = seen
    assert params == {**blk.SUITE.quick, "runs": 1, "workloads": ["1m-read-qd8"],
                      "subjects": ["pvio map"]}
    assert workdir.is_absolute() and workdir.parent == tmp_path / "rel"
    assert "target: pvio map: t: 2 (met)" in result.output
    assert (tmp_path / "rel" / "results.json").exists()
