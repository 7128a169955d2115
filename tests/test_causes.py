"""The cause taxonomy as a table: evidence in, exactly one (cause, signal) out."""

from __future__ import annotations

import signal

import pytest

from monitor.contract.causes import KNOWN_EXITS
from monitor.hooks.classify import Evidence, classify

TERM, KILL, ABRT = signal.SIGTERM, signal.SIGKILL, signal.SIGABRT


def exited(code: int) -> int:
    return code << 8


def killed(sig: int) -> int:
    return int(sig)


@pytest.mark.parametrize(
    "evidence, expected",
    [
        (
            Evidence(status=exited(0), master_signals=frozenset({TERM}), master_phase="reload"),
            ("reload", "SIGTERM"),
        ),
        (
            Evidence(status=killed(TERM), master_signals=frozenset({TERM}), master_phase="reload"),
            ("reload", "SIGTERM"),
        ),
        (
            Evidence(
                status=killed(KILL), master_signals=frozenset({TERM, KILL}), master_phase="shutdown"
            ),
            ("shutdown", "SIGKILL"),
        ),
        (Evidence(status=exited(0), aborted=True), ("timeout", "SIGABRT")),
        (Evidence(status=killed(KILL), aborted=True), ("timeout", "SIGKILL")),
        (Evidence(status=killed(KILL), oom_kills=1), ("oom", "SIGKILL")),
        (Evidence(status=killed(KILL)), ("killed", "SIGKILL")),
        (Evidence(status=exited(0), caught="SIGTERM", caught_at=5.0), ("signal", "SIGTERM")),
        (Evidence(status=exited(1), caught="SIGABRT", caught_at=5.0), ("signal", "SIGABRT")),
        (Evidence(status=killed(signal.SIGSEGV)), ("signal", "SIGSEGV")),
        (Evidence(status=exited(0), max_requests_at=5.0), ("max_requests", "none")),
        (Evidence(status=exited(7)), ("crash", "none")),
        (Evidence(status=exited(3)), ("boot_error", "none")),
        (Evidence(status=exited(4)), ("app_load_error", "none")),
        # Exit 0 and nothing said: its own doing if it could have said more, else a gap.
        (Evidence(status=exited(0), reported=True), ("clean_exit", "none")),
        (Evidence(status=exited(0)), ("unknown", "none")),
        (Evidence(status=None, reported=True), ("unknown", "none")),
        # The race, settled by what happened first: a worker that decided to leave after
        # max_requests before the master's HUP reached it, and one told to go before it did.
        (
            Evidence(
                status=exited(0),
                master_signals=frozenset({TERM}),
                master_phase="reload",
                told_at=10.0,
                max_requests_at=9.0,
                caught="SIGTERM",
                caught_at=10.1,
                reported=True,
            ),
            ("max_requests", "none"),
        ),
        (
            Evidence(
                status=exited(0),
                master_signals=frozenset({TERM}),
                master_phase="reload",
                told_at=10.0,
                max_requests_at=10.2,
                caught="SIGTERM",
                caught_at=10.1,
                reported=True,
            ),
            ("reload", "SIGTERM"),
        ),
        # UvicornWorker: catches nothing we see, dies by the master's SIGTERM.
        (
            Evidence(
                status=killed(TERM),
                master_signals=frozenset({TERM}),
                master_phase="reload",
                told_at=10.0,
                max_requests_at=9.0,
                reported=True,
            ),
            ("max_requests", "SIGTERM"),
        ),
        # A stray SIGTERM after the decision, or before it.
        (
            Evidence(status=exited(0), max_requests_at=9.0, caught="SIGTERM", caught_at=9.5),
            ("max_requests", "none"),
        ),
        (
            Evidence(status=exited(0), max_requests_at=9.5, caught="SIGTERM", caught_at=9.0),
            ("signal", "SIGTERM"),
        ),
        # Decided, then crashed or was OOM-killed while draining: not a recycle.
        (Evidence(status=exited(9), max_requests_at=9.0), ("crash", "none")),
        (Evidence(status=killed(signal.SIGSEGV), max_requests_at=9.0), ("signal", "SIGSEGV")),
        (Evidence(status=killed(KILL), max_requests_at=9.0, oom_kills=1), ("oom", "SIGKILL")),
        # Timed out while draining after max_requests: it hung, whatever it had decided.
        (Evidence(status=exited(1), aborted=True, max_requests_at=9.0), ("timeout", "SIGABRT")),
        # Retired by the master but crashed while draining: still a crash.
        (
            Evidence(status=exited(9), master_signals=frozenset({TERM}), master_phase="reload"),
            ("crash", "none"),
        ),
        (
            Evidence(
                status=killed(signal.SIGSEGV),
                master_signals=frozenset({TERM}),
                master_phase="scale_down",
            ),
            ("signal", "SIGSEGV"),
        ),
    ],
)
def test_classify(evidence, expected):
    assert classify(evidence) == expected


# Born at 1 on purpose: rare, and the alert rules fire on a series born at 1.
_NOT_PRE_CREATED = {("clean_exit", "none"), ("max_requests", "SIGTERM")}


def test_every_classified_pair_of_the_table_is_pre_initialised():
    table = test_classify.pytestmark[0].args[1]
    assert {expected for _, expected in table} - _NOT_PRE_CREATED <= set(KNOWN_EXITS)
