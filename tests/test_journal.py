"""The journal stays bounded on disk, rotates whoever holds what, loses and doubles no line when
writers rotate at once, and is read from either end in memory that does not grow with it."""

from __future__ import annotations

import fcntl
import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time

from monitor.contract import journal
from monitor.contract.directory import create
from tests.harness import BIN, ROOT

CLI = str(BIN / "gunicorn-monitor")


def _write(root: str, writer: int, n: int, max_bytes: int, keep_bytes: int) -> None:
    j = journal.Journal(create(root), max_bytes=max_bytes, keep_bytes=keep_bytes)
    for i in range(n):
        j.append({"writer": writer, "i": i, "pad": "x" * 50})


def _writers(root: str, n: int, max_bytes: int, keep_bytes: int, count: int = 3) -> None:
    """`count` processes appending `n` records each at once, as an old and a new master during
    USR2 and a mark-deploy do."""
    ctx = multiprocessing.get_context("fork")
    procs = [
        ctx.Process(target=_write, args=(root, w, n, max_bytes, keep_bytes)) for w in range(count)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


def _files(layout) -> list[str]:
    return journal.rotated_names(os.listdir(layout.own))


def test_writers_rotating_at_once_lose_and_double_no_line(tmp_path):
    layout = create(str(tmp_path))
    _writers(str(tmp_path), 3000, max_bytes=20_000, keep_bytes=1 << 30)  # nothing trimmed
    records, bad = journal.read(layout)
    assert bad == 0  # every line on disk is a whole record
    assert len(_files(layout)) > 20  # rotated many times, by all three
    for w in range(3):
        # Each writer's records, once each, in the order it wrote them.
        assert [r["i"] for r in records if r["writer"] == w] == list(range(3000))


def test_the_journal_stays_within_its_bound_keeping_the_newest(tmp_path):
    layout = create(str(tmp_path))
    _writers(str(tmp_path), 4000, max_bytes=20_000, keep_bytes=20_000)
    sizes = [os.path.getsize(os.path.join(layout.own, n)) for n in _files(layout)]
    total = sum(sizes) + os.path.getsize(layout.journal)
    assert total < 40_000 + 2 * 3 * 100  # two files' bound, plus a line per writer each
    records, bad = journal.read(layout)
    assert bad == 0 and any(r["i"] == 3999 for r in records)
    for w in range(3):
        # What is kept of each writer is its newest records, without a hole.
        kept = [r["i"] for r in records if r["writer"] == w]
        assert kept == list(range(kept[0], 4000)) if kept else True


def test_rotation_is_not_blocked_by_a_stopped_process_holding_the_journals_lock(tmp_path):
    """An earlier version rotated only under events.jsonl.lock, and skipped rotating while
    anyone held it: a stopped holder let the journal grow without bound."""
    layout = create(str(tmp_path))
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, os, sys, time\n"
            "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n"
            "fcntl.flock(fd, fcntl.LOCK_EX)\n"
            "print('held', flush=True)\n"
            "time.sleep(600)\n",
            layout.journal + ".lock",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline() == "held\n"
        holder.send_signal(signal.SIGSTOP)
        _write(str(tmp_path), 0, 2000, max_bytes=20_000, keep_bytes=20_000)
        with open(layout.journal + ".lock", "rb") as f:  # still held, by the stopped one
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                raise AssertionError("the lock was not held")
            except BlockingIOError:
                pass
        assert os.path.getsize(layout.journal) < 20_000 + 100
        assert len(_files(layout)) == 1
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()


def test_a_tail_follows_the_journal_across_rotations(tmp_path):
    layout = create(str(tmp_path))
    j = journal.Journal(layout, max_bytes=2_000, keep_bytes=1 << 20)
    j.append({"i": -1})  # written before the reader started: not its business
    tail = journal.Tail(layout)
    seen = []
    for i in range(300):
        j.append({"i": i, "pad": "y" * 40})
        if i % 10 == 9:
            seen.extend(r["i"] for r in tail.read_new())
        if i == 150:  # two rotations between two reads: the one in between is read too
            for k in range(3):
                os.rename(layout.journal, journal._rotated_name(layout.journal))
                j.append({"i": f"between-{k}"})
    assert [i for i in seen if isinstance(i, int)] == list(range(300))
    assert [i for i in seen if isinstance(i, str)] == ["between-0", "between-1", "between-2"]


def test_the_end_is_read_first_and_a_torn_line_costs_itself(tmp_path):
    layout = create(str(tmp_path))
    j = journal.Journal(layout, max_bytes=3_000, keep_bytes=1 << 20)
    with open(layout.journal + ".1", "w") as f:  # rotated by an earlier version: the oldest
        f.write('{"i":-2}\n{"i":-1}\n')
    for i in range(200):
        j.append({"i": i, "pad": "z" * 30})
    with open(layout.journal, "ab") as f:
        f.write(b'{"i":200,"pad":"to')  # its writer died mid-record
    j.append({"i": 201})
    with open(layout.journal, "ab") as f:
        f.write(b'{"i":202')  # being written now
    records, bad = journal.read(layout)
    assert [r["i"] for r in records] == [-2, -1, *range(200), 201] and bad == 1
    last, bad = journal.last(layout, 3)
    assert [r["i"] for r in last] == [198, 199, 201] and bad == 1
    every, _ = journal.last(layout, 1000)
    assert every == records


def _cli_rss(*args: str) -> tuple[subprocess.CompletedProcess, int]:
    """Run the CLI in-process of a fresh interpreter; its output and peak RSS in KiB."""
    # VmHWM, this process's own peak (getrusage's maxrss carries the forking parent's).
    code = (
        "import sys\n"
        "from monitor.sidecar.cli import main\n"
        "rc = main(sys.argv[1:])\n"
        "sys.stdout.flush()\n"
        "peak = [l for l in open('/proc/self/status') if l.startswith('VmHWM:')][0].split()[1]\n"
        "sys.stderr.write(f'maxrss={peak}\\n')\n"
        "sys.exit(rc)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    rss = int(result.stderr.rsplit("maxrss=", 1)[1])
    return result, rss


def test_events_and_status_read_a_huge_journal_in_small_memory(tmp_path):
    """64 MB of journal (an earlier version's, which could not rotate): `events --last`,
    `status` and `events` itself read it without holding it."""
    layout = create(str(tmp_path))
    line = json.dumps({"event": "spawn", "pid": 12, "time": 1.0, "pad": "p" * 180}) + "\n"
    with open(layout.journal, "w") as f:
        f.write(line * (64 * 1024 * 1024 // len(line)))
        exit_record = {"event": "exit", "cause": "crash", "time": time.time() - 10, "i": 1}
        f.write(json.dumps(exit_record) + "\n")
    result, rss = _cli_rss("events", "--dir", str(tmp_path), "--last", "2")
    assert result.returncode == 0, result.stderr
    assert [json.loads(x).get("i") for x in result.stdout.splitlines()] == [None, 1]
    assert rss < 48 * 1024, rss  # the journal was read whole before: about 8 times its size
    result, rss = _cli_rss("status", "--json", "--dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["exits_last_hour"] == {"crash": 1} and rss < 48 * 1024, rss
    with subprocess.Popen(
        [CLI, "events", "--dir", str(tmp_path)], stdout=subprocess.PIPE
    ) as streaming:
        assert streaming.stdout.readline().startswith(b'{"event": "spawn"')
        streaming.kill()


def test_a_writer_that_renames_the_file_begun_after_another_rotation_names_it_after(
    tmp_path, monkeypatch
):
    """The race of two rotations, made to happen: between this writer's check and its rename,
    another writer rotates the live file and a third appends to a new one. Ours then renames
    that new file: it must sort after the other rotation's file."""
    layout = create(str(tmp_path))
    ours = journal.Journal(layout, max_bytes=2_000, keep_bytes=1 << 20)
    other = journal.Journal(layout, max_bytes=1 << 30)
    for i in range(30):
        other.append({"i": i, "pad": "w" * 60})  # just under the bound
    real_rename, raced = os.rename, []

    def rename(src, dst, **kwargs):
        if not raced and src == journal.NAME:
            raced.append(dst)
            real_rename(src, journal._rotated_name(src), **kwargs)  # the other writer's
            other.append({"i": "begun after"})
        return real_rename(src, dst, **kwargs)

    monkeypatch.setattr(journal.os, "rename", rename)
    ours.append({"i": "ours", "pad": "w" * 60})  # crosses the bound: rotates
    monkeypatch.setattr(journal.os, "rename", real_rename)
    other.append({"i": "live"})
    assert raced and not os.path.exists(os.path.join(layout.own, raced[0]))  # named again
    records, bad = journal.read(layout)
    assert [r["i"] for r in records] == [*range(30), "ours", "begun after", "live"]
    assert bad == 0 and len(_files(layout)) == 2
