"""The exporter's HTTP server under what a network does to it: idle, slow and silent
connections, a flood of them, stalled TLS handshakes, malformed and hostile requests, HEAD, and
the exact exposition formats from a body kept between scrapes.

Server-level scenarios run the real server (uvicorn with our protocol, server.py) on loopback in
this process, with its deadline turned down to a second and its connection limit to ten; the
rest scrape the real `gunicorn-monitor serve` process.
"""

from __future__ import annotations

import asyncio
import email.utils
import gzip
import os
import re
import signal
import socket
import ssl
import subprocess
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from pathlib import Path

import psutil
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import _bake_output
from prometheus_client.multiprocess import MultiProcessCollector

import tests.pki
from monitor.contract.directory import Layout
from monitor.sidecar import exporter, server
from monitor.sidecar.cache import DirectoryInputs, RenderedMetrics
from monitor.sidecar.collectors.appmetrics import AppMetricsCollector
from tests import hostile
from tests.harness import BIN, app_process, free_port, http_get, parse, value, wait_for

DEADLINE = 1.0  # the in-process server's request deadline
# The sidecar's threads: main (the event loop), the sampler, the app files' reader and audit
# (collectors/appmetrics.py), the retirement of dead masters' files, and the pool.
THREADS = 4 + exporter.WORKERS


async def _hello(scope, receive, send):
    if scope["type"] != "http":
        return
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"6")]}
    )
    await send({"type": "http.response.body", "body": b"hello\n"})


class _Running:
    def __init__(self, port: int, uv: server.Server) -> None:
        self.port, self.uv = port, uv
        self.table: server.Connections = uv.config.http.table

    def get(self, path: str = "/", timeout: float = 5, context=None) -> int:
        scheme = "https" if context is not None else "http"
        return http_get(f"{scheme}://127.0.0.1:{self.port}{path}", timeout, context=context)[0]

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port))


@contextmanager
def _server(
    app=_hello,
    context=None,
    limit: int = 10,
    timeout: float = DEADLINE,
    cls: type[server.Server] = server.Server,
    keep_alive: int = server.KEEP_ALIVE,
) -> Iterator[_Running]:
    sock = server.bind(f"127.0.0.1:{free_port()}")
    uv = cls(server.config(app, context, timeout=timeout, limit=limit, keep_alive=keep_alive))
    loop = threading.Thread(target=lambda: asyncio.run(uv.serve(sockets=[sock])))
    loop.start()
    try:
        wait_for(lambda: uv.started, 10, "server started")
        yield _Running(sock.getsockname()[1], uv)
    finally:
        uv.stop()
        loop.join(15)
        sock.close()


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """True if the server closes `sock` within `within` seconds (EOF or a reset); what it
    sends before closing is read and dropped."""
    sock.settimeout(within)
    try:
        while sock.recv(65536):
            pass
        return True
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> Path:
    return tests.pki.make(tmp_path_factory.mktemp("pki"))


def _server_context(pki: Path) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(str(pki / "server.crt"), str(pki / "server.key"))
    return ctx


def test_the_server_loop_sleeps_till_stopped_and_keeps_the_date(monkeypatch):
    """uvicorn's own loop wakes ten times a second to look for a stop; ours sleeps till a stop
    wakes it (an idle sidecar's largest cost), and its Date header is renewed as requests come."""
    turns: list[int] = []

    class Counting(server.Server):
        async def on_tick(self, counter: int) -> bool:  # what uvicorn's loop calls every turn
            turns.append(counter)
            return await super().on_tick(counter)

    dates: list[float] = []
    with _server(cls=Counting) as s:
        for _ in range(2):
            with urllib.request.urlopen(f"http://127.0.0.1:{s.port}/", timeout=10) as resp:
                dates.append(email.utils.parsedate_to_datetime(resp.headers["Date"]).timestamp())
            assert abs(dates[-1] - time.time()) < 5
            wait_for(lambda: time.time() >= dates[-1] + 1, 5, "the next second")
        assert turns == []  # uvicorn's: some twenty by now
    assert dates[1] > dates[0]
    monkeypatch.setattr(server, "TURN", 600.0)  # a stop that waited for the turn would show
    for how in ("stop", "signal"):
        sock = server.bind(f"127.0.0.1:{free_port()}")
        uv = server.Server(server.config(_hello))
        loop = threading.Thread(target=lambda uv=uv, sock=sock: asyncio.run(uv.serve([sock])))
        loop.start()
        try:
            wait_for(lambda uv=uv: uv._turn is not None, 30, "the loop waiting for its turn")
            uv.stop() if how == "stop" else uv.handle_exit(signal.SIGTERM, None)
            loop.join(30)
            assert not loop.is_alive(), f"{how}: the loop waited for its turn"
        finally:
            uv.should_exit = True
            loop.join(90)
            sock.close()


