"""What `pvio up` checks before it starts anything, so that a mistake is one line naming
the cause and what to do, and nothing is left behind.

- Every local image: a directory, or a path whose directory does not exist, is refused;
  a read-only disk's image must exist (pvio creates only writable raw images); one image
  may back one writable disk, or any number of read-only ones (as QEMU's locks allow);
  an image another process holds (another pvio up, qemu-nbd, a QEMU guest: their locks,
  `pvio.storage.lock`) is refused before any domain starts.
- lguest guests with a network device need root (network namespaces, TAP interfaces).
"""

from __future__ import annotations

import os
from pathlib import Path

from pvio.storage.lock import conflict
from pvio.toolstack.children import UpError
from pvio.toolstack.config import Config


def images(config: Config) -> list[tuple[str, str, bool, str]]:
    """(domain, device, writable, path) of every disk whose target is a local image."""
    out = []
    for dom in config.domains:
        for disk in dom.disks:
            if "://" not in disk.spec.target:
                out.append((dom.name, disk.spec.vdev.name, not disk.spec.read_only, disk.spec.target))
        if dom.lguest_disk:
            out.append((dom.name, "lgba", True, str(dom.lguest_disk["target"])))
    return out


def check(config: Config) -> None:
    """UpError with one line for the first thing that would fail later."""
    writers: dict[str, str] = {}
    users: dict[str, str] = {}
    for dom, dev, writable, target in images(config):
        where = f"{dom} {dev}: {target}"
        path = Path(target)
        if path.is_dir():
            raise UpError(f"{where} is a directory: give an image file as the disk's target")
        if not path.exists():
            if not path.parent.is_dir():
                raise UpError(f"{where}: directory {path.parent} does not exist (create it, or give another target)")
            if not writable:
                raise UpError(f"{where} does not exist: a read-only disk's image must exist (pvio creates "
                              "only writable images)")
            continue
        key = str(path.resolve())
        other = writers.get(key) or (users.get(key) if writable else None)
        if other is not None:
            raise UpError(f"{where} is also the image of {other}: an image has one writer, or only readers")
        users.setdefault(key, f"{dom} {dev}")
        if writable:
            writers[key] = f"{dom} {dev}"
        try:
            fd = os.open(key, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            raise UpError(f"{where} cannot be opened: {e.strerror}") from None
        try:
            why = conflict(fd, write=writable)
        finally:
            os.close(fd)
        if why is not None:
            raise UpError(f"{where} is in use ({why}): another pvio up, qemu-nbd or QEMU guest has it")
    if os.geteuid() != 0:
        netted = [d.name for d in config.domains if d.type == "lguest" and d.lguest_net is not None]
        if netted:
            raise UpError(f"lguest guests with a network device ({', '.join(netted)}) need root "
                          "(network namespaces and TAP interfaces): run pvio up as root")
