"""Retirement of gone masters' files: their counts folded into `retired.json`, the files removed.

Why: every master start (a restart, a crash loop, each USR2 upgrade) leaves a set of files in
`gunicorn-monitor/`: its counts (`counter_`, `histogram_`, `gauge_max_<ident>.db`) and its state
(`master-<ident>.json`). Kept forever, 50,000 of them made the first scrape take 23.7 s and an
idle sidecar burn 37 % of a core. Their counts must outlive them (a total that drops is a
counter reset to Prometheus), so they are folded into one file before the files go.

The files (all in `gunicorn-monitor/`, opened relative to a checked directory fd, without
following a symlink):

    counter_<ident>.db, histogram_<ident>.db, gauge_max_<ident>.db, master-<ident>.json
                         one master incarnation's (contract/incarnation.py); nobody writes them
                         once it is gone, because no later process has the same name
    retired.json         {"samples": the validated sum of every retired file's counts
                          (sidecar/counts.py), "retired": the names folded by the last commit}
    .retired.json.<pid>.tmp   a commit being written
    .retire.lock         flock: one retirement at a time (never taken by a reader, or a writer
                         in Gunicorn)

Who retires: the sidecar, when it may write the directory (the same user as Gunicorn, as
shipped: `directory.open_private` is the writers' check), from one thread of its own. A sidecar
that may not (another user, a read-only mount) retires nothing and folds the gone masters'
files in memory instead (collectors/lifecycle.py): the same counts, and the directory keeps
what it has. Never the hooks: Gunicorn never waits on this, reads these files, or holds the lock.

Which: a file is retired when the incarnation it is named for is gone, as judged by this
sidecar in the same pid namespace (incarnation.Judge; a file of another namespace is never
judged). Counts go at once. A state file goes once GRACE seconds have passed since its master
last wrote it and since this sidecar first saw none of the workers it lists running (an orphan
that outlived its master: whoever counts the exits of a dead master's orphans reads them from
that file, and has GRACE seconds after the last one exits; `settled`). A file that cannot be
read is left where it is (collectors/lifecycle.py skips and counts it), never folded half and
never removed.

The protocol (a retirement killed at any instruction neither loses nor doubles a count):
  1. roll forward: every name the current retired.json lists is unlinked if still there (a
     crash after a commit), and the directory fsynced, before the next commit may stop listing
     them; leftover temporaries of ours are removed (a crash before a commit).
  2. fold: read a batch of gone masters' count files and validate them; add them to the
     current sum in memory.
  3. commit: write the new retired.json to a temporary name, fsync, rename it over the old
     one, fsync the directory. The rename is the single commit point: before it, the batch's
     files are counted from themselves; after it, from retired.json, which names them.
  4. unlink the batch's files, fsync the directory. A crash here leaves files that
     retired.json names: readers skip them, and step 1 of the next retirement removes them.
Readers (collectors/lifecycle.py) need no lock: they open retired.json first, skip every file
it names, read the rest, and check that retired.json is still the file they opened (a rename
over it gives another inode); if not, they read again. A file removed between their listing and
their read was then in the retired.json they check against, so nothing is counted twice or
lost, and a reader that may not write takes part on the same terms.

Bounded: retired.json holds the contract's series (label values from fixed sets) and the
names of one batch; the directory holds the live masters' files, the gone ones' for at most one
pass (and their state files for GRACE), and files that could not be read.

What retired.json says is data like any file: each sample is checked against the contract
again when read. One that cannot be read (garbage, a disk error) stops retirement (its sum
would be lost by writing over it) and is kept where it is: said once in the log, and the
collector keeps the values it last read from it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import psutil

from monitor.contract import directory, incarnation, state
from monitor.contract.appfiles import parse_name
from monitor.contract.directory import Layout
from monitor.sidecar import compaction, counts

log = logging.getLogger("gunicorn_monitor")

AGGREGATE = "retired.json"
LOCK = ".retire.lock"
BATCH = 5000  # count files folded per commit: what retired.json lists at most
GRACE = 60.0  # seconds a gone master's state file stays after its last write (see `settled`)
ANCIENT = 3600.0  # a state file last written this long ago: its orphans had their time
PERIOD = 30.0  # seconds between passes while a state file waits for its GRACE
IDLE_PERIOD = 300.0  # and otherwise, when no scrape saw a gone master's file meanwhile
MAX_AGGREGATE = 16 * 1024 * 1024  # far above what the contract's series and one batch take

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
# Temporary files a writer of an incarnation leaves when it dies mid-write (store.py, state.py).
_TEMPORARY = re.compile(
    r"\.(?:counter|histogram|gauge_max)_([0-9-]+)\.db\.[0-9]+\.tmp|master-([0-9-]+)\.json\.[0-9]+\.tmp"
)
_OWN_TEMPORARY = re.compile(r"\.retired\.json\.([0-9]+)\.tmp")

# Test hook: called with the name of each crash-relevant step; tests kill the process there.
_crash_hook: Callable[[str], None] | None = None


def _checkpoint(step: str) -> None:
    if _crash_hook is not None:
        _crash_hook(step)


class Unreadable(Exception):
    """retired.json exists but cannot be read as one (`kind`: an error kind of the collector)."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind


