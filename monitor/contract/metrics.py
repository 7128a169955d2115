"""Names, help texts and labels of every lifecycle metric: the contract with dashboards and alerts.

The hooks write these into the shared directory and the exporter serves them; both read the
definitions from here, so a name or a help text can only ever be spelled once. So are the
values each label may take (LABEL_VALUES): the exporter serves no other, whatever a file says.

Buckets are few on purpose: each histogram costs its buckets + 2 series per cause that has
happened, in every pod. Each bucket answers one question, written beside it.
"""

from __future__ import annotations

from dataclasses import dataclass

from monitor.contract import captures, causes


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
# What went wrong with the shared directory, as the master's recorder saw it (hooks/disk.py).
DIRECTORY_FAULT_KINDS = (
    "missing",  # removed or replaced by another directory, or no longer a directory
    "unsafe",  # a symlink, another user's, or writable by others: refused
    "read_only",
    "no_space",
    "no_inodes",
    "permission",
    "replaced",  # a file of the master's was removed or replaced; rewritten from its counts
    "io",  # any other I/O error
)
DIRECTORY_FAULTS = Spec(
    "gunicorn_monitor_directory_faults",
    "counter",
    "Faults of the shared directory the hooks met (each logged once, recording resumed after).",
    ("fault",),
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
    # Each bound is one of the buckets earlier versions wrote (1, 5, 30, 60, 300, 900, 3600,
    # 14400, 86400, 604800 s), so their files fold into these exactly (collectors/lifecycle.py).
    (
        60.0,  # a crash loop or an early death? died in its first minute: at boot, first requests
        3600.0,  # churn? recycled or killed within the hour (max_requests too low, a leak)
        86400.0,  # lived less than a day? an older worker outlived a daily deploy cadence
    ),
)
WORKER_EXIT_MEMORY = Spec(
    "gunicorn_worker_exit_memory_bytes",
    "histogram",
    "Resident memory of workers at their last sample before they exited, by cause.",
    ("cause",),
    (
        256.0 * 2**20,  # died small? about a fresh Python web worker: memory was not why
        2.0**30,  # died above the GunicornWorkerMemoryHigh threshold (1 GiB, rules.yml)?
        4.0 * 2**30,  # died huge? a leak or a runaway request; OOM-kill territory
    ),
)

# Gauges the exporter derives from the recorded master state, not from counters.
UP = Spec(
    "gunicorn_up",
    "gauge",
    "1 while a recorded Gunicorn master is alive and working: not stopped, its loop turning.",
)
WORKERS = Spec("gunicorn_workers", "gauge", "Live workers of the live masters.")
WORKERS_DESIRED = Spec(
    "gunicorn_workers_desired", "gauge", "Workers the live masters are configured to run."
)
MASTER_HEARTBEAT_AGE = Spec(
    "gunicorn_master_heartbeat_age_seconds",
    "gauge",
    "Seconds since the loop of each live master last turned, the largest over them; a master "
    "whose loop has not turned for 10 s, or that is stopped, is not up.",
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

# -- the values each label may take ------------------------------------------------------------

# Every name causes.signal_name() can give (the kernel has signals 1..64), and `none`.
SIGNALS = frozenset({causes.NO_SIGNAL} | {causes.signal_name(n) for n in range(1, 65)})

# What the hooks may count a contained failure under: Gunicorn's server hooks, the arbiter
# methods the recorder wraps, and the monitor's own steps. tests/test_truth.py checks that every
# name the hooks pass to contain/guard is here.
HOOK_NAMES = frozenset(
    {
        # Gunicorn's server hooks
        "on_starting",
        "on_reload",
        "when_ready",
        "pre_fork",
        "post_fork",
        "post_worker_init",
        "worker_int",
        "worker_abort",
        "pre_exec",
        "pre_request",
        "post_request",
        "child_exit",
        "worker_exit",
        "nworkers_changed",
        "on_exit",
        # arbiter methods the recorder wraps
        "kill_worker",
        "reload",
        "reexec",
        "stop",
        "spawn_worker",
        "manage_workers",
        "waitpid",
        "upgrade",
        # the monitor's own steps
        "init_signals",
        "signal_note",
        "max_requests_note",
        "channel",
        "retire_app_files",
        "heartbeat",  # the master's heartbeat (hooks/beat.py)
        "orphans",  # counting the workers of dead masters (hooks/orphans.py)
        # why a worker hung (hooks/capture.py, hooks/watch.py)
        "capture_arm",
        "capture_ready",
        "capture_app",
        "watch",
        "capture",
        "boot_watch",
    }
)

# label name -> every value the exporter may serve for it; anything else is rejected and counted.
LABEL_VALUES: dict[str, frozenset[str]] = {
    "cause": frozenset(causes.CAUSES),
    "signal": SIGNALS,
    "hook": HOOK_NAMES,
    "phase": frozenset(captures.PHASES),
    "fault": frozenset(DIRECTORY_FAULT_KINDS),
}
