"""The event journal: one JSON line per lifecycle event, bounded on disk, read from either end.

Written by hand because no library does what is needed: several processes (an old and a new
master during a USR2 upgrade, `gunicorn-monitor mark-deploy`) append to one file, and rotation
must neither lose a line nor wait for anyone.

Files, in `gunicorn-monitor/`:

    events.jsonl                 the live file: every record is appended here
    events.jsonl.<ns>-<pid>      rotated files, <ns> the rotation's time (20 digits: they sort
                                 in the order they were rotated, unless the wall clock was set
                                 back in between)
    events.jsonl.1               rotated by an earlier version: the oldest, if there

The rules:
- One record, one write: each append opens the live file (O_APPEND, relative to the checked
  directory fd, O_NOFOLLOW), writes the whole line in one write(), which the kernel keeps whole
  and in one place, and closes. No fd is held between records.
- Rotation is one rename, by whichever writer's append took the live file to MAX_BYTES, of the
  live file to a name nobody else uses (its time and pid): never a lock, so nothing anyone
  holds (a SIGSTOPped mark-deploy, an old master stuck in a hook) can keep the journal from
  rotating. A writer still holding the renamed file's fd finishes its one write into it: the
  line is in the rotated file. Two writers that rotate at once each rename what the live file
  is at that moment, so the second renames, at worst, a small file just begun: an extra rotated
  file, and no line lost or in two files. That writer sees it renamed another inode than the
  one it measured, and renames it again, to a name taken after the first rotation's, so that
  names sort as the files were written (and the trim leaves such a file alone meanwhile).
- Rotated files are kept, newest first, while they add up to KEEP_BYTES; the newest one is
  always kept. Only the writer that rotated removes the oldest beyond that, after its rename.
  So the journal takes at most MAX_BYTES + KEEP_BYTES, plus one line per writer appending at
  that moment and the newest rotated file's excess (one written by an earlier version, which
  rotated only when it could take a lock, may be any size: it goes at the next rotation).

Readers never load the journal whole: `records` streams it oldest first, `backwards` newest
first (read in blocks from the end), each in memory bounded by one block and one line.
A line is a record when it parses as a JSON object; a writer that died mid-record (a short
write on a full disk) leaves a line the next record is appended to, which `_records` recovers:
a torn line costs itself, never the record after it.
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
import time
from collections.abc import Iterator
from typing import BinaryIO

from monitor.contract import directory
from monitor.contract.directory import Layout, open_private

MAX_BYTES = 4 * 1024 * 1024  # the live file rotates once it holds this much
KEEP_BYTES = 4 * 1024 * 1024  # rotated files kept; so about 8 MiB in all (module docstring)
SETTLE_SECONDS = 10.0  # a rotation's fix-up is over within this (see Journal._trim)
BLOCK = 64 * 1024  # what a reader reads at a time
MAX_LINE = 64 * 1024  # a longer "line" is not one of ours (records are short): torn

NAME = "events.jsonl"
_ROTATED = re.compile(re.escape(NAME) + r"\.(?:1|[0-9]{20}-[0-9]+)")
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class Journal:
    """The writer. Holds no fd between records: each append opens the file relative to a
    checked directory fd (O_NOFOLLOW), writes one record and closes, so there is no fd of ours
    to go stale, to be closed twice after the directory vanished, or to pin a mount writable.
    """

    def __init__(
        self, layout: Layout, max_bytes: int = MAX_BYTES, keep_bytes: int = KEEP_BYTES
    ) -> None:
        self.layout = layout
        self.name = os.path.basename(layout.journal)
        self.max_bytes = max_bytes
        self.keep_bytes = keep_bytes

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
        try:
            if os.stat(self.name, dir_fd=dir_fd, follow_symlinks=False).st_ino != ino:
                return  # another writer rotated it since our write: nothing to do
        except FileNotFoundError:
            return
        rotated = _rotated_name(self.name)
        try:
            os.rename(self.name, rotated, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except FileNotFoundError:
            return  # renamed by another writer between our stat and our rename
        if os.stat(rotated, dir_fd=dir_fd, follow_symlinks=False).st_ino != ino:
            # Another writer rotated ours between our stat and our rename, and we renamed the
            # file begun after it: named now, after that rotation's name, it sorts after it.
            later = _rotated_name(self.name)
            os.rename(rotated, later, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        self._trim(dir_fd)

    def _trim(self, dir_fd: int) -> None:
        """Remove the oldest rotated files beyond keep_bytes (the newest always stays). A small
        file renamed in the last seconds may be another writer's, in its rotation's fix-up
        (a name that does not yet sort where it belongs): left for a later trim."""
        kept = 0
        now = time.time()
        for name in reversed(rotated_names(os.listdir(dir_fd))):
            try:
                st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue
            settling = st.st_size < self.max_bytes // 4 and now - st.st_ctime < SETTLE_SECONDS
            if kept and kept + st.st_size > self.keep_bytes and not settling:
                try:
                    os.unlink(name, dir_fd=dir_fd)
                except FileNotFoundError:
                    pass
                continue
            kept += st.st_size


def _rotated_name(name: str) -> str:
    """A name no other rotation takes (its time and our pid), sorting by when it was made."""
    return f"{name}.{time.time_ns():020d}-{os.getpid()}"


def rotated_names(names: list[str]) -> list[str]:
    """The rotated files among `names`, oldest first (an earlier version's `.1` before all)."""
    return sorted((n for n in names if _ROTATED.fullmatch(n)), key=lambda n: (n != NAME + ".1", n))


class Reader:
    """The journal's files, opened at once (so that a rotation while reading loses nothing:
    a file renamed after it was opened is still read, and read once, by its inode).

    Iterate `records()` (oldest first) or `backwards()` (newest first), once; `bad` then
    counts the lines that were not whole records. Raises OSError (DirectoryError first) when
    the directory or a file of it cannot be opened; a journal not written yet has no records.
    Use as a context manager, which closes the files.
    """

    def __init__(self, layout: Layout) -> None:
        self.bad = 0
        self._fds: list[int] = []
        try:
            dir_fd = directory.open_own_for_reading(layout)
        except FileNotFoundError:
            return
        try:
            # The live file first: rotated after this open, it shows in the listing below too
            # and is read once (same inode); rotated before, its new name is in the listing.
            self._open(dir_fd, NAME)
            for name in rotated_names(os.listdir(dir_fd)):
                self._open(dir_fd, name)
        except BaseException:
            self.close()
            raise
        finally:
            os.close(dir_fd)
        if len(self._fds) > 1:  # oldest first: the live file goes last
            self._fds.append(self._fds.pop(0))
        seen, unique = set(), []
        for fd in self._fds:
            st = os.fstat(fd)
            if (st.st_dev, st.st_ino) in seen:
                os.close(fd)
                continue
            seen.add((st.st_dev, st.st_ino))
            unique.append(fd)
        self._fds = unique

    def _open(self, dir_fd: int, name: str) -> None:
        try:
            fd = os.open(
                name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd
            )
        except FileNotFoundError:
            return  # not written yet, or removed as the oldest while we listed
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            return
        self._fds.append(fd)

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)

    def __enter__(self) -> Reader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def records(self) -> Iterator[dict]:
        """Every record, oldest first, streamed."""
        for fd in self._fds:
            for line in _lines_forward(fd):
                yield from self._parsed(line)

    def backwards(self) -> Iterator[dict]:
        """Every record, newest first, read from the end."""
        for fd in reversed(self._fds):
            for line in _lines_backward(fd):
                found = list(self._parsed(line))
                yield from reversed(found)

    def _parsed(self, line: bytes) -> Iterator[dict]:
        found, torn = _records(line)
        self.bad += torn
        yield from found