@dataclass
class Retired:
    """What one retired.json held: the sum, the names it folded last, and its identity."""

    samples: dict[counts.Key, float] = field(default_factory=dict)
    listed: frozenset[str] = frozenset()
    identity: tuple[int, int] | None = None  # (st_dev, st_ino); None: there is none yet
    errors: dict[str, int] = field(default_factory=dict)  # samples the contract rejects


def read(dir_fd: int) -> Retired:
    """The current retired.json (an empty one if there is none); Unreadable if it is not one."""
    with reading(dir_fd) as retired:
        return retired


@contextlib.contextmanager
def reading(dir_fd: int) -> Iterator[Retired]:
    """The current retired.json, held open for a reader to ask `unchanged` before it lets
    go: an open file's inode is never given to another, so a rename over it always shows."""
    try:
        fd = os.open(AGGREGATE, os.O_RDONLY | _NOFOLLOW, dir_fd=dir_fd)
    except FileNotFoundError:
        yield Retired()
        return
    except OSError as e:
        raise Unreadable("unreadable", f"{AGGREGATE}: {e.strerror}") from None
    try:
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise Unreadable("unreadable", f"{AGGREGATE} is not a regular file")
            data = os.read(fd, MAX_AGGREGATE + 1)
        except OSError as e:
            raise Unreadable("unreadable", f"{AGGREGATE}: {e.strerror}") from None
        retired = parse(data)
        retired.identity = (st.st_dev, st.st_ino)
        yield retired
    finally:
        os.close(fd)


def parse(data: bytes) -> Retired:
    """retired.json's bytes, checked: Unreadable unless whole; a sample outside the contract
    is left out and counted (counts.of_entries's rules)."""
    try:
        raw = json.loads(data)
        listed = raw["retired"]
        samples = raw["samples"]
        if not isinstance(listed, list) or not all(isinstance(n, str) for n in listed):
            raise ValueError("retired is not a list of names")
        if not isinstance(samples, list):
            raise ValueError("samples is not a list")
        by_kind: dict[str, list[compaction.Entry]] = {}
        for item in samples:
            kind, name, sample, labels, value = item
            if not (isinstance(labels, dict) and all(isinstance(v, str) for v in labels.values())):
                raise ValueError("labels")
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError("value")
            pairs = tuple(sorted(labels.items()))
            entry = compaction.Entry("", name, sample, pairs, "", float(value), 0.0)
            by_kind.setdefault(kind, []).append(entry)
    except (ValueError, TypeError, KeyError, UnicodeDecodeError) as e:
        raise Unreadable("malformed", f"{AGGREGATE}: {e}") from None
    retired = Retired(listed=frozenset(listed))
    for kind, entries in by_kind.items():
        found = counts.of_entries(kind, counts.GAUGE_MODE, entries)
        retired.samples.update(found.samples)  # one entry per key: no sum needed
        for why, n in found.errors.items():
            retired.errors[why] = retired.errors.get(why, 0) + n
    return retired


