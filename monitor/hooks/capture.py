"""The worker's side of a capture: a stacks file faulthandler writes, and the in-flight table.

Armed in post_fork, in the child, before Gunicorn's init_process: a worker that hangs while
importing the app is covered too. The signal is CAPTURE_SIGNAL, a real-time signal that
Worker.init_signals (which resets Gunicorn's own list to SIG_DFL) and the worker classes never
touch. `faulthandler` writes the stack of every thread from its C handler, without the GIL: it
works while a thread holds the GIL in a C call, where a Python-level handler never runs.

No watchdog per request (faulthandler.dump_traceback_later is one per process: in a threaded
worker one finished request would disarm another's); the master decides when to capture.

Per request (sync and gthread call pre_request/post_request): a slot of the table is written
and freed, a few stores into a shared mapping. Worker classes without those hooks (both
UvicornWorkers) get a table with no slots, and their requests read as `unknown`.
"""

from __future__ import annotations

import faulthandler
import logging
import os
from typing import Any

from monitor.contract import directory, inflight

# Worker classes that call pre_request and post_request around every request.
_TRACKING = ("gunicorn.workers.sync", "gunicorn.workers.gthread")

_table: inflight.Table | None = None
_debug = False  # Gunicorn's loglevel is debug: its default pre_request logs each request


def booting(worker: Any) -> None:
    """post_fork, in the new worker: the table, then the stacks file and its signal."""
    global _table
    layout = directory.Layout(directory.resolve())
    if not os.path.isdir(inflight.live_dir(layout)):
        return  # the master's watch did not start (its failure was said once, there)
    pid = os.getpid()
    tracks = type(worker).__module__ in _TRACKING
    capacity = max(1, int(getattr(worker.cfg, "threads", 1) or 1)) if tracks else 0
    table = inflight.Table.create(layout, pid, capacity, tracks)
    _table = table
    flags = os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_TRUNC
    fd = os.open(inflight.stacks_path(layout, pid), flags, 0o600)
    try:
        faulthandler.register(inflight.CAPTURE_SIGNAL, file=fd, all_threads=True, chain=False)
    except BaseException:
        os.close(fd)  # registered nowhere: ours alone, closed once
        raise
    # The fd stays open for the worker's life: faulthandler writes to it from C.
    table.armed()


def ready(worker: Any) -> None:
    """post_worker_init: the boot is over."""
    global _debug
    if _table is not None:
        _table.ready()
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
