"""Xen's own C xenstored as pvio's XenStore: `pvio up --xenstored xen`.

Theory of operation
-------------------
Debian's unmodified ``xenstored`` (package xen-utils-4.17) runs as pvio's XenStore
domain, through the /dev/xen device layer (native/, `pvio run`'s arrangement):

- it is hypervisor domain `XENSTORED_DOMID`, the domid every ring domain grants its
  XenStore page to, created with PVIO_CDF_xs_domain (``PVIO_XS_DOMAIN=1``): Xen's
  XenStore domain, which may ask the hypervisor about other domains (xenstored's
  ``xc_domain_getinfo``);
- it listens on the state directory's XenStore socket (``XENSTORED_PATH``), which the
  toolstack, ``xenstore-ls`` and pvio's own console daemon use: socket connections are
  privileged, as on Xen;
- ``--master-domid`` is its own domid: on Xen the master domain is dom0, whose kernel
  publishes its ring in /proc/xen/xsd_{kva,port}; pvio has no kernel under the
  toolstack, so the device layer gives xenstored a ring of its own there (native/xsd.c)
  and domain 0, the driver domain, is introduced with its own page like every other
  domain;
- it serves each domain over the page the domain granted at GNTTAB_RESERVED_XENSTORE:
  XS_INTRODUCE maps it through gntdev and binds the port through evtchn;
- a domain's death reaches it as VIRQ_DOM_EXC (the hypervisor tells every domain that
  maps the dead one's grants), on which it asks getdomaininfo about every domain it
  knows, drops the dead ones and fires @releaseDomain.

What pvio's own xenstored adds and Xen's lacks, and so is refused with this daemon:
connections bound to a domain over a socket (the control socket's ``attach``: lguest
domains, the ``socket`` transport, QEMU's qdisk backends, `pvio run`), a database that
survives a restart (a crashed Xen xenstored ends the run), and the census `pvio top`
reads.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pvio.toolstack.children import UpError
from pvio.toolstack.config import Config
from pvio.toolstack.paths import StatePaths
from pvio.toolstack.qdisk import wants_qemu
from pvio.toolstack.xenpages import XENSTORED_DOMID

#: Which XenStore daemon serves `pvio up`: pvio's own, or Xen's C xenstored.
XENSTORED_DAEMONS = ("pvio", "xen")
#: Where Debian's xen-utils-4.17 puts the daemons.
XEN_BIN = Path("/usr/lib/xen-4.17/bin")


def xen_binary(name: str) -> Path:
    """One of Xen's daemons: $PVIO_XEN_BIN/<name>, else xen-utils-4.17's."""
    path = Path(os.environ.get("PVIO_XEN_BIN") or XEN_BIN) / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise UpError(f"Xen's {name} is not installed: {path} is missing "
                      "(apt-get install --no-install-recommends xen-utils-4.17)")
    return path


def check_xen_xenstored(config: Config, transport: str) -> None:
    """Refuse what only pvio's xenstored can serve, before anything starts."""
    if transport != "ring":
        raise UpError("--xenstored xen serves domains over their XenStore rings: "
                      "it cannot be combined with --xenstore-transport socket")
    for dom in config.domains:
        if dom.type != "xen":
            raise UpError(f"{dom.name}: lguest guests need pvio's xenstored (a XenStore connection per "
                          "domain over a socket, which Xen's xenstored has not); drop --xenstored xen")
        for disk in dom.disks:
            if wants_qemu(disk):
                raise UpError(f"{dom.name}: {disk.spec.vdev.name} is served by QEMU (backendtype=qdisk), which "
                              "reaches XenStore through pvio's xenstored; drop --xenstored xen")


def xen_xenstored_argv(paths: StatePaths) -> list[str]:
    """The command line that runs Xen's xenstored as pvio's XenStore domain."""
    from pvio.toolstack.run_cli import domain_environment, preload_library

    binary = xen_binary("xenstored")
    try:
        lib = preload_library()
    except Exception as e:  # click's message, said as pvio up says things
        raise UpError(str(getattr(e, "message", e))) from None
    rundir = paths.root / "xenstored-run"
    rundir.mkdir(exist_ok=True)
    env = domain_environment({}, paths, XENSTORED_DOMID, "copy", "xenstored", lib, str(paths.xenstored_socket))
    env |= {"PVIO_XS_DOMAIN": "1", "XENSTORED_RUNDIR": str(rundir), "XENSTORED_ROOTDIR": str(rundir)}
    return ["env", *(f"{k}={v}" for k, v in env.items()), str(binary),
            "--no-fork", "--master-domid", str(XENSTORED_DOMID)]


def have_xen_daemons() -> bool:
    """Whether xen-utils-4.17's daemons are here (tests skip without them)."""
    return shutil.which("xenstored", path=str(Path(os.environ.get("PVIO_XEN_BIN") or XEN_BIN))) is not None
