"""Whether the shared directory may be read now, for a sidecar that starts in any order.

The sidecar may start before Gunicorn has created the directory (a pod's containers start in
no fixed order), so a missing directory is a state to wait out, not an error: /-/ready says so,
/metrics serves `gunicorn_up 0` (no master has started yet), and the first scrape after the
directory appears serves everything in it. A directory removed after it was read (`rm -rf`
under running masters, which write it all again within a turn of their loops) says nothing for
STALL_SECONDS, the bound past which a master that has not turned its loop is not up either:
a gap, never a wrong 0; still missing after that, no master is working there: `gunicorn_up 0`.
A directory that exists but may not be read (a
symlink, another user's, writable by others: monitor/contract/directory.py's rules; or not
readable) is read from nowhere, and so says nothing about Gunicorn, not even `gunicorn_up 0`:
a master may be running there. Its scrapes carry only `gunicorn_exporter_errors_total
{kind="unreadable"}`, counting them, until it is fixed; /-/ready says why.
"""

from __future__ import annotations

import errno
import logging
import threading
import time
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric

from monitor.contract import directory, metrics
from monitor.contract.directory import Layout
from monitor.contract.heartbeat import STALL_SECONDS
from monitor.sidecar.collectors.scrape import errors_family

log = logging.getLogger("gunicorn_monitor")


class DirectoryGate:
    """The directory's state, checked on every call (two lstat calls and an access check),
    and logged once per change of state."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._said: str | None = ""  # the last state logged; "" before the first
        self.missing = False  # as of the last problem(): the directory does not exist
        self.was_read = False  # it has been there: a later absence is a removal
        self.removed_at: float | None = None  # when it was first seen missing after that
        self._lock = threading.Lock()

    def problem(self) -> str | None:
        """None if the directory may be read, else why not, in one line."""
        try:
            directory.open_for_reading(self.layout.root)
            why = None
            self.missing, self.was_read, self.removed_at = False, True, None
        except directory.DirectoryError as e:
            why = str(e)
            self.missing = e.errno == errno.ENOENT
            if self.missing and self.was_read:
                if self.removed_at is None:
                    self.removed_at = time.monotonic()
                why = f"{self.layout.root} does not exist (removed: Gunicorn writes it again)"
            elif self.missing:
                why = f"{self.layout.root} does not exist yet (Gunicorn has not started)"
        if why != self._said:
            self._log(why)
        return why

    def _log(self, why: str | None) -> None:
        with self._lock:
            if why == self._said:
                return
            first, self._said = self._said == "", why
        if why is None:
            if not first:
                log.info("event=directory_usable dir=%s", self.layout.root)
        elif "does not exist" in why:
            log.info("event=directory_missing dir=%s", self.layout.root)
        else:
            log.warning("event=directory_refused dir=%s reason=%r", self.layout.root, why)


class GatedCollector:
    """`inner` while the gate allows reading the directory; otherwise `gunicorn_up 0` for a
    directory not there yet, and only the count of refused scrapes for one that may not be
    read, so that no collector ever touches (or, compacting, creates) a directory it should not."""

    def __init__(self, inner: object, gate: DirectoryGate) -> None:
        self.inner = inner
        self.gate = gate
        self.refused = 0

    def collect(self) -> Iterator[Metric]:
        if self.gate.problem() is None:
            yield from self.inner.collect()  # type: ignore[attr-defined]
        elif self.gate.missing:
            removed_at = self.gate.removed_at
            if removed_at is not None and time.monotonic() - removed_at < STALL_SECONDS:
                return  # removed under masters that may be up: a gap
            yield GaugeMetricFamily(metrics.UP.name, metrics.UP.help, value=0)
        else:
            self.refused += 1
            family = errors_family()
            family.add_metric(["unreadable"], self.refused)
            yield family
