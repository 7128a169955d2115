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
        (Evidence(status=exited(0), note="SIGTERM"), ("signal", "SIGTERM")),
        (Evidence(status=exited(1), note="SIGABRT"), ("signal", "SIGABRT")),
        (Evidence(status=killed(signal.SIGSEGV)), ("signal", "SIGSEGV")),
        (Evidence(status=exited(0), note="max_requests"), ("max_requests", "none")),
        (Evidence(status=exited(7)), ("crash", "none")),
        (Evidence(status=exited(3)), ("boot_error", "none")),
        (Evidence(status=exited(4)), ("app_load_error", "none")),
        (Evidence(status=exited(0)), ("unknown", "none")),
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


def test_every_classified_pair_of_the_table_is_pre_initialised():
    table = test_classify.pytestmark[0].args[1]
    assert {expected for _, expected in table} <= set(KNOWN_EXITS)
