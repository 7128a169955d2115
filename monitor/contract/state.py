"""The live state of each master: which workers it runs, in which slots, and how many it wants.

One small JSON file per master, replaced atomically on every change, so a reader always sees
a whole state. A master is live only while its pid runs *and* was started when the file says:
a stale file whose pid was reused by an unrelated process reads as dead.
"""

from __future__ import annotations

import errno
import glob
import json
import os
import re
from dataclasses import dataclass

import psutil

from monitor.contract.directory import Layout, open_private


def write(layout: Layout, ident: str, state: dict, dir_fd: int | None = None) -> tuple[int, int]:
    """Replace the state file of the incarnation `ident` (contract/incarnation.py) atomically;
    returns its (st_dev, st_ino), for the writer to notice when it is later removed or replaced.

    Written relative to the checked `dir_fd` of `gunicorn-monitor/` (opened here when not
    given), never following a symlink: a temporary file created O_EXCL, then renamed.
    """
    if dir_fd is None:
        own = open_private(layout, create=True)
        try:
            return write(layout, ident, state, own)
        finally:
            os.close(own)
    name = os.path.basename(layout.master_state(ident))
    tmp = f"{name}.{os.getpid()}.tmp"
    data = json.dumps(state, separators=(",", ":")).encode()
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        os.unlink(tmp, dir_fd=dir_fd)  # left by a crash
    except FileNotFoundError:
        pass
    fd = os.open(tmp, flags, 0o600, dir_fd=dir_fd)
    try:
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            st = os.fstat(fd)
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise
    return st.st_dev, st.st_ino


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


def names_live_pid(text: str) -> bool:
    """A file named for a pid: is it a pid, and does that process exist (a zombie does)?"""
    try:
        return pid_exists(int(text))
    except ValueError:
        return False


def is_running(pid: int, started: float) -> bool:
    """True if `pid` is the process that started at `started` (seconds) and is not a zombie."""
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(proc.create_time() - started) < 1.0
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


# What a reader accepts. Every value below may become a label or a pid the sidecar acts on, so
# anything outside these bounds about the master makes the whole file malformed (skipped and
# counted); a worker entry outside them (a slot past the cap, a pid that cannot be a worker's)
# costs only that worker (Master.rejected).
MAX_PID = 1 << 22  # the kernel's pid_max limit
MAX_WORKERS = 10_000
# Slots are handed out lowest-free, so they stay below the most workers a master ever ran at
# once; a scale-down retires the oldest workers and may leave a high slot with fewer workers
# desired. A slot is served below max(workers_desired, SLOT_CAP): bounded, and roomy enough.
SLOT_CAP = 64
_VERSION = re.compile(r"[0-9][0-9A-Za-z.+!-]{0,31}")  # PEP 440, bounded
_WORKER_CLASS = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,7}")
# master-<pid>.json (earlier versions) or master-<pid>-<start>-<pid namespace>.json
_NAME = re.compile(r"master-([0-9]{1,7})(?:-[0-9]{1,20}-[0-9]{1,20})?\.json")


class Malformed(ValueError):
    """A state file that does not say what the contract says it must."""


@dataclass(frozen=True)
class Worker:
    pid: int
    slot: int
    spawned: float | None


@dataclass
class Master:
    pid: int
    start_time: float
    alive: bool
    version: str = ""
    worker_class: str = ""
    workers_desired: int = 0
    workers: tuple[Worker, ...] = ()  # as recorded; see Children for which ones are real
    rejected: int = 0  # worker entries left out: a bad pid, slot or spawn time
    stuck_booting: int = 0  # workers booting for longer than `timeout` (hooks/watch.py)

    @property
    def slot_cap(self) -> int:
        return max(self.workers_desired, SLOT_CAP)


def read(layout: Layout) -> tuple[list[Master], int]:
    """Every recorded master whose file is well formed, and the number of files that were not
    (unreadable or malformed); see `read_all`."""
    masters, malformed, unreadable = read_all(layout)
    return masters, malformed + unreadable


