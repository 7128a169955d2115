"""`gunicorn-monitor doctor [--config gunicorn.conf.py] [--json]`: is this deployment coherent?

It loads the config the way the `gunicorn` command does (its own argument parser, the config
file, GUNICORN_CMD_ARGS) and says, one line each, ok / warn / fail and why: the monitor's hooks
are wired; the shared directory is usable by the app and readable here; the recorded masters
are visible from here (pid namespace) with readable smaps (same UID); the timeouts make sense
together and with the platform around them. Exit 0 when nothing fails, 1 otherwise.

It never imports the hooks (monitor/hooks/): the config it loads does, and the wiring is
recognised by the hooks' own marks (their module, or the `_gunicorn_monitor` attribute of a
chained hook).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import stat
import sys
from dataclasses import asdict, dataclass
from typing import Any

from monitor.contract import directory, state

OK, WARN, FAIL = "ok", "warn", "fail"
# The hooks without which exits go unrecorded (child_exit, on_starting) or hangs unexplained.
_HOOKS = ("on_starting", "child_exit", "on_exit", "post_fork", "post_worker_init", "worker_exit")
_WIRING = "monitor.hooks.wiring"
_KEEPALIVE_CLASSES = ("gthread", "uvicorn")  # sync closes every connection after one request


@dataclass(frozen=True)
class Check:
    check: str
    level: str
    why: str


def load_config(path: str) -> Any:
    """Gunicorn's Config, loaded as `gunicorn -c PATH` would; ValueError with one line if not."""
    from gunicorn.app.wsgiapp import WSGIApplication  # the sidecar needs no Gunicorn otherwise

    argv, err = sys.argv, io.StringIO()
    sys.argv = ["gunicorn", "-c", path, "gunicorn_monitor_doctor:app"]
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(err):
            return WSGIApplication("%(prog)s [OPTIONS] [APP_MODULE]", prog="gunicorn").cfg
    except SystemExit:
        said = [line for line in err.getvalue().splitlines() if line.strip()]
        raise ValueError(said[-1] if said else "gunicorn refused it") from None
    except Exception as e:
        raise ValueError(f"{type(e).__name__}: {e}") from None
    finally:
        sys.argv = argv


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


def check_timeouts(cfg: Any, grace: float | None, lb_idle: float) -> list[Check]:
    timeout, graceful, keepalive = cfg.timeout, cfg.graceful_timeout, cfg.keepalive
    worker_class = cfg.worker_class_str
    out = []
    if not timeout:
        out.append(Check("timeout", WARN, "timeout is 0: a hung worker is never aborted"))
    else:
        out.append(Check("timeout", OK, f"timeout {timeout}s"))
    if "gthread" in worker_class:
        out.append(
            Check(
                "gthread_timeout",
                WARN,
                f"gthread: the main thread keeps the heartbeat while a request waits in a "
                f"thread, so timeout {timeout}s fires only when the GIL is held; a request "
                "blocked on I/O is never timed out (set a timeout in the app or the proxy)",
            )
        )
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
    if any(c in worker_class for c in _KEEPALIVE_CLASSES):
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
    if cfg.max_requests and not cfg.max_requests_jitter:
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
    config: str | None,
    dir_arg: str | None,
    grace: float | None,
    lb_idle: float,
    as_json: bool,
) -> int:
    checks: list[Check] = []
    cfg = None
    path = config or "gunicorn.conf.py"
    if not os.path.isfile(path):
        checks.append(Check("config", FAIL, f"{path}: no such file"))
    else:
        try:
            cfg = load_config(path)
            checks.append(Check("config", OK, f"{path} loads as Gunicorn loads it"))
        except ValueError as e:
            checks.append(Check("config", FAIL, f"{path} does not load: {e}"))
    if cfg is not None:
        checks += check_hooks(cfg)
    # The config may have set the directory (gunicorn.conf.py does); the flag wins.
    layout = directory.Layout(directory.resolve(dir_arg))
    app_uid = cfg.uid if cfg is not None else os.getuid()
    checks += check_directory(layout.root, app_uid)
    checks += check_processes(layout)
    if cfg is not None:
        checks += check_timeouts(cfg, grace, lb_idle)
    if as_json:
        failed = any(c.level == FAIL for c in checks)
        sys.stdout.write(json.dumps({"ok": not failed, "checks": [asdict(c) for c in checks]}))
        sys.stdout.write("\n")
    else:
        for c in checks:
            sys.stdout.write(f"{c.level:<4}  {c.check}: {c.why}\n")
    return 1 if any(c.level == FAIL for c in checks) else 0
