"""What the toolstack tells a domain process: the contract between `pvio up` and a domain.

Theory of operation
-------------------
`pvio up` is the toolstack, like xl/libxl.  It starts `pvio hypervisor` and
`pvio xenstored`, decides every domain's domid, writes the XenStore directories a
toolstack writes (`/local/domain/<domid>/…`, the vbd frontend/backend directories with
libxl's permissions), introduces the domain to xenstored and obtains a XenStore
connection already bound to that domid (`pvio.xenstore.daemon.attach_domain`), then
starts the domain as a child process:

    python -m pvio.domains.run SPEC.json     (stdin/stdout/stderr: the domain's log)

with the XenStore socket inherited as fd `DomainSpec.xenstore_fd`.  The domain process
connects to the hypervisor itself (`pvio.hypervisor.aio.connect(path, name, domid=...)`)
and runs the role named in its spec:

- ``driver``: a driver domain (domid 0): blkback for every vbd under
  /local/domain/0/backend/vbd, until SIGTERM;
- ``guest``: a Xen-style guest: blkfront for each vbd in `disks`, each exported over NBD
  on its `nbd_socket`;
- ``lguest-guest`` / ``lguest-launcher``: lguest's guest drivers and its Launcher
  (see `pvio.lguest`).

A domain process reports readiness by writing one JSON line ``{"ready": true, ...}`` to
the file `DomainSpec.status_file` (atomically: write a temp file, rename), and exits 0
on SIGTERM after an orderly shutdown.  The toolstack supervises: a driver domain that
dies is restarted with the same spec; guests recover through the XenBus reconnect.

Everything in a spec is plain data (JSON), so a spec can be written by hand to run one
domain under a debugger.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pvio.jsonfile import read_json, write_json

ROLES = ("driver", "guest", "lguest-guest", "lguest-launcher")


@dataclass
class DiskSpecJSON:
    """One vbd as a guest or driver domain sees it (from `pvio.toolstack.diskspec`)."""

    vdev: str  # "xvda"
    devid: int  # virtual-device number, 51712 for xvda
    target: str  # image path or NBD URI (`params`)
    format: str = "raw"
    read_only: bool = False
    nbd_socket: str = ""  # guests: where the disk is exported over NBD
    nbd_tcp_port: int = 0  # guests: also export on 127.0.0.1:<port> (0: UNIX socket only)
    nbd_tls_creds: str = ""  # guests: TLS on that port, QEMU's x509 directory ("": plain TCP, allowed by --nbd-tcp-insecure)


@dataclass
class DomainSpec:
    name: str
    domid: int
    role: str
    hypervisor_socket: str
    xenstore_fd: int  # inherited XenStore connection bound to `domid`
    state_dir: str
    status_file: str
    transport: str = "map"  # "map" or "copy": how this domain maps others' grants
    #: inherited channel to the toolstack (SOCK_SEQPACKET): b"xenstore" asks for a new
    #: XenStore connection, answered with the fd (SCM_RIGHTS) once xenstored serves; -1: none
    toolstack_fd: int = -1
    nr_pages: int = 4096  # memory, in 4 KiB pages
    disks: list[DiskSpecJSON] = field(default_factory=list)
    #: role-specific settings (lguest: devices, LAN, addresses; driver: limits)
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown domain role {self.role!r} (one of {', '.join(ROLES)})")
        if self.transport not in ("map", "copy"):
            raise ValueError(f"unknown transport {self.transport!r} (map or copy)")

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> DomainSpec:
        raw = json.loads(text)
        raw["disks"] = [DiskSpecJSON(**d) for d in raw.get("disks", [])]
        return cls(**raw)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> DomainSpec:
        return cls.from_json(Path(path).read_text())


_SIZE = re.compile(r"^\s*(\d+)\s*([KMGT]?)(?:i?B)?\s*$", re.I)


def parse_size(text: str | int) -> int:
    """A size in bytes from an int or text with an optional K/M/G/T suffix ("64M", "1GiB")."""
    if isinstance(text, int):
        return text
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"size {text!r} is not a number with an optional K/M/G/T suffix")
    return int(m.group(1)) << (10 * " KMGT".index((m.group(2) or " ").upper()))


def pid_alive(pid: object) -> bool:
    """Whether a process with this pid exists (status files name their writers' pids)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_status(path: str | os.PathLike[str], **status: Any) -> None:
    """Atomically replace a status file with one JSON object (`pvio.jsonfile`)."""
    write_json(path, status)


def read_status(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    return read_json(path)
