"""The sidecar serves only the truth: what it cannot read is a gap, never a zero, and what the
directory says is checked before it is served.

Each scenario is what breaks in production: a file the sidecar may not read (permissions after
a restore, a volume mounted with another owner), a state file that lies or is half written,
a journal line a dying writer tore, a directory someone wrote invented values into.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
from prometheus_client.utils import floatToGoString

from monitor.contract import causes, journal, metrics
from monitor.contract.directory import Layout
from tests.harness import (
    BIN,
    NOBODY,
    ROOT,
    check_metrics,
    exits,
    parse,
    value,
    wait_for,
    write_multiprocess_file,
)


def _families(samples: dict, prefix: str) -> set[str]:
    return {name for name, _ in samples if name.startswith(prefix)}


def _labels(samples: dict, label: str) -> set[str]:
    return {dict(labels)[label] for _, labels in samples if label in dict(labels)}


def test_an_unreadable_counter_file_or_directory_is_a_gap_never_a_reset(
    nobody_dir, make_master, make_exporter, tmp_path
):
    m = make_master(
        shared_dir=nobody_dir, workers=2, prefix=NOBODY, log_path=tmp_path / "g.log"
    ).start()
    e = make_exporter(shared_dir=nobody_dir, prefix=NOBODY)
    pid = m.worker_pids()[0]
    os.kill(pid, signal.SIGKILL)
    m.wait_workers(2, exclude={pid})
    wait_for(lambda: value(e.scrape(), "gunicorn_worker_spawns_total") == 3, 10, "3 spawns")
    own = nobody_dir / "gunicorn-monitor"
    counter = m.file("counter")

    def changed(n: int) -> None:
        """Any change to the directory makes the sidecar collect anew (cache.py); a chmod
        alone changes no byte it keeps watching through its open descriptors."""
        (own / "poke").write_text(str(n))

    counter.chmod(0o000)  # the sidecar may no longer read the master's counts
    changed(1)
    kept = e.scrape()
    # Read good before: its last values stand (a drop would be a counter reset), and the
    # failure is counted.
    assert value(kept, "gunicorn_worker_spawns_total") == 3
    assert exits(kept) == {("killed", "SIGKILL"): 1.0}
    assert value(kept, "gunicorn_exporter_errors_total", kind="unreadable") >= 1
    assert value(kept, "gunicorn_up") == 1

    # A sidecar that never read it: the file is skipped, its counts are a gap (no zero, and
    # no known-exit defaults), everything else is served.
    fresh = make_exporter(shared_dir=nobody_dir, prefix=NOBODY)
    gap = fresh.scrape()
    counts = {"gunicorn_worker_spawns_total", "gunicorn_worker_exits_total"}
    assert not counts & {name for name, _ in gap}
    assert value(gap, "gunicorn_exporter_errors_total", kind="unreadable") >= 1
    assert value(gap, "gunicorn_exporter_files_skipped_total") >= 1
    assert value(gap, "gunicorn_up") == 1  # what could be read is still served
    assert value(gap, "gunicorn_workers") == 2
    assert value(gap, "gunicorn_last_deploy_timestamp_seconds") > 0
    assert value(gap, "gunicorn_worker_lifetime_seconds_count", cause="killed") == 1
    fresh.kill()

    counter.chmod(0o600)  # readable again: the counts are back, where they were
    changed(2)
    back = e.scrape()
    assert value(back, "gunicorn_worker_spawns_total") == 3
    assert exits(back) == {("killed", "SIGKILL"): 1.0}

    # Whether the master is up can no longer be read: its state file replaced by one the
    # sidecar may not read (a chmod alone changes nothing the sidecar parsed: the file's
    # content is what it read last, sidecar/masters.py).
    master_state = m.file("master")
    said = master_state.read_bytes()

    def replace_state(mode: int) -> None:
        staged = master_state.with_name("master.tmp")
        staged.write_bytes(said)
        os.chown(staged, 65534, 65534)
        staged.chmod(mode)
        os.replace(staged, master_state)

    replace_state(0o000)
    changed(3)
    unsure = e.scrape()
    assert not _families(unsure, "gunicorn_up") | _families(unsure, "gunicorn_workers")
    assert value(unsure, "gunicorn_worker_spawns_total") == 3  # the counts still can
    replace_state(0o600)
    changed(4)
    assert value(e.scrape(), "gunicorn_up") == 1

    own.chmod(0o000)  # nothing recorded can be read
    try:
        blind = e.scrape()
    finally:
        own.chmod(0o700)
    assert not _families(blind, "gunicorn_worker_spawns") | _families(
        blind, "gunicorn_worker_exits"
    )
    changed(5)
    assert value(e.scrape(), "gunicorn_worker_spawns_total") == 3


def _forge_state(m, **changes) -> None:
    """Rewrite the live master's state file (the master rewrites it only when it changes)."""
    path = m.file("master")
    forged = {**json.loads(path.read_text()), **changes}
    tmp = path.with_suffix(".forged")
    tmp.write_text(json.dumps(forged))
    os.replace(tmp, path)


