"""`pvio top`'s data: one sample of a running `pvio up`, and the rates between two.

Theory of operation
-------------------
Everything comes from files the stack's processes already rewrite once a second, so
`pvio top` needs no restart and talks to no daemon: ``pvio-up.json`` (the domains and
their devices, as `pvio list` reads it), each domain's status file (blkback's and
blkfront's counters, an lguest guest's network counters), the hypervisor's census
(``--status``: pages, grants offered and mapped, event channels per domain) and
xenstored's (``--status``: connections, watches, transactions, requests), plus
``/proc/<pid>/stat`` for CPU time and resident memory.

A `Sample` holds cumulative counters; `rates(before, after)` turns two samples into
what xentop shows: CPU %, requests and sectors per second, requests per batch,
notifications per request, packets, bytes and drops per second.  A disk also has a
gauge, read as it is at the second sample: its ring occupancy (blkback's req_prod -
rsp_prod_pvt per ring, the slots requests hold; an lguest disk's one request).  The
devices: blkback's vbds and netback's vifs (the driver domain's status), blkfront and
netfront (a guest's), an lguest guest's network device and its Launcher's disk.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any

from pvio.jsonfile import read_json
from pvio.toolstack.paths import StatePaths

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def proc_times(pid: int) -> tuple[int, int] | None:
    """(CPU ticks used, resident bytes) of a process, from /proc/<pid>/stat."""
    try:
        raw = open(f"/proc/{pid}/stat", "rb").read()  # noqa: SIM115 - one read
    except OSError:
        return None
    fields = raw[raw.rindex(b")") + 2 :].split()  # after "pid (comm) "
    return int(fields[11]) + int(fields[12]), int(fields[21]) * _PAGE


@dataclass
class Sample:
    """Cumulative counters of one moment."""

    time: float
    domains: list[dict[str, Any]] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    xenstore: list[dict[str, Any]] = field(default_factory=list)


def _counters(keys: dict[str, Any]) -> dict[str, float]:
    """The cumulative counters of a statistics map (the derived ratios left out: they
    are recomputed per interval)."""
    out = {}
    for k, v in keys.items():
        if k.endswith(("_per_req", "_per_frame", "_per_batch")) or isinstance(v, bool):
            continue
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue  # not a number (a flag, a name)
    return out


def _net(counters: dict[str, float], rx: str, tx: str, drops: tuple[str, ...]) -> dict[str, float]:
    """A network device's counters with the common names `pvio top` shows (the guest's
    view: rx is what it received), next to its own."""
    return {**counters, "rx_packets": counters.get(f"{rx}_frames", counters.get(f"{rx}_packets", 0.0)),
            "tx_packets": counters.get(f"{tx}_frames", counters.get(f"{tx}_packets", 0.0)),
            "rx_bytes": counters.get(f"{rx}_bytes", 0.0), "tx_bytes": counters.get(f"{tx}_bytes", 0.0),
            "dropped": sum(counters.get(k, 0.0) for k in drops)}


def _ring(in_use: list[int], slots: list[int]) -> dict[str, Any]:
    """A disk's ring occupancy now (a gauge): slots in use and slots, in all and per ring."""
    return {"ring_in_use": sum(in_use), "ring_slots": sum(slots), "rings": [[u, n] for u, n in zip(in_use, slots, strict=False)]}


def _driver_devices(status: dict[str, Any], names: dict[tuple[str, int, int], tuple[str, str]]) -> list[dict[str, Any]]:
    """The driver domain's backends, each named by the guest and device it serves:
    blkback's counters and ring occupancy per vbd, netback's counters per vif."""
    out = []
    rings = status.get("rings") or {}
    for path, keys in (status.get("statistics") or {}).items():
        parts = path.rstrip("/").split("/")  # .../backend/<type>/<frontend domid>/<devid>
        kind = parts[-3] if len(parts) >= 3 else "vbd"
        try:
            domain, device = names[(kind, int(parts[-2]), int(parts[-1]))]
        except (KeyError, ValueError, IndexError):
            domain, device = path, ""
        counters = _counters(keys)
        entry: dict[str, Any] = {"kind": kind, "domain": domain, "device": device}
        if kind == "vif":  # netback's tx is what the guest sent
            entry["counters"] = _net(counters, "rx", "tx", ("tx_dropped", "rx_dropped"))
        else:
            entry["counters"] = counters
            ring = rings.get(path) or {}
            entry["gauges"] = _ring(ring.get("in_use", []), ring.get("slots", []))
        out.append(entry)
    return out


