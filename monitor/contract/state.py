"""The live state of each master: which workers it runs, in which slots, and how many it wants.

One small JSON file per master, replaced atomically on every change, so a reader always sees
a whole state. A master is live only while its pid runs, is not a zombie, *and* was started
when the file says: a stale file whose pid was reused by an unrelated process reads as dead.
"When" is the process's start in /proc (`start_ticks`, clock ticks after boot; per worker,
`ticks`), which no step of the wall clock moves; files of earlier versions have only the
wall-clock `start_time`, compared within a second.

Who writes a master's files. `counter_<pid>.db`, `histogram_<pid>.db` and `gauge_max_<pid>.db`
have one writer at a time: whoever holds LOCK_EX on `heartbeat/<pid>` (flock, always taken with
LOCK_NB: nobody ever waits for it). That is the master itself for its whole life (it takes the
lock before it adopts or writes its counts; hooks/beat.py), then, after it died without saying
`stopped`, the one master that claimed its orphans (hooks/orphans.py), which counts them into
those same files until none is owed.

A dead master's state file is kept until its workers are accounted for. A state file that says
`"stopped": true` is accounted for: the master counted every worker at its on_exit, or the
master that claimed its orphans counted them and then marked it so. A state file whose master
is dead and that does not say `stopped` is owed exits: keep it, and the files above, until a
master claims it (every live master looks every few seconds). Whoever retires a dead master's
files (folds its counts elsewhere, removes them) does it only for a state file that says
`stopped` (or a pid with no state file), and only while holding LOCK_EX | LOCK_NB on
`heartbeat/<pid>` (created if missing; it removes the file before letting go), so that no
claimant and no new master given the same pid writes them meanwhile.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

import psutil

from monitor.contract.directory import (
    HEARTBEATS,
    Layout,
    open_file,
    open_own_for_reading,
    open_private,
    replace_file,
)

TICKS = os.sysconf("SC_CLK_TCK")  # /proc's start times are in these


def write(layout: Layout, pid: int, state: dict, dir_fd: int | None = None) -> tuple[int, int]:
    """Replace the state file atomically; returns its (st_dev, st_ino), for the writer to notice
    when it is later removed or replaced.

    Written relative to the checked `dir_fd` of `gunicorn-monitor/` (opened here when not
    given), never following a symlink: a temporary file created O_EXCL, then renamed.
    """
    if dir_fd is None:
        own = open_private(layout, create=True)
        try:
            return write(layout, pid, state, own)
        finally:
            os.close(own)
    name = os.path.basename(layout.master_state(pid))
    data = json.dumps(state, separators=(",", ":")).encode()
    # The temporary's name is the one retirement knows a crash may leave (sidecar/retirement.py).
    return replace_file(dir_fd, name, data, tmp=f"{name}.{os.getpid()}.tmp")


def process_start_time(pid: int) -> float | None:
    """Wall-clock start (psutil), for display only: it moves with the wall clock (psutil adds
    the boot time as of its first call), so it never says which process a pid is."""
    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


@dataclass(frozen=True)
class Proc:
    """What /proc/<pid>/stat says of a process: its state letter, its parent, and its start in
    clock ticks after boot, which no clock step moves: with the pid, who the process is."""

    state: str
    ppid: int
    ticks: int

    @property
    def dead(self) -> bool:
        """A zombie (exited, not yet reaped) or a process being torn down: not running."""
        return self.state in ("Z", "X", "x")

    @property
    def stopped(self) -> bool:
        """Stopped by a signal (SIGSTOP, SIGTSTP: `T`) or by a tracer (`t`)."""
        return self.state in ("T", "t")


def proc(pid: int) -> Proc | None:
    """/proc/<pid>/stat, read once; None when the process is gone (or cannot be read)."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return proc_of(fd)
    finally:
        os.close(fd)


def proc_of(fd: int) -> Proc | None:
    """What an open /proc/<pid>/stat says now; None once its process is gone (a kept file
    answers for the process it was opened for only: ESRCH after, even if the pid is reused)."""
    try:
        data = os.pread(fd, 4096, 0)
    except OSError:
        return None
    # Split after the last ")": the command name before it may hold one.
    fields = data[data.rfind(b")") + 2 :].split()
    try:
        return Proc(fields[0].decode("ascii", "replace"), int(fields[1]), int(fields[19]))
    except (IndexError, ValueError):
        return None


def running(pid: int) -> bool:
    """The process exists and is not a zombie (one read of /proc, where kill(0) is cheaper but
    counts a zombie)."""
    found = proc(pid)
    return found is not None and not found.dead


def start_ticks(pid: int) -> int | None:
    found = proc(pid)
    return found.ticks if found is not None else None


