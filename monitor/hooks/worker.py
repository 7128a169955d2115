"""What runs in a worker process: it says why it is leaving, when only it knows.

A sync worker turns an external SIGTERM into a clean exit 0, and uvicorn counts its requests
itself; the master cannot tell these apart from a max_requests recycle by the wait status. So
the worker writes what it knows into its slot of the channel (monitor/hooks/channel.py), with
the moment it happened: the first signal it caught, and when it decided to leave after
max_requests. The master reads it when it reaps the worker and settles a race (a HUP while a
recycling worker finishes) by what happened first. Nothing here touches the directory.

What each worker class does is asked of the worker-class table (contract/workerclasses.py):
  - max_requests: the decision is noted at the log call that announces it (Gunicorn's classes
    log it through the worker's logger before they serve the request that reached the limit;
    uvicorn through `uvicorn.error` on the tick where it stops). The log method is wrapped, so
    the note is taken whatever the log level.
  - signals: Python handlers are wrapped to note the signal, then run the original. An
    exception the original raises (sys.exit in Gunicorn's handle_quit) leaves with the wrapper's
    own frame dropped from its traceback (Python 3.11+; 3.10 re-adds the frame of a bare
    `raise`). Gunicorn's own SIGABRT handler (a timeout) is not wrapped at all: it calls the
    worker_abort hook, which notes it, so Gunicorn's timeout traceback has no frame of ours on
    any Python version. A SIG_DFL handler is never wrapped (UvicornWorker dies by the signal).

A worker is told to leave at any moment of its life, booting included. From the fork until
Gunicorn's Worker.init_signals, the child runs the master's handler, which only queues the signal
for a master loop that never runs there, and a signal that lands before the child has first run
is dropped by CPython itself (it clears the flags of signals caught around a fork). So the
leave signals are blocked from pre_fork on, in the master only until fork returns, in the child
until init_signals has installed the worker's handlers (wrapped, to note the signal): a signal
sent at any moment in between stays pending, then acts as on a booted worker.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Callable
from typing import Any

from monitor.contract import workerclasses
from monitor.hooks.channel import CHANNEL
from monitor.hooks.contain import guard

# Signals whose Python handler a worker may have; a caught one is noted before it acts.
_CAUGHT = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT, signal.SIGABRT)


# Signals a booting worker must not lose: the ones that tell a worker to leave.
_LEAVE = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)

# The signal mask before pre_fork blocked _LEAVE: restored in the master when fork returns,
# and in the worker once its own handlers are in place.
_mask_before: set[int] | None = None
_at_fork_registered = False


def drop_own_frame(exc: BaseException) -> None:
    """Take the calling wrapper's frame off an exception's traceback, before a bare `raise`:
    the traceback Gunicorn or the app logs then shows their frames only."""
    tb = exc.__traceback__
    if tb is not None and tb.tb_frame is sys._getframe(1):
        exc.__traceback__ = tb.tb_next


def _note_then(handler: Callable) -> Callable:
    def noted(signum: int, frame: Any) -> Any:
        guard("signal_note", CHANNEL.caught, signum)
        try:
            return handler(signum, frame)
        except BaseException as e:
            drop_own_frame(e)
            raise

    noted._gunicorn_monitor = True  # type: ignore[attr-defined]
    return noted


def forking(server: Any, worker: Any) -> None:
    """pre_fork, in the master: a slot of the channel, and the leave signals held until the
    worker can handle them."""
    global _mask_before, _at_fork_registered
    if not _at_fork_registered:
        os.register_at_fork(after_in_parent=_release)  # also runs when fork fails
        _at_fork_registered = True
    if _mask_before is None:
        _mask_before = signal.pthread_sigmask(signal.SIG_BLOCK, _LEAVE)
    guard("channel", CHANNEL.give, worker, list(server.WORKERS.values()))


def _release() -> None:
    global _mask_before
    if _mask_before is not None:
        before, _mask_before = _mask_before, None
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def booting(server: Any, worker: Any) -> None:
    """post_fork, in the new worker: its slot claimed; no signal lost or unexplained while it
    boots."""
    try:
        guard("channel", CHANNEL.claim, worker, workerclasses.of(worker) is not None)
        original = worker.init_signals

        def init_signals() -> None:
            try:
                original()
                guard("init_signals", _wrap_handlers, worker)
            finally:
                _release()  # pending leave signals act now, on the worker's own handlers

        worker.init_signals = init_signals
    except BaseException:
        _release()
        raise


def _wrap_handlers(worker: Any) -> None:
    for sig in _CAUGHT:
        handler = signal.getsignal(sig)
        # Never put a handler over SIG_DFL: UvicornWorker relies on dying by the signal itself.
        if not callable(handler) or getattr(handler, "_gunicorn_monitor", False):
            continue
        if sig == signal.SIGABRT and handler == getattr(worker, "handle_abort", None):
            continue  # noted by the worker_abort hook it calls (see the module docstring)
        signal.signal(sig, _note_then(handler))


def _watch_log(log: Any, message: str) -> None:
    """Wrap the log methods that announce the max_requests decision, on this one object."""
    for name in ("info", "warning"):
        said = getattr(log, name, None)
        if callable(said) and not getattr(said, "_gunicorn_monitor", False):
            setattr(log, name, _noting_max_requests(said, message))


def _noting_max_requests(said: Callable, message: str) -> Callable:
    def say(msg: Any, *args: Any, **kwargs: Any) -> Any:
        if isinstance(msg, str) and msg.startswith(message):
            guard("max_requests_note", CHANNEL.max_requests)
        return said(msg, *args, **kwargs)

    say._gunicorn_monitor = True  # type: ignore[attr-defined]
    return say


def instrument(worker: Any) -> None:
    """post_worker_init: handlers the app installed while loading are wrapped too, and the
    log call that announces a max_requests decision is watched."""
    _wrap_handlers(worker)
    kind = workerclasses.of(worker)
    if kind is None or kind.max_requests_log is None:
        return
    if kind.max_requests_logger is None:
        _watch_log(worker.log, kind.max_requests_log)
    else:
        _watch_log(logging.getLogger(kind.max_requests_logger), kind.max_requests_log)


def aborting(worker: Any) -> None:
    """worker_abort: Gunicorn's own SIGABRT handler is running (a timeout, or a stray abort)."""
    CHANNEL.caught(signal.SIGABRT)
