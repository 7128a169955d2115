"""Which master process wrote a file, and whether that very process still runs.

A master names its files (`counter_<ident>.db`, `master-<ident>.json`, ...) for its
*incarnation*: `<pid>-<start>-<pidns>`, its pid, its start time in clock ticks since boot
(/proc/<pid>/stat field 22) and the inode of its pid namespace. No two processes alive at once
share all three, and a process that later gets the same pid has another start time, so:

- a file is written by one incarnation only, for its whole life: no master ever continues an
  earlier master's file because the kernel gave it the same pid (earlier versions named files by
  pid alone, and a new master adopted its predecessor's);
- once that incarnation is gone, nothing writes its files again, so the sidecar may fold them
  into its aggregate and remove them (monitor/sidecar/retirement.py) without racing a writer;
- whether it is gone can be told from the name, by a reader in the same pid namespace: the pid
  has no process, or one started at another tick, or a zombie. A reader in another namespace
  cannot tell (the pid means another process there), and never judges.

A namespace's inode number may be given to a new namespace once the old one is gone, and start
ticks restart at a reboot; a file of a gone namespace is then judged in the new one, where its
pid names another process or none: gone either way, unless pid and start tick both match (the
same tick of the same pid in a new boot or namespace), which is not a case to design for.

Earlier versions named files `<pid>` alone (`Incarnation.start` is None): such a file is
judged gone only when its pid runs no process, or one started at another time than its state
file says, and only by a reader that sees a running incarnation of its own namespace named in
the same directory (see `Judge`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import NamedTuple

import psutil

_IDENT = re.compile(r"([0-9]{1,7})(?:-([0-9]{1,20})-([0-9]{1,20}))?")
_STATE_FILE = re.compile(r"master-([0-9-]{1,50})\.json")


class Incarnation(NamedTuple):  # a tuple: hashed in C, for listings of thousands of them
    pid: int
    start: int | None  # clock ticks since boot; None for a file named by an earlier version
    namespace: int | None  # inode of its pid namespace

    def __str__(self) -> str:
        if self.start is None:
            return str(self.pid)
        return f"{self.pid}-{self.start}-{self.namespace}"


def parse(ident: str) -> Incarnation | None:
    """The incarnation a file identifier names, or None (`deploy`, anything else)."""
    found = _IDENT.fullmatch(ident)
    if found is None or not 0 < int(found.group(1)) < 1 << 22:
        return None
    if found.group(2) is None:
        return Incarnation(int(found.group(1)), None, None)
    return Incarnation(int(found.group(1)), int(found.group(2)), int(found.group(3)))


def of_state_file(name: str) -> Incarnation | None:
    """The incarnation whose state file (`master-<ident>.json`) this is, or None."""
    if not name.startswith("master-"):  # most names: no regex needed
        return None
    found = _STATE_FILE.fullmatch(name)
    return parse(found.group(1)) if found is not None else None


def namespace() -> int | None:
    """The inode of this process's pid namespace, or None where /proc cannot say."""
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return None


def start_ticks(pid: int) -> int | None:
    """When `pid` started, in clock ticks since boot; None if it has no process, or a zombie."""
    try:
        os.kill(pid, 0)  # a tenth of what a failed open of /proc/<pid>/stat costs
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    # Fields after the command name, which may itself hold ")" and spaces.
    fields = data[data.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] == b"Z":
        return None
    try:
        return int(fields[19])
    except ValueError:
        return None


def own() -> Incarnation:
    """This process's incarnation: the name of every file a master writes."""
    pid = os.getpid()
    start, ns = start_ticks(pid), namespace()
    if start is None or ns is None:  # no /proc: named as earlier versions did
        return Incarnation(pid, None, None)
    return Incarnation(pid, start, ns)


class Judge:
    """Which of the incarnations named in one listing of the directory are gone.

    `gone(inc)` is True only where this reader can tell: the incarnation is of this reader's
    pid namespace and its process is not running; or it is named by an earlier version and
    the listing also names a running incarnation of this reader's namespace (then the
    directory's masters run here). Each answer costs at most one read of /proc/<pid>/stat
    (legacy names: a kill(0), and psutil where their state file said when they started).
    """

    def __init__(
        self,
        incarnations: Iterable[Incarnation],
        legacy_start: dict[int, float] | None = None,
        known_gone: set[Incarnation] | frozenset[Incarnation] = frozenset(),
    ) -> None:
        """`known_gone`: incarnations (with a start time) an earlier Judge found gone; they
        stay gone (no process gets a pid and start tick back), so they are not read again."""
        self.namespace = namespace()
        self._legacy_start = legacy_start or {}
        self._running: dict[Incarnation, bool | None] = {}
        found = set(incarnations)
        for inc in found:
            if inc.start is not None:
                self._running[inc] = False if inc in known_gone else self._judge(inc)
        self.proven = any(self._running.values())
        for inc in found:
            if inc.start is None:
                self._running[inc] = _legacy_running(inc.pid, self._legacy_start.get(inc.pid))

    def _judge(self, inc: Incarnation) -> bool | None:
        if self.namespace is None or inc.namespace != self.namespace:
            return None  # its pid names another process here, or none: not ours to tell
        return start_ticks(inc.pid) == inc.start

    def running(self, inc: Incarnation) -> bool | None:
        """True or False where this reader can tell, None where it cannot."""
        if inc not in self._running:
            self._running[inc] = (
                self._judge(inc)
                if inc.start is not None
                else _legacy_running(inc.pid, self._legacy_start.get(inc.pid))
            )
        return self._running[inc]

    def gone_now(self) -> set[Incarnation]:
        """The incarnations with a start time this Judge found gone (for `known_gone`)."""
        return {i for i, running in self._running.items() if running is False and i.start}

    def gone(self, inc: Incarnation) -> bool:
        if self.running(inc) is not False:
            return False
        return inc.start is not None or self.proven


def _legacy_running(pid: int, started: float | None) -> bool:
    """A master of an earlier version: its pid runs, and (if its state file said when it
    started) that process started then, within the second psutil rounds to."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    if started is None:
        return True  # cannot tell it from a stranger with its pid: taken as running
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and abs(proc.create_time() - started) < 1.0
    except (psutil.Error, OSError):
        return False
