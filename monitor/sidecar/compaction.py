"""Compaction of dead workers' prometheus_client multiprocess files into aggregate files.

Why: the stock `MultiProcessCollector` re-reads every `.db` file ever written, on every scrape,
so scrape time grows with every worker that ever lived (20 ms at 1k dead workers, 211 ms at
10k), and one unreadable file fails the whole scrape (client_python#1199). prometheus_client has
no compaction (it was refused upstream as unsafe: pid reuse, no locking, gauges), so this module
provides it, with those three objections designed out.

Directory layout (DIR is the shared PROMETHEUS_MULTIPROC_DIR; only its top level is ours):

    DIR/<type>_<pid>.db, DIR/gauge_<mode>_<pid>.db   written by app processes (prometheus_client)
    DIR/<type>_aggregate.db, DIR/gauge_<mode>_aggregate.db
                                                     everything dead workers left, folded
    DIR/.compacting/staged/<token>~<name>.db         dead workers' files, out of the *.db glob
    DIR/.compacting/next/                            aggregates being built by the current fold
    DIR/.compacting/COMMIT                           the journal: exists from commit to cleanup
    DIR/.compacting/lock                             flock: one compaction (or reader) at a time
    DIR/quarantine/<token>~<name>                    unreadable files, moved aside untouched

Pid reuse. A file is staged (renamed out of the glob, atomic and O(1)) as soon as its pid is
seen dead; a process that later gets the same pid starts a fresh file. The one window left is a
new process that opens the old name between our liveness check and our rename: it would keep
writing into the staged inode. So before folding, every staged file whose pid is alive again is
put back under its old name (hard link, which never clobbers a file the new process made, then
unlink), and folded only once that pid is dead. Files hard-linked twice by a crash inside that
step are folded once (deduplicated by inode).

Crash safety (a compaction killed at any instruction neither loses nor double counts):
  1. stage: each rename moves a file from "read live" to "pending"; both are counted once.
  2. fold: read the current aggregates and all pending files, write the new aggregates into
     next/, fsync. A crash here leaves next/ garbage that recovery deletes (roll back).
  3. commit: atomically create COMMIT listing the pending files consumed and the new aggregates.
     This is the single commit point.
  4. apply: rename next/* over DIR/*_aggregate.db, unlink the consumed staged files, unlink
     COMMIT. Every step is idempotent; recovery repeats it whenever COMMIT exists (roll forward).
Readers take the same lock and run recovery first, so no reader ever sees an aggregate that
already includes a pending file, or a pending file whose aggregate is not yet in place.

Gauge modes (what the stock collector shows after gunicorn's child_exit hook ran
mark_process_dead):
  - live*: dropped with the dead pid. Dead pids whose live files were never removed are treated
    as if mark_process_dead had run: the files are deleted in the commit and counted.
  - sum, min, max: reduced into one entry per series.
  - mostrecent: the entry with the newest timestamp, value and timestamp both kept (the
    library's merge() drops timestamps, client_python#1056, which is why this folds by hand).
  - all: kept per pid. The aggregate entry's key carries the dead pid as a `pid` label, and the
    reader in collectors/appmetrics.py restores it as the stock collector would; only that one
    file cannot be read by the stock collector as is (it would show pid="aggregate").
Under pid reuse the new process counts as a fresh worker (a fresh file), whereas stock would let
it continue the old file: sums agree, `set()` gauges of the reused pid may differ.

Folding off (the default; appfiles.FOLD_ENV). An app may serve the same directory with a stock
MultiProcessCollector, which sums whatever the glob holds when it reads: a dead worker's file
moved out of the glob is a dip in its counters until the fold lands, and a failed scrape if it
had already globbed the name. So with folding off, compact(stage_dead=False) never moves a file
of the glob: it only finishes what an earlier fold-on run left under .compacting/ (recovery,
putting back reused pids' files, folding the staged ones), every step of which only ever adds to
what the stock collector sees. The glob's dead workers' files then stay where they are; the
collector reads each once and folds it in memory instead (monitor/sidecar/deadfiles.py).

Liveness is judged with kill(pid, 0), so the exporter must share the app's pid namespace.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import struct
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client.mmap_dict import MmapedDict

from monitor.contract import directory, state
from monitor.contract.appfiles import (
    AGGREGATE_ID,
    DROP,
    FOLD,
    STATE_DIR,
    DbName,
    new_token,
    parse_name,
)
from monitor.sidecar import dbfile
from monitor.sidecar.dbfile import Acc, BadFile, Entry

QUARANTINE_DIR = "quarantine"

_unpack_int = struct.Struct("i").unpack_from

# Tells whether a pid may still write; tests substitute it to simulate pid reuse.
AliveCheck = Callable[[int], bool]

# Test hook: called with the name of each crash-relevant step; tests kill the process there.
_crash_hook: Callable[[str], None] | None = None


def _checkpoint(step: str) -> None:
    if _crash_hook is not None:
        _crash_hook(step)


def read_entries(path: str, dir_fd: int | None = None) -> list[Entry]:
    """Every entry of one file, fully validated (monitor/sidecar/dbfile.py), or BadFile;
    FileNotFoundError passes through. With `dir_fd`, `path` is a name in that directory; either
    way it is opened without following a symlink or blocking on a FIFO."""
    data, _ = dbfile.read_at(dir_fd, path, inode=False)
    return dbfile.entries(dbfile.raw_entries(data))


# True unless the pid certainly has no process that could still write: kill(0). An unreaped
# zombie still counts as alive: it will never write again, so folding it later is safe, and
# checking for one would read /proc for every live worker on every scrape. The same function,
# not a wrapper: the app's index knows it by identity, to share the scrape's one kill(0) a pid
# (appindex.AppFiles.look) and to list /proc instead when it checks many pids at once.
pid_alive: AliveCheck = state.pid_exists


@dataclass
class _Dirs:
    """Checked fds of DIR (the top, which may be root's and writable by others: a Kubernetes
    emptyDir) and of `.compacting/`, `staged/` and `next/` below it (each ours alone, never a
    symlink: contract/directory.py). Every name below is opened, renamed, linked or removed
    relative to these fds, never by a path: a `.compacting/` (or `quarantine/`) swapped by
    another user for a symlink, or for a directory of theirs, is refused, so nothing outside
    the monitor's own is ever written, moved or removed by a sidecar run as root."""

    top: int
    state: int = -1
    staged: int = -1
    nxt: int = -1

    def close(self) -> None:
        for name in ("nxt", "staged", "state", "top"):
            fd = getattr(self, name)
            setattr(self, name, -1)  # forgotten first: closed once
            if fd >= 0:
                os.close(fd)

    def reopen_staged(self) -> None:
        """After `staged/` was removed and made anew: the fd of the new one."""
        fd, self.staged = self.staged, -1
        os.close(fd)
        self.staged = _subdir(self.state, "staged", self.top, create=True)


