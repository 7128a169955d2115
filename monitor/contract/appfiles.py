"""The application's prometheus_client multiprocess files, as both sides name and move them.

The app's processes write `<type>_<pid>.db` at the top of the shared directory
(prometheus_client's own format and naming). An app may serve them itself too, with a stock
`MultiProcessCollector` on the same directory (prometheus_client's recipe for Gunicorn), and
that collector sums whatever the `*.db` glob holds at the moment it reads.

Folding (FOLD_ENV, off by default, read by both processes): when a worker dies, its files are
moved out of the glob into `.compacting/staged/` (a rename, atomic and O(1)), and the sidecar's
compaction (monitor/sidecar/compaction.py) folds staged files into `<type>_aggregate.db`. Until
it does, a stock collector misses the dead worker's counts (a dip), and one that globbed the
file before the move fails its scrape. That is why it is opt-in. The master stages a dead
worker's files itself, before it forks a replacement that could reuse the pid: that move is all
the in-Gunicorn side ever does to these files, so it lives here, in the contract. Off, nothing
ever leaves the glob (the hooks only call prometheus_client's `mark_process_dead`), and the
sidecar only finishes folding files an earlier fold-on run left staged.
"""

from __future__ import annotations

import contextlib
import os
import stat
import time
import uuid
from typing import NamedTuple

from monitor.contract import directory
from monitor.contract.directory import Layout

AGGREGATE_ID = "aggregate"
STATE_DIR = ".compacting"

# One switch for both processes: the master stages dead workers' files, the sidecar folds (and
# stages any the master missed). Both read it with parse_switch, so they accept the same words.
FOLD_ENV = "GUNICORN_MONITOR_FOLD_APP_METRICS"
_ON, _OFF = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_boolean(text: str) -> bool:
    """Every true/false setting of both processes: 1/0, true/false, yes/no, on/off; else
    ValueError."""
    lowered = text.strip().lower()
    if lowered in _ON:
        return True
    if lowered in _OFF:
        return False
    raise ValueError(f"expected true or false, got {text!r}")


def parse_switch(text: str) -> bool:
    """FOLD_ENV's value: as parse_boolean, and empty is off."""
    return bool(text.strip()) and parse_boolean(text)


PLAIN_TYPES = ("counter", "histogram", "summary")
# How each file prefix folds. Modes not listed (a future prometheus_client) are read, never folded.
SUM, MIN, MAX, RECENT, PER_PID, DROP = "sum", "min", "max", "recent", "per_pid", "drop"
FOLD = {
    "counter": SUM,
    "histogram": SUM,  # buckets are stored non-cumulative, so they sum
    "summary": SUM,
    "gauge_sum": SUM,
    "gauge_min": MIN,
    "gauge_max": MAX,
    "gauge_mostrecent": RECENT,
    "gauge_all": PER_PID,
    "gauge_liveall": DROP,
    "gauge_livesum": DROP,
    "gauge_livemin": DROP,
    "gauge_livemax": DROP,
    "gauge_livemostrecent": DROP,
}


class DbName(NamedTuple):
    """A multiprocess file name decoded the way MultiProcessCollector decodes it."""

    prefix: str  # counter | histogram | summary | gauge_<mode>
    typ: str
    mode: str  # gauge mode, "" for other types
    ident: str  # the process identifier (a pid, or AGGREGATE_ID)

    @property
    def pid(self) -> int | None:
        """The pid, if the identifier is one (custom identifiers are never judged dead)."""
        if self.ident.isascii() and self.ident.isdigit() and 0 < int(self.ident) < 1 << 31:
            return int(self.ident)
        return None


def parse_name(basename: str) -> DbName | None:
    """Decode `counter_123.db` / `gauge_livesum_123.db`; None for names the collector can't use."""
    if not basename.endswith(".db"):
        return None
    parts = basename[:-3].split("_")
    if parts[0] in PLAIN_TYPES and len(parts) >= 2 and all(parts):
        return DbName(parts[0], parts[0], "", "_".join(parts[1:]))
    if parts[0] == "gauge" and len(parts) == 3 and parts[1] and parts[2]:
        return DbName(f"gauge_{parts[1]}", "gauge", parts[1], parts[2])
    return None


def new_token() -> str:
    # Sorts by staging time (so later deaths of a reused pid win for `all` gauges) and is unique,
    # because rename() would silently replace an existing staged file.
    return f"{time.time_ns():016x}{uuid.uuid4().hex[:8]}"


def dirs(path: str) -> tuple[str, str, str]:
    state = os.path.join(path, STATE_DIR)
    return state, os.path.join(state, "staged"), os.path.join(state, "next")


# The live-mode gauges' files: a dead process's are removed, as prometheus_client's own
# mark_process_dead does (which globs and removes by path; here by name, relative to the
# checked top directory's fd, so that a top directory swapped under the master is never
# followed).
LIVE_PREFIXES = tuple(prefix for prefix, how in FOLD.items() if how == DROP)


def mark_process_dead(top_fd: int, pid: int) -> None:
    """prometheus_client's mark_process_dead, in the checked top directory `top_fd`."""
    for prefix in LIVE_PREFIXES:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"{prefix}_{pid}.db", dir_fd=top_fd)  # never follows a symlink


def open_staged(top_fd: int, layout: Layout) -> int:
    """A checked fd of `.compacting/staged/` (each level created 0700 if missing, never a
    symlink, ours alone: in a top directory others may write, they may have put their own
    there). The caller closes it once."""
    state, staged, _ = dirs(layout.root)
    state_fd = directory.open_subdir(top_fd, STATE_DIR, state, create=True)
    try:
        return directory.open_subdir(state_fd, os.path.basename(staged), staged, create=True)
    finally:
        os.close(state_fd)


def stage_process_files(top_fd: int, layout: Layout, pid: int) -> int:
    """Move one dead pid's files out of the glob; returns how many.

    Safe without the lock (the fold only consumes the staged files its journal names), so
    gunicorn's child_exit hook may call it in the master before it forks a replacement, which
    closes the pid-reuse window entirely. Only regular files are moved (a symlink someone put
    under the pid's name stays where it is), by name between two checked directory fds.
    """
    staged = open_staged(top_fd, layout)
    try:
        token, moved = new_token(), 0
        for name in os.listdir(top_fd):
            db = parse_name(name)
            if db is None or db.pid != pid or db.prefix not in FOLD:
                continue
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISREG(os.stat(name, dir_fd=top_fd, follow_symlinks=False).st_mode):
                    os.rename(name, f"{token}~{name}", src_dir_fd=top_fd, dst_dir_fd=staged)
                    moved += 1
        return moved
    finally:
        os.close(staged)
