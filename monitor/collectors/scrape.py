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
        self.skipped_total = 0
        self.errors = {f"collect_{name}": 0 for name in sources}

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
        files_read = sum(getattr(s, "files_read", 0) for s in self.sources.values())
        skipped = sum(getattr(s, "files_skipped", 0) for s in self.sources.values())
        self.skipped_total += skipped
        errors = dict(self.errors)
        for source in self.sources.values():
            for kind, n in getattr(source, "errors_by_kind", {}).items():
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
            "Files skipped because they could not be read or parsed.",
            value=self.skipped_total,
        )
        family = CounterMetricFamily(
            "gunicorn_exporter_errors", "Errors while collecting, by kind.", labels=["kind"]
        )
        for kind in sorted(errors):
            family.add_metric([kind], errors[kind])
        yield family
