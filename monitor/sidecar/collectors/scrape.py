"""One scrape: run every source collector once, time it, and report on the exporter itself.

Overlapping scrapes never do the work twice: a scrape that arrives while another is running
waits for it and serves its result (single flight). A source that fails is counted and left
out of this scrape; the others are still served.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("gunicorn_monitor")


class ScrapeCollector:
    def __init__(self, sources: dict[str, Any], sampler: Any = None) -> None:
        self.sources = sources
        self.sampler = sampler
        self._lock = threading.Lock()
        self._generation = 0
        self._result: list[Metric] = []
        self.duration = 0.0
        self.errors = {f"collect_{name}": 0 for name in sources}
        self._files_read_before = 0

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
                self.errors[f"collect_{name}"] += 1
                log.error("event=collect_failed collector=%s error=%r", name, e)
        yield from families
        # Each source's stats() are cumulative: files_read, files_skipped, files_quarantined
        # and errors by kind.
        stats = [s.stats() for s in self.sources.values() if hasattr(s, "stats")]
        files_read_total = sum(st.files_read for st in stats)
        files_read = files_read_total - self._files_read_before
        self._files_read_before = files_read_total
        errors = dict(self.errors)
        for st in stats:
            for kind, n in st.errors.items():
                errors[kind] = errors.get(kind, 0) + n
        if self.sampler is not None:
            errors["sample"] = self.sampler.errors
        self.duration = time.perf_counter() - start
        yield GaugeMetricFamily(
            "gunicorn_exporter_scrape_duration_seconds",
            "How long collecting this scrape took.",
            value=self.duration,
        )
        yield GaugeMetricFamily(
            "gunicorn_exporter_files_read",
            "Files read from the shared directory in this scrape.",
            value=files_read,
        )
        yield CounterMetricFamily(
            "gunicorn_exporter_files_skipped",
            "Files left out of a scrape because they could not be read or parsed.",
            value=sum(st.files_skipped for st in stats),
        )
        yield CounterMetricFamily(
            "gunicorn_exporter_files_quarantined",
            "Unreadable files moved to quarantine/ in the shared directory.",
            value=sum(getattr(st, "files_quarantined", 0) for st in stats),
        )
        family = CounterMetricFamily(
            "gunicorn_exporter_errors", "Errors while collecting, by kind.", labels=["kind"]
        )
        for kind in sorted(errors):
            family.add_metric([kind], errors[kind])
        yield family
