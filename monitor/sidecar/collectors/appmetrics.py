"""The app's own prometheus_client multiprocess metrics, read from the shared directory.

Why not the stock MultiProcessCollector: it fails the whole scrape on one bad file, and it re-reads
every dead worker's file on every scrape. This collector reads each file in isolation: an
unreadable file is skipped and counted. With folding on (`compact=True`, the sidecar's
`--app-metrics.fold`) it also compacts dead workers' files first (monitor/sidecar/compaction.py),
so a scrape reads only the live workers' files plus one aggregate per file type, and moves an
unreadable file to DIR/quarantine/ once no process can still be creating it. Folding moves files
out of the glob that a stock collector in the app may be reading (see monitor/contract/appfiles.py),
so the sidecar's default is off: then this collector never moves a file of the glob, and only
finishes folding what an earlier fold-on run left staged. Either way, a dead worker's file still
in the glob is read once and folded in memory (monitor/sidecar/deadfiles.py), not read again on
every scrape.

The output is the stock collector's, sample for sample: the files are turned into Metric objects
exactly as MultiProcessCollector._read_metrics does and then handed to the library's own
accumulation, so counter, histogram and gauge-mode semantics cannot drift from the library.
Only the top level of the directory is read (subdirectories belong to others or to compaction).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from monitor.contract.appfiles import AGGREGATE_ID, FOLD, STATE_DIR, DbName, parse_name
from monitor.sidecar import compaction
from monitor.sidecar.compaction import BadFile, pid_alive
from monitor.sidecar.deadfiles import DeadFiles, NewPids, foldable

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AppMetricsStats:
    """Cumulative counts since the collector was created, for the self-metrics collector."""

    scrapes: int = 0
    scrapes_reused: int = 0  # overlapping scrapes served by the scrape they waited for
    files_read: int = 0
    files_skipped: int = 0  # unreadable files left out of a scrape (once per scrape)
    files_quarantined: int = 0
    files_compacted: int = 0  # dead workers' files folded into the aggregates
    live_files_dropped: int = 0  # dead workers' live* gauge files, deleted as mark_process_dead
    compactions: int = 0  # compactions that folded something
    compaction_seconds: float = 0.0
    errors: dict[str, int] = field(default_factory=dict)  # by kind: empty, truncated, corrupt, ...


class AppMetricsCollector:
    """Collector over DIR's top-level `*.db` files; compacts dead workers' files on scrape.

    Scrapes are single-flight: one runs at a time (a thread lock, plus the directory's flock
    against other exporters), and a scrape that had to wait reuses the result of a scrape that
    started after it arrived, so a pile-up of scrapes costs one read, not one each.

    `compact` is folding: True folds dead workers' files (staging them itself); False never
    moves a file of the glob, nor quarantines one, but still folds files already staged.

    `quarantine_after` is how old (mtime, seconds) an unreadable file of a live or unknown
    process must be before it is moved aside, folding on only: a zero-byte file may be one a
    worker is creating right now (client_python#1199), and a foreign `.db` may be another
    program's open database. Unreadable files of dead workers are quarantined at once by the
    compaction.
    """

    def __init__(
        self,
        path: str,
        *,
        compact: bool = True,
        quarantine_after: float = 60.0,
        is_alive: compaction.AliveCheck = pid_alive,
    ) -> None:
        self._path = path
        self._compact = compact
        self._quarantine_after = quarantine_after
        self._is_alive = is_alive
        self._lock = threading.Lock()
        self._stats = AppMetricsStats()
        self._errors: dict[str, int] = {}
        self._last: list[Metric] | None = None
        self._dead_files = DeadFiles(path)
        self._new_pids = NewPids()
        self._names: dict[str, tuple[DbName | None, int | None]] = {}
        self._last_started = float("-inf")

    def stats(self) -> AppMetricsStats:
        """A snapshot of the counts (safe to call during a scrape)."""
        s = self._stats
        return AppMetricsStats(**{**s.__dict__, "errors": dict(self._errors)})

    def collect(self) -> list[Metric]:
        arrived = time.monotonic()
        with self._lock:
            if self._last is not None and self._last_started >= arrived:
                self._bump(scrapes_reused=1)
                return list(self._last)
            started = time.monotonic()
            families = self._collect_locked()
            self._last, self._last_started = families, started
            self._bump(scrapes=1)
            return list(families)

    def _bump(self, **deltas: float) -> None:
        values = {k: getattr(self._stats, k) + v for k, v in deltas.items()}
        self._stats = AppMetricsStats(**{**self._stats.__dict__, **values})

    def _error(self, kind: str, n: int = 1) -> None:
        self._errors[kind] = self._errors.get(kind, 0) + n

    def _failed(self, kind: str, line: str) -> None:
        """Counted every time, said once per kind: a read-only directory fails every scrape."""
        (log.error if kind not in self._errors else log.debug)(line)
        self._error(kind)

    def _collect_locked(self) -> list[Metric]:
        if not compaction.has_pending(self._path):
            if not self._compact:
                return self._read_unlocked()  # nothing to fold: read as the stock collector does
            # Folding on, but nothing to fold: every file's process lives and nothing is staged
            # (the usual scrape: workers die far less often than they are scraped). Read
            # without the lock, which a compaction's three listings and flock would cost. A
            # file a hook stages meanwhile vanishes from the read, and the locked path below,
            # which folds it first, answers instead.
            scan = _scan(self._path)
            if not self._any_gone(scan):
                families = self._read(scan=scan)
                if families is not None:
                    return families
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(compaction.directory_lock(self._path))
            except OSError as e:
                # e.g. a read-only mount: still serve, just without compaction.
                self._failed("lock", f"event=compaction_unavailable dir={self._path} error={e!r}")
                return self._read_unlocked()
            pending_unfolded = not self._run_compaction()
            families = self._read(include_staged=pending_unfolded)
            if families is None:  # a file moved away under us (e.g. staged by a hook): again
                pending_unfolded = not self._run_compaction()
                families = self._read(include_staged=pending_unfolded, retry=False)
            return families

    def _read_unlocked(self) -> list[Metric]:
        families = self._read()
        return families if families is not None else self._read(retry=False)

    def _run_compaction(self) -> bool:
        """Compact; False if it failed and staged files may be waiting outside the aggregates."""
        try:
            report = compaction.compact(self._path, self._is_alive, stage_dead=self._compact)
        except Exception as e:  # never fail the scrape; the files stay where the protocol left them
            self._failed("compaction", f"event=compaction_failed dir={self._path} error={e!r}")
            return False
        for kind, n in report.errors.items():
            self._error(kind, n)
        self._bump(
            files_quarantined=report.quarantined,
            files_compacted=report.folded,
            live_files_dropped=report.dropped_live,
            compactions=1 if report.folded or report.dropped_live else 0,
            compaction_seconds=report.seconds,
        )
        return True

    def _any_gone(self, scan: list[os.DirEntry[str]]) -> bool:
        """Is there a file compaction would stage: a process's foldable file (a live-mode
        gauge too), the process gone? One check a pid, names decoded as the last read did."""
        alive: dict[int, bool] = {}
        for e in scan:
            known = self._names.get(e.name)
            db = known[0] if known is not None else parse_name(e.name)
            if db is None or db.pid is None or db.prefix not in FOLD:
                continue
            if db.pid not in alive:
                alive[db.pid] = self._is_alive(db.pid)
            if not alive[db.pid]:
                return True
        return False

    def _read(
        self,
        include_staged: bool = False,
        retry: bool = True,
        scan: list[os.DirEntry[str]] | None = None,
    ) -> list[Metric] | None:
        """Merge every readable file; None if a file vanished mid-read and `retry` allows it.
        Dead workers' files come from their in-memory fold (monitor/sidecar/deadfiles.py)."""
        # This listing's names, decoded, with the pid of each foldable one; kept for the next.
        names: dict[str, tuple[DbName | None, int | None]] = {}
        alive: dict[int, bool] = {}  # one check a pid: a worker has a file per metric type
        reused = self._new_pids.since()  # before the liveness checks: see DeadFiles.update
        files, dead = [], {}
        for e in _scan(self._path) if scan is None else scan:
            known = self._names.get(e.name)
            if known is None:
                db = parse_name(e.name)
                known = (db, db.pid if db is not None and foldable(db) else None)
            names[e.name] = known
            db, pid = known
            if pid is not None:
                lives = alive.get(pid)
                if lives is None:
                    lives = alive[pid] = self._is_alive(pid)
                if not lives:
                    dead[e.name] = (e.inode(), db)
                    continue
            files.append((db, e.name, e.path, True))
        self._names = names
        folded = self._dead_files.update(dead, reused)
        if folded.vanished:
            if retry:
                return None
            self._error("vanished")
        files += [(dead[n][1], n, os.path.join(self._path, n), True) for n in folded.bad]
        if include_staged and self._recovered():
            staged = os.path.join(self._path, STATE_DIR, "staged")
            for sname in _ls(staged):  # dead pids' files: their live* gauges are gone with them
                name = sname.split("~", 1)[-1]
                if not name.startswith("gauge_live"):
                    files.append((parse_name(name), name, os.path.join(staged, sname), False))
        metrics: dict[str, Metric] = {}
        read, skipped = folded.read, 0
        for db, entries in self._dead_files.entries():
            _add_samples(metrics, db, entries)
        for db, name, path, top_level in files:
            try:
                if db is None:
                    raise BadFile("name", name)
                entries = compaction.read_entries(path)
            except FileNotFoundError:
                if db is not None and db.mode.startswith("live"):
                    continue  # mark_process_dead removed it, as the stock collector allows
                if retry:
                    return None
                self._error("vanished")
                continue
            except BadFile as e:
                skipped += 1
                self._error(e.kind)
                if top_level and self._compact:
                    self._maybe_quarantine(path, e)
                continue
            read += 1
            _add_samples(metrics, db, entries)
        self._bump(files_read=read, files_skipped=skipped)
        return list(MultiProcessCollector._accumulate_metrics(metrics, True))

    def _recovered(self) -> bool:
        """After a failed compaction: True if staged files are surely not in any aggregate."""
        try:
            compaction.recover(self._path)
            return True
        except Exception as e:
            self._failed("recovery", f"event=recovery_failed dir={self._path} error={e!r}")
            return False

    def _maybe_quarantine(self, path: str, error: BadFile) -> None:
        try:
            age = time.time() - os.stat(path).st_mtime
            if age < self._quarantine_after:
                log.debug("event=skipped file=%s reason=%s", path, error)
                return
            target = compaction.quarantine(self._path, path)
        except OSError:
            return  # gone already, or the directory is read-only: skipped and counted anyway
        log.warning("event=quarantined file=%s as=%s reason=%s", path, target, error)
        self._bump(files_quarantined=1)


