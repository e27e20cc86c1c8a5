"""Test certificates in QEMU's x509 layout, made with `openssl` (tools/install.sh installs it).

`make_creds(dir)` writes a CA and a server and a client certificate it signed into `dir`:
ca-cert.pem, server-cert.pem, server-key.pem, client-cert.pem, client-key.pem — one
directory both ends can use (qemu's ``tls-creds-x509,dir=``, libnbd's ``tls-certificates=``).
The extensions are the ones QEMU checks when it loads credentials: the CA is a CA that may
sign certificates, the server's certificate is for serverAuth and names localhost and
127.0.0.1, the client's is for clientAuth.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

_CA_EXT = ["-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]
_LEAF = "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
_SERVER_EXT = _LEAF + "extendedKeyUsage=serverAuth\nsubjectAltName=DNS:localhost,IP:127.0.0.1\n"
_CLIENT_EXT = _LEAF + "extendedKeyUsage=clientAuth\n"


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _key(name: str, cwd: Path) -> None:
    _openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", name, cwd=cwd)


def _leaf(who: str, ext: str, cwd: Path) -> None:
    _key(f"{who}-key.pem", cwd)
    _openssl("req", "-new", "-key", f"{who}-key.pem", "-subj", f"/CN=pvio test {who}", "-out", f"{who}.csr", cwd=cwd)
    (cwd / f"{who}.ext").write_text(ext)
    _openssl(
        "x509", "-req", "-in", f"{who}.csr", "-CA", "ca-cert.pem", "-CAkey", "ca-key.pem", "-CAcreateserial",
        "-days", "2", "-extfile", f"{who}.ext", "-out", f"{who}-cert.pem",
        cwd=cwd,
    )  # fmt: skip
    (cwd / f"{who}.csr").unlink()
    (cwd / f"{who}.ext").unlink()


def make_creds(d: Path, cn: str = "pvio test CA") -> Path:
    """A CA, and server and client certificates it signed, in `d` (QEMU's file names)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed (tools/install.sh installs it)")
    d.mkdir(parents=True, exist_ok=True)
    _key("ca-key.pem", d)
    _openssl(
        "req", "-x509", "-new", "-key", "ca-key.pem", "-subj", f"/CN={cn}", "-days", "2", *_CA_EXT,
        "-out", "ca-cert.pem",
        cwd=d,
    )  # fmt: skip
    _leaf("server", _SERVER_EXT, d)
    _leaf("client", _CLIENT_EXT, d)
    return d
