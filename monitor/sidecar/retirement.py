"""Retirement of gone masters' files: their counts folded into `retired.json`, the files removed.

Why: every master start (a restart, a crash loop, each USR2 upgrade) leaves a set of files in
`gunicorn-monitor/`: its counts (`counter_`, `histogram_`, `gauge_max_<pid>.db`), its state
(`master-<pid>.json`) and its heartbeat (`heartbeat/<pid>`). Kept forever, 50,000 of them made
the first scrape take 23.7 s and an idle sidecar burn 37 % of a core. Their counts must outlive
them (a total that drops is a counter reset to Prometheus), so they are folded into one file
before the files go.

The files (all in `gunicorn-monitor/`, opened relative to a checked directory fd, without
following a symlink):

    counter_<pid>.db, histogram_<pid>.db, gauge_max_<pid>.db, master-<pid>.json,
    heartbeat/<pid>      one master's; written only by the holder of the flock on its
                         heartbeat file (contract/state.py, "Who writes a master's files")
    retired.json         {"samples": the validated sum of every retired file's counts
                          (sidecar/counts.py), "retired": the names folded by the last commit}
    .retired.json.<pid>.tmp   a commit being written
    .retire.lock         flock: one retirement at a time (never taken by a reader, or by Gunicorn)

Who retires: the sidecar, when it may write the directory (the same user as Gunicorn, as
shipped: `directory.open_private` is the writers' check), from one thread of its own. A sidecar
that may not (another user, a read-only mount) retires nothing and folds the gone masters'
files in memory instead (collectors/lifecycle.py): the same counts, and the directory keeps
what it has. Never the hooks: Gunicorn never waits on this, and a master never waits for the
locks it takes (they are taken with LOCK_NB on both sides).

Which: the files of a master that is accounted for, as contract/state.py says a retirer must:
its state file says `stopped` (it counted its workers at its exit, or the master that claimed
its orphans counted those and marked it so), or there is no state file of its pid; and only
while this sidecar holds LOCK_EX | LOCK_NB on `heartbeat/<pid>` (created if missing), which its
master holds for its whole life, then whoever counts its orphans, and which a new master given
the same pid takes before it adopts or writes a count. So nobody writes those files while they
are folded and removed, and a new master of that pid finds none to adopt: no count twice, none
lost, pid reuse or not. A state file that does not say `stopped` (its orphans are still owed),
or says nothing readable, keeps its master's files. A file that cannot be read is left where it
is (collectors/lifecycle.py skips and counts it), and its master's with it: never folded half.

The protocol (a retirement killed at any instruction neither loses nor doubles a count):
  1. roll forward: every name the current retired.json lists is unlinked if still there (a
     crash after a commit), and the directory fsynced, before the next commit may stop listing
     them; leftover temporaries of ours are removed (a crash before a commit).
  2. lock and fold: take the heartbeat locks of a batch of accounted masters, read their count
     files again under them and validate them; add them to the current sum in memory. (Before
     any batch, a first sweep under the same locks removes the accounted masters' state files
     alone, which every reader reads at every look: what they said is said, and a master with
     counts and no state file is as accounted for as it was. Nothing is counted there.)
  3. commit: write the new retired.json to a temporary name, fsync, rename it over the old
     one, fsync the directory. The rename is the single commit point: before it, the batch's
     files are counted from themselves; after it, from retired.json, which names them.
  4. unlink the batch's count files, then their heartbeat files, fsync the directory, let go
     of the locks. A crash here leaves files that retired.json names:
     readers skip them, and step 1 of the next retirement removes them.
Readers (collectors/lifecycle.py) need no lock: they hold retired.json open, skip every file
it names, read the rest, and check that retired.json is still the file they hold (a rename
over it shows as another inode, and an open file's inode is never given to another); if not,
they read again. A file removed between their listing and their read was then in the
retired.json they check against, so nothing is counted twice or lost, and a reader that may not
write takes part on the same terms.

Bounded: retired.json holds the contract's series (label values from fixed sets) and the
names of one batch; the directory holds the live masters' files, those of dead masters whose
orphans are still owed, and files that could not be read.

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
import resource
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from monitor.contract import directory, heartbeat, state
from monitor.contract.appfiles import parse_name
from monitor.contract.directory import Layout
from monitor.sidecar import compaction, counts
from monitor.sidecar.masters import BACKLOG, MasterIndex

log = logging.getLogger("gunicorn_monitor")

AGGREGATE = "retired.json"
LOCK = ".retire.lock"
# Masters folded per commit: their heartbeat locks are held at once, one fd each, so a quarter
# of the fds this process may open (each commit costs three fsyncs: few and large is fast).
BATCH = max(64, min(2000, resource.getrlimit(resource.RLIMIT_NOFILE)[0] // 4))
PERIOD = 300.0  # seconds between passes when no scrape saw an accounted master's files
MAX_AGGREGATE = 16 * 1024 * 1024  # far above what the contract's series and one batch take

_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
_STATE = re.compile(r"master-([0-9]{1,7})\.json")
# Temporary files a writer of a master's files leaves when it dies mid-write (store.py, state.py).
_TEMPORARY = re.compile(
    r"\.(?:counter|histogram|gauge_max)_([0-9]{1,7})\.db\.[0-9]+\.tmp|master-([0-9]{1,7})\.json\.[0-9]+\.tmp"
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
    """One listing of `gunicorn-monitor/`, sorted by master: what each pid has there."""

    count_files: dict[str, int | None] = field(default_factory=dict)  # *.db -> its master's pid
    state_files: dict[int, str] = field(default_factory=dict)  # pid -> master-<pid>.json
    temporaries: dict[int, list[str]] = field(default_factory=dict)  # pid -> its stale writes
    own_temporaries: list[tuple[str, int]] = field(default_factory=list)
    by_pid: dict[int, list[str]] = field(default_factory=dict)  # pid -> its count files

    def of(self, pid: int) -> list[str]:
        """The count files of the master `pid`."""
        return self.by_pid.get(pid, [])


def listing(names: list[str]) -> Listing:
    found = Listing()
    for name in names:
        if name.endswith(".db"):
            db = parse_name(name)
            if db is not None:
                pid = int(db.ident) if db.ident.isascii() and db.ident.isdigit() else None
                found.count_files[name] = pid
                if pid is not None:
                    found.by_pid.setdefault(pid, []).append(name)
        elif (match := _STATE.fullmatch(name)) is not None:
            found.state_files[int(match.group(1))] = name
        elif (match := _TEMPORARY.fullmatch(name)) is not None:
            pid = int(match.group(1) or match.group(2))
            found.temporaries.setdefault(pid, []).append(name)
        elif (match := _OWN_TEMPORARY.fullmatch(name)) is not None:
            found.own_temporaries.append((name, int(match.group(1))))
    return found


def accounted(dir_fd: int, pid: int, found: Listing) -> bool:
    """The master `pid` is accounted for (module docstring): its state file says `stopped`, or
    there is none. Taken as a candidate only: it is asked again under its heartbeat lock."""
    if pid not in found.state_files:
        return True
    loaded = state.load(dir_fd, pid)
    return loaded is not None and loaded[1].stopped


@dataclass
class Report:
    folded: int = 0  # count files folded into retired.json
    removed: int = 0  # files removed (count, state, heartbeat files, temporaries)
    unreadable: int = 0  # accounted masters' count files that could not be read: left in place
    busy: bool = False  # another retirement held the lock
    errors: dict[str, int] = field(default_factory=dict)  # samples the contract rejected


class NotOurs(Exception):
    """This sidecar may not write the directory (another user's, read-only, unsafe)."""


def retire(layout: Layout, commits: threading.Lock | None = None) -> Report:
    """One retirement pass (the module docstring's protocol); NotOurs if this process may not
    write the directory, Unreadable if retired.json cannot be read. `commits` is held around
    each commit and its unlinks: a reader in this process that holds it never reads again."""
    try:
        dir_fd = directory.open_private(layout, create=False)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return Report()  # no Gunicorn has run here yet: nothing to retire
        raise NotOurs(str(e)) from None
    try:
        try:
            lock = os.open(LOCK, os.O_RDWR | os.O_CREAT | _NOFOLLOW, 0o600, dir_fd=dir_fd)
        except OSError as e:
            raise NotOurs(f"{LOCK}: {e.strerror}") from None
        try:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return Report(busy=True)  # another sidecar is retiring: its work, not ours
            return _pass(layout, dir_fd, commits or contextlib.nullcontext())
        finally:
            os.close(lock)
    finally:
        os.close(dir_fd)


def _pass(layout: Layout, dir_fd: int, commits: contextlib.AbstractContextManager) -> Report:
    report = Report()
    current = read(dir_fd)
    report.removed += _unlink_all(dir_fd, current.listed)  # 1. roll forward
    names = os.listdir(dir_fd)
    found = listing(names)
    for name, pid in found.own_temporaries:
        if pid == os.getpid() or not state.pid_exists(pid):
            report.removed += _unlink(dir_fd, name)
    hb_fd = directory.open_heartbeats(dir_fd, layout, create=True)
    try:
        # State files first: every reader reads each of them at every look (a scrape, the
        # sampler, the masters' scan for orphans), a count file is read once. Then the counts,
        # of masters accounted for (now with no state file, or never with one).
        stated = sorted(p for p in found.state_files if accounted(dir_fd, p, found))
        for batch in _batches(stated):
            with _locked(dir_fd, hb_fd, batch, found) as locks:
                _retire_states(dir_fd, hb_fd, locks, found, commits, report)
        pids = {p for p in found.count_files.values() if p is not None} | set(found.state_files)
        pids |= _heartbeats(hb_fd)
        candidates = sorted(p for p in pids if accounted(dir_fd, p, found))
        for batch in _batches(candidates):
            with _locked(dir_fd, hb_fd, batch, found) as locks:
                current = _retire_batch(dir_fd, hb_fd, locks, found, current, commits, report)
    finally:
        os.close(hb_fd)
    return report


def _batches(pids: list[int]) -> Iterator[list[int]]:
    for start in range(0, len(pids), BATCH):
        yield pids[start : start + BATCH]


@contextlib.contextmanager
def _locked(
    dir_fd: int, hb_fd: int, pids: list[int], found: Listing
) -> Iterator[dict[int, tuple[int, bool]]]:
    """The heartbeat locks of `pids` this could take (`_lock_all`), let go of at the end; a
    heartbeat file this made is removed first, whatever became of its master's files."""
    locks = _lock_all(dir_fd, hb_fd, pids, found)
    try:
        yield locks
    finally:
        for pid, (fd, made) in locks.items():
            if made:
                _unlink(hb_fd, str(pid))
            os.close(fd)


def _retire_states(
    dir_fd: int,
    hb_fd: int,
    locks: dict[int, tuple[int, bool]],
    found: Listing,
    commits: contextlib.AbstractContextManager,
    report: Report,
) -> None:
    """The state files of masters accounted for, and their heartbeats: what they said is
    said (their counts stay where they are, counted from themselves until step 2)."""
    with commits:
        gone = [found.state_files.pop(pid) for pid in sorted(locks)]
        gone += [t for pid in locks for t in found.temporaries.pop(pid, ())]
        for name in gone:  # no fsync: a state file a crash brings back only says it again
            report.removed += _unlink(dir_fd, name)
        for pid in locks:
            if not found.of(pid):  # nothing else of it: its heartbeat goes now
                report.removed += _unlink(hb_fd, str(pid))


def _heartbeats(hb_fd: int) -> set[int]:
    """The pids with a heartbeat file: a master that left nothing else is retired too."""
    return {int(n) for n in os.listdir(hb_fd) if n.isascii() and n.isdigit() and len(n) < 8}


def _lock_all(
    dir_fd: int, hb_fd: int, pids: list[int], found: Listing
) -> dict[int, tuple[int, bool]]:
    """The heartbeat locks of those `pids` nobody else holds, each master asked again under
    its lock (still accounted for, the lock still on the file at heartbeat/<pid>). A heartbeat
    file this made and does not keep a lock on is removed before the lock goes."""
    locks = {}
    for pid in pids:
        held = _lock(hb_fd, str(pid))
        if held is None:
            continue  # its master, or whoever counts its orphans: not ours to retire
        fd, made = held
        if heartbeat.still_linked(hb_fd, str(pid), fd) and accounted(dir_fd, pid, found):
            locks[pid] = held
            continue
        if made:
            _unlink(hb_fd, str(pid))
        os.close(fd)
    return locks


def _retire_batch(
    dir_fd: int,
    hb_fd: int,
    locks: dict[int, tuple[int, bool]],
    found: Listing,
    current: Retired,
    commits: contextlib.AbstractContextManager,
    report: Report,
) -> Retired:
    total = dict(current.samples)
    folded, done = [], []
    for pid in sorted(locks):  # 2. fold
        files, read_all = [], True
        for name in found.of(pid):
            try:
                found_counts = read_counts(dir_fd, name)
            except FileNotFoundError:
                continue  # another sidecar's retirement, or an operator, was first
            except compaction.BadFile:
                report.unreadable += 1
                read_all = False
                break  # kept in place with its master's, skipped and counted by the collector
            files.append((name, found_counts))
        if not read_all:
            continue
        for name, found_counts in files:
            counts.add(total, found_counts.samples)
            for why, n in found_counts.errors.items():
                report.errors[why] = report.errors.get(why, 0) + n
            folded.append(name)
        done.append(pid)
    if not done:
        return current
    with commits:
        if folded:
            _commit(dir_fd, total, folded)  # 3.
            report.folded += len(folded)
        report.removed += _unlink_all(dir_fd, folded)  # 4.
        rest = [found.state_files[p] for p in done if p in found.state_files]
        rest += [t for p in done for t in found.temporaries.get(p, ())]
        report.removed += _unlink_all(dir_fd, rest)
        for pid in done:
            report.removed += _unlink(hb_fd, str(pid))
    return Retired(total, frozenset(folded)) if folded else current


def _lock(hb_fd: int, name: str) -> tuple[int, bool] | None:
    """LOCK_EX | LOCK_NB on heartbeat/<name>, made if missing (as hooks/beat.py does), and
    whether this made it; None when someone holds it, or it cannot be opened as a regular file
    (a symlink or a FIFO in its place is not ours to remove here)."""
    made = False
    try:
        fd = os.open(name, os.O_RDONLY | heartbeat.FLAGS, dir_fd=hb_fd)
    except FileNotFoundError:
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_CREAT | os.O_EXCL | heartbeat.FLAGS, 0o600, dir_fd=hb_fd
            )
            made = True
        except OSError:
            return None  # made by a master meanwhile: its turn
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return None
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)  # a file we made is locked by another already: theirs to remove
        return None
    return fd, made


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
    """Runs retirement passes on a thread of its own: at start, when `wake()`d (a scrape saw an
    accounted master's files), and every PERIOD (a sidecar nobody scrapes still keeps the
    directory small).

    `writing` says whether this sidecar retires (False: it may not write the directory, or
    retired.json cannot be read; the collector then folds in memory). `first_pass` is True
    until the first pass is over. `generation` moves whenever either changes, for the scrape's
    inputs (a kept body made while the first pass ran is not kept past it). `errors`: the
    samples of the files it folded that the contract rejected (cumulative, by kind), for the
    collector's count: a file folded here is never read by the collector.

    The backlog: with `index` (the sidecar's sidecar/masters.py), the thread first lists the
    directory through it; when more than BACKLOG files there are dead masters' (months of
    restarts, a Gunicorn run without a sidecar), `backlog` is True until its first pass has
    folded them and the index has parsed the state files it left (`index.read_backlog`).
    Meanwhile scrapes leave out the lifecycle counter families instead of reading it (a gap:
    collectors/lifecycle.py) and /-/ready says so (`reading`); one log line says it at the
    start and one when it is done.
    """

    def __init__(self, layout: Layout, index: MasterIndex | None = None) -> None:
        self.layout = layout
        self.index = index
        self.writing = True
        self.first_pass = True
        self.generation = 0
        self.lock = threading.Lock()  # held by a commit, and by a collector's read
        self._wake = threading.Event()
        self._said: str | None = None
        self._backlog_done = index is None
        self.errors: dict[str, int] = {}
        self._thread = threading.Thread(target=self._run, name="retirement", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    @property
    def backlog(self) -> bool:
        """The dead masters' files found at start are still being read (see the class)."""
        index = self.index
        if self._backlog_done or index is None:
            return False
        large = index.gone_at_start > BACKLOG and self.first_pass and self.writing
        return large or index.unread > 0

    @property
    def reading(self) -> str | None:
        """While `backlog`, the one line that says so (for /-/ready and the log); else None."""
        if not self.backlog or self.index is None:
            return None
        return (
            f"reading the files of dead masters once ({self.index.gone_at_start} found at "
            f"start in {self.layout.own}; {self.index.unread} state files left to parse after "
            "retirement): the lifecycle counter families are left out of scrapes until then"
        )

    def _run(self) -> None:
        self._first()
        while True:
            self._wake.wait(PERIOD)
            self._wake.clear()
            self.run_once()

    def _first(self) -> None:
        """The first pass, and with it the backlog (the class docstring)."""
        started, said = time.monotonic(), None
        try:
            if self.index is not None:
                self.index.look()  # the first listing, unless a scrape made it already
                said = self.reading
                if said is not None:
                    log.info("event=backlog_reading dir=%s reason=%r", self.layout.own, said)
            self.run_once()
            if self.index is not None:
                self.index.read_backlog()
        except Exception as e:  # never a backlog said forever: the counts come back
            log.error("event=backlog_failed dir=%s error=%r", self.layout.own, e)
        finally:
            self._backlog_done = True
            self.generation += 1
        if said is not None:
            log.info(
                "event=backlog_read dir=%s files=%d seconds=%.3f",
                self.layout.own,
                self.index.gone_at_start if self.index is not None else 0,
                time.monotonic() - started,
            )

    def run_once(self) -> Report | None:
        started = time.monotonic()
        try:
            report = retire(self.layout, commits=self.lock)
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
                "event=retired folded=%d removed=%d unreadable=%d seconds=%.3f",
                report.folded,
                report.removed,
                report.unreadable,
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
