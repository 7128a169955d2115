"""Lifecycle metrics: the counts the hooks recorded, and the state of the live masters.

Counts come from the prometheus_client files in the monitor's subdirectory, one set per master
(`counter_<pid>.db` and its siblings), each checked against the contract by sidecar/counts.py,
plus `retired.json`: the counts of dead masters accounted for, whose files the sidecar's
retirement (sidecar/retirement.py) folded and removed. A file that retired.json names is
skipped (it is being removed); retired.json is opened first and held open while the files are
listed and read, and the read is made again if a retirement renamed another over it meanwhile
(an open file's inode is never given to another), so a retirement in any process never makes
a count appear twice or go missing.

The files of a master accounted for (its state file says `stopped`: contract/state.py; or it
has none, and no process has its pid) are final: each is read once and folded into a sum kept
in memory (made again from the files only when one of them vanishes, retired by this sidecar or
another, or is written anew, by a new master given the pid). So a sidecar that may not write
the directory serves the same counts, reading only the other masters' files on each collection.
While the sidecar reads a backlog of dead masters' files found at start (retirement.Retirer.
`backlog`: thousands of restarts left by a Gunicorn that ran without a sidecar, or by an earlier
version), the count families are left out and none of those files is looked at (a gap, said at
its start and end in the log and on /-/ready) rather than read in a scrape or served short; the
collection after it has them all. (Without that, the same holds while this sidecar's first
retirement runs over more than READ_AT_ONCE unread files of such masters.)

A bad file costs only itself. A file that cannot be read (garbage, cut mid-record, another
user's, a FIFO or a symlink in its place) is skipped and counted
(`gunicorn_exporter_files_skipped_total`, `gunicorn_exporter_errors_total{kind="malformed" or
"unreadable"}`), and every other file and family is still served. But never a drop: the counts
are sums over files, and a sum that goes down is a counter reset to Prometheus, from which
increase() would invent as many exits as the file held. So a file this sidecar read good before
(a live master's, one of a master since accounted for, retired.json) that now cannot be read,
or that vanished while its master runs (the master writes it again within a loop turn), is
served with the values last read from it, for as long as it stays so: the closest thing to the
truth there is, since the master only ever adds to them. What is left is said plainly: a file
never read good is simply missing from the sums, so while one of a type is missing, no series
of that type starts at 0 (counts._with_defaults): it may be the one that file holds. (One case
is not covered: a file of a master accounted for that became unreadable after it was folded,
when the fold must be made again because another such file vanished: the rebuild leaves it out.
Folds are made again only when a retirement removed files, promptly after the master is
accounted for.)

A directory that cannot be listed or opened leaves out everything here. One that is missing is
zero only if this sidecar never read a count there: removed under running masters (`rm -rf`),
it comes back within a turn of their loops, each master writing its files whole from the counts
it keeps in memory, one master after another. Meanwhile a file of a master that still runs (the
same process this sidecar saw live, by its /proc start) is served with the values last read
from it, whether the directory or only that file is missing. What a removal takes for good is
what no running process will write again: the files of masters gone before it, and
retired.json; and a sidecar that starts while it is missing has read nothing. (The masters'
gauges say what the state files there say: until each master has written its own again, at
the end of its loop turn, it is not counted. A missing top directory is readiness.py's.)

The masters' gauges (up, workers, desired) come from the state files, parsed by
contract/state.py as they change (sidecar/masters.py): a malformed file is skipped alone;
one that cannot be read may be a live master's, so it leaves the gauges out; a worker counts
only while it is a live child of its live master (a zombie is not: a stopped master reaps
nothing). A live master is up only while it is not stopped and its loop turns
(sidecar/liveness.py); the largest heartbeat age over the live masters is served beside it,
when one could be read.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric

from monitor.contract import directory, metrics, state
from monitor.contract.appfiles import parse_name
from monitor.contract.directory import Layout
from monitor.sidecar import compaction, counts, retirement
from monitor.sidecar.liveness import Liveness
from monitor.sidecar.masters import MasterIndex

log = logging.getLogger("gunicorn_monitor")

READ_AT_ONCE = 256  # unread files of gone masters a collection reads while a retirement runs
ATTEMPTS = 3  # reads of the counts before a collection gives up on a retirement racing it


@dataclass
class Stats:
    """Cumulative, for the exporter's self-metrics."""

    files_skipped: int = 0
    errors: dict[str, int] = field(default_factory=dict)