def test_a_state_file_that_lies_serves_no_stranger_as_a_worker(make_master, make_exporter):
    m = make_master(workers=2).start()
    e = make_exporter()
    wait_for(lambda: value(e.scrape(), "gunicorn_workers") == 2, 10, "2 workers")
    real = m.state()["workers"]
    stranger = subprocess.Popen(["sleep", "60"])  # alive, and no child of the master
    try:
        # pid 1 (init) and the stranger run, but are not the master's children.
        _forge_state(
            m,
            workers={
                **real,
                "1": {"slot": 9, "spawned": time.time()},
                str(stranger.pid): {"slot": 5, "spawned": time.time()},
            },
        )
        samples = e.scrape()
        assert value(samples, "gunicorn_workers") == 2
        assert _labels(samples, "worker") == {"0", "1"}
        assert value(samples, "gunicorn_exporter_errors_total", kind="rejected") >= 2

        # A real worker in slot 9999: past any bound, so left out (and counted).
        first = next(iter(real))
        _forge_state(m, workers={**real, first: {**real[first], "slot": 9999}})
        samples = e.scrape()
        others = {str(w["slot"]) for p, w in real.items() if p != first}
        assert _labels(samples, "worker") == others
        assert value(samples, "gunicorn_workers") == 1
        assert value(samples, "gunicorn_exporter_errors_total", kind="rejected") >= 3
    finally:
        _forge_state(m, workers=real)  # the harness kills the pids it finds in there
        stranger.kill()
        stranger.wait()


def test_a_malformed_state_file_is_skipped_and_counted_and_drops_nothing_else(
    make_master, make_exporter
):
    m = make_master(workers=1).start()
    own = m.dir / "gunicorn-monitor"
    me = psutil.Process()
    # A live process, started when the file says: a reader that trusts it takes it for a live
    # master, and then fails on the worker pid or the desired count that are not numbers.
    forged = {"pid": me.pid, "start_time": me.create_time(), "workers": {"abc": 1}}
    (own / f"master-{me.pid}.json").write_text(json.dumps({**forged, "workers_desired": "many"}))
    (own / "master-12.json").write_text('{"pid": 12, "start_time": "yesterday"}')
    e = make_exporter()
    samples = e.scrape()
    for family in ("gunicorn_worker_exits_total", "gunicorn_worker_spawns_total", "gunicorn_up"):
        assert family in {name for name, _ in samples}, family
    assert value(samples, "gunicorn_worker_spawns_total") == 1
    assert value(samples, "gunicorn_up") == 1
    assert value(samples, "gunicorn_workers") == 1
    assert value(samples, "gunicorn_workers_desired") == 1
    assert value(samples, "gunicorn_exporter_errors_total", kind="malformed") >= 2
    assert value(samples, "gunicorn_exporter_errors_total", kind="collect") == 0
    assert value(samples, "gunicorn_exporter_files_skipped_total") >= 2


def _forged_counts(path: Path) -> None:
    """Another writer's counter and histogram files, in the contract's format, full of values
    outside the contract: 50 invented causes, a signal that does not exist, an unknown hook,
    a family nobody defined, and a lifetime bucket from other buckets."""
    exits_spec, life = metrics.WORKER_EXITS, metrics.WORKER_LIFETIME
    exits_total = exits_spec.name + "_total"
    counters = [
        (exits_spec, exits_total, {"cause": f"invented{i}", "signal": "SIGTERM"}, 1.0)
        for i in range(50)
    ]
    counters += [
        (exits_spec, exits_total, {"cause": "killed", "signal": "SIGNOPE"}, 1.0),
        (metrics.HOOK_ERRORS, metrics.HOOK_ERRORS.name + "_total", {"hook": "'; DROP TABLE"}, 1.0),
        (metrics.WORKER_SPAWNS, metrics.WORKER_SPAWNS.name + "_total", {"extra": "label"}, 1.0),
        (metrics.Spec("made_up_total", "counter", "x"), "made_up_total", {}, 7.0),
        # A real series, well formed: it is served.
        (exits_spec, exits_total, {"cause": "crash", "signal": "none"}, 1.0),
    ]
    write_multiprocess_file(path / "counter_999999.db", counters)
    write_multiprocess_file(
        path / "histogram_999999.db",
        [  # 123.0 is no bucket of ours: the crash series goes
            (life, life.name + "_bucket", {"cause": "crash", "le": le}, 1.0)
            for le in ("+Inf", "123.0")
        ]
        + [(life, life.name + "_sum", {"cause": "crash"}, 0.5)],
    )


