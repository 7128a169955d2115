"""Why a worker ended, decided from the evidence the hooks gathered.

Everything that decides a cause lives here, as one pure function over plain facts, so that the
whole decision can be read (and tested) without a running Gunicorn. The hooks only collect
facts; the set of causes itself is the contract's (monitor/contract/causes.py).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

from monitor.contract.causes import (
    APP_LOAD_ERROR,
    BOOT_ERROR,
    CLEAN_EXIT,
    CRASH,
    KILLED,
    MAX_REQUESTS,
    NO_SIGNAL,
    OOM,
    SIGNAL,
    STOP_SIGNALS,
    TIMEOUT,
    UNKNOWN,
    signal_name,
)

# Gunicorn's own exit codes (arbiter.py: WORKER_BOOT_ERROR, APP_LOAD_ERROR).
_EXIT_CODE_CAUSES = {3: BOOT_ERROR, 4: APP_LOAD_ERROR}

# What the master was doing when it signalled a worker.
PHASE_RELOAD = "reload"
PHASE_SHUTDOWN = "shutdown"
PHASE_SCALE_DOWN = "scale_down"
PHASE_TIMEOUT = "timeout"


@dataclass(frozen=True)
class Evidence:
    """Facts about one worker's end, as the master saw them.

    `status` is the raw wait status from waitpid (None when the worker was never reaped);
    `master_signals` every signal the master itself sent the worker, `master_phase` what the
    master was doing when it first told the worker to go, and `told_at` when (monotonic);
    `aborted` is Gunicorn's own timeout flag; `oom_kills` how many kernel OOM kills happened
    since the previous unexplained SIGKILL.

    What the worker said about itself (hooks/channel.py): `reported` when it claimed its slot
    and its class is one the monitor knows (an exit with no other fact is then its own);
    `max_requests_at` when it decided to leave after max_requests; `caught` the first signal
    it caught (a name) and `caught_at` when. Times are time.monotonic(), one clock for every
    process on Linux.
    """

    status: int | None = None
    master_signals: frozenset[int] = frozenset()
    master_phase: str | None = None
    told_at: float | None = None
    aborted: bool = False
    oom_kills: int = 0
    reported: bool = False
    max_requests_at: float | None = None
    caught: str | None = None
    caught_at: float | None = None


def classify(ev: Evidence) -> tuple[str, str]:
    """Return (cause, signal label) for one worker exit.

    The signal label is the signal that ended the worker: the one the kernel reports, else the
    one the worker caught and left on (sync workers turn SIGTERM into a clean exit), else `none`.

    The order is the order of certainty: Gunicorn's own timeout flag beats everything (a timed
    out worker may end by SIGABRT, SIGKILL or a clean exit); then Gunicorn's exit codes; then a
    max_requests decision the worker took before anyone told it to go; then what the master
    itself did; then what the kernel reported; then what the worker caught; and an exit 0 with
    none of these is the worker's own (`clean_exit`) only when it could have said otherwise.
    """
    killed_by = exit_code = None
    if ev.status is not None:
        if _wifsignaled(ev.status):
            killed_by = signal_name(_wtermsig(ev.status))
        else:
            exit_code = (ev.status >> 8) & 0xFF
    sent = {signal_name(s) for s in ev.master_signals}

    if ev.aborted:
        return TIMEOUT, killed_by or "SIGABRT"
    if exit_code in _EXIT_CODE_CAUSES:
        return _EXIT_CODE_CAUSES[exit_code], NO_SIGNAL
    # Ended the way a leaving worker ends: on its own, or by a signal someone sends to stop a
    # process (a crash while it drains is still a crash, an unexplained SIGKILL still a kill).
    stopped = (
        exit_code == 0
        or (ev.status is None and killed_by is None)
        or killed_by in STOP_SIGNALS
        or killed_by in sent
    )
    if stopped and _first(ev.max_requests_at, ev.told_at, ev.caught_at):
        # It had decided to leave before the master's signal or any other it caught: a HUP
        # that reaches a worker finishing its last request does not make it a reload.
        return MAX_REQUESTS, killed_by or NO_SIGNAL
    if ev.master_phase is not None:
        # Retired by the master. It keeps the planned cause only if it ended the way the
        # master asked: by one of the master's signals, or by leaving cleanly.
        if killed_by in sent:
            return ev.master_phase, killed_by
        if exit_code == 0 or (ev.status is None and killed_by is None):
            return ev.master_phase, _first_retiring(ev.master_signals)
    if killed_by == "SIGKILL":
        return (OOM if ev.oom_kills > 0 else KILLED), killed_by
    if killed_by is not None:
        return SIGNAL, killed_by
    if ev.caught:
        # A signal nobody in Gunicorn sent, caught by the worker and turned into an exit
        # (an external `kill -TERM` makes a sync worker exit 0, SIGABRT exit 1).
        return SIGNAL, ev.caught
    if exit_code:
        return CRASH, NO_SIGNAL
    if exit_code == 0 and ev.reported:
        # It could have said why (a signal, max_requests) and said nothing: app code called
        # sys.exit(0) or os._exit(0), while loading or serving.
        return CLEAN_EXIT, NO_SIGNAL
    return UNKNOWN, NO_SIGNAL


def _first(moment: float | None, *others: float | None) -> bool:
    """`moment` happened, and before every other moment that happened."""
    return moment is not None and all(o is None or moment < o for o in others)


def _first_retiring(signals: frozenset[int]) -> str:
    for sig in (signal.SIGTERM, signal.SIGQUIT, signal.SIGINT, signal.SIGKILL):
        if sig in signals:
            return signal_name(sig)
    return NO_SIGNAL


def _wifsignaled(status: int) -> bool:
    return (status & 0x7F) not in (0, 0x7F)


def _wtermsig(status: int) -> int:
    return status & 0x7F