def _scan(path: str) -> list[os.DirEntry[str]]:
    # What glob('*.db') matches (no dotfiles), minus subdirectories.
    with os.scandir(path) as it:
        return [
            e
            for e in it
            if e.name.endswith(".db")
            and not e.name.startswith(".")
            and e.is_file(follow_symlinks=False)
        ]


def _ls(path: str) -> list[str]:
    try:
        return sorted(os.listdir(path))
    except FileNotFoundError:
        return []


def _add_samples(metrics: dict[str, Metric], db: DbName, entries: list[compaction.Entry]) -> None:
    """One file's entries, as MultiProcessCollector._read_metrics adds them (it has no per-file
    error isolation, so it can't be called per file without re-reading), plus the pid that the
    `all`-gauge aggregate keeps in its keys."""
    for e in entries:
        metric = metrics.get(e.metric_name)
        if metric is None:
            metric = metrics[e.metric_name] = Metric(e.metric_name, e.help, db.typ)
        if db.typ == "gauge":
            labels, pid = e.labels, db.ident
            if pid == AGGREGATE_ID and db.mode == "all":
                pid = dict(labels).get("pid", pid)
                labels = tuple(label for label in labels if label[0] != "pid")
            metric._multiprocess_mode = db.mode
            metric.add_sample(e.name, labels + (("pid", pid),), e.value, e.timestamp)
        else:
            metric.add_sample(e.name, e.labels, e.value)
