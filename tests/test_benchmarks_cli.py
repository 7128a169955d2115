"""Every benchmark script starts: its imports resolve and its flags parse (`--help`). The
benchmarks are not run by the suite (they print ratios, not pass or fail), so without this a
script broken by a change elsewhere (a constant it imports moved) is found only when someone
next measures."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.harness import ROOT

SCRIPTS = sorted(
    p
    for p in (ROOT / "benchmarks").glob("*.py")
    if p.name != "__init__.py" and "def main" in p.read_text()
)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_the_benchmark_starts(script):
    out = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage:" in out.stdout
