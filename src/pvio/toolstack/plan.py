"""`pvio up`'s plan: which domains run, with which domids and specs, and their images.

The driver domain is domid 0 (only when a Xen guest needs blkback); then each Xen guest
takes the next domid, and each lguest guest two (its Launcher, then the guest).  Every
spec is plain data (`pvio.domains.spec`), written to ``domains/<name>.json`` for
``python -m pvio.domains.run``.  The members of each lguest LAN, and the host's address
on it, are told to every Launcher and guest on it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pvio.domains.lguest_settings import EXPORT_NAME
from pvio.domains.spec import DiskSpecJSON, DomainSpec
from pvio.storage.rawfile import create_sparse_image
from pvio.toolstack.children import Child, UpError, python_argv
from pvio.toolstack.config import Config, DomainConfig
from pvio.toolstack.paths import StatePaths


@dataclass
class DomainRun:
    """A domain pvio up runs: its spec and its process."""

    config: DomainConfig | None  # None for the driver domain
    spec: DomainSpec
    child: Child
    status: dict[str, Any] = field(default_factory=dict)
    state: str = "starting"
    crashes: list[float] = field(default_factory=list)  # when it died (time.monotonic())


def _spec(paths: StatePaths, name: str, domid: int, role: str, **kw: Any) -> DomainSpec:
    return DomainSpec(
        name=name,
        domid=domid,
        role=role,
        hypervisor_socket=str(paths.hypervisor_socket),
        xenstore_fd=-1,
        state_dir=str(paths.root),
        status_file=str(paths.status(name)),
        **kw,
    )


def plan_domains(
    config: Config, paths: StatePaths, *, nbd_socket: str | None = None, nbd_tcp: int = 0, nbd_tls_creds: str = ""
) -> list[DomainRun]:
    """Decide domids and specs for the driver domain and every guest."""
    domains: list[DomainRun] = []

    def add(dom: DomainConfig | None, spec: DomainSpec) -> None:
        child = Child(spec.name, python_argv("pvio.domains.run", str(paths.spec(spec.name))), paths.log(spec.name))
        domains.append(DomainRun(dom, spec, child))

    if any(dom.type == "xen" for dom in config.domains):
        driver = _spec(paths, "driver", 0, "driver", transport=config.transport)
        driver.extra["xenstored_path"] = str(paths.xenstored_socket)  # for vifs' hotplug scripts
        add(None, driver)
    domid = 1
    tcp_port = nbd_tcp
    for dom in config.domains:
        if dom.type == "xen":
            disks = []
            for i, disk in enumerate(dom.disks):
                sock = paths.nbd_socket(dom.name, disk.spec.vdev.name)
                if i == 0 and nbd_socket:
                    sock = Path(nbd_socket).resolve()
                disk.nbd_socket = str(sock)
                disks.append(
                    DiskSpecJSON(
                        vdev=disk.spec.vdev.name,
                        devid=disk.spec.vdev.number,
                        target=disk.spec.target,
                        format=disk.spec.format,
                        read_only=disk.spec.read_only,
                        nbd_socket=str(sock),
                        nbd_tcp_port=tcp_port,
                        nbd_tls_creds=nbd_tls_creds if tcp_port else "",
                    )
                )
                tcp_port += 1 if tcp_port else 0
            add(dom, _spec(paths, dom.name, domid, "guest", nr_pages=dom.memory // 4096, disks=disks))
            if dom.vifs:
                domains[-1].spec.extra["vifs"] = [v.as_dict() for v in dom.vifs]
            domid += 1
        else:
            launcher = _spec(paths, f"{dom.name}-launcher", domid, "lguest-launcher")
            guest = _spec(paths, dom.name, domid + 1, "lguest-guest", nr_pages=dom.memory // 4096)
            extra = {
                "config": dom.raw
                | {"disk": dom.lguest_disk, "net": dom.lguest_net.__dict__ if dom.lguest_net else None},
                "launcher_domid": domid,
                "guest_domid": domid + 1,
                "console_socket": str(paths.console_socket(dom.name)),
                "nbd_socket": str(paths.nbd_socket(dom.name, EXPORT_NAME)),
            }
            launcher.extra = dict(extra)
            guest.extra = dict(extra)
            add(dom, launcher)
            add(dom, guest)
            domid += 2
    lans: dict[str, list[dict[str, Any]]] = {}
    for run in domains:
        cfg = run.config
        if cfg is not None and cfg.type == "lguest" and cfg.lguest_net and run.spec.role == "lguest-guest":
            lans.setdefault(cfg.lguest_net.lan, []).append({"name": cfg.name, "domid": run.spec.domid})
    for run in domains:
        cfg = run.config
        if cfg is not None and cfg.type == "lguest":
            lan = cfg.lguest_net.lan if cfg.lguest_net else None
            run.spec.extra["lan_members"] = lans.get(lan, []) if lan else []
            lan_cfg = config.lans.get(lan or "")
            if lan_cfg is not None and lan_cfg.host:
                run.spec.extra["lan_host"] = {"address": lan_cfg.host, "mac": lan_cfg.host_mac}
    return domains


def prepare_images(config: Config, say: Callable[[str], None]) -> None:
    """Create every missing raw image, sparse (other formats must exist)."""
    for dom in config.domains:
        for disk in dom.disks:
            target = disk.spec.target
            if "://" in target or os.path.exists(target):
                continue
            if disk.spec.format != "raw":
                raise UpError(f"{dom.name}: {target} does not exist (only raw images are created)")
            create_sparse_image(target, disk.size)
            say(f"created {target} ({human(disk.size)}, sparse raw)")
        if dom.lguest_disk and not os.path.exists(dom.lguest_disk["target"]):
            create_sparse_image(dom.lguest_disk["target"], int(dom.lguest_disk["size"]))


def human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)