def test_values_outside_the_contract_are_rejected_and_counted(make_master, make_exporter):
    m = make_master(workers=2).start()
    own = m.dir / "gunicorn-monitor"
    _forged_counts(own)
    e = make_exporter()
    wait_for(lambda: len(_labels(e.scrape(), "worker")) == 2, 10, "2 slots sampled")
    # The journal says live workers exited 50 times, of causes nobody defined; then once of a
    # real one, which tells when the sampler has read them all.
    pids = m.worker_pids()
    with open(own / "events.jsonl", "a") as f:
        for i, pid in enumerate(pids * 25):
            f.write(json.dumps({"event": "exit", "pid": pid, "cause": f"made_up_{i}"}) + "\n")
        f.write(json.dumps({"event": "exit", "pid": pids[0], "cause": "signal"}) + "\n")
    seen = "gunicorn_worker_exit_memory_bytes_count"
    wait_for(lambda: value(e.scrape(), seen, cause="signal") == 1, 10, "the journal read")
    samples = e.scrape()
    assert value(samples, "gunicorn_exporter_errors_total", kind="rejected") >= 50 + 55
    assert _labels(samples, "cause") <= set(causes.CAUSES)
    assert _labels(samples, "signal") <= metrics.SIGNALS
    assert _labels(samples, "hook") <= metrics.HOOK_NAMES
    assert "made_up_total" not in {name for name, _ in samples}
    assert exits(samples) == {("crash", "none"): 1.0}
    assert value(samples, "gunicorn_worker_spawns_total") == 2
    assert not _families(samples, "gunicorn_worker_lifetime_seconds")
    status, body = e.get("/metrics")
    assert status == 200 and len(body) < 20_000, len(body)