def _guest_devices(name: str, role: str, status: dict[str, Any]) -> list[dict[str, Any]]:
    """A guest's frontends: blkfront and netfront (Xen-style), lguest's network device."""
    out: list[dict[str, Any]] = []
    for disk in status.get("disks", []):
        out.append({"kind": "blkfront", "domain": name, "device": disk["vdev"],
                    "counters": _counters(disk.get("statistics") or {})})
    for vif in status.get("vifs", []):
        counters = _counters(vif.get("statistics") or {}) | {"tap_dropped": float(vif.get("dropped", 0))}
        out.append({"kind": "netfront", "domain": name, "device": vif.get("ifname") or f"eth{vif.get('devid', 0)}",
                    "counters": _net(counters, "rx", "tx", ("tx_errors", "rx_errors", "tap_dropped"))})
    if role == "lguest-guest":
        stats = status.get("stats") or {}
        if net := stats.get("net"):
            counters = _counters(net) | {"tap_dropped": float(stats.get("net_tap_dropped", 0))}
            out.append({"kind": "lguest-net", "domain": name, "device": "eth0",
                        "counters": _net(counters, "rx", "tx", ("tx_dropped", "rx_errors", "tap_dropped"))})
    return out


def _launcher_devices(status: dict[str, Any]) -> list[dict[str, Any]]:
    """An lguest Launcher's block device, with a Xen disk's counter names (one request
    in flight at most: its ring is one slot)."""
    disk = (status.get("stats") or {}).get("disk")
    if not disk:
        return []
    counters = {"rd_req": disk.get("reads", 0), "wr_req": disk.get("writes", 0),
                "rd_sect": disk.get("bytes_read", 0) // 512, "wr_sect": disk.get("bytes_written", 0) // 512,
                "err_req": disk.get("errors", 0)}
    return [{"kind": "lguest-blk", "domain": status.get("guest", "?"), "device": "lgba",
             "counters": {k: float(v) for k, v in counters.items()},
             "gauges": _ring([int(disk.get("in_flight", 0))], [1])}]


def sample(paths: StatePaths) -> Sample:
    """Read everything once.  Raises FileNotFoundError if no pvio up runs there."""
    up = read_json(paths.up_status)
    if up is None:
        raise FileNotFoundError(f"no pvio up is running with state directory {paths.root}")
    s = Sample(time=time.time())
    census = {d["domid"]: d for d in (read_json(paths.status("hypervisor")) or {}).get("domains", [])}
    owner: dict[tuple[str, int, int], tuple[str, str]] = {}  # (type, guest domid, devid) -> (guest, device)
    for d in up.get("domains", []):
        for dev in d.get("devices", []):
            if dev.get("type") == "vbd":
                owner[("vbd", d["domid"], dev["devid"])] = (d["name"], dev["vdev"])
            elif dev.get("type") == "vif":
                owner[("vif", d["domid"], dev["devid"])] = (d["name"], dev.get("ifname") or f"vif{dev['devid']}")
    for d in up.get("domains", []):
        entry: dict[str, Any] = {"name": d["name"], "domid": d["domid"], "role": d["role"],
                                 "pid": d.get("pid"), "state": d.get("state")}
        times = proc_times(d["pid"]) if d.get("pid") else None
        entry["cpu_ticks"], entry["rss"] = times if times else (0, 0)
        held = census.get(d["domid"], {})
        for key in ("pages", "grants_offered", "grants_mapped", "mapped_by_others", "event_channels",
                    "dma_bindings"):
            entry[key] = held.get(key, 0)
        s.domains.append(entry)
        status = read_json(paths.status(d["name"])) or {}
        if d["role"] == "driver":
            s.devices += _driver_devices(status, owner)
        elif d["role"] == "lguest-launcher":
            s.devices += _launcher_devices(status)
        else:
            s.devices += _guest_devices(d["name"], d["role"], status)
    for svc in up.get("services", []):
        times = proc_times(svc["pid"]) if svc.get("pid") else None
        s.domains.append({"name": svc["name"], "domid": None, "role": "service", "pid": svc.get("pid"),
                          "state": "running" if times else "dead",
                          "cpu_ticks": times[0] if times else 0, "rss": times[1] if times else 0})
    xs = read_json(paths.status("xenstored")) or {}
    s.xenstore = list(xs.get("connections", []))
    return s


