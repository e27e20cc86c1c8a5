"""Where an NBD export is, as the NBD URI specification writes it: `NbdAddress`, and the
URI pvio's exports on UNIX sockets are reached by (declared here once)."""

from __future__ import annotations

import os
import urllib.parse
from dataclasses import dataclass


@dataclass(frozen=True)
class NbdAddress:
    """Where an NBD export is: a UNIX socket path or a TCP host and port, and the name."""

    export: str = ""
    socket_path: str | None = None
    host: str | None = None
    port: int = 10809

    @classmethod
    def parse(cls, uri: str) -> NbdAddress:
        """nbd+unix:///NAME?socket=PATH or nbd://HOST[:PORT]/NAME (the NBD URI spec)."""
        u = urllib.parse.urlsplit(uri)
        name = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
        if u.scheme == "nbd+unix":
            query = urllib.parse.parse_qs(u.query)
            if "socket" not in query:
                raise ValueError(f"{uri}: nbd+unix needs ?socket=PATH")
            return cls(export=name, socket_path=query["socket"][0])
        if u.scheme == "nbd":
            return cls(export=name, host=u.hostname or "localhost", port=u.port or 10809)
        raise ValueError(f"{uri}: not an nbd:// or nbd+unix:// URI")

    def uri(self) -> str:
        name = urllib.parse.quote(self.export)
        if self.socket_path is not None:
            return f"nbd+unix:///{name}?socket={self.socket_path}"
        return f"nbd://{self.host}:{self.port}/{name}"


def nbd_uri_for_socket(path: str | os.PathLike[str], export: str = "") -> str:
    """The NBD URI clients use for an export on a UNIX socket."""
    return NbdAddress(export=export, socket_path=os.fspath(path)).uri()


def tcp_uri(port: int, export: str, tls_creds: str = "", host: str = "127.0.0.1") -> str:
    """The URI of an export on TCP: ``nbds://`` with TLS (clients then need a certificate:
    libnbd's ``?tls-certificates=DIR``, qemu's ``tls-creds``), ``nbd://`` without."""
    scheme = "nbds" if tls_creds else "nbd"
    return f"{scheme}://{host}:{port}/{urllib.parse.quote(export)}"


def is_nbd_uri(params: str) -> bool:
    """True for an ``nbd://`` or ``nbd+unix://`` URI (a vbd's `params` may be one)."""
    return params.startswith(("nbd://", "nbd+unix://"))
