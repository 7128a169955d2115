"""The HTTP side of the sidecar: /metrics, health endpoints and an index page, as an ASGI app.

Collectors know nothing of HTTP and this module knows nothing of Gunicorn: it serves whatever
it is given. /metrics comes from a `metrics` callable (monitor/sidecar/cache.py: prometheus_client's
own bytes, kept between scrapes); a `?name[]=` filter, which the kept bodies do not serve, goes
to prometheus_client's own app. A web config adds basic auth (basicauth.py, every path); TLS and
the limits on connections are the server's (server.py).

Every path answers GET and HEAD alike (uvicorn leaves HEAD's body out), anything else a 405;
an unknown path a 404. No answer carries anything of the request: every error body is a fixed
text. Whatever blocks (reading the directory, rendering, readiness) runs on a bounded pool of
threads, never on the event loop; at most one request per open connection is in flight, so
the pool's queue is bounded by server.MAX_CONNECTIONS.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import parse_qs

from prometheus_client import CollectorRegistry, make_wsgi_app
from prometheus_client.exposition import gzip_accepted
from prometheus_client.metrics_core import Metric

from monitor.sidecar.basicauth import BasicAuth, Verdict

log = logging.getLogger("gunicorn_monitor")

WORKERS = 4  # threads for blocking work; a scrape of an unchanged directory is a millisecond

REALM = 'Basic realm="gunicorn-monitor"'
INDEX = """<html><head><title>gunicorn-monitor</title></head><body>
<h1>gunicorn-monitor</h1>
<ul><li><a href="metrics">metrics</a></li><li><a href="-/healthy">healthy</a></li>
<li><a href="-/ready">ready</a></li></ul></body></html>
"""
METHODS = ("GET", "HEAD")

# (Accept header, gzip wanted) -> (Content-Type, body): the exposition, from cache.py
Metrics = Callable[[str | None, bool], tuple[str, bytes]]
# (status, headers, body) of a response
Response = tuple[int, list[tuple[str, str]], bytes]


def _text(status: int, body: str, *headers: tuple[str, str]) -> Response:
    return status, [("Content-Type", "text/plain; charset=utf-8"), *headers], body.encode()


UNAUTHORIZED = _text(401, "Unauthorized.\n", ("WWW-Authenticate", REALM))
THROTTLED = _text(429, "Too many authentication attempts; retry later.\n", ("Retry-After", "1"))
NOT_ALLOWED = _text(405, "Method not allowed.\n", ("Allow", ", ".join(METHODS)))
NOT_FOUND = _text(404, "Not found.\n")
FAILED = _text(500, "Internal error; see the sidecar's log.\n")
HEALTHY = _text(200, "Healthy.\n")


class Exporter:
    """The ASGI app: `metrics` for /metrics, `ready()` -> (ready, why) for /-/ready,
    `collector` (what `metrics` renders) for filtered scrapes, `auth` if any."""

    def __init__(
        self,
        metrics: Metrics,
        ready: Callable[[], tuple[bool, str]],
        collector: Any = None,
        auth: BasicAuth | None = None,
        workers: int = WORKERS,
    ) -> None:
        self.metrics, self.ready, self.collector, self.auth = metrics, ready, collector, auth
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="http")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return
        try:
            status, headers, body = await self.answer(scope)
        except Exception:  # ours, not the client's: said once, and a fixed answer
            log.exception("event=request_failed")
            status, headers, body = FAILED
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (k.encode("latin-1"), v.encode("latin-1"))
                    for k, v in [*headers, ("Content-Length", str(len(body)))]
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def answer(self, scope: dict) -> Response:
        headers = _Headers(scope["headers"])
        if self.auth is not None:
            verdict = await self.auth.check(headers.get(b"authorization"))
            if verdict is Verdict.THROTTLED:
                return THROTTLED
            if verdict is not Verdict.OK:
                return UNAUTHORIZED
        if scope["method"] not in METHODS:
            return NOT_ALLOWED
        path = scope["path"]
        if path == "/metrics":
            return await self._metrics(scope["query_string"].decode("latin-1"), headers)
        if path == "/-/healthy":
            return HEALTHY
        if path == "/-/ready":
            ok, why = await self._blocking(self.ready)
            return _text(200 if ok else 503, why + "\n")
        if path == "/":
            return 200, [("Content-Type", "text/html; charset=utf-8")], INDEX.encode()
        return NOT_FOUND

    async def _metrics(self, query: str, headers: _Headers) -> Response:
        accept, encoding = headers.get(b"accept"), headers.get(b"accept-encoding")
        if self.collector is not None and "name[]" in parse_qs(query):
            return await self._blocking(self._filtered, query, accept, encoding)
        gz = gzip_accepted(encoding or "")
        content_type, body = await self._blocking(self.metrics, accept, gz)
        found = [("Content-Type", content_type)]
        if gz:
            found.append(("Content-Encoding", "gzip"))
        return 200, found, body

    def _filtered(self, query: str, accept: str | None, encoding: str | None) -> Response:
        """A `?name[]=` scrape: prometheus_client's own app (filter and bytes), on a pool thread.

        Its WSGI app, not its ASGI one: that renders on the event loop, and before 0.21 ignores
        `name[]`. Its filter (restricted_registry) finds collectors by the names they describe,
        and ours describe nothing (that would cost a collection), so it is given this
        collection's families, described."""
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Described(list(self.collector.collect())))
        environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": query}
        if accept is not None:
            environ["HTTP_ACCEPT"] = accept
        if encoding is not None:
            environ["HTTP_ACCEPT_ENCODING"] = encoding
        started: list = []
        chunks = make_wsgi_app(registry)(
            environ, lambda status, hdrs, *_: started.append((status, hdrs))
        )
        body = b"".join(chunks)
        status, found = started[0]
        kept = [(k, v) for k, v in found if k.lower() != "content-length"]
        return int(status.split()[0]), kept, body

    async def _blocking(self, fn: Callable, *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.auth is not None:
            self.auth.close()


class _Headers:
    """A request's headers (ASGI: lower-case names, as bytes), read as text."""

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        self.raw = raw

    def get(self, name: bytes) -> str | None:
        """All values of `name` joined by commas, as HTTP reads repeated headers; None if absent."""
        values = [v.decode("latin-1") for k, v in self.raw if k == name]
        return ",".join(values) if values else None


class _Described:
    """Families collected once, served as a collector that describes them."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def describe(self) -> list[Metric]:
        return self.families

    def collect(self) -> list[Metric]:
        return self.families
