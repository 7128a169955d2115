"""The app's own prometheus_client multiprocess metrics, read from the shared directory.

Why not the stock MultiProcessCollector: it fails the whole scrape on one bad file, and it re-reads
every dead worker's file on every scrape. This collector reads each file in isolation: an
unreadable file is skipped and counted. The files are kept in an index from scrape to scrape
(monitor/sidecar/appindex.py): a scrape reads the live processes' files and what changed, and
a dead worker's file is read once and folded in memory (monitor/sidecar/deadfiles.py), so its
cost does not grow with the workers that ever died.

With folding on (`compact=True`, the sidecar's `--app-metrics.fold`) it also compacts dead
workers' files first (monitor/sidecar/compaction.py), so the directory stops growing, and moves
an unreadable file to DIR/quarantine/ once no process can still be creating it. Folding moves
files out of the glob that a stock collector in the app may be reading (see
monitor/contract/appfiles.py), so the sidecar's default is off: then this collector never moves
a file of the glob, and only finishes folding what an earlier fold-on run left staged.

The output is the stock collector's, sample for sample: the files are turned into Metric objects
exactly as MultiProcessCollector._read_metrics does and then handed to the library's own
accumulation, so counter, histogram and gauge-mode semantics cannot drift from the library.
Only the top level of the directory is read (subdirectories belong to others or to compaction).

`start()` (the sidecar) reads the directory once in the background as soon as the sidecar
starts, and then audits it every appindex.RESCAN seconds; `warming` is true until that first
read is done, and /-/ready says so.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector

from monitor.contract.appfiles import AGGREGATE_ID, DbName, parse_name
from monitor.sidecar import compaction
from monitor.sidecar.appindex import RESCAN, AppFiles
from monitor.sidecar.compaction import BadFile, Entry, pid_alive
from monitor.sidecar.deadfiles import DEAD_FOLD, FOLDING_ON

# A staged file: its name parsed, its name, and its entries (or why it was skipped).
Staged = tuple[DbName | None, str, list[Entry] | BadFile]

log = logging.getLogger(__name__)

BATCH = 1024  # dead files a compaction stages at most, folding on: what one scrape may wait for
DRAIN_AFTER = 10.0  # seconds after the first read that the backlog goes to disk, if no scrape


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
        use_inotify: bool = True,
    ) -> None:
        self._path = path
        self._compact = compact
        self._quarantine_after = quarantine_after
        self._is_alive = is_alive
        self._lock = threading.Lock()
        self._stats = AppMetricsStats()
        self._errors: dict[str, int] = {}
        self._last: list[Metric] | None = None
        self._last_started = float("-inf")
        self._staged_reads = 0
        how = FOLDING_ON if compact else DEAD_FOLD
        self.files = AppFiles(path, how=how, is_alive=is_alive, use_inotify=use_inotify)
        self.warming = False
        self._draining = False  # a background thread moves dead files to disk (folding on)
        self._stop = threading.Event()
        self._scraped = threading.Event()  # a scrape took inputs (or collected)

    def stats(self) -> AppMetricsStats:
        """A snapshot of the counts (safe to call during a scrape)."""
        s = self._stats
        read = self.files.reads + self._staged_reads
        return AppMetricsStats(**{**s.__dict__, "files_read": read, "errors": dict(self._errors)})

    def start(self, rescan: float = RESCAN) -> None:
        """Read the directory now, in the background (`warming` until done), then audit it
        every `rescan` seconds (appindex.AppFiles.audit)."""
        self.warming = True
        self._draining = self._compact
        threading.Thread(target=self._run, args=(rescan,), name="app-files", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    @property
    def busy(self) -> str | None:
        """Why a scrape now would wait, in one line (for /-/ready), or None: the first read
        of the directory under way, or (folding on) a backlog of dead workers' files being
        moved to disk, a batch at a time."""
        if self.warming:
            done, total = self.files.progress
            return (
                f"reading the app's metric files in {self._path} once ({done} of {total} "
                "dead processes' files folded so far); scrapes wait for it"
            )
        if self._draining:
            return (
                f"moving {self.files.dead_count()} dead workers' app files in {self._path} to "
                f"the aggregates, {BATCH} at a time; a scrape may wait for one batch"
            )
        return None

    def _run(self, rescan: float) -> None:
        try:
            started = time.monotonic()
            with self._lock, self.files.lock:
                self._prepare()
            # What the first read made lives as long as the sidecar: out of the cyclic
            # collector's way, or every full collection would scan it again.
            gc.freeze()
            unfolded, folded = self.files.counts()
            log.info(
                "event=app_files_read dir=%s files=%d dead_folded=%d seconds=%.3f",
                self._path,
                unfolded + folded,
                folded,
                time.monotonic() - started,
            )
        except Exception as e:  # the first scrape reads it instead, and counts what fails
            log.error("event=app_files_read_failed dir=%s error=%r", self._path, e)
        finally:
            self.warming = False
        # Folding on: what the first read folded in memory goes to disk a batch at a time,
        # each under the lock, so that a scrape waits for one batch at most; from the first
        # scrape on (or after DRAIN_AFTER seconds), so that the first scrape waits for none.
        if self._compact:
            self._scraped.wait(DRAIN_AFTER)
        left = self.files.dead_count() if self._compact else 0
        while left and not self._stop.wait(0.01):
            try:
                with self._lock, self.files.lock:
                    self._prepare(drain=True)
            except Exception as e:
                log.error("event=app_files_compaction_failed dir=%s error=%r", self._path, e)
                break
            left, before = self.files.dead_count(), left
            if left >= before:
                break  # none moved (a read-only directory, say): the scrapes go on trying
        self._draining = False
        while not self._stop.wait(rescan):
            try:
                self.files.audit()
            except Exception as e:  # e.g. the directory is gone; the looks say so
                log.debug("event=app_files_audit_failed dir=%s error=%r", self._path, e)

    def inputs(self, exists: Callable[[int], bool] | None = None) -> int:
        """What a collection would read, brought up to date, as one value: the index's
        generation (monitor/sidecar/appindex.py), for the kept-body cache. `exists`: the
        caller's liveness check, shared with its own (see AppFiles.look)."""
        with self._lock, self.files.lock:
            self._prepare(exists=exists)
            self._scraped.set()
            return self.files.generation

    def collect(self) -> list[Metric]:
        arrived = time.monotonic()
        with self._lock:
            if self._last is not None and self._last_started >= arrived:
                self._bump(scrapes_reused=1)
                return list(self._last)
            started = time.monotonic()
            with self.files.lock:
                staged = self._prepare()
                families = self._families(staged)
            self._scraped.set()
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

    def _prepare(
        self, drain: bool = False, exists: Callable[[int], bool] | None = None
    ) -> list[Staged]:
        """Bring the index up to date, then compact when there is anything to fold on disk:
        files staged (by the hooks, or an earlier fold-on run), or, folding on, a file that
        went from under the look (a hook staged it) or dead processes' files (BATCH at most:
        the rest are served from the in-memory fold meanwhile; left to the background thread
        while it drains a backlog, `drain` being its own call). Returns the staged files a
        failed compaction left outside the aggregates, to read as they are.
        """
        files = self.files
        files.look(exists)
        pending = compaction.has_pending(self._path)
        dead = files.dead_count() and (drain or not self._draining)
        if not (pending or self._compact and (dead or files.vanished)):
            return []
        try:
            with compaction.directory_lock(self._path):
                dead = files.dead(BATCH)
                folded = self._run_compaction(dead)
                files.suspect(dead)  # any left in the glob: their pid lives again
                files.look()  # the staged files leave the glob, the aggregates change
                if folded or not self._recovered():
                    return []
                return self._staged()
        except OSError as e:
            # e.g. a read-only mount: still serve, just without compaction.
            self._failed("lock", f"event=compaction_unavailable dir={self._path} error={e!r}")
            return []

    def _run_compaction(self, dead: list[str]) -> bool:
        """Compact, staging the `dead` files (folding on); False if it failed and staged files
        may be waiting outside the aggregates."""
        try:
            report = compaction.compact(
                self._path, self._is_alive, stage_dead=self._compact, names=dead
            )
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

    def _recovered(self) -> bool:
        """After a failed compaction: True if staged files are surely not in any aggregate."""
        try:
            compaction.recover(self._path)
            return True
        except Exception as e:
            self._failed("recovery", f"event=recovery_failed dir={self._path} error={e!r}")
            return False

    def _staged(self) -> list[Staged]:
        """Dead pids' staged files, read in place; their live* gauges went with them."""
        found = []
        for sname, entries in compaction.read_staged(self._path):
            name = sname.split("~", 1)[-1]
            if not name.startswith("gauge_live"):
                db = parse_name(name)
                found.append((db, name, BadFile("name", name) if db is None else entries))
        return found

    def _families(self, staged: list[Staged]) -> list[Metric]:
        """Merge the fold, every unfolded file as last read, and `staged` (read now)."""
        metrics: dict[str, Metric] = {}
        skipped = 0
        for db, entries in self.files.folded():
            _add_samples(metrics, db, entries)
        for name, db, entries in self.files.unfolded():
            if isinstance(entries, BadFile):
                skipped += 1
                self._error(entries.kind)
                if self._compact:
                    self._maybe_quarantine(name, entries)
                continue
            _add_samples(metrics, db, entries)  # type: ignore[arg-type]
        for db, _, entries in staged:
            if isinstance(entries, BadFile):
                skipped += 1
                self._error(entries.kind)
                continue
            self._staged_reads += 1
            _add_samples(metrics, db, entries)  # type: ignore[arg-type]
        self._bump(files_skipped=skipped)
        return list(MultiProcessCollector._accumulate_metrics(metrics, True))

    def _maybe_quarantine(self, name: str, error: BadFile) -> None:
        path = os.path.join(self._path, name)
        try:
            age = time.time() - os.stat(path, follow_symlinks=False).st_mtime
            if age < self._quarantine_after:
                log.debug("event=skipped file=%s reason=%s", path, error)
                return
            target = compaction.quarantine(self._path, name)
        except OSError:
            return  # gone already, or the directory is read-only: skipped and counted anyway
        log.warning("event=quarantined file=%s as=%s reason=%s", path, target, error)
        self._bump(files_quarantined=1)


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
            if pid == AGGREGATE_ID and db.mode in ("all", "liveall"):
                pid = dict(labels).get("pid", pid)
                labels = tuple(label for label in labels if label[0] != "pid")
            metric._multiprocess_mode = db.mode
            metric.add_sample(e.name, labels + (("pid", pid),), e.value, e.timestamp)
        else:
            metric.add_sample(e.name, e.labels, e.value)