def _per_second(before: dict[str, float], after: dict[str, float], dt: float) -> dict[str, float]:
    return {k: max(0.0, v - before.get(k, 0.0)) / dt for k, v in after.items()}


def rates(before: Sample, after: Sample) -> dict[str, Any]:
    """What xentop shows, between two samples (per second, and ratios of the deltas)."""
    dt = max(after.time - before.time, 1e-6)
    prev = {(d["role"], d["name"]): d for d in before.domains}
    domains = []
    for d in after.domains:
        p = prev.get((d["role"], d["name"]))
        used = d["cpu_ticks"] - p["cpu_ticks"] if p and p.get("pid") == d.get("pid") else 0
        domains.append({**{k: v for k, v in d.items() if k != "cpu_ticks"},
                        "cpu_percent": round(100.0 * used / _CLK_TCK / dt, 1)})
    prev_dev = {(v["kind"], v["domain"], v["device"]): v["counters"] for v in before.devices}
    devices = []
    for v in after.devices:
        delta = _per_second(prev_dev.get((v["kind"], v["domain"], v["device"]), {}), v["counters"], dt)
        devices.append({"kind": v["kind"], "domain": v["domain"], "device": v["device"],
                        "per_second": {k: round(x, 1) for k, x in delta.items()},
                        **_ratios(v["kind"], delta), **_occupancy(v.get("gauges")), "totals": v["counters"]})
    prev_xs = {c["conn"]: c for c in before.xenstore}
    xenstore = []
    for c in after.xenstore:
        p = prev_xs.get(c["conn"], {})
        xenstore.append({**c, "requests_per_second": round(max(0, c["requests"] - p.get("requests", 0)) / dt, 1)})
    return {"time": after.time, "interval": round(dt, 3), "domains": domains, "devices": devices,
            "xenstore": xenstore}


def _occupancy(gauges: dict[str, Any] | None) -> dict[str, Any]:
    """A disk's ring occupancy at the second sample: slots in use, slots, their ratio."""
    if not gauges:
        return {}
    slots = gauges["ring_slots"]
    return {**gauges, "ring_occupancy": round(gauges["ring_in_use"] / slots, 3) if slots else 0.0}


def _ratios(kind: str, d: dict[str, float]) -> dict[str, float]:
    """Per-request ratios of one interval (a disk's batching and notification avoidance)."""
    if kind in ("vbd", "lguest-blk"):
        reqs = sum(d.get(k, 0.0) for k in ("rd_req", "wr_req", "f_req", "ds_req", "err_req"))
        return {"requests": round(reqs, 1),
                "requests_per_batch": round(reqs / d["batches"], 2) if d.get("batches") else 0.0,
                "notify_per_request": round(d.get("notify_sent", 0.0) / reqs, 3) if reqs else 0.0}
    if kind == "blkfront":
        reqs = d.get("requests", 0.0)
        return {"requests": round(reqs, 1),
                "notify_per_request": round(d.get("notify_sent", 0.0) / reqs, 3) if reqs else 0.0}
    return {}
