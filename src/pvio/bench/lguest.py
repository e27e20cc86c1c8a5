"""`pvio bench lguest`: lguest's LAN and disk next to what the kernel does without them.

* TCP throughput and ping round trip between two network namespaces joined by pvio's
  lguest LAN (a TAP in each namespace, two in-process guests on one LAN page, every frame
  taking the guest processes' frame path (pvio.domains.netpath) through one guest's
  driver and DMAed into the other's receive buffers by pvio's hypervisor core, the
  daemon's own, run in this Python process without its socket), next to a veth pair
  between two namespaces measured in the same run (the kernel's own limit on this
  machine).  iperf3 and ping run as real processes in the namespaces.
* Block: 4 KiB random reads through the guest's lguest block driver, the hypervisor
  core and the Launcher's block device (one request in flight, as the protocol has it)
  from an image file, next to os.pread of the same blocks from the same file.

* Processes (`--only processes`, part of the default): the same TCP and ping between
  two lguest guests that are real domain processes over `pvio hypervisor` (each with
  its Launcher process, started as the toolstack starts them), next to the veth pair in
  the same run; TCP again on a LAN whose MTU is the largest (MAX_MTU, 65521: frames of
  up to 16 pages, one SEND_DMA each); and 4 KiB random reads through guest g1's NBD
  export (NBD client -> guest process -> lguest block driver -> SEND_DMA -> Launcher
  process -> image -> SEND_DMA back), next to os.pread of the same image.

Each scenario runs `--runs` times, interleaved with its baseline; the table shows
medians and the ratio pvio / baseline.  Needs root (namespaces, TAP).  The in-process
rows bound the Python data path; the process rows add the hypercall round trips
(every batch of SEND_DMAs is a request to the hypervisor process and back, and every
interrupt a push).  What bounds TCP is the cost per frame, nearly the same for 1514
bytes as for 64 KiB: a TAP read, a batch's share of a round trip, the hypervisor's
copy, a push and a TAP write, each in Python, on a machine whose two cores also run
both TCP stacks and iperf3.  The veth pair moves 64 KiB segments (GSO) in the kernel,
so only the jumbo LAN is comparable per frame.
"""

from __future__ import annotations

import asyncio
import json
import mmap
import os
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from pvio.bench.harness.benchmark import Benchmark, Context
from pvio.bench.harness.figures import Figure, compare
from pvio.bench.netbase import Row, VethPair, iperf_received, ping_average_us
from pvio.domains.netpath import NetPath
from pvio.domains.tap import TapInterface, create_tap, netns_name, remove_namespace
from pvio.lguest.net import ETH_DATA_LEN, MAX_MTU
from pvio.testing.lguest_world import Lan, LguestWorld, build_guest, net_path
from pvio.testing.up import LanGuest, UpProcess, lguest_config

#: The target: at least this share of the veth pair's TCP throughput.
TARGET_TCP_RATIO = 0.25
#: The LAN MTU of the second TCP row: the largest a LAN may have.
JUMBO_MTU = MAX_MTU


