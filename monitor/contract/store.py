"""Lifecycle counts on disk, in prometheus_client's multiprocess file format, without mmap.

prometheus_client's own Counter cannot write here: its multiprocess value class takes the
directory from the environment at import time and names files by the current pid. The master
needs a fixed subdirectory and one file per master, so this writes the library's format
(mmap_dict.py: a 4-byte `used`, 4 bytes of padding, then entries of a 4-byte key length, the
key padded to 8 bytes, a value and a timestamp as doubles) byte for byte. Any
MultiProcessCollector, and the sidecar's validating reader, read it as the library's own.

Safety rules, each the answer to a way the shared directory can fail under the master:

- The counts live in the master's memory; the files are copies of them. A file that vanished,
  was replaced (by garbage, another inode, a symlink) or sits in a directory that was removed
  is rewritten whole from memory, so counts on disk never go backwards and garbage is never
  adopted. Only at start does a master adopt a well-formed file of its own name (a pid used by
  an earlier master, as prometheus_client itself continues such a file).
- No mmap. prometheus_client grows its files by truncate (sparse) and stores through a shared
  mapping: on a full disk a store into an unbacked page is SIGBUS, which kills the master with
  no log line. Here every write is pwrite() on an fd, so a full disk, a read-only mount or a
  missing file is an OSError the caller handles.
- One open per write, closed at once, relative to the directory fd the caller checked, with
  O_NOFOLLOW: no fd of ours stays open to be closed twice, to pin a mount read-write, or to
  follow a symlink swapped in later.
- A whole-file write is crash-safe: the complete new file is written to a temporary name
  (preallocated first, so ENOSPC comes before any byte is written), then renamed over the old
  one, the single commit point. A crash at any instruction leaves either the old file or the
  new one, each complete; a leftover temporary file starts with a dot and never matches
  `*.db`. An in-place update writes one 16-byte value slot of a file we wrote whole and whose
  inode and size are still ours: the 8-byte value is aligned and never spans a page.
- New keys change the file's layout, so they always go through a whole-file write; the master
  declares its usual keys up front so that recording an event is an in-place update, which a
  full disk cannot fail.
"""

from __future__ import annotations

import bisect
import errno
import fcntl
import json
import os
import stat
import struct
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

from prometheus_client.mmap_dict import _read_all_values, mmap_key
from prometheus_client.utils import floatToGoString

from monitor.contract import directory, state
from monitor.contract.directory import Layout
from monitor.contract.metrics import Spec

KINDS = ("counter", "histogram", "gauge_max")
_HEADER = struct.Struct("ii")  # used, padding
_SLOT = struct.Struct("dd")  # value, timestamp
# O_NONBLOCK: a FIFO put in a file's place must not hang the master in open().
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK

# Test hook: called with the name of each crash-relevant step; tests kill the process there.
_crash_hook: Callable[[str], None] | None = None


def _checkpoint(step: str) -> None:
    if _crash_hook is not None:
        _crash_hook(step)


class _OnDisk(NamedTuple):
    """The file as we last wrote it whole: its identity, size and where each value sits."""

    dev: int
    ino: int
    size: int
    positions: dict[str, int]


def encode(values: dict[str, float]) -> tuple[bytes, dict[str, int]]:
    """The file prometheus_client's MmapedDict would hold for these keys, up to `used`."""
    parts, positions, pos = [], {}, _HEADER.size
    for key, value in values.items():
        encoded = key.encode("utf-8")
        padded = encoded + b" " * (8 - (len(encoded) + 4) % 8)  # as MmapedDict._init_value
        parts.append(struct.pack(f"i{len(padded)}sdd", len(encoded), padded, value, 0.0))
        positions[key] = pos + 4 + len(padded)
        pos += 4 + len(padded) + _SLOT.size
    return _HEADER.pack(pos, 0) + b"".join(parts), positions


@lru_cache(maxsize=1 << 16)
def parse_key(key: str) -> tuple[str, str, tuple[tuple[str, str], ...], str]:
    """A prometheus_client key, (metric, sample, sorted labels, help); ValueError or TypeError
    for anything else. What every reader of a multiprocess file accepts, ours and the app's."""
    metric_name, name, labels, help_text = json.loads(key)
    if not (isinstance(metric_name, str) and isinstance(name, str) and isinstance(labels, dict)):
        raise ValueError("not a prometheus_client key")
    if not all(isinstance(v, str) for v in labels.values()) or not isinstance(help_text, str):
        raise ValueError("not a prometheus_client key")
    return metric_name, name, tuple(sorted(labels.items())), help_text


