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
   last time and folded (monitor/sidecar/deadfiles.py), unless the collector stages them
   (folding on). An unreadable file is never folded: it is read, and counted, every time.
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

import bisect
import logging
import os
import resource
import stat
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from monitor.contract import state
from monitor.contract.appfiles import DbName, parse_name
from monitor.sidecar import dbfile
from monitor.sidecar.dbfile import BadFile, Entry, Raw
from monitor.sidecar.deadfiles import DeadFold, NewPids, fingerprint, foldable
from monitor.sidecar.dirwatch import DirWatch

log = logging.getLogger("gunicorn_monitor")

RESCAN = 60.0  # seconds between audits: the bound on finding what no event reported
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK


def _max_open() -> int:
    """Descriptors kept open between looks: a quarter of the soft limit, at most 4096."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return max(64, min(4096, (soft if soft > 0 else 1024) // 4))


def in_glob(name: str) -> bool:
    """What the stock collector's glob('*.db') matches (no dotfiles)."""
    return name.endswith(".db") and not name.startswith(".")


@dataclass
class File:
    """An unfolded file: read on every look."""

    db: DbName | None  # None: a name the stock collector cannot decode
    ino: int
    pid: int | None  # the process it lives and dies with; None: never judged dead
    fd: int = -1  # kept open between looks; -1: opened each look (past the limit) or not yet
    data: bytes | None = None  # its used bytes at the last look; None: unreadable
    entries: list[Entry] | BadFile | None = None  # parsed from data, when a collection asks


