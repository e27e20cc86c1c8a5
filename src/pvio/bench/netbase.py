"""What the network benchmarks share: the veth baseline, and reading ping and iperf3.

`pvio bench lguest` and `pvio bench net` both measure a paravirtual LAN next to a veth
pair between two namespaces in the same run (the kernel's own limit on this machine),
with iperf3 and ping as real processes.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass

import click

from pvio.domains.tap import netns_name, remove_namespace

_PING_AVG = re.compile(r"= [\d.]+/([\d.]+)/")  # rtt min/avg/max/mdev = a/b/c/d ms


@dataclass
class Row:
    """One scenario of a network benchmark: pvio next to its baseline."""

    scenario: str
    unit: str
    pvio: float  # the median of pvio_runs, where there are runs
    baseline: float
    ratio: float
    pvio_runs: tuple[float, ...] = ()  # every run's figure, for min..max
    baseline_runs: tuple[float, ...] = ()


def ping_average_us(out: str) -> float:
    """The average round trip of `ping -q`'s summary, in microseconds."""
    m = _PING_AVG.search(out)
    if m is None:
        raise click.ClickException(f"cannot parse ping output:\n{out}")
    return float(m.group(1)) * 1000


def iperf_received(out: str) -> tuple[float | None, str]:
    """The receiver's bits per second from `iperf3 -J`, or None and why there are none."""
    try:
        report = json.loads(out)
    except ValueError:
        return None, out[-300:]
    end = report.get("end", {})
    if "error" in report or "sum_received" not in end:
        return None, str(report.get("error", out[-300:]))
    return float(end["sum_received"]["bits_per_second"]), ""


def _run_wait(pid: int) -> tuple[float, float] | None:
    """(seconds on a CPU, seconds runnable but waiting for one) of a process's main
    thread so far (/proc/<pid>/schedstat: the thread of a domain's event loop, where its
    rings are served); None if it cannot be read."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            on_cpu, waiting, _slices = (int(x) for x in f.read().split())
    except (OSError, ValueError):  # gone (or a kernel without CONFIG_SCHED_INFO)
        return None
    return on_cpu / 1e9, waiting / 1e9


def _machine_idle() -> tuple[int, int]:
    """(idle + iowait jiffies, all jiffies) of every CPU so far, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    return values[3] + values[4], sum(values)


class CpuShares:
    """Where the CPUs went while a measurement ran: each named process's (main
    thread's) share of a core on a CPU and runnable but waiting for one, and the
    machine's idle share.

    A stack of Python processes on few cores is bound either by one process's work
    (near 100% of a core on a CPU), by them all together (little idle, much waiting),
    or by the time each waits for the next to wake (idle cores, little waiting)."""

    def __init__(self, pids: Mapping[str, int]) -> None:
        self.pids = dict(pids)
        self._start = time.monotonic()
        self._procs = {name: _run_wait(pid) for name, pid in self.pids.items()}
        self._idle = _machine_idle()

    def shares(self) -> dict[str, float]:
        """Percentages since construction: `<name> on a CPU`, `<name> waiting for a
        CPU` (of one core), and `machine idle` (of all cores); a process that was gone
        at either end is left out."""
        elapsed = max(time.monotonic() - self._start, 1e-9)
        out = {}
        for name, pid in self.pids.items():
            then, now = self._procs[name], _run_wait(pid)
            if then is None or now is None:
                continue
            (run0, wait0), (run, wait) = then, now
            out[f"{name} on a CPU"] = 100 * (run - run0) / elapsed
            out[f"{name} waiting for a CPU"] = 100 * (wait - wait0) / elapsed
        idle, total = _machine_idle()
        out["machine idle"] = 100 * (idle - self._idle[0]) / max(total - self._idle[1], 1)
        return out


class VethPair:
    """Two namespaces joined by a veth pair `dev`, at `<net>.1` and `<net>.2`."""

    def __init__(self, names: tuple[str, str], dev: str, net: str) -> None:
        self.ns = [netns_name(n) for n in names]
        self.dev = dev
        self.net = net

    def __enter__(self) -> list[str]:
        for ns in self.ns:
            remove_namespace(ns)
            subprocess.run(["ip", "netns", "add", ns], check=True, timeout=30)
        subprocess.run(["ip", "link", "add", self.dev, "netns", self.ns[0], "type", "veth",
                        "peer", "name", self.dev, "netns", self.ns[1]], check=True, timeout=30)
        for i, ns in enumerate(self.ns):
            subprocess.run(["ip", "-n", ns, "addr", "add", f"{self.net}.{i + 1}/24", "dev", self.dev],
                           check=True, timeout=30)
            subprocess.run(["ip", "-n", ns, "link", "set", self.dev, "up"], check=True, timeout=30)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True, timeout=30)
        return self.ns

    def __exit__(self, *exc: object) -> None:
        for ns in self.ns:
            remove_namespace(ns)


__all__ = ["CpuShares", "Row", "VethPair", "iperf_received", "ping_average_us"]
