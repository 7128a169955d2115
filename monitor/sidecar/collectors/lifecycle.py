"""Lifecycle metrics: the counts the hooks recorded, and the state of the live masters.

Counts come from the prometheus_client files in the monitor's subdirectory. Each file is read
once, validated whole by the compaction's reader, and then entry by entry against the contract
(monitor/contract/metrics.py): a known metric, its labels, and label values from their fixed
sets. Whatever passes is merged with the library's own accumulation.

Never a zero that is not one. The counts are sums over files (one per master), so a file that
cannot be read would make every count it holds drop, and Prometheus reads a drop as a counter
reset. So a file that cannot be read leaves out every family of its type (counters, histograms
or gauges): a gap, with `gunicorn_exporter_errors_total{kind}` saying why. Known series start
at 0 (every known (cause, signal) pair of exits, unlabelled counters) only when the files
behind them were all read. A directory that cannot be listed leaves out everything here.

The masters' gauges (up, workers, desired) come from the state files, read by
contract/state.py: a malformed file is skipped alone; one that cannot be read may be a live
master's, so it leaves the gauges out; a worker counts only while it is a live child of its
live master (a zombie is not: a stopped master reaps nothing). A live master is up only while it
is not stopped and its loop turns (sidecar/liveness.py); the largest heartbeat age over the live
masters is served beside it, when one could be read.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

from monitor.contract import causes, metrics, state
from monitor.contract.appfiles import parse_name
from monitor.contract.directory import Layout
from monitor.sidecar import compaction
from monitor.sidecar.liveness import Liveness

# The families the hooks write, by name: every Spec of the contract that lives in a file.
_DERIVED = {
    metrics.UP.name,
    metrics.MASTER_HEARTBEAT_AGE.name,
    metrics.WORKERS.name,
    metrics.WORKERS_DESIRED.name,
    metrics.WORKERS_STUCK_BOOTING.name,
}
SPECS = {
    spec.name: spec
    for spec in vars(metrics).values()
    if isinstance(spec, metrics.Spec) and spec.name not in _DERIVED
}
# Which file type holds which kind of family (gauges: any gauge_<mode> file).
_KIND = {"counter": "counter", "histogram": "histogram", "gauge": "gauge"}


@dataclass
class Stats:
    """Cumulative, for the exporter's self-metrics."""

    files_skipped: int = 0
    errors: dict[str, int] = field(default_factory=dict)


