"""The HTTP side of the sidecar: /metrics, health endpoints and an index page.

Collectors know nothing of HTTP and this module knows nothing of Gunicorn: it serves whatever
registry it is given. prometheus_client's WSGI app does the exposition (text or OpenMetrics by
Accept header, gzip); this module only routes around it.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Iterable
from typing import Any
from wsgiref.simple_server import WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _SilentHandler

log = logging.getLogger("gunicorn_monitor")

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


def make_http_server(listen: str, app: Callable, **server_args: Any) -> WSGIServer:
    host, port = parse_listen(listen)

    class Server(ThreadingWSGIServer):
        address_family = _family(host)

    return make_server(host, port, app, Server, handler_class=_SilentHandler, **server_args)


def _family(host: str) -> int:
    import socket

    return socket.AF_INET6 if ":" in host else socket.AF_INET


def serve_forever(server: WSGIServer) -> None:
    log.info(
        "gunicorn-monitor exporter listening on %s:%s (pid %s)",
        *server.server_address[:2],
        os.getpid(),
    )
    thread = threading.current_thread()
    log.debug("serving on thread %s", thread.name)
    server.serve_forever()
