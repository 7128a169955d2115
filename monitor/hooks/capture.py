"""The worker's side of a capture: a stacks file faulthandler writes, and the in-flight table.

Armed in post_fork, in the child, before Gunicorn's init_process: a worker that hangs while
importing the app is covered too (and before Gunicorn's `user`/`group` settings drop the
worker's privileges there: the files are made with the master's). Both files are created new
(directory.create_file: O_EXCL, O_NOFOLLOW) relative to the fd of `live/` that the master
checked and the worker inherited (hooks/disk.py, `handed`): the worker resolves no path, so no
name swapped in the shared directory can send its truncation or its mapping anywhere else.
When the master held no `live/` (its fault, said there) the worker has no table; when the
worker cannot create its files (a full disk), it tells the master through its channel slot,
and the master says it once: either way a gap in captures (`unknown`), never a failure.

The signal is CAPTURE_SIGNAL, a real-time signal that
Worker.init_signals (which resets Gunicorn's own list to SIG_DFL) and the worker classes never
touch. `faulthandler` writes the stack of every thread from its C handler, without the GIL: it
works while a thread holds the GIL in a C call, where a Python-level handler never runs.

No watchdog per request (faulthandler.dump_traceback_later is one per process: in a threaded
worker one finished request would disarm another's); the master decides when to capture.

Per request, a slot of the table is written and freed, a few stores into a shared mapping. The
worker-class table (contract/workerclasses.py) says how a class serves requests: classes that
call pre_request/post_request (sync, gthread, gevent, eventlet) get a slot there; the others
get one from a wrapper around the app, put on `worker.wsgi` in post_worker_init, before the
class starts serving it: an ASGI app under both UvicornWorkers (one slot per HTTP or websocket
scope), a WSGI app under tornado and gevent's pywsgi. The table has as many slots as one
worker serves requests at once (threads, worker_connections). An app that cannot be wrapped
(an ASGI2 app, a native tornado Application) and a class the table does not know report no
requests: their captures say `unknown`.
"""

from __future__ import annotations

import errno
import faulthandler
import inspect
import logging
import os
import sys
from collections.abc import Callable, Iterable
from typing import Any

from monitor.contract import directory, inflight, workerclasses
from monitor.hooks.channel import CHANNEL
from monitor.hooks.contain import guard
from monitor.hooks.worker import drop_own_frame

_table: inflight.Table | None = None
_debug = False  # Gunicorn's loglevel is debug: its default pre_request logs each request


def booting(worker: Any, live: int) -> None:
    """post_fork, in the new worker: the table, then the stacks file and its signal, in the
    directory `live` (the fd its master handed it, or -1: none). `live` is closed here, once."""
    if live < 0:
        return  # the master holds no checked live/ now: its fault was said once, there
    try:
        _arm(worker, live)
    except OSError as e:
        CHANNEL.no_table(e.errno or errno.EIO)  # the master says it, once for all workers
    finally:
        os.close(live)


def _arm(worker: Any, live: int) -> None:
    global _table
    directory.check_private(os.fstat(live), inflight.LIVE)  # still ours alone
    pid = os.getpid()
    kind = workerclasses.of(worker)
    capacity = kind.capacity(worker.cfg) if kind is not None else 0
    table = inflight.Table.create(live, pid, capacity, kind is not None)
    _table = table
    flags = os.O_WRONLY | os.O_APPEND
    fd = directory.create_file(live, inflight.stacks_name(pid), flags)
    try:
        faulthandler.register(inflight.CAPTURE_SIGNAL, file=fd, all_threads=True, chain=False)
    except BaseException:
        os.close(fd)  # registered nowhere: ours alone, closed once
        raise
    # The fd stays open for the worker's life: faulthandler writes to it from C.
    table.armed()


