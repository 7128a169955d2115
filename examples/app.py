"""Demo application: a WSGI `app` and an ASGI `asgi_app` with a few endpoints to misbehave on.

/            ok
/sleep?s=N   sleep N seconds (a long request: a timeout under the sync worker); with
             &ignore_abort=1 it ignores SIGABRT first, so the master must SIGKILL it
/spin?s=N    hold the GIL in C code for about N seconds (a timeout on every worker class)
/asleep?s=N  (ASGI) await asyncio.sleep(N): a long request that leaves the event loop free
/busy?s=N    run Python bytecode for N seconds without yielding (a timeout on gevent and
             eventlet, whose patched sleep yields; unlike /spin, a SIGABRT handler still runs)
/exit?code=N os._exit(N) from inside the request (a crash)
/alloc?mb=N  allocate N MiB and keep it (an OOM kill under a memory limit)

DEMO_BOOT_SLEEP=N in the environment: each worker sleeps N seconds while importing the app
(a start-up waiting on a database that does not answer).
"""

import asyncio
import os
import signal
import time
from urllib.parse import parse_qs

from prometheus_client import Counter

# The app's own metrics, in prometheus_client's multiprocess mode (gunicorn.conf.py points
# PROMETHEUS_MULTIPROC_DIR at the shared directory): the sidecar serves them beside its own.
REQUESTS = Counter("demo_requests", "Requests the demo app answered, by endpoint.", ["endpoint"])
ENDPOINTS = {"/", "/sleep", "/asleep", "/spin", "/busy", "/exit", "/alloc", "/pid"}

_hoard = []


def _slow_start(seconds: float) -> None:
    time.sleep(seconds)


_slow_start(float(os.environ.get("DEMO_BOOT_SLEEP") or 0))


def _number(query: str, name: str, default: float) -> float:
    try:
        return float(parse_qs(query).get(name, [default])[0])
    except ValueError:
        return default


def _spin(seconds: float) -> None:
    # One long C call that never releases the GIL: about 2e7 iterations per second.
    sum(range(int(seconds * 2e7)))


def _busy(seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        pass


def _sleep(query: str) -> None:
    if _number(query, "ignore_abort", 0):
        signal.signal(signal.SIGABRT, signal.SIG_IGN)
    time.sleep(_number(query, "s", 1))


def _act(path: str, query: str) -> bytes:
    REQUESTS.labels(path if path in ENDPOINTS else "other").inc()
    if path == "/sleep":
        _sleep(query)
    elif path == "/spin":
        _spin(_number(query, "s", 1))
    elif path == "/busy":
        _busy(_number(query, "s", 1))
    elif path == "/exit":
        os._exit(int(_number(query, "code", 1)))
    elif path == "/alloc":
        _hoard.append(bytearray(int(_number(query, "mb", 64)) * 1024 * 1024))
    elif path == "/pid":
        return str(os.getpid()).encode()
    return b"ok\n"


def app(environ, start_response):
    body = _act(environ.get("PATH_INFO", "/"), environ.get("QUERY_STRING", ""))
    start_response("200 OK", [("Content-Type", "text/plain"), ("Content-Length", str(len(body)))])
    return [body]


async def asgi_app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    path, query = scope["path"], scope.get("query_string", b"").decode()
    if path == "/sleep":
        # Blocks the event loop on purpose: the heartbeat stops, as with any blocking call.
        REQUESTS.labels(path).inc()
        _sleep(query)
        body = b"ok\n"
    elif path == "/asleep":
        REQUESTS.labels(path).inc()
        await asyncio.sleep(_number(query, "s", 1))
        body = b"ok\n"
    else:
        body = _act(path, query)
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"text/plain")],
        }
    )
    await send({"type": "http.response.body", "body": body})
    await asyncio.sleep(0)