def _subdir(parent: int, name: str, top: int, create: bool) -> int:
    return directory.open_subdir(parent, name, f"{_shown(top)}/{name}", create=create)


def _shown(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return "<directory>"


@contextlib.contextmanager
def _opened(path: str, create: bool = True) -> Iterator[_Dirs]:
    d = _Dirs(directory.open_top(directory.Layout(path), create=False))
    try:
        d.state = _subdir(d.top, STATE_DIR, d.top, create)
        d.staged = _subdir(d.state, "staged", d.top, create)
        try:
            d.nxt = _subdir(d.state, "next", d.top, create)
        except OSError as e:
            # A reader's look (create False): the hooks stage into `staged/` before any fold
            # has made `next/`, and what is staged is still there to be found.
            if create or e.errno != errno.ENOENT:
                raise
        yield d
    finally:
        d.close()


@contextlib.contextmanager
def directory_lock(path: str) -> Iterator[None]:
    """Hold the directory's compaction lock (flock, released by the kernel if we die).

    Not reentrant: flock conflicts between two opens even in one process.
    """
    with _opened(path) as d:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        fd = os.open("lock", flags, 0o644, dir_fd=d.state)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def quarantine(path: str, name: str) -> str:
    """Move the unreadable file `name` of DIR to DIR/quarantine/ under a unique name; never
    deletes it. Returns its new path."""
    top = directory.open_top(directory.Layout(path))
    try:
        return _quarantine(top, top, name)
    finally:
        os.close(top)


def _quarantine(top: int, src_fd: int, name: str) -> str:
    qdir = _subdir(top, QUARANTINE_DIR, top, create=True)
    try:
        target = f"{new_token()}~{name.split('~')[-1]}"
        os.rename(name, target, src_dir_fd=src_fd, dst_dir_fd=qdir)
        return f"{_shown(qdir)}/{target}"
    finally:
        os.close(qdir)


@dataclass
class CompactionReport:
    """What one compaction did, for the collector's self-metrics."""

    staged: int = 0
    unstaged: int = 0
    folded: int = 0
    dropped_live: int = 0
    quarantined: int = 0
    errors: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def error(self, kind: str) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1


def _read_commit(d: _Dirs) -> dict[str, list[str]] | None:
    try:
        fd = directory.open_file(d.state, "COMMIT")
    except FileNotFoundError:
        return None
    with os.fdopen(fd, encoding="utf-8") as f:  # the file object closes the fd, once
        return json.load(f)


def _apply(d: _Dirs, commit: dict[str, list[str]]) -> None:
    """Finish a committed fold. Idempotent, so recovery can simply run it again."""
    for i, name in enumerate(commit["aggregates"]):
        with contextlib.suppress(FileNotFoundError):  # already moved by an earlier attempt
            os.replace(name, name, src_dir_fd=d.nxt, dst_dir_fd=d.top)
        if i == 0:
            _checkpoint("applied-one")
    os.fsync(d.top)
    os.fsync(d.nxt)
    _checkpoint("applied")
    for i, name in enumerate(commit["consumed"]):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name, dir_fd=d.staged)
        if i == 0:
            _checkpoint("cleaned-one")
    os.fsync(d.staged)
    if len(commit["consumed"]) > 1000:
        # A directory keeps the size of its largest listing; every scrape lists this one.
        try:
            os.rmdir("staged", dir_fd=d.state)
        except OSError:
            pass  # not empty: a hook staged meanwhile; keep it
        else:
            d.reopen_staged()
    _checkpoint("cleaned")
    os.unlink("COMMIT", dir_fd=d.state)
    os.fsync(d.state)


