"""Captures: the stacks and requests of a worker the master gave up on, kept on disk, bounded.

`gunicorn-monitor/captures/<microseconds since the epoch>-<pid>.json`, one JSON object each,
written by the master (tmp file, then rename: a reader sees whole files only), every name
relative to the fd of `captures/` it checked (contract/directory.py), never through a symlink:
nothing outside it is ever listed, written or removed. The exit record
in the journal names its capture (`"capture": "<file name>"`), and `gunicorn-monitor events
--stacks` prints them.

Bounded on count and bytes: before a capture is written, the oldest are removed until the new
one fits; the master counts what it removed (`gunicorn_worker_captures_dropped_total`). The
stack in one capture is cut at MAX_STACK bytes (it says so: `truncated`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat

from monitor.contract import directory as directories
from monitor.contract.directory import Layout

DIR = "captures"
MAX_COUNT = 100
MAX_BYTES = 4 * 1024 * 1024
MAX_STACK = 64 * 1024

# Why the master captured: a missed heartbeat, a boot past GUNICORN_BOOT_TIMEOUT, a boot past
# `timeout` (the worker is left running), or the SIGKILL after graceful_timeout at shutdown.
TIMEOUT = "timeout"
BOOT_TIMEOUT = "boot_timeout"
STUCK_BOOTING = "stuck_booting"
SHUTDOWN_KILL = "shutdown_kill"

# What the worker was doing: the label values of gunicorn_worker_timeouts_total{phase}.
BOOT = "boot"  # not yet through post_worker_init
REQUEST = "request"
IDLE = "idle"
UNKNOWN = "unknown"  # a worker class that reports no requests (UvicornWorker), or no table
PHASES = (BOOT, REQUEST, IDLE, UNKNOWN)

_NAME = re.compile(r"^(\d{16})-(\d+)\.json$")


def directory(layout: Layout) -> str:
    return os.path.join(layout.own, DIR)


def name(time_s: float, pid: int) -> str:
    return f"{int(time_s * 1e6):016d}-{pid}.json"


def save(captures_fd: int, record: dict) -> tuple[str, int]:
    """Write one capture into the checked directory `captures_fd`; returns its file name and
    how many old ones were dropped for it. OSError when it cannot be written."""
    data = json.dumps(record, separators=(",", ":"), sort_keys=True).encode()
    fname = name(record["time"], record["pid"])
    existing = []
    for n in sorted(n for n in os.listdir(captures_fd) if _NAME.match(n)):
        with contextlib.suppress(OSError):
            st = os.stat(n, dir_fd=captures_fd, follow_symlinks=False)
            existing.append((n, st.st_size if stat.S_ISREG(st.st_mode) else 0))
    total = sum(size for _, size in existing)
    dropped = 0
    while existing and (len(existing) >= MAX_COUNT or total + len(data) > MAX_BYTES):
        old, size = existing.pop(0)
        with contextlib.suppress(OSError):
            os.unlink(old, dir_fd=captures_fd)
        total -= size
        dropped += 1
    directories.replace_file(captures_fd, fname, data)
    return fname, dropped


def load(layout: Layout) -> tuple[list[dict], int]:
    """Every capture on disk, oldest first, and how many files could not be read as one.
    Read through checked directory fds, never through a symlink or into a FIFO: a `captures/`
    swapped for anything not ours is read as none (a reader's gap, never another file)."""
    try:
        own = directories.open_own_for_reading(layout)
    except OSError:
        return [], 0
    try:
        sub = directories.open_subdir_for_reading(own, DIR, directory(layout))
    except OSError:
        return [], 0
    finally:
        os.close(own)
    records, bad = [], 0
    try:
        for n in sorted(n for n in os.listdir(sub) if _NAME.match(n)):
            try:
                fd = directories.open_file(sub, n)
            except FileNotFoundError:
                continue  # dropped while we listed
            except OSError:
                bad += 1
                continue
            try:
                with os.fdopen(fd, "rb") as f:  # the file object closes the fd, once
                    rec = json.loads(f.read(MAX_BYTES))
            except (OSError, ValueError):
                bad += 1
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("stack", ""), str):
                bad += 1
                continue
            rec["name"] = n
            records.append(rec)
    finally:
        os.close(sub)
    return records, bad