def encode(samples: dict[counts.Key, float], listed: list[str]) -> bytes:
    rows = [
        [counts.SPECS[name].kind, name, sample, dict(labels), value]
        for (name, sample, labels), value in sorted(samples.items())
    ]
    return json.dumps({"samples": rows, "retired": listed}, separators=(",", ":")).encode()


def unchanged(dir_fd: int, retired: Retired) -> bool:
    """retired.json is still the one `reading` holds open (or still absent)."""
    try:
        st = os.stat(AGGREGATE, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return retired.identity is None
    return (st.st_dev, st.st_ino) == retired.identity


def read_counts(dir_fd: int, name: str) -> counts.FileCounts:
    """One count file, validated; compaction.BadFile or FileNotFoundError otherwise."""
    db = parse_name(name)
    if db is None:
        raise compaction.BadFile("name", name)
    return counts.of_entries(db.typ, db.mode, compaction.read_entries(name, dir_fd))


@dataclass
class Listing:
    """One listing of `gunicorn-monitor/`, sorted by what each file is to retirement."""

    judge: incarnation.Judge
    count_files: dict[str, incarnation.Incarnation | None]  # *.db -> its writer, if a master
    state_files: dict[str, incarnation.Incarnation]
    temporaries: list[tuple[str, incarnation.Incarnation]]
    own_temporaries: list[tuple[str, int]]

    def gone(self, name: str) -> bool:
        inc = self.count_files.get(name) or self.state_files.get(name)
        return inc is not None and self.judge.gone(inc)


def listing(
    dir_fd: int,
    names: list[str] | None = None,
    legacy_start: bool = False,
    known_gone: set[incarnation.Incarnation] | frozenset = frozenset(),
) -> Listing:
    """Sort a listing of the directory; `legacy_start` reads the start times that earlier
    versions' state files recorded, so that a reused pid does not keep their files forever;
    `known_gone` as incarnation.Judge's."""
    if names is None:
        names = os.listdir(dir_fd)
    count_files: dict[str, incarnation.Incarnation | None] = {}
    state_files: dict[str, incarnation.Incarnation] = {}
    temporaries, own_temporaries = [], []
    for name in names:
        if name.endswith(".db"):
            db = parse_name(name)
            if db is not None:
                count_files[name] = incarnation.parse(db.ident)
        elif (inc := incarnation.of_state_file(name)) is not None:
            state_files[name] = inc
        elif (found := _TEMPORARY.fullmatch(name)) is not None:
            inc = incarnation.parse(found.group(1) or found.group(2))
            if inc is not None:
                temporaries.append((name, inc))
        elif (found := _OWN_TEMPORARY.fullmatch(name)) is not None:
            own_temporaries.append((name, int(found.group(1))))
    incs = [i for i in count_files.values() if i is not None] + list(state_files.values())
    starts = {}
    if legacy_start:
        for name, inc in state_files.items():
            if inc.start is None and (started := _recorded_start(dir_fd, name)) is not None:
                starts[inc.pid] = started
    judge = incarnation.Judge(incs, starts, known_gone)
    return Listing(judge, count_files, state_files, temporaries, own_temporaries)


def _recorded_start(dir_fd: int, name: str) -> float | None:
    raw = _read_json(dir_fd, name)
    value = raw.get("start_time") if isinstance(raw, dict) else None
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _read_json(dir_fd: int, name: str) -> object:
    try:
        fd = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=dir_fd)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        return json.loads(os.read(fd, 1 << 20))
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)


def settled(dir_fd: int, name: str, now: float, quiet: dict[str, float]) -> bool:
    """A gone master's state file may go: GRACE seconds since it was last written, and GRACE
    since this sidecar first saw (`quiet`: name -> then) none of the workers it lists run a
    process that started before that write: an orphan, whose exit is counted from this file
    by whoever outlived the master. A file last written ANCIENT ago needs no such sighting.
    A file that says nothing readable goes after GRACE.
    """
    try:
        mtime = os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mtime
    except FileNotFoundError:
        return False
    if now - mtime < GRACE:
        return False
    raw = _read_json(dir_fd, name)
    recorded = raw.get("workers") if isinstance(raw, dict) else None
    for pid in recorded if isinstance(recorded, dict) else ():
        if isinstance(pid, str) and pid.isascii() and pid.isdigit() and _orphan(int(pid), mtime):
            quiet.pop(name, None)
            return False
    if now - mtime >= ANCIENT:
        return True
    return now - quiet.setdefault(name, now) >= GRACE