def test_idle_connections_hold_nothing_and_are_closed_at_the_deadline():
    with _server(limit=100) as s:
        idle = [s.connect() for _ in range(50)]
        try:
            assert all(s.get() == 200 for _ in range(20))
            assert all(_closed_by_server(c, 10) for c in idle)
            wait_for(lambda: len(s.table) == 0, 10, "every connection closed and counted out")
        finally:
            for c in idle:
                c.close()


@pytest.mark.parametrize("after_a_response", [False, True])
def test_a_request_trickling_in_is_dropped_at_the_deadline(after_a_response):
    """A slowloris client: its request comes a byte at a time and would never be complete in
    time. Scrapes go on meanwhile; the slow connection is closed at the deadline, on a fresh
    connection and on a kept-alive one after its first response alike."""
    with _server() as s:
        slow = s.connect()
        try:
            if after_a_response:
                slow.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
                assert slow.recv(4096).startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            closed = False
            for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"y" * 200:
                try:
                    slow.send(bytes([byte]))
                except OSError:
                    closed = True
                    break
                assert s.get() == 200
                if _closed_by_server(slow, 0.1):
                    closed = True
                    break
                assert time.monotonic() - started < 30, "never dropped"
            assert closed
        finally:
            slow.close()


def test_past_the_connection_limit_the_longest_idle_is_dropped():
    with _server(limit=10, timeout=60) as s:  # no deadline in the way
        idle = [s.connect() for _ in range(10)]
        try:
            wait_for(lambda: len(s.table) == 10, 5, "10 idle connections accepted")
            assert s.get() == 200  # the eleventh: the first idle one made room
            assert _closed_by_server(idle[0], 5)
            assert not _closed_by_server(idle[-1], 0.2)
        finally:
            for c in idle:
                c.close()


def _answered(c: socket.socket) -> bool:
    """One request on `c`, kept alive: True if its whole answer came."""
    c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    c.settimeout(10)
    got = b""
    with suppress(OSError):
        while not got.endswith(b"hello\n"):
            chunk = c.recv(65536)
            if not chunk:
                break
            got += chunk
    return got.startswith(b"HTTP/1.1 200") and got.endswith(b"hello\n")


def test_a_kept_connection_idle_between_scrapes_is_served_again():
    """Prometheus reuses its connection at the next scrape: one idle past the request deadline
    and past uvicorn's default keep-alive (5 s) is still open and answered, and a request begun
    on it still has the deadline."""
    with _server() as s:  # a deadline of DEADLINE s, the shipped keep-alive
        c = s.connect()
        try:
            assert _answered(c)
            assert not _closed_by_server(c, 8), "closed while kept between scrapes"
            assert _answered(c)
            assert s.table.dropped == 0
            c.sendall(b"GET / HTTP/1.1\r\n")  # a request begun, never finished
            assert _closed_by_server(c, 10 * DEADLINE), "a begun request kept past its deadline"
        finally:
            c.close()


def test_past_the_connection_limit_the_longest_idle_kept_connection_is_dropped():
    """Kept connections are idle from their last answer: when the limit is reached, the one
    whose last answer is oldest makes room, not the one opened first."""
    with _server(limit=3) as s:
        kept = [s.connect() for _ in range(3)]
        try:
            assert all(_answered(c) for c in kept)
            assert _answered(kept[0])  # now the most recently answered: kept[1] is the oldest
            assert s.get() == 200  # the fourth connection
            assert _closed_by_server(kept[1], 5)
            assert s.table.dropped == 1
            assert _answered(kept[0]) and _answered(kept[2])
        finally:
            for c in kept:
                c.close()


def test_stalled_tls_handshakes_are_counted_dropped_and_block_nothing(pki):
    """TCP connections that never start their handshake, and one that stops inside it: each
    counts against the limit (so a flood of them is dropped oldest first) and is dropped at
    the deadline; a TLS scrape meanwhile is answered."""
    client = tests.pki.client(pki)
    with _server(context=_server_context(pki), limit=10, timeout=3) as s:
        stalled = [s.connect() for _ in range(9)]
        half = s.connect()
        half.sendall(b"\x16\x03\x01\x02\x00\x01")  # the start of a ClientHello, then nothing
        try:
            wait_for(lambda: len(s.table) == 10, 5, "10 handshakes pending")
            assert s.get(context=client) == 200  # the eleventh: the oldest stalled one went
            assert _closed_by_server(stalled[0], 5)
            assert all(_closed_by_server(c, 10) for c in [*stalled, half])
            assert s.get(context=client) == 200
            wait_for(lambda: len(s.table) == 0, 10, "every connection counted out")
        finally:
            for c in [*stalled, half]:
                c.close()