def read_all(layout: Layout) -> tuple[list[Master], int, int]:
    """Every recorded master whose file is well formed; how many files were malformed; how
    many could not be read at all.

    A malformed file (or one saying anything outside the contract) is skipped whole: it says
    nothing about the other masters. A file that cannot be read may be a live master's, so a
    reader that would count masters or workers must not answer (a gap, not a zero).
    """
    masters, malformed, unreadable = [], 0, 0
    for path in sorted(glob.glob(os.path.join(layout.own, "master-*.json"))):
        name = _NAME.fullmatch(os.path.basename(path))
        if name is None:  # not master-<ident>.json
            malformed += 1
            continue
        try:
            with open(path, "rb") as f:
                data = f.read(1 << 20)
        except FileNotFoundError:
            continue  # the master removed it, or replaced it between glob and open
        except OSError:
            unreadable += 1
            continue
        try:
            masters.append(parse(json.loads(data), int(name.group(1))))
        except ValueError:  # Malformed, JSONDecodeError, UnicodeDecodeError
            malformed += 1
    return masters, malformed, unreadable


def _number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value == value:
        raise Malformed(f"{what} is not a number")
    if not 0 < value < 1e11:
        raise Malformed(f"{what} out of range")
    return float(value)


def _int(value: object, what: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value < high:
        raise Malformed(f"{what} is not an integer in [{low}, {high})")
    return value


def parse(raw: object, file_pid: int) -> Master:
    """A Master from one decoded state file, validated; Malformed otherwise."""
    if not isinstance(raw, dict):
        raise Malformed("not an object")
    pid = _int(raw.get("pid"), "pid", 1, MAX_PID)
    if pid != file_pid:
        raise Malformed("pid differs from the file name")
    start_time = _number(raw.get("start_time"), "start_time")
    stopped = raw.get("stopped", False)
    version, worker_class = raw.get("version", ""), raw.get("worker_class", "")
    if not isinstance(stopped, bool):
        raise Malformed("stopped is not a boolean")
    if not isinstance(version, str) or not _VERSION.fullmatch(version):
        raise Malformed("version")
    if not isinstance(worker_class, str) or not _WORKER_CLASS.fullmatch(worker_class):
        raise Malformed("worker_class")
    desired = _int(raw.get("workers_desired", 0), "workers_desired", 0, MAX_WORKERS)
    recorded = raw.get("workers", {})
    if not isinstance(recorded, dict) or len(recorded) > MAX_WORKERS:
        raise Malformed("workers is not an object")
    master = Master(pid, start_time, False, version, worker_class, desired)
    workers = []
    for key, info in recorded.items():
        try:
            workers.append(_worker(key, info, master.slot_cap))
        except Malformed:
            master.rejected += 1
    master.workers = tuple(workers)
    master.stuck_booting = _int(raw.get("workers_stuck_booting", 0), "stuck", 0, MAX_WORKERS)
    master.alive = not stopped and is_running(pid, start_time)
    return master


def _worker(key: object, info: object, slot_cap: int) -> Worker:
    if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 8):
        raise Malformed("a worker pid is not a number")
    if not isinstance(info, dict):
        raise Malformed("a worker is not an object")
    pid = _int(int(key), "worker pid", 2, MAX_PID)  # pid 1 is init, never a worker
    slot = _int(info.get("slot"), "slot", 0, slot_cap)
    spawned = info.get("spawned")
    return Worker(pid, slot, None if spawned is None else _number(spawned, "spawned"))


class Children:
    """Which of the workers a master's file lists are live children of that master.

    The file is data, not truth: a pid in it is served only while that process exists and
    its parent is the master (psutil's ppid). The answer for a pid is kept while the file
    still lists it, so a scrape costs one kill(0) per worker, not a /proc read.
    `rejected` counts, on every call, the pids that are alive but not the master's children.
    """

    def __init__(self) -> None:
        self.rejected = 0
        self._known: dict[tuple[int, float, int], bool] = {}

    def live(self, masters: list[Master]) -> dict[int, list[Worker]]:
        """{master pid: its live workers} for the live masters."""
        found: dict[int, list[Worker]] = {}
        known = {}
        for m in masters:
            if not m.alive:
                continue
            found[m.pid] = []
            for w in m.workers:
                if not pid_exists(w.pid):
                    continue  # exited; the master rewrites its file at the end of its loop turn
                key = (m.pid, m.start_time, w.pid)
                ok = self._known.get(key)
                if ok is None:
                    ok = _parent(w.pid) == m.pid
                self.rejected += not ok
                known[key] = ok
                if ok:
                    found[m.pid].append(w)
        self._known = known
        return found


def _parent(pid: int) -> int | None:
    try:
        return psutil.Process(pid).ppid()
    except (psutil.Error, OSError):
        return None
