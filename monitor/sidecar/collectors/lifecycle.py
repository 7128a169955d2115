"""Lifecycle metrics: the counts the hooks recorded, and the state of the live masters.

Counts come from the prometheus_client files in the monitor's subdirectory, merged with the
library's own algorithm; each file is checked first, so one bad file is skipped and counted
instead of failing the scrape. Every known series is present from the first scrape, at 0.
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator
from dataclasses import dataclass, field

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from monitor.contract import causes, metrics, state
from monitor.contract.directory import Layout
from monitor.sidecar import compaction

_COUNTERS = (
    metrics.WORKER_EXITS,
    metrics.WORKER_ABORTS,
    metrics.WORKER_SPAWNS,
    metrics.WORKER_RESTARTS,
    metrics.MASTER_RELOADS,
    metrics.HOOK_ERRORS,
)


def readable(path: str) -> bool:
    """Whether this is a whole prometheus_client file, by the compaction's validating reader."""
    try:
        compaction.read_entries(path)
        return True
    except (compaction.BadFile, OSError):
        return False


@dataclass
class Stats:
    """Cumulative, for the exporter's self-metrics."""

    files_read: int = 0
    files_skipped: int = 0
    errors: dict[str, int] = field(default_factory=lambda: {"lifecycle_unreadable": 0})


class LifecycleCollector:
    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._stats = Stats()

    def stats(self) -> Stats:
        return self._stats

    def _skipped(self, n: int) -> None:
        self._stats.files_skipped += n
        self._stats.errors["lifecycle_unreadable"] += n

    def collect(self) -> Iterator[Metric]:
        files = sorted(glob.glob(os.path.join(self.layout.own, "*.db")))
        good = [f for f in files if readable(f)]
        self._stats.files_read += len(files)
        self._skipped(len(files) - len(good))
        try:
            merged = {m.name: m for m in MultiProcessCollector.merge(good, accumulate=True)}
        except Exception:
            # A file that changed between the check and the merge: serve zeros this once.
            self._skipped(len(good))
            merged = {}
        for spec in _COUNTERS:
            yield _with_defaults(spec, merged.get(spec.name))
        yield _lifetime(merged.get(metrics.WORKER_LIFETIME.name))
        deploy = merged.get(metrics.LAST_DEPLOY.name)
        if deploy is not None and deploy.samples:
            deploy.documentation = metrics.LAST_DEPLOY.help
            yield deploy
        yield from self._masters()

    def _masters(self) -> Iterator[Metric]:
        masters, bad = state.read(self.layout)
        self._skipped(bad)
        live = [m for m in masters if m.alive]
        workers = sum(
            1 for m in live for pid in m.state.get("workers", {}) if state.pid_exists(int(pid))
        )
        yield GaugeMetricFamily(metrics.UP.name, metrics.UP.help, value=1 if live else 0)
        yield GaugeMetricFamily(metrics.WORKERS.name, metrics.WORKERS.help, value=workers)
        desired = sum(int(m.state.get("workers_desired") or 0) for m in live)
        yield GaugeMetricFamily(metrics.WORKERS_DESIRED.name, metrics.WORKERS_DESIRED.help, desired)


def _with_defaults(spec: metrics.Spec, found: Metric | None) -> Metric:
    family = Metric(spec.name, spec.help, "counter")
    present = {}
    if found is not None:
        for s in found.samples:
            present[tuple(sorted(s.labels.items()))] = s
    if spec is metrics.WORKER_EXITS:
        defaults = [{"cause": c, "signal": sig} for c, sig in causes.KNOWN_EXITS]
    elif spec.labels:
        defaults = []
    else:
        defaults = [{}]
    for labels in defaults:
        key = tuple(sorted(labels.items()))
        present.setdefault(key, Sample(spec.name + "_total", labels, 0.0))
    for _, s in sorted(present.items()):
        family.samples.append(Sample(spec.name + "_total", s.labels, s.value))
    return family


def _lifetime(found: Metric | None) -> Metric:
    spec = metrics.WORKER_LIFETIME
    family = Metric(spec.name, spec.help, "histogram")
    by_cause: dict[str, list[Sample]] = {}
    if found is not None:
        for s in found.samples:
            by_cause.setdefault(s.labels.get("cause", ""), []).append(s)
    bounds = [floatToGoString(b) for b in spec.buckets] + ["+Inf"]
    for cause in sorted(set(causes.CAUSES) | set(by_cause)):
        samples = by_cause.get(cause)
        if samples:
            family.samples.extend(samples)
            continue
        for le in bounds:
            family.samples.append(Sample(spec.name + "_bucket", {"cause": cause, "le": le}, 0.0))
        family.samples.append(Sample(spec.name + "_count", {"cause": cause}, 0.0))
        family.samples.append(Sample(spec.name + "_sum", {"cause": cause}, 0.0))
    return family
