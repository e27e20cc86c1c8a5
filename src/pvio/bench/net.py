"""`pvio bench net`: the Xen network device next to what the kernel does without it.

Two Xen guests started by `pvio up` (real domain processes over `pvio hypervisor`, their
vifs on one host bridge, TAPs with TSO at MTU 1500), measured in the same run as a veth
pair between two namespaces:

* TCP guest → guest (iperf3 between the guests' namespaces: netfront, netback, the
  bridge, netback, netfront);
* TCP guest → host (the bridge given an address, iperf3's server in the host's
  namespace);
* ping round trip guest → guest;
* from netback's own counters over the TCP runs: slots (netif requests) per frame
  and notifications per frame, which say what GSO and the event-index protocol achieve;
* and, during the guest → guest stream, each pvio process's share of a core on a CPU and
  runnable but waiting for one, and the machine's idle share (`CpuShares`): what bounds
  the stream, measured in the same run.

The ratio is pvio / veth (for ping: veth rtt / pvio rtt, so higher is better in every
row).  ``--queues 1,2`` runs the whole set once per queue count (each vif asks for that
many queues, ``queues=N`` in its spec, its own `pvio up`, the veth pair measured again
beside it), and ``--streams P`` runs P parallel TCP streams (iperf3 -P): one stream is
one flow, and one flow always takes one queue.  What bounds TCP: each 62 KB GSO frame still costs a TAP read, fifteen page-sized
slots written and copied by GNTTABOP_copy (a hypervisor round trip per batch), a TAP
write, on each side of the bridge, in Python, on two cores that also run both TCP stacks
and iperf3; the veth pair hands the same segment over by pointer.
"""

from __future__ import annotations

import json
import os
import secrets
import statistics
import subprocess
import tempfile
import time
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import click

from pvio.bench.harness.benchmark import Benchmark, Context
from pvio.bench.harness.figures import Figure, compare
from pvio.bench.netbase import CpuShares, Row, VethPair, iperf_received, ping_average_us
from pvio.domains.tap import netns_name
from pvio.testing.up import UpProcess

#: The issue's target: at least this share of the veth pair's TCP throughput.
TARGET_TCP_RATIO = 0.25
NET = "10.0.77"


def _run(cmd: list[str], timeout: float) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise click.ClickException(f"{' '.join(cmd)} failed:\n{r.stdout[-1500:]}{r.stderr[-1500:]}")
    return r.stdout


def _in(ns: str) -> list[str]:
    return ["ip", "netns", "exec", ns] if ns else []