class LifecycleCollector:
    def __init__(
        self, layout: Layout, *, lifetime: bool = True, liveness: Liveness | None = None
    ) -> None:
        self.layout = layout
        self.lifetime = lifetime  # --collector.lifetime
        self.liveness = liveness or Liveness(layout)
        self._stats = Stats()
        self._children = state.Children()
        self._rejected_children = 0

    def stats(self) -> Stats:
        return self._stats

    def _error(self, kind: str, n: int = 1) -> None:
        if n:
            self._stats.errors[kind] = self._stats.errors.get(kind, 0) + n

    def collect(self) -> Iterator[Metric]:
        try:
            with os.scandir(self.layout.own) as it:
                files = sorted((e.name, e.is_file(follow_symlinks=False)) for e in it)
        except FileNotFoundError:
            files = []  # no Gunicorn has run here yet: nothing recorded, truly zero
        except OSError:
            self._error("unreadable")  # nothing here can be told: not even gunicorn_up
            return
        yield from self._counts(files)
        yield from self._masters()

    # -- the counts ------------------------------------------------------------------------

    def _counts(self, files: list[tuple[str, bool]]) -> Iterator[Metric]:
        found: dict[str, Metric] = {}
        broken: set[str] = set()  # file types with a file that could not be read
        tainted: set[tuple] = set()  # histogram label sets with a rejected sample
        for name, regular in files:
            db = parse_name(name) if name.endswith(".db") else None
            if db is None:
                continue
            path = os.path.join(self.layout.own, name)
            try:
                if not regular:  # a symlink, or a FIFO whose open() would hang the scrape
                    raise compaction.BadFile("io", f"{name} is not a regular file")
                entries = compaction.read_entries(path)
            except FileNotFoundError:
                continue  # replaced between listing and reading; its successor is next time
            except compaction.BadFile as e:
                self._stats.files_skipped += 1
                if e.kind == "empty":
                    # Zero bytes: a writer creating it (client_python#1199). It holds no
                    # counts, so leaving it out lowers nothing.
                    self._error("malformed")
                    continue
                self._error("unreadable" if e.kind == "io" else "malformed")
                broken.add(db.typ)
                continue
            foreign: list[tuple[metrics.Spec, compaction.Entry]] = []
            for entry in entries:
                self._add(found, tainted, db, entry, foreign)
            if foreign:
                self._rebucket(found, tainted, entries, foreign)
        _complete_histograms(found)
        merged = {m.name: m for m in MultiProcessCollector._accumulate_metrics(found, True)}
        for spec in SPECS.values():
            if spec.kind in broken or spec.kind not in _KIND:
                continue
            if spec is metrics.WORKER_LIFETIME and not self.lifetime:
                continue
            if spec is metrics.WORKER_EXIT_MEMORY:
                continue  # measured by the sidecar itself (collectors/workers.py)
            family = merged.get(spec.name)
            if spec.kind == "counter":
                yield _with_defaults(spec, family)
            elif spec.kind == "histogram":
                family = _whole_histograms(spec, family, tainted) if family else None
                if family is not None and family.samples:
                    yield family
            elif family is not None and family.samples:
                family.documentation = spec.help
                yield family

    def _add(self, found: dict, tainted: set, db, entry: compaction.Entry, foreign: list) -> None:
        """One entry into `found`, as MultiProcessCollector._read_metrics adds it, if valid;
        a bucket of other bounds into `foreign`, for `_rebucket`."""
        spec = SPECS.get(entry.metric_name)
        labels = dict(entry.labels)
        why = _invalid(spec, db.typ, entry.name, labels, entry.value)
        if why == "foreign":
            foreign.append((spec, entry))
            return
        if why:
            self._error(why)
            if spec is not None and spec.kind == "histogram":
                labels.pop("le", None)
                tainted.add((spec.name, tuple(sorted(labels.items()))))
            return
        metric = found.get(spec.name)
        if metric is None:
            metric = found[spec.name] = Metric(spec.name, spec.help, spec.kind)
        # Labels as sorted pairs: the shape the library's accumulation expects.
        if db.typ == "gauge":
            metric._multiprocess_mode = db.mode
            metric.add_sample(entry.name, entry.labels + (("pid", db.ident),), entry.value)
        else:
            metric.add_sample(entry.name, entry.labels, entry.value)

    def _rebucket(self, found: dict, tainted: set, entries: list, foreign: list) -> None:
        """A file written with other buckets (by an earlier version of the hooks): its buckets
        fold exactly into ours when each of our bounds is one of its bounds, because then no
        bucket of its straddles one of ours. Otherwise its label sets are left out."""
        written: dict[str, set[float]] = {}
        for e in entries:
            le = dict(e.labels).get("le")
            if le is not None and e.name.endswith("_bucket"):
                written.setdefault(e.metric_name, set()).add(_float(le))
        for spec, entry in foreign:
            bounds = sorted(spec.buckets) + [math.inf]
            labels = dict(entry.labels)
            le = _float(labels.pop("le"))
            if not set(bounds) <= written[spec.name]:
                self._error("rejected")
                tainted.add((spec.name, tuple(sorted(labels.items()))))
                continue
            ours = next(b for b in bounds if b >= le)
            labels["le"] = "+Inf" if ours == math.inf else floatToGoString(ours)
            metric = found.get(spec.name)
            if metric is None:
                metric = found[spec.name] = Metric(spec.name, spec.help, spec.kind)
            metric.add_sample(entry.name, tuple(sorted(labels.items())), entry.value)

    # -- the masters -----------------------------------------------------------------------

    def _masters(self) -> Iterator[Metric]:
        masters, malformed, unreadable = state.read_all(self.layout)
        self._stats.files_skipped += malformed + unreadable
        self._error("malformed", malformed)
        if unreadable:  # a master we cannot see may be up: say nothing rather than a wrong 0
            self._error("unreadable", unreadable)
            return
        self._error("rejected", sum(m.rejected for m in masters))
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