def boot_seconds() -> float:
    """Now, on the clock /proc's start ticks count on (seconds since boot, suspend included)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def age_of(ticks: int) -> float:
    """Seconds since a process started, from its start ticks: no wall clock involved."""
    return max(0.0, boot_seconds() - ticks / TICKS)


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


def is_running(pid: int, started: float, ticks: int | None = None) -> bool:
    """True if `pid` is the process that started at `ticks` (its /proc start, clock ticks after
    boot) and is not a zombie. Without `ticks` (a state file of an earlier version), by the
    wall-clock `started` (seconds), which a clock step between two processes' reads defeats."""
    if ticks is not None:
        found = proc(pid)
        return found is not None and not found.dead and found.ticks == ticks
    try:
        p = psutil.Process(pid)
        if p.status() == psutil.STATUS_ZOMBIE:
            return False
        return abs(p.create_time() - started) < 1.0
    except (psutil.Error, OSError):
        return False


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
MAX_TICKS = 1 << 62
_VERSION = re.compile(r"[0-9][0-9A-Za-z.+!-]{0,31}")  # PEP 440, bounded
_WORKER_CLASS = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}(\.[A-Za-z_][A-Za-z0-9_]{0,63}){0,7}")
_NAME = re.compile(r"master-([0-9]{1,7})\.json")


class Malformed(ValueError):
    """A state file that does not say what the contract says it must."""


