"""/metrics bodies kept between scrapes, until something they were made from changes.

Why: a scrape used to collect every source, render some hundreds of series and gzip them
every time, though between two scrapes of a quiet app nothing had changed; the sidecar cost
several times the stock exporter's CPU. Now a scrape first takes the *inputs* of a collection,
cheaply (no parsing, merging or rendering), and when they equal the last scrape's it serves the
bytes rendered then. The inputs, compared by value on every scrape (`DirectoryInputs`):

- the app's files (monitor/sidecar/appindex.py, through the app collector's `inputs()`): the
  index's generation, which moves when a file came, went, was replaced or changed its bytes, or
  a process died; a dead process's file, folded, costs nothing until the kernel says its pid
  was given out again. No listing of the directory and no check of a dead pid on a scrape;
- every file in `gunicorn-monitor/`: a `*.db` file by its used bytes (the hooks write them in
  place), any other file by inode, size and mtime (master-*.json is replaced whole, the
  journal grows); and which recorded masters are alive (and started when recorded), each one's
  verdict (sidecar/liveness.py: up, or stopped or stalled and for how long; never the heartbeat
  of a master that is up, which moves every second), and which of their workers exist;
- the sampler's last snapshot of worker memory and CPU (taken anew when a sampled process is
  gone or the masters recorded a change), and its error count;
- whether the directory may be read at all (readiness.DirectoryGate); while it may not, no body
  is kept, so that each refused scrape is counted.

The inputs are taken before the collection, so a body is never older than the inputs it is
kept for: a change to any of them shows at the very next scrape. The same holds one level down:
each source collector reads only part of the inputs (the app's files and whether their processes
live; our own files and the masters; those plus the sampler's snapshot), and when its part is
unchanged the collection reuses that source's families (collectors/scrape.py), so a moving app
counter costs a read of the app's files, not of everything. Inputs that cannot be taken
(an error) match nothing, and the scrape collects. What a body kept this way repeats is its
collection's own self-metrics (`gunicorn_exporter_scrape_duration_seconds` is how long the
collection of the served samples took).
"""

from __future__ import annotations

import functools
import gzip
import os
import struct
import threading
from collections.abc import Callable
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import Metric

from monitor.contract import directory, state
from monitor.contract.directory import Layout
from monitor.sidecar.liveness import Liveness
from monitor.sidecar.masters import MasterIndex
from monitor.sidecar.retirement import Retirer

HEADER = 4096  # one read gets a small file whole, and every file's used-bytes count
MAX_OPEN = 256  # files whose descriptors are kept between scrapes; the rest are reopened
# zlib's own default. prometheus_client's gzip.compress() takes 9, which on a body of 64
# workers' series takes twice as long for the same size within 0.2 % (the text compressed is
# still the library's, byte for byte).
GZIP_LEVEL = 6
_unpack_int = struct.Struct("i").unpack_from


class _Families:
    """A collector of families already collected, so every format renders one collection."""

    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> list[Metric]:
        return self.families


