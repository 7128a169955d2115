"""Per-worker process facts (memory, CPU, start time), sampled by the sidecar with psutil.

The workers are found through what the hooks recorded (master-<pid>.json), never by process
name, and what a state file says is checked before a pid is measured: the master must be live
and started when the file says, and each worker a live child of it (contract/state.py). Series
are keyed by the worker's stable slot, never its pid: a replacement takes over its
predecessor's slot, so cardinality stays bounded however many workers come and go.

Sampling runs on its own thread at a fixed interval, independent of scrapes and of traffic:
a scrape only reads the last snapshot, so it costs nothing here however often it comes, and
the last sample before a worker dies is at most one interval (10 s) old. That sample is what the
memory-at-exit histogram records, when the journal reports the exit and its cause.

The histogram is kept in memory and served as a plain metric family: a prometheus_client
Histogram would, with PROMETHEUS_MULTIPROC_DIR set, write histogram_<our pid>.db into the
very directory the app collector serves, and every scrape would carry it twice.
"""

from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import psutil
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.utils import floatToGoString

from monitor.contract import causes, journal, metrics, state
from monitor.contract.directory import Layout
from monitor.sidecar.masters import MasterIndex

log = logging.getLogger("gunicorn_monitor")

TYPES = ("rss", "pss", "uss", "swap")
SMAPS_TYPES = ("pss", "uss", "swap")  # --collector.smaps
# Every INTERVAL seconds rss and CPU; pss, uss and swap (smaps_rollup, which walks the
# process's page tables: about 0.7 ms of kernel time for a Python worker, some forty times a
# stat read, and moves slowly) every FULL_EVERY samples: every 5 minutes, each process in its
# own turn (by slot), so that the cost is spread evenly instead of one burst. With 64 workers
# scraped every second (benchmarks/exporter_cost.py), smaps_rollup once a minute was most of
# the sidecar's CPU, and rss and CPU every 2 s (reading every master's state and every worker's
# stat, some 20 us a worker) most of the rest: more than the stock exporter's whole cost. At
# every 5 s it was still a third of the sidecar's CPU beside 64 workers: the sample itself, and
# the scrape after it, which renders every worker's moved CPU and rss lines anew and gzips the
# body again (some 4 ms). Every 10 s halves both and still gives each scrape of a 15 s interval
# a fresh sample; a worker's birth or death is seen at once regardless (current()).
INTERVAL = 10.0
FULL_EVERY = 30
# How long a worker's last sample is kept after it was last seen, for its exit record: a sample
# taken between its death and the journal's record of it no longer sees it.
KEEP_GONE = 60.0


_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def stat_fields(data: bytes) -> list[bytes] | None:
    """The fields of a /proc/<pid>/stat from field 3 (state) on; None for a zombie (or an
    empty read). Split after the last ")": the command name before it may hold one."""
    fields = data[data.rfind(b")") + 2 :].split()
    return fields if fields and fields[0] != b"Z" else None


