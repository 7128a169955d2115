"""Containment: no failure of the monitor ever reaches Gunicorn.

An exception out of a server hook, or out of anything the monitor wraps on the arbiter, is an
exception in Gunicorn's master loop: out of child_exit it kills the master. So every entry point
runs under `guard`, which logs the first failure of each hook once through Gunicorn's logger and
counts every one (`gunicorn_monitor_hook_errors_total{hook}`) where a recorder can count it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger("gunicorn.error")

_failed_once: set[str] = set()

# Set by the master's recorder once it runs: counts a contained failure (in memory; written
# with the recorder's next write). Cleared in every process the master forks, so a failure in
# a worker is said in the worker's log and never counted into the master's files.
counter: Callable[[str], None] | None = None


def contain(hook: str, exc: BaseException) -> None:
    try:
        if hook not in _failed_once:
            _failed_once.add(hook)
            log.error(
                "gunicorn-monitor event=hook_failed hook=%s error=%r (counted, said once)",
                hook,
                exc,
            )
        if counter is not None:
            counter(hook)
    except Exception:
        pass


def guard(hook: str, fn: Callable, *args: Any) -> None:
    try:
        fn(*args)
    except Exception as e:
        contain(hook, e)