def read(layout: Layout) -> tuple[list[dict], int]:
    """All records still on disk, oldest first, and the number of lines that were not records.
    Memory grows with the journal: for tests and small journals (use Reader otherwise)."""
    with Reader(layout) as reader:
        records = list(reader.records())
    return records, reader.bad


def last(layout: Layout, n: int) -> tuple[list[dict], int]:
    """The last `n` records, oldest first, read from the end, and the lines that were not."""
    found: list[dict] = []
    with Reader(layout) as reader:
        for rec in reader.backwards():
            if len(found) >= n:
                break
            found.append(rec)
    found.reverse()
    return found, reader.bad


def _lines_forward(fd: int) -> Iterator[bytes]:
    """Whole lines from the start; the last one without its newline is a record still being
    written: not yet."""
    pos, rest = 0, b""
    while True:
        block = os.pread(fd, BLOCK, pos)
        if not block:
            return
        pos += len(block)
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        if len(rest) > MAX_LINE:
            rest = b"{"  # not a line of ours; counted as torn when it ends
        yield from lines


def _lines_backward(fd: int) -> Iterator[bytes]:
    """Whole lines from the end, newest first (the unfinished one at the end is skipped)."""
    end = os.fstat(fd).st_size
    while end > 0:  # back to the last newline: what follows it is still being written
        start = max(0, end - BLOCK)
        cut = os.pread(fd, end - start, start).rfind(b"\n")
        if cut >= 0:
            end = start + cut  # the last line's newline: left out, as in the split below
            break
        end = start
    else:
        return
    pos, carry = end, b""  # carry: the end of a line whose start is in an earlier block
    while pos > 0:
        size = min(BLOCK, pos)
        pos -= size
        lines = (os.pread(fd, size, pos) + carry).split(b"\n")
        carry = lines.pop(0) if pos > 0 else b""
        if len(carry) > MAX_LINE:
            carry = b"{"  # not a line of ours: kept short, and counted as torn when it ends
        yield from reversed(lines)


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
    counts lines that were not whole records (see `_records`), for the reader's error counter.
    """

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self.bad = 0
        self._file: BinaryIO | None = None
        self._partial = b""
        self._mid_line = False
        try:
            self._file = self._open(NAME)
            end = self._file.seek(0, os.SEEK_END)
            if end > 0:
                # Started inside a line: its rest is not a record to count as damaged.
                self._file.seek(end - 1)
                self._mid_line = self._file.read(1) != b"\n"
        except OSError:  # not there yet, or not ours to read: nothing to follow
            pass

    def _open(self, name: str) -> BinaryIO:
        """A journal file, through the checked fd of the directory, never through a symlink
        or into a FIFO (contract/directory.py); OSError when it cannot be."""
        own = directory.open_own_for_reading(self.layout)
        try:
            return os.fdopen(directory.open_file(own, name), "rb")
        finally:
            os.close(own)

    def _names(self) -> list[str]:
        own = directory.open_own_for_reading(self.layout)
        try:
            return rotated_names(os.listdir(own))
        finally:
            os.close(own)

    def _live_inode(self) -> int:
        own = directory.open_own_for_reading(self.layout)
        try:
            return os.stat(NAME, dir_fd=own, follow_symlinks=False).st_ino
        finally:
            os.close(own)

    def read_new(self) -> list[dict]:
        records = []
        while True:
            if self._file is not None:
                records.extend(self._parse(self._file.read()))
                try:
                    if self._live_inode() == os.fstat(self._file.fileno()).st_ino:
                        return records
                except FileNotFoundError:
                    return records
                except OSError:
                    return records  # the directory refused or unreadable now: later, again
                # Rotated: what we had open is a rotated file now. A writer may have appended
                # to it between our read and the rotation: read it to its end. Then whatever
                # was rotated after it (two rotations between our calls), then the new file
                # from its start. A torn line left at the end of one never completes.
                records.extend(self._parse(self._file.read()))
                ino = os.fstat(self._file.fileno()).st_ino
                self._file.close()
                self._file = None
                self._partial = b""
                self._mid_line = False
                records.extend(self._rotated_after(ino))
            try:
                self._file = self._open(NAME)
            except OSError:
                self._file = None
                return records

    def _rotated_after(self, ino: int) -> list[dict]:
        try:
            names = self._names()
        except OSError:
            return []
        records, after = [], False
        for name in names:
            try:
                with self._open(name) as f:
                    if after:
                        for line in _lines_forward(f.fileno()):
                            found, torn = _records(line)
                            records.extend(found)
                            self.bad += torn
                    after = after or os.fstat(f.fileno()).st_ino == ino
            except OSError:
                continue
        return records

    def _parse(self, data: bytes) -> list[dict]:
        data = self._partial + data
        lines = data.split(b"\n")
        self._partial = lines.pop()
        if len(self._partial) > MAX_LINE:
            self._partial = b"{"  # not a line of ours: counted as torn when it ends
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
