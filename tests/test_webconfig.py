"""`--web.config.file`: the exporter behind TLS, client certificates and basic auth.

An operator points the exporter at the same exporter-toolkit file node_exporter takes. Every
scenario runs the real `gunicorn-monitor serve` with certificates made by `openssl` for the test,
and scrapes it the way Prometheus would; a file the exporter cannot use stops it at start with
one line on stderr.
"""

from __future__ import annotations

import asyncio
import base64
import shutil
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from email.message import Message
from pathlib import Path

import bcrypt
import pytest

import tests.pki
from monitor.sidecar import basicauth, webconfig
from tests import hostile
from tests.harness import BIN, Exporter, free_port, http_get, wait_for

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")

METRIC = "gunicorn_worker_exits_total"
TLS, MTLS = tests.pki.TLS, tests.pki.MTLS


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return tests.pki.make(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def web_dir(pki, tmp_path) -> Path:
    """A directory holding the certificates, where each test writes its web.yml."""
    d = tmp_path / "web"
    shutil.copytree(pki, d)
    return d


def _config(web_dir: Path, text: str) -> str:
    path = web_dir / "web.yml"
    path.write_text(text)
    return str(path)


@pytest.fixture
def serve(shared_dir, web_dir):
    """Start the exporter with a web.yml of the given text; kill it after, and check its log."""
    started = []

    def start(text: str, **kwargs) -> Exporter:
        e = Exporter(shared_dir, args=("--web.config.file", _config(web_dir, text)), **kwargs)
        started.append(e)
        return e.start()

    yield start
    for e in started:
        e.kill()
        log = e.proc.stdout.read().decode(errors="replace")
        e.proc.stdout.close()
        assert "Traceback" not in log, log


_client = tests.pki.client
_openssl = tests.pki.openssl


def _hash(password: str, prefix: str = "$2b$") -> str:
    return prefix + bcrypt.hashpw(password.encode(), bcrypt.gensalt(4)).decode()[4:]


def _basic(user: str, password: str) -> dict:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {token}"}


def _get(url: str, headers: dict | None = None, context=None) -> tuple[int, Message, bytes]:
    """Status, headers (case-insensitive, as HTTP's names are) and body of a GET."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10, context=context) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


# TLS


def test_https_scrape_verifies_against_the_ca(serve, pki):
    e = serve(TLS, scheme="https", ssl_context=_client(pki))
    assert any(name == METRIC for name, _ in e.scrape())
    status, _ = http_get(e.url + "/metrics", 10, context=_client(pki, ca="other-ca.crt"))
    assert status == 0, "a client that does not trust the CA must not get through"


def test_plain_http_to_the_tls_port_gets_no_metrics(serve, pki):
    e = serve(TLS, scheme="https", ssl_context=_client(pki))
    status, body = http_get(f"http://127.0.0.1:{e.port}/metrics", 10)
    assert status != 200 and METRIC.encode() not in body
    assert e.scrape(), "the exporter keeps serving after a plain-HTTP client"


def test_mtls_rejects_a_client_without_a_certificate(serve, pki):
    e = serve(MTLS, scheme="https", ssl_context=_client(pki, cert=True))
    assert any(name == METRIC for name, _ in e.scrape())
    status, body = http_get(e.url + "/metrics", 10, context=_client(pki))
    assert status == 0 and body == b""


def test_mtls_rejects_a_certificate_from_another_ca(serve, pki, web_dir):
    _openssl(web_dir, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", "o.key")
    _openssl(
        web_dir, "req", "-x509", "-new", "-key", "o.key", "-subj", "/CN=intruder",
        "-days", "2", "-out", "o.crt",
    )  # fmt: skip
    e = serve(MTLS, scheme="https", ssl_context=_client(pki, cert=True))
    ctx = _client(pki)
    ctx.load_cert_chain(str(web_dir / "o.crt"), str(web_dir / "o.key"))
    assert http_get(e.url + "/metrics", 10, context=ctx)[0] == 0


def test_16_stalled_tls_handshakes_do_not_block_scrapes(serve, pki):
    e = serve(TLS, scheme="https", ssl_context=_client(pki))
    stalled = hostile.silent(e.port, 16)
    half = socket.create_connection(("127.0.0.1", e.port))
    half.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
    try:
        for _ in range(10):
            assert any(name == METRIC for name, _ in e.scrape())
    finally:
        for s in [*stalled, half]:
            s.close()


def _version(e: Exporter, ctx: ssl.SSLContext) -> str | None:
    """The TLS version a handshake with `ctx` settles on, None if it fails."""
    try:
        with socket.create_connection(("127.0.0.1", e.port), timeout=10) as raw:
            with ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
                return tls.version()
    except (ssl.SSLError, OSError):
        return None


def _capped(pki: Path, low=None, high=None) -> ssl.SSLContext:
    ctx = _client(pki)
    if low is not None:
        ctx.minimum_version = low
    if high is not None:
        ctx.maximum_version = high
    return ctx


def test_min_and_max_tls_versions_hold(serve, pki):
    e = serve(TLS + "  min_version: TLS13\n", scheme="https", ssl_context=_client(pki))
    assert _version(e, _client(pki)) == "TLSv1.3"
    assert _version(e, _capped(pki, high=ssl.TLSVersion.TLSv1_2)) is None
    e = serve(TLS + "  max_version: TLS12\n", scheme="https", ssl_context=_client(pki))
    assert _version(e, _client(pki)) == "TLSv1.2"
    assert _version(e, _capped(pki, low=ssl.TLSVersion.TLSv1_3)) is None
    assert any(name == METRIC for name, _ in e.scrape())


def test_verify_client_cert_if_given(serve, pki, web_dir):
    text = TLS + "  client_auth_type: VerifyClientCertIfGiven\n  client_ca_file: ca.crt\n"
    e = serve(text, scheme="https", ssl_context=_client(pki))
    assert any(name == METRIC for name, _ in e.scrape()), "no certificate: let through"
    assert http_get(e.url + "/metrics", 10, context=_client(pki, cert=True))[0] == 200
    untrusted = _client(pki)
    untrusted.load_cert_chain(str(web_dir / "other-ca.crt"), str(web_dir / "other-ca.key"))
    assert http_get(e.url + "/metrics", 10, context=untrusted)[0] == 0


# basic auth


def test_basic_auth_lets_only_the_right_password_through(serve):
    users = f"basic_auth_users:\n  alice: {_hash('s3cret')}\n"
    e = serve(users, headers=_basic("alice", "s3cret"))
    assert any(name == METRIC for name, _ in e.scrape())
    assert e.scrape(), "a second scrape with the same credentials (cached) passes too"
    for headers in (
        _basic("alice", "wrong"),
        None,
        _basic("mallory", "s3cret"),
        {"Authorization": "Bearer s3cret"},
        {"Authorization": "Basic !!!notbase64"},
    ):
        for path in ("/metrics", "/-/healthy", "/"):
            status, got, body = _get(e.url + path, headers)
            assert status == 401, (headers, path)
            assert got["WWW-Authenticate"] == 'Basic realm="gunicorn-monitor"'
            assert b"gunicorn_" not in body


def test_an_htpasswd_2y_hash_works(serve):
    users = f"basic_auth_users:\n  prometheus: '{_hash('pw', '$2y$')}'\n"
    e = serve(users, headers=_basic("prometheus", "pw"))
    assert any(name == METRIC for name, _ in e.scrape())
    assert _get(e.url + "/metrics", _basic("prometheus", "nope"))[0] == 401


def test_tls_and_basic_auth_together(serve, pki):
    text = MTLS + f"basic_auth_users:\n  alice: {_hash('pw')}\n"
    e = serve(
        text, scheme="https", ssl_context=_client(pki, cert=True), headers=_basic("alice", "pw")
    )
    assert any(name == METRIC for name, _ in e.scrape())
    assert _get(e.url + "/metrics", _basic("alice", "x"), _client(pki, cert=True))[0] == 401


def test_a_password_storm_is_throttled_and_a_verified_scraper_keeps_scraping(serve, pki):
    """1,000 wrong passwords from 8 clients against a real sidecar with a cost-10 hash (as
    `htpasswd -nBC 10` makes): past a few bcrypt checks the guesses get a 429 without one,
    none gets through, and the scraper whose credentials were verified before the storm keeps
    getting its scrapes all along. When the storm is over, new credentials are checked again."""
    hashed = bcrypt.hashpw(b"s3cret", bcrypt.gensalt(10)).decode()
    other = bcrypt.hashpw(b"other", bcrypt.gensalt(10)).decode()
    text = TLS + f"basic_auth_users:\n  prometheus: {hashed}\n  replica: {other}\n"
    e = serve(
        text, scheme="https", ssl_context=_client(pki), headers=_basic("prometheus", "s3cret")
    )
    assert e.scrape()  # verified (and remembered) before the storm
    scrapes: list[int] = []
    storming = threading.Event()

    def scraper() -> None:
        while storming.is_set():
            scrapes.append(e.get("/metrics", 30)[0])

    storming.set()
    t = threading.Thread(target=scraper)
    t.start()
    try:
        answers = hostile.password_storm(e.port, "prometheus", 1000, 8, _client(pki))
    finally:
        storming.clear()
        t.join(60)
    assert set(answers) <= {401, 429}, answers
    assert answers[429] > answers[401] > 0, answers
    assert scrapes and set(scrapes) == {200}, scrapes
    replica = _basic("replica", "other")
    wait_for(lambda: _get(e.url + "/metrics", replica, _client(pki))[0] == 200, 30, "storm over")
    e.kill()
    log = e.proc.stdout.read().decode(errors="replace")
    assert "event=auth_throttled" in log and "Traceback" not in log, log


# files the exporter refuses

BAD = {
    "yaml syntax error": ("tls_server_config:\n  cert_file: [unclosed\n", "invalid YAML: line"),
    "unknown top-level key": ("basic_auth_user:\n  alice: x\n", "basic_auth_user: unknown key"),
    "unknown tls key": (TLS + "  certfile: x\n", "tls_server_config.certfile: unknown key"),
    "missing key_file": (
        "tls_server_config:\n  cert_file: server.crt\n",
        "tls_server_config.key_file: missing",
    ),
    "bad bcrypt hash": ("basic_auth_users:\n  alice: plaintext\n", "not a bcrypt hash"),
    "wrong cert path": (
        "tls_server_config:\n  cert_file: nope.crt\n  key_file: server.key\n",
        "tls_server_config.cert_file: cannot read",
    ),
    "key of another certificate": (
        "tls_server_config:\n  cert_file: server.crt\n  key_file: client.key\n",
        "tls_server_config.cert_file: cannot use",
    ),
    "unsupported option": (
        TLS + "  cipher_suites: [TLS_AES_128_GCM_SHA256]\n",
        "cipher_suites: exporter-toolkit option not supported",
    ),
    "RequireAnyClientCert": (
        TLS + "  client_auth_type: RequireAnyClientCert\n",
        "RequireAnyClientCert is not supported",
    ),
    "client auth without a CA": (
        TLS + "  client_auth_type: RequireAndVerifyClientCert\n",
        "client_ca_file: missing",
    ),
    "unknown TLS version": (TLS + "  min_version: TLS14\n", "min_version: 'TLS14' is not one"),
    "not a mapping": ("- just\n- a list\n", "top level: expected a mapping"),
}


def _run(shared_dir: Path, config: str) -> tuple[int, str]:
    cmd = [str(BIN / "gunicorn-monitor"), "serve", "--dir", str(shared_dir)]
    cmd += ["--listen", f"127.0.0.1:{free_port()}", "--web.config.file", config]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert out == b""
    return proc.returncode, err.decode()


@pytest.mark.parametrize("case", BAD)
def test_a_bad_web_config_stops_the_exporter_with_one_line(case, shared_dir, web_dir):
    text, expected = BAD[case]
    path = _config(web_dir, text)
    status, err = _run(shared_dir, path)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith(f"gunicorn-monitor: {path}: "), err
    assert expected in err and "Traceback" not in err


def test_a_missing_web_config_file_stops_the_exporter(shared_dir, tmp_path):
    status, err = _run(shared_dir, str(tmp_path / "absent.yml"))
    assert status == 2
    assert err == f"gunicorn-monitor: {tmp_path / 'absent.yml'}: cannot read web config: " + (
        "No such file or directory\n"
    )


def test_the_environment_twin_is_read(shared_dir, web_dir):
    cmd = [
        str(BIN / "gunicorn-monitor"),
        "serve",
        "--dir",
        str(shared_dir),
        "--listen",
        f"127.0.0.1:{free_port()}",
    ]
    env = {"GUNICORN_MONITOR_WEB_CONFIG": _config(web_dir, "nonsense: 1\n"), "PATH": ""}
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=20)
    assert proc.returncode == 2 and b"nonsense: unknown key" in proc.stderr


# the check itself, in process: what a scrape and a guess cost


def _auth(tmp_path, **limits) -> basicauth.BasicAuth:
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  alice: {_hash('pw')}\n")
    return basicauth.BasicAuth(webconfig.load(str(path)).users, **limits)


def _counting(monkeypatch) -> list:
    calls = []
    real = basicauth.bcrypt.checkpw
    monkeypatch.setattr(basicauth.bcrypt, "checkpw", lambda p, h: calls.append(h) or real(p, h))
    return calls


def test_repeated_scrapes_pay_bcrypt_once(tmp_path, monkeypatch):
    auth = _auth(tmp_path)
    calls = _counting(monkeypatch)
    good = _basic("alice", "pw")["Authorization"]
    assert all(auth.verify(good) for _ in range(10))
    assert len(calls) == 1
    assert not auth.verify(_basic("alice", "bad")["Authorization"])
    assert not auth.verify(_basic("bob", "pw")["Authorization"])
    assert len(calls) == 3, "a failure is never cached; an unknown user costs a real check"
    assert calls[2] == auth._dummy
    for header in (None, "", "Bearer x", "Basic !!!", "Basic " + base64.b64encode(b"no").decode()):
        assert not auth.verify(header)
    assert len(calls) == 3, "what is not Basic user:password costs no bcrypt"
    token = good.split()[1]
    spellings = [f"Basic{' ' * n}{token}" for n in range(1, basicauth.CACHE_SIZE + 20)]
    assert all(auth.verify(h) for h in spellings)
    assert len(auth._ok) == basicauth.CACHE_SIZE, "the cache stays bounded"


def test_guesses_past_the_bucket_are_refused_without_bcrypt(tmp_path, monkeypatch):
    auth = _auth(tmp_path, rate=0.001, burst=3)
    good = _basic("alice", "pw")["Authorization"]
    assert auth.verify(good)  # verified before the storm
    calls = _counting(monkeypatch)
    on_loop: list[bool] = []
    real = basicauth.BasicAuth._verify

    def verify(self, *args):
        on_loop.append(threading.current_thread() is threading.main_thread())
        return real(self, *args)

    monkeypatch.setattr(basicauth.BasicAuth, "_verify", verify)

    async def storm() -> list:
        guesses = [auth.check(_basic("alice", f"guess{i}")["Authorization"]) for i in range(50)]
        return [await g for g in guesses] + [await auth.check(good)]

    verdicts = asyncio.run(storm())
    V = basicauth.Verdict
    assert verdicts[:3] == [V.DENIED] * 3 and set(verdicts[3:50]) == {V.THROTTLED}
    assert verdicts[50] is V.OK, "credentials verified before pass during the storm"
    assert len(calls) == 3 and auth.checks == 1 + 3 and auth.throttled == 47
    assert on_loop == [False] * 3, "bcrypt never runs on the event loop's thread"
    auth.close()


def test_the_bucket_refills_at_its_rate():
    bucket = basicauth.TokenBucket(rate=50.0, burst=2)
    assert bucket.take() and bucket.take() and not bucket.take()
    deadline = time.monotonic() + 5
    while not bucket.take():
        assert time.monotonic() < deadline, "one token back within 1/50 s, or about"
        time.sleep(0.005)


def test_an_empty_file_means_plain_http_without_auth(tmp_path):
    path = tmp_path / "web.yml"
    path.write_text("")
    config = webconfig.load(str(path))
    assert config.ssl_context() is None and config.users == {}
