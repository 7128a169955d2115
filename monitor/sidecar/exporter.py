"""The HTTP side of the sidecar: /metrics, health endpoints and an index page.

Collectors know nothing of HTTP and this module knows nothing of Gunicorn: it serves whatever
registry it is given. prometheus_client's WSGI app does the exposition (text or OpenMetrics by
Accept header, gzip); this module only routes around it, and applies a web config's basic auth
(every path) and TLS (handshake on the connection's own thread, never in accept).
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

if TYPE_CHECKING:
    from monitor.sidecar.webconfig import WebConfig

log = logging.getLogger("gunicorn_monitor")

HANDSHAKE_TIMEOUT = 10.0  # seconds a client gets to complete TLS before its connection is dropped
REALM = 'Basic realm="gunicorn-monitor"'
INDEX = """<html><head><title>gunicorn-monitor</title></head><body>
<h1>gunicorn-monitor</h1>
<ul><li><a href="metrics">metrics</a></li><li><a href="-/healthy">healthy</a></li>
<li><a href="-/ready">ready</a></li></ul></body></html>
"""


def make_app(registry: CollectorRegistry, ready: Callable[[], tuple[bool, str]]) -> Callable:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics_app(environ, start_response)
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


def parse_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT`, `:PORT` or `[V6]:PORT`; ValueError with a readable message otherwise."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"--listen {listen!r}: expected HOST:PORT")
    return host.strip("[]") or "0.0.0.0", int(port)


def make_http_server(listen: str, app: Callable, web_config: WebConfig | None = None) -> WSGIServer:
    """A threading server for `app` on `listen`, with the web config's TLS and basic auth."""
    host, port = parse_listen(listen)
    context = web_config.ssl_context() if web_config is not None else None
    if web_config is not None and web_config.users:
        app = basic_auth(app, web_config.check)
        if context is None:
            log.warning("basic auth over plain HTTP: passwords cross the network in clear")

    class Server(ThreadingWSGIServer):
        address_family = _family(host)

    server_class = Server if context is None else _tls_server(Server, context)
    return make_server(host, port, app, server_class, handler_class=_SilentHandler)


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


def _tls_server(base: type, context: ssl.SSLContext) -> type:
    """`base` serving TLS: accept only wraps the socket; each thread does its own handshake.

    A client that connects and never completes the handshake (or speaks plain HTTP) holds only
    its own thread, for at most HANDSHAKE_TIMEOUT, and is dropped without a traceback.
    """

    class TLSServer(base):
        def get_request(self) -> tuple[socket.socket, object]:
            sock, addr = self.socket.accept()
            return context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

        def finish_request(self, request: ssl.SSLSocket, client_address: object) -> None:
            try:
                request.settimeout(HANDSHAKE_TIMEOUT)
                request.do_handshake()
                request.settimeout(None)
            except (ssl.SSLError, OSError) as e:
                log.debug("TLS handshake with %s failed: %s", client_address, e)
                return
            super().finish_request(request, client_address)

    return TLSServer


def _family(host: str) -> int:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def serve_forever(server: WSGIServer) -> None:
    log.info(
        "gunicorn-monitor exporter listening on %s:%s (pid %s)",
        *server.server_address[:2],
        os.getpid(),
    )
    server.serve_forever()