class RenderedMetrics:
    """`(accept, gzip) -> (content type, body)` for /metrics, exactly as prometheus_client's
    own app renders `collector`, kept until `inputs()` returns something else.

    Single flight: one scrape checks (and renders) at a time, and a scrape that waited reuses
    the check of a scrape that started after it arrived, so a burst costs one check.

    A new body is rendered family by family, and a family equal to the one rendered last time
    (name, help, type, unit, samples) reuses its text: a moving app counter or a new worker
    sample re-renders that family alone. Both exposition formats render each family on its
    own, so the joined texts are the library's bytes (OpenMetrics' `# EOF` goes once, last).
    """

    def __init__(self, collector: Any, inputs: Callable[[], object]) -> None:
        self.collector = collector
        self.inputs = inputs
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._checks = 0
        self._token: object = object()
        self._families: _Families | None = None
        self._bodies: dict[tuple[str, bool], bytes] = {}
        self._texts: dict[str, dict[str, tuple[tuple, bytes]]] = {}  # by content type, name

    def __call__(self, accept: str | None, gz: bool) -> tuple[str, bytes]:
        encoder, content_type = choose_encoder(accept or "")
        arrived = self._checks
        with self._lock:
            if self._checks == arrived:  # no check has started since this scrape arrived
                self._checks += 1
                try:
                    token = self.inputs()
                except Exception:  # unknown inputs match nothing: collect
                    token = object()
                if token != self._token:
                    self._token, self._families, self._bodies = token, None, {}
            body = self._bodies.get((content_type, gz))
            if body is not None:
                self.hits += 1
                return content_type, body
            self.misses += 1
            if self._families is None:
                self._families = _Families(list(self.collector.collect()))
            body = self._render(encoder, content_type, self._families.families)
            if gz:
                body = gzip.compress(body, compresslevel=GZIP_LEVEL)
            self._bodies[(content_type, gz)] = body
            return content_type, body

    def _render(self, encoder: Callable, content_type: str, families: list[Metric]) -> bytes:
        trailer = encoder(_Families([]))  # b"" for text, b"# EOF\n" for OpenMetrics
        last = self._texts.get(content_type, {})
        texts: dict[str, tuple[tuple, bytes, dict | bool | None]] = {}
        parts = []
        for f in families:
            key = (f.name, f.documentation, f.type, f.unit, tuple(f.samples))  # a copy
            kept = last.get(f.name)
            if kept is not None and kept[0] == key:
                text, lines = kept[1], kept[2]
            else:
                text, lines = self._family(encoder, trailer, f, kept)
            texts[f.name] = (key, text, lines)
            parts.append(text)
        self._texts[content_type] = texts
        return b"".join(parts) + trailer

    @staticmethod
    def _family(
        encoder: Callable, trailer: bytes, f: Metric, kept: tuple | None
    ) -> tuple[bytes, dict | bool | None]:
        """One family's text, and its lines by sample for the next time (None: not known yet
        whether the family renders line by line; False: it does not).

        Both exposition formats write a family as its header and then one line a sample, each
        line from that sample alone. A family of 256 worker samples of which two moved renders
        those two lines, each by the library itself (a family of that one sample, less its
        header). A family of which more moved renders whole, by one call of the library, and
        its lines are cut from that text for the next time: a call a line costs the library's
        whole overhead each, which for a family of 16 workers' CPU seconds, all moving at every
        sample, was most of a changed scrape's cost. A family renders whole, always, when a
        sample is one the text format moves to a section of its own (`_created`, `_gsum`,
        `_gcount`), carries an exemplar or a native histogram, or does not come out as one
        line a sample."""
        known = kept[2] if kept is not None else None
        keys = [_line_key(s) for s in f.samples]
        separable = known is not False and None not in keys
        if separable and isinstance(known, dict):
            moved = sum(1 for k in keys if k not in known)
            if moved * PER_LINE <= len(keys):
                lines = _lines(encoder, trailer, f, keys, known)
                if lines is not None:
                    return lines[None] + b"".join(lines[k] for k in keys), lines
        whole = encoder(_Families([f]))
        whole = whole[: len(whole) - len(trailer)]
        if not separable:
            return whole, False
        return whole, _cut(whole, keys)


# A family whose moved samples are at most one in PER_LINE renders those lines alone; with
# more, one render of the whole family costs less.
PER_LINE = 8


def _cut(whole: bytes, keys: list) -> dict | bool:
    """{line key: its line} and {None: header}, cut from a family's whole text: its last
    len(keys) lines, in the samples' order; False if the text is fewer lines than that."""
    rows = whole.splitlines(keepends=True)
    head = len(rows) - len(keys)
    if head < 1:
        return False
    lines: dict = {None: b"".join(rows[:head])}
    lines.update(zip(keys, rows[head:], strict=True))
    return lines


def _line_key(s: Any) -> tuple | None:
    """What a sample's line is made of, hashable; None for one that may not be a line alone."""
    if s.exemplar is not None or getattr(s, "native_histogram", None) is not None:
        return None
    if s.name.endswith(("_created", "_gsum", "_gcount")):
        return None
    return (s.name, tuple(s.labels.items()), s.value, s.timestamp)


