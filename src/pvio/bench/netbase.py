"""What the network benchmarks share: the veth baseline, and reading ping and iperf3.

`pvio bench lguest` and `pvio bench net` both measure a paravirtual LAN next to a veth
pair between two namespaces in the same run (the kernel's own limit on this machine),
with iperf3 and ping as real processes.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass

import click

from pvio.domains.tap import netns_name, remove_namespace

_PING_AVG = re.compile(r"= [\d.]+/([\d.]+)/")  # rtt min/avg/max/mdev = a/b/c/d ms


@dataclass
class Row:
    """One scenario of a network benchmark: pvio next to its baseline."""

    scenario: str
    unit: str
    pvio: float
    baseline: float
    ratio: float


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


__all__ = ["Row", "VethPair", "iperf_received", "ping_average_us"]