def decode(data: bytes) -> dict[str, float]:
    """{key: value} of a whole, well-formed file; ValueError for anything else.

    The library's reader trusts the header; a file of ours is adopted only when every entry
    lies inside it, advances, and has a prometheus_client key (parse_key: what the sidecar
    will read, or the master would keep rewriting a file the sidecar skips).
    """
    if len(data) < _HEADER.size:
        raise ValueError("no header")
    used = _HEADER.unpack_from(data)[0]
    if used == 0:
        return {}
    if not _HEADER.size <= used <= len(data):
        raise ValueError(f"header says {used} bytes used of {len(data)}")
    values, last = {}, 0
    try:
        for key, value, _, pos in _read_all_values(data, used):
            if pos <= last or pos + _SLOT.size > used:
                raise ValueError("entry out of bounds")
            last = pos
            parse_key(key)
            values[key] = value
    except (struct.error, RuntimeError, UnicodeDecodeError, TypeError) as e:
        raise ValueError(str(e)) from None
    return values


def _unlink_quiet(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except FileNotFoundError:
        pass


class Store:
    """One writer's counts: in memory, the authority; on disk, on every `write`.

    Not thread-safe: callers hold their own lock. `inc`, `observe` and `set_max` only change
    memory; `write(dir_fd)` brings the files up to date and raises OSError when it cannot
    (the counts stay in memory and the next `write` brings everything).
    """

    def __init__(self, ident: str) -> None:
        self.ident = ident
        self._values: dict[str, dict[str, float]] = {}
        self._dirty: dict[str, set[str]] = {}
        self._disk: dict[str, _OnDisk] = {}
        self._whole: set[str] = set()  # kinds whose file must be written whole next

    def name(self, kind: str) -> str:
        return f"{kind}_{self.ident}.db"

    # -- memory -----------------------------------------------------------------------------

    def _key(self, kind: str, key: str) -> dict[str, float]:
        values = self._values.setdefault(kind, {})
        if key not in values:
            values[key] = 0.0
            self._whole.add(kind)
        return values

    def _add(self, kind: str, spec: Spec, sample: str, labels: dict, amount: float) -> None:
        names = list(spec.labels) + [k for k in labels if k not in spec.labels]
        key = mmap_key(spec.name, sample, names, [labels[n] for n in names], spec.help)
        values = self._key(kind, key)
        values[key] += amount
        self._dirty.setdefault(kind, set()).add(key)

    def declare(self, spec: Spec, **labels: str) -> None:
        """Create a counter series at 0, so that its first increment is an in-place write."""
        self._add("counter", spec, spec.name + "_total", labels, 0.0)

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
        values = self._key("gauge_max", key)
        if value > values[key]:
            values[key] = value
            self._dirty.setdefault("gauge_max", set()).add(key)

    def total(self, spec: Spec) -> float:
        """The sum of a counter's series, as held in memory."""
        return sum(
            value
            for key, value in self._values.get("counter", {}).items()
            if parse_key(key)[0] == spec.name
        )

    # -- disk -------------------------------------------------------------------------------

    def load(self, dir_fd: int) -> list[str]:
        """Adopt the well-formed files of our name (a reused pid); returns the names refused.

        Only before anything is counted: what is on disk then is all the history there is.
        """
        refused = []
        _discard_stale_temporaries(dir_fd, self.ident)
        for kind in KINDS:
            name = self.name(kind)
            try:
                fd = os.open(name, os.O_RDONLY | _NOFOLLOW, dir_fd=dir_fd)
            except FileNotFoundError:
                continue
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.ENXIO):
                    raise
                refused.append(name)
                continue
            try:
                regular = stat.S_ISREG(os.fstat(fd).st_mode)
                data = os.read(fd, 1 << 24) if regular else b""
            finally:
                os.close(fd)
            if not regular:
                refused.append(name)
                continue
            try:
                found = decode(data)
            except ValueError:
                refused.append(name)  # garbage is not a count: rewritten from ours
                found = {}
            values = self._values.setdefault(kind, {})
            for key, value in found.items():
                # Counted since we started, plus the history; a `max` gauge keeps the larger.
                if kind == "gauge_max":
                    values[key] = max(values.get(key, value), value)
                else:
                    values[key] = values.get(key, 0.0) + value
            self._whole.add(kind)
        return refused

    def forget_files(self) -> None:
        """The directory was replaced: every file is written whole into the new one."""
        self._disk.clear()
        self._whole.update(self._values)

    def write(self, dir_fd: int, verify: bool = False) -> list[str]:
        """Bring every file up to date; returns the names found removed or replaced (rewritten).

        `verify` also checks the files nothing changed in (once per turn of the master's loop).
        Every file is attempted; the first OSError is raised after the last one.
        """
        replaced: list[str] = []
        failed: OSError | None = None
        for kind in list(self._values):
            try:
                self._write_kind(dir_fd, kind, verify, replaced)
            except OSError as e:
                failed = failed or e
        if failed is not None:
            failed.replaced = replaced  # type: ignore[attr-defined]
            raise failed
        return replaced

    def _write_kind(self, dir_fd: int, kind: str, verify: bool, replaced: list[str]) -> None:
        name = self.name(kind)
        known = self._disk.get(kind)
        dirty = self._dirty.get(kind, set())
        if kind not in self._whole and known is not None:
            if dirty:
                if self._write_in_place(dir_fd, kind, known, dirty):
                    return
            elif not verify or _still_ours(dir_fd, name, known):
                return
            replaced.append(name)  # no longer the file we wrote: never written into again
            del self._disk[kind]
            known = None
        try:
            self._write_whole(dir_fd, kind)
        except OSError:
            # The whole file cannot be written (a full disk, a new series): the series it
            # already has are still kept current, in place, which needs no new space.
            keys = dirty & known.positions.keys() if known is not None else set()
            if keys:
                try:
                    self._write_in_place(dir_fd, kind, known, keys, partial=True)
                except OSError:
                    pass
            raise

    def _write_in_place(
        self, dir_fd: int, kind: str, known: _OnDisk, keys: set[str], partial: bool = False
    ) -> bool:
        """False if the file is no longer the one we wrote (it is then left alone).

        Not `partial`: `keys` are all the changes, and the file is current once they are in.
        """
        try:
            fd = os.open(self.name(kind), os.O_WRONLY | _NOFOLLOW, dir_fd=dir_fd)
        except OSError as e:
            if e.errno in (errno.ENOENT, errno.ELOOP, errno.ENXIO):
                return False
            raise
        try:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino, st.st_size) != known[:3]:
                return False
            values = self._values[kind]
            self._whole.add(kind)  # until every slot is written: a failure repairs it whole
            for key in sorted(keys):
                if os.pwrite(fd, _SLOT.pack(values[key], 0.0), known.positions[key]) != 16:
                    raise OSError(errno.ENOSPC, "short write")
                _checkpoint("slot")
            dirty = self._dirty.get(kind, set()) - keys
            if dirty:
                self._dirty[kind] = dirty
            else:
                self._dirty.pop(kind, None)
            if not partial:
                self._whole.discard(kind)
            return True
        finally:
            os.close(fd)

    def _write_whole(self, dir_fd: int, kind: str) -> None:
        name = self.name(kind)
        data, positions = encode(self._values[kind])
        tmp = f".{name}.{os.getpid()}.tmp"
        _unlink_quiet(tmp, dir_fd)  # left by a crash of an earlier writer with our pid
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _NOFOLLOW, 0o600, dir_fd=dir_fd)
        try:
            try:
                try:
                    os.posix_fallocate(fd, 0, len(data))
                except OSError as e:
                    if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                        raise  # ENOSPC: before a single byte is written
                _checkpoint("allocated")
                if os.pwrite(fd, data, 0) != len(data):
                    raise OSError(errno.ENOSPC, "short write")
                st = os.fstat(fd)
                _checkpoint("written")
            finally:
                os.close(fd)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except BaseException:
            try:
                _unlink_quiet(tmp, dir_fd)
            except OSError:
                pass
            raise
        _checkpoint("renamed")
        self._disk[kind] = _OnDisk(st.st_dev, st.st_ino, len(data), positions)
        self._whole.discard(kind)
        self._dirty.pop(kind, None)


