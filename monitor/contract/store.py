"""Lifecycle counts on disk, in prometheus_client's multiprocess file format.

prometheus_client's own Counter cannot write here: its multiprocess value class takes the
directory from the environment at import time and names files by the current pid. The master
needs a fixed subdirectory and one file per master, so this writes prometheus_client's format
(MmapedDict, mmap_key) directly. Any MultiProcessCollector pointed at the subdirectory reads it.

A new master whose pid was used by an earlier master reopens that file and continues its
counts, exactly as prometheus_client itself does: counts never go backwards.
"""

from __future__ import annotations

import bisect
import fcntl
import os

from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.utils import floatToGoString

from monitor.contract.directory import Layout
from monitor.contract.metrics import Spec


class Store:
    """The writer for one process. Not thread-safe: callers hold their own lock."""

    def __init__(self, layout: Layout, ident: str) -> None:
        self._layout = layout
        self._ident = ident
        self._files: dict[str, MmapedDict] = {}

    def _file(self, kind: str) -> MmapedDict:
        f = self._files.get(kind)
        if f is None:
            f = self._files[kind] = MmapedDict(self._layout.db(kind, self._ident))
        return f

    def _add(self, kind: str, spec: Spec, sample: str, labels: dict, amount: float) -> None:
        names = list(spec.labels) + [k for k in labels if k not in spec.labels]
        key = mmap_key(spec.name, sample, names, [labels[n] for n in names], spec.help)
        f = self._file(kind)
        value, _ = f.read_value(key)
        f.write_value(key, value + amount, 0.0)

    def inc(self, spec: Spec, amount: float = 1.0, **labels: str) -> None:
        self._add("counter", spec, spec.name + "_total", labels, amount)

    def observe(self, spec: Spec, value: float, **labels: str) -> None:
        # Stored per bucket, not cumulative: the collector accumulates, as for any histogram.
        bounds = list(spec.buckets) + [float("inf")]
        hit = bisect.bisect_left(bounds, value)
        self._add("histogram", spec, spec.name + "_sum", labels, value)
        for i, bound in enumerate(bounds):
            # Every bucket is written, the empty ones with 0, so the series all exist.
            sample_labels = {**labels, "le": floatToGoString(bound)}
            self._add("histogram", spec, spec.name + "_bucket", sample_labels, float(i == hit))

    def set_max(self, spec: Spec, value: float) -> None:
        """A gauge that only moves up across writers (served with multiprocess mode `max`)."""
        key = mmap_key(spec.name, spec.name, [], [], spec.help)
        f = self._file("gauge_max")
        if value > f.read_value(key)[0]:
            f.write_value(key, value, 0.0)

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()


def set_max_locked(layout: Layout, ident: str, spec: Spec, value: float) -> None:
    """One-off write from a short-lived process (mark-deploy) that may run concurrently."""
    lock_path = layout.db("gauge_max", ident) + ".lock"
    fd = os.open(lock_path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        store = Store(layout, ident)
        try:
            store.set_max(spec, value)
        finally:
            store.close()
    finally:
        os.close(fd)
