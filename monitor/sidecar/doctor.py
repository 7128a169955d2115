"""`gunicorn-monitor doctor [-- GUNICORN COMMAND LINE]`: is the server that will run coherent?

It takes the command line that starts Gunicorn (`-- gunicorn -c CONF -k gevent --timeout 10
app:app`, default `gunicorn` as run here) and resolves it with Gunicorn's own code
(gunicorn_command.py: its parser, its precedence, the config file however it is named, the worker
class as Gunicorn loads it), then says, one line each, ok / warn / fail and why: the command line
and the config load; the worker class, judged by its hierarchy (contract/workerclasses.py);
names the config sets that Gunicorn ignores (config_names.py); the monitor's hooks are wired;
the shared directory is usable by the app and readable here; the recorded masters are visible
from here (pid namespace) with readable smaps (same UID); the timeouts make sense together, for
the class, and with the platform around them. Exit 0 when nothing fails, 1 otherwise.

It never imports the hooks (monitor/hooks/): the config it loads does, and the wiring is
recognised by the hooks' own marks (their module, or the `_gunicorn_monitor` attribute of a
chained hook).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from dataclasses import asdict, dataclass
from typing import Any

from monitor.contract import directory, state, workerclasses
from monitor.sidecar import config_names, gunicorn_command

OK, WARN, FAIL = "ok", "warn", "fail"
# The hooks without which exits go unrecorded (child_exit, on_starting) or hangs unexplained.
_HOOKS = ("on_starting", "child_exit", "on_exit", "post_fork", "post_worker_init", "worker_abort")
_WIRING = "monitor.hooks.wiring"
# When Gunicorn's `timeout` fires for a class that does not serve one request at a time: only
# when the whole worker stops heartbeating, never for one slow request among others.
_TIMEOUT_SCOPE = {
    workerclasses.THREADS: "requests run in threads while the main thread heartbeats: timeout "
    "{t}s fires only while the GIL is held; a request blocked on I/O is never timed out",
    workerclasses.CONNECTIONS: "requests run in green threads while another heartbeats: timeout "
    "{t}s fires only while the hub is blocked (CPU, or a blocking call the green library did "
    "not patch); a request waiting on I/O is never timed out",
    workerclasses.ASGI: "requests run as tasks on the event loop that heartbeats: timeout {t}s "
    "fires only while the loop is blocked; a request awaiting I/O is never timed out",
}


@dataclass(frozen=True)
class Check:
    check: str
    level: str
    why: str


def _ours(fn: object) -> bool:
    return getattr(fn, "__module__", "") == _WIRING or bool(getattr(fn, "_gunicorn_monitor", 0))


def check_hooks(cfg: Any) -> list[Check]:
    missing = [name for name in _HOOKS if not _ours(cfg.settings[name].get())]
    if missing:
        return [
            Check(
                "hooks",
                FAIL,
                f"not wired: {', '.join(missing)}; end the config with "
                "`from monitor.hooks import wire; wire(globals())`",
            )
        ]
    return [Check("hooks", OK, f"the monitor's hooks are wired ({', '.join(_HOOKS)})")]


def check_directory(path: str, app_uid: int) -> list[Check]:
    try:
        st = os.stat(path)
    except OSError as e:
        return [Check("directory", FAIL, f"{path}: {e.strerror}")]
    if not stat.S_ISDIR(st.st_mode):
        return [Check("directory", FAIL, f"{path} is not a directory")]
    out = []
    mode = stat.S_IMODE(st.st_mode)
    app_writes = (st.st_uid == app_uid and mode & 0o300 == 0o300) or app_uid == 0
    if app_writes:
        out.append(
            Check(
                "directory",
                OK,
                f"{path} exists, mode {mode:04o}, the app (uid {app_uid}) can write it",
            )
        )
    else:
        out.append(
            Check(
                "directory",
                FAIL,
                f"{path} is owned by uid {st.st_uid} with mode "
                f"{mode:04o}: the app (uid {app_uid}) cannot write it",
            )
        )
    own = os.path.join(path, directory.OWN)
    denied = next(
        (p for p in (path, own) if os.path.lexists(p) and not os.access(p, os.R_OK | os.X_OK)),
        None,
    )
    if denied is None:
        out.append(Check("sidecar_reads", OK, f"readable by this user (uid {os.getuid()})"))
    else:
        why = directory.cannot_read(denied)  # the permission, the owner and the mode
        out.append(Check("sidecar_reads", FAIL, f"{why}: run the sidecar as the app's user"))
    return out


def check_processes(layout: directory.Layout) -> list[Check]:
    try:
        masters, _ = state.read(layout)
    except OSError as e:
        return [Check("processes", WARN, f"cannot read the recorded masters: {e.strerror}")]
    live = [m for m in masters if m.alive]
    if not masters:
        return [Check("processes", WARN, "no master recorded yet: start Gunicorn, then run again")]
    if not live:
        return [
            Check(
                "processes",
                WARN,
                f"{len(masters)} master(s) recorded, none visible from here: "
                "stopped, or another pid namespace (Kubernetes: shareProcessNamespace: true)",
            )
        ]
    out = [Check("processes", OK, f"master(s) {', '.join(str(m.pid) for m in live)} visible")]
    pids = [w.pid for m in live for w in m.workers if state.pid_exists(w.pid)] or [live[0].pid]
    try:
        with open(f"/proc/{pids[0]}/smaps_rollup", "rb") as f:
            f.read(1)
        out.append(Check("smaps", OK, f"per-worker memory readable (pid {pids[0]})"))
    except PermissionError:
        out.append(
            Check(
                "smaps",
                WARN,
                f"cannot read /proc/{pids[0]}/smaps_rollup: run the "
                "sidecar as the app's UID for pss/uss/swap",
            )
        )
    except OSError as e:
        out.append(Check("smaps", WARN, f"/proc/{pids[0]}/smaps_rollup: {e.strerror}"))
    return out


def check_server(
    server: gunicorn_command.Server, entry: workerclasses.WorkerClass | None, given: bool
) -> list[Check]:
    """What will run: the config, the app, the worker class (`entry`: as the monitor's table
    knows it), and names Gunicorn ignores."""
    cfg, out = server.cfg, []
    if server.config_file is None:
        said = "none: Gunicorn's defaults, GUNICORN_CMD_ARGS and the command line"
    else:
        said = f"{server.config_file} loads as Gunicorn loads it"
    out.append(Check("config", OK, said))
    if not given:
        out.append(
            Check(
                "command_line",
                WARN,
                "none given: this is `gunicorn` as run here (GUNICORN_CMD_ARGS, "
                "./gunicorn.conf.py); give the real one after `--`, as "
                "`gunicorn-monitor doctor -- gunicorn -c CONF APP`",
            )
        )
    elif server.app is None:
        out.append(
            Check("command_line", FAIL, "no application module: Gunicorn would stop at once")
        )
    out += _check_worker_class(server, entry)
    out += [
        Check("unknown_name", WARN, m.why)
        for m in config_names.find(server.namespace, cfg.settings)
    ]
    return out


def _check_worker_class(
    server: gunicorn_command.Server, entry: workerclasses.WorkerClass | None
) -> list[Check]:
    if server.worker_class_error is not None:
        return [Check("worker_class", FAIL, server.worker_class_error)]
    cls, cfg = server.worker_class, server.cfg
    if cls is None:
        return []
    name = workerclasses.qualified(cls)
    if entry is None:
        known = ", ".join(e.name for e in workerclasses.CLASSES)
        return [
            Check(
                "worker_class",
                WARN,
                f"{name} is none of the classes the monitor knows ({known}) nor a subclass "
                "of one: served without request tracking; exits only the worker could explain "
                "are `unknown`",
            )
        ]
    kind = entry.name if name in entry.bases else f"a subclass of {entry.name}"
    return [
        Check(
            "worker_class",
            OK,
            f"{name} ({kind}): {cfg.workers} worker(s), {entry.capacity(cfg)} request(s) each "
            f"at once, app {server.app or '?'}",
        )
    ]


def check_timeouts(
    cfg: Any, entry: workerclasses.WorkerClass | None, grace: float | None, lb_idle: float
) -> list[Check]:
    """`entry` is the worker class as the table knows it (None: a class it does not know)."""
    timeout, graceful, keepalive = cfg.timeout, cfg.graceful_timeout, cfg.keepalive
    out = []
    if not timeout:
        out.append(Check("timeout", WARN, "timeout is 0: a hung worker is never aborted"))
    else:
        out.append(Check("timeout", OK, f"timeout {timeout}s"))
        scope = _TIMEOUT_SCOPE.get(entry.concurrency) if entry is not None else None
        if scope is not None:
            why = scope.format(t=timeout) + " (set a timeout in the app or the proxy)"
            out.append(Check("timeout_scope", WARN, f"{entry.name}: {why}"))
    if grace is not None:
        if graceful >= grace:
            out.append(
                Check(
                    "graceful_timeout",
                    FAIL,
                    f"graceful_timeout {graceful}s is not "
                    f"shorter than the platform's termination grace period {grace}s: "
                    "the platform kills everything before Gunicorn's own SIGKILL",
                )
            )
        else:
            out.append(
                Check(
                    "graceful_timeout",
                    OK,
                    f"graceful_timeout {graceful}s < termination grace period {grace}s",
                )
            )
    # Only where it matters: a class that holds connections open between requests, and a
    # keepalive that does (at 0 each connection closes after its response: nothing to race).
    if entry is not None and entry.keepalive and keepalive > 0:
        if keepalive < lb_idle:
            out.append(
                Check(
                    "keepalive",
                    WARN,
                    f"keepalive {keepalive}s is under the load "
                    f"balancer's idle timeout {lb_idle}s: it may send a request on a "
                    "connection Gunicorn is closing (502s); set keepalive above it",
                )
            )
        else:
            out.append(
                Check(
                    "keepalive",
                    OK,
                    f"keepalive {keepalive}s >= load balancer idle timeout {lb_idle}s",
                )
            )
    if cfg.max_requests:
        if entry is not None and entry.max_requests_log is None:
            out.append(
                Check(
                    "max_requests",
                    WARN,
                    f"max_requests {cfg.max_requests}: {entry.name} workers never recycle "
                    "on it (their server counts no requests)",
                )
            )
        elif not cfg.max_requests_jitter:
            out.append(
                Check(
                    "max_requests",
                    WARN,
                    f"max_requests {cfg.max_requests} without "
                    "max_requests_jitter: every worker recycles at about the same time",
                )
            )
    return out


def run(
    command: list[str],
    dir_arg: str | None,
    grace: float | None,
    lb_idle: float,
    as_json: bool,
) -> int:
    """`command` is Gunicorn's command line (empty: `gunicorn` as run here)."""
    checks: list[Check] = []
    server = None
    try:
        args = gunicorn_command.gunicorn_args(command) if command else []
        server = gunicorn_command.resolve(args)
    except gunicorn_command.Unresolved as e:
        checks.append(Check("config", FAIL, str(e)))
    entry = None
    if server is not None:
        entry = workerclasses.resolve(server.worker_class) if server.worker_class else None
        checks += check_server(server, entry, given=bool(command))
        checks += check_hooks(server.cfg)
    # The config may have set the directory (gunicorn.conf.py does); the flag wins.
    layout = directory.Layout(directory.resolve(dir_arg))
    app_uid = server.cfg.uid if server is not None else os.getuid()
    checks += check_directory(layout.root, app_uid)
    checks += check_processes(layout)
    if server is not None:
        checks += check_timeouts(server.cfg, entry, grace, lb_idle)
    if as_json:
        failed = any(c.level == FAIL for c in checks)
        sys.stdout.write(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}))
        sys.stdout.write("\n")
    else:
        for c in checks:
            sys.stdout.write(f"{c.level:<4}  {c.check}: {c.why}\n")
    return 1 if any(c.level == FAIL for c in checks) else 0
