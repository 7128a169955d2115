"""A kept body, rendered again line by line where samples moved, is still the library's bytes.

monitor/sidecar/cache.py renders a family whose samples partly moved from its unchanged lines
and the moved samples alone. The oracle is prometheus_client's own exposition of the same
families, in every format a scraper may ask for.
"""

from __future__ import annotations

import random

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import _bake_output

from monitor.sidecar.cache import RenderedMetrics

ACCEPTS = [None, "application/openmetrics-text; version=1.0.0"]


class Moving:
    """Families of many samples, a few of which move each time `step()` is called."""

    def __init__(self) -> None:
        self.rnd = random.Random(3)
        self.memory = {(str(w), t): 1e6 * w for w in range(64) for t in ("rss", "pss")}
        self.cpu = {str(w): 0.5 * w for w in range(64)}
        self.created = 1.0

    def step(self, every: bool = False) -> None:
        """A few samples move; with `every`, each worker's CPU moves too (as at every sample
        of the sidecar's), so that family renders whole and its lines are cut from it."""
        for key in self.rnd.sample(sorted(self.memory), 3):
            self.memory[key] += 4096
        self.cpu[str(self.rnd.randrange(64))] += 0.01
        if every:
            for w in self.cpu:
                self.cpu[w] += 0.02
        self.created += 1  # a _created sample: the text format moves it, rendered whole

    def collect(self) -> list[Metric]:
        memory = GaugeMetricFamily("w_memory_bytes", "Memory.", labels=["worker", "type"])
        for (w, t), v in self.memory.items():
            memory.add_metric([w, t], v)
        cpu = CounterMetricFamily("w_cpu_seconds", "CPU.", labels=["worker"])
        for w, v in self.cpu.items():
            cpu.add_metric([w], v)
        made = CounterMetricFamily("w_made", "Made.", labels=["k"], created=self.created)
        made.add_metric(["a"], 1, created=self.created)
        made.add_metric(["b"], 2, created=self.created)
        hist = HistogramMetricFamily("w_lifetime_seconds", "Life.", labels=["cause"])
        hist.add_metric(["x"], [("1.0", 1), ("+Inf", 2)], 3.0)
        return [memory, cpu, made, hist]


@pytest.mark.parametrize("every", [False, True], ids=["few moved", "every cpu moved"])
@pytest.mark.parametrize("accept", ACCEPTS)
def test_a_family_whose_samples_partly_moved_renders_as_the_library_does(accept, every):
    moving = Moving()
    registry = CollectorRegistry()
    registry.register(moving)  # type: ignore[arg-type]
    generation = [0]
    rendered = RenderedMetrics(registry, lambda: generation[0])
    for step in range(6):
        _, body = rendered(accept, False)
        assert body == _bake_output(registry, accept, None, {}, False)[2]
        moving.step(every=every and step % 2 == 0)  # whole, then a few, then whole
        generation[0] += 1
    assert rendered.misses == 6
