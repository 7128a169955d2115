"""Gunicorn settings for the drop-in config, each overridable from the environment.

Declarative, like Gunicorn's own config.py: one row per setting, its environment variable, its
default and how to parse it, so the table is the documentation. A bad value ends the master
before it starts with one line naming the variable; command-line flags still win over all of
these, as they do over any Gunicorn config file.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from monitor.contract import appfiles

log = logging.getLogger("gunicorn.error")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError
    return value


def _text(text: str) -> str:
    if not text.strip():
        raise ValueError
    return text.strip()


def _binds(text: str) -> list[str]:
    binds = [b.strip() for b in text.split(",") if b.strip()]
    if not binds:
        raise ValueError
    return binds


@dataclass(frozen=True)
class Setting:
    name: str  # Gunicorn's setting name
    env: str
    default: Any
    parse: Callable[[str], Any]
    expect: str  # what a valid value looks like, for the error line


SETTINGS = (
    Setting("bind", "GUNICORN_BIND", ["0.0.0.0:8000"], _binds, "HOST:PORT[,HOST:PORT...]"),
    Setting("workers", "GUNICORN_WORKERS", 4, _positive_int, "a whole number >= 1"),
    Setting("worker_class", "GUNICORN_WORKER_CLASS", "sync", _text, "a worker class"),
    Setting("threads", "GUNICORN_THREADS", 1, _positive_int, "a whole number >= 1"),
    Setting("timeout", "GUNICORN_TIMEOUT", 60, _non_negative_int, "whole seconds >= 0"),
    Setting(
        "graceful_timeout", "GUNICORN_GRACEFUL_TIMEOUT", 30, _non_negative_int, "whole seconds"
    ),
    Setting("keepalive", "GUNICORN_KEEPALIVE", 5, _non_negative_int, "whole seconds >= 0"),
    Setting("max_requests", "GUNICORN_MAX_REQUESTS", 0, _non_negative_int, "a whole number"),
    Setting(
        "max_requests_jitter",
        "GUNICORN_MAX_REQUESTS_JITTER",
        0,
        _non_negative_int,
        "a whole number",
    ),
    Setting("preload_app", "GUNICORN_PRELOAD_APP", False, appfiles.parse_boolean, "true or false"),
    Setting("loglevel", "GUNICORN_LOGLEVEL", "info", _text, "a log level"),
)


# The monitor's own settings: not Gunicorn's, so the hooks read them from the environment at run
# time (monitor_setting), under any config that calls wire(); gunicorn.conf.py checks them here
# with the rest, so a typo stops the master before it starts instead of silently meaning "off".
FOLD_APP_METRICS = Setting(
    "fold_app_metrics", appfiles.FOLD_ENV, False, appfiles.parse_switch, "true or false"
)
# A worker still booting after this many seconds is aborted as Gunicorn aborts a timed-out one
# (Gunicorn never times out a worker before its first heartbeat). 0: off.
BOOT_TIMEOUT = Setting(
    "boot_timeout", "GUNICORN_BOOT_TIMEOUT", 0, _non_negative_int, "whole seconds >= 0"
)
MONITOR_SETTINGS = (FOLD_APP_METRICS, BOOT_TIMEOUT)


class SettingsError(ValueError):
    pass


def monitor_setting(setting: Setting, environ: Mapping[str, str] = os.environ) -> Any:
    """One of MONITOR_SETTINGS for the hooks: never raises (they run inside Gunicorn).

    A bad value is the default, with one line; gunicorn.conf.py already refused it before the
    master started, so this only happens under a config of the user's own.
    """
    raw = environ.get(setting.env)
    if raw is None:
        return setting.default
    try:
        return setting.parse(raw)
    except ValueError:
        log.error(
            "gunicorn-monitor event=invalid_setting variable=%s value=%r expected=%r using=%r",
            setting.env,
            raw,
            setting.expect,
            setting.default,
        )
        return setting.default


def from_environment(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """The settings as Gunicorn config names, or SettingsError naming every bad variable
    (the monitor's own settings are checked too, but not returned: Gunicorn has no use for
    them)."""
    values, errors = {}, []
    for s in SETTINGS + MONITOR_SETTINGS:
        raw = environ.get(s.env)
        if raw is None:
            values[s.name] = s.default
            continue
        try:
            values[s.name] = s.parse(raw)
        except ValueError:
            errors.append(f"{s.env}={raw!r} is not valid: expected {s.expect}")
    if errors:
        raise SettingsError("; ".join(errors))
    return {s.name: values[s.name] for s in SETTINGS}


def load_or_exit(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """For gunicorn.conf.py: a bad value is one line on stderr and exit status 2.

    SystemExit is not caught by Gunicorn's config loader, so no traceback follows the line.
    """
    try:
        return from_environment(environ)
    except SettingsError as e:
        sys.stderr.write(f"gunicorn-monitor: invalid configuration: {e}\n")
        raise SystemExit(2) from None