def _discard_stale_temporaries(dir_fd: int, ident: str) -> None:
    """Temporary files a writer of this name left when it died mid-write (never read)."""
    for entry in os.listdir(dir_fd):
        parts = entry.split(".")
        # .<kind>_<ident>.db.<pid>.tmp
        if len(parts) != 5 or parts[0] or parts[2] != "db" or parts[4] != "tmp":
            continue
        if not parts[1].endswith("_" + ident) or not parts[3].isdigit():
            continue
        if state.pid_exists(int(parts[3])):
            continue  # its writer may still be writing it
        _unlink_quiet(entry, dir_fd)


def _still_ours(dir_fd: int, name: str, known: _OnDisk) -> bool:
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return False
    return (st.st_dev, st.st_ino, st.st_size) == known[:3]


def set_max_locked(layout: Layout, ident: str, spec: Spec, value: float) -> None:
    """One-off write from a short-lived process (mark-deploy) that may run concurrently."""
    dir_fd = directory.open_private(layout, create=True)
    try:
        lock = os.open(
            f"gauge_max_{ident}.db.lock", os.O_CREAT | os.O_RDWR | _NOFOLLOW, 0o600, dir_fd=dir_fd
        )
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            store = Store(ident)
            store.load(dir_fd)
            store.set_max(spec, value)
            store.write(dir_fd)
        finally:
            os.close(lock)
    finally:
        os.close(dir_fd)
