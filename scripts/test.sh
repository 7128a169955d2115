#!/usr/bin/env bash
# Runs the whole test suite from a fresh machine: virtualenv, packages, promtool, lint, pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/bootstrap.sh test
source scripts/prometheus.sh
ruff check .
ruff format --check .
exec pytest "$@"
