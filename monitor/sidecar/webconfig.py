"""`--web.config.file`: TLS and basic auth, in the format of Prometheus' exporter-toolkit.

The same file node_exporter takes works here, for the options implemented::

    tls_server_config:
      cert_file: server.crt            # relative paths are relative to this file's directory
      key_file: server.key             # unencrypted PEM
      client_auth_type: NoClientCert   # or RequestClientCert, VerifyClientCertIfGiven,
                                       #    RequireAndVerifyClientCert
      client_ca_file: ca.crt           # required by the two Verify* types, refused otherwise
      min_version: TLS12               # TLS10 .. TLS13; default TLS12
      max_version: TLS13               # default: the newest the ssl library has
      prefer_server_cipher_suites: true
    basic_auth_users:
      alice: $2y$10$...                # bcrypt hashes ($2a$, $2b$ or $2y$), e.g. htpasswd -nBC 10

An empty file, or an empty `tls_server_config`, means plain HTTP. The exporter-toolkit options
not implemented are refused with a message naming them rather than silently ignored, because
each one is a security setting an operator expects to hold: `RequireAnyClientCert` (Python's ssl
cannot require a client certificate without verifying it), `cipher_suites` and
`curve_preferences` (Go names, no faithful OpenSSL mapping), `client_allowed_sans`, the inline
`cert`/`key`/`client_ca`, `http_server_config` and `rate_limit`. Anything else unknown is a typo
and refused too. `RequestClientCert` is served as `NoClientCert`: nothing here reads a client
certificate that is not verified, so asking for one would change nothing.

Every problem is a `WebConfigError` with one line: the file, the key, what is wrong. The TLS
settings become an SSLContext (`ssl_context`) that the server (server.py) runs every handshake
with; the users' hashes are checked by basicauth.py.
"""

from __future__ import annotations

import os
import re
import ssl
from dataclasses import dataclass, field
from typing import Any

import yaml


class WebConfigError(Exception):
    """The web config file cannot be read, parsed, or used."""


TOP_KEYS = {"tls_server_config", "basic_auth_users"}
TLS_KEYS = {
    "cert_file",
    "key_file",
    "client_auth_type",
    "client_ca_file",
    "min_version",
    "max_version",
    "prefer_server_cipher_suites",
}
UNSUPPORTED = {
    "http_server_config",
    "rate_limit",
    "tls_server_config.cert",
    "tls_server_config.key",
    "tls_server_config.client_ca",
    "tls_server_config.cipher_suites",
    "tls_server_config.curve_preferences",
    "tls_server_config.client_allowed_sans",
}
CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "RequestClientCert": ssl.CERT_NONE,  # see the module docstring
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


@dataclass(frozen=True)
class TLS:
    cert_file: str
    key_file: str
    verify_mode: ssl.VerifyMode = ssl.CERT_NONE
    client_ca_file: str | None = None
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    max_version: ssl.TLSVersion | None = None
    prefer_server_ciphers: bool = True


@dataclass
class WebConfig:
    path: str
    tls: TLS | None = None
    users: dict[str, bytes] = field(default_factory=dict)  # name -> bcrypt hash

    def ssl_context(self) -> ssl.SSLContext | None:
        """A server-side context for the configured certificate and client auth, or None."""
        if self.tls is None:
            return None
        t = self.tls
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = t.min_version
        if t.max_version is not None:
            ctx.maximum_version = t.max_version
        if t.prefer_server_ciphers:
            ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
        for key in ("cert_file", "key_file", "client_ca_file"):
            name = getattr(t, key)
            if name is not None and not os.access(name, os.R_OK):
                why = "no such file" if not os.path.exists(name) else "not readable"
                raise self._error(f"tls_server_config.{key}", f"cannot read {name}: {why}")
        try:
            ctx.load_cert_chain(t.cert_file, t.key_file, password=_no_password)
        except _EncryptedKey:
            raise self._error(
                "tls_server_config.key_file", f"{t.key_file} is encrypted; use an unencrypted key"
            ) from None
        except (ssl.SSLError, OSError) as e:
            raise self._error(
                "tls_server_config.cert_file",
                f"cannot use {t.cert_file} with key {t.key_file}: {_reason(e)}",
            ) from None
        if t.client_ca_file is not None:
            try:
                ctx.load_verify_locations(cafile=t.client_ca_file)
            except (ssl.SSLError, OSError) as e:
                raise self._error(
                    "tls_server_config.client_ca_file",
                    f"cannot use {t.client_ca_file}: {_reason(e)}",
                ) from None
        ctx.verify_mode = t.verify_mode
        return ctx

    def _error(self, key: str, what: str) -> WebConfigError:
        return WebConfigError(f"{self.path}: {key}: {what}")