def _lines(encoder: Callable, trailer: bytes, f: Metric, keys: list, known: dict) -> dict | None:
    """{line key: its line} for `f`'s samples (`keys`, theirs in order; those in `known`
    reused), and {None: header}; None if a sample rendered alone is not the header and one
    line."""
    header = known[None]
    lines: dict = {None: header}
    for sample, key in zip(f.samples, keys, strict=True):
        line = known.get(key)
        if line is None:
            one = Metric(f.name, f.documentation, f.type, f.unit)
            one.samples = [sample]
            text = encoder(_Families([one]))
            line = text[len(header) : len(text) - len(trailer)]
            if not text.startswith(header) or line.count(b"\n") != 1 or line[-1:] != b"\n":
                return None
        lines[key] = line
    return lines


class DirectoryInputs:
    """The inputs of a collection over `layout` (see the module docstring), as one value.

    `app` is the app collector (None when it is off): its `inputs()` are the app's part.
    `liveness` judges each live master once a scrape, for these inputs and the collection."""

    def __init__(
        self,
        layout: Layout,
        sampler: Any = None,
        gate: Any = None,
        app: Any = None,
        liveness: Liveness | None = None,
        retirer: Retirer | None = None,
        masters: MasterIndex | None = None,
    ) -> None:
        """`retirer`: the sidecar's retirement of gone masters' files; its state
        (`generation`, `backlog`) is an input of the lifecycle counts: the first collection
        after its first pass, or after the backlog was read, serves counts the ones before
        left out. While `backlog` (dead masters' files found at start being read) the
        collection leaves the counts out, so their files are not looked at here either (a
        listing of 200,000 files and a read of each count file's header, every scrape).
        `masters`: the recorded masters as they change (sidecar/masters.py), shared with the
        collection."""
        self.layout = layout
        self.sampler = sampler
        self.gate = gate
        self.app = app
        self.liveness = liveness or Liveness(layout)
        self.retirer = retirer
        self.masters = masters or MasterIndex(layout)
        self._files = _UsedBytes()
        self._version = -1  # the masters' index version the list below is of
        self._masters: list[tuple[int, int | None, tuple[int, ...]]] = []
        self._here: tuple | None = None  # our own files and the masters at the last call
        self._parts: dict[str, object] = {}  # each source's inputs, until a collection takes them
        self._parts_lock = threading.Lock()

    def __call__(self) -> object:
        self.take_parts()  # whatever happens below, the last call's parts are stale now
        if self.gate is not None:
            problem = self.gate.problem()
            if problem is not None:
                # Matches nothing: each such scrape is collected, so that every refused one
                # is counted (readiness.GatedCollector); the body is a line or two.
                return object()
        own_files: dict[str, object] = {}
        known: dict[int, bool] = {}  # one kill(0) a pid
        exists = functools.partial(_exists, known)
        masters = self._live_masters(exists)
        retirer = self.retirer
        retiring = (retirer.generation, retirer.backlog) if retirer is not None else None
        try:
            if retiring is not None and retiring[1]:
                own_files[self.layout.own] = "backlog"  # the counts are left out meanwhile
            else:
                # Checked by the readers' rules, never through a symlink: the inputs are of
                # the directory the collectors read, not of whatever its name leads to.
                own = directory.open_own_for_reading(self.layout)
                try:
                    self._own_files(own, own_files)
                finally:
                    os.close(own)
        except FileNotFoundError:
            own_files[self.layout.own] = None
        self._files.keep_only(own_files)
        app = self.app.inputs(exists) if self.app is not None else None
        here = (own_files, masters)
        sampled = None
        if self.sampler is not None:
            # current() resamples when the masters' files changed or a sampled process is
            # gone; when neither changed, the last snapshot stands.
            snap = self.sampler.snapshot if here == self._here else self.sampler.current()
            errors = self.sampler.errors  # a copy: the sampler counts on in the same dict
            sampled = (snap, dict(errors) if isinstance(errors, dict) else errors)
        self._here = here
        with self._parts_lock:
            self._parts = {"lifecycle": (*here, retiring), "workers": (*here, sampled)}
            if self.app is not None:
                self._parts["app"] = app
        return (app, *here, sampled, retiring)

    def take_parts(self) -> dict[str, object]:
        """Each source's inputs as of the last call, once: for the collection that follows
        that call, so a source's kept families are never reused on inputs older than it."""
        with self._parts_lock:
            parts, self._parts = self._parts, {}
        return parts

    def _live_masters(self, exists: Callable[[int], bool]) -> list:
        """Each recorded master, alive or not, its verdict, and which of its workers exist.
        The list is made again only when the masters' index changed (a state file came, went
        or was replaced, or a master died); a dead master's entry costs nothing."""
        recorded = self.masters.look()
        if self.masters.version != self._version:
            self._version = self.masters.version
            self._masters = [
                (m.pid, _ticks(m) if m.alive else None, tuple(w.pid for w in m.workers))
                for m in recorded.masters
            ]
            self.liveness.forget_all_but({(p, t) for p, t, _ in self._masters if t is not None})
        # A master recorded dead stays dead (stopped, or its process gone); a live one stays
        # live while its process is the one that was live then, and not a zombie. Its verdict
        # is the same while it is up; while it is not, its age moves it on every scrape, and
        # its workers are collected again (a zombie among them is told apart from a worker
        # there; kill(0) alone, here, cannot: with a master that is up, it is reaped within
        # a loop turn, and the state file it rewrites changes the inputs). A dead master that
        # lists no worker is only its index's version: thousands of them cost nothing here.
        found: list = [self._version]
        for pid, ticks, workers in self._masters:
            if ticks is None and not workers:
                continue
            verdict = self.liveness.judge(pid, ticks) if ticks is not None else None
            judged = None if verdict is None else True if verdict.up else verdict
            found.append((pid, verdict is not None, judged, tuple(map(exists, workers))))
        return found

    def _own_files(self, own: int, found: dict[str, object]) -> None:
        """Each file of `gunicorn-monitor/` (the checked fd `own`): a counts file by its inode
        and its used bytes, any other by its inode, size and mtime."""
        with os.scandir(own) as it:
            entries = list(it)
        for e in entries:
            path = os.path.join(self.layout.own, e.name)
            if e.name.endswith(".db") and e.is_file(follow_symlinks=False):
                found[path] = (e.inode(), self._files.read(own, path, e.inode()))
            else:
                try:
                    st = e.stat(follow_symlinks=False)
                except OSError:  # gone since the listing
                    continue
                found[path] = (st.st_ino, st.st_size, st.st_mtime_ns)


