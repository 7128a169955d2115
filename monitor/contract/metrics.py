"""Names, help texts and labels of every lifecycle metric: the contract with dashboards and alerts.

The hooks write these into the shared directory and the exporter serves them; both read the
definitions from here, so a name or a help text can only ever be spelled once.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Spec:
    name: str
    kind: str  # counter | gauge | histogram
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()  # histograms only


WORKER_EXITS = Spec(
    "gunicorn_worker_exits",
    "counter",
    "Worker exits, by cause and by the signal that ended the worker (none for an exit code).",
    ("cause", "signal"),
)
WORKER_ABORTS = Spec(
    "gunicorn_worker_aborts",
    "counter",
    "SIGABRTs the master sent to workers that missed their heartbeat (WORKER TIMEOUT).",
)
WORKER_SPAWNS = Spec("gunicorn_worker_spawns", "counter", "Workers forked by the master.")
WORKER_RESTARTS = Spec(
    "gunicorn_worker_restarts",
    "counter",
    "Spawns that replaced a worker which had exited while the master ran.",
)
MASTER_RELOADS = Spec(
    "gunicorn_master_reloads",
    "counter",
    "Reloads (HUP) and binary upgrades (USR2) the master performed.",
)
HOOK_ERRORS = Spec(
    "gunicorn_monitor_hook_errors",
    "counter",
    "Failures inside the monitoring hooks; each was contained and logged once.",
    ("hook",),
)
LAST_DEPLOY = Spec(
    "gunicorn_last_deploy_timestamp_seconds",
    "gauge",
    "Unix time of the last deploy: master start, HUP, USR2, or gunicorn-monitor mark-deploy.",
)
WORKER_LIFETIME = Spec(
    "gunicorn_worker_lifetime_seconds",
    "histogram",
    "Age of workers when they exited, by cause.",
    ("cause",),
    # From a crash loop (sub-second) to a worker that lives for a week.
    (1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 86400.0, 7 * 86400.0),
)

# Gauges the exporter derives from the recorded master state, not from counters.
UP = Spec("gunicorn_up", "gauge", "1 while a recorded Gunicorn master is alive.")
WORKERS = Spec("gunicorn_workers", "gauge", "Live workers of the live masters.")
WORKERS_DESIRED = Spec(
    "gunicorn_workers_desired", "gauge", "Workers the live masters are configured to run."
)

# Why a worker hung (monitor/hooks/watch.py): written by the master.
WORKER_TIMEOUTS = Spec(
    "gunicorn_worker_timeouts",
    "counter",
    "Workers aborted for a missed heartbeat (or GUNICORN_BOOT_TIMEOUT), by what they were doing: "
    "boot (before post_worker_init), request, idle, or unknown (no per-request hook).",
    ("phase",),
)
CAPTURES_DROPPED = Spec(
    "gunicorn_worker_captures_dropped",
    "counter",
    "Stack captures removed from the shared directory to keep it within its bounds.",
)
WORKER_BOOT = Spec(
    "gunicorn_worker_boot_seconds",
    "histogram",
    "Time from a worker's fork to the end of its boot (post_worker_init: the app is loaded).",
    (),
    (
        5.0,  # a quick boot? a replacement serves within seconds of a crash or a recycle
        30.0,  # within Gunicorn's default timeout? slower ones make every deploy and restart slow
    ),
)
WORKERS_STUCK_BOOTING = Spec(
    "gunicorn_workers_stuck_booting",
    "gauge",
    "Workers of the live masters still booting after `timeout` seconds (Gunicorn never times "
    "out a worker before its first heartbeat).",
)
