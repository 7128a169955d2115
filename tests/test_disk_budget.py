"""The directory stays within the disk budget the README states, under the shipped defaults,
however many events, masters and workers come and go.

Sizes are what the filesystem allocates (`du`), which is what a Kubernetes emptyDir's
sizeLimit counts: prometheus_client's files are 1 MiB sparse files of which only the written
pages take room.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
from pathlib import Path

from monitor.contract import captures, journal
from monitor.contract.directory import Layout
from tests.harness import exits, http_get, value, wait_for

# The budget of gunicorn-monitor/ (README, "Disk budget"): the journal and the captures at
# their bounds, and what each live master and live worker adds.
JOURNAL = journal.MAX_BYTES + journal.KEEP_BYTES
PER_MASTER = 64 * 1024  # counts, histogram, deploy gauge, state: a few pages
PER_WORKER = 8 * 1024  # in-flight table and stacks file: a page each until a capture
FIXED = 64 * 1024  # retired.json, heartbeat/, live/, captures/, locks, rotated slack


def allocated(path: Path) -> int:
    """Bytes the filesystem allocated for everything below `path` (du)."""
    total = 0
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            try:
                total += os.lstat(os.path.join(root, name)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def budget(masters: int, workers: int) -> int:
    return JOURNAL + captures.MAX_BYTES + FIXED + masters * PER_MASTER + workers * PER_WORKER


def _append(root: str, n: int) -> None:
    j = journal.Journal(Layout(root))  # the shipped bounds
    for i in range(n):
        j.append({"event": "exit", "cause": "max_requests", "pid": 100 + i, "pad": "q" * 200})


def test_thousands_of_exits_and_masters_stay_within_the_budget(
    make_master, make_exporter, shared_dir, tmp_path
):
    shared = shared_dir
    e = make_exporter()
    # Masters come and go (a crash loop): each leaves its files, which the sidecar retires.
    for _ in range(5):
        gone = make_master(shared_dir=shared, workers=1, log_path=tmp_path / "g.log").start()
        gone.kill()
    m = make_master(
        shared_dir=shared,
        workers=4,
        args=("--max-requests", "1", "--max-requests-jitter", "0"),
        log_path=tmp_path / "m.log",
    ).start()
    # Three writers (as two masters and mark-deploy) push 30,000 records, four times the
    # journal's bound, while the master recycles a worker after every request.
    ctx = multiprocessing.get_context("fork")
    writers = [ctx.Process(target=_append, args=(str(shared), 10_000)) for _ in range(3)]
    for w in writers:
        w.start()
    served = sum(http_get(m.url + "/", timeout=20)[0] == 200 for _ in range(400))
    for w in writers:
        w.join(120)
        assert w.exitcode == 0
    assert served >= 390
    wait_for(lambda: sum(exits(e.scrape()).values()) >= served, 30, "every exit counted")
    own = shared / "gunicorn-monitor"
    wait_for(
        lambda: e.scrape() and len(list(own.glob("counter_*.db"))) == 1, 30, "gone masters' counts"
    )
    used = allocated(own)
    assert used <= budget(masters=6, workers=4), used  # the 5 gone masters' state files too
    rotated = journal.rotated_names(os.listdir(own))
    assert len(rotated) == 1 and os.path.getsize(own / "events.jsonl") < journal.MAX_BYTES + 4096

    def settled() -> bool:  # spawns minus exits (the crashed masters' orphans' too) = live
        samples = e.scrape()
        return value(samples, "gunicorn_worker_spawns_total") == 4 + sum(exits(samples).values())

    wait_for(settled, 30, "no count lost to the retirement")
    # The app's own files (folding off, the default): prometheus_client's, one per worker
    # that ever lived; each takes a page or so. What a dead worker costs, for the README.
    app = [p for p in shared.glob("counter_*.db")]
    assert len(app) >= served
    per_worker = allocated(shared) - allocated(own)
    assert per_worker / len(app) <= 16 * 1024, per_worker / len(app)


def test_a_master_stopping_leaves_nothing_of_its_workers(make_master, shared_dir):
    m = make_master(workers=3).start()
    live = shared_dir / "gunicorn-monitor" / "live"
    wait_for(lambda: len(os.listdir(live)) == 6, 10, "tables and stacks files")
    m.signal(signal.SIGTERM)
    m.wait_exit()
    assert os.listdir(live) == []
    assert os.listdir(shared_dir / "gunicorn-monitor" / "heartbeat") == []  # removed at its stop
