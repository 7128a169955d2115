"""The cause taxonomy: the fixed set of `cause` and `signal` label values of every worker exit.

Both sides read it: the hooks (monitor/hooks/classify.py) decide one of these causes for each
exit, and the sidecar serves only values from these sets, whatever the directory says. What each
cause means for an operator (planned, a crash, a stray kill, missing evidence) is said here once,
as the groups below; the alert rules (dashboards/rules.yml) select causes by these groups, and a
test holds the rules to them.
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
# Exited with status 0 on its own, with no planned reason the worker or the master knew of: app
# code calling sys.exit(0) or os._exit(0), while loading or serving.
CLEAN_EXIT = "clean_exit"
# Its master died before it: the exit was counted by a process that outlived that master (a
# later master of the directory), without a wait status.
ORPHANED = "orphaned"
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
    CLEAN_EXIT,
    ORPHANED,
    UNKNOWN,
)

# Causes an operator expects during normal operation.
PLANNED = frozenset({RELOAD, SHUTDOWN, SCALE_DOWN, MAX_REQUESTS})
# The monitor lacked the evidence to say more: never an app failure; it has an alert of its own
# (the monitor is going blind), and never feeds an unplanned-exit page.
MISSING_EVIDENCE = frozenset({UNKNOWN})
# Follows the death of a master, which has its own alert (GunicornMasterDown): not paged again
# for each of its workers.
AFTER_MASTER_DEATH = frozenset({ORPHANED})
# Everything else is unplanned: the app or its surroundings ended a worker nobody meant to end.
UNPLANNED = frozenset(CAUSES) - PLANNED - MISSING_EVIDENCE - AFTER_MASTER_DEATH

# Signals someone sends to make a process stop. A worker ended by one of these that the master did
# not send (cause `signal`) was stopped by someone else: a stray kill. A worker ended by any other
# signal (SIGSEGV, SIGILL, SIGFPE, SIGBUS, SIGABRT from C code, SIGPIPE, ...) crashed.
STOP_SIGNALS = frozenset({"SIGTERM", "SIGINT", "SIGQUIT", "SIGHUP"})
# Causes where the worker itself failed, whatever the signal: each first one pages.
CRASHES = frozenset({CRASH, CLEAN_EXIT})

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


def crashed(cause: str, signal_label: str) -> bool:
    """Did the worker itself fail (a crash: page), as opposed to being stopped or retired?"""
    return cause in CRASHES or (cause == SIGNAL and signal_label not in STOP_SIGNALS)


def stray(cause: str, signal_label: str) -> bool:
    """Was it stopped by someone other than its master (a stray kill: worth a ticket)?"""
    return cause == KILLED or (cause == SIGNAL and signal_label in STOP_SIGNALS)


def signal_name(signum: int) -> str:
    try:
        return signal.Signals(signum).name
    except ValueError:
        return f"SIG{signum}"
