"""The app's multiprocess files at the top of the shared directory, kept from look to look.

Why: with folding off (the default) every worker that ever lived leaves its files in the glob,
and a scrape that lists them all and checks every pid costs what the history costs (330 ms at
100,000 dead workers). A look here costs what the live processes cost plus what changed:

1. Which names may have changed (monitor/sidecar/dirwatch.py: inotify, else the directory's
   stat): each is looked at again under the directory fd (lstat): new, gone or replaced.
2. Which pids the kernel handed out since the last look (deadfiles.NewPids): a folded file of
   such a pid is read again, and leaves the fold if its process lives or it now says something
   else (a process with a reused pid writes on into the old file; it may live and die between
   two looks).
3. Which processes of the unfolded files are gone (kill(0), one a pid): their files are read a
   last time and folded (monitor/sidecar/deadfiles.py); folding on, the collector then moves
   them to the on-disk aggregates in batches. An unreadable file is never folded: it is read,
   and counted, every time.
4. The bytes of every unfolded file (a pread on a descriptor kept open): prometheus_client writes
   through mmap, which moves no timestamp, so bytes are the only sign of a counter that moved.
A dead process's folded file costs nothing more, until one of the above names it.

Names the kernel does not report, or pids ns_last_pid does not reveal (a filesystem that
sends no events, a process restored by CRIU), are found by the audit: every RESCAN seconds a
background thread (`audit`) lists the directory whole and checks every folded pid, and the
next look examines whatever disagrees. So a file of any origin (an app process that is not a
worker, a file copied in by hand) is served at the next scrape, and at worst RESCAN seconds
and a scrape after it appears.

`generation` moves whenever anything a collection reads moved: the kept-body cache compares it.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import re
import resource
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from monitor.contract import state
from monitor.contract.appfiles import DbName, parse_name
from monitor.sidecar import dbfile
from monitor.sidecar.dbfile import BadFile, Entry, Raw
from monitor.sidecar.deadfiles import (
    DEAD_FOLD,
    DeadFold,
    Folded,
    NewPids,
    Spans,
    fingerprint,
    foldable,
)
from monitor.sidecar.dirwatch import DirWatch

log = logging.getLogger("gunicorn_monitor")

RESCAN = 60.0  # seconds between audits: the bound on finding what no event reported
BULK = 64  # pids past which one listing of /proc answers for all of them
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _max_open() -> int:
    """Descriptors kept open between looks: a quarter of the soft limit, at most 4096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, min(4096, (soft if soft > 0 else 1024) // 4))


_proc_complete: bool | None = None


def _proc_lists_all() -> bool:
    """Does /proc list every process of our namespace? Not when mounted with hidepid=2
    (invisible): then a process of another user is alive for kill(0) but missing there."""
    global _proc_complete
    if _proc_complete is None:
        _proc_complete = False
        try:
            with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as f:
                for line in f:
                    fields = line.split()
                    if len(fields) > 4 and fields[4] == "/proc":
                        options = line.split(" - ", 1)[-1]
                        hidden = re.search(r"hidepid=(\w+)", options)
                        shown = ("0", "off", "1", "noaccess")  # 1: listed, not readable
                        _proc_complete = hidden is None or hidden[1] in shown
        except OSError:
            pass
    return _proc_complete


def in_glob(name: str) -> bool:
    """What the stock collector's glob('*.db') matches (no dotfiles)."""
    return name.endswith(".db") and not name.startswith(".")


@dataclass(slots=True)
class File:
    """An unfolded file: read on every look."""

    db: DbName | None  # None: a name the stock collector cannot decode
    ino: int
    pid: int | None  # the process it lives and dies with; None: never judged dead
    fd: int = -1  # kept open between looks; -1: opened each look (past the limit) or not yet
    data: bytes | None = None  # its used bytes at the last look; None: unreadable
    entries: list[Entry] | BadFile | None = None  # parsed from data, when a collection asks


class AppFiles:
    """The index (module docstring). `how` is how a dead process's file folds, by file type
    (deadfiles.DEAD_FOLD; folding on, FOLDING_ON drops live-mode gauges)."""

    def __init__(
        self,
        path: str,
        *,
        how: dict[str, str] = DEAD_FOLD,
        is_alive: Callable[[int], bool] = state.pid_exists,
        use_inotify: bool = True,
    ) -> None:
        self.path = path
        self.how = how
        self.is_alive = is_alive
        self.generation = 0
        self.reads = 0  # file reads, for the collector's files_read
        self.vanished = False  # a file went between its event and its read (last look)
        self.looks = 0
        self.progress = (0, 0)  # (files folded, names looked at) of the look under way
        self._watch = DirWatch(path, use_inotify)
        self._new_pids = NewPids()
        self._fold = DeadFold(self._reread, how)
        self._unfolded: dict[str, File] = {}
        self._dead_unfoldable: set[str] = set()  # unfolded: their process is gone, unreadable
        self._live: dict[int, set[str]] = {}  # unfolded files by pid
        self._suspect_names: set[str] = set()
        self._suspect_pids: set[int] = set()
        self._exists = is_alive  # this look's liveness check
        self._max_open = _max_open()
        self._kept = 0
        self.lock = threading.RLock()

    # -- a look --------------------------------------------------------------------------

    def look(self, exists: Callable[[int], bool] | None = None) -> int:
        """Bring the index up to date (module docstring); returns `generation`. `exists`
        answers for pids in this look instead of kill(0), when the caller has one that shares
        its answers (one kill(0) a pid for the whole scrape)."""
        with self.lock:
            default = self.is_alive is state.pid_exists
            self._exists = exists if exists is not None and default else self.is_alive
            self._look()
            self.looks += 1
            return self.generation

    @contextlib.contextmanager
    def _bulk(self) -> Iterator[None]:
        """Python's cyclic collector paused while a whole directory is read: it would scan
        every object made so far several times over (twice the cost of the read at 100,000
        files), and the fold holds no cycles to collect."""
        paused = gc.isenabled()
        gc.disable()
        try:
            yield
        finally:
            if paused:
                gc.enable()

    def dead(self, limit: int) -> list[str]:
        """Up to `limit` names of dead processes' files in the glob (folded ones in pid order,
        then unreadable ones), for a compaction to stage."""
        found = list(itertools.islice((name for name, _ in self._fold.names()), limit))
        found += sorted(self._dead_unfoldable)[: max(0, limit - len(found))]
        return found

    def _look(self) -> None:
        self.vanished = False
        try:
            changed = self._watch.look()
        except FileNotFoundError:  # not there (yet, or any more): nothing to serve
            self._forget()
            return
        spans = self._new_pids.since()  # before any liveness check: see deadfiles.NewPids
        listing: dict[str, int | None] | None = None
        if changed is None:  # the first look, or events lost: the directory whole, once
            listing = self._list()
            changed = set(listing) | set(self._unfolded)
            changed.update(name for name, _ in self._fold.names())
        with self._bulk() if listing is not None else contextlib.nullcontext():
            self._update(changed, listing, spans)

    def _update(
        self, changed: set[str], listing: dict[str, int | None] | None, spans: Spans
    ) -> None:
        """Steps 1 to 4 of the module docstring, for the names that may have changed."""
        changed |= self._suspect_names
        suspects, self._suspect_names, self._suspect_pids = self._suspect_pids, set(), set()
        self.progress = (0, len(changed))
        discard: list[str] = []
        new: dict[str, int] = {}
        for name in changed:
            self._examine(name, listing, discard, new)
        reused = self._fold.pids(spans)
        for pid in suspects:
            if pid not in reused and (names := self._fold.names_of(pid)):
                reused[pid] = names
        for pid, names in reused.items():
            self._recheck(pid, names, discard)
        self._unfold(discard, new)
        self._join(new)
        self._deaths()
        self._read_unfolded()

    def _list(self) -> dict[str, int | None]:
        """Every name of the glob, with its inode (None: not a regular file), from one scandir."""
        with os.scandir(self._watch.fd) as it:
            return {
                e.name: (e.inode() if e.is_file(follow_symlinks=False) else None)
                for e in it
                if in_glob(e.name)
            }

    def _examine(
        self,
        name: str,
        listing: dict[str, int | None] | None,
        discard: list[str],
        new: dict[str, int],
    ) -> None:
        """Compare one name with what the directory holds now (`listing`, else its lstat):
        gone or replaced (dropped, or into `discard` if folded), new (into `new`)."""
        if not in_glob(name):
            return
        if listing is not None:
            ino = listing.get(name)
        else:
            try:
                st = os.stat(name, dir_fd=self._watch.fd, follow_symlinks=False)
                ino = st.st_ino if stat.S_ISREG(st.st_mode) else None
            except FileNotFoundError:
                ino = None
        f = self._unfolded.get(name)
        if f is not None:
            known: int | None = f.ino
        else:
            folded = self._fold.get(name)
            known = folded.ino if folded is not None else None
        if ino == known:
            return
        if f is not None:
            self._drop(name)
        elif known is not None:
            discard.append(name)  # leaves the fold with the others, below
        if ino is not None:
            new[name] = ino

    def _join(self, new: dict[str, int]) -> None:
        """New files: a dead process's folded at once, the others read from now on."""
        if new:
            self.generation += 1
        by_pid: dict[int | None, list[tuple[str, DbName | None, int]]] = {}
        for name, ino in new.items():
            db = parse_name(name)
            by_pid.setdefault(db.pid if foldable(db) else None, []).append((name, db, ino))
        alive = self._alive([pid for pid in by_pid if pid is not None])
        for pid, files in by_pid.items():
            dead = pid is not None and pid not in alive
            for name, db, ino in files:
                if not (dead and self._fold_file(name, pid, db, ino)):  # type: ignore[arg-type]
                    self._add(name, db, ino, pid)
                    if dead:
                        self._dead_unfoldable.add(name)

    def _add(self, name: str, db: DbName | None, ino: int, pid: int | None) -> None:
        self._unfolded[name] = File(db, ino, pid)
        if pid is not None:
            self._live.setdefault(pid, set()).add(name)

    def _fold_file(self, name: str, pid: int, db: DbName, ino: int) -> bool:
        """Read a dead process's file a last time and fold it; False if it cannot be (gone,
        replaced, unreadable: then it is read, and counted, every time)."""
        try:
            # By name, as just looked at: if it was replaced since, its event says so at the
            # next look, which reads it again (one fstat a file less on a directory's first read).
            data, _ = dbfile.read_at(self._watch.fd, name, inode=False)
            self.reads += 1
            raw = dbfile.raw_entries(data)
        except (FileNotFoundError, BadFile):
            return False
        self._fold.add(name, pid, db, raw, data, ino)
        done, total = self.progress
        self.progress = (done + 1, total)
        return True

    def _drop(self, name: str) -> None:
        self._dead_unfoldable.discard(name)
        f = self._unfolded.pop(name)
        if f.pid is not None:
            names = self._live[f.pid]
            names.discard(name)
            if not names:
                del self._live[f.pid]
        self._close(f)
        self.generation += 1

    def _close(self, f: File) -> None:
        if f.fd >= 0:
            fd, f.fd = f.fd, -1
            self._kept -= 1
            os.close(fd)

    def _recheck(self, pid: int, names: list[str], discard: list[str]) -> None:
        """A folded pid the kernel may have given out again: its files leave the fold if its
        process lives (it may write), or if one of them now says something else."""
        if self._exists(pid):
            discard += names
            return
        for name in names:
            folded = self._fold.get(name)
            now = self._reread(name, folded) if folded is not None else None
            if now is None or now[1] != folded.fingerprint:  # type: ignore[union-attr]
                discard.append(name)

    def _unfold(self, names: list[str], new: dict[str, int]) -> None:
        """These leave the fold (their buckets are folded anew), and are examined again: each
        still there joins the new files (`new`)."""
        if not names:
            return
        dropped = self._fold.discard(names)
        self.generation += 1
        for name in set(names) | set(dropped):
            self._examine(name, None, [], new)

    def _deaths(self) -> None:
        """The processes of unfolded files that are gone: their files are read a last time and
        folded."""
        alive = self._alive(list(self._live))
        for pid in [p for p in self._live if p not in alive]:
            for name in sorted(self._live[pid]):
                f = self._unfolded[name]
                if f.entries is not None and f.data is not None and f.fd >= 0:
                    # Unreadable when last parsed and not changed since: still not foldable.
                    try:
                        if dbfile.used_bytes(f.fd) == f.data and isinstance(f.entries, BadFile):
                            continue
                    except OSError:
                        continue
                if self._fold_file(name, pid, f.db, f.ino):  # type: ignore[arg-type]
                    self._drop(name)
                else:
                    self._dead_unfoldable.add(name)

    def _alive(self, pids: list[int]) -> set[int]:
        """Which of `pids` have a process (a zombie has): kill(0) each, or, for many at once
        (a directory's first read), one listing of /proc where it shows every process."""
        if len(pids) > BULK and self.is_alive is state.pid_exists and _proc_lists_all():
            try:
                running = {int(n) for n in os.listdir("/proc") if n.isdigit()}
                return {pid for pid in pids if pid in running}
            except OSError:
                pass
        return {pid for pid in pids if self._exists(pid)}

    def _read_unfolded(self) -> None:
        for name, f in list(self._unfolded.items()):
            if f.db is None:
                continue  # never read: counted as a bad name at each collection
            try:
                if f.fd < 0:
                    fd = os.open(name, _FILE, dir_fd=self._watch.fd)
                    ino = os.fstat(fd).st_ino
                    if ino != f.ino:  # replaced since its event: this one now
                        f.ino = ino
                    if self._kept >= self._max_open:
                        try:
                            data = dbfile.used_bytes(fd)
                        finally:
                            os.close(fd)
                        self._took(f, data)
                        continue
                    f.fd, self._kept = fd, self._kept + 1
                data = dbfile.used_bytes(f.fd)
            except FileNotFoundError:
                if f.db.mode.startswith("live"):
                    self._drop(name)  # mark_process_dead removed it, as stock allows
                    continue
                self.vanished = True  # e.g. staged by a hook: the collector compacts first
                self._drop(name)
                continue
            except OSError:
                data = None
            self._took(f, data)

    def _took(self, f: File, data: bytes | None) -> None:
        self.reads += 1
        if data != f.data:
            f.data, f.entries = data, None
            self.generation += 1

    def _reread(self, name: str, folded: Folded) -> tuple[list[Raw], int] | None:
        """A folded file read again, if it is still the same file and readable."""
        try:
            data, ino = dbfile.read_at(self._watch.fd, name)
            self.reads += 1
            if ino != folded.ino:
                return None
            return dbfile.raw_entries(data), fingerprint(data)
        except (FileNotFoundError, BadFile):
            return None

    def _forget(self) -> None:
        """The directory is gone: so is everything it held."""
        if self._unfolded or len(self._fold):
            self.generation += 1
        for f in self._unfolded.values():
            self._close(f)
        self._unfolded, self._live, self._dead_unfoldable = {}, {}, set()
        self._fold = DeadFold(self._reread, self.how)
        self._watch.close()

    # -- what a collection reads ---------------------------------------------------------

    def folded(self) -> list[tuple[DbName, list[dbfile.Entry]]]:
        """Dead processes' files, one aggregate per file type."""
        return self._fold.entries()

    def unfolded(self) -> Iterator[tuple[str, DbName | None, list[Entry] | BadFile]]:
        """(name, decoded name, entries or why not) of each unfolded file, as last read."""
        for name, f in self._unfolded.items():
            if f.db is None:
                yield name, None, BadFile("name", name)
                continue
            if f.entries is None:
                try:
                    if f.data is None:
                        raise BadFile("io", f"{name} could not be read")
                    f.entries = dbfile.entries(dbfile.raw_entries(f.data))
                except BadFile as e:
                    f.entries = e
            yield name, f.db, f.entries

    def suspect(self, names: list[str]) -> None:
        """These files' pids are checked again at the next look, as if given out again: a
        compaction left them in the glob (their process lives again: it put them back)."""
        with self.lock:
            for name in names:
                db = parse_name(name)
                if db is not None and db.pid is not None:
                    self._suspect_pids.add(db.pid)

    def dead_count(self) -> int:
        """Dead processes' files in the glob (folded, or unreadable)."""
        return len(self._fold) + len(self._dead_unfoldable)

    def counts(self) -> tuple[int, int]:
        """(unfolded files, folded files)."""
        return len(self._unfolded), len(self._fold)

    # -- the audit -------------------------------------------------------------------------

    def audit(self) -> None:
        """List the directory whole and check every folded pid, without holding up a look
        (only copies are taken under the lock); whatever disagrees is examined at the next."""
        with self.lock:
            if self._watch.fd is None:
                return
            fd = os.dup(self._watch.fd)  # the look may close its own meanwhile
            known = {n: f.ino for n, f in self._unfolded.items()}
            known.update((n, f.ino) for n, f in self._fold.names())
            pids = {int(f.ident) for _, f in self._fold.names()}
        try:
            with os.scandir(fd) as it:
                found = {
                    e.name: e.inode()
                    for e in it
                    if in_glob(e.name) and e.is_file(follow_symlinks=False)
                }
        finally:
            os.close(fd)
        odd = {n for n in found.keys() | known.keys() if found.get(n) != known.get(n)}
        alive = {pid for pid in pids if self.is_alive(pid)}
        if odd or alive:
            log.info("event=app_files_audit names=%d reused_pids=%d", len(odd), len(alive))
        with self.lock:
            self._suspect_names |= odd
            self._suspect_pids |= alive