class AppFiles:
    """The index (module docstring). `fold_dead`: fold dead processes' files in memory; off,
    they are left for the compaction to stage (folding on), and `dead_waiting` says so."""

    def __init__(
        self,
        path: str,
        *,
        fold_dead: bool = True,
        is_alive: Callable[[int], bool] = state.pid_exists,
        use_inotify: bool = True,
    ) -> None:
        self.path = path
        self.fold_dead = fold_dead
        self.is_alive = is_alive
        self.generation = 0
        self.reads = 0  # file reads, for the collector's files_read
        self.dead_waiting = False  # dead processes' files left unfolded for the compaction
        self.vanished = False  # a file went between its event and its read (last look)
        self.looks = 0
        self.progress = (0, 0)  # (files read, to read) of the look under way
        self._watch = DirWatch(path, use_inotify)
        self._new_pids = NewPids()
        self._fold = DeadFold(self._reread)
        self._unfolded: dict[str, File] = {}
        self._live: dict[int, set[str]] = {}  # unfolded files by pid
        self._folded: dict[int, list[str]] = {}  # folded files by pid
        self._folded_pids: list[int] = []  # sorted
        self._folded_ino: dict[str, tuple[int, int]] = {}  # name -> inode, pid
        self._suspect_names: set[str] = set()
        self._suspect_pids: set[int] = set()
        self._max_open = _max_open()
        self._kept = 0
        self.lock = threading.RLock()

    # -- a look --------------------------------------------------------------------------

    def look(self, fold: bool | None = None) -> int:
        """Bring the index up to date (module docstring); returns `generation`."""
        with self.lock:
            self._look(self.fold_dead if fold is None else fold)
            self.looks += 1
            return self.generation

    def _look(self, fold: bool) -> None:
        self.vanished = False
        try:
            changed = self._watch.look()
        except FileNotFoundError:  # not there (yet, or any more): nothing to serve
            self._forget()
            return
        spans = self._new_pids.since()  # before any liveness check: see deadfiles.NewPids
        listing: dict[str, int | None] = {}
        if changed is None:  # the first look, or events lost: the directory whole, once
            listing = self._list()
            changed = set(listing) | set(self._unfolded) | set(self._folded_ino)
        changed |= self._suspect_names
        suspects, self._suspect_names, self._suspect_pids = self._suspect_pids, set(), set()
        self.progress = (0, len(changed))
        discard: list[str] = []
        for name in changed:
            self._examine(name, listing, discard)
        reused = set(spans.of(self._folded_pids)) | {p for p in suspects if p in self._folded}
        for pid in reused:
            self._recheck(pid, discard)
        self._unfold(discard)
        self._deaths(fold)
        self._read_unfolded()

    def _list(self) -> dict[str, int | None]:
        """Every name of the glob, with its inode (None: not a regular file), from one scandir."""
        with os.scandir(self._watch.fd) as it:
            return {
                e.name: (e.inode() if e.is_file(follow_symlinks=False) else None)
                for e in it
                if in_glob(e.name)
            }

    def _examine(self, name: str, listing: dict[str, int | None], discard: list[str]) -> None:
        """Compare one name with what the directory holds now: added, gone or replaced."""
        if not in_glob(name):
            return
        if listing:
            ino = listing.get(name)
        else:
            try:
                st = os.stat(name, dir_fd=self._watch.fd, follow_symlinks=False)
                ino = st.st_ino if stat.S_ISREG(st.st_mode) else None
            except FileNotFoundError:
                ino = None
        f = self._unfolded.get(name)
        known = f.ino if f is not None else self._folded_ino.get(name, (None,))[0]
        if ino == known:
            return
        if f is not None:
            self._drop(name)
        elif known is not None:
            discard.append(name)  # leaves the fold with the others, below
        if ino is not None:
            self._add(name, ino)

    def _add(self, name: str, ino: int) -> None:
        db = parse_name(name)
        pid = db.pid if foldable(db) else None
        self._unfolded[name] = File(db, ino, pid)
        if pid is not None:
            self._live.setdefault(pid, set()).add(name)
        self.generation += 1

    def _drop(self, name: str) -> None:
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

    def _recheck(self, pid: int, discard: list[str]) -> None:
        """A folded pid the kernel may have given out again: its files leave the fold if its
        process lives (it may write), or if one of them now says something else."""
        names = self._folded[pid]
        if self.is_alive(pid):
            discard += names
            return
        for name in names:
            now = self._reread(name)
            if now is None or now[1] != self._fold.fingerprint(name):
                discard.append(name)

    def _unfold(self, names: list[str]) -> None:
        """These leave the fold (their buckets are folded anew), and are examined again: each
        still there joins the unfolded files, to be read now and folded again once dead."""
        if not names:
            return
        for name in names:
            self._forget_folded(name)
        dropped = self._fold.discard(names)
        for name in dropped:
            self._forget_folded(name)
        self.generation += 1
        for name in set(names) | set(dropped):
            self._examine(name, {}, [])

    def _forget_folded(self, name: str) -> None:
        found = self._folded_ino.pop(name, None)
        if found is None:
            return
        pid = found[1]
        names = self._folded[pid]
        names.remove(name)
        if not names:
            del self._folded[pid]
            del self._folded_pids[bisect.bisect_left(self._folded_pids, pid)]

    def _deaths(self, fold: bool) -> None:
        """The processes of unfolded files that are gone: their files are read a last time and
        folded (`fold`), or left for the compaction to stage."""
        self.dead_waiting = False
        done = 0
        for pid in [p for p in self._live if not self.is_alive(p)]:
            if not fold:
                self.dead_waiting = True
                continue
            for name in sorted(self._live[pid]):
                f = self._unfolded[name]
                try:
                    data, ino = dbfile.read_at(self._watch.fd, name)
                    self.reads += 1
                    raw = dbfile.raw_entries(data)
                except FileNotFoundError:
                    self._drop(name)  # mark_process_dead, or staged: gone
                    continue
                except BadFile as e:
                    f.entries = e  # stays unfolded: read, and counted, every time
                    continue
                if ino != f.ino:
                    continue  # replaced since its event: examined at the next look
                self._drop(name)
                self._fold.add(name, pid, f.db, raw, data)  # type: ignore[arg-type]
                self._folded_ino[name] = (ino, pid)
                if pid not in self._folded:
                    self._folded[pid] = []
                    bisect.insort(self._folded_pids, pid)
                self._folded[pid].append(name)
                done += 1
                if done % 1024 == 0:
                    self.progress = (done, self.progress[1])

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

    def _reread(self, name: str) -> tuple[list[Raw], tuple[int, int]] | None:
        """A folded file read again, if it is still the same file and readable."""
        try:
            data, ino = dbfile.read_at(self._watch.fd, name)
            self.reads += 1
            if ino != self._folded_ino[name][0]:
                return None
            return dbfile.raw_entries(data), fingerprint(data)
        except (FileNotFoundError, BadFile):
            return None

    def _forget(self) -> None:
        """The directory is gone: so is everything it held."""
        if self._unfolded or self._folded_ino:
            self.generation += 1
        for f in self._unfolded.values():
            self._close(f)
        self._unfolded, self._live = {}, {}
        self._folded, self._folded_pids, self._folded_ino = {}, [], {}
        self._fold = DeadFold(self._reread)
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

    def counts(self) -> tuple[int, int]:
        """(unfolded files, folded files)."""
        return len(self._unfolded), len(self._folded_ino)

    # -- the audit -------------------------------------------------------------------------

    def audit(self) -> None:
        """List the directory whole and check every folded pid, without holding up a look
        (only copies are taken under the lock); whatever disagrees is examined at the next."""
        with self.lock:
            if self._watch.fd is None:
                return
            fd = os.dup(self._watch.fd)  # the look may close its own meanwhile
            known = {n: f.ino for n, f in self._unfolded.items()}
            known.update((n, ino) for n, (ino, _) in self._folded_ino.items())
            pids = list(self._folded_pids)
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
