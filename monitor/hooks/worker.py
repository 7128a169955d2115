"""What runs in a worker process: it says why it is leaving, when only it knows.

A sync worker turns an external SIGTERM into a clean exit 0, and uvicorn counts its requests
itself; the master cannot tell these apart from a max_requests recycle by the wait status. So
the worker leaves a one-word note (monitor/hooks/notes.py) that the master reads when it reaps
it. Nothing here writes anything but that note.
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


def _note_then(layout: directory.Layout, handler: Callable) -> Callable:
    def noted(signum: int, frame: Any) -> Any:
        guard("signal_note", notes.leave, layout, os.getpid(), causes.signal_name(signum))
        return handler(signum, frame)

    return noted


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
    layout = directory.Layout(directory.resolve())
    for sig in _CAUGHT:
        handler = signal.getsignal(sig)
        # Never put a handler over SIG_DFL: UvicornWorker relies on dying by the signal itself.
        if callable(handler):
            signal.signal(sig, _note_then(layout, handler))
    if "uvicorn" in type(worker).__module__:
        logging.getLogger("uvicorn.error").addFilter(_UvicornMaxRequests(layout))


def leaving(worker: Any) -> None:
    if worker.pid != os.getpid():
        return  # Gunicorn also calls worker_exit in the master for a worker that vanished
    if worker.max_requests and worker.nr >= worker.max_requests:
        notes.leave(directory.Layout(directory.resolve()), worker.pid, causes.MAX_REQUESTS)
