"""What a running `pvio up` tells: `pvio-up.json` (read by `pvio list`, the tests and the
benches) and the banner printed once every guest is ready."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pvio.domains.lguest_settings import EXPORT_NAME
from pvio.domains.spec import read_status, write_status
from pvio.domains.tap import lan_interface, netns_name
from pvio.nbd.address import nbd_uri_for_socket, tcp_uri
from pvio.toolstack.children import Child
from pvio.toolstack.config import Config
from pvio.toolstack.paths import StatePaths
from pvio.toolstack.plan import DomainRun


def write_up_status(paths: StatePaths, domains: list[DomainRun], children: list[Child], ready: bool) -> None:
    """`pvio-up.json`: what `pvio list` shows (atomically replaced)."""
    entries = []
    for run in domains:
        entry: dict[str, Any] = {
            "name": run.spec.name,
            "domid": run.spec.domid,
            "role": run.spec.role,
            "pid": run.child.pid,
            "state": run.state,
            "restarts": run.child.restarts,
            "log": str(run.child.log_path),
            "devices": [],
        }
        for d in run.spec.disks:
            entry["devices"].append(
                {"type": "vbd", "vdev": d.vdev, "devid": d.devid, "target": d.target,
                 "mode": "ro" if d.read_only else "rw", "nbd": nbd_uri_for_socket(d.nbd_socket, d.vdev),
                 "nbd_tcp": tcp_uri(d.nbd_tcp_port, d.vdev, d.nbd_tls_creds) if d.nbd_tcp_port else ""}
            )
        for devid, v in enumerate(run.spec.extra.get("vifs", [])):
            entry["devices"].append(
                {"type": "vif", "devid": devid, "mac": v["mac"], "bridge": v["bridge"], "ip": v["ip"],
                 "ifname": v["vifname"] or f"vif{run.spec.domid}.{devid}", "netns": netns_name(run.spec.name),
                 "queues": v.get("queues", 1)}
            )
        if run.spec.role == "lguest-guest":
            entry["devices"].append({"type": "console", "socket": run.spec.extra.get("console_socket")})
            if run.config and run.config.lguest_disk:
                entry["devices"].append(
                    {"type": "lguest-block", "target": run.config.lguest_disk["target"],
                     "nbd": nbd_uri_for_socket(run.spec.extra["nbd_socket"], EXPORT_NAME)}
                )
            if run.config and run.config.lguest_net:
                entry["devices"].append(
                    {"type": "lguest-net", "netns": netns_name(run.spec.name),
                     "address": run.config.lguest_net.address, "lan": run.config.lguest_net.lan}
                )
        entries.append(entry)
    write_status(
        paths.up_status,
        ready=ready,
        pid=os.getpid(),
        state_dir=str(paths.root),
        xenstored_path=str(paths.xenstored_socket),
        hypervisor_socket=str(paths.hypervisor_socket),
        services=[
            {"name": c.name, "pid": c.pid, "log": str(c.log_path)}
            for c in children
            if c.name in ("hypervisor", "xenstored", "xenconsoled") or c.name.startswith("qdisk-")
        ],
        domains=entries,
    )

def banner(config: Config, paths: StatePaths, domains: list[DomainRun], say: Callable[[str], None]) -> None:
    """What pvio up prints once every guest is ready: the guests, their URIs, what to try."""
    guests = [r for r in domains if r.spec.role in ("guest", "lguest-guest")]
    say(f"pvio up: {len(guests)} guest(s) running; state directory {paths.root}")
    first_uri = None
    writable_uri = None  # the qemu-io example writes: not on a read-only disk
    for run in guests:
        say(f"  {run.spec.name} (domid {run.spec.domid}, pid {run.child.pid})")
        for d in run.spec.disks:
            uri = nbd_uri_for_socket(d.nbd_socket, d.vdev)
            first_uri = first_uri or uri
            writable_uri = writable_uri or (None if d.read_only else uri)
            mode = "ro" if d.read_only else "rw"
            say(f"    {d.vdev} {mode} {d.target}\n      NBD: {uri}")
            if d.nbd_tcp_port:
                say(f"      NBD over TCP (localhost): {tcp_uri(d.nbd_tcp_port, d.vdev, d.nbd_tls_creds)}")
        if run.spec.role == "lguest-guest" and run.config is not None:
            if run.config.lguest_disk:
                uri = nbd_uri_for_socket(run.spec.extra["nbd_socket"], EXPORT_NAME)
                first_uri = first_uri or uri
                writable_uri = writable_uri or uri
                say(f"    {EXPORT_NAME} rw {run.config.lguest_disk['target']}\n      NBD: {uri}")
            if run.config.lguest_net:
                say(f"    net {run.config.lguest_net.address} in netns {netns_name(run.spec.name)}")
            say(f"    console: pvio console {run.spec.name} --state-dir {paths.root}")
    for lan in config.lans.values():
        if lan.host:
            say(f"  the host on LAN {lan.name}: {lan.host} on interface {lan_interface(lan.name)}")
    say("")
    say(f"export XENSTORED_PATH={paths.xenstored_socket}")
    say("")
    say("Try next, in another terminal:")
    if first_uri:
        say(f"  nbdinfo '{first_uri}'")
    if writable_uri:
        say(f"  qemu-io -f raw -c 'write -P 0xab 0 1M' -c 'read -P 0xab 0 1M' '{writable_uri}'")
    elif first_uri:
        say(f"  qemu-io -r -f raw -c 'read 0 1M' '{first_uri}'")
    say(f"  XENSTORED_PATH={paths.xenstored_socket} xenstore-ls -p /local/domain")
    say(f"  pvio list --state-dir {paths.root}")
    say("Stop with Ctrl-C: XenBus close, flush, exit.")


def load_up_status(paths: StatePaths) -> dict[str, Any] | None:
    try:
        data = json.loads(paths.up_status.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def merge_guest_disks(paths: StatePaths, domain: dict[str, Any]) -> None:
    """A Xen guest's vbds as its own status file has them now: the disks attached at run
    time (`pvio block-attach`) added, marked ``"attached": "run time"``, and those
    detached (`pvio block-detach`) dropped.  Without a guest status listing disks (not
    started yet, or dead) the entry stays what `pvio up` started."""
    if domain.get("role") != "guest":
        return
    disks = (read_status(paths.status(domain["name"])) or {}).get("disks")
    if not isinstance(disks, list):
        return
    serving = {int(d["devid"]): d for d in disks if isinstance(d, dict) and "devid" in d}
    devices = [dev for dev in domain["devices"] if dev.get("type") != "vbd" or dev.get("devid") in serving]
    known = {dev.get("devid") for dev in devices if dev.get("type") == "vbd"}
    for devid, d in sorted(serving.items()):
        if devid not in known:
            devices.append({"type": "vbd", "vdev": d.get("vdev", "?"), "devid": devid, "mode": d.get("mode", "?"),
                            "nbd": d.get("nbd_uri", ""), "nbd_tcp": d.get("nbd_tcp_uri", ""),
                            "attached": "run time"})
    domain["devices"] = devices


def merge_guest_vifs(paths: StatePaths, domain: dict[str, Any]) -> None:
    """A Xen guest's vifs as its own status file has them now: those attached at run time
    (`pvio network-attach`) added, marked ``"attached": "run time"``; those removed
    (`pvio unplug`) dropped and named in ``unplugged``; those the guest failed named in
    ``failed`` with why.  Without a guest status listing vifs the entry stays as it is."""
    if domain.get("role") != "guest":
        return
    guest = read_status(paths.status(domain["name"])) or {}
    if not isinstance(guest.get("vifs"), list):
        return
    serving = {int(v["devid"]): v for v in guest["vifs"] if isinstance(v, dict) and "devid" in v}
    failed = guest.get("vif_failures") or {}
    started = [dev for dev in domain["devices"] if dev.get("type") == "vif"]
    devices = [dev for dev in domain["devices"] if dev.get("type") != "vif" or dev.get("devid") in serving]
    known = {dev.get("devid") for dev in started}
    for devid, v in sorted(serving.items()):
        if devid not in known:
            devices.append({"type": "vif", "devid": devid, "mac": v.get("mac", ""), "bridge": v.get("bridge", ""),
                            "ip": v.get("address", ""), "ifname": v.get("backend_ifname", ""),
                            "netns": v.get("netns", ""), "queues": v.get("queues", 1), "attached": "run time"})
    domain["devices"] = devices
    domain["unplugged"] = [f"vif{v['devid']}" for v in started
                           if v["devid"] not in serving and str(v["devid"]) not in failed]
    domain["failed"] = {f"vif{k}": why for k, why in failed.items()}


def stale_processes(status: dict[str, Any]) -> list[int]:
    """The processes a `pvio-up.json` names (services, domains) that still run pvio or
    qemu-nbd: what an earlier pvio up left behind if it ended without stopping them."""
    pids = []
    for entry in [*status.get("services", []), *status.get("domains", [])]:
        pid = entry.get("pid")
        if not isinstance(pid, int) or pid <= 0 or pid == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"pvio" in cmdline or b"qemu-nbd" in cmdline:
            pids.append(pid)
    return pids
