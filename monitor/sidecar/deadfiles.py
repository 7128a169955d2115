"""Dead workers' app files, folded in memory: each read once, not on every scrape.

Why: with folding off (the default, see monitor/contract/appfiles.py), dead workers' files stay
in the glob, and the stock collector reads every one of them on every scrape (211 ms at 10k);
an app recycling workers by max_requests makes that thousands within a day. A dead process
writes nothing more, so what its files hold is final for as long as its pid stays dead. This
reads each such file once and folds it into one in-memory aggregate per file type, with
compaction's own reductions (compaction.fold_into), so a scrape reads only the live workers'
files plus these aggregates, and moves no file.

The fold is made again from the files when one it holds is gone or replaced (another inode), or
its pid may have been given out again since the last scrape: a process with a reused pid writes
on into the old file, and may live and die between two scrapes, so being dead at both says
nothing. The kernel hands out pids in turn (`NewPids`), so "given out since" is a range, one
read of /proc a scrape, not a read of every file. (So a dead worker's file written over in
place by anything else is not read again: nothing in the contract does that.)

Live-mode gauges (`gauge_live*`) are never folded: the stock collector serves a dead pid's
until mark_process_dead removes them, and so do we.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import NamedTuple

from monitor.contract.appfiles import AGGREGATE_ID, DROP, FOLD, DbName
from monitor.contract.store import parse_key
from monitor.sidecar import compaction
from monitor.sidecar.compaction import Acc, BadFile, Entry


def foldable(db: DbName | None) -> bool:
    """A process's file whose entries are final once the process is dead."""
    return db is not None and db.pid is not None and FOLD.get(db.prefix, DROP) != DROP


LAST_PID = "/proc/sys/kernel/ns_last_pid"


class NewPids:
    """Which pids the kernel may have handed out between two calls of `since()`.

    Hand-written because nothing at hand says it: the kernel allocates pids in its namespace in
    turn, each after the last one it gave (ns_last_pid), wrapping at pid_max, so every process
    started since a read of ns_last_pid has a pid in the range from it to the next read. Run in
    the app's pid namespace, which the liveness checks need anyway. Where ns_last_pid cannot be
    read, every pid may be new. (A root process may set ns_last_pid, as CRIU does to restore
    processes: a restore between two scrapes can escape this.)
    """

    def __init__(self) -> None:
        self._last = _read_int(LAST_PID)

    def since(self) -> Callable[[int], bool]:
        """A test for "may this pid belong to a process started since the last call?"."""
        now = _read_int(LAST_PID)
        last, self._last = self._last, now
        if now is None or last is None:
            return _anything
        if now == last:
            return _nothing
        if now > last:
            return lambda pid: last < pid <= now
        return lambda pid: pid > last or pid <= now  # wrapped past pid_max


def _anything(pid: int) -> bool:
    return True


def _nothing(pid: int) -> bool:
    return False


def _read_int(path: str) -> int | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return int(os.read(fd, 32))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


class Folded(NamedTuple):
    read: int  # files read (and folded) by this update
    bad: list[str]  # files that could not be read: left to the caller's own read and counting
    vanished: bool  # a file went between the listing and its read


class DeadFiles:
    """The in-memory fold of a directory's dead workers' files (module docstring)."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._inodes: dict[str, tuple[int, int | None]] = {}  # name -> inode, pid: the fold's
        self._accs: dict[str, Acc] = {}  # by file type (prefix)
        self._entries: list[tuple[DbName, list[Entry]]] | None = None

    def update(self, dead: dict[str, tuple[int, DbName]], reused: Callable[[int], bool]) -> Folded:
        """Fold the dead files (name -> inode, decoded name) not yet folded; start over if one
        folded is no longer among them, or its pid may have been `reused` since the last call.

        Take `reused` (NewPids.since) before judging the pids dead, so that it covers every
        process started after this fold's reads."""
        if any(
            dead.get(name, (None,))[0] != inode or pid is None or reused(pid)
            for name, (inode, pid) in self._inodes.items()
        ):
            self._inodes, self._accs, self._entries = {}, {}, None
        read, bad, vanished = 0, [], False
        for name, (inode, db) in dead.items():
            if name in self._inodes:
                continue
            try:
                entries = compaction.read_entries(os.path.join(self.path, name))
            except FileNotFoundError:
                vanished = True
                continue
            except BadFile:
                bad.append(name)
                continue
            compaction.fold_into(self._accs.setdefault(db.prefix, {}), FOLD[db.prefix], db, entries)
            self._inodes[name] = (inode, db.pid)
            self._entries = None
            read += 1
        return Folded(read, bad, vanished)

    def entries(self) -> list[tuple[DbName, list[Entry]]]:
        """One aggregate per file type, as if read from `<prefix>_aggregate.db`."""
        if self._entries is None:
            self._entries = [
                (_aggregate(prefix), [_entry(key, v, ts) for key, (v, ts) in acc.items()])
                for prefix, acc in self._accs.items()
            ]
        return self._entries


def _aggregate(prefix: str) -> DbName:
    typ, _, mode = prefix.partition("_")
    return DbName(prefix, typ, mode, AGGREGATE_ID)


def _entry(key: str, value: float, timestamp: float) -> Entry:
    metric_name, name, labels, help_text = parse_key(key)
    return Entry(key, metric_name, name, labels, help_text, value, timestamp)
