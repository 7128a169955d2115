"""The exporter's HTTP server under what a network does to it: idle and slow connections, a
flood of them, HEAD, and the exact exposition formats from a body kept between scrapes.

Server-level scenarios run the real PooledWSGIServer on loopback in this process, with its
limits turned down so that a deadline is a second, not ten; the rest scrape the real
`gunicorn-monitor serve` process.
"""

from __future__ import annotations

import gzip
import os
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import psutil
import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.exposition import _bake_output
from prometheus_client.multiprocess import MultiProcessCollector

from monitor.contract.directory import Layout
from monitor.sidecar import exporter
from monitor.sidecar.cache import DirectoryInputs, RenderedMetrics
from tests.harness import BIN, app_process, http_get, parse, value, wait_for


def _hello(environ, start_response):
    start_response("200 OK", [("Content-Type", "text/plain")])
    return [b"hello\n"]


@contextmanager
def _server(**limits) -> Iterator[exporter.PooledWSGIServer]:
    server = exporter.PooledWSGIServer(("127.0.0.1", 0), exporter._Handler, **limits)
    server.set_app(exporter.head_as_get(_hello))
    loop = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    loop.start()
    try:
        yield server
    finally:
        server.shutdown()
        loop.join(10)
        server.server_close()


def _get(server: exporter.PooledWSGIServer, timeout: float = 5) -> int:
    return http_get(f"http://127.0.0.1:{server.server_address[1]}/", timeout)[0]


def _closed_by_server(sock: socket.socket, within: float) -> bool:
    """True if the server closes `sock` within `within` seconds (EOF or a reset)."""
    sock.settimeout(within)
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_hold_no_thread_and_are_closed_at_the_deadline():
    with _server(workers=2, request_timeout=1.0) as server:
        port = server.server_address[1]
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(50)]
        try:
            started = time.monotonic()
            assert all(_get(server) == 200 for _ in range(20))  # 2 threads, 50 idle: no wait
            assert time.monotonic() - started < 5
            assert all(_closed_by_server(s, 5) for s in idle)
            wait_for(lambda: server._open == 0, 5, "every connection closed and counted")
        finally:
            for s in idle:
                s.close()


def test_a_stalled_request_frees_its_thread_at_the_deadline():
    with _server(workers=1, request_timeout=1.0) as server:
        slow = socket.create_connection(("127.0.0.1", server.server_address[1]))
        try:
            slow.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n")  # the one thread reads, then waits
            wait_for(lambda: server._reading, 5, "the thread reading the stalled request")
            started = time.monotonic()
            assert _get(server) == 200
            assert 0.5 < time.monotonic() - started < 5  # served once the deadline freed it
            assert _closed_by_server(slow, 5)
        finally:
            slow.close()


def test_past_the_connection_cap_the_longest_idle_is_dropped():
    with _server(workers=2, max_connections=10) as server:
        port = server.server_address[1]
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(10)]
        try:
            wait_for(lambda: len(server._idle) == 10, 5, "10 idle connections accepted")
            assert _get(server) == 200  # the eleventh: the first idle one made room
            assert _closed_by_server(idle[0], 5)
            assert not _closed_by_server(idle[-1], 0.2)
        finally:
            for s in idle:
                s.close()


def test_head_is_get_without_a_body():
    with _server(workers=1) as server:
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        req = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(req, timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Length"] == str(len(b"hello\n"))
            assert resp.read() == b""


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


@pytest.mark.parametrize("accept", ACCEPTS)
@pytest.mark.parametrize("gz", [False, True])
def test_kept_bodies_are_prometheus_clients_own_bytes(tmp_path, accept, gz):
    _write_counter(str(tmp_path), os.getpid(), 3)
    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(tmp_path))
    rendered = RenderedMetrics(registry, DirectoryInputs(Layout(str(tmp_path))))
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
    rendered = RenderedMetrics(registry, DirectoryInputs(Layout(str(tmp_path))))
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
    rendered = RenderedMetrics(registry, DirectoryInputs(Layout(str(tmp_path))))
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
    state = m.file("master")
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
    threads_before = proc.num_threads()
    idle = [socket.create_connection(("127.0.0.1", e.port)) for _ in range(300)]
    try:

        def scrape(_: int) -> float:
            started = time.monotonic()
            assert e.get("/metrics", 10)[0] == 200
            return time.monotonic() - started

        with ThreadPoolExecutor(20) as pool:
            took = sorted(pool.map(scrape, range(200)))
        assert took[-1] < 5, took[-5:]  # not a timing target: nothing waited on a deadline
        assert proc.num_threads() == threads_before <= exporter.WORKERS + 4
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