@dataclass
class _Reading:
    """One consistent read of the counts, not yet taken as the collector's own."""

    total: dict[counts.Key, float] = field(default_factory=dict)
    whole: set[str] = field(default_factory=lambda: set(counts.KINDS))
    errors: dict[str, int] = field(default_factory=dict)
    skipped: int = 0
    known: dict[str, counts.FileCounts] = field(default_factory=dict)
    retired: retirement.Retired | None = None
    deferred: int = 0  # unread files of gone masters left to the retirement: no families

    def error(self, kind: str, n: int = 1) -> None:
        if n:
            self.errors[kind] = self.errors.get(kind, 0) + n

    def add(self, found: counts.FileCounts) -> None:
        counts.add(self.total, found.samples)
        for kind, n in found.errors.items():
            self.error(kind, n)


class _GoneFold:
    """The count files of masters accounted for and not yet retired, summed in memory, each
    read once (by name and inode: a new master given the pid writes its adopted file anew)."""

    def __init__(self) -> None:
        self.names: dict[str, int] = {}  # name -> inode, of the files in the sum
        self.total: dict[counts.Key, float] = {}
        self.whole: set[str] = set(counts.KINDS)

    def update(
        self,
        dir_fd: int,
        present: dict[str, int],
        reading: _Reading,
        last: dict[str, counts.FileCounts],
    ) -> None:
        """Fold the `present` files (name -> inode) not folded yet; `last`: what was read good
        from each while its master ran, which stands for a file that cannot be read now."""
        if any(present.get(name) != inode for name, inode in self.names.items()):
            # One was retired (or removed, or written anew): made again from the rest.
            self.names, self.total, self.whole = {}, {}, set(counts.KINDS)
        for name in sorted(present.keys() - self.names.keys()):
            try:
                found = retirement.read_counts(dir_fd, name)
            except FileNotFoundError:
                continue  # retired since the listing: the check of retired.json says so
            except compaction.BadFile as e:
                reading.error("unreadable" if e.kind == "io" else "malformed")
                if name in last:
                    found = last[name]  # read good while its master ran: its values stand
                else:
                    # Never read good: skipped and counted at each collection, until fixed
                    # (nothing writes the file of a master accounted for).
                    reading.skipped += 1
                    if e.kind != "empty":
                        reading.whole.discard(_kind(name))
                    continue
            counts.add(self.total, found.samples)
            for kind, n in found.errors.items():
                reading.error(kind, n)
            self.names[name] = present[name]


def _same(pid: int, ticks: int | None) -> bool:
    """`pid` still runs the process that started at `ticks` (any, for an earlier version's
    state file that did not say)."""
    found = state.proc(pid)
    return found is not None and not found.dead and ticks in (None, found.ticks)


def _kind(name: str) -> str:
    """The kind of family a file holds, from its name (counter_, histogram_, gauge_...)."""
    return name.split("_", 1)[0]


