"""Certificates for the TLS tests and benchmarks, made by `openssl` (the Debian CLI).

`make(d)` writes into `d`: ca.crt/ca.key (the CA the exporter trusts for client certificates
and clients trust for the server), server.crt/.key (for 127.0.0.1 and localhost), client.crt/.key
(signed by ca), and other-ca.crt/.key (a CA nobody trusts).
"""

from __future__ import annotations

import ssl
import subprocess
from pathlib import Path

TLS = "tls_server_config:\n  cert_file: server.crt\n  key_file: server.key\n"
MTLS = TLS + "  client_auth_type: RequireAndVerifyClientCert\n  client_ca_file: ca.crt\n"


def openssl(cwd: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def issue(cwd: Path, name: str, subject: str, extensions: str) -> None:
    """An EC key and a certificate for it, signed by ca.key."""
    (cwd / f"{name}.ext").write_text(extensions)
    openssl(cwd, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{name}.key")
    openssl(cwd, "req", "-new", "-key", f"{name}.key", "-subj", subject, "-out", f"{name}.csr")
    openssl(
        cwd, "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", f"{name}.ext", "-out", f"{name}.crt",
    )  # fmt: skip


def make(d: Path) -> Path:
    for ca in ("other-ca", "ca"):
        openssl(d, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", f"{ca}.key")
        openssl(
            d, "req", "-x509", "-new", "-key", f"{ca}.key", "-subj", f"/CN=test {ca}",
            "-days", "2", "-out", f"{ca}.crt",
            "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
    leaf = "basicConstraints=CA:FALSE\nsubjectKeyIdentifier=hash\nauthorityKeyIdentifier=keyid\n"
    issue(
        d,
        "server",
        "/CN=localhost",
        leaf + "keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n"
        "subjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    issue(d, "client", "/CN=prometheus", leaf + "extendedKeyUsage=clientAuth\n")
    return d


def client(d: Path, cert: bool = False, ca: str = "ca.crt") -> ssl.SSLContext:
    """A client's context trusting `ca`, presenting client.crt if `cert`."""
    ctx = ssl.create_default_context(cafile=str(d / ca))
    if cert:
        ctx.load_cert_chain(str(d / "client.crt"), str(d / "client.key"))
    return ctx
