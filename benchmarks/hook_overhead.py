"""What the hooks cost Gunicorn: the same app with and without them, in one run.

Two workloads, each against a plain Gunicorn config (the baseline) and the project's
gunicorn.conf.py (hooks wired), both with the same settings:

- steady requests: no hook runs per request, so this should not move at all;
- recycling: `max_requests=1`, so every request is also a worker exit and a spawn, the path
  where every hook runs. The worst case by far.

Runs alternate baseline / monitored --rounds times and report medians and their ratio.

    python benchmarks/hook_overhead.py [--requests 300] [--rounds 3] [--worker sync]

`--worker` takes the test suite's worker-class names (tests/harness.py): `uvicorn` measures
the ASGI app wrapper that gives each request its in-flight slot there.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from tests.harness import Master, http_get, wait_for  # noqa: E402

PLAIN = """
import os
bind = os.environ["GUNICORN_BIND"]
workers = int(os.environ["GUNICORN_WORKERS"])
worker_class = os.environ["GUNICORN_WORKER_CLASS"]
max_requests = int(os.environ.get("GUNICORN_MAX_REQUESTS", "0"))
"""


def run(
    config: Path | None, recycle: bool, requests: int, tmp: Path, worker: str = "sync"
) -> float:
    """Seconds per request under `config` (None: the project's gunicorn.conf.py)."""
    shared = Path(tempfile.mkdtemp(dir=tmp)) / "multiproc"
    shared.mkdir()
    env = {"GUNICORN_MAX_REQUESTS": "1" if recycle else "0"}
    master = Master(shared, worker=worker, workers=2, env=env)
    if config is not None:
        master.cmd[master.cmd.index("-c") + 1] = str(config)
    return timed(master, requests)


def timed(master: Master, requests: int) -> float:
    """Seconds per request, sequential, once both workers answer; the master is killed after."""
    master.start(wait=False)
    try:
        # A plain config records no state: wait until both workers answer.
        wait_for(lambda: http_get(master.url + "/", 2)[0] == 200, 20, "the app answers")
        time.sleep(1)  # both workers booted: the only sleep, before anything is timed
        start = time.perf_counter()
        for _ in range(requests):
            assert http_get(master.url + "/")[0] == 200
        return (time.perf_counter() - start) / requests
    finally:
        master.kill()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--worker", default="sync")
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gm-hooks-"))
    plain = tmp / "plain.conf.py"
    plain.write_text(PLAIN)
    print(
        f"{args.requests} sequential requests, 2 {args.worker} workers, "
        f"median of {args.rounds} rounds"
    )
    print(f"{'workload':<28}{'baseline ms/req':>17}{'with hooks ms/req':>19}{'ratio':>8}")
    workloads = [("steady requests", False), ("recycling (max_requests=1)", True)]
    if args.worker.startswith("uvicorn"):
        # A UvicornWorker may drop a connection that reaches it as it stops at its own limit.
        workloads = workloads[:1]
    for name, recycle in workloads:
        base, ours = [], []
        for _ in range(args.rounds):
            base.append(run(plain, recycle, args.requests, tmp, args.worker))
            ours.append(run(None, recycle, args.requests, tmp, args.worker))
        b, o = statistics.median(base) * 1e3, statistics.median(ours) * 1e3
        print(f"{name:<28}{b:>17.3f}{o:>19.3f}{o / b:>8.2f}")


if __name__ == "__main__":
    main()
