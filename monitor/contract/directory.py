"""Where everything lives in the shared directory.

Layout of `$PROMETHEUS_MULTIPROC_DIR`:

- `*.db` at the top: the application's own prometheus_client multiprocess files (served as is).
- `gunicorn-monitor/`: what the hooks record, and nothing else writes there:
  - `counter_<master pid>.db`, `histogram_<master pid>.db`, `gauge_max_<id>.db`: lifecycle
    counts in prometheus_client's own file format, one writer per file;
  - `master-<pid>.json`: the live state of one master (its workers, their slots);
  - `events.jsonl` (+ `events.jsonl.1`): the journal, one JSON record per event;
  - `notes/<worker pid>`: what a worker says about itself on its way out.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

ENV = "PROMETHEUS_MULTIPROC_DIR"
DEFAULT = "/tmp/gunicorn-monitor"
OWN = "gunicorn-monitor"


class DirectoryError(Exception):
    """The shared directory is missing, unreadable, or not ours to use."""


def resolve(path: str | None = None) -> str:
    return os.path.abspath(path or os.environ.get(ENV) or DEFAULT)


@dataclass(frozen=True)
class Layout:
    root: str

    @property
    def own(self) -> str:
        return os.path.join(self.root, OWN)

    @property
    def notes(self) -> str:
        return os.path.join(self.own, "notes")

    @property
    def journal(self) -> str:
        return os.path.join(self.own, "events.jsonl")

    def master_state(self, pid: int) -> str:
        return os.path.join(self.own, f"master-{pid}.json")

    def db(self, kind: str, ident: str) -> str:
        return os.path.join(self.own, f"{kind}_{ident}.db")

    def note(self, pid: int) -> str:
        return os.path.join(self.notes, str(pid))


def create(path: str | None = None) -> Layout:
    """Create the directory tree (mode 0700) for a writer: the hooks, or mark-deploy."""
    layout = Layout(resolve(path))
    try:
        for d in (layout.root, layout.own, layout.notes):
            os.makedirs(d, mode=0o700, exist_ok=True)
    except OSError as e:
        raise DirectoryError(f"cannot create {e.filename}: {e.strerror}") from None
    return layout


RUNNING_MASTER = "GUNICORN_MONITOR_MASTER_PID"  # set by the hooks once a master runs


def create_or_exit(path: str | None = None) -> Layout:
    """For gunicorn.conf.py: an unusable directory is one line on stderr and exit status 2.

    Except in a running master re-reading its config on HUP: exiting there would take the
    whole server down. It says so in one line and goes on with the files it has open.
    """
    try:
        return create(path)
    except DirectoryError as e:
        line = f"gunicorn-monitor: {ENV}: {e}"
        if os.environ.get(RUNNING_MASTER) == str(os.getpid()):
            logging.getLogger("gunicorn.error").error("%s (kept running)", line)
            return Layout(resolve(path))
        sys.stderr.write(line + "\n")
        raise SystemExit(2) from None


def open_for_reading(path: str | None = None) -> Layout:
    """Check a directory the exporter will read; it may not have any Gunicorn data yet."""
    layout = Layout(resolve(path))
    if not os.path.isdir(layout.root):
        raise DirectoryError(f"{layout.root} is not a directory")
    if not os.access(layout.root, os.R_OK | os.X_OK):
        raise DirectoryError(f"{layout.root} is not readable")
    return layout