def ready(worker: Any) -> None:
    """post_worker_init: the boot is over; the app wrapped where the class has no hooks."""
    global _debug
    if _table is not None:
        kind = workerclasses.of(worker)
        tracks = kind is not None
        if kind is not None and not kind.request_hooks:
            guard("capture_app", _wrap_app, worker, kind, _table)
            tracks = bool(getattr(worker.wsgi, "_gunicorn_monitor", False))
        _table.ready(tracks)
    error_log = getattr(worker.log, "error_log", None)  # a custom logger_class may have none
    _debug = error_log is None or error_log.isEnabledFor(logging.DEBUG)


def request_started(worker: Any, req: Any) -> None:
    # What Gunicorn's default pre_request does, which this hook replaces.
    if _debug:
        worker.log.debug("%s %s", req.method, req.path)
    if _table is not None:
        req._gunicorn_monitor_slot = _table.acquire(req.method, req.path)


def request_finished(req: Any) -> None:
    if _table is not None:
        _table.release(getattr(req, "_gunicorn_monitor_slot", -1))


# -- wrapping the app, for the classes that call no request hooks ---------------------------


def _wrap_app(worker: Any, kind: workerclasses.WorkerClass, table: inflight.Table) -> None:
    app = worker.wsgi
    if kind.app == workerclasses.ASGI_APP:
        if _is_asgi3(app):  # uvicorn wraps an ASGI2 app itself; ours would break it
            worker.wsgi = _tracked_asgi(app, table)
    elif not _is_tornado_app(app):  # tornado serves its own apps natively, not through WSGI
        worker.wsgi = _tracked_wsgi(app, table)


def _is_asgi3(app: Any) -> bool:
    """uvicorn's own test (config.py): a coroutine function, or an object whose __call__ is."""
    if isinstance(app, type):
        return False
    call = app if inspect.isroutine(app) else inspect.getattr_static(app, "__call__", None)
    return inspect.iscoroutinefunction(call)


def _is_tornado_app(app: Any) -> bool:
    web, wsgi = sys.modules.get("tornado.web"), sys.modules.get("tornado.wsgi")
    native = (getattr(web, "Application", None), getattr(wsgi, "WSGIContainer", None))
    kinds = tuple(k for k in native if k is not None)
    return bool(kinds) and isinstance(app, kinds)


def _tracked_asgi(app: Callable, table: inflight.Table) -> Callable:
    async def tracked(scope: dict, receive: Callable, send: Callable) -> Any:
        if scope.get("type") not in ("http", "websocket"):
            return await app(scope, receive, send)  # lifespan: no request
        slot = table.acquire(str(scope.get("method", "GET")), str(scope.get("path", "")))
        try:
            return await app(scope, receive, send)
        except BaseException as e:
            drop_own_frame(e)
            raise
        finally:
            table.release(slot)

    tracked._gunicorn_monitor = True  # type: ignore[attr-defined]
    return tracked


def _tracked_wsgi(app: Callable, table: inflight.Table) -> Callable:
    def tracked(environ: dict, start_response: Callable) -> Iterable[bytes]:
        path = environ.get("SCRIPT_NAME", "") + environ.get("PATH_INFO", "")
        slot = table.acquire(str(environ.get("REQUEST_METHOD", "GET")), path)
        try:
            result = app(environ, start_response)
        except BaseException as e:
            table.release(slot)
            drop_own_frame(e)
            raise
        return _Released(result, table, slot)

    tracked._gunicorn_monitor = True  # type: ignore[attr-defined]
    return tracked


class _Released:
    """The app's response, which frees the request's slot when the server closes it (PEP 3333:
    a server calls close() once the response is sent, or it failed)."""

    def __init__(self, result: Iterable[bytes], table: inflight.Table, slot: int) -> None:
        self._result, self._table, self._slot = result, table, slot

    def __iter__(self) -> Any:
        return iter(self._result)

    def close(self) -> None:
        try:
            close = getattr(self._result, "close", None)
            if close is not None:
                close()
        finally:
            slot, self._slot = self._slot, None
            if slot is not None:
                self._table.release(slot)