def test_a_torn_journal_line_costs_itself_never_the_next_record(tmp_path):
    layout = Layout(str(tmp_path))
    os.makedirs(layout.own)
    tail = journal.Tail(layout)  # follows from here, as the sampler does
    with open(layout.journal, "ab") as f:
        f.write(b'{"event":"spawn","pid":10}\n')
        f.write(b'{"event":"exit","pid":10,"ca')  # its writer died mid-record
    assert [r["pid"] for r in tail.read_new()] == [10]
    with open(layout.journal, "ab") as f:
        f.write(b'{"event":"exit","pid":11,"cause":"crash"}\n')
        f.write(b'{"event":"spawn","pid":12}\n')
    assert [r["pid"] for r in tail.read_new()] == [11, 12]
    assert tail.bad == 1

    records, bad = journal.read(layout)
    assert [r["pid"] for r in records] == [10, 11, 12] and bad == 1
    result = subprocess.run(
        [str(BIN / "gunicorn-monitor"), "events", "--dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert [json.loads(line)["pid"] for line in result.stdout.splitlines()] == [10, 11, 12]


def test_the_sidecar_writes_nothing_into_the_directory_it_serves(
    make_master, make_exporter, shared_dir
):
    """With PROMETHEUS_MULTIPROC_DIR set in the sidecar's own environment too, as users do."""
    m = make_master(workers=2).start()
    e = make_exporter(prefix=("env", f"PROMETHEUS_MULTIPROC_DIR={shared_dir}"))
    pid = m.worker_pids()[0]
    wait_for(lambda: len(_labels(e.scrape(), "worker")) == 2, 10, "2 slots sampled")
    os.kill(pid, signal.SIGKILL)
    wait_for(
        lambda: value(e.scrape(), "gunicorn_worker_exit_memory_bytes_count", cause="killed") == 1,
        10,
        "the exit's memory",
    )
    status, body = e.get("/metrics")
    text = body.decode()
    assert text.count("# TYPE gunicorn_worker_exit_memory_bytes histogram") == 1
    theirs = re.compile(rf"(?<![0-9]){e.proc.pid}(?![0-9])")
    written = [str(p) for p in shared_dir.rglob("*") if theirs.search(p.name)]
    assert written == []
    check_metrics(body)
    assert parse(text)  # and it still parses


def test_every_hook_name_the_hooks_count_is_in_the_contract():
    """A name outside metrics.HOOK_NAMES would be rejected by the sidecar: add it there."""
    names = set()
    for path in (ROOT / "monitor" / "hooks").glob("*.py"):
        names |= set(re.findall(r"\b(?:guard|contain)\(\s*\"([a-z_]+)\"", path.read_text()))
    assert names and names <= metrics.HOOK_NAMES, names - metrics.HOOK_NAMES


def test_every_label_of_the_contract_has_a_fixed_set_of_values():
    for spec in vars(metrics).values():
        if isinstance(spec, metrics.Spec):
            for label in spec.labels:
                assert label in metrics.LABEL_VALUES, (spec.name, label)
    assert {causes.NO_SIGNAL, "SIGTERM", "SIGKILL", "SIG35"} <= metrics.SIGNALS


def test_lifetimes_an_earlier_version_recorded_fold_into_todays_buckets_exactly(
    shared_dir, make_exporter
):
    """The hooks of an earlier version wrote ten lifetime buckets; their files stay (a dead
    master's counts are part of the totals). Today's bounds are all among theirs, so each old
    bucket lies inside one of ours and the counts are exact."""
    own = shared_dir / "gunicorn-monitor"
    own.mkdir(mode=0o700)
    life = metrics.WORKER_LIFETIME
    old = (1.0, 5.0, 30.0, 60.0, 300.0, 900.0, 3600.0, 14400.0, 86400.0, 604800.0, math.inf)
    ages = {"crash": [0.5, 45.0, 2000.0], "reload": [100000.0, 700000.0]}
    entries = []
    for cause, seen in ages.items():
        entries.append((life, life.name + "_sum", {"cause": cause}, sum(seen)))
        for bound in old:
            n = sum(1 for a in seen if a <= bound and not any(a <= b for b in old if b < bound))
            le = "+Inf" if bound == math.inf else floatToGoString(bound)
            entries.append((life, life.name + "_bucket", {"cause": cause, "le": le}, float(n)))
    write_multiprocess_file(own / "histogram_999997.db", entries)
    samples = make_exporter().scrape()
    buckets = {
        (d["cause"], d["le"]): v
        for (name, labels), v in samples.items()
        if name == life.name + "_bucket" and (d := dict(labels))
    }
    assert buckets == {
        ("crash", "60.0"): 2.0,
        ("crash", "3600.0"): 3.0,
        ("crash", "86400.0"): 3.0,
        ("crash", "+Inf"): 3.0,
        ("reload", "60.0"): 0.0,
        ("reload", "3600.0"): 0.0,
        ("reload", "86400.0"): 0.0,
        ("reload", "+Inf"): 2.0,
    }
    assert value(samples, life.name + "_count", cause="reload") == 2
    assert value(samples, life.name + "_sum", cause="crash") == 2045.5


def test_a_histogram_file_an_earlier_sidecar_left_is_not_served_twice(
    make_master, make_exporter, shared_dir
):
    """Earlier sidecars wrote histogram_<their pid>.db into the app's directory (the
    prometheus_client Histogram of their own process); it stays there after an upgrade."""
    spec = metrics.WORKER_EXIT_MEMORY
    write_multiprocess_file(
        shared_dir / "histogram_999996.db",
        [
            (spec, spec.name + "_sum", {"cause": "unknown"}, 0.0),
            (spec, spec.name + "_bucket", {"cause": "unknown", "le": "+Inf"}, 0.0),
        ],
    )
    m = make_master(workers=1).start()
    e = make_exporter()
    wait_for(lambda: len(_labels(e.scrape(), "worker")) == 1, 10, "the worker sampled")
    os.kill(m.worker_pids()[0], signal.SIGKILL)
    count = spec.name + "_count"
    wait_for(lambda: value(e.scrape(), count, cause="killed") == 1, 10, "the exit's memory")
    status, body = e.get("/metrics")
    samples = parse(body.decode())
    assert body.decode().count(f"# TYPE {spec.name} histogram") == 1
    assert (count, (("cause", "unknown"),)) not in samples  # the stale file's series
    check_metrics(body)
    assert value(samples, "gunicorn_exporter_errors_total", kind="rejected") >= 1


@pytest.mark.parametrize("key", ["[1, 2, 3, 4]", '"abcd"', "7", '["m", "m_total", {"a": 1}, "h"]'])
def test_the_master_adopts_only_files_the_sidecar_reads(tmp_path, key):
    """A reused pid's master adopts its old counter file only if every key is one the
    sidecar's reader accepts: adopting another would be rewritten forever and skipped by every
    scrape."""
    from monitor.contract import store
    from monitor.sidecar.compaction import BadFile, read_entries

    data, _ = store.encode({key: 1.0})
    (tmp_path / "counter_1.db").write_bytes(data)
    with pytest.raises(BadFile):
        read_entries(str(tmp_path / "counter_1.db"))
    with pytest.raises(ValueError):
        store.decode(data)
