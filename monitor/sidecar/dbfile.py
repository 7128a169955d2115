"""One prometheus_client multiprocess file: its used bytes, read, and its entries, checked.

The library's reader (mmap_dict._read_all_values) has no error isolation and trusts the header:
a negative `used` reads as an empty file and a negative entry length can walk backwards. So the
header is checked here and the entries are walked with the library's own layout and bounds
(mmap_dict.py: a 4-byte `used`, 4 bytes of padding, then entries of a 4-byte key length, the
key padded to 8 bytes, a value and a timestamp as doubles); any entry that would not read the
same way is the whole file's error. Written out rather than driving the library's generator
because a dead worker's file is read once and its keys are parsed once per distinct key (as the
stock collector's own key cache does), which makes reading a directory several times faster
than the stock collector's scrape of it: the first scrape after a start pays that.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from typing import NamedTuple

from monitor.contract.appfiles import AGGREGATE_ID, MAX, MIN, RECENT, SUM
from monitor.contract.store import parse_key

_unpack_int = struct.Struct("i").unpack_from
_unpack_two_doubles = struct.Struct("dd").unpack_from
_FILE = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
MAX_KEYS = 1 << 16  # parsed keys kept; past it the cache starts over


class BadFile(Exception):
    """A file that can't be read as a multiprocess file; `kind` is the error-counter label."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


class Entry(NamedTuple):
    key: str
    metric_name: str
    name: str
    labels: tuple[tuple[str, str], ...]  # sorted, as the stock collector keys them
    help: str
    value: float
    timestamp: float


Raw = tuple[str, float, float]  # key, value, timestamp


def used_bytes(fd: int) -> bytes:
    """The file's used bytes (what its header counts, never more than it holds), by pread:
    what prometheus_client's reader reads, first a page then the rest. OSError passes."""
    data = os.pread(fd, mmap.PAGESIZE, 0)
    used = _unpack_int(data)[0] if len(data) >= 4 else 0
    if used > len(data):
        data += os.pread(fd, used - len(data), len(data))
    return data[: max(used, 8)]  # the header, and what it counts: the rest is not yet written


def read_at(dir_fd: int | None, name: str, inode: bool = True) -> tuple[bytes, int]:
    """A file's bytes (as `used_bytes`) and inode (0 unless asked), opened under `dir_fd`
    without following a symlink or blocking on a FIFO. FileNotFoundError passes; other OSErrors
    are BadFile("io")."""
    try:
        fd = os.open(name, _FILE, dir_fd=dir_fd)
    except FileNotFoundError:
        raise
    except OSError as e:
        raise BadFile("io", f"{name}: {e.strerror}") from e
    try:
        data = os.read(fd, mmap.PAGESIZE)
        used = _unpack_int(data)[0] if len(data) >= 4 else 0
        if used > len(data):
            data += os.read(fd, used - len(data))
        return data[: max(used, 8)], os.fstat(fd).st_ino if inode else 0
    except OSError as e:
        raise BadFile("io", f"{name}: {e.strerror}") from e
    finally:
        os.close(fd)


def raw_entries(data: bytes) -> list[Raw]:
    """Every (key, value, timestamp) of a file's bytes, as the library reads them, or BadFile."""
    if len(data) < 8:
        raise BadFile("empty" if not data else "truncated", "no header")
    used = _unpack_int(data, 0)[0]
    if used == 0:
        return []  # created, header not yet written: empty, as stock reads it
    if used < 8:
        raise BadFile("corrupt", f"header says {used} bytes used")
    if used > len(data):
        raise BadFile("truncated", f"{len(data)} of {used} bytes")
    layout = _layouts.get(used)
    if layout is not None:
        fields = layout.struct.unpack_from(data)
        if fields[1::4] == layout.encoded and fields[0::4] == layout.lengths:
            return list(zip(layout.keys, fields[2::4], fields[3::4], strict=True))
    out = []
    shape: list[tuple[int, bytes]] = []
    pos, last = 8, 0
    try:
        while pos < used:
            n = _unpack_int(data, pos)[0]
            if n + pos > used:
                raise BadFile("corrupt", "read beyond file size")
            pos += 4
            key = data[pos : pos + n]
            pos += n + (8 - (n + 4) % 8)
            if pos <= last:
                raise BadFile("corrupt", "entry offsets do not advance")
            last = pos
            value, timestamp = _unpack_two_doubles(data, pos)
            text = key.decode("utf-8")
            if text not in _keys:
                parsed(text)
            elif isinstance(_keys[text], BadFile):
                raise _keys[text]
            out.append((text, value, timestamp))
            shape.append((n, key))
            pos += 16
    except struct.error as e:
        raise BadFile("corrupt", str(e)) from e
    except UnicodeDecodeError as e:
        raise BadFile("encoding", str(e)) from e
    if layout is None and pos == used:
        _remember(used, shape, [key for key, _, _ in out])
    return out