def _orphan(pid: int, written: float) -> bool:
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and proc.create_time() <= written + 1.0
    except (psutil.Error, OSError, ValueError):
        return False


@dataclass
class Report:
    folded: int = 0  # count files folded into retired.json
    removed: int = 0  # files removed (count files, state files, temporaries)
    unreadable: int = 0  # gone masters' count files that could not be read: left in place
    waiting: int = 0  # gone masters' state files not yet settled
    busy: bool = False  # another retirement held the lock
    errors: dict[str, int] = field(default_factory=dict)  # samples the contract rejected


class NotOurs(Exception):
    """This sidecar may not write the directory (another user's, read-only, unsafe)."""


def retire(
    layout: Layout,
    now: float | None = None,
    commits: threading.Lock | None = None,
    quiet: dict[str, float] | None = None,
) -> Report:
    """One retirement pass (the module docstring's protocol); NotOurs if this process may not
    write the directory, Unreadable if retired.json cannot be read. `commits` is held around
    each commit and its unlinks: a reader in this process that holds it never reads again.
    `quiet`: what earlier passes saw of state files' orphans (`settled`), kept by the caller."""
    try:
        dir_fd = directory.open_private(layout, create=False)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return Report()  # no Gunicorn has run here yet: nothing to retire
        raise NotOurs(str(e)) from None
    try:
        when = time.time() if now is None else now
        return _locked(dir_fd, when, commits, {} if quiet is None else quiet)
    finally:
        os.close(dir_fd)


def _locked(
    dir_fd: int, now: float, commits: threading.Lock | None, quiet: dict[str, float]
) -> Report:
    try:
        lock = os.open(LOCK, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600, dir_fd=dir_fd)
    except OSError as e:
        raise NotOurs(f"{LOCK}: {e.strerror}") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return Report(busy=True)  # another sidecar is retiring: its work, not ours
        return _pass(dir_fd, now, commits or contextlib.nullcontext(), quiet)
    finally:
        os.close(lock)


def _pass(
    dir_fd: int, now: float, commits: contextlib.AbstractContextManager, quiet: dict[str, float]
) -> Report:
    report = Report()
    current = read(dir_fd)
    report.removed += _unlink_all(dir_fd, current.listed)  # 1. roll forward
    found = listing(dir_fd, legacy_start=True)
    for name, pid in found.own_temporaries:
        if pid == os.getpid() or not state.pid_exists(pid):
            report.removed += _unlink(dir_fd, name)
    # State files first: every reader of the directory reads each of them (a scrape, the
    # sampler, /-/ready), the count files are read once.
    waiting = set()
    for name, inc in found.state_files.items():
        if found.judge.gone(inc):
            if settled(dir_fd, name, now, quiet):
                report.removed += _unlink(dir_fd, name)
            else:
                waiting.add(name)
    for name in set(quiet) - waiting:
        del quiet[name]  # removed, or no longer there: nothing to remember
    report.waiting = len(waiting)
    gone = sorted(n for n in found.count_files if n not in current.listed and found.gone(n))
    for start in range(0, len(gone), BATCH):
        total = dict(current.samples)
        folded = []
        for name in gone[start : start + BATCH]:  # 2. fold
            try:
                found_counts = read_counts(dir_fd, name)
            except FileNotFoundError:
                continue  # another sidecar's retirement, or an operator, was first
            except compaction.BadFile:
                report.unreadable += 1
                continue  # kept in place, skipped and counted by the collector
            counts.add(total, found_counts.samples)
            for why, n in found_counts.errors.items():
                report.errors[why] = report.errors.get(why, 0) + n
            folded.append(name)
        if not folded:
            continue
        with commits:
            _commit(dir_fd, total, folded)  # 3.
            report.folded += len(folded)
            report.removed += _unlink_all(dir_fd, folded)  # 4.
        current = Retired(total, frozenset(folded))
    for name, inc in found.temporaries:
        if found.judge.gone(inc):
            report.removed += _unlink(dir_fd, name)
    return report


