"""The HTTP side of the sidecar: /metrics, health endpoints and an index page.

Collectors know nothing of HTTP and this module knows nothing of Gunicorn: it serves whatever
it is given. /metrics comes from a `metrics` callable (monitor/sidecar/cache.py: rendered bytes,
kept between scrapes); anything prometheus_client's own WSGI app does that the cache does not
(`?name[]=` filters, OPTIONS, 405s) is left to that app. HEAD is answered as GET without a
body, on every path. A web config adds basic auth (every path) and TLS.

The server holds up under load: a fixed pool of threads handles requests, a connection costs
no thread until its first bytes arrive, the number of open connections is bounded, and every
connection must deliver its whole request (TLS handshake included) within REQUEST_TIMEOUT.
"""

from __future__ import annotations

import logging
import os
import queue
import selectors
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING
from urllib.parse import parse_qs
from wsgiref.simple_server import WSGIServer

from prometheus_client.exposition import _SilentHandler, gzip_accepted

if TYPE_CHECKING:
    from monitor.sidecar.webconfig import WebConfig

log = logging.getLogger("gunicorn_monitor")

WORKERS = 8  # threads handling requests; a scrape costs about a millisecond of one
MAX_CONNECTIONS = 512  # open at once; past it the longest-idle connection is dropped
REQUEST_TIMEOUT = 10.0  # seconds from accept to a whole request, TLS handshake included
WRITE_TIMEOUT = 10.0  # seconds any one send of a response may block on a client not reading
LISTEN_BACKLOG = 128  # a burst of connections waits in the kernel, not in a SYN retry

REALM = 'Basic realm="gunicorn-monitor"'
INDEX = """<html><head><title>gunicorn-monitor</title></head><body>
<h1>gunicorn-monitor</h1>
<ul><li><a href="metrics">metrics</a></li><li><a href="-/healthy">healthy</a></li>
<li><a href="-/ready">ready</a></li></ul></body></html>
"""

# (Accept header, gzip wanted) -> (Content-Type, body): the exposition, from cache.py
Metrics = Callable[[str | None, bool], tuple[str, bytes]]


def make_app(
    metrics: Metrics,
    ready: Callable[[], tuple[bool, str]],
    fallback: Callable | None = None,
) -> Callable:
    """Route /metrics to `metrics(accept, gzip)`, the health endpoints, the index.

    `fallback` (prometheus_client's make_wsgi_app) answers the /metrics requests the cache
    does not: other methods than GET, and `?name[]=` filters.
    """

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            wanted = "name[]" in parse_qs(environ.get("QUERY_STRING", ""))
            if fallback is not None and (environ["REQUEST_METHOD"] != "GET" or wanted):
                return fallback(environ, start_response)
            gz = gzip_accepted(environ.get("HTTP_ACCEPT_ENCODING"))
            content_type, body = metrics(environ.get("HTTP_ACCEPT"), gz)
            headers = [("Content-Type", content_type)]
            if gz:
                headers.append(("Content-Encoding", "gzip"))
            start_response("200 OK", headers)
            return [body]
        if path == "/-/healthy":
            return _text(start_response, "200 OK", "Healthy.\n")
        if path == "/-/ready":
            ok, why = ready()
            return _text(start_response, "200 OK" if ok else "503 Service Unavailable", why + "\n")
        if path == "/":
            return _text(start_response, "200 OK", INDEX, "text/html; charset=utf-8")
        return _text(start_response, "404 Not Found", "Not found.\n")

    return app


def _text(start_response: Callable, status: str, body: str, ctype: str = "text/plain") -> list:
    data = body.encode()
    start_response(status, [("Content-Type", ctype), ("Content-Length", str(len(data)))])
    return [data]


