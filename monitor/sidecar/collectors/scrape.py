"""One scrape: run every source collector once, time it, and report on the exporter itself.

Overlapping scrapes never do the work twice: a scrape that arrives while another is running
waits for it and serves its result (single flight). A source that fails is counted and left
out of this scrape; the others are still served.

Errors are counted by why, from a fixed set (KINDS), every kind from the first scrape at 0 so
that `increase()` sees the first one. Where it happened is in the log line that goes with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("gunicorn_monitor")

KINDS = (
    "unreadable",  # a file or directory the sidecar may not read: its series are left out
    "malformed",  # a file or journal line that is not what the contract says: skipped
    "rejected",  # a value outside its known set (label value, slot, a pid not the master's)
    "collect",  # a source or the sampler failed as a whole; its series are left out
    "compaction",  # folding dead workers' app files failed or could not take the lock
)

# The app collector's finer kinds (monitor/sidecar/collectors/appmetrics.py, compaction.py).
_APP_KINDS = {
    "io": "unreadable",
    "vanished": "unreadable",
    "empty": "malformed",
    "truncated": "malformed",
    "corrupt": "malformed",
    "encoding": "malformed",
    "key": "malformed",
    "name": "malformed",
    "lock": "compaction",
    "compaction": "compaction",
    "recovery": "compaction",
}


def kind_of(kind: str) -> str:
    """The served kind for a source's own kind; one we do not know is a failed collection."""
    if kind in KINDS:
        return kind
    if kind.startswith("aggregate-"):
        return "compaction"
    return _APP_KINDS.get(kind, "collect")


class ScrapeCollector:
    def __init__(self, sources: dict[str, Any], kinds: tuple[str, ...] = KINDS) -> None:
        """`kinds`: the error kinds served, every one from the first scrape (all of KINDS
        that the enabled sources can meet; others are still counted, under "collect")."""
        self.sources = sources
        self.kinds = kinds
        self._lock = threading.Lock()
        self._generation = 0
        self._result: list[Metric] = []
        self.duration = 0.0
        self.failed = 0  # sources that raised

    def collect(self) -> Iterable[Metric]:
        seen = self._generation
        with self._lock:
            if self._generation != seen:
                return self._result  # a scrape finished while we waited: it is ours too
            self._result = list(self._scrape())
            self._generation += 1
            return self._result

    def _scrape(self) -> Iterator[Metric]:
        start = time.perf_counter()
        families: list[Metric] = []
        for name, source in self.sources.items():
            try:
                families.extend(source.collect())
            except Exception as e:
                self.failed += 1
                log.error("event=collect_failed collector=%s error=%r", name, e)
        yield from families
        # Each source's stats() are cumulative: files_skipped, files_quarantined, errors by kind.
        stats = [s.stats() for s in self.sources.values() if hasattr(s, "stats")]
        errors = dict.fromkeys(self.kinds, 0)
        errors["collect"] += self.failed
        for st in stats:
            for kind, n in st.errors.items():
                kind = kind_of(kind)
                errors[kind if kind in errors else "collect"] += n
        self.duration = time.perf_counter() - start
        yield GaugeMetricFamily(
            "gunicorn_exporter_scrape_duration_seconds",
            "How long collecting this scrape took.",
            value=self.duration,
        )
        yield CounterMetricFamily(
            "gunicorn_exporter_files_skipped",
            "Files left out of a scrape because they could not be read or parsed.",
            value=sum(st.files_skipped for st in stats),
        )
        quarantining = [st for st in stats if hasattr(st, "files_quarantined")]
        if quarantining:  # only the app collector moves files aside
            yield CounterMetricFamily(
                "gunicorn_exporter_files_quarantined",
                "Unreadable files moved to quarantine/ in the shared directory.",
                value=sum(st.files_quarantined for st in quarantining),
            )
        family = CounterMetricFamily(
            "gunicorn_exporter_errors",
            "Errors while collecting, by kind: unreadable, malformed, rejected, collect, "
            "compaction.",
            labels=["kind"],
        )
        for kind in self.kinds:
            family.add_metric([kind], errors[kind])
        yield family
