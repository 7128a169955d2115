"""The event journal: one JSON line per lifecycle event, bounded on disk.

Written by hand because no library does what is needed: several processes (an old and a new
master during a USR2 upgrade) append to one file, and rotation must not lose a line. Each
record is a single O_APPEND write, which the kernel keeps whole; rotation happens under an
flock, and a writer that finds the file rotated under it reopens before its next write.
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator

from monitor.contract.directory import Layout

MAX_BYTES = 4 * 1024 * 1024  # per file; one rotated file is kept, so at most 8 MiB in all


class Journal:
    def __init__(self, layout: Layout, max_bytes: int = MAX_BYTES) -> None:
        self.path = layout.journal
        self.max_bytes = max_bytes
        self._fd = -1

    def _open(self) -> int:
        if self._fd >= 0:
            try:
                if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                    return self._fd
            except FileNotFoundError:
                pass
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        return self._fd

    def append(self, record: dict) -> None:
        line = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
        fd = self._open()
        os.write(fd, line)
        if os.fstat(fd).st_size >= self.max_bytes:
            self._rotate(fd)

    def _rotate(self, fd: int) -> None:
        with open(self.path + ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                # Someone else may have rotated while we waited for the lock.
                if os.stat(self.path).st_ino != os.fstat(fd).st_ino:
                    return
            except FileNotFoundError:
                return
            os.replace(self.path, self.path + ".1")

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def read(layout: Layout) -> tuple[list[dict], int]:
    """All records still on disk, oldest first, and the number of lines that were not JSON."""
    records, bad = [], 0
    for path in (layout.journal + ".1", layout.journal):
        for line in _lines(path):
            try:
                rec = json.loads(line)
            except ValueError:
                bad += 1
                continue
            if isinstance(rec, dict):
                records.append(rec)
            else:
                bad += 1
    return records, bad


def _lines(path: str) -> Iterator[bytes]:
    try:
        with open(path, "rb") as f:
            for line in f:
                # A line without its newline is a record still being written: not yet.
                if line.endswith(b"\n"):
                    yield line
    except FileNotFoundError:
        return


class Tail:
    """Reads the records appended since the last call, across rotations.

    Starts at the end: a reader that starts later has no business with older events.
    """

    def __init__(self, layout: Layout) -> None:
        self.path = layout.journal
        self._file = None
        self._partial = b""
        try:
            self._file = open(self.path, "rb")
            self._file.seek(0, os.SEEK_END)
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
                # Rotated: what we had open is now events.jsonl.1 and fully read. Go on with
                # the new file from its start.
                self._file.close()
                self._partial = b""
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
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
        return out
