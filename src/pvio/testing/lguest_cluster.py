"""lguest guests and Launchers as real processes, started the toolstack's way.

`LguestCluster` starts `pvio hypervisor`, then for each guest a Launcher and a guest
domain process (``python -m pvio.domains.run SPEC.json``) from specs shaped as
`pvio up` writes them (`pvio.domains.lguest_settings` shows both), waits for their status files
and stops everything in reverse order, checking that no ``pvio-*`` namespace is left.
Used by the end-to-end tests and by ``pvio bench lguest``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from pvio.domains.spec import DomainSpec, read_status


@dataclass
class GuestDef:
    name: str
    address: str
    disk_size: str = "16M"
    lan: str = "lan0"
    mtu: int = 1500
    hostile: list[str] = field(default_factory=list)


@dataclass
class _Proc:
    name: str
    proc: subprocess.Popen[bytes]
    status_file: Path
    log: IO[bytes]


class LguestCluster:
    """The hypervisor plus a Launcher and a guest process per `GuestDef`."""

    def __init__(self, state_dir: Path, guests: list[GuestDef], *, nr_pages: int = 1024,
                 lan_hosts: dict[str, str] | None = None) -> None:
        self.state_dir = state_dir
        self.guests = guests
        self.lan_hosts = dict(lan_hosts or {})  # LAN -> the host's address on it (CIDR)
        self.nr_pages = nr_pages
        self.hv_socket = str(state_dir / "hv.sock")
        self.hv: subprocess.Popen[bytes] | None = None
        self.procs: list[_Proc] = []
        self.domids: dict[str, tuple[int, int]] = {}  # name -> (launcher, guest)
        for i, g in enumerate(guests):
            self.domids[g.name] = (10 + 2 * i, 11 + 2 * i)

    def console_socket(self, name: str) -> str:
        return str(self.state_dir / f"{name}.console")

    def nbd_socket(self, name: str) -> str:
        return str(self.state_dir / f"{name}.nbd")

    def nbd_uri(self, name: str) -> str:
        return f"nbd+unix:///lgba?socket={self.nbd_socket(name)}"

    def spec(self, g: GuestDef, role: str) -> DomainSpec:
        launcher, guest = self.domids[g.name]
        members = [{"name": o.name, "domid": self.domids[o.name][1]} for o in self.guests if o.lan == g.lan]
        me = launcher if role == "lguest-launcher" else guest
        name = f"{g.name}-launcher" if role == "lguest-launcher" else g.name
        extra: dict[str, Any] = {
            "config": {"name": g.name, "type": "lguest", "console": True,
                       "disk": {"target": f"{g.name}-disk.img", "size": g.disk_size},
                       "net": {"lan": g.lan, "address": g.address, "mtu": g.mtu}},
            "launcher_domid": launcher, "guest_domid": guest, "lan_members": members,
            "console_socket": self.console_socket(g.name), "nbd_socket": self.nbd_socket(g.name),
        }
        if g.lan in self.lan_hosts:
            extra["lan_host"] = {"address": self.lan_hosts[g.lan]}
        if g.hostile and role == "lguest-guest":
            extra["hostile"] = list(g.hostile)
        return DomainSpec(name=name, domid=me, role=role, hypervisor_socket=self.hv_socket, xenstore_fd=-1,
                          state_dir=str(self.state_dir), status_file=str(self.state_dir / f"{name}.status"),
                          nr_pages=self.nr_pages, extra=extra)

    def start(self, timeout: float = 30.0) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.hv = subprocess.Popen([sys.executable, "-m", "pvio", "hypervisor", "--socket", self.hv_socket],
                                   stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert self.hv.stdout is not None
        if b"listening" not in self.hv.stdout.readline():
            raise RuntimeError("pvio hypervisor did not start")
        for g in self.guests:
            for role in ("lguest-launcher", "lguest-guest"):
                self._spawn(self.spec(g, role))
        deadline = time.monotonic() + timeout
        for p in self.procs:
            while not (read_status(p.status_file) or {}).get("ready"):
                if p.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{p.name} did not come up:\n{self.log(p.name)}")
                time.sleep(0.05)

    def _spawn(self, spec: DomainSpec) -> None:
        path = self.state_dir / f"{spec.name}.json"
        path.write_text(spec.to_json())
        log = open(self.state_dir / f"{spec.name}.log", "wb")  # noqa: SIM115 (closed in stop)
        proc = subprocess.Popen([sys.executable, "-m", "pvio.domains.run", str(path)],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(_Proc(spec.name, proc, Path(spec.status_file), log))

    def status(self, name: str) -> dict[str, Any]:
        return read_status(self.state_dir / f"{name}.status") or {}

    def log(self, name: str) -> str:
        try:
            return (self.state_dir / f"{name}.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> dict[str, int]:
        """SIGTERM guests, then Launchers, then the hypervisor; the exit codes."""
        rcs: dict[str, int] = {}
        guests = [p for p in self.procs if not p.name.endswith("-launcher")]
        launchers = [p for p in self.procs if p.name.endswith("-launcher")]
        for group in (guests, launchers):
            for p in group:
                if p.proc.poll() is None:
                    p.proc.send_signal(signal.SIGTERM)
            for p in group:
                try:
                    rcs[p.name] = p.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    p.proc.kill()
                    rcs[p.name] = p.proc.wait()
                p.log.close()
        self.procs.clear()
        if self.hv is not None:
            self.hv.send_signal(signal.SIGTERM)
            try:
                rcs["hypervisor"] = self.hv.wait(timeout)
            except subprocess.TimeoutExpired:
                self.hv.kill()
                rcs["hypervisor"] = self.hv.wait()
            if self.hv.stdout is not None:
                self.hv.stdout.close()
            self.hv = None
        from pvio.domains.tap import remove_namespace

        for g in self.guests:  # a guest killed above may have left its namespace
            if rcs.get(g.name, 0) != 0:
                remove_namespace(f"pvio-{g.name}")
        return rcs

    def __enter__(self) -> LguestCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def netns_exec(name: str, *argv: str, timeout: float = 20.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", "netns", "exec", f"pvio-{name}", *argv], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "LC_ALL": "C"})