def _ticks(m: state.Master) -> int | None:
    """The /proc start of a live master: recorded, or (from an earlier version) read now."""
    return m.start_ticks if m.start_ticks is not None else state.start_ticks(m.pid)


def _exists(known: dict[int, bool], pid: int) -> bool:
    found = known.get(pid)
    if found is None:
        found = known[pid] = state.pid_exists(pid)
    return found


class _UsedBytes:
    """The used bytes of prometheus_client files (the count in their first 4 bytes), read by
    pread on descriptors kept open between scrapes: one system call a file, not three."""

    def __init__(self, max_open: int = MAX_OPEN) -> None:
        self.max_open = max_open
        self._open: dict[str, tuple[int, int]] = {}  # path -> (inode, fd); closed only here

    def read(self, dir_fd: int, path: str, inode: int) -> bytes | None:
        """The used bytes of `path`, a file of the directory `dir_fd` (opened by its name
        there, never through a symlink), kept open by path and inode."""
        kept = self._open.get(path)
        if kept is not None and kept[0] != inode:  # replaced (compaction renames over)
            del self._open[path]
            os.close(kept[1])
            kept = None
        if kept is not None:
            fd = kept[1]
        else:
            try:
                flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
                fd = os.open(os.path.basename(path), flags, dir_fd=dir_fd)
            except OSError:
                return None
        try:
            data = os.pread(fd, HEADER, 0)
            used = _unpack_int(data)[0] if len(data) >= 4 else 0
            if used > len(data):  # never more than the file holds, whatever its header says
                used = min(used, os.fstat(fd).st_size)
                data += os.pread(fd, max(0, used - len(data)), len(data))
            return data[: max(used, 0)]
        except OSError:
            return None
        finally:
            if kept is None:
                if len(self._open) < self.max_open:
                    self._open[path] = (inode, fd)
                else:
                    os.close(fd)

    def keep_only(self, seen: dict[str, object]) -> None:
        """Close the descriptors of files that are gone since the last scan."""
        for path in [p for p in self._open if p not in seen]:
            os.close(self._open.pop(path)[1])
