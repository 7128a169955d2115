"""Dead processes' app files, folded in memory: each read once, not on every scrape.

Why: with folding off (the default, see monitor/contract/appfiles.py), dead workers' files stay
in the glob, and the stock collector reads every one of them on every scrape (211 ms at 10k);
an app recycling workers by max_requests makes that thousands within a day. A dead process
writes nothing more, so what its files hold is final for as long as its pid stays dead. Each
such file is read once and reduced (dbfile.fold, the stock collector's own reductions by file
type) into an in-memory fold, so a scrape reads only the live processes' files plus the fold.

A file joins the fold when its process is seen dead, and leaves it when it is removed or
replaced, or when its pid is given out again (`NewPids`) and the file now says something else
(a process with a reused pid writes on into the old file). Joining costs the file's entries;
leaving costs a few dozen files, not the whole fold: files are kept in buckets by pid range
(BUCKET pids each, so that pids given out in turn land in few buckets), a bucket that loses a
file is folded again from its other files, and buckets are combined in a tree of FAN children
a node, so only the changed bucket's ancestors are combined again.

Live-mode gauge files (`gauge_live*`) of a dead pid that mark_process_dead has not removed yet
fold with their mode's reduction: the stock collector serves them until they are removed.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple

from monitor.contract.appfiles import (
    AGGREGATE_ID,
    DROP,
    FOLD,
    MAX,
    MIN,
    PER_PID,
    RECENT,
    SUM,
    DbName,
)
from monitor.sidecar import dbfile
from monitor.sidecar.dbfile import Acc, Entry, Raw

BUCKET = 32  # pids a bucket holds the files of
FAN = 16  # children of a node of the tree of buckets

# How a dead process's file folds, live modes included (they are read until removed).
DEAD_FOLD = {
    **{p: how for p, how in FOLD.items() if not p.startswith("gauge_live")},
    "gauge_liveall": PER_PID,
    "gauge_livesum": SUM,
    "gauge_livemin": MIN,
    "gauge_livemax": MAX,
    "gauge_livemostrecent": RECENT,
}

# Folding on, a dead pid's live-mode gauges go as the compaction drops them (mark_process_dead).
FOLDING_ON = {**DEAD_FOLD, **{p: DROP for p in DEAD_FOLD if p.startswith("gauge_live")}}

LAST_PID = "/proc/sys/kernel/ns_last_pid"
PID_LIMIT = 1 << 31  # above any pid a file name may carry (appfiles.DbName.pid)


class Spans(NamedTuple):
    """Pids the kernel may have handed out between two looks: inclusive (low, high) ranges."""

    ranges: tuple[tuple[int, int], ...]

    def __call__(self, pid: int) -> bool:
        return any(low <= pid <= high for low, high in self.ranges)


EVERY = Spans(((0, PID_LIMIT),))
NONE = Spans(())


class NewPids:
    """Which pids the kernel may have handed out between two calls of `since()`.

    Hand-written because nothing at hand says it: the kernel allocates pids in its namespace in
    turn, each after the last one it gave (ns_last_pid), wrapping at pid_max, so every process
    started since a read of ns_last_pid has a pid in the range from it to the next read. Run in
    the app's pid namespace, which the liveness checks need anyway. Where ns_last_pid cannot be
    read, every pid may be new. (A root process may set ns_last_pid, as CRIU does to restore
    processes: a restore between two scrapes can escape this; the app index's audit finds it.)
    """

    def __init__(self) -> None:
        self._last = _read_int(LAST_PID)

    def since(self) -> Spans:
        """The pids that may belong to a process started since the last call."""
        now = _read_int(LAST_PID)
        last, self._last = self._last, now
        if now is None or last is None:
            return EVERY
        if now == last:
            return NONE
        if now > last:
            return Spans(((last + 1, now),))
        return Spans(((last + 1, PID_LIMIT), (0, now)))  # wrapped past pid_max


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
    """A file as folded: what it held then (a hash of its used bytes), to tell whether it
    still does, and which inode it was."""

    prefix: str
    ident: str
    fingerprint: int
    ino: int


def fingerprint(data: bytes) -> int:
    return hash(data)


# Reads a folded file again: its raw entries and fingerprint now, or None if it is gone,
# replaced or no longer readable (it then leaves the fold, and its owner looks at it again).
Reader = Callable[[str, Folded], tuple[list[Raw], int] | None]


class _Bucket:
    def __init__(self, position: int) -> None:
        self.position = position  # its leaf in the tree
        self.files: dict[str, Folded] = {}


class DeadFold:
    """The fold of dead processes' files (module docstring). `reread(name, folded)` reads a
    file again when its bucket is folded anew; `how` says how each file type folds (DROP:
    kept track of, never served)."""

    def __init__(self, reread: Reader, how: dict[str, str] = DEAD_FOLD) -> None:
        self.reread = reread
        self.how = how
        self._buckets: dict[int, _Bucket] = {}  # by pid // BUCKET
        self._ids: list[int] = []  # the buckets' ids, sorted
        self._where: dict[str, int] = {}  # file name -> its bucket
        self._levels: list[list[dict[str, Acc]]] = [[]]  # [0]: each bucket's fold, by prefix
        self._dirty: set[int] = set()  # leaves whose ancestors are to be combined again
        self._entries: list[tuple[DbName, list[Entry]]] | None = None
        self.reads = 0  # files read again to fold a bucket anew

    def __len__(self) -> int:
        return len(self._where)

    def get(self, name: str) -> Folded | None:
        where = self._where.get(name)
        return None if where is None else self._buckets[where].files[name]

    def names(self) -> Iterator[tuple[str, Folded]]:
        """Every folded file, by bucket in pid order."""
        for where in self._ids:
            yield from self._buckets[where].files.items()

    def pids(self, spans: Spans) -> dict[int, list[str]]:
        """The folded files of the pids in `spans`, by pid."""
        found: dict[int, list[str]] = {}
        for low, high in spans.ranges:
            ids = self._ids[
                bisect.bisect_left(self._ids, low // BUCKET) : bisect.bisect_right(
                    self._ids, high // BUCKET
                )
            ]
            for where in ids:
                for name, f in self._buckets[where].files.items():
                    if low <= int(f.ident) <= high:
                        found.setdefault(int(f.ident), []).append(name)
        return found

    def names_of(self, pid: int) -> list[str]:
        bucket = self._buckets.get(pid // BUCKET)
        if bucket is None:
            return []
        return [name for name, f in bucket.files.items() if int(f.ident) == pid]

    def add(self, name: str, pid: int, db: DbName, raw: list[Raw], data: bytes, ino: int) -> None:
        """A dead process's file joins, as read (`raw` from `data`)."""
        where = pid // BUCKET
        bucket = self._buckets.get(where)
        if bucket is None:
            bucket = self._buckets[where] = _Bucket(len(self._levels[0]))
            bisect.insort(self._ids, where)
            self._levels[0].append({})
        bucket.files[name] = Folded(db.prefix, db.ident, fingerprint(data), ino)
        self._where[name] = where
        how = self.how[db.prefix]
        if how != DROP:
            leaf = self._levels[0][bucket.position]
            dbfile.fold(leaf.setdefault(db.prefix, {}), how, db.ident, raw)
        self._dirty.add(bucket.position)
        self._entries = None

    def discard(self, names: Iterable[str]) -> list[str]:
        """These files leave; each bucket they leave is folded anew from its other files.
        Returns the names that left with them because they could not be read again."""
        touched: set[int] = set()
        for name in names:
            where = self._where.pop(name, None)
            if where is not None:
                del self._buckets[where].files[name]
                touched.add(where)
        dropped: list[str] = []
        for where in touched:
            dropped += self._refold(self._buckets[where])
        return dropped

    def _refold(self, bucket: _Bucket) -> list[str]:
        accs: dict[str, Acc] = {}
        dropped = []
        for name, was in list(bucket.files.items()):
            self.reads += 1
            now = self.reread(name, was)
            if now is None:
                del bucket.files[name]
                del self._where[name]
                dropped.append(name)
                continue
            raw, fp = now
            bucket.files[name] = was._replace(fingerprint=fp)
            how = self.how[was.prefix]
            if how != DROP:
                dbfile.fold(accs.setdefault(was.prefix, {}), how, was.ident, raw)
        self._levels[0][bucket.position] = accs
        self._dirty.add(bucket.position)
        self._entries = None
        return dropped

    def _settle(self) -> None:
        """Combine again the ancestors of the leaves that changed, level by level: once a
        node, however many of its leaves changed."""
        if not self._dirty:
            return
        changed, k = self._dirty, 0
        self._dirty = set()
        while len(self._levels[k]) > 1:
            if k + 1 == len(self._levels):
                self._levels.append([])
            above = self._levels[k + 1]
            parents = {i // FAN for i in changed}
            for parent in sorted(parents):
                node = _combine(self._levels[k][parent * FAN : (parent + 1) * FAN], self.how)
                if parent < len(above):
                    above[parent] = node
                else:
                    above.append(node)  # in order: the leaves grow at the end
            changed, k = parents, k + 1

    def entries(self) -> list[tuple[DbName, list[Entry]]]:
        """One aggregate per file type, as if read from `<prefix>_aggregate.db`."""
        self._settle()
        if self._entries is None:
            levels = [level for level in self._levels if level]
            top = levels[-1][0] if levels else {}
            self._entries = [
                (_aggregate(prefix), [_entry(key, v, ts) for key, (v, ts) in acc.items()])
                for prefix, acc in top.items()
                if acc
            ]
        return self._entries


def _combine(nodes: list[dict[str, Acc]], how: dict[str, str]) -> dict[str, Acc]:
    out: dict[str, Acc] = {}
    for node in nodes:
        for prefix, acc in node.items():
            dbfile.merge(out.setdefault(prefix, {}), how[prefix], acc)
    return out


def _aggregate(prefix: str) -> DbName:
    typ, _, mode = prefix.partition("_")
    return DbName(prefix, typ, mode, AGGREGATE_ID)


def _entry(key: str, value: float, timestamp: float) -> Entry:
    # Every key folded was parsed when its file was read (or is one fold() made from one).
    return Entry(key, *dbfile.parsed(key), value, timestamp)


def foldable(db: DbName | None) -> bool:
    """A process's file whose entries are final once the process is dead."""
    return db is not None and db.pid is not None and db.prefix in DEAD_FOLD
