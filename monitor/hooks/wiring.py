"""The server hooks Gunicorn calls, and `wire()`, which installs them into a config.

Each hook is a plain function with Gunicorn's signature, run under `guard` (see the package's
rules). The master's work is the recorder's (recorder.py); the worker's is worker.py's.
"""

from __future__ import annotations

import os
from collections.abc import Callable, MutableMapping
from typing import Any

from monitor.contract import directory
from monitor.hooks import capture, settings
from monitor.hooks import contain as contain_module
from monitor.hooks import worker as worker_side
from monitor.hooks.contain import contain, guard
from monitor.hooks.recorder import Monitor
from monitor.hooks.watch import Watch

_monitor: Monitor | None = None


def on_starting(server: Any) -> None:
    global _monitor
    try:
        os.environ[directory.RUNNING_MASTER] = str(os.getpid())
        _monitor = Monitor(server)
        contain_module.counter = _monitor.count_failure
        _monitor.started_master()
    except Exception as e:
        contain("on_starting", e)
    if _monitor is not None:
        guard("watch", _start_watch, server, _monitor)


def _start_watch(server: Any, monitor: Monitor) -> None:
    """Stacks and phase of hung workers (watch.py), told to the recorder's exit records."""
    watch = Watch(server, monitor, settings.monitor_setting(settings.BOOT_TIMEOUT))
    monitor.exit_fields = watch.exit_fields
    monitor.state_fields = watch.state_fields


def pre_fork(server: Any, worker: Any) -> None:
    guard("pre_fork", worker_side.forking, server, worker)


def post_fork(server: Any, worker: Any) -> None:
    # The channel slot claimed first: the capture's arming reports its failure there.
    guard("post_fork", worker_side.booting, server, worker)
    live = _monitor.disk.handed() if _monitor is not None else -1
    guard("capture_arm", capture.booting, worker, live)


def nworkers_changed(server: Any, new_value: int, old_value: int | None) -> None:
    if _monitor is not None:
        guard("nworkers_changed", _monitor.desired_changed, new_value)


def post_worker_init(worker: Any) -> None:
    guard("capture_ready", capture.ready, worker)
    guard("post_worker_init", worker_side.instrument, worker)


# The two hooks that run on every request: guard's work written out, to save a call.
def pre_request(worker: Any, req: Any) -> None:
    try:
        capture.request_started(worker, req)
    except Exception as e:
        contain("pre_request", e)


def post_request(worker: Any, req: Any, *_: Any) -> None:  # arity 2: Gunicorn adapts the call
    try:
        capture.request_finished(req)
    except Exception as e:
        contain("post_request", e)


def worker_abort(worker: Any) -> None:
    guard("worker_abort", worker_side.aborting, worker)


def child_exit(server: Any, worker: Any) -> None:
    if _monitor is not None:
        guard("child_exit", _monitor.exited, worker)


def on_exit(server: Any) -> None:
    if _monitor is not None:
        guard("on_exit", _monitor.stopped)


HOOKS = {
    "on_starting": on_starting,
    "nworkers_changed": nworkers_changed,
    "pre_fork": pre_fork,
    "post_fork": post_fork,
    "post_worker_init": post_worker_init,
    "pre_request": pre_request,
    "post_request": post_request,
    "worker_abort": worker_abort,
    "child_exit": child_exit,
    "on_exit": on_exit,
}


def wire(namespace: MutableMapping[str, Any]) -> None:
    """Install the monitor's hooks into a Gunicorn config namespace: `wire(globals())`.

    A hook the config already defines is kept and runs after the monitor's own, with its
    arguments, return value and exceptions unchanged: chaining changes nothing for it.
    """
    for name, ours in HOOKS.items():
        theirs = namespace.get(name)
        if theirs is None:
            namespace[name] = ours
        elif theirs is not ours and not getattr(theirs, "_gunicorn_monitor", False):
            namespace[name] = _chain(ours, theirs)


def _chain(ours: Callable, theirs: Callable) -> Callable:
    def both(*args: Any) -> Any:
        ours(*args)
        return theirs(*args)

    # Gunicorn checks a hook's arity through inspect.signature, which follows __wrapped__.
    both.__wrapped__ = theirs  # type: ignore[attr-defined]
    both._gunicorn_monitor = True  # type: ignore[attr-defined]
    return both
