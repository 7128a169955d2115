"""The event journal: one JSON line per lifecycle event, bounded on disk.

Written by hand because no library does what is needed: several processes (an old and a new
master during a USR2 upgrade) append to one file, and rotation must not lose a line. Each
record is a single O_APPEND write, which the kernel keeps whole; rotation happens under an
flock that no writer ever waits for, and each record opens the file anew by name, so a rotated
file is never written to again.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
from collections.abc import Iterator

from monitor.contract.directory import Layout, open_private

MAX_BYTES = 4 * 1024 * 1024  # per file; one rotated file is kept, so at most 8 MiB in all


class Journal:
    """The writer. Holds no fd between records: each append opens the file relative to a
    checked directory fd (O_NOFOLLOW), writes one record and closes, so there is no fd of ours
    to go stale, to be closed twice after the directory vanished, or to pin a mount writable.
    """

    def __init__(self, layout: Layout, max_bytes: int = MAX_BYTES) -> None:
        self.layout = layout
        self.name = os.path.basename(layout.journal)
        self.max_bytes = max_bytes

    def append(self, record: dict, dir_fd: int | None = None) -> None:
        """One record, one write; OSError when it cannot be written (nothing half-written).

        `dir_fd` is the open `gunicorn-monitor/` (the master's recorder keeps one checked);
        without it the directory is opened and checked for this one record.
        """
        line = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
        if dir_fd is None:
            own = open_private(self.layout, create=True)
            try:
                self._append(line, own)
            finally:
                os.close(own)
        else:
            self._append(line, dir_fd)

    def _append(self, line: bytes, dir_fd: int) -> None:
        fd = self._open(dir_fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                # A FIFO or a device where our journal goes: removed, and a file made.
                fd, replaced = -1, fd  # forgotten before it is closed: closed once
                os.close(replaced)
                os.unlink(self.name, dir_fd=dir_fd)
                fd = self._open(dir_fd)
                st = os.fstat(fd)
            if os.write(fd, line) != len(line):
                raise OSError(errno.ENOSPC, "short write")
            size = os.fstat(fd).st_size
        finally:
            if fd >= 0:
                os.close(fd)
        if size >= self.max_bytes:
            try:
                self._rotate(dir_fd, st.st_ino)
            except OSError:
                pass  # the record is written (a caller must not write it again); next record

    def _open(self, dir_fd: int) -> int:
        # O_NONBLOCK: a FIFO put in the journal's place must not hang the master in open().
        flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
        flags |= os.O_NONBLOCK
        try:
            return os.open(self.name, flags, 0o600, dir_fd=dir_fd)
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENXIO):
                raise
            # A symlink (or a FIFO nobody reads) where our journal goes: removed (unlink never
            # follows), never written through. Only our own user or root can have put it in
            # our private directory.
            os.unlink(self.name, dir_fd=dir_fd)
            return os.open(self.name, flags, 0o600, dir_fd=dir_fd)

    def _rotate(self, dir_fd: int, ino: int) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
        try:
            lock = os.open(self.name + ".lock", flags, 0o600, dir_fd=dir_fd)
        except OSError as e:
            if e.errno != errno.ELOOP:
                raise
            os.unlink(self.name + ".lock", dir_fd=dir_fd)  # a symlink: removed, never followed
            lock = os.open(self.name + ".lock", flags, 0o600, dir_fd=dir_fd)
        try:
            try:
                # Never wait: another writer holding the lock is rotating (or is stopped while
                # it does: a SIGSTOPped mark-deploy must not hang the master). Next record.
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return
            try:
                # Someone else may have rotated before we took the lock.
                if os.stat(self.name, dir_fd=dir_fd, follow_symlinks=False).st_ino != ino:
                    return
            except FileNotFoundError:
                return
            os.rename(self.name, self.name + ".1", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        finally:
            os.close(lock)


def read(layout: Layout) -> tuple[list[dict], int]:
    """All records still on disk, oldest first, and the number of lines that were not records.

    A writer that died mid-record (a short write on a full disk, a kill between two writes of
    a future writer) leaves a line without its newline; the next record is then appended to
    it. That merged line still ends in a whole record, which `_records` recovers: a torn line
    costs itself, never the record after it.
    """
    records, bad = [], 0
    for path in (layout.journal + ".1", layout.journal):
        for line in _lines(path):
            found, torn = _records(line)
            records.extend(found)
            bad += torn
    return records, bad


def _lines(path: str) -> Iterator[bytes]:
    """Whole lines of one journal file; a missing file has none, an unreadable one raises."""
    try:
        with open(path, "rb") as f:
            for line in f:
                # A line without its newline is a record still being written: not yet.
                if line.endswith(b"\n"):
                    yield line
    except FileNotFoundError:
        return


def _records(line: bytes) -> tuple[list[dict], int]:
    """The record in one line, and 1 if (part of) the line was not one.

    Records are JSON objects of scalars written with sort_keys, so a record starts with `{"`.
    When the line does not parse, the longest suffix starting at a `{"` that parses as an
    object is the whole record a torn line was merged with (json has no resynchronising
    reader, hence by hand). Only damaged lines pay for the search; journal lines are short.
    """
    line = line.strip()
    if not line:
        return [], 0
    try:
        rec = json.loads(line)
        if isinstance(rec, dict):
            return [rec], 0
    except ValueError:
        pass
    start = line.find(b'{"', 1)
    while start > 0:
        try:
            rec = json.loads(line[start:])
            if isinstance(rec, dict):
                return [rec], 1
        except ValueError:
            pass
        start = line.find(b'{"', start + 1)
    return [], 1


class Tail:
    """Reads the records appended since the last call, across rotations.

    Starts at the end: a reader that starts later has no business with older events. `bad`
    counts lines that were not whole records (see `read`), for the reader's error counter.
    """

    def __init__(self, layout: Layout) -> None:
        self.path = layout.journal
        self.bad = 0
        self._file = None
        self._partial = b""
        self._mid_line = False
        try:
            self._file = open(self.path, "rb")
            end = self._file.seek(0, os.SEEK_END)
            if end > 0:
                # Started inside a line: its rest is not a record to count as damaged.
                self._file.seek(end - 1)
                self._mid_line = self._file.read(1) != b"\n"
        except OSError:  # not there yet, or not ours to read: nothing to follow
            pass

    def read_new(self) -> list[dict]:
        records = []
        while True:
            if self._file is not None:
                records.extend(self._parse(self._file.read()))
                try:
                    if os.stat(self.path).st_ino == os.fstat(self._file.fileno()).st_ino:
                        return records
                except FileNotFoundError:
                    return records
                # Rotated: what we had open is now events.jsonl.1. A writer may have appended
                # to it between our read and the rotation: read it to its end, then go on with
                # the new file from its start. A torn line left at its end never completes.
                records.extend(self._parse(self._file.read()))
                self._file.close()
                self._partial = b""
                self._mid_line = False
            try:
                self._file = open(self.path, "rb")
            except OSError:
                self._file = None
                return records

    def _parse(self, data: bytes) -> list[dict]:
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        out = []
        for line in lines:
            found, torn = _records(line)
            out.extend(found)
            if self._mid_line:
                # The rest of the line we started inside: not damage (and if the writer of
                # that line died, a whole record appended after it is still recovered).
                self._mid_line = False
            else:
                self.bad += torn
        return out
