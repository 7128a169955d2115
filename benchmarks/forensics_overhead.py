"""What "why a worker hung" costs: the monitor's config with and without it, in one run.

The feature puts two hooks on every request (pre_request/post_request write a slot of the
worker's in-flight table), a little work into every fork (post_fork creates the table and arms
faulthandler) and a check of booting workers into every turn of the master's loop. The
baseline is the same gunicorn.conf.py with those taken out; both run the same app and
settings. Runs alternate baseline / full --rounds times and report medians and their ratio.

    python benchmarks/forensics_overhead.py [--requests 1000] [--recycles 200] [--rounds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from benchmarks.hook_overhead import run  # noqa: E402
from tests.harness import CONFIG  # noqa: E402

# Appended to a copy of gunicorn.conf.py: the monitor without the capture hooks and the watch.
WITHOUT = """
import monitor.hooks.capture as _capture
import monitor.hooks.wiring as _wiring

_capture.booting = lambda worker: None
_wiring._start_watch = lambda server, monitor: None
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--recycles", type=int, default=200)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="gm-forensics-"))
    without = tmp / "without.conf.py"
    text = CONFIG.read_text().replace("wire(globals())", WITHOUT + "wire(globals())")
    without.write_text(text + "\ndel pre_request, post_request\n")
    print(f"2 sync workers, median of {args.rounds} rounds")
    print(f"{'workload':<28}{'without ms/req':>16}{'with ms/req':>13}{'ratio':>8}")
    workloads = (
        ("steady requests", False, args.requests),
        ("recycling (max_requests=1)", True, args.recycles),
    )
    for name, recycle, n in workloads:
        base, ours = [], []
        for _ in range(args.rounds):
            base.append(run(without, recycle, n, tmp))
            ours.append(run(None, recycle, n, tmp))
        b, o = statistics.median(base) * 1e3, statistics.median(ours) * 1e3
        print(f"{name:<28}{b:>16.3f}{o:>13.3f}{o / b:>8.3f}")


if __name__ == "__main__":
    main()
