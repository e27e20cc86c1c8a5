"""Real processes the way `pvio up` starts them: hypervisor, xenstored, a driver domain and
guest domains, with the vbd directories libxl would write (`pvio.toolstack.xslayout`).

Every process is stopped and every socket removed by `Harness.close()` (used as a pytest
fixture with a finalizer); each wait is bounded.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from pvio.domains.spec import DiskSpecJSON, DomainSpec, read_status
from pvio.toolstack import diskspec
from pvio.toolstack.xslayout import XsOp, vbd_add, vbd_remove_request
from pvio.xenstore.client import Client
from pvio.xenstore.daemon import attach_domain

DRIVER_DOMID = 0


def _wait(cond: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Harness:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.hv_sock = str(root / "hv.sock")
        self.xs_sock = str(root / "xs.sock")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.specs: dict[str, DomainSpec] = {}
        self.xs: Client | None = None
        self.introduced: set[int] = set()

    # -- the two daemons ---------------------------------------------------------------

    def start(self) -> Harness:
        pvio = [sys.executable, "-m", "pvio"]
        self._spawn("hypervisor", [*pvio, "hypervisor", "--socket", self.hv_sock])
        self._spawn("xenstored", [*pvio, "xenstored", "--socket", self.xs_sock])
        _wait(lambda: os.path.exists(self.hv_sock) and os.path.exists(self.xs_sock + ".control"), 20, "daemons")
        self.xs = Client(self.xs_sock)
        return self

    def _spawn(self, name: str, argv: list[str], **kw: Any) -> subprocess.Popen[bytes]:
        log = open(self.root / f"{name}.log", "ab")  # noqa: SIM115 - owned by the process
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kw)
        log.close()
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> str:
        p = self.root / f"{name}.log"
        return p.read_text(errors="replace") if p.exists() else ""

    # -- the toolstack's XenStore writes ---------------------------------------------------

    def run_ops(self, ops: list[XsOp]) -> None:
        assert self.xs is not None
        xs = self.xs
        xs.transact(lambda tx: apply_ops(xs, tx, ops))

    def introduce(self, domid: int, name: str) -> None:
        assert self.xs is not None
        if domid in self.introduced:
            return
        if domid != DRIVER_DOMID:
            self.xs.introduce(domid)
        home = f"/local/domain/{domid}"
        self.xs.write(f"{home}/name", name)
        self.xs.set_perms(home, [f"n{domid}"])
        self.introduced.add(domid)

    def add_vbd(self, domid: int, spec: str, name: str = "") -> DiskSpecJSON:
        # The domain first: xenstored drops permissions naming a domain that does not
        # exist (XSA-322), so the vbd directories must be written after the introduce.
        self.introduce(domid, name or f"guest{domid}")
        disk = diskspec.parse(spec)
        self.run_ops(vbd_add(domid, disk, disk.target, DRIVER_DOMID))
        return DiskSpecJSON(
            vdev=disk.vdev.name, devid=disk.vdev.number, target=disk.target, format=disk.format,
            read_only=disk.read_only, nbd_socket=str(self.root / f"d{domid}-{disk.vdev.name}.sock"),
        )

    def remove_vbd(self, domid: int, devid: int) -> None:
        self.run_ops(vbd_remove_request(domid, devid, DRIVER_DOMID))

    # -- domain processes -------------------------------------------------------------------

    def start_domain(
        self, name: str, domid: int, role: str, *, disks: list[DiskSpecJSON] | None = None,
        transport: str = "map", extra: dict[str, Any] | None = None, wait: bool = True,
    ) -> DomainSpec:
        self.introduce(domid, name)
        sock = attach_domain(self.xs_sock + ".control", domid)
        status = str(self.root / f"{name}.status")
        if os.path.exists(status):
            os.unlink(status)
        spec = DomainSpec(
            name=name, domid=domid, role=role, hypervisor_socket=self.hv_sock,
            xenstore_fd=sock.fileno(), state_dir=str(self.root), status_file=status,
            transport=transport, nr_pages=8192, disks=disks or [], extra=extra or {},
        )
        spec_path = self.root / f"{name}.json"
        spec_path.write_text(spec.to_json())
        try:
            self._spawn(name, [sys.executable, "-m", "pvio.domains.run", str(spec_path)],
                        pass_fds=[sock.fileno()])
        finally:
            sock.close()
        self.specs[name] = spec
        if wait:
            self.wait_ready(name)
        return spec

    def status(self, name: str) -> dict[str, Any] | None:
        return read_status(self.specs[name].status_file)

    def wait_ready(self, name: str, timeout: float = 30) -> dict[str, Any]:
        proc = self.procs[name]

        def ready() -> dict[str, Any] | None:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited {proc.returncode}:\n{self.log(name)[-3000:]}")
            st = self.status(name)
            return st if st and st.get("ready") else None

        result: dict[str, Any] = _wait(ready, timeout, f"{name} ready")
        return result

    def kill(self, name: str, sig: int = signal.SIGKILL) -> int:
        proc = self.procs[name]
        proc.send_signal(sig)
        return proc.wait(timeout=20)

    def stop(self, name: str) -> int:
        """SIGTERM: the orderly stop."""
        return self.kill(name, signal.SIGTERM)

    def close(self) -> None:
        for name in reversed(list(self.procs)):
            proc = self.procs[name]
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        if self.xs is not None:
            self.xs.close()
            self.xs = None

    def read(self, path: str) -> str | None:
        assert self.xs is not None
        try:
            return self.xs.read(path).decode()
        except Exception:
            return None


def connect_unix(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    return s


def apply_ops(xs: Any, tx: int, ops: list[XsOp]) -> None:
    """The toolstack's XenStore operations (`pvio.toolstack.xslayout`) in transaction `tx`
    of a blocking client; removing what is absent is fine."""
    for op in ops:
        if op.op == "rm":
            try:
                xs.rm(op.path, tx)
            except Exception:  # absent is fine
                pass
        elif op.op == "mkdir":
            xs.mkdir(op.path, tx)
        elif op.op == "write":
            xs.write(op.path, op.value, tx)
        elif op.op == "set_perms":
            xs.set_perms(op.path, list(op.perms), tx)
