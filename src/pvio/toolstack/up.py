"""`pvio up`: the toolstack — start the hypervisor, XenStore and the domains; supervise.

Theory of operation
-------------------
`pvio up` plays xl/libxl.  In order:

1. It takes the state directory (a lock file keeps a second `pvio up` out), starts
   `pvio hypervisor` and `pvio xenstored` as child processes with their logs under
   `logs/`, and connects to XenStore on the privileged socket.
2. It decides every domain's domid (0 for the driver domain, then 1, 2, ...), writes
   what libxl writes for a domain (`/local/domain/<domid>/name`, `domid`, and the
   domain's own writable directories), INTRODUCEs it to xenstored and obtains a
   connection bound to that domid (`attach_domain`), which the domain process inherits:
   a domain never claims its own identity.
3. For every vbd it writes the frontend, backend and /libxl directories with libxl's
   permissions in one transaction (`pvio.toolstack.xslayout`), creating missing raw
   images sparse.
4. It starts the driver domain, then the guests, each as
   ``python -m pvio.domains.run SPEC.json`` (`pvio.domains.spec`), waits for their
   status files to say ready, writes `pvio-up.json` (what `pvio list` shows) and prints
   the NBD URIs and what to try next.
5. It supervises.  A driver domain that dies is reported and restarted (guests' blkfronts
   renegotiate and re-issue their in-flight requests); a guest that dies is reported;
   the hypervisor or xenstored dying ends the run with an error.
6. On SIGINT/SIGTERM: guests are stopped first (each closes its NBD export and takes its
   vbds through XenBus Closing → Closed, ending its grants), then backends still
   connected are asked to close as libxl does (online=0, state=Closing) and waited for,
   the driver domain is stopped (it flushes storage), XenStore is cleaned, and xenstored
   and the hypervisor are stopped.  Exit status 0.

What it deliberately does not do: run domains on other machines (an NBD URI as a disk's
target is how storage outgrows this machine), or keep running after its own exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from pvio.abi.xenbus import XenbusState
from pvio.domains.spec import read_status
from pvio.nbd.address import nbd_uri_for_socket
from pvio.toolstack import preflight, vifs, xenpages, xslayout
from pvio.toolstack.children import Child, UpError, python_argv, tail, wait_socket
from pvio.toolstack.config import Config
from pvio.toolstack.handover import XenstoreHandover
from pvio.toolstack.paths import StatePaths
from pvio.toolstack.plan import DomainRun, plan_domains, prepare_images
from pvio.toolstack.qdisk import QdiskBackends, wants_qemu
from pvio.toolstack.restart import device_name, reset_lguest_devices, stop_its_guests
from pvio.toolstack.status import banner, load_up_status, stale_processes, write_up_status
from pvio.toolstack.xen_daemons import check_xen_daemons, xen_xenconsoled_argv, xen_xenstored_argv

READY_TIMEOUT = 30.0
#: A domain that dies more than MAX_CRASHES times in CRASH_WINDOW seconds is left dead.
MAX_CRASHES = 5
CRASH_WINDOW = 60.0
CLOSE_TIMEOUT = 15.0
XENBUS_CLOSED = str(int(XenbusState.Closed))  # as <device>/state holds it


# T:910 The toolstack
# Nothing in Xen makes a domain appear by itself: a toolstack (xl and libxl) decides its
# id, writes its XenStore directories — for a disk, a frontend directory the guest owns
# and a backend directory the driver domain owns, each readable by the other end — and
# only then starts it.  `pvio up` does the same with processes: the hypervisor and
# xenstored first, then the driver domain (domid 0, blkback), then the guests, each handed
# a XenStore connection already bound to its domid.  From there the two ends meet through
# XenStore alone, exactly as Xen's split drivers do.
# :T


class Toolstack:
    def __init__(
        self,
        config: Config,
        paths: StatePaths,
        *,
        nbd_socket: str | None = None,
        nbd_tcp: int = 0,
        nbd_tls_creds: str = "",
        out: TextIO = sys.stdout,
        xenstore_transport: str = "ring",
        xenstored: str = "pvio",
        console_daemon: str = "pvio",
    ) -> None:
        self.config = config
        self.paths = paths
        self.nbd_socket_override = nbd_socket
        self.nbd_tcp = nbd_tcp
        self.nbd_tls_creds = nbd_tls_creds
        self.out = out
        self.children: list[Child] = []
        self.domains: list[DomainRun] = []
        self.xs: Any = None
        self._lock_fd = -1
        self._stopping = False
        self._backend_failures: dict[str, str] = {}  # backend path -> the cause said
        #: "ring": Xen-style domains reach XenStore over their page (`xenpages`)
        self.xenstore_transport = xenstore_transport
        self.xenstored = xenstored  # "pvio", or "xen": Xen's C xenstored (`xen_daemons`)
        self.console_daemon = console_daemon  # "pvio", or "xen": Xen's xenconsoled
        self.handover = XenstoreHandover(self._attach, self._introduce_ring)
        self.qdisk = QdiskBackends(paths, self.say)  # QEMU for backendtype=qdisk disks
        self._bridges_undo: list[tuple[str, str]] = []  # the vifs' bridges, as pvio up found them

    # -- output --------------------------------------------------------------------

    def say(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    # -- start ---------------------------------------------------------------------

    def _take_lock(self) -> None:
        try:
            self.paths.make()
            fd = os.open(self.paths.lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise UpError(f"cannot use {self.paths.root} as the state directory: {e.strerror} "
                          "(give a writable --state-dir)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UpError(
                f"another pvio up is running with state directory {self.paths.root} "
                "(stop it, or pass --state-dir DIR)"
            ) from None
        self._lock_fd = fd
        self._clean_stale_stack()
        for stale in (self.paths.hypervisor_socket, self.paths.xenstored_socket, self.paths.xenstored_control,
                      self.paths.xenstore_db):  # a new stack starts with a new tree
            with contextlib.suppress(FileNotFoundError):
                stale.unlink()

    def _clean_stale_stack(self) -> None:
        """A stack left running by a pvio up that ended without stopping it (we hold the
        lock, so its pvio up is gone): say so, and stop what it started."""
        status = load_up_status(self.paths)
        if status is None:
            return
        left = stale_processes(status)
        for pid in left:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if left:
            self.say(f"pvio up: a stack left by an earlier pvio up (pid {status.get('pid')}) was still "
                     f"running on {self.paths.root}: stopped its {len(left)} processes")
        with contextlib.suppress(FileNotFoundError):
            self.paths.up_status.unlink()

    async def _start_child(self, child: Child) -> Child:
        await child.start()
        self.children.append(child)
        return child

    async def start_services(self) -> None:
        hv = await self._start_child(
            Child(
                "hypervisor",
                python_argv("pvio", "hypervisor", "--socket", str(self.paths.hypervisor_socket),
                            "--status", str(self.paths.status("hypervisor"))),
                self.paths.log("hypervisor"),
            )
        )
        await wait_socket(self.paths.hypervisor_socket, hv, socket.SOCK_SEQPACKET)
        xs_argv = xen_xenstored_argv(self.paths) if self.xenstored == "xen" else python_argv(
            "pvio", "xenstored", "--socket", str(self.paths.xenstored_socket),
            "--control", str(self.paths.xenstored_control),
            "--db", str(self.paths.xenstore_db),  # durable: a restarted xenstored has the whole tree back
            "--status", str(self.paths.status("xenstored")),  # for pvio top
            *xenpages.xenstored_args(self.xenstore_transport, self.paths.hypervisor_socket))
        xs = await self._start_child(Child("xenstored", xs_argv, self.paths.log("xenstored")))
        await wait_socket(self.paths.xenstored_socket, xs)
        if self.xenstored != "xen":  # Xen's waits for domain 0 (`_start_xenconsoled`)
            await self._start_xenconsoled()
        from pvio.xenstore.client import AsyncClient

        self.xs = await AsyncClient.open(str(self.paths.xenstored_socket), reconnect=True)
        self.handover.xenstored_up.set()

    async def _start_xenconsoled(self) -> None:
        """pvio's console daemon, when consoles come with rings.  Xen's xenstored refuses
        a socket connection's requests until domain 0 exists (the driver domain here; on
        Xen, dom0 always does), so with it the daemon starts once the driver domain runs."""
        if (argv := xenpages.xenconsoled_argv(self.xenstore_transport, self.paths)) is not None:
            argv = xen_xenconsoled_argv(self.paths) if self.console_daemon == "xen" else python_argv("pvio", *argv)
            await self._start_child(Child("xenconsoled", argv, self.paths.log("xenconsoled")))

    async def _transact(self, ops: list[xslayout.XsOp]) -> None:
        xs = self.xs

        async def body(tx: int) -> None:
            for op in ops:
                if op.op == "rm":
                    with contextlib.suppress(Exception):
                        await xs.rm(op.path, tx)
                elif op.op == "mkdir":
                    await xs.mkdir(op.path, tx)
                elif op.op == "write":
                    await xs.write(op.path, op.value, tx)
                elif op.op == "set_perms":
                    await xs.set_perms(op.path, list(op.perms), tx)
                else:  # pragma: no cover - xslayout only makes the four
                    raise ValueError(op.op)

        await xs.transact(body)

    async def _make_domain(self, run: DomainRun, pages: dict[str, int] | None = None) -> None:
        """INTRODUCE the domain (with its XenStore page and port, when it built them),
        then write its directory and its vbds (libxl's order: xenstored ignores a
        permission entry naming a domain it does not know yet)."""
        domid = run.spec.domid
        if pages is not None:
            await self.xs.introduce(domid, pages["store-ring-ref"], pages["store-port"])
        elif domid != 0:
            await self.xs.introduce(domid)
        await self._transact(xslayout.domain_add(domid, run.spec.name) + xenpages.page_keys(domid, pages))
        dom = run.config
        if dom is not None and dom.type == "xen":
            for disk in dom.disks:
                if wants_qemu(disk):
                    await self.qdisk.add_disk(self.xs, self._transact, domid, run.spec.name, disk)
                    continue
                await self._transact(xslayout.vbd_add(domid, disk.spec, disk.params or disk.spec.target))
            if dom.vifs:
                await self._transact(vifs.vif_ops(domid, dom))

    async def _attach(self, domid: int) -> socket.socket:
        """A XenStore connection bound to `domid`, for the domain process to inherit."""
        from pvio.xenstore.daemon import attach_domain

        return await asyncio.to_thread(attach_domain, self.paths.xenstored_control, domid)

    async def _introduce_ring(self, domid: int, pages: dict[str, int]) -> None:
        """A domain built its pages (`pvio.domains.xen_pages`): introduce it with them."""
        run = next(r for r in self.domains if r.spec.domid == domid and xenpages.uses_ring(r.spec))
        await self._make_domain(run, pages)

    async def _xenstore_for(self, run: DomainRun) -> socket.socket | None:
        """The socket a domain inherits, or None: it builds its ring and asks to be introduced."""
        return None if xenpages.uses_ring(run.spec) else await self._attach(run.spec.domid)

    async def _spawn_domain(self, run: DomainRun, xs_sock: socket.socket | None) -> None:
        spec = run.spec
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        spec.xenstore_fd = xs_sock.fileno() if xs_sock is not None else -1
        spec.toolstack_fd = theirs.fileno()
        self.paths.spec(spec.name).write_text(spec.to_json())
        with contextlib.suppress(FileNotFoundError):
            Path(spec.status_file).unlink()
        inherited = [s for s in (xs_sock, theirs) if s is not None]
        for s in inherited:
            os.set_inheritable(s.fileno(), True)
        child = run.child
        child.pass_fds = tuple(s.fileno() for s in inherited)
        try:
            await child.start()
        finally:
            for s in inherited:
                s.close()  # the domain holds them now
        self.handover.serve(spec.domid, ours)
        if child not in self.children:
            self.children.append(child)

    async def _restart_xenstored(self, child: Child) -> None:
        """xenstored died: start it again from its database (the whole tree, the domains
        introduced); each domain's client asks for a new connection and carries on."""
        code = child.proc.returncode if child.proc else None
        if self.xenstored == "xen":
            raise UpError(f"Xen's xenstored exited (status {code}); it keeps the tree in memory only, so "
                          f"there is nothing to restart it from; see {child.log_path}")
        self.handover.xenstored_up.clear()
        child.restarts += 1
        self.say(f"pvio up: xenstored exited (status {code}); restarting it from its database "
                 f"(restart #{child.restarts}; log {child.log_path})")
        for path in (self.paths.xenstored_socket, self.paths.xenstored_control):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
        await child.stop()  # closes its log
        await child.start()
        await wait_socket(self.paths.xenstored_socket, child)
        self.handover.xenstored_up.set()
        self.say("pvio up: xenstored is back; the domains reconnect")

    def plan(self) -> None:
        """Decide domids and specs for the driver domain and every guest (`plan`)."""
        self.domains = plan_domains(self.config, self.paths, nbd_socket=self.nbd_socket_override, nbd_tcp=self.nbd_tcp, nbd_tls_creds=self.nbd_tls_creds)

    def write_up_status(self, ready: bool) -> None:
        write_up_status(self.paths, self.domains, self.children, ready)

    def banner(self) -> None:
        banner(self.config, self.paths, self.domains, self.say)

    async def _start_format_servers(self) -> None:
        """qemu-nbd in front of every image that is not raw (qcow2, vhd, ...): blkback
        reaches it as an NBD URI, and qemu keeps the format's metadata right."""
        for dom in self.config.domains:
            for disk in dom.disks:
                target = disk.spec.target
                disk.params = target
                if disk.spec.format == "raw" or "://" in target or wants_qemu(disk):
                    continue
                if shutil.which("qemu-nbd") is None:
                    raise UpError(f"{dom.name}: format {disk.spec.format} needs qemu-nbd (apt-get install qemu-utils)")
                name = f"qemu-nbd-{dom.name}-{disk.spec.vdev.name}"
                sock = self.paths.root / f"{name}.sock"
                with contextlib.suppress(FileNotFoundError):
                    sock.unlink()
                argv = ["qemu-nbd", "--format", disk.spec.format, "--socket", str(sock),
                        "--export-name", disk.spec.vdev.name, "--persistent", "--shared", "16"]
                if disk.spec.read_only:
                    argv.append("--read-only")
                child = await self._start_child(Child(name, [*argv, target], self.paths.log(name)))
                await wait_socket(sock, child)
                disk.params = nbd_uri_for_socket(sock, disk.spec.vdev.name)

    async def start_domains(self) -> None:
        prepare_images(self.config, self.say)
        self._bridges_undo = await asyncio.to_thread(vifs.prepare_bridges, self.config)
        await self._start_format_servers()
        for run in self.domains:
            # A guest whose disk QEMU serves keeps the socket: its QEMU backend is started
            # against the guest's XenStore directories before the guest runs.
            qemu = run.config is not None and any(wants_qemu(d) for d in run.config.disks)
            xenpages.choose_transport(run.spec, "socket" if qemu else self.xenstore_transport)
            if not xenpages.uses_ring(run.spec):  # a ring domain is introduced once it built its page
                await self._make_domain(run)
        await self.qdisk.start(self.xs)
        self.children += self.qdisk.processes()
        for run in self.domains:
            await self._spawn_domain(run, await self._xenstore_for(run))
            if run.spec.role in ("driver", "lguest-launcher"):
                await self._wait_ready(run)
            if run.spec.role == "driver" and self.xenstored == "xen":
                await self._start_xenconsoled()
        for run in self.domains:
            await self._wait_ready(run)

    async def _wait_ready(self, run: DomainRun, timeout: float = READY_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = read_status(run.spec.status_file)
            if status and status.get("ready"):
                run.status = status
                run.state = "running"
                return
            if not run.child.running:
                raise UpError(
                    f"domain {run.spec.name} exited while starting (status {run.child.proc and run.child.proc.returncode}); "
                    f"see {run.child.log_path}:\n{tail(run.child.log_path)}"
                )
            await asyncio.sleep(0.05)
        raise UpError(f"domain {run.spec.name} was not ready within {timeout:.0f}s; see {run.child.log_path}")

    # -- supervise -----------------------------------------------------------------

    async def supervise(self, stop: asyncio.Event) -> None:
        services = [c for c in self.children if c.name in ("hypervisor", "xenstored", "xenconsoled")]
        while not stop.is_set():
            for svc in services:
                if svc.name == "xenstored" and not svc.running and svc.restarts < MAX_CRASHES:
                    await self._restart_xenstored(svc)
                elif svc.name == "xenconsoled" and not svc.running and svc.restarts < MAX_CRASHES:
                    await xenpages.restart_xenconsoled(svc, self.say)  # it serves every console again
                elif not svc.running:
                    raise UpError(f"{svc.name} exited (status {svc.proc and svc.proc.returncode}); see {svc.log_path}")
            for run in self.domains:
                if run.state == "running" and not run.child.running:
                    await self._crashed(run)
                if run.spec.role == "driver" and run.state == "running":
                    self._report_backend_failures(run)
            if await self.qdisk.supervise(self.xs, self._transact):
                self.write_up_status(True)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.2)

    async def _crashed(self, run: DomainRun) -> None:
        """A domain died: restart it (xl's on_crash = "restart", the default: the driver
        domain always) or leave it dead ("destroy"); a domain that keeps dying is left."""
        code = run.child.proc.returncode if run.child.proc else None
        if run.spec.role == "driver" and self.xenstored == "xen":
            raise UpError(f"the driver domain exited (status {code}); Xen's xenstored removed what it owned (its "
                          f"backend directories), so it is not restarted; see {run.child.log_path}")
        what = "driver domain" if run.spec.role == "driver" else f"domain {run.spec.name}"
        on_crash = "restart" if run.config is None else run.config.on_crash
        now = time.monotonic()
        run.crashes = [t for t in run.crashes if now - t < CRASH_WINDOW] + [now]
        if on_crash != "restart" or len(run.crashes) > MAX_CRASHES:
            run.state = "crashed"
            why = "on_crash = destroy" if on_crash != "restart" else \
                f"{len(run.crashes)} times in {CRASH_WINDOW:.0f} s, not restarted again"
            self.say(f"pvio up: {what} exited (status {code}; {why}); see {run.child.log_path}")
            self.write_up_status(True)
            return
        run.child.restarts += 1
        self.say(f"pvio up: {what} exited (status {code}); restarting it "
                 f"(restart #{run.child.restarts}; log {run.child.log_path})")
        run.state = "restarting"
        self.write_up_status(True)
        try:
            if run.spec.role == "guest":
                await self._renew_guest(run)
            elif run.spec.role == "lguest-guest":
                await reset_lguest_devices(self.paths, run)
            elif run.spec.role == "lguest-launcher":
                stop_its_guests(self.domains, run)
            await self._spawn_domain(run, await self._xenstore_for(run))
            await self._wait_ready(run)
        except UpError as e:
            run.state = "crashed"
            self.say(f"pvio up: {what} did not come back: {e}")
        else:
            self.say(f"pvio up: {what} is back")
        self.write_up_status(True)

    async def _renew_guest(self, run: DomainRun) -> None:
        """What libxl does between a guest's death and its restart: its backends let go
        of it (online=0, Closing: blkback unmaps its pages, so the hypervisor can finish
        the dead domain), its devices and XenStore directory are removed, xenstored
        forgets it, and then it is introduced and its devices written again."""
        await self._close_backends([run])
        await self.qdisk.stop_guest(self.xs, run.spec.domid)  # its QEMU goes, and comes back below
        ops: list[xslayout.XsOp] = []
        for d in run.spec.disks:
            ops += xslayout.vbd_destroy(run.spec.domid, d.devid)
        if ops:
            await self._transact(ops)
        with contextlib.suppress(Exception):
            await self.xs.release(run.spec.domid)
        with contextlib.suppress(Exception):
            await self.xs.rm(f"/local/domain/{run.spec.domid}")
        if not xenpages.uses_ring(run.spec):
            await self._make_domain(run)
            await self.qdisk.start_guest(self.xs, run.spec.domid)

    def _report_backend_failures(self, run: DomainRun) -> None:
        """Say once each device the driver domain cannot serve, with the cause (its
        status file names them: an image that cannot be opened, say)."""
        failed = (read_status(run.spec.status_file) or {}).get("failed") or {}
        for path, why in failed.items():
            if self._backend_failures.get(path) != why:
                self._backend_failures[path] = why
                self.say(f"pvio up: {device_name(self.domains, path)} cannot be served: {why}")
        for path in set(self._backend_failures) - set(failed):
            del self._backend_failures[path]

    # -- stop ----------------------------------------------------------------------

    async def shutdown(self) -> None:
        self._stopping = True
        self.handover.close()
        guests = [r for r in self.domains if r.spec.role != "driver"]
        drivers = [r for r in self.domains if r.spec.role == "driver"]
        # Guests first: each takes its vbds through Closing -> Closed and ends its grants.
        await asyncio.gather(*(r.child.stop(CLOSE_TIMEOUT) for r in guests if r.child.proc))
        for r in guests:
            r.state = "stopped"
        await self.qdisk.stop(self.xs)
        if self.xs is not None:
            await self._close_backends()
        await asyncio.gather(*(r.child.stop(CLOSE_TIMEOUT) for r in drivers if r.child.proc))
        for r in drivers:
            r.state = "stopped"
        for c in self.children:
            if c.name.startswith("qemu-nbd-"):
                await c.stop(10.0)
        if self.xs is not None:
            with contextlib.suppress(Exception):
                await self._cleanup_xenstore()
            with contextlib.suppress(Exception):
                await self.xs.close()
        for c in reversed([c for c in self.children if c.name in ("hypervisor", "xenstored", "xenconsoled")]):
            await c.stop(5.0)
        await self._remove_namespaces()
        await asyncio.to_thread(vifs.undo_bridges, self._bridges_undo, self.say)
        for path in (self.paths.hypervisor_socket, self.paths.xenstored_socket, self.paths.xenstored_control,
                     self.paths.xenstore_db):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    async def _remove_namespaces(self) -> None:
        """A guest killed before its own cleanup leaves its netns pvio-<name>: remove it."""
        names = [r.spec.name for r in self.domains
                 if r.spec.role == "lguest-guest" or r.spec.extra.get("vifs")]
        if not names:
            return
        from pvio.domains.tap import TapError, netns_name, remove_namespace

        for name in names:
            try:
                await asyncio.to_thread(remove_namespace, netns_name(name))
            except (TapError, OSError) as e:
                self.say(f"pvio up: could not remove network namespace {netns_name(name)}: {e}")

    async def _close_backends(self, runs: list[DomainRun] | None = None) -> None:
        """libxl's remove: online=0 and Closing for every backend not Closed yet; wait."""
        pending = []
        for run in self.domains if runs is None else runs:
            for d in run.spec.disks:
                be = xslayout.backend_path(0, run.spec.domid, d.devid)
                try:
                    state = (await self.xs.read(f"{be}/state")).decode()
                except Exception:
                    continue
                if state != XENBUS_CLOSED:
                    with contextlib.suppress(Exception):
                        await self._transact(xslayout.vbd_remove_request(run.spec.domid, d.devid))
                    pending.append(f"{be}/state")
        deadline = time.monotonic() + 5.0
        while pending and time.monotonic() < deadline:
            still = []
            for path in pending:
                try:
                    if (await self.xs.read(path)).decode() != XENBUS_CLOSED:
                        still.append(path)
                except Exception:
                    pass
            pending = still
            if pending:
                await asyncio.sleep(0.1)

    async def _cleanup_xenstore(self) -> None:
        ops: list[xslayout.XsOp] = []
        for run in self.domains:
            for d in run.spec.disks:
                ops += xslayout.vbd_destroy(run.spec.domid, d.devid)
        if ops:
            await self._transact(ops)
        for run in self.domains:
            if run.spec.domid != 0:
                with contextlib.suppress(Exception):
                    await self.xs.release(run.spec.domid)
                with contextlib.suppress(Exception):
                    await self.xs.rm(f"/local/domain/{run.spec.domid}")

    def release_lock(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1


async def run_up(toolstack: Toolstack) -> int:
    """Run until SIGINT/SIGTERM; 0 after an orderly stop, 1 if something failed."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        toolstack._take_lock()
    except UpError as e:
        toolstack.say(f"pvio up: error: {e}")
        return 1
    code = 0
    try:
        preflight.check(toolstack.config)
        check_xen_daemons(toolstack.config, toolstack.xenstore_transport, toolstack.xenstored, toolstack.console_daemon)
        toolstack.plan()
        await toolstack.start_services()
        toolstack.write_up_status(False)
        start = asyncio.create_task(toolstack.start_domains())
        stopper = asyncio.create_task(stop.wait())
        done, _ = await asyncio.wait({start, stopper}, return_when=asyncio.FIRST_COMPLETED)
        if start in done:
            stopper.cancel()
            start.result()
            toolstack.write_up_status(True)
            toolstack.banner()
            await toolstack.supervise(stop)
        else:
            start.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await start
        toolstack.say("pvio up: stopping (XenBus close, flush)...")
    except UpError as e:
        toolstack.say(f"pvio up: error: {e}")
        code = 1
    finally:
        try:
            await toolstack.shutdown()
        finally:
            with contextlib.suppress(FileNotFoundError):
                toolstack.paths.up_status.unlink()
            toolstack.release_lock()
    if code == 0:
        toolstack.say("pvio up: stopped")
    return code


