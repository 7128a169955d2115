#!/usr/bin/env bash
# Sourced by the demo and test scripts: one virtualenv, created and filled on first use.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${GUNICORN_MONITOR_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.installed-$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)-$1"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/pip" install --quiet --disable-pip-version-check -e "$ROOT[$1]"
    touch "$stamp"
fi
export PATH="$VENV/bin:$PATH"
