"""The shared directory's size in the shipped pod follows from its settings, not from how many
workers ever died (deploy/README.md, "The shared directory's size").

The shipped deployments fold app metrics (GUNICORN_MONITOR_FOLD_APP_METRICS=1 in both
containers): the master moves a dead worker's files aside and the sidecar folds them into one
aggregate per file type at its next scrape. Here a real Gunicorn with the app container's
environment from deploy/kubernetes.yaml and a real sidecar with the sidecar's recycle a worker
on every request (max_requests=1), thousands of times, and the directory is measured as the
kubelet measures an emptyDir: the blocks its files hold.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest

from monitor.contract import captures, journal
from tests.harness import http_get, value, wait_for
from tests.test_packaging import SHARED_DIR, manifest, pod_containers

log = logging.getLogger(__name__)
FOLDED = 1000  # deaths while the sidecar is scraped (and so folds) every FOLD_EVERY of them
FOLD_EVERY = 100
UNFOLDED = 500  # deaths with no scrape, no fold
# What deploy/README.md says the emptyDir holds on top of everything else: the files of this
# many dead workers waiting for a fold (the sidecar down, or nothing scraping it).
UNFOLDED_DEATHS = 10_000
MIB = 1024 * 1024


def pod() -> tuple[dict[str, dict[str, str]], int]:
    """Each container's environment, and the shared emptyDir's sizeLimit in bytes."""
    containers = pod_containers()
    envs = {name: {e["name"]: e["value"] for e in c["env"]} for name, c in containers.items()}
    (mount,) = [m for m in containers["app"]["volumeMounts"] if m["mountPath"] == SHARED_DIR]
    volumes = manifest()["Deployment"]["spec"]["template"]["spec"]["volumes"]
    (volume,) = [v for v in volumes if v["name"] == mount["name"]]
    limit = volume["emptyDir"]["sizeLimit"]
    assert limit.endswith("Mi"), limit
    return envs, int(limit[:-2]) * MIB


def usage(path: Path) -> int:
    """Bytes held, as `du` (and the kubelet) counts them: allocated blocks, sparse files too."""
    total = 0
    for top, dirs, files in os.walk(path):
        for name in dirs + files:
            total += os.lstat(os.path.join(top, name)).st_blocks * 512
    return total


def capped(path: Path) -> int:
    """What the monitor's own caps bound: the journal (with its rotated file) and captures."""
    own = path / "gunicorn-monitor"
    journals = [p for p in own.glob("events.jsonl*")]
    return sum(p.stat().st_blocks * 512 for p in journals) + usage(own / captures.DIR)


@pytest.mark.timeout(900)
def test_thousands_of_worker_deaths_fit_the_shipped_emptydir(make_master, make_exporter):
    envs, size_limit = pod()
    shared = {k: v for k, v in envs["app"].items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    m = make_master(workers=4, env={**shared, "GUNICORN_MAX_REQUESTS": "1"}).start()
    sidecar = {k: v for k, v in envs["sidecar"].items() if k != "PROMETHEUS_MULTIPROC_DIR"}
    e = make_exporter(env=sidecar)

    def recycle(n: int) -> None:
        for _ in range(n):
            assert http_get(m.url + "/", 30)[0] == 200

    # Folded: what is left after each scrape stays flat, however many workers died.
    settled = []
    for _ in range(FOLDED // FOLD_EVERY):
        recycle(FOLD_EVERY)
        assert e.get("/metrics")[0] == 200
        settled.append(usage(m.dir) - capped(m.dir))
    assert max(settled) - min(settled) <= 256 * 1024, settled

    # Not folded: each dead worker's files stay until the next fold.
    before = usage(m.dir)
    recycle(UNFOLDED)
    per_death = (usage(m.dir) - before) / UNFOLDED
    assert per_death > 1024  # a dead worker leaves files behind: the fold is what bounds them
    e.get("/metrics")
    assert usage(m.dir) - capped(m.dir) <= max(settled) + 256 * 1024

    exits = wait_for(
        lambda: (
            (s := e.scrape())
            and value(s, "gunicorn_worker_exits_total", cause="max_requests", signal="none")
            >= FOLDED + UNFOLDED
        ),
        30,
        "every recycle counted",
    )
    assert exits

    # The stated worst case fits the shipped sizeLimit: the monitor's own files at their caps,
    # the folded rest as measured, and UNFOLDED_DEATHS dead workers waiting for a fold.
    caps = 2 * journal.MAX_BYTES + captures.MAX_BYTES
    worst = caps + max(settled) + UNFOLDED_DEATHS * per_death
    log.info(
        "folded rest %s bytes; %.0f bytes per unfolded death; worst case %.1f MiB of %.0f MiB",
        settled,
        per_death,
        worst / MIB,
        size_limit / MIB,
    )
    assert worst <= size_limit, (
        f"caps {caps / MIB:.1f} MiB + folded {max(settled) / MIB:.2f} MiB + "
        f"{UNFOLDED_DEATHS} x {per_death:.0f} B = {worst / MIB:.1f} MiB > {size_limit / MIB} MiB"
    )
