"""What runs in a worker process: it says why it is leaving, when only it knows.

A sync worker turns an external SIGTERM into a clean exit 0, and uvicorn counts its requests
itself; the master cannot tell these apart from a max_requests recycle by the wait status. So
the worker leaves a one-word note (monitor/hooks/notes.py) that the master reads when it reaps
it. Nothing here writes anything but that note.

A worker is told to leave at any moment of its life, booting included. From the fork until
Gunicorn's Worker.init_signals, the child runs the master's handler, which only queues the signal
for a master loop that never runs there, and a signal that lands before the child has first run
is dropped by CPython itself (it clears the flags of signals caught around a fork). So the
leave signals are blocked from pre_fork on, in the master only until fork returns, in the child
until init_signals has installed the worker's handlers (wrapped, to leave the note): a signal
sent at any moment in between stays pending, then acts as on a booted worker.
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

# The signal mask before pre_fork blocked _LEAVE: restored in the master when fork returns,
# and in the worker once its own handlers are in place.
_mask_before: set[int] | None = None
_at_fork_registered = False


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
    """pre_fork, in the master: hold the leave signals until the worker can handle them."""
    global _mask_before, _at_fork_registered
    if not _at_fork_registered:
        os.register_at_fork(after_in_parent=_release)  # also runs when fork fails
        _at_fork_registered = True
    if _mask_before is None:
        _mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, _LEAVE)


def _release() -> None:
    global _mask_before
    if _mask_before is not None:
        before, _mask_before = _mask_before, None
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def booting(server: Any, worker: Any) -> None:
    """post_fork, in the new worker: no signal is lost or unexplained while it boots."""
    try:
        original = worker.init_signals

        def init_signals() -> None:
            try:
                original()
                guard("init_signals", _wrap_handlers)
            finally:
                _release()  # pending leave signals act now, on the worker's own handlers

        worker.init_signals = init_signals
    except BaseException:
        _release()
        raise


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
