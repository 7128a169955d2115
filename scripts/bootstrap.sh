#!/usr/bin/env bash
# Sourced by the demo and test scripts. `venv DIR PYTHON EXTRAS` creates a virtualenv with PYTHON
# on first use and installs the project with EXTRAS into it, again whenever pyproject.toml
# changes. Sourced with EXTRAS as $1, it does that for the main venv (.venv, or
# $GUNICORN_MONITOR_VENV, with $PYTHON or python3) and puts it first on PATH.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

venv() {
    local dir=$1 python=$2 extras=$3
    if [ ! -x "$dir/bin/python" ]; then
        "$python" -m venv "$dir"
    fi
    local stamp
    stamp="$dir/.installed-$(sha1sum "$ROOT/pyproject.toml" | cut -c1-12)-$extras"
    # The newest end is looked up again each day: a release made since is what it is for.
    case ",$extras," in *,newest,*) stamp="$stamp-$(date -u +%F)" ;; esac
    if [ ! -f "$stamp" ]; then
        local upgrade=()
        # The `newest` end: the newest releases available now, not whatever is installed.
        case ",$extras," in *,newest,*) upgrade=(--upgrade --upgrade-strategy eager) ;; esac
        "$dir/bin/pip" install --quiet --disable-pip-version-check "${upgrade[@]}" -e "$ROOT[$extras]"
        touch "$stamp"
    fi
}

# find_python 3.10: a python3.10 that runs, from PATH or else from pyenv's versions (whose shim
# on PATH fails when that version is not pyenv's global one, as on CI's image).
find_python() {
    local version=$1 candidate
    for candidate in "$(command -v "python$version" || true)" \
        "${PYENV_ROOT:-${HOME:-/root}/.pyenv}"/versions/"$version".*/bin/"python$version"; do
        if [ -n "$candidate" ] && "$candidate" -c '' 2>/dev/null; then
            echo "$candidate"
            return 0
        fi
    done
    echo "no Python $version found: install it, or set GUNICORN_MONITOR_MATRIX=0" >&2
    return 1
}

if [ -n "${1:-}" ]; then
    VENV="${GUNICORN_MONITOR_VENV:-$ROOT/.venv}"
    venv "$VENV" "${PYTHON:-python3}" "$1"
    export PATH="$VENV/bin:$PATH"
fi
