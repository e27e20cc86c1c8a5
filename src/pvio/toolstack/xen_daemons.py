"""Xen's own C daemons serving pvio: `pvio up --xenstored xen` and `--console-daemon xen`.

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

Debian's unmodified ``xenconsoled`` serves the Xen-style guests' consoles the same way
(``--console-daemon xen``, with either xenstored): it is domain `XENCONSOLED_DOMID`, the
domid each guest grants its console page to (GNTTAB_RESERVED_CONSOLE), created with
PVIO_CDF_control (``PVIO_CONTROL=1``: on Xen it runs in dom0, and it walks the domains
with getdomaininfo); it reaches XenStore over the socket, maps each console page
through gntdev, binds its port, gives it a pty (``console/tty``, which `pvio console`
opens) and logs it, timestamped, to ``logs/consoles/guest-NAME.log``.
"""

from __future__ import annotations

import os
from pathlib import Path

from pvio.toolstack.children import UpError
from pvio.toolstack.config import Config
from pvio.toolstack.paths import StatePaths
from pvio.toolstack.qdisk import wants_qemu
from pvio.toolstack.xenpages import XENCONSOLED_DOMID, XENSTORED_DOMID

#: Which XenStore and console daemons serve `pvio up`: pvio's own, or Xen's.
XEN_DAEMON_CHOICES = ("pvio", "xen")
#: Where Debian's xen-utils-4.17 puts the daemons.
XEN_BIN = Path("/usr/lib/xen-4.17/bin")


def xen_binary(name: str) -> Path:
    """One of Xen's daemons: $PVIO_XEN_BIN/<name>, else xen-utils-4.17's."""
    path = Path(os.environ.get("PVIO_XEN_BIN") or XEN_BIN) / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise UpError(f"Xen's {name} is not installed: {path} is missing "
                      "(apt-get install --no-install-recommends xen-utils-4.17)")
    return path


def check_xen_daemons(config: Config, transport: str, xenstored: str, console_daemon: str) -> None:
    """Refuse what Xen's daemons cannot serve here, before anything starts."""
    if console_daemon == "xen" and transport != "ring":
        raise UpError("--console-daemon xen serves the consoles Xen-style guests get with their XenStore rings: "
                      "it cannot be combined with --xenstore-transport socket")
    if xenstored != "xen":
        return
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


def _domain_argv(paths: StatePaths, domid: int, name: str, env: dict[str, str], argv: list[str]) -> list[str]:
    """`env` + `argv` run as pvio domain `domid` on the /dev/xen device layer."""
    from pvio.toolstack.run_cli import domain_environment, preload_library

    binary = xen_binary(name)
    try:
        lib = preload_library()
    except Exception as e:  # click's message, said as pvio up says things
        raise UpError(str(getattr(e, "message", e))) from None
    env = domain_environment({}, paths, domid, "copy", name, lib, str(paths.xenstored_socket)) | env
    return ["env", *(f"{k}={v}" for k, v in env.items()), str(binary), *argv]


def xen_xenstored_argv(paths: StatePaths) -> list[str]:
    """The command line that runs Xen's xenstored as pvio's XenStore domain."""
    rundir = paths.root / "xenstored-run"
    rundir.mkdir(exist_ok=True)
    env = {"PVIO_XS_DOMAIN": "1", "XENSTORED_RUNDIR": str(rundir), "XENSTORED_ROOTDIR": str(rundir)}
    return _domain_argv(paths, XENSTORED_DOMID, "xenstored", env,
                        ["--no-fork", "--master-domid", str(XENSTORED_DOMID)])


def xen_xenconsoled_argv(paths: StatePaths) -> list[str]:
    """The command line that runs Xen's xenconsoled as pvio's console daemon."""
    log_dir = paths.logs / "consoles"
    log_dir.mkdir(parents=True, exist_ok=True)
    return _domain_argv(paths, XENCONSOLED_DOMID, "xenconsoled", {"PVIO_CONTROL": "1"},
                        ["--interactive", "--log=guest", f"--log-dir={log_dir}", "--timestamp=guest"])