async def _run(*cmd: str, timeout: float) -> str:
    proc = await asyncio.create_subprocess_exec(*cmd, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    if proc.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed:\n{out.decode(errors='replace')}")
    return out.decode(errors="replace")


async def _iperf(client_ns: str, server_ns: str, seconds: float) -> float:
    """Bits per second, client -> server."""
    server = await asyncio.create_subprocess_exec(
        "ip", "netns", "exec", server_ns, "iperf3", "-s", "-1", "-p", "5201",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    last = ""
    timeouts = 0
    try:
        for _attempt in range(10):
            try:
                out = await _run("ip", "netns", "exec", client_ns, "iperf3", "-c", "10.0.0.2",
                                 "-p", "5201", "-t", str(seconds), "-J",
                                 timeout=seconds + 30)
            except click.ClickException as exc:
                last = str(exc)
                await asyncio.sleep(0.2)  # the server was not listening yet
                continue
            except TimeoutError:  # a run that stalled (a loaded machine): once more, at most
                timeouts += 1
                if timeouts > 1:
                    raise
                last = "iperf3 stalled"
                continue
            bps, last = iperf_received(out)
            if bps is None:
                await asyncio.sleep(0.2)
                continue
            return bps
        raise click.ClickException(f"iperf3 never connected: {last}")
    finally:
        if server.returncode is None:
            server.kill()
        await server.wait()


async def _ping(ns: str, count: int) -> float:
    """Average round trip in microseconds."""
    out = await _run("ip", "netns", "exec", ns, "ping", "-q", "-c", str(count), "-i", "0.01",
                     "-W", "2", "10.0.0.2", timeout=60)
    return ping_average_us(out)


class _LguestLan:
    def __init__(self, tag: str) -> None:
        self.names = [f"bl1-{tag}", f"bl2-{tag}"]
        self.taps: list[TapInterface] = []
        self.paths: list[NetPath] = []

    def __enter__(self) -> list[str]:
        lan = Lan(LguestWorld())
        rigs = [build_guest(lan.world, n, lan=lan, console=False) for n in self.names]
        try:
            for i, rig in enumerate(rigs):
                assert rig.net is not None
                rig.net.open()
                self.taps.append(create_tap(self.names[i], address=f"10.0.0.{i + 1}/24",
                                            mac=rig.net.mac))
        except BaseException:
            self.__exit__()
            raise
        loop = asyncio.get_running_loop()
        self.paths = [net_path(rig, tap, loop) for rig, tap in zip(rigs, self.taps, strict=True)]
        return [t.netns for t in self.taps]

    def __exit__(self, *exc: object) -> None:
        for path in self.paths:
            path.stop()
        for tap in self.taps:
            tap.close()
        for n in self.names:
            remove_namespace(netns_name(n))


async def _network(seconds: float, runs: int) -> list[Row]:
    tag = secrets.token_hex(3)
    tcp: dict[str, list[float]] = {"pvio": [], "veth": []}
    rtt: dict[str, list[float]] = {"pvio": [], "veth": []}
    for _ in range(runs):
        with VethPair((f"bv1-{tag}", f"bv2-{tag}"), "vb0", "10.0.0") as ns:
            tcp["veth"].append(await _iperf(ns[0], ns[1], seconds))
            rtt["veth"].append(await _ping(ns[0], 20))
        with _LguestLan(tag) as ns:
            await _ping(ns[0], 2)  # ARP settled before measuring
            tcp["pvio"].append(await _iperf(ns[0], ns[1], seconds))
            rtt["pvio"].append(await _ping(ns[0], 20))
    t_p, t_b = statistics.median(tcp["pvio"]) / 1e6, statistics.median(tcp["veth"]) / 1e6
    r_p, r_b = statistics.median(rtt["pvio"]), statistics.median(rtt["veth"])
    return [
        Row("TCP g1->g2 (iperf3)", "Mbit/s", t_p, t_b, t_p / t_b),
        Row("ping round trip", "us", r_p, r_b, r_b / r_p),  # higher is better, as for TCP
    ]


async def _nbd_iops(uri: str, size: int, seconds: float) -> float:
    from pvio.nbd.client_asyncio import NbdClient

    client = await NbdClient.connect(uri)
    rng = random.Random(2)
    try:
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            await client.read(rng.randrange(0, size // 4096) * 4096, 4096)
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        await client.close()


def _pread_iops(path: str, size: int, seconds: float) -> float:
    fd = os.open(path, os.O_RDONLY)
    rng = random.Random(2)
    try:
        n = 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            os.pread(fd, 4096, rng.randrange(0, size // 4096) * 4096)
            n += 1
        return n / (time.perf_counter() - t0)
    finally:
        os.close(fd)


async def _processes(seconds: float, runs: int) -> list[Row]:
    """g1 and g2 as domain processes over pvio's hypervisor, next to veth and pread: on a
    LAN of lguest's 1514-byte frames, and on one with the largest MTU (JUMBO_MTU)."""
    tag = secrets.token_hex(3)
    loop = asyncio.get_running_loop()
    keys = ("tcp", "rtt", "iops", "tcp_jumbo")
    pvio: dict[str, list[float]] = {k: [] for k in keys}
    base: dict[str, list[float]] = {k: [] for k in keys}
    size = 16 << 20
    for _ in range(runs):
        with VethPair((f"bv1-{tag}", f"bv2-{tag}"), "vb0", "10.0.0") as ns:
            veth = await _iperf(ns[0], ns[1], seconds)
            base["tcp"].append(veth)
            base["tcp_jumbo"].append(veth)
            base["rtt"].append(await _ping(ns[0], 20))
        for mtu in (ETH_DATA_LEN, JUMBO_MTU):
            with tempfile.TemporaryDirectory() as tmp:
                names = [f"p1{tag}", f"p2{tag}"]
                config = Path(tmp) / "lan.toml"
                config.write_text(lguest_config([LanGuest(names[0], "10.0.0.1/24", disk_size="16M", mtu=mtu),
                                                 LanGuest(names[1], "10.0.0.2/24", disk_size="16M", mtu=mtu)]))
                up = UpProcess(Path(tmp) / "state", str(config))
                try:
                    await loop.run_in_executor(None, up.start)
                    ns = [netns_name(n) for n in names]
                    await _ping(ns[0], 2)  # ARP settled before measuring
                    if mtu == JUMBO_MTU:
                        pvio["tcp_jumbo"].append(await _iperf(ns[0], ns[1], seconds))
                        continue
                    pvio["tcp"].append(await _iperf(ns[0], ns[1], seconds))
                    pvio["rtt"].append(await _ping(ns[0], 20))
                    blk = up.device(names[0], type="lguest-block")
                    base["iops"].append(await loop.run_in_executor(None, _pread_iops, blk["target"], size, seconds))
                    pvio["iops"].append(await _nbd_iops(blk["nbd"], size, seconds))
                finally:
                    if up.proc is not None:
                        await loop.run_in_executor(None, up.stop)
    med = {k: (statistics.median(pvio[k]), statistics.median(base[k])) for k in keys}
    t_p, t_b = med["tcp"][0] / 1e6, med["tcp"][1] / 1e6
    j_p, j_b = med["tcp_jumbo"][0] / 1e6, med["tcp_jumbo"][1] / 1e6
    r_p, r_b = med["rtt"]
    i_p, i_b = med["iops"]
    return [
        Row("TCP g1->g2, processes", "Mbit/s", t_p, t_b, t_p / t_b),
        Row(f"TCP g1->g2, processes, MTU {JUMBO_MTU}", "Mbit/s", j_p, j_b, j_p / j_b),
        Row("ping, processes", "us", r_p, r_b, r_b / r_p),
        Row("block 4K rand read, NBD", "IOPS", i_p, i_b, i_p / i_b),
    ]


def _block(seconds: float, runs: int) -> list[Row]:
    size = 16 << 20
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "disk.img")
        with open(path, "wb") as f:
            f.write(os.urandom(size))
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        image = mmap.mmap(fd, size)  # the in-process Launcher serves the file's pages
        try:
            rig = build_guest(LguestWorld(), "bench", disk=image, console=False)
            blk = rig.block
            assert blk is not None
            rng = random.Random(1)
            sectors = size // 512 - 8

            def via_lguest(deadline: float) -> int:
                n = 0
                while time.perf_counter() < deadline:
                    blk.read(rng.randrange(0, sectors, 8), 4096)
                    rig.run_interrupts()
                    (done,) = blk.take_completions()
                    assert done.ok
                    n += 1
                return n

            def via_pread(deadline: float) -> int:
                n = 0
                while time.perf_counter() < deadline:
                    os.pread(fd, 4096, rng.randrange(0, sectors, 8) * 512)
                    n += 1
                return n

            rates: dict[str, list[float]] = {"pvio": [], "pread": []}
            for _ in range(runs):
                for name, fn in (("pread", via_pread), ("pvio", via_lguest)):
                    t0 = time.perf_counter()
                    n = fn(t0 + seconds)
                    rates[name].append(n / (time.perf_counter() - t0))
        finally:
            rig.launcher.served.clear()
            image.close()
            os.close(fd)
    p, b = statistics.median(rates["pvio"]), statistics.median(rates["pread"])
    return [Row("block 4 KiB random read", "IOPS", p, b, p / b)]


def _table(rows: list[Row]) -> str:
    lines = [f"{'scenario':30} {'unit':7} {'pvio':>12} {'baseline':>12} {'ratio':>7}"]
    for r in rows:
        lines.append(f"{r.scenario:30} {r.unit:7} {r.pvio:12.1f} {r.baseline:12.1f} {r.ratio:7.2f}")
    return "\n".join(lines)


@click.command()
@click.option("--seconds", default=2.0, show_default=True, help="Length of each measurement.")
@click.option("--runs", default=3, show_default=True, help="Runs per scenario (median shown).")
@click.option("--only", type=click.Choice(["all", "net", "block", "processes"]), default="all",
              show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the rows as JSON here.")
def lguest(seconds: float, runs: int, only: str, json_path: str | None) -> None:
    """TCP and ping across the lguest LAN vs a veth pair; block IOPS vs pread."""
    rows: list[Row] = []
    if only in ("all", "net", "processes") and os.geteuid() != 0:
        raise click.ClickException("the network benchmarks need root (namespaces, TAP)")
    if only in ("all", "processes"):
        rows += asyncio.run(_processes(seconds, runs))
    if only in ("all", "net"):
        rows += asyncio.run(_network(seconds, runs))
    if only in ("all", "block"):
        rows += _block(seconds, runs)
    click.echo(_table(rows))
    click.echo("baselines: veth pair between two namespaces; os.pread of the same image. "
               "ratio = pvio / baseline (for ping: baseline rtt / pvio rtt).")
    for r in rows:
        if r.scenario.startswith("TCP") and "processes" in r.scenario:
            verdict = "meets" if r.ratio >= TARGET_TCP_RATIO else "misses"
            click.echo(f"{r.scenario}: target {TARGET_TCP_RATIO:.0%} of veth: {verdict} ({r.ratio:.1%})")
    if json_path:
        with open(json_path, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)


# -- the suite (`pvio bench`): every run of every scenario is a sample -------------------------


def _suite(params: Mapping[str, Any], ctx: Context) -> list[Figure]:
    runs, seconds = int(params["runs"]), float(params["seconds"])
    ctx.command(["ip", "netns", "exec", "<client>", "iperf3", "-c", "10.0.0.2", "-p", "5201",
                 "-t", str(seconds), "-J"])
    ctx.command(["ip", "netns", "exec", "<client>", "ping", "-q", "-c", "20", "-i", "0.01",
                 "-W", "2", "10.0.0.2"])
    samples: dict[str, dict[str, list[float]]] = {}
    units: dict[str, str] = {}
    for i in range(runs):
        ctx.progress(f"run {i + 1} of {runs}: guests as processes, in-process LAN, veth, disk")
        rows = asyncio.run(_processes(seconds, 1)) + asyncio.run(_network(seconds, 1)) + _block(seconds, 1)
        for row in rows:
            units[row.scenario] = row.unit
            per = samples.setdefault(row.scenario, {"pvio": [], "baseline": []})
            per["pvio"].append(row.pvio)
            per["baseline"].append(row.baseline)
    labels = {"TCP": "veth pair", "ping": "veth pair", "block": "os.pread"}
    figures = []
    for scenario, per in samples.items():
        label = next((v for k, v in labels.items() if scenario.startswith(k)), "baseline")
        unit = "µs" if units[scenario] == "us" else units[scenario]
        figures.append(compare(scenario, unit, {"pvio": per["pvio"], label: per["baseline"]},
                               higher_is_better=unit != "µs"))
    return figures


def _make_suite() -> Benchmark:
    return Benchmark(
        name="lguest",
        title="lguest guests as processes and in process: LAN (iperf3, ping) vs veth; disk vs pread",
        run=_suite,
        quick={"runs": 1, "seconds": 1.0},
        full={"runs": 3, "seconds": 3.0},
        tools=("iperf3", "ping", "ip"),
        needs_root=True,
    )


SUITE = _make_suite()