def test_every_connection_sends_without_waiting_for_an_ack(pki):
    """TCP_NODELAY on each accepted connection, TLS or not: a response leaves in several
    writes (head, body), and without it the second waits for the client's delayed ACK."""
    for context in (None, _server_context(pki)):
        with _server(context=context) as s:
            c = s.connect()
            try:
                wait_for(lambda: len(s.table) == 1, 5, "the connection accepted")
                (conn,) = list(s.table._idle)
                raw = conn._raw.get_extra_info("socket")
                assert raw.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            finally:
                c.close()


def test_pipelined_requests_are_each_answered_then_the_deadline_runs_again():
    with _server(keep_alive=1) as s:
        c = s.connect()
        try:
            c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 3)
            got = b""
            deadline = time.monotonic() + 10
            while got.count(b"hello\n") < 3 and time.monotonic() < deadline:
                got += c.recv(65536)
            assert got.count(b"HTTP/1.1 200") == 3
            assert _closed_by_server(c, 10), "idle after its answers: closed in time"
        finally:
            c.close()


def test_blocking_work_never_holds_the_event_loop():
    """A scrape whose collection blocks (a slow directory) takes a pool thread, not the loop:
    health checks and other scrapes' requests are still read and answered meanwhile."""
    entered, release = threading.Event(), threading.Event()

    def metrics(accept, gz):
        entered.set()
        release.wait(20)
        return "text/plain", b"up 1\n"

    app = exporter.Exporter(metrics, lambda: (True, "Ready."))
    with _server(app) as s, ThreadPoolExecutor(1) as pool:
        scrape = pool.submit(s.get, "/metrics", 30)
        assert entered.wait(10), "the scrape reached its collection"
        assert s.get("/-/healthy") == 200
        assert s.get("/-/ready") == 200
        assert not scrape.done()
        release.set()
        assert scrape.result(30) == 200
    app.close()


# The exposition, kept between scrapes


def _write_counter(directory: str, pid: int, amount: float, name: str = "app_jobs") -> None:
    """One app process's counter file, written by prometheus_client's own mmap path."""
    with app_process(directory, lambda: pid):
        Counter(name, "Jobs.", ["kind"], registry=None).labels("a").inc(amount)


ACCEPTS = [
    None,
    "text/plain; version=1.0.0",
    "application/openmetrics-text; version=1.0.0",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.6,"
    "application/openmetrics-text;version=0.0.1;q=0.5,text/plain;version=1.0.0;q=0.4,*/*;q=0.1",
]


def _inputs(directory) -> DirectoryInputs:
    """The sidecar's inputs of a collection over `directory`: the app's files as its app
    collector keeps them (a stock collector renders the bodies here)."""
    app = AppMetricsCollector(str(directory), compact=False)
    return DirectoryInputs(Layout(str(directory)), app=app)


@pytest.mark.parametrize("accept", ACCEPTS)
@pytest.mark.parametrize("gz", [False, True])
def test_kept_bodies_are_prometheus_clients_own_bytes(tmp_path, accept, gz):
    _write_counter(str(tmp_path), os.getpid(), 3)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    rendered = RenderedMetrics(registry, _inputs(tmp_path))
    for _ in range(2):  # rendered, then kept
        ctype, body = rendered(accept, gz)
        _, headers, want = _bake_output(registry, accept, "gzip" if gz else None, {}, False)
        assert ctype == dict(headers)["Content-Type"]
        if gz:
            body, want = gzip.decompress(body), gzip.decompress(want)
        assert body == want
    assert rendered.hits == 1 and rendered.misses == 1


