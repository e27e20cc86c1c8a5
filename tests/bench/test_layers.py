"""Each layer's SUITE turns the layer's own measurements into figures.  The measuring
functions are replaced by fakes returning recorded output, so these run anywhere."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from pvio.bench import nbd
from pvio.bench.harness import fio
from pvio.bench.harness.benchmark import Context
from pvio.bench.harness.figures import Figure
from pvio.bench.harness.registry import load_benchmark


def _by_name(figures: list[Figure]) -> dict[str, Figure]:
    return {f.name: f for f in figures}


def test_hypervisor_suite_keeps_every_runs_samples(monkeypatch: pytest.MonkeyPatch,
                                                  tmp_path: Path) -> None:
    from pvio.bench import hypervisor as hv

    measures = [
        hv.Measure("hypercall round trip", "µs", [80.0, 70.0, 75.0], {hv.ECHO: [25.0, 24.0, 26.0]}),
        hv.Measure("map+unmap 11 grants (map transport)", "µs", [330.0, 300.0, 326.0],
                   note="11 grants; 2 round trips"),
        hv.Measure("GNTTABOP_copy 4 KiB per call", "MB/s", [34.0, 36.0, 35.0],
                   {hv.MAP_MEMCPY: [8750.0, 8686.0, 9000.0]}, higher_is_better=True),
        hv.Measure("event notify-to-wake (one way), two CPUs", "µs", [30.0, 31.0, 29.0],
                   {hv.PINGPONG: [10.0, 10.0, 10.0], hv.PINGPONG_LOOP: [15.0, 15.0, 15.0]}),
        hv.Measure("compare-and-swap (ctypes + libatomic)", "ns", [809.0, 800.0, 804.0]),
    ]
    monkeypatch.setattr(hv, "measure", lambda quick: measures)
    assert load_benchmark("hypervisor") is hv.SUITE
    figures = _by_name(hv.SUITE.run(hv.SUITE.quick, Context(tmp_path)))
    rtt = figures["hypercall round trip"]
    assert (rtt.unit, rtt.higher_is_better, rtt.stats.samples) == ("µs", False, (80.0, 70.0, 75.0))
    (echo,) = rtt.baselines
    assert echo.subject == hv.ECHO and echo.ratio == pytest.approx(75.0 / 25.0)
    copy = figures["GNTTABOP_copy 4 KiB per call"]
    assert copy.higher_is_better and copy.baselines[0].stats.samples == (8750.0, 8686.0, 9000.0)
    assert figures["map+unmap 11 grants (map transport)"].baselines == ()
    wake = figures["event notify-to-wake (one way), two CPUs"]
    assert [b.ratio for b in wake.baselines] == [3.0, 2.0]
    # The subcommand's table, as it always read.
    assert hv.rows(measures) == [
        ("hypercall round trip", "75.0 µs", "25.0 µs (bare SEQPACKET echo)", "3.00x"),
        ("map+unmap 11 grants (map transport)", "326 µs", "29.6 µs/grant", "2 round trips"),
        ("GNTTABOP_copy 4 KiB per call", "35 MB/s", "8750 MB/s (map transport memcpy)",
         "250.0x slower"),
        ("event notify-to-wake (one way), two CPUs", "30.0 µs",
         "10.0 µs (bare eventfd ping-pong, blocking read)", "3.00x"),
        ("  same, baseline on the same event loop", "30.0 µs",
         "15.0 µs (bare eventfd ping-pong, add_reader, same loop)", "2.00x"),
        ("compare-and-swap (ctypes + libatomic)", "804 ns", "", ""),
    ]


def test_xenstore_suite(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls = []

    def measure(tmp: Path, iterations: int, runs: int, idle: int) -> dict[str, list[float]]:
        calls.append((tmp, iterations, runs, idle))
        return {"echo": [10_000, 11_000], "read": [20_000, 22_000], "write": [30_000, 30_000],
                "transaction": [90_000, 100_000], "read_idle": [21_000, 21_000],
                "echo_idle": [10_500, 10_500], "pvio_ring_read": [40_000, 44_000],
                "pvio_socket_read": [50_000, 50_000], "pvio_ring_transaction": [200_000, 200_000],
                "pvio_socket_transaction": [250_000, 250_000], "xen_ring_read": [20_000, 20_000],
                "xen_socket_read": [16_000, 16_000], "xen_ring_transaction": [80_000, 80_000],
                "xen_socket_transaction": [100_000, 100_000]}

    from pvio.bench import xenstore as xs

    monkeypatch.setattr(xs, "measure", measure)
    assert load_benchmark("xenstore") is xs.SUITE
    ctx = Context(tmp_path)
    figures = _by_name(xs.SUITE.run({"runs": 2, "iterations": 50, "idle": 7}, ctx))
    ((short, *args),) = calls
    assert args == [50, 2, 7] and short != tmp_path  # sockets: not under the output folder
    assert short.is_absolute() and len(str(short)) < 60 and not short.exists()
    read = figures["read"]
    assert read.stats.samples == (20.0, 22.0) and not read.higher_is_better
    assert read.baselines[0].ratio == pytest.approx(21.0 / 10.5)
    assert figures["read, 7 idle connections"].baselines[0].stats.median == 10.5
    assert ctx.commands[0] == ["pvio", "xenstored", "--socket", str(short / "xs.sock")]
    ring = figures["a domain's read: ring and socket"]
    assert ring.subject == "pvio ring" and ring.stats.median == 42.0
    assert [(b.subject, b.ratio) for b in ring.baselines] == [
        ("pvio socket", pytest.approx(42.0 / 50.0)), ("C xenstored ring", pytest.approx(42.0 / 20.0)),
        ("C xenstored socket", pytest.approx(42.0 / 16.0))]
    tx = figures["a domain's transaction: ring and socket"]
    assert [b.stats.median for b in tx.baselines] == [250.0, 80.0, 100.0]


def test_direct_io_uring_command() -> None:
    job = fio.FioJob("4k-randread-qd32", "randread", "4k", 32)
    argv = fio.direct_command(Path("/img"), job)
    assert argv == ["fio", "--ioengine=io_uring", "--filename=/img", "--name=4k-randread-qd32",
                    "--rw=randread", "--bs=4k", "--iodepth=32", "--size=256m",
                    "--output-format=json", "--runtime=5.0", "--time_based",
                    "--ramp_time=1.0"]
    assert fio.ramp_time(2.0) == 0.5 and fio.ramp_time(0.5) == 0.5  # short runs, a short ramp
    assert {w.name for w in fio.STANDARD_JOBS} >= set(nbd.QUICK_WORKLOADS)
    assert load_benchmark("nbd") is nbd.SUITE


def test_the_servers_sockets_live_in_a_short_directory(tmp_path: Path) -> None:
    """Not under the output folder: a UNIX socket's path must fit in sun_path (107 bytes),
    and qemu-nbd wants it absolute."""
    seen: list[Path] = []

    @contextlib.contextmanager
    def server(image: Path, sock: Path) -> contextlib.Generator[str]:
        seen.append(sock)
        assert sock.parent.is_dir()
        yield "nbd+unix:///?socket=" + str(sock)

    image = tmp_path / "disk.img"
    image.write_bytes(b"pvio" * 1024)
    with fio._serving({"s": server}, image) as uris:
        assert uris == {"s": "nbd+unix:///?socket=" + str(seen[0])}
    (sock,) = seen
    assert sock.is_absolute() and len(str(sock)) < 60 and not sock.parent.exists()


def test_each_server_serves_its_own_copy_of_the_image(tmp_path: Path) -> None:
    served: list[Path] = []

    @contextlib.contextmanager
    def server(image: Path, sock: Path) -> contextlib.Generator[str]:
        served.append(image)
        assert image.read_bytes() == b"pvio" * 1024  # an identical copy
        yield "nbd+unix:///?socket=" + str(sock)

    image = tmp_path / "disk.img"
    image.write_bytes(b"pvio" * 1024)
    with fio._serving({"a": server, "b": server}, image):
        assert len(set(served)) == 2 and image not in served
    assert not any(p.exists() for p in served) and image.exists()  # the copies go afterwards