class LifecycleCollector:
    def __init__(
        self,
        layout: Layout,
        *,
        lifetime: bool = True,
        liveness: Liveness | None = None,
        retirer: retirement.Retirer | None = None,
        index: MasterIndex | None = None,
    ) -> None:
        self.layout = layout
        self.index = index or MasterIndex(layout)  # the state files, read as they change
        self.lifetime = lifetime  # --collector.lifetime
        self.liveness = liveness or Liveness(layout)
        self.retirer = retirer  # None: this collector folds gone masters' files in memory only
        self._stats = Stats()
        self._children = state.Children()
        self._rejected_children = 0
        self._known: dict[str, counts.FileCounts] = {}  # last good, by file name
        # Masters live at this collection, or seen live before and still running with their
        # state file missing: pid -> its /proc start.
        self._live: dict[int, int | None] = {}
        self._retired: retirement.Retired | None = None  # retired.json, as last read good
        self._gone = _GoneFold()
        self._deferred_said = False
        self._unreadable_retired = "unreadable"

    def stats(self) -> Stats:
        if self.retirer is None or not self.retirer.errors:
            return self._stats
        errors = dict(self._stats.errors)
        for kind, n in list(self.retirer.errors.items()):  # counted on its thread: a copy
            errors[kind] = errors.get(kind, 0) + n
        return Stats(self._stats.files_skipped, errors)

    def _error(self, kind: str, n: int = 1) -> None:
        if n:
            self._stats.errors[kind] = self._stats.errors.get(kind, 0) + n

    def collect(self) -> Iterator[Metric]:
        try:
            dir_fd = directory.open_own_for_reading(self.layout)  # checked, never a symlink
        except FileNotFoundError:
            recorded = self.index.look()
            self._note_live(recorded.masters)
            if not self._known:
                # No Gunicorn has run here yet: nothing recorded, truly zero.
                yield from counts.families({}, counts.KINDS, self.lifetime)
            else:
                # Removed: what the masters that still run held, until they write it again.
                reading = self._take(self._read(-1, retirement.Retired(), {}, set()))
                if reading is not None:  # always: nothing listed, nothing deferred
                    yield from counts.families(reading.total, reading.whole, self.lifetime)
            yield from self._masters(recorded)
            return
        except OSError:
            self._error("unreadable")  # nothing here can be told: not even gunicorn_up
            return
        recorded = self.index.look()
        self._note_live(recorded.masters)
        try:
            if self.retirer is not None and self.retirer.backlog:
                reading = None  # dead masters' files still being read: a gap, not a part
            else:
                reading = self._read_counts(dir_fd, {m.pid for m in recorded.masters if m.stopped})
        except OSError:
            self._error("unreadable")
            return
        finally:
            os.close(dir_fd)
        if reading is not None:
            yield from counts.families(reading.total, reading.whole, self.lifetime)
        yield from self._masters(recorded)

    # -- the counts ------------------------------------------------------------------------

    def _read_counts(self, dir_fd: int, stopped: set[int]) -> _Reading | None:
        """The counts, read until retired.json was not replaced meanwhile, and taken as this
        collector's (its last good values); None when the families are left out this time.
        `stopped`: the masters accounted for (their state says so): their files are final."""
        hold = self.retirer.lock if self.retirer is not None else contextlib.nullcontext()
        reading = None
        for _ in range(ATTEMPTS):
            with hold, self._retired_json(dir_fd) as retired:
                with os.scandir(dir_fd) as it:
                    names = {e.name: e.inode() for e in it}
                reading = self._read(dir_fd, retired, names, stopped)
                if retired is None or retirement.unchanged(dir_fd, retired):
                    break
            reading = None
        if reading is None:
            self._error("collect")  # retirements kept replacing retired.json: next time
            return None
        return self._take(reading)

    def _take(self, reading: _Reading) -> _Reading | None:
        """A reading taken as this collector's own: its errors counted, its files' values kept
        as the last good ones; None when the families are left out this time."""
        self._stats.files_skipped += reading.skipped
        for kind, n in reading.errors.items():
            self._error(kind, n)
        self._known = reading.known
        if reading.retired is not None:
            self._retired = reading.retired
        if reading.deferred:
            if not self._deferred_said:
                self._deferred_said = True
                log.warning(
                    "event=counts_deferred files=%d reason=%r",
                    reading.deferred,
                    "retiring gone masters' files: counts are served once that is done",
                )
            return None
        if self._deferred_said:
            self._deferred_said = False
            log.info("event=counts_served")
        return reading

    @contextlib.contextmanager
    def _retired_json(self, dir_fd: int) -> Iterator[retirement.Retired | None]:
        """retired.json, held open for the check after the read; None if it cannot be read
        (then no retirement can replace it either: retirement stops at it)."""
        try:
            with retirement.reading(dir_fd) as retired:
                yield retired
        except retirement.Unreadable as e:
            self._unreadable_retired = e.kind
            yield None

    def _read(
        self,
        dir_fd: int,
        retired: retirement.Retired | None,
        names: dict[str, int],
        stopped: set[int],
    ) -> _Reading:
        """One read of the counts: retired.json (None: it cannot be read), then the files of
        `names` (name -> inode), a listing made after retired.json was opened."""
        reading = _Reading(retired=retired)
        if retired is not None:
            reading.error("rejected", sum(retired.errors.values()))
            counts.add(reading.total, retired.samples)
        else:
            reading.error(self._unreadable_retired)
            if self._retired is not None:  # read good before: its values stand
                counts.add(reading.total, self._retired.samples)
            else:
                reading.skipped += 1
                reading.whole.clear()
        listed = reading.retired.listed if reading.retired is not None else frozenset()
        found = retirement.listing(list(names))
        gone, exists = {}, {}
        for name, pid in sorted(found.count_files.items()):
            if name in listed:
                continue  # folded into retired.json, being removed
            if pid is not None and pid not in stopped and pid not in found.state_files:
                # No state file (its retirement began there, or it never wrote one): final
                # once no process has its pid; one that does may be a master starting.
                if pid not in exists:
                    exists[pid] = state.pid_exists(pid)
                if not exists[pid]:
                    stopped.add(pid)
            if pid in stopped:
                gone[name] = names[name]  # final: read once, folded in memory
                continue
            self._read_file(dir_fd, name, pid is not None, reading)
        for name in sorted(self._known.keys() - names.keys() - listed):
            db = parse_name(name)
            if db is not None and db.pid in self._live:
                # Removed under its running master (with the directory, say), which writes
                # it whole again within a turn of its loop: until then, what it held.
                reading.known[name] = self._known[name]
                reading.add(self._known[name])
        unread = len(gone.keys() - self._gone.names.keys())
        retirer = self.retirer
        if (gone or exists) and retirer is not None:
            retirer.wake()
            if retirer.first_pass and retirer.writing and unread > READ_AT_ONCE:
                reading.deferred = unread
                return reading
        self._gone.update(dir_fd, gone, reading, self._known)
        counts.add(reading.total, self._gone.total)
        reading.whole &= self._gone.whole
        return reading

    def _read_file(self, dir_fd: int, name: str, master: bool, reading: _Reading) -> None:
        """One live (or not judged) master's file, or mark-deploy's: read, or its last good."""
        last = self._known.get(name)
        try:
            found = retirement.read_counts(dir_fd, name)
        except FileNotFoundError:
            if last is not None and master:
                # Removed under its running master, which writes it whole again: until then,
                # what it held.
                reading.known[name] = last
                reading.add(last)
            return
        except compaction.BadFile as e:
            reading.error("unreadable" if e.kind == "io" else "malformed")
            if last is not None:
                reading.known[name] = last  # read good before: its values stand
                reading.add(last)
                return
            reading.skipped += 1
            if e.kind != "empty":  # zero bytes hold no count to miss
                reading.whole.discard(_kind(name))
            return
        reading.known[name] = found
        reading.add(found)

    # -- the masters -----------------------------------------------------------------------

    def _note_live(self, masters: list[state.Master]) -> None:
        """Remember the live masters: those recorded live now, and those seen live before that
        still run with their state file missing (removed with the directory: each writes its
        files again within a turn of its loop)."""
        recorded = {m.pid for m in masters}
        hidden = {p: t for p, t in self._live.items() if p not in recorded and _same(p, t)}
        self._live = {**hidden, **{m.pid: m.start_ticks for m in masters if m.alive}}

    def _masters(self, recorded: tuple[list[state.Master], int, int]) -> Iterator[Metric]:
        """The masters' gauges, from the masters' index (monitor/sidecar/masters.py)."""
        masters, malformed, unreadable = recorded
        self._stats.files_skipped += malformed + unreadable
        self._error("malformed", malformed)
        if unreadable:  # a master we cannot see may be up: say nothing rather than a wrong 0
            self._error("unreadable", unreadable)
            return
        # Worker entries left out, and masters whose pid the kernel says is another process.
        self._error("rejected", sum(m.rejected + m.forged for m in masters))
        live = [m for m in masters if m.alive]
        workers = self._children.live(live)
        self._error("rejected", self._children.rejected - self._rejected_children)
        self._rejected_children = self._children.rejected
        verdicts = [self.liveness.recent(m.pid, m.start_ticks) for m in live]
        judged = [v for v in verdicts if v is not None]  # None: it died since it was read
        up = any(v.up for v in judged)
        yield GaugeMetricFamily(metrics.UP.name, metrics.UP.help, value=1 if up else 0)
        ages = [v.age for v in judged if v.age is not None]
        if ages:
            age = metrics.MASTER_HEARTBEAT_AGE
            yield GaugeMetricFamily(age.name, age.help, value=round(max(ages), 3))
        count = sum(len(w) for w in workers.values())
        yield GaugeMetricFamily(metrics.WORKERS.name, metrics.WORKERS.help, value=count)
        desired = sum(m.workers_desired for m in live)
        yield GaugeMetricFamily(metrics.WORKERS_DESIRED.name, metrics.WORKERS_DESIRED.help, desired)
        stuck = metrics.WORKERS_STUCK_BOOTING
        yield GaugeMetricFamily(stuck.name, stuck.help, sum(m.stuck_booting for m in live))