def recover(path: str) -> None:
    """Finish (COMMIT present) or roll back (absent) an interrupted fold. Hold the lock."""
    with _opened(path) as d:
        _recover(d)


def _recover(d: _Dirs) -> None:
    commit = _read_commit(d)
    if commit is not None:
        _apply(d, commit)
        return
    for name in os.listdir(d.nxt):
        os.unlink(name, dir_fd=d.nxt)
    for name in os.listdir(d.state):
        if name.startswith((".COMMIT.", "COMMIT.")):  # a journal that never reached its rename
            os.unlink(name, dir_fd=d.state)


def _stage_dead(
    d: _Dirs, is_alive: AliveCheck, report: CompactionReport, names: list[str] | None
) -> None:
    """Stage the dead pids' files among `names` (every file of the glob when None)."""
    token, alive = new_token(), {}
    moved = False
    for name in os.listdir(d.top) if names is None else names:
        db = parse_name(name)
        if db is None or db.pid is None or db.prefix not in FOLD:
            continue
        if db.pid not in alive:
            alive[db.pid] = is_alive(db.pid)
        if alive[db.pid]:
            continue
        try:
            os.rename(name, f"{token}~{name}", src_dir_fd=d.top, dst_dir_fd=d.staged)
        except FileNotFoundError:
            continue  # mark_process_dead or the hooks were faster
        moved = True
        report.staged += 1
        _checkpoint("staged-one")
    if moved:
        os.fsync(d.top)
        os.fsync(d.staged)
    _checkpoint("staged")


def _unstage_reused(
    d: _Dirs, pending: list[str], is_alive: AliveCheck, report: CompactionReport
) -> list[str]:
    """Put back staged files whose pid lives again; return the pending files safe to fold."""
    keep, alive = [], {}
    for sname in pending:
        name = sname.split("~", 1)[-1]
        db = parse_name(name)
        pid = db.pid if db is not None else None
        if pid is not None and pid not in alive:
            alive[pid] = is_alive(pid)
        if pid is None or not alive[pid]:
            keep.append(sname)
            continue
        try:
            # Never replaces a fresh file the new process created; never follows a symlink.
            os.link(sname, name, src_dir_fd=d.staged, dst_dir_fd=d.top, follow_symlinks=False)
        except FileExistsError:
            if _inode(d.staged, sname) != _inode(d.top, name):
                keep.append(sname)  # the new process has its own file: this one is dead data
                continue
        _checkpoint("relinked")
        os.unlink(sname, dir_fd=d.staged)  # (a crash before this: two links, folded once)
        report.unstaged += 1
        _checkpoint("unstaged-one")
    return keep


def _inode(dir_fd: int, name: str) -> tuple[int, int]:
    st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    return st.st_dev, st.st_ino


def fold_into(acc: Acc, how: str, db: DbName, entries: list[Entry]) -> None:
    dbfile.fold(acc, how, db.ident, [(e.key, e.value, e.timestamp) for e in entries])


