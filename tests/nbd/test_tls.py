"""NBD over TCP with TLS, as qemu-nbd does it: the core's FORCEDTLS mode, QEMU's x509
credentials directory, real clients (qemu-io, qemu-img, nbdinfo) with and without
certificates, and the command lines that refuse plain TCP unless told it is wanted."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nbd.helpers import client_flags, go_data, option, parse_option_replies
from nbd.test_server_core import EXPORTS
from nbd.tlscerts import make_creds
from pvio.nbd import wire as w
from pvio.nbd.events import Disconnect, ExportChosen, StartTls
from pvio.nbd.server import NbdServerConnection, State
from pvio.nbd.tls import TlsCredsError, server_context

MiB = 1 << 20


# --- the core: FORCEDTLS --------------------------------------------------------------------


def tls_conn() -> NbdServerConnection:
    conn = NbdServerConnection(EXPORTS, default_export="disk", tls_required=True)
    conn.data_to_send()
    conn.receive_data(client_flags())
    return conn


@pytest.mark.parametrize("opt", [w.NBD_OPT_GO, w.NBD_OPT_INFO, w.NBD_OPT_LIST, w.NBD_OPT_STRUCTURED_REPLY])
def test_every_option_before_starttls_is_tls_reqd(opt: int) -> None:
    conn = tls_conn()
    data = go_data("disk") if opt in (w.NBD_OPT_GO, w.NBD_OPT_INFO) else b""
    assert conn.receive_data(option(opt, data))
    [reply] = parse_option_replies(conn.data_to_send())
    assert reply.reply == w.NBD_REP_ERR_TLS_REQD and b"NBD_OPT_STARTTLS" in reply.data
    assert conn.state is State.OPTIONS and conn.export is None


def test_export_name_before_starttls_ends_the_connection() -> None:
    conn = tls_conn()
    events = conn.receive_data(option(w.NBD_OPT_EXPORT_NAME, b"disk"))
    assert isinstance(events[-1], Disconnect) and conn.state is State.CLOSED
    assert conn.data_to_send() == b""  # no export size leaks out


def test_abort_is_allowed_before_starttls() -> None:
    conn = tls_conn()
    assert isinstance(conn.receive_data(option(w.NBD_OPT_ABORT))[-1], Disconnect)
    assert parse_option_replies(conn.data_to_send())[0].reply == w.NBD_REP_ACK


def test_starttls_acks_then_holds_until_tls_is_up() -> None:
    conn = tls_conn()
    assert conn.receive_data(option(w.NBD_OPT_STARTTLS)) == [StartTls()]
    assert parse_option_replies(conn.data_to_send())[0].reply == w.NBD_REP_ACK
    assert not conn.reading_wanted
    conn.tls_started()
    assert conn.tls_active and conn.reading_wanted
    events = conn.receive_data(option(w.NBD_OPT_STARTTLS) + option(w.NBD_OPT_GO, go_data("disk")))
    replies = parse_option_replies(conn.data_to_send())
    assert replies[0].reply == w.NBD_REP_ERR_INVALID  # TLS is already up
    assert replies[-1].reply == w.NBD_REP_ACK and isinstance(events[-1], ExportChosen)


def test_plain_bytes_after_starttls_are_a_violation() -> None:
    conn = tls_conn()
    events = conn.receive_data(option(w.NBD_OPT_STARTTLS) + option(w.NBD_OPT_GO, go_data("disk")))
    assert isinstance(events[-1], Disconnect) and events[-1].error is not None


def test_starttls_without_tls_is_unsupported() -> None:
    conn = NbdServerConnection(EXPORTS, default_export="disk")
    conn.data_to_send()
    conn.receive_data(client_flags() + option(w.NBD_OPT_STARTTLS))
    assert parse_option_replies(conn.data_to_send())[0].reply == w.NBD_REP_ERR_UNSUP


# --- credentials ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def creds(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_creds(tmp_path_factory.mktemp("tls") / "creds")


def test_credentials_missing_a_file_are_one_line(tmp_path: Path, creds: Path) -> None:
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(creds / "ca-cert.pem", partial)
    with pytest.raises(TlsCredsError, match=r"no server-cert\.pem, server-key\.pem"):
        server_context(partial)
    (partial / "server-cert.pem").write_text("not a certificate\n")
    shutil.copy(creds / "server-key.pem", partial)
    with pytest.raises(TlsCredsError, match="cannot load"):
        server_context(partial)
    assert server_context(creds).verify_mode.name == "CERT_REQUIRED"


# --- real clients against `pvio nbd serve --tcp --tls-creds` ----------------------------------


def need(*tools: str) -> None:
    for t in tools:
        if shutil.which(t) is None:
            pytest.skip(f"{t} is not installed")


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory, creds: Path) -> Iterator[tuple[int, Path]]:
    d = tmp_path_factory.mktemp("tls-serve")
    img = d / "disk.img"
    with open(img, "wb") as f:
        f.truncate(16 * MiB)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvio", "nbd", "serve", str(img), "--name", "disk", "--socket", str(d / "s.sock"),
         "--tcp", "0", "--tls-creds", str(creds)],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 20
        port = 0
        while not port:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "pvio nbd serve printed no nbds:// URI"
            if line.strip().startswith("nbds://127.0.0.1:"):
                port = int(line.strip().split(":")[2].split("/")[0])
        yield port, d / "s.sock"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def qemu_tls_args(creds: Path, port: int) -> list[str]:
    return [
        "--object", f"tls-creds-x509,id=tls0,endpoint=client,dir={creds}",
        "--image-opts", f"driver=nbd,host=127.0.0.1,port={port},export=disk,tls-creds=tls0",
    ]  # fmt: skip


def sh(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60)


def test_qemu_io_and_qemu_img_with_tls(tls_server: tuple[int, Path], creds: Path) -> None:
    need("qemu-io", "qemu-img")
    port, sock = tls_server
    out = sh("qemu-io", *qemu_tls_args(creds, port), "-c", "write -P 0x5a 1M 256k", "-c", "read -P 0x5a 1M 256k")
    assert out.returncode == 0 and "Pattern verification failed" not in out.stdout, out.stdout + out.stderr
    info = sh("qemu-img", "info", *qemu_tls_args(creds, port))
    assert info.returncode == 0 and "16 MiB" in info.stdout, info.stderr
    # the UNIX socket is unchanged: no TLS there, its file permissions guard it
    plain = sh("qemu-io", "-r", "-f", "raw", "-c", "read -P 0x5a 1M 256k", f"nbd+unix:///disk?socket={sock}")
    assert plain.returncode == 0 and "Pattern verification failed" not in plain.stdout


def test_nbdinfo_with_nbds_uri(tls_server: tuple[int, Path], creds: Path) -> None:
    need("nbdinfo")
    port, _ = tls_server
    out = sh("nbdinfo", "--size", f"nbds://localhost:{port}/disk?tls-certificates={creds}")
    assert out.returncode == 0 and out.stdout.strip() == str(16 * MiB), out.stderr


def test_a_client_without_tls_is_told_tls_is_required(tls_server: tuple[int, Path]) -> None:
    need("qemu-io")
    port, _ = tls_server
    out = sh("qemu-io", "-f", "raw", "-c", "read 0 4k", f"nbd://127.0.0.1:{port}/disk")
    assert out.returncode != 0 and "this server requires TLS" in out.stderr


def test_a_client_without_a_signed_certificate_is_refused(
    tls_server: tuple[int, Path], creds: Path, tmp_path: Path
) -> None:
    need("qemu-io", "nbdinfo")
    port, _ = tls_server
    ca_only = tmp_path / "ca-only"  # trusts the server, has no certificate of its own
    ca_only.mkdir()
    shutil.copy(creds / "ca-cert.pem", ca_only)
    out = sh("qemu-io", *qemu_tls_args(ca_only, port), "-c", "read 0 4k")
    assert out.returncode != 0 and "read 4096/4096" not in out.stdout
    other = make_creds(tmp_path / "other", cn="another CA")  # a certificate, wrong CA
    out = sh("nbdinfo", "--size", f"nbds://localhost:{port}/disk?tls-certificates={other}")
    assert out.returncode != 0 and str(16 * MiB) not in out.stdout


# --- command lines: TCP needs TLS or an explicit "insecure" ------------------------------------


def one_line_error(argv: list[str]) -> str:
    proc = subprocess.run([sys.executable, "-m", "pvio", *argv], capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


def test_nbd_serve_tcp_needs_tls_or_insecure(tmp_path: Path) -> None:
    img = tmp_path / "a.img"
    img.write_bytes(bytes(4096))
    base = ["nbd", "serve", str(img), "--socket", str(tmp_path / "s.sock")]
    line = one_line_error([*base, "--tcp", "0"])
    assert "--tls-creds" in line and "--tcp-insecure" in line and "every local user" in line
    assert "server-cert.pem" in one_line_error([*base, "--tcp", "0", "--tls-creds", str(tmp_path)])
    assert not (tmp_path / "s.sock").exists()


def test_pvio_up_nbd_tcp_needs_tls_or_insecure(tmp_path: Path) -> None:
    state = tmp_path / "state"
    line = one_line_error(["up", "--state-dir", str(state), "--nbd-tcp", "10809"])
    assert "--nbd-tls-creds" in line and "--nbd-tcp-insecure" in line
    line = one_line_error(["up", "--state-dir", str(state), "--nbd-tls-creds", str(tmp_path)])
    assert "--nbd-tcp" in line
    assert not state.exists()  # refused before anything started


def test_nbd_serve_tcp_insecure_serves_plain_tcp(tmp_path: Path) -> None:
    need("nbdinfo")
    img = tmp_path / "a.img"
    img.write_bytes(bytes(65536))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pvio", "nbd", "serve", str(img), "--socket", str(tmp_path / "s.sock"),
         "--tcp", "0", "--tcp-insecure"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        uri = ""
        while not uri:
            line = proc.stdout.readline()
            assert line, "pvio nbd serve printed no nbd:// URI"
            uri = line.strip() if line.strip().startswith("nbd://127.0.0.1:") else ""
        out = sh("nbdinfo", "--size", uri)
        assert out.returncode == 0 and out.stdout.strip() == "65536", out.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
