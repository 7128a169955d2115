"""The live state of each master: which workers it runs, in which slots, and how many it wants.

One small JSON file per master, replaced atomically on every change, so a reader always sees
a whole state. A master is live only while its pid runs *and* was started when the file says:
a stale file whose pid was reused by an unrelated process reads as dead.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass

import psutil

from monitor.contract.directory import Layout


def write(layout: Layout, pid: int, state: dict) -> None:
    path = layout.master_state(pid)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, separators=(",", ":"))
    os.replace(tmp, path)


def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def pid_exists(pid: int) -> bool:
    """Cheap existence check (a zombie still counts): psutil's own reads /proc, ten times slower."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def is_running(pid: int, started: float | None) -> bool:
    """True if `pid` is the process that started at `started` (seconds) and is not a zombie."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 1.0
    except (psutil.Error, OSError):
        return False


def last_change(layout: Layout) -> float:
    """When any master last recorded a change of its workers (newest state file mtime)."""
    newest = 0.0
    for path in glob.glob(os.path.join(layout.own, "master-*.json")):
        try:
            newest = max(newest, os.stat(path).st_mtime)
        except OSError:
            pass
    return newest


@dataclass
class Master:
    pid: int
    state: dict
    alive: bool


def read(layout: Layout) -> tuple[list[Master], int]:
    """Every recorded master, and the number of state files that could not be read."""
    masters, bad = [], 0
    for path in glob.glob(os.path.join(layout.own, "master-*.json")):
        try:
            with open(path) as f:
                state = json.load(f)
            pid = int(state["pid"])
        except FileNotFoundError:
            continue
        except (OSError, ValueError, KeyError, TypeError):
            bad += 1
            continue
        alive = not state.get("stopped") and is_running(pid, state.get("start_time"))
        masters.append(Master(pid, state, alive))
    return masters, bad
