"""The cause taxonomy: the fixed set of `cause` and `signal` label values of every worker exit.

Both sides read it: the hooks (monitor/hooks/classify.py) decide one of these causes for each
exit, and the sidecar serves only values from these sets, whatever the directory says.
"""

from __future__ import annotations

import signal

RELOAD = "reload"
SHUTDOWN = "shutdown"
SCALE_DOWN = "scale_down"
MAX_REQUESTS = "max_requests"
TIMEOUT = "timeout"
OOM = "oom"
KILLED = "killed"
SIGNAL = "signal"
CRASH = "crash"
BOOT_ERROR = "boot_error"
APP_LOAD_ERROR = "app_load_error"
UNKNOWN = "unknown"

CAUSES = (
    RELOAD,
    SHUTDOWN,
    SCALE_DOWN,
    MAX_REQUESTS,
    TIMEOUT,
    OOM,
    KILLED,
    SIGNAL,
    CRASH,
    BOOT_ERROR,
    APP_LOAD_ERROR,
    UNKNOWN,
)

# Causes an operator expects during normal operation; everything else is worth a look.
PLANNED = frozenset({RELOAD, SHUTDOWN, SCALE_DOWN, MAX_REQUESTS})

NO_SIGNAL = "none"

# Every (cause, signal) pair a worker can end with on the supported worker classes. These series
# exist from the first scrape at 0, so `increase()` and alerts see the first event. Signals outside
# this list still get their own series when they happen (signal names are a bounded set).
KNOWN_EXITS = (
    (RELOAD, NO_SIGNAL),
    (RELOAD, "SIGTERM"),
    (SHUTDOWN, NO_SIGNAL),
    (SHUTDOWN, "SIGTERM"),
    (SHUTDOWN, "SIGQUIT"),
    (SHUTDOWN, "SIGKILL"),
    (SCALE_DOWN, NO_SIGNAL),
    (SCALE_DOWN, "SIGTERM"),
    (MAX_REQUESTS, NO_SIGNAL),
    (TIMEOUT, "SIGABRT"),
    (TIMEOUT, "SIGKILL"),
    (OOM, "SIGKILL"),
    (KILLED, "SIGKILL"),
    (SIGNAL, "SIGTERM"),
    (SIGNAL, "SIGINT"),
    (SIGNAL, "SIGQUIT"),
    (SIGNAL, "SIGABRT"),
    (SIGNAL, "SIGSEGV"),
    (SIGNAL, "SIGBUS"),
    (SIGNAL, "SIGHUP"),
    (CRASH, NO_SIGNAL),
    (BOOT_ERROR, NO_SIGNAL),
    (APP_LOAD_ERROR, NO_SIGNAL),
    (UNKNOWN, NO_SIGNAL),
)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"