@pytest.mark.parametrize("accept", ACCEPTS)
def test_a_changed_family_alone_is_rendered_anew(tmp_path, accept):
    """The families that did not change reuse their text; the body is still the library's."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    rendered = RenderedMetrics(registry, _inputs(tmp_path))
    _write_counter(str(tmp_path), os.getppid(), 7, name="app_still")
    for _ in range(3):
        _write_counter(str(tmp_path), os.getpid(), 1)
        _, body = rendered(accept, False)
        assert body == _bake_output(registry, accept, None, {}, False)[2]
    assert rendered.misses == 3


def test_an_mmap_write_shows_at_the_very_next_scrape(tmp_path):
    """prometheus_client writes through mmap, which leaves mtime alone: the kept body must
    still go when a value changes in place."""
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    rendered = RenderedMetrics(registry, _inputs(tmp_path))
    pid = os.getpid()
    for n in range(1, 6):
        _write_counter(str(tmp_path), pid, 1)  # same file, same size, a new value in place
        assert value(parse(rendered(None, False)[1].decode()), "app_jobs_total", kind="a") == n
        assert value(parse(rendered(None, False)[1].decode()), "app_jobs_total", kind="a") == n
    assert rendered.misses == 5 and rendered.hits == 5


def test_the_served_body_follows_gunicorn_at_the_very_next_scrape(make_master, make_exporter):
    """Each change, as soon as it is on disk, is in the next scrape: an app counter (mmap), an
    exit (the master's counter file and state), a deploy mark."""
    m = make_master(workers=2).start()
    e = make_exporter()
    for n in range(2, 7):  # start() made one request
        assert http_get(m.url + "/")[0] == 200
        assert value(e.scrape(), "demo_requests_total", endpoint="/") == n
    state = m.dir / "gunicorn-monitor" / f"master-{m.pid}.json"
    victim = m.worker_pids()[0]
    os.kill(victim, 9)
    wait_for(lambda: str(victim) not in state.read_text(), 10, "the master recorded the exit")
    assert value(e.scrape(), "gunicorn_worker_exits_total", cause="killed", signal="SIGKILL") == 1
    # Only the app's files move now: the lifecycle families are reused, and still right.
    for n in range(7, 10):
        assert http_get(m.url + "/")[0] == 200
        samples = e.scrape()
        assert value(samples, "demo_requests_total", endpoint="/") == n
        assert value(samples, "gunicorn_worker_exits_total", cause="killed", signal="SIGKILL") == 1
    # And only our own files move: the app's families are reused, and still right.
    before = time.time()
    subprocess.run(
        [str(BIN / "gunicorn-monitor"), "mark-deploy", "--dir", str(m.dir)], check=True, timeout=30
    )
    samples = e.scrape()
    assert value(samples, "gunicorn_last_deploy_timestamp_seconds") >= before
    assert value(samples, "demo_requests_total", endpoint="/") == 9


def test_a_flood_of_idle_connections_leaves_scrapes_fast_and_threads_bounded(make_exporter):
    e = make_exporter()
    proc = psutil.Process(e.proc.pid)
    idle = [socket.create_connection(("127.0.0.1", e.port)) for _ in range(300)]
    try:

        def scrape(_: int) -> float:
            started = time.monotonic()
            assert e.get("/metrics", 10)[0] == 200
            return time.monotonic() - started

        with ThreadPoolExecutor(20) as pool:
            took = sorted(pool.map(scrape, range(200)))
        assert took[-1] < 5, took[-5:]  # not a timing target: nothing waited on a deadline
        assert proc.num_threads() <= THREADS
        assert e.get("/metrics")[0] == 200
    finally:
        for s in idle:
            s.close()
    status, body = http_get(f"http://127.0.0.1:{e.port}/metrics")
    assert status == 200 and body


def test_head_metrics_answers_like_get(make_exporter):
    e = make_exporter()
    status, body = e.get("/metrics")
    req = urllib.request.Request(e.url + "/metrics", method="HEAD")
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        assert resp.headers["Content-Length"] == str(len(body))  # nothing changed in between
        assert resp.read() == b""


def test_200_slow_clients_leave_scrapes_answered_and_cost_no_thread(make_exporter):
    e = make_exporter()
    proc = psutil.Process(e.proc.pid)
    with hostile.Slowloris(e.port, 200, interval=0.5):
        statuses = [e.get("/metrics", 30)[0] for _ in range(20)]
        statuses += [e.get("/-/healthy", 30)[0] for _ in range(5)]
        assert proc.num_threads() <= THREADS
    assert statuses == [200] * 25


def _raw(port: int, request: bytes) -> bytes:
    """Send `request` on a new connection and read the answer to the server's close."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        try:
            s.sendall(request)
        except OSError:  # the server may answer and close before all of it was read
            pass
        got = b""
        try:
            while chunk := s.recv(65536):
                got += chunk
        except ConnectionResetError:
            pass
        return got


GZIP = {"Accept-Encoding": "gzip"}
MARK = b"Q" * 10_000
ECHO_CASES = {
    # llhttp knows the methods HTTP has: any other is a malformed request (400); a known one
    # that no path answers is a 405 (the POST below).
    "a 10 KB method": (MARK + b" / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 400),
    "a 64 KB method": (
        b"M" * 65_536 + MARK + b" / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        None,
    ),
    "a 10 KB path": (b"GET /" + MARK + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404),
    "a POST with a body": (
        b"POST /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: 10000\r\n\r\n"
        + MARK,
        405,
    ),
    "a header on an unknown path": (
        b"GET /nope HTTP/1.1\r\nHost: x\r\nX-Junk: " + MARK + b"\r\nConnection: close\r\n\r\n",
        404,
    ),
    "a request line that is not HTTP": (MARK + b"\r\n\r\n", 400),
    "a head past the limit": (
        b"GET / HTTP/1.1\r\nHost: x\r\n" + (b"X: " + MARK + b"\r\n") * 3,
        400,
    ),
}


def test_no_error_echoes_the_request_and_the_log_stays_one_line_per_event(make_exporter):
    """Hostile and malformed requests get short fixed answers (never an echo of what they
    sent), the server goes on, and the log has no traceback: one structured line per event."""
    e = make_exporter(args=("--log-level", "debug"))
    for case, (request, status) in ECHO_CASES.items():
        answer = _raw(e.port, request)
        assert b"QQQQ" not in answer and len(answer) < 1024, (case, answer[:300])
        if status is not None:
            assert answer.startswith(f"HTTP/1.1 {status} ".encode()), (case, answer[:300])
        assert e.get("/metrics")[0] == 200, case
    e.kill()
    log = e.proc.stdout.read().decode(errors="replace")
    assert "Traceback" not in log and "QQQQ" not in log, log[-3000:]
    line = re.compile(r"^\d{4}-\d\d-\d\d [\d:,]+ level=[A-Z]+ event=\w+( |$)")
    assert all(line.match(x) for x in log.splitlines()), log[-3000:]


@pytest.mark.parametrize("path", ["/", "/metrics", "/-/healthy", "/-/ready", "/nope"])
def test_every_path_answers_get_and_head_alone(make_exporter, path):
    e = make_exporter()
    status, body = e.get(path)
    req = urllib.request.Request(e.url + path, method="HEAD")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            head = resp.status, resp.headers["Content-Length"], resp.read()
    except urllib.error.HTTPError as err:
        head = err.code, err.headers["Content-Length"], err.read()
    assert head[0] == status and head[2] == b""
    if path != "/metrics":  # a scrape's body may change in between
        assert head[1] == str(len(body))
    for method in ("POST", "PUT", "DELETE", "OPTIONS", "PATCH", "TRACE"):
        req = urllib.request.Request(e.url + path, method=method, data=b"x" * 10)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(req, timeout=10)
        assert err.value.code == 405 and err.value.headers["Allow"] == "GET, HEAD"
        assert err.value.read() == b"Method not allowed.\n"


def test_a_name_filter_is_served_by_prometheus_clients_own_app(make_exporter):
    e = make_exporter()
    status, body = e.get(
        "/metrics?name[]=gunicorn_up&name[]=gunicorn_exporter_scrape_duration_seconds"
    )
    assert status == 200
    assert {name for name, _ in parse(body.decode())} == {
        "gunicorn_up",
        "gunicorn_exporter_scrape_duration_seconds",
    }
    req = urllib.request.Request(
        e.url + "/metrics?name[]=gunicorn_up",
        headers={
            "Accept": "application/openmetrics-text; version=1.0.0",
            "Accept-Encoding": "gzip",
        },
    )
    with urllib.request.urlopen(req, timeout=10) as resp:
        assert resp.headers["Content-Encoding"] == "gzip"
        text = gzip.decompress(resp.read()).decode()
    assert text.endswith("# EOF\n") and "gunicorn_up 0.0" in text and "_seconds" not in text


def test_sigterm_is_a_clean_exit_with_clients_connected(make_exporter):
    e = make_exporter()
    slow = socket.create_connection(("127.0.0.1", e.port))
    slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    idle = socket.create_connection(("127.0.0.1", e.port))
    try:
        assert e.get("/metrics")[0] == 200
        e.proc.send_signal(signal.SIGTERM)
        assert e.proc.wait(30) == 0
    finally:
        slow.close()
        idle.close()
    log = e.proc.stdout.read().decode(errors="replace")
    assert "Traceback" not in log and log.splitlines()[-1].endswith("event=stopped"), log