class _StatFiles:
    """CPU seconds (user + system) and resident bytes of sampled processes, from their
    /proc/<pid>/stat, each opened once and read again with one pread per sample.

    The same numbers psutil's cpu_times() and memory_info() give (utime + stime, and the
    resident pages statm repeats): psutil opens two files a call, and with 64 workers that
    made the sampler the sidecar's largest cost (benchmarks/exporter_cost.py). A kept file
    answers for the process it was opened for only: once that one is gone the read fails
    (ESRCH), even if its pid is reused. A zombie is gone too: a worker that has exited,
    waiting for the master to reap it.
    """

    def __init__(self) -> None:
        self._fds: dict[tuple, int] = {}  # by (pid, start); closed only in keep()

    def read(self, key: tuple) -> tuple[float, float]:
        fd = self._fds.get(key)
        if fd is None:
            try:
                fd = os.open(f"/proc/{key[0]}/stat", os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise ProcessLookupError(key[0]) from None
            self._fds[key] = fd
        fields = stat_fields(os.pread(fd, 4096, 0))
        if fields is None:
            raise ProcessLookupError(key[0])
        return (int(fields[11]) + int(fields[12])) / _TICKS, float(int(fields[21]) * _PAGE)

    def keep(self, keys: object) -> None:
        """Close the files of processes no longer sampled (those not in `keys`)."""
        for key in [k for k in self._fds if k not in keys]:  # type: ignore[operator]
            os.close(self._fds.pop(key))


@dataclass
class Sample:
    pid: int
    slot: int
    started: float
    cpu: float
    memory: dict[str, float] = field(default_factory=dict)


@dataclass
class Snapshot:
    workers: dict[int, Sample] = field(default_factory=dict)  # by slot
    master: Sample | None = None
    build: dict[str, str] = field(default_factory=dict)
    readable: dict[str, bool] = field(default_factory=dict)


class ExitMemory:
    """The memory-at-exit histogram, by cause, in memory: only causes that happened have series."""

    SPEC = metrics.WORKER_EXIT_MEMORY

    def __init__(self) -> None:
        self._bounds = list(self.SPEC.buckets)
        self._counts: dict[str, list[int]] = {}  # cause -> per bucket, +Inf last
        self._sums: dict[str, float] = {}
        self._lock = threading.Lock()  # observed by the sampler thread, served by scrapes

    def observe(self, cause: str, value: float) -> None:
        with self._lock:
            counts = self._counts.setdefault(cause, [0] * (len(self._bounds) + 1))
            counts[bisect.bisect_left(self._bounds, value)] += 1
            self._sums[cause] = self._sums.get(cause, 0.0) + value

    def family(self) -> HistogramMetricFamily:
        spec = self.SPEC
        family = HistogramMetricFamily(spec.name, spec.help, labels=list(spec.labels))
        les = [floatToGoString(b) for b in self._bounds] + ["+Inf"]
        with self._lock:
            for cause in sorted(self._counts):
                cumulative, buckets = 0, []
                for le, n in zip(les, self._counts[cause], strict=True):
                    cumulative += n
                    buckets.append((le, float(cumulative)))
                family.add_metric([cause], buckets, self._sums[cause])
        return family


class WorkerSampler:
    """Samples the recorded workers every `interval`; `smaps` adds pss/uss/swap, and
    `exit_memory` follows the journal to record each exiting worker's last sample."""

    def __init__(
        self,
        layout: Layout,
        interval: float = INTERVAL,
        *,
        smaps: bool = True,
        exit_memory: bool = True,
        masters: MasterIndex | None = None,
    ) -> None:
        self.layout = layout
        # The sidecar's index of the state files (sidecar/masters.py): a look costs what
        # changed, not a stat of every dead master's file (50,000 after months of restarts).
        self.masters = masters or MasterIndex(layout)
        self.interval = interval
        self.smaps = smaps
        self.snapshot = Snapshot()
        self.errors: dict[str, int] = {}  # by kind, see collectors/scrape.py
        self.exit_memory = ExitMemory() if exit_memory else None
        self._by_pid: dict[int, Sample] = {}
        self._last_seen: dict[int, tuple[float, Sample]] = {}  # pid -> (when, last sample)
        self._full: dict[int, dict[str, float]] = {}
        self._procs: dict[tuple, psutil.Process] = {}  # kept: creating one reads /proc again
        self._stat = _StatFiles()
        self._children = state.Children()
        self._sampled: list[tuple] = []  # the (pid, start) of the last snapshot's processes
        self._tick = 0
        self._seen_change = 0.0
        self._warned: set[str] = set()
        self._tail = journal.Tail(layout) if exit_memory else None
        self._tail_bad = 0
        self._stop = threading.Event()
        self._lock = threading.Lock()

    def start(self) -> None:
        # The first sample on the thread too: the sidecar listens (and answers /-/ready) at
        # once, however many state files there are to read; a scrape before it samples itself.
        threading.Thread(target=self._run, name="sampler", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _error(self, kind: str, n: int = 1) -> None:
        if n:
            self.errors[kind] = self.errors.get(kind, 0) + n

    def _run(self) -> None:
        wait = 0.0
        while not self._stop.wait(wait):
            wait = self.interval
            try:
                self.sample()
            except Exception as e:  # a sampler that dies silently would freeze every series
                self._error("collect")
                log.error("event=sample_failed error=%r", e)

    def sample(self) -> None:
        with self._lock:
            self._sample()

    def current(self) -> Snapshot:
        """The last snapshot, taken anew if the masters recorded a change since (a worker died
        or was spawned) or a sampled process is gone: a scrape never serves a dead worker's slot
        or a dead master, nor misses a replacement for the length of the sampling interval.
        """
        snap = self.snapshot
        changed = self._mark() > self._seen_change
        if changed or not self._all_running():
            self.sample()
            snap = self.snapshot
        return snap

    def _mark(self) -> float:
        """What moves when the masters recorded a change: the index's version."""
        self.masters.look()
        return float(self.masters.version)

    def _all_running(self) -> bool:
        """Every process of the last snapshot still runs (neither gone nor a zombie): one pread
        of its stat file, kept open since it was sampled, which fails once that process is gone
        even if its pid was given out again. Under the lock, since the sampler closes those
        files; while it samples, /proc is read anew instead, so a scrape never waits for it."""
        sampled = self._sampled
        if not self._lock.acquire(blocking=False):
            return all(state.running(pid) for pid, _ in sampled)
        try:
            return all(self._running(key) for key in sampled)
        finally:
            self._lock.release()

    def _masters(self) -> list[state.Master]:
        """The live recorded masters, oldest first: the index parses a state file again when it
        is replaced, and checks a master parsed live against /proc at each look."""
        live = [m for m in self.masters.look().masters if m.alive]
        return sorted(live, key=lambda m: m.start_time)

    def _running(self, key: tuple) -> bool:
        try:
            self._stat.read(key)
            return True
        except (ProcessLookupError, OSError):
            return False

    def _sample(self) -> None:
        # Said seen only once the snapshot is out: a scrape meanwhile (the first sample on
        # the thread, say) finds a change still unseen and waits for a sample of its own,
        # never the empty snapshot from before.
        seen = self._mark()
        self._tick += 1
        masters = self._masters()
        # A worker sampled before is the process its kept stat file was opened for, checked
        # then: its read below says whether it still runs. Only new ones are checked here
        # (/proc read a worker: a third of a sample's cost when done for all).
        live = self._children.live(masters, known=lambda w: (w.pid, w.spawned) in self._procs)
        snap = Snapshot(readable=dict(self.snapshot.readable))
        by_pid: dict[int, Sample] = {}
        sampled: list[tuple] = []
        for m in masters:
            key = (m.pid, m.start_time)
            master = self._measure(key, -1, snap)
            if master is not None:
                snap.master = master
                sampled.append(key)
            snap.build = {"version": m.version, "worker_class": m.worker_class}
            # The newest master's workers win a shared slot (during a USR2 upgrade), and
            # within a master the newest worker (a reload overlaps old and new).
            # Newest by /proc start (no wall-clock step reorders it), else by spawn time.
            for w in sorted(live.get(m.pid, ()), key=lambda w: (w.ticks or 0, w.spawned or 0)):
                s = self._measure((w.pid, w.spawned), w.slot, snap)
                if s is not None:
                    by_pid[s.pid] = s
                    snap.workers[s.slot] = s
                    sampled.append((w.pid, w.spawned))
        now = time.monotonic()
        self._last_seen.update((pid, (now, s)) for pid, s in by_pid.items())
        self._record_exits()
        self._last_seen = {p: v for p, v in self._last_seen.items() if now - v[0] < KEEP_GONE}
        self._by_pid = by_pid
        master_pids = {m.pid for m in masters}
        # The masters' too: dropping them read the master's smaps on every sample, not once a
        # minute, and its pss, always moving a little, made every sample a change.
        self._full = {
            pid: mem for pid, mem in self._full.items() if pid in by_pid or pid in master_pids
        }
        self._procs = {
            k: v for k, v in self._procs.items() if k[0] in by_pid or k[0] in master_pids
        }
        self._stat.keep(self._procs)
        self._sampled = [k for k in sampled if k in self._procs]
        self.snapshot = snap
        self._seen_change = seen

    def _measure(self, key: tuple, slot: int, snap: Snapshot) -> Sample | None:
        """`key` is (pid, start): a pid reused by a new worker gets a new psutil.Process."""
        pid = key[0]
        try:
            proc = self._procs.get(key)
            if proc is None:
                proc = self._procs[key] = psutil.Process(pid)
            cpu, rss = self._stat.read(key)
            sample = Sample(pid, slot, proc.create_time(), cpu)
            sample.memory["rss"] = rss
        except (psutil.NoSuchProcess, psutil.ZombieProcess, ProcessLookupError):
            return None
        except (psutil.AccessDenied, PermissionError):
            self._warn("access", f"event=worker_unreadable pid={pid} reason=access_denied")
            return None
        full = (self._tick + slot) % FULL_EVERY == 0  # this process's turn
        if self.smaps and (full or pid not in self._full):
            self._full[pid] = self._full_memory(proc, snap)
        sample.memory.update(self._full.get(pid, {}))
        return sample

    def _full_memory(self, proc: psutil.Process, snap: Snapshot) -> dict[str, float]:
        try:
            info = proc.memory_full_info()
        except (psutil.AccessDenied, psutil.NoSuchProcess, OSError):
            info = None
        found = {}
        for t in SMAPS_TYPES:
            value = getattr(info, t, None)
            snap.readable[t] = value is not None
            if value is None:
                self._warn(t, f"event=memory_type_unavailable type={t}")
            else:
                found[t] = float(value)
        return found

    def _warn(self, key: str, line: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.warning(line)

    def _record_exits(self) -> None:
        if self._tail is None or self.exit_memory is None:
            return
        for rec in self._tail.read_new():
            if rec.get("event") != "exit":
                continue
            cause, pid = rec.get("cause"), rec.get("pid")
            if cause not in causes.CAUSES or not isinstance(pid, int):
                self._error("rejected")
                continue
            _, last = self._last_seen.pop(pid, (0.0, None))
            if last is not None and "rss" in last.memory:
                self.exit_memory.observe(cause, last.memory["rss"])
        self._error("malformed", self._tail.bad - self._tail_bad)
        self._tail_bad = self._tail.bad


@dataclass
class WorkerStats:
    files_skipped: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class WorkersCollector:
    def __init__(self, sampler: WorkerSampler) -> None:
        self.sampler = sampler

    def stats(self) -> WorkerStats:
        return WorkerStats(errors=dict(self.sampler.errors))

    def collect(self) -> Iterator[Metric]:
        snap = self.sampler.current()
        types = TYPES if self.sampler.smaps else ("rss",)
        memory = GaugeMetricFamily(
            "gunicorn_worker_memory_bytes",
            "Worker memory by type (rss, pss, uss, swap), by stable worker slot.",
            labels=["worker", "type"],
        )
        started = GaugeMetricFamily(
            "gunicorn_worker_start_time_seconds",
            "Start time of the worker in each slot, seconds since the epoch.",
            labels=["worker"],
        )
        cpu = CounterMetricFamily(
            "gunicorn_worker_cpu_seconds",
            "CPU time (user + system) of the worker in each slot; resets when it is replaced.",
            labels=["worker"],
        )
        for slot, s in sorted(snap.workers.items()):
            for t in types:
                if t in s.memory:
                    memory.add_metric([str(slot), t], s.memory[t])
            started.add_metric([str(slot)], s.started)
            cpu.add_metric([str(slot)], s.cpu)
        yield from (memory, started, cpu)
        if snap.master is not None:
            master_memory = GaugeMetricFamily(
                "gunicorn_master_memory_bytes", "Master memory by type.", labels=["type"]
            )
            for t in types:
                if t in snap.master.memory:
                    master_memory.add_metric([t], snap.master.memory[t])
            yield master_memory
            yield GaugeMetricFamily(
                "gunicorn_master_start_time_seconds",
                "Start time of the master, seconds since the epoch.",
                value=snap.master.started,
            )
        if snap.build:
            build = GaugeMetricFamily(
                "gunicorn_build_info",
                "Gunicorn version and worker class of the live master; always 1.",
                labels=sorted(snap.build),
            )
            build.add_metric([snap.build[k] for k in sorted(snap.build)], 1)
            yield build
        if self.sampler.smaps:
            # rss has no series here: a worker whose rss cannot be read is not served at all.
            readable = GaugeMetricFamily(
                "gunicorn_exporter_memory_type_readable",
                "1 if this memory type could be read for the workers (smaps_rollup).",
                labels=["type"],
            )
            for t in SMAPS_TYPES:
                readable.add_metric([t], 1 if snap.readable.get(t) else 0)
            yield readable
        if self.sampler.exit_memory is not None:
            family = self.sampler.exit_memory.family()
            if family.samples:
                yield family
