"""The journal stays bounded on disk, and a reader follows it across a rotation."""

from __future__ import annotations

import multiprocessing
import os

from monitor.contract import journal
from monitor.contract.directory import create


def _write(root: str, writer: int, n: int, max_bytes: int) -> None:
    j = journal.Journal(create(root), max_bytes=max_bytes)
    for i in range(n):
        j.append({"writer": writer, "i": i, "pad": "x" * 50})


def test_two_writers_rotate_without_tearing_a_line(tmp_path):
    layout = create(str(tmp_path))
    max_bytes = 20_000
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_write, args=(str(tmp_path), w, 2000, max_bytes)) for w in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    records, bad = journal.read(layout)
    assert bad == 0  # every line on disk is a whole record
    sizes = [os.path.getsize(p) for p in (layout.journal, layout.journal + ".1")]
    assert max(sizes) < max_bytes + 1000  # one record of slack per file
    assert any(r["i"] == 1999 for r in records)  # the newest records are kept
    for w in (1, 2):
        kept = sorted(r["i"] for r in records if r["writer"] == w)
        # What is kept of each writer is its newest records, without a hole.
        assert kept == list(range(kept[0], 2000)) if kept else True


def test_a_tail_follows_the_journal_across_a_rotation(tmp_path):
    layout = create(str(tmp_path))
    j = journal.Journal(layout, max_bytes=2_000)
    j.append({"i": -1})  # written before the reader started: not its business
    tail = journal.Tail(layout)
    seen = []
    for i in range(100):
        j.append({"i": i, "pad": "y" * 40})
        if i % 10 == 9:
            seen.extend(r["i"] for r in tail.read_new())
    assert seen == list(range(100))
    assert os.path.exists(layout.journal + ".1")
