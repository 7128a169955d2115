"""What runs in a worker process: it says why it is leaving, when only it knows.

A sync worker turns an external SIGTERM into a clean exit 0, and uvicorn counts its requests
itself; the master cannot tell these apart from a max_requests recycle by the wait status. So
the worker leaves a one-word note (monitor/hooks/notes.py) that the master reads when it reaps
it. Nothing here writes anything but that note.

A worker is told to leave at any moment of its life, booting included:
- from the fork until Gunicorn's Worker.init_signals, the child still runs the master's handler,
  which only queues the signal (in the child's copy of the arbiter's SIG_QUEUE): right after
  init_signals, such a signal is sent again, to the worker's own handlers;
- from init_signals on (the app is still importing), Gunicorn's own handlers act: they are
  wrapped right after init_signals installs them, not only once the app has loaded.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from typing import Any

from monitor.contract import causes, directory
from monitor.hooks import notes
from monitor.hooks.contain import guard

# Signals whose Python handler a worker may have; a caught one is noted before it acts.
_CAUGHT = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGABRT)


# Signals a booting worker must not lose: the ones that tell a worker to leave.
_LEAVE = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)

# Where pre_fork leaves the length of the master's signal queue, on the worker object.
_QUEUED = "_gunicorn_monitor_queued"


def _note(signum: int) -> None:
    layout = directory.Layout(directory.resolve())
    guard("signal_note", notes.leave, layout, os.getpid(), causes.signal_name(signum))


def _note_then(handler: Callable) -> Callable:
    def noted(signum: int, frame: Any) -> Any:
        _note(signum)
        return handler(signum, frame)

    noted._gunicorn_monitor = True  # type: ignore[attr-defined]
    return noted


def forking(server: Any, worker: Any) -> None:
    """pre_fork, in the master: what the signal queue held before this worker existed."""
    queued = server.SIG_QUEUE
    # A list up to Gunicorn 26, a queue.SimpleQueue from 27 on.
    setattr(worker, _QUEUED, queued.qsize() if hasattr(queued, "qsize") else len(queued))


def booting(server: Any, worker: Any) -> None:
    """post_fork, in the new worker: no signal is lost or unexplained while it boots."""
    original = worker.init_signals

    def init_signals() -> None:
        original()
        guard("init_signals", _wrap_handlers)
        guard("init_signals", _redeliver, server, worker)

    worker.init_signals = init_signals


def _redeliver(server: Any, worker: Any) -> None:
    # Until init_signals, the child runs the master's handler, which queues a signal for a
    # master loop that never runs here: Gunicorn forgets it and the worker lives on. Such a
    # signal is sent again now, to the handlers the worker has from here on.
    start = getattr(worker, _QUEUED, None)
    if start is None:
        return
    queued = server.SIG_QUEUE
    if hasattr(queued, "get_nowait"):  # this child's copy: nobody else reads it
        items = []
        while not queued.empty():
            items.append(queued.get_nowait())
    else:
        items = list(queued)
    for sig in {s for s in items[start:] if s in _LEAVE}:
        os.kill(os.getpid(), sig)


def _wrap_handlers() -> None:
    for sig in _CAUGHT:
        handler = signal.getsignal(sig)
        # Never put a handler over SIG_DFL: UvicornWorker relies on dying by the signal itself.
        if callable(handler) and not getattr(handler, "_gunicorn_monitor", False):
            signal.signal(sig, _note_then(handler))


class _UvicornMaxRequests(logging.Filter):
    """uvicorn counts requests itself (worker.nr stays 0) and only says so in this log line."""

    def __init__(self, layout: directory.Layout) -> None:
        super().__init__()
        self.layout = layout

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Maximum request limit"):
            guard("max_requests_note", notes.leave, self.layout, os.getpid(), causes.MAX_REQUESTS)
        return True


def instrument(worker: Any) -> None:
    """post_worker_init: handlers the app installed while loading are wrapped too."""
    layout = directory.Layout(directory.resolve())
    _wrap_handlers()
    if "uvicorn" in type(worker).__module__:
        logging.getLogger("uvicorn.error").addFilter(_UvicornMaxRequests(layout))


def leaving(worker: Any) -> None:
    if worker.pid != os.getpid():
        return  # Gunicorn also calls worker_exit in the master for a worker that vanished
    if worker.max_requests and worker.nr >= worker.max_requests:
        notes.leave(directory.Layout(directory.resolve()), worker.pid, causes.MAX_REQUESTS)