def load(path: str) -> WebConfig:
    """Read, parse and check a web config file, including that the TLS files load."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        why = e.strerror if isinstance(e, OSError) else "not UTF-8 text"
        raise WebConfigError(f"{path}: cannot read web config: {why}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise WebConfigError(f"{path}: invalid YAML: {_yaml_reason(e)}") from None
    config = WebConfig(path)
    if doc is None:
        return config
    base = os.path.dirname(os.path.abspath(path))
    _mapping(config, "top level", doc, TOP_KEYS, "")
    tls = doc.get("tls_server_config")
    if tls is not None:
        _mapping(config, "tls_server_config", tls, TLS_KEYS, "tls_server_config.")
        if tls:
            config.tls = _tls(config, tls, base)
    users = doc.get("basic_auth_users")
    if users is not None:
        config.users = _users(config, users)
    config.ssl_context()
    return config


def _mapping(config: WebConfig, where: str, value: Any, known: set, prefix: str) -> None:
    if not isinstance(value, dict):
        raise config._error(where, f"expected a mapping, got {_kind(value)}")
    for key in value:
        name = f"{prefix}{key}"
        if name in UNSUPPORTED:
            raise config._error(name, "exporter-toolkit option not supported by gunicorn-monitor")
        if key not in known:
            raise config._error(name, f"unknown key (expected one of {', '.join(sorted(known))})")


def _tls(config: WebConfig, tls: dict, base: str) -> TLS:
    def text(key: str, required: bool = False) -> str | None:
        value = tls.get(key)
        if value is None or value == "":
            if required:
                raise config._error(f"tls_server_config.{key}", "missing")
            return None
        if not isinstance(value, str):
            raise config._error(f"tls_server_config.{key}", f"expected text, got {_kind(value)}")
        return value

    def choice(key: str, table: dict, default: str) -> Any:
        value = text(key) or default
        if value == "RequireAnyClientCert":
            raise config._error(
                f"tls_server_config.{key}",
                "RequireAnyClientCert is not supported (Python's ssl cannot require a client "
                "certificate without verifying it): use RequireAndVerifyClientCert",
            )
        if value not in table:
            raise config._error(
                f"tls_server_config.{key}",
                f"{value!r} is not one of {', '.join(table)}",
            )
        return table[value]

    cert = text("cert_file", required=True)
    key = text("key_file", required=True)
    ca = text("client_ca_file")
    mode = choice("client_auth_type", CLIENT_AUTH, "NoClientCert")
    if text("client_auth_type") in (None, "NoClientCert") and ca is not None:
        raise config._error(
            "tls_server_config.client_ca_file",
            "set without a verifying client_auth_type "
            "(VerifyClientCertIfGiven or RequireAndVerifyClientCert)",
        )
    if mode != ssl.CERT_NONE and ca is None:
        raise config._error(
            "tls_server_config.client_ca_file", "missing (client_auth_type needs it)"
        )
    low = choice("min_version", VERSIONS, "TLS12")
    high = choice("max_version", VERSIONS, "TLS13") if tls.get("max_version") else None
    if high is not None and high < low:
        raise config._error("tls_server_config.max_version", "is lower than min_version")
    prefer = tls.get("prefer_server_cipher_suites", True)
    if not isinstance(prefer, bool):
        raise config._error(
            "tls_server_config.prefer_server_cipher_suites",
            f"expected true or false, got {prefer!r}",
        )
    return TLS(
        cert_file=os.path.join(base, cert),
        key_file=os.path.join(base, key),
        verify_mode=mode,
        client_ca_file=os.path.join(base, ca) if ca is not None else None,
        min_version=low,
        max_version=high,
        prefer_server_ciphers=prefer,
    )


def _users(config: WebConfig, users: Any) -> dict[str, bytes]:
    if not isinstance(users, dict):
        raise config._error("basic_auth_users", f"expected a mapping, got {_kind(users)}")
    found = {}
    for name, hashed in users.items():
        key = f"basic_auth_users.{name}"
        if not isinstance(name, str) or not name or ":" in name:
            raise config._error(key, "user names must be non-empty text without ':'")
        if not isinstance(hashed, str) or not BCRYPT.fullmatch(hashed):
            raise config._error(key, "not a bcrypt hash ($2a$, $2b$ or $2y$, cost 04-31)")
        # $2y$ (PHP/htpasswd) is the same algorithm as $2b$; not every bcrypt release takes it.
        found[name] = ("$2b$" + hashed[4:] if hashed.startswith("$2y$") else hashed).encode()
    return found


class _EncryptedKey(Exception):
    pass


def _no_password() -> bytes:
    raise _EncryptedKey  # never prompt on a terminal for a key passphrase


def _reason(e: Exception) -> str:
    if isinstance(e, ssl.SSLError):
        return e.reason or str(e)
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e)


def _yaml_reason(e: yaml.YAMLError) -> str:
    mark = getattr(e, "problem_mark", None)
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark else problem


def _kind(value: Any) -> str:
    return "nothing" if value is None else type(value).__name__