def _write_aggregate(nxt: int, name: str, acc: Acc) -> None:
    # Written through the library's own writer, so the format is whatever the reader expects.
    # It opens a path: this one goes through the fd of next/ (a magic link to the directory
    # checked, ours alone: nobody else can put a name in it), never through `.compacting/`'s
    # name again.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name, dir_fd=nxt)
    d = MmapedDict(f"/proc/self/fd/{nxt}/{name}")
    try:
        for key, (value, timestamp) in acc.items():
            d.write_value(key, value, timestamp)
    finally:
        d.close()
    fd = directory.open_file(nxt, name)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fold(d: _Dirs, pending: list[str], report: CompactionReport) -> None:
    accs: dict[str, Acc] = {}
    consumed, seen_inodes = [], set()
    for sname in sorted(pending):
        db = parse_name(sname.split("~", 1)[-1])
        how = FOLD.get(db.prefix) if db is not None else None
        try:
            inode = _inode(d.staged, sname)
            if how is None:
                raise BadFile("name", sname)
            entries = [] if how == DROP or inode in seen_inodes else read_entries(sname, d.staged)
        except FileNotFoundError:
            continue
        except BadFile as e:
            report.error(e.kind)
            _quarantine(d.top, d.staged, sname)
            report.quarantined += 1
            _checkpoint("quarantined")
            continue
        consumed.append(sname)
        if how == DROP:
            report.dropped_live += 1
            continue
        if inode in seen_inodes:
            continue  # the second link of a half-finished unstage: same data, fold once
        seen_inodes.add(inode)
        report.folded += 1
        if db.prefix not in accs:
            accs[db.prefix] = _load_aggregate(d, db.prefix, report)
        fold_into(accs[db.prefix], how, db, entries)
    if not consumed:
        return
    names = []
    for prefix, acc in accs.items():
        name = f"{prefix}_{AGGREGATE_ID}.db"
        _write_aggregate(d.nxt, name, acc)
        names.append(name)
    os.fsync(d.nxt)
    _checkpoint("written")
    data = json.dumps({"consumed": consumed, "aggregates": names}).encode()
    directory.replace_file(d.state, "COMMIT", data, sync=True)  # the commit point
    os.fsync(d.state)
    _checkpoint("committed")
    _apply(d, {"consumed": consumed, "aggregates": names})


def _load_aggregate(d: _Dirs, prefix: str, report: CompactionReport) -> Acc:
    acc: Acc = {}
    name = f"{prefix}_{AGGREGATE_ID}.db"
    db = DbName(prefix, prefix.split("_")[0], prefix.partition("_")[2], AGGREGATE_ID)
    try:
        fold_into(acc, FOLD[prefix], db, read_entries(name, d.top))
    except FileNotFoundError:
        pass
    except BadFile as e:
        # Only a broken disk gets here (aggregates are fsynced and renamed into place). Moving
        # it aside loses its totals from the output, but keeps them on disk for an operator.
        report.error("aggregate-" + e.kind)
        _quarantine(d.top, d.top, name)
        report.quarantined += 1
    return acc


def has_pending(path: str) -> bool:
    """True if a fold has work left (staged files, or a COMMIT to finish): the one question a
    folding-off scrape asks before it takes the lock. Cheap: one listdir, usually empty."""
    try:
        with _opened(path, create=False) as d:
            if _exists(d.state, "COMMIT"):
                return True
            with os.scandir(d.staged) as it:
                return any(True for _ in it)
    except FileNotFoundError:
        return False
    except OSError as e:
        # ENOENT from a level missing; anything else (refused, unreadable): can't tell: let
        # the locked path try, and count what fails there.
        return e.errno != errno.ENOENT


def _exists(dir_fd: int, name: str) -> bool:
    try:
        os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
        return True
    except FileNotFoundError:
        return False


def compact(
    path: str,
    is_alive: AliveCheck = pid_alive,
    *,
    stage_dead: bool = True,
    names: list[str] | None = None,
) -> CompactionReport:
    """Recover, stage every dead pid's files (unless `stage_dead` is False: folding off, see
    above; only those among `names` when given: a caller that knows which files are dead
    spares the listing, and bounds the work of one compaction), fold all pending files. Hold
    directory_lock."""
    report = CompactionReport()
    started = time.perf_counter()
    with _opened(path) as d:
        _recover(d)
        if stage_dead:
            _stage_dead(d, is_alive, report, names)
        pending = _unstage_reused(d, sorted(os.listdir(d.staged)), is_alive, report)
        if pending:
            _fold(d, pending, report)
    report.seconds = time.perf_counter() - started
    return report


def run_compaction(
    path: str, is_alive: AliveCheck = pid_alive, *, stage_dead: bool = True
) -> CompactionReport:
    """compact() under the directory lock, for callers outside the collector (CLI, tests)."""
    with directory_lock(path):
        return compact(path, is_alive, stage_dead=stage_dead)


def read_staged(path: str) -> list[tuple[str, list[Entry] | BadFile]]:
    """Each staged file's name and entries (or why it is bad), read where it lies through the
    checked fd of `staged/`: what a failed compaction left outside the aggregates."""
    found: list[tuple[str, list[Entry] | BadFile]] = []
    try:
        with _opened(path, create=False) as d:
            for sname in sorted(os.listdir(d.staged)):
                try:
                    found.append((sname, read_entries(sname, d.staged)))
                except FileNotFoundError:
                    continue  # folded meanwhile by another exporter: in the aggregate now
                except BadFile as e:
                    found.append((sname, e))
    except OSError:
        pass
    return found