def _iperf(client_ns: str, server_ns: str, address: str, seconds: float, port: int = 5311,
           streams: int = 1) -> float:
    """Bits per second, client -> server (iperf3 as real processes, `streams` in parallel)."""
    server = subprocess.Popen([*_in(server_ns), "iperf3", "-s", "-1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = ""
    try:
        for _ in range(20):
            r = subprocess.run([*_in(client_ns), "iperf3", "-c", address, "-p", str(port), "-t", str(seconds),
                                "-P", str(streams), "-J"], capture_output=True, text=True, timeout=seconds + 30)
            bps, why = iperf_received(r.stdout)
            if r.returncode == 0 and bps is not None:
                return bps
            last = why + r.stderr[-300:]
            time.sleep(0.2)  # the server was not listening yet
        raise click.ClickException(f"iperf3 never connected: {last}")
    finally:
        server.kill()
        server.wait()


def _ping(ns: str, address: str, count: int = 20) -> float:
    """Average round trip in microseconds."""
    out = _run([*_in(ns), "ping", "-q", "-c", str(count), "-i", "0.01", "-W", "2", address], 60)
    return ping_average_us(out)


def _config(tag: str, queues: int = 1) -> tuple[str, list[str], str]:
    bridge = f"pvbn{tag}"
    names = [f"bn1-{tag}", f"bn2-{tag}"]
    text = "".join(
        f'[[domain]]\nname = "{n}"\nvifs = ["mac=00:16:3e:77:00:0{i + 1}, bridge={bridge}, '
        f'ip={NET}.{i + 1}/24, queues={queues}"]\n\n'
        for i, n in enumerate(names)) + f'[bridge.{bridge}]\nhost = "{NET}.254/24"\n'
    return text, names, bridge


def _netback_counters(up: UpProcess) -> dict[str, int]:
    stats = up.domain_status("driver").get("statistics", {})
    total: dict[str, int] = {}
    for path, keys in stats.items():
        if "/backend/vif/" in path:
            for k in ("tx_frames", "tx_slots", "rx_frames", "rx_slots", "notify_sent", "notify_received"):
                total[k] = total.get(k, 0) + int(keys.get(k, 0))
    return total


def _pids(up: UpProcess, guests: list[str]) -> dict[str, int]:
    """The processes a guest -> guest stream runs through: the driver domain, both guests."""
    pids = {}
    for dom in up.status.get("domains", []):
        if dom.get("role") == "driver":
            pids["driver domain"] = int(dom.get("pid") or 0)
        elif dom.get("name") in guests:
            pids[f"guest {guests.index(dom['name']) + 1}"] = int(dom.get("pid") or 0)
    return {k: v for k, v in sorted(pids.items()) if v}


def _measure(seconds: float, runs: int, queues: int = 1, streams: int = 1) -> list[Row]:
    tag = secrets.token_hex(2)
    samples: dict[str, dict[str, list[float]]] = {}
    suffix = "" if queues == 1 and streams == 1 else f" q={queues} P={streams}"

    def add(name: str, pvio: float, base: float) -> None:
        per = samples.setdefault(name + suffix, {"pvio": [], "base": []})
        per["pvio"].append(pvio)
        per["base"].append(base)

    text, names, _bridge = _config(tag, queues)
    per_frame: dict[str, float] = {}
    cpu: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="pvio-bench-net-") as tmp:
        cfg = Path(tmp) / "net.toml"
        cfg.write_text(text)
        up = UpProcess(Path(tmp) / "state", str(cfg)).start()
        try:
            g1, g2 = (netns_name(n) for n in names)
            _ping(g1, f"{NET}.2", 3)  # ARP settled before measuring
            for _ in range(runs):
                with VethPair((f"nv1-{tag}", f"nv2-{tag}"), "nv0", NET) as ns:
                    veth_tcp = _iperf(ns[0], ns[1], f"{NET}.2", seconds, streams=streams)
                    veth_rtt = _ping(ns[0], f"{NET}.2")
                before = _netback_counters(up)
                shares = CpuShares(_pids(up, names))
                add("TCP guest->guest (iperf3)", _iperf(g1, g2, f"{NET}.2", seconds, streams=streams) / 1e6,
                    veth_tcp / 1e6)
                for k, v in shares.shares().items():
                    cpu.setdefault(k, []).append(v)
                add("TCP guest->host (iperf3)", _iperf(g1, "", f"{NET}.254", seconds, streams=streams) / 1e6,
                    veth_tcp / 1e6)
                pvio_rtt = _ping(g1, f"{NET}.2")
                add("ping guest->guest", pvio_rtt, veth_rtt)
                time.sleep(1.2)  # the driver's counters, once a second
                after = _netback_counters(up)
                d = {k: after.get(k, 0) - before.get(k, 0) for k in after}
                frames = max(d.get("tx_frames", 0) + d.get("rx_frames", 0), 1)
                per_frame = {
                    "slots per frame": (d.get("tx_slots", 0) + d.get("rx_slots", 0)) / frames,
                    "notifications per frame": (d.get("notify_sent", 0) + d.get("notify_received", 0)) / frames,
                }
        finally:
            up.stop()
    rows = []
    for name, per in samples.items():
        p, b = statistics.median(per["pvio"]), statistics.median(per["base"])
        runs_of = (tuple(per["pvio"]), tuple(per["base"]))
        if name.startswith("ping"):
            rows.append(Row(name, "us", p, b, b / p, *runs_of))
        else:
            rows.append(Row(name, "Mbit/s", p, b, p / b, *runs_of))
    for name, value in per_frame.items():
        rows.append(Row(f"netback: {name}{suffix}", "count", value, float("nan"), float("nan")))
    for name, values in cpu.items():  # what bounds the stream: see CpuShares
        unit = "% cores" if name == "machine idle" else "% core"
        rows.append(Row(f"guest->guest: {name}{suffix}", unit, statistics.median(values), float("nan"), float("nan"),
                        tuple(values)))
    return rows


def _table(rows: list[Row]) -> str:
    lines = [f"{'scenario':46} {'unit':7} {'pvio':>10} {'veth':>10} {'ratio':>7}"]
    for r in rows:
        lines.append(f"{r.scenario:46} {r.unit:7} {r.pvio:10.2f} {r.baseline:10.1f} {r.ratio:7.3f}")
    return "\n".join(lines)


@click.command()
@click.option("--seconds", default=3.0, show_default=True, help="Length of each measurement.")
@click.option("--runs", default=3, show_default=True, help="Runs per scenario (median shown).")
@click.option("--queues", default="1", show_default=True,
              help="Queues per vif (queues=N); a comma-separated list runs the set once for each.")
@click.option("--streams", default=1, show_default=True, type=click.IntRange(1, 128),
              help="Parallel TCP streams (iperf3 -P), the flows the queues can share out.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the rows as JSON here.")
def net(seconds: float, runs: int, queues: str, streams: int, json_path: str | None) -> None:
    """TCP and ping between Xen guests' vifs on a bridge vs a veth pair, in one run."""
    if os.geteuid() != 0:
        raise click.ClickException("the network benchmark needs root (namespaces, TAP, bridge)")
    try:
        counts = [int(q) for q in queues.split(",")]
    except ValueError:
        raise click.BadParameter(f"{queues!r}: expected numbers such as 1,2,4", param_hint="--queues") from None
    rows = [r for q in counts for r in _measure(seconds, runs, q, streams)]
    click.echo(_table(rows))
    click.echo("baseline: a veth pair between two namespaces, same run. "
               "ratio = pvio / veth (for ping: veth rtt / pvio rtt).")
    for r in rows:
        if r.scenario.startswith("TCP"):
            verdict = "meets" if r.ratio >= TARGET_TCP_RATIO else "misses"
            click.echo(f"{r.scenario}: target {TARGET_TCP_RATIO:.0%} of veth: {verdict} ({r.ratio:.1%})")
    if json_path:
        with open(json_path, "w") as f:
            json.dump([asdict(r) for r in rows], f, indent=2)


def _suite(params: Mapping[str, Any], ctx: Context) -> list[Figure]:
    runs, seconds = int(params["runs"]), float(params["seconds"])
    ctx.command(["ip", "netns", "exec", "<guest1>", "iperf3", "-c", f"{NET}.2", "-t", str(seconds), "-J"])
    figures = []
    ctx.progress(f"{runs} runs: two Xen guests on a bridge, and a veth pair")
    for r in _measure(seconds, runs):
        if r.unit == "count":
            continue
        if r.unit.startswith("%"):  # where the CPUs went: pvio's alone, no baseline
            figures.append(compare(r.scenario, r.unit, {"pvio": r.pvio_runs or [r.pvio]}, higher_is_better=False))
            continue
        unit = "µs" if r.unit == "us" else r.unit
        figures.append(compare(r.scenario, unit, {"pvio": r.pvio_runs or [r.pvio],
                                                  "veth pair": r.baseline_runs or [r.baseline]},
                               higher_is_better=unit != "µs"))
    return figures


SUITE = Benchmark(
    name="net",
    title="Xen guests' vifs on a bridge (iperf3, ping) vs a veth pair",
    run=_suite,
    quick={"runs": 1, "seconds": 1.0},
    full={"runs": 3, "seconds": 3.0},
    tools=("iperf3", "ping", "ip"),
    needs_root=True,
)
