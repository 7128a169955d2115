"""One scrape: run every source collector once, time it, and report on the exporter itself.

Overlapping scrapes never do the work twice: a scrape that arrives while another is running
waits for it and serves its result (single flight). A source that fails is counted and left
out of this scrape; the others are still served.

A source whose inputs are unchanged since its last collection is not collected again: its
families from then are served (`parts`, from monitor/sidecar/cache.py's DirectoryInputs, says
what each source reads). Its errors were counted when it was collected; the same unreadable
file is one error a collection, not one a scrape.

Errors are counted by why, from a fixed set (KINDS), every kind from the first scrape at 0 so
that `increase()` sees the first one. Where it happened is in the log line that goes with it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from monitor.contract import metrics

log = logging.getLogger("gunicorn_monitor")

# Every family name of the contract: the app's own metrics may not use one.
CONTRACT = frozenset(s.name for s in vars(metrics).values() if isinstance(s, metrics.Spec))

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


def errors_family() -> CounterMetricFamily:
    """`gunicorn_exporter_errors_total{kind}`, empty: one family, whoever serves it."""
    return CounterMetricFamily(
        "gunicorn_exporter_errors",
        "Errors while collecting, by kind: unreadable, malformed, rejected, collect, compaction.",
        labels=["kind"],
    )


def kind_of(kind: str) -> str:
    """The served kind for a source's own kind; one we do not know is a failed collection."""
    if kind in KINDS:
        return kind
    if kind.startswith("aggregate-"):
        return "compaction"
    return _APP_KINDS.get(kind, "collect")


class ScrapeCollector:
    def __init__(
        self,
        sources: dict[str, Any],
        kinds: tuple[str, ...] = KINDS,
        parts: Callable[[], dict[str, object]] | None = None,
    ) -> None:
        """`kinds`: the error kinds served, every one from the first scrape (all of KINDS
        that the enabled sources can meet; others are still counted, under "collect").

        `parts`: each source's inputs, taken before this collection (a source missing from
        them is collected)."""
        self.sources = sources
        self.kinds = kinds
        self.parts = parts
        self._kept: dict[str, tuple[object, list[Metric]]] = {}  # by source: inputs, families
        self._lock = threading.Lock()
        self._generation = 0
        self._result: list[Metric] = []
        self.duration = 0.0
        self.failed = 0  # sources that raised
        self.duplicates = 0  # families left out because another source served the name
        self._said: set[str] = set()

    def collect(self) -> Iterable[Metric]:
        seen = self._generation
        with self._lock:
            if self._generation != seen:
                return self._result  # a scrape finished while we waited: it is ours too
            self._result = list(self._scrape())
            self._generation += 1
            return self._result

    def _add(self, families: dict[str, Metric], source: str, family: Metric) -> None:
        """A family, unless its name is served already or is the monitor's own and `source`
        is the app's: one name, one family, or the exposition is invalid. (A sidecar of an
        earlier version left its own histogram file in the app's directory.)"""
        if family.name in families or (source == "app" and family.name in CONTRACT):
            self.duplicates += 1
            if family.name not in self._said:
                self._said.add(family.name)
                log.warning(
                    "event=family_left_out name=%s source=%s reason=duplicate", family.name, source
                )
            return
        families[family.name] = family

    def _scrape(self) -> Iterator[Metric]:
        start = time.perf_counter()
        families: dict[str, Metric] = {}
        parts = self.parts() if self.parts is not None else {}
        for name, source in self.sources.items():
            inputs = parts.get(name)
            kept = self._kept.pop(name, None)
            if inputs is not None and kept is not None and kept[0] == inputs:
                found = kept[1]
            else:
                try:
                    found = list(source.collect())
                except Exception as e:
                    self.failed += 1
                    log.error("event=collect_failed collector=%s error=%r", name, e)
                    continue
            if inputs is not None:
                self._kept[name] = (inputs, found)
            for family in found:
                self._add(families, name, family)
        yield from families.values()
        # Each source's stats() are cumulative: files_skipped, files_quarantined, errors by kind.
        stats = [s.stats() for s in self.sources.values() if hasattr(s, "stats")]
        errors = dict.fromkeys(self.kinds, 0)
        errors["collect"] += self.failed
        errors["rejected"] += self.duplicates
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
        family = errors_family()
        for kind in self.kinds:
            family.add_metric([kind], errors[kind])
        yield family
