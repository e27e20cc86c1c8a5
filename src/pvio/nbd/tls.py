"""TLS credentials for NBD over TCP, laid out as QEMU's ``tls-creds-x509`` lays them out.

QEMU's ``--object tls-creds-x509,id=tls0,endpoint=server,dir=DIR`` (what ``qemu-nbd
--tls-creds=tls0`` uses) reads, from DIR:

    ca-cert.pem       the CA that signed the server's certificate and every client's
    server-cert.pem   this server's certificate
    server-key.pem    its private key
    ca-crl.pem        (optional) certificates the CA revoked

and, with its default ``verify-peer=on``, accepts only clients that present a certificate
the CA signed.  `server_context(DIR)` builds the same thing as an `ssl.SSLContext`: TLS 1.2
at least (the NBD protocol's "MUST support TLS version 1.2"), client certificates
required.  A client certificate is the access control here: TLS without it would only
encrypt what any local user could still read and write.  The clients use the same kind of
directory with ``client-cert.pem`` and ``client-key.pem`` (qemu-img/qemu-io:
``--object tls-creds-x509,id=tls0,endpoint=client,dir=DIR``; nbdinfo/libnbd:
``nbds://…?tls-certificates=DIR``).

Not supported: QEMU's PSK credentials (``tls-creds-psk``), ``tls-authz`` (checking the
client's distinguished name), and ``dh-params.pem`` (Python's ssl chooses the groups).
"""

from __future__ import annotations

import os
import ssl

CA_CERT = "ca-cert.pem"
SERVER_CERT = "server-cert.pem"
SERVER_KEY = "server-key.pem"
CA_CRL = "ca-crl.pem"


class TlsCredsError(ValueError):
    """The credentials directory is missing a file or holds one that does not load."""


def server_context(creds_dir: str | os.PathLike[str]) -> ssl.SSLContext:
    """The server side of QEMU's x509 layout in `creds_dir`, client certificates required."""
    d = os.fspath(creds_dir)
    if not os.path.isdir(d):
        raise TlsCredsError(f"{d}: not a directory (TLS credentials: {CA_CERT}, {SERVER_CERT}, {SERVER_KEY})")
    paths = {name: os.path.join(d, name) for name in (CA_CERT, SERVER_CERT, SERVER_KEY)}
    missing = [name for name, path in paths.items() if not os.path.isfile(path)]
    if missing:
        raise TlsCredsError(
            f"{d}: no {', '.join(missing)} (QEMU's x509 layout: {CA_CERT}, {SERVER_CERT}, {SERVER_KEY})"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.verify_mode = ssl.CERT_REQUIRED
    try:
        context.load_cert_chain(paths[SERVER_CERT], paths[SERVER_KEY])
        context.load_verify_locations(cafile=paths[CA_CERT])
        crl = os.path.join(d, CA_CRL)
        if os.path.isfile(crl):
            context.load_verify_locations(cafile=crl)
            context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    except (OSError, ssl.SSLError) as e:
        raise TlsCredsError(f"{d}: cannot load the TLS credentials: {e}") from None
    return context