def _commit(dir_fd: int, samples: dict[counts.Key, float], listed: list[str]) -> None:
    data = encode(samples, listed)
    tmp = f".{AGGREGATE}.{os.getpid()}.tmp"
    _unlink(dir_fd, tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=dir_fd)
    try:
        try:
            if os.write(fd, data) != len(data):
                raise OSError(errno.ENOSPC, "short write")
            os.fsync(fd)
        finally:
            os.close(fd)
        _checkpoint("written")
        os.rename(tmp, AGGREGATE, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)  # the commit point
    except BaseException:
        with contextlib.suppress(OSError):
            _unlink(dir_fd, tmp)
        raise
    _checkpoint("renamed")
    os.fsync(dir_fd)
    _checkpoint("committed")


def _unlink(dir_fd: int, name: str) -> int:
    try:
        os.unlink(name, dir_fd=dir_fd)
        return 1
    except FileNotFoundError:
        return 0


def _unlink_all(dir_fd: int, names: Iterator[str] | frozenset[str] | list[str]) -> int:
    removed = 0
    for i, name in enumerate(sorted(names)):
        removed += _unlink(dir_fd, name)
        if i == 0:
            _checkpoint("unlinked-one")
    if removed:
        os.fsync(dir_fd)  # before a later commit stops naming them
    _checkpoint("unlinked")
    return removed


class Retirer:
    """Runs retirement passes on a thread of its own: at start, when `wake()`d (a scrape saw a
    gone master's files), every PERIOD while a state file waits for its GRACE, and every
    IDLE_PERIOD otherwise (a sidecar nobody scrapes still keeps the directory small).

    `writing` says whether this sidecar retires (False: it may not write the directory, or
    retired.json cannot be read; the collector then folds in memory). `first_pass` is True
    until the first pass is over. `generation` moves whenever either changes, for the scrape's
    inputs (a kept body made while the first pass ran is not kept past it). `errors`: the
    samples of the files it folded that the contract rejected (cumulative, by kind), for the
    collector's count: a file folded here is never read by the collector.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.writing = True
        self.first_pass = True
        self.generation = 0
        self.lock = threading.Lock()  # held by a commit, and by a collector's read
        self._wake = threading.Event()
        self._said: str | None = None
        self.errors: dict[str, int] = {}
        self._quiet: dict[str, float] = {}  # state files whose orphans were last seen gone
        self._thread = threading.Thread(target=self._run, name="retirement", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _run(self) -> None:
        while True:
            report = self.run_once()
            self._wake.wait(PERIOD if report is not None and report.waiting else IDLE_PERIOD)
            self._wake.clear()

    def run_once(self) -> Report | None:
        started = time.monotonic()
        try:
            report = retire(self.layout, commits=self.lock, quiet=self._quiet)
            self._state(None)
        except NotOurs as e:
            report = None
            self._state(f"not retiring gone masters' files (folded in memory): {e}")
        except Unreadable as e:
            report = None
            self._state(f"not retiring gone masters' files: {e}")
        except OSError as e:
            report = None
            self._state(f"retirement failed, retried at the next pass: {e}")
        for why, n in report.errors.items() if report is not None else ():
            self.errors[why] = self.errors.get(why, 0) + n
        if report is not None and (report.folded or report.removed):
            log.info(
                "event=retired folded=%d removed=%d unreadable=%d waiting=%d seconds=%.3f",
                report.folded,
                report.removed,
                report.unreadable,
                report.waiting,
                time.monotonic() - started,
            )
        writing = report is not None
        if writing != self.writing or self.first_pass:
            self.writing, self.first_pass = writing, False
            self.generation += 1
        return report

    def _state(self, why: str | None) -> None:
        if why != self._said:
            self._said = why
            if why is not None:
                log.warning("event=retirement dir=%s reason=%r", self.layout.own, why)