@dataclass(frozen=True)
class Worker:
    pid: int
    slot: int
    spawned: float | None  # wall clock, for display
    ticks: int | None = None  # its /proc start: who the pid is (None from earlier versions)


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
    start_ticks: int | None = None  # its /proc start: who the pid is (None from earlier versions)
    stopped: bool = False  # said so itself at on_exit, or its orphans were accounted for
    forged: bool = False  # names a running process the kernel says is not this master

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
    reader that would count masters or workers must not answer (a gap, not a zero); a
    directory that fails the readers' check (a symlink, another user's: swapped under us) is
    such a gap too. Everything is read relative to the checked fd of `gunicorn-monitor/`, never
    through a symlink, and a master is alive only if the kernel says it is that master
    (`Genuine`): a file naming an unrelated process is `forged`.
    """
    try:
        own = open_own_for_reading(layout)
    except FileNotFoundError:
        return [], 0, 0
    except OSError:
        return [], 0, 1
    masters, malformed, unreadable = [], 0, 0
    try:
        genuine = Genuine(own)
        for name in sorted(_state_names(own)):
            master = read_file(own, name)
            if master is None:
                continue  # the master removed it, or replaced it between listing and open
            if master == MALFORMED:
                malformed += 1
                continue
            if master == UNREADABLE:
                unreadable += 1
                continue
            assert isinstance(master, Master)
            if master.alive and not genuine(master.pid):
                master.alive, master.forged = False, True
            masters.append(master)
    except OSError:
        return [], malformed, unreadable + 1
    finally:
        os.close(own)
    return masters, malformed, unreadable


MALFORMED, UNREADABLE = "malformed", "unreadable"


def read_file(own_fd: int, name: str) -> Master | str | None:
    """What the state file `name` of the checked fd `own_fd` says: a Master (its liveness by
    /proc, not yet by Genuine), MALFORMED (not master-<pid>.json, or outside the contract),
    UNREADABLE, or None when it is gone. Opened with O_NOFOLLOW, never through a symlink."""
    found = _NAME.fullmatch(name)
    if found is None:
        return MALFORMED
    try:
        fd = open_file(own_fd, name)
    except FileNotFoundError:
        return None
    except OSError:
        return UNREADABLE
    try:
        data = os.read(fd, 1 << 20)
    except OSError:
        return UNREADABLE
    finally:
        os.close(fd)
    try:
        return parse(json.loads(data), int(found.group(1)))
    except ValueError:  # Malformed, JSONDecodeError, UnicodeDecodeError
        return MALFORMED


def _state_names(own_fd: int) -> list[str]:
    """The names a `master-*.json` glob matches, in the directory `own_fd`."""
    return [n for n in os.listdir(own_fd) if n.startswith("master-") and n.endswith(".json")]


class Genuine:
    """Is a live pid a state file names really the master that wrote it? What the directory
    says is checked against the kernel before anyone serves or samples it:

    - the process's effective uid is the owner of `gunicorn-monitor/` (a master makes its
      directory itself and writes only into one of its own: contract/directory.py);
    - it holds the flock on `heartbeat/<pid>` in that very directory (a master takes it before
      it writes its state, and keeps it for its life: "Who writes a master's files" above),
      or, while another master counts its predecessor's orphans, a process of that owner does.
      Checked in /proc/locks, by the inode the directory's fd leads to. A reader that may not
      search `heartbeat/` (a sidecar of another uid than a root Gunicorn's) has only the uid.

    Its start ticks were compared by `parse` already. One read of /proc/locks per call of
    `read_all` that finds a live master, one of /proc/<pid>/status per such master.
    """

    def __init__(self, own_fd: int) -> None:
        self.owner = os.fstat(own_fd).st_uid
        self._own = own_fd
        self._locks: dict[tuple[int, int, int], set[int]] | None = None

    def __call__(self, pid: int) -> bool:
        if euid(pid) != self.owner:
            return False
        try:
            st = os.stat(f"{HEARTBEATS}/{pid}", dir_fd=self._own, follow_symlinks=False)
        except PermissionError:
            return True  # heartbeat/ is not ours to search: the uid is all we can tell
        except OSError:
            return False  # no heartbeat: not a master of ours (it takes the lock first)
        if self._locks is None:
            self._locks = flocks()
        holders = self._locks.get((os.major(st.st_dev), os.minor(st.st_dev), st.st_ino), set())
        return pid in holders or any(euid(h) == self.owner for h in holders)


def flocks() -> dict[tuple[int, int, int], set[int]]:
    """/proc/locks' FLOCK entries held (not waited for): {(major, minor, inode): pids}."""
    found: dict[tuple[int, int, int], set[int]] = {}
    try:
        with open("/proc/locks", "rb") as f:  # the kernel's own file, never the directory's
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[1] != b"FLOCK":  # "->" marks a waiter
            continue
        try:
            major, minor, ino = fields[5].split(b":")
            key = (int(major, 16), int(minor, 16), int(ino))
            found.setdefault(key, set()).add(int(fields[4]))
        except ValueError:
            continue
    return found


def euid(pid: int) -> int | None:
    """The effective uid of a running process (/proc/<pid>/status), None when gone."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:  # the kernel's own file
            for line in f:
                if line.startswith(b"Uid:"):
                    return int(line.split()[2])
    except (OSError, IndexError, ValueError):
        return None
    return None


def load(dir_fd: int, pid: int) -> tuple[dict, Master] | None:
    """One master's state file, read relative to the checked fd of `gunicorn-monitor/`: the
    decoded object and the Master it says, or None (missing, unreadable or malformed)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
    try:
        fd = os.open(f"master-{pid}.json", flags, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        data = os.read(fd, 1 << 20)
        raw = json.loads(data)
        return raw, parse(raw, pid)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


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
    ticks = raw.get("start_ticks")
    master.start_ticks = None if ticks is None else _int(ticks, "start_ticks", 0, MAX_TICKS)
    master.stopped = stopped
    master.alive = not stopped and is_running(pid, start_time, master.start_ticks)
    return master


def _worker(key: object, info: object, slot_cap: int) -> Worker:
    if not (isinstance(key, str) and key.isascii() and key.isdigit() and len(key) < 8):
        raise Malformed("a worker pid is not a number")
    if not isinstance(info, dict):
        raise Malformed("a worker is not an object")
    pid = _int(int(key), "worker pid", 2, MAX_PID)  # pid 1 is init, never a worker
    slot = _int(info.get("slot"), "slot", 0, slot_cap)
    spawned = info.get("spawned")
    ticks = info.get("ticks")
    return Worker(
        pid,
        slot,
        None if spawned is None else _number(spawned, "spawned"),
        None if ticks is None else _int(ticks, "ticks", 0, MAX_TICKS),
    )


class Children:
    """Which of the workers a master's file lists are live children of that master.

    The file is data, not truth: a pid in it is served only while that process runs (a zombie,
    exited and not yet reaped, does not: a stopped master reaps nothing), was started when the
    file says (where it says), and its parent is the master. One read of /proc/<pid>/stat a
    worker. `rejected` counts, on every call, the pids that run but are not the master's.
    """

    def __init__(self) -> None:
        self.rejected = 0

    def live(
        self, masters: list[Master], known: Callable[[Worker], bool] | None = None
    ) -> dict[int, list[Worker]]:
        """{master pid: its live workers} for the live masters. A worker `known` says the
        caller checked before, and checks again on its own, is taken without a read."""
        found: dict[int, list[Worker]] = {}
        for m in masters:
            if not m.alive:
                continue
            found[m.pid] = []
            for w in m.workers:
                if known is not None and known(w):
                    found[m.pid].append(w)
                    continue
                p = proc(w.pid)
                if p is None or p.dead:
                    continue  # exited; the master rewrites its file at the end of its loop turn
                ok = p.ppid == m.pid and (w.ticks is None or w.ticks == p.ticks)
                self.rejected += not ok
                if ok:
                    found[m.pid].append(w)
        return found