class _Layout(NamedTuple):
    """The entries of a file of this many used bytes, as last parsed: a file of the same size
    whose lengths and keys read the same (one unpack) has the same entries at the same places,
    so only its values are new. Workers of one app write the same keys in the same order."""

    struct: struct.Struct
    lengths: tuple[int, ...]
    encoded: tuple[bytes, ...]
    keys: tuple[str, ...]


_layouts: dict[int, _Layout] = {}
MAX_LAYOUTS = 256


def _remember(used: int, shape: list[tuple[int, bytes]], keys: list[str]) -> None:
    if len(_layouts) >= MAX_LAYOUTS:
        _layouts.clear()
    fmt = "=8x" + "".join(f"i{n}s{(8 - (n + 4) % 8)}xdd" for n, _ in shape)
    lengths = tuple(n for n, _ in shape)
    _layouts[used] = _Layout(struct.Struct(fmt), lengths, tuple(k for _, k in shape), tuple(keys))


_keys: dict[str, tuple[str, str, tuple[tuple[str, str], ...], str] | BadFile] = {}


def parsed(key: str) -> tuple[str, str, tuple[tuple[str, str], ...], str]:
    """parse_key, once per distinct key; BadFile("key") for a key it refuses."""
    found = _keys.get(key)
    if found is None:
        if len(_keys) >= MAX_KEYS:
            _keys.clear()
        try:
            found = parse_key(key)
        except (ValueError, TypeError) as e:  # JSONDecodeError is a ValueError
            found = BadFile("key", str(e))
        _keys[key] = found
    if isinstance(found, BadFile):
        raise found
    return found


def entries(raw: list[Raw]) -> list[Entry]:
    """Entries from checked raw ones (their keys parse)."""
    return [Entry(key, *parsed(key), value, ts) for key, value, ts in raw]


# Files folded into one: key -> [value, timestamp], each key reduced as its file type says.
Acc = dict[str, list[float]]


def fold(acc: Acc, how: str, ident: str, raw: list[Raw]) -> None:
    """Reduce one file's entries into `acc` (appfiles.FOLD says `how`; `ident` is the file's
    process identifier, which PER_PID keeps as a `pid` label, as the stock collector shows it).
    One loop a reduction: the fold of a directory runs this for every entry it ever read."""
    get = acc.get
    if how == SUM:
        for key, value, timestamp in raw:
            cur = get(key)
            if cur is None:
                acc[key] = [value, timestamp]
            else:
                cur[0] += value
    elif how == MIN or how == MAX:
        better = min if how == MIN else max
        for key, value, timestamp in raw:
            cur = get(key)
            if cur is None:
                acc[key] = [value, timestamp]
            else:
                cur[0] = better(cur[0], value)
    elif how == RECENT:
        for key, value, timestamp in raw:
            cur = get(key)
            # Ties keep the first, as the stock collector does.
            if cur is None or timestamp > cur[1]:
                acc[key] = [value, timestamp]
    else:  # PER_PID: a later death of a reused pid replaces the earlier one
        for key, value, timestamp in raw:
            if ident != AGGREGATE_ID:
                metric_name, name, labels, help_text = parsed(key)
                labelled = {**dict(labels), "pid": ident}
                key = json.dumps([metric_name, name, labelled, help_text], sort_keys=True)
            acc[key] = [value, timestamp]


def merge(into: Acc, how: str, acc: Acc) -> None:
    """Reduce a fold into another, as `fold` would have reduced the files behind it."""
    fold(into, how, AGGREGATE_ID, [(k, v, ts) for k, (v, ts) in acc.items()])