def _invalid(spec: metrics.Spec | None, typ: str, name: str, labels: dict, value: float) -> str:
    """Why an entry may not be served ("rejected" or "malformed"), or "" if it may; "foreign"
    for a well-formed bucket whose bound is not one of ours."""
    if spec is None or _KIND.get(typ) != spec.kind:
        return "rejected"  # not a family of the contract, or in the wrong type of file
    if not math.isfinite(value) or (spec.kind != "gauge" and value < 0):
        return "malformed"  # counts are finite and never negative
    names, foreign = set(spec.labels), False
    if spec.kind == "counter":
        ok_name = name == spec.name + "_total"
    elif spec.kind == "histogram":
        ok_name = name in (spec.name + "_sum", spec.name + "_bucket")
        if name == spec.name + "_bucket":
            names.add("le")
            if labels.get("le") not in _bounds(spec):
                if _float(labels.get("le")) is None:
                    return "rejected"
                foreign = True
    else:
        ok_name = name == spec.name
    if not ok_name or set(labels) != names:
        return "rejected"
    for label in spec.labels:
        if labels[label] not in metrics.LABEL_VALUES.get(label, ()):
            return "rejected"
    return "foreign" if foreign else ""


def _float(le: object) -> float | None:
    """A bucket bound as written by prometheus_client (floatToGoString), or None."""
    try:
        bound = float(le)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return bound if bound == bound and bound > -math.inf else None


def _bounds(spec: metrics.Spec) -> frozenset[str]:
    return frozenset([floatToGoString(b) for b in spec.buckets] + ["+Inf"])


def _with_defaults(spec: metrics.Spec, found: Metric | None) -> Metric:
    """A counter family (its files were all read), with the series that start at 0.

    Every pod pays for each zero series, so only those an alert must see rise from 0 start
    there: every known (cause, signal) pair of exits, and the unlabelled counters. Other
    labelled counters (hook errors, directory faults, timeouts by phase) appear with their
    first event, even where the hooks stored a 0: absent is unknown, never a false zero.
    """
    family = Metric(spec.name, spec.help, "counter")
    present = {}
    if found is not None:
        for s in found.samples:
            if s.value or spec is metrics.WORKER_EXITS or not spec.labels:
                present[tuple(sorted(s.labels.items()))] = s.value
    if spec is metrics.WORKER_EXITS:
        defaults = [{"cause": c, "signal": sig} for c, sig in causes.KNOWN_EXITS]
    elif spec.labels:
        defaults = []
    else:
        defaults = [{}]
    for labels in defaults:
        present.setdefault(tuple(sorted(labels.items())), 0.0)
    for key, value in sorted(present.items()):
        family.add_sample(spec.name + "_total", dict(key), value)
    return family


def _complete_histograms(found: dict[str, Metric]) -> None:
    """Every bucket and a _sum for each label set seen, before accumulation.

    Buckets are stored per bucket (non-cumulative), so a bucket no file holds is a bucket with
    no observation: 0. Adding the zeros makes each label set whole whatever the writer chose
    to store, and a whole histogram is what promtool and Prometheus expect.
    """
    for metric in found.values():
        if metric.type != "histogram":
            continue
        spec = SPECS[metric.name]
        seen = {tuple(p for p in s.labels if p[0] != "le") for s in metric.samples}
        for key in seen:
            metric.add_sample(spec.name + "_sum", key, 0.0)
            for le in _bounds(spec):
                metric.add_sample(spec.name + "_bucket", tuple(sorted(key + (("le", le),))), 0.0)


def _whole_histograms(spec: metrics.Spec, found: Metric, tainted: set) -> Metric:
    """The histogram's label sets with no sample rejected.

    A label set with a rejected bucket (a file written with other buckets, or a forged one)
    would serve a _count that is not the sum of its buckets: it is left out instead.
    """
    family = Metric(spec.name, spec.help, "histogram")
    for s in found.samples:
        key = tuple(sorted((k, v) for k, v in s.labels.items() if k != "le"))
        if (spec.name, key) not in tainted:
            family.samples.append(s)
    return family