def head_as_get(app: Callable) -> Callable:
    """HEAD answered as GET would be, headers only (Content-Length that of the GET body)."""

    def wrapped(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if environ.get("REQUEST_METHOD") != "HEAD":
            return app(environ, start_response)
        seen: list = []
        result = app({**environ, "REQUEST_METHOD": "GET"}, lambda *args: seen.append(args))
        try:
            length = sum(len(chunk) for chunk in result)
        finally:
            if hasattr(result, "close"):
                result.close()
        status, headers = seen[0][:2]
        headers = [(k, v) for k, v in headers if k.lower() != "content-length"]
        start_response(status, [*headers, ("Content-Length", str(length))])
        return []

    return wrapped


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `[V6]:PORT`; ValueError with a readable message otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def make_http_server(
    listen: str, app: Callable, web_config: WebConfig | None = None
) -> PooledWSGIServer:
    """A pooled server for `app` on `listen`, with the web config's TLS and basic auth."""
    host, port = parse_listen(listen)
    context = web_config.ssl_context() if web_config is not None else None
    if web_config is not None and web_config.users:
        app = basic_auth(app, web_config.check)
        if context is None:
            log.warning("basic auth over plain HTTP: passwords cross the network in clear")
    server = PooledWSGIServer((host, port), _Handler, context)
    server.set_app(head_as_get(app))
    return server


def basic_auth(app: Callable, check: Callable[[str | None], bool]) -> Callable:
    """`app` behind HTTP basic auth: a 401 with a challenge, and nothing else, unless `check`."""

    def guarded(environ: dict, start_response: Callable) -> Iterable[bytes]:
        if check(environ.get("HTTP_AUTHORIZATION")):
            return app(environ, start_response)
        data = b"Unauthorized.\n"
        start_response(
            "401 Unauthorized",
            [
                ("Content-Type", "text/plain"),
                ("Content-Length", str(len(data))),
                ("WWW-Authenticate", REALM),
            ],
        )
        return [data]

    return guarded


class _Handler(_SilentHandler):
    """wsgiref's handler (one request per connection), telling the server when the request
    line and headers are in: from then on the request deadline no longer applies.

    Its writes are buffered: wsgiref writes the status line, each header and the body
    separately, which unbuffered is a send() each (five for a scrape); buffered, the response
    leaves in one, flushed when the handler finishes (or at each body chunk wsgiref flushes).
    """

    wbufsize = -1  # io.DEFAULT_BUFFER_SIZE; a larger write goes straight through

    def parse_request(self) -> bool:
        ok = super().parse_request()
        self.server.request_read(self.connection)
        return ok


class PooledWSGIServer(WSGIServer):
    """wsgiref's WSGI server with a bounded thread pool and request deadlines.

    Hand-written because none of the servers at hand bounds anything: prometheus_client's and
    wsgiref's give each connection its own thread for as long as the client likes (300 idle
    connections held 300 threads, and scrapes under them took over a second), and the WSGI
    servers that pool (waitress) have no TLS. The accept loop keeps each new connection in a
    selector, where it costs one file descriptor, until its first bytes arrive (a scraper's
    are usually there at accept already); only then does a pool thread take it, do the TLS
    handshake and read the request. The loop also enforces
    the deadlines: a connection silent for REQUEST_TIMEOUT is closed, and one whose request is
    still incomplete then (a slow or stalled client on a pool thread) is shut down under its
    thread, which frees it. Past MAX_CONNECTIONS the longest-idle connection is dropped for the
    new one, so a flood of idle connections never locks a scraper out.
    """

    request_queue_size = LISTEN_BACKLOG
    allow_reuse_address = True

    def __init__(
        self,
        address: tuple[str, int],
        handler: type,
        context: ssl.SSLContext | None = None,
        workers: int = WORKERS,
        max_connections: int = MAX_CONNECTIONS,
        request_timeout: float = REQUEST_TIMEOUT,
    ) -> None:
        self.address_family = _family(address[0])
        self._threads: list[threading.Thread] = []
        super().__init__(address, handler)  # binds: an OSError here is the caller's to report
        self.context = context
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self._ready: queue.SimpleQueue = queue.SimpleQueue()  # (sock, addr, deadline) or None
        self._idle: dict[socket.socket, tuple[object, float]] = {}  # in the selector; by age
        self._reading: dict[socket.socket, float] = {}  # on a pool thread, request incomplete
        self._lock = threading.Lock()  # guards _reading and the shutdown of its sockets
        self._open = 0  # connections accepted and not yet closed
        self._accept_failed: int | None = None  # errno of the failure last logged
        self._stopping = False
        for i in range(workers):
            self._threads.append(threading.Thread(target=self._work, name=f"http-{i}", daemon=True))
            self._threads[-1].start()

    # The accept loop (the main thread).

    def serve_forever(self, poll_interval: float = 1.0) -> None:
        """Until shutdown(); deadlines are enforced within `poll_interval` of passing."""
        self.socket.setblocking(False)
        with selectors.DefaultSelector() as sel:
            sel.register(self.socket, selectors.EVENT_READ)
            while not self._stopping:
                timeout = poll_interval
                if self._idle:  # the oldest idle connection's deadline comes first
                    first = next(iter(self._idle.values()))[1]
                    timeout = min(timeout, max(0.0, first - time.monotonic()))
                for key, _ in sel.select(timeout=timeout):
                    if key.fileobj is self.socket:
                        self._accept(sel)
                    else:
                        sock = key.fileobj
                        sel.unregister(sock)
                        addr, deadline = self._idle.pop(sock)
                        self._ready.put((sock, addr, deadline))
                self._expire(sel, time.monotonic())
            for sock in list(self._idle):
                sel.unregister(sock)
                self._drop(sock)
            self._idle.clear()

    def shutdown(self) -> None:
        self._stopping = True

    def _accept(self, sel: selectors.BaseSelector) -> None:
        while True:
            try:
                sock, addr = self.socket.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # out of file descriptors: make room, or wait a moment
                if e.errno != self._accept_failed:
                    log.warning("event=accept_failed error=%s", e.strerror)
                    self._accept_failed = e.errno
                if not self._evict_idle(sel):
                    time.sleep(0.1)  # the connection waits in the backlog; no busy loop
                return
            self._accept_failed = None
            if self._open >= self.max_connections and not self._evict_idle(sel):
                sock.close()  # all busy: this one gets a reset, the ones being served go on
                continue
            with self._lock:
                self._open += 1
            deadline = time.monotonic() + self.request_timeout
            try:  # a scraper sends its request at once: then no trip through the selector
                sock.setblocking(False)
                sent = sock.recv(1, socket.MSG_PEEK)
            except BlockingIOError:
                sent = None
            except OSError:
                sent = b""
            sock.settimeout(WRITE_TIMEOUT)
            if sent is None:
                self._idle[sock] = (addr, deadline)
                sel.register(sock, selectors.EVENT_READ)
                continue
            if sent:
                self._ready.put((sock, addr, deadline))
            else:  # closed (or reset) before a byte: nothing to answer
                self._drop(sock)

    def _evict_idle(self, sel: selectors.BaseSelector) -> bool:
        oldest = next(iter(self._idle), None)
        if oldest is None:
            return False
        del self._idle[oldest]
        sel.unregister(oldest)
        self._drop(oldest)
        return True

    def _expire(self, sel: selectors.BaseSelector, now: float) -> None:
        while self._idle:
            sock, (_, deadline) = next(iter(self._idle.items()))
            if deadline > now:
                break  # in accept order, so in deadline order
            del self._idle[sock]
            sel.unregister(sock)
            self._drop(sock)
        with self._lock:
            for sock, deadline in list(self._reading.items()):
                if deadline <= now:
                    del self._reading[sock]
                    # Unblocks the pool thread's read; that thread closes the socket.
                    try:
                        socket.socket.shutdown(sock, socket.SHUT_RDWR)
                    except OSError:
                        pass

    def _drop(self, sock: socket.socket) -> None:
        sock.close()
        with self._lock:
            self._open -= 1

    # The pool threads.

    def _work(self) -> None:
        while True:
            item = self._ready.get()
            if item is None:
                return
            sock, addr, deadline = item
            conn = sock
            try:
                if self.context is not None:
                    conn = self.context.wrap_socket(
                        sock, server_side=True, do_handshake_on_connect=False
                    )
                with self._lock:
                    self._reading[conn] = deadline
                if self.context is not None:
                    conn.settimeout(max(0.001, deadline - time.monotonic()))
                    conn.do_handshake()
                    conn.settimeout(WRITE_TIMEOUT)
                self.finish_request(conn, addr)
            except (OSError, ValueError) as e:  # resets, timeouts, failed handshakes
                log.debug("event=connection_dropped client=%s error=%r", addr, e)
            except Exception:
                log.exception("event=request_failed client=%s", addr)
            finally:
                with self._lock:
                    self._reading.pop(conn, None)
                self.shutdown_request(conn)
                with self._lock:
                    self._open -= 1

    def request_read(self, conn: socket.socket) -> None:
        """The request is in (called by the handler): its deadline no longer applies."""
        with self._lock:
            self._reading.pop(conn, None)

    def server_close(self) -> None:
        self._stopping = True
        for _ in self._threads:
            self._ready.put(None)
        super().server_close()


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def serve_forever(server: PooledWSGIServer) -> None:
    log.info(
        "gunicorn-monitor exporter listening on %s:%s (pid %s)",
        *server.server_address[:2],
        os.getpid(),
    )
    server.serve_forever()
