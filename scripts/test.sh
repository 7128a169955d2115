#!/usr/bin/env bash
# Runs the whole test suite from a fresh machine: virtualenvs, packages, promtool, lint, pytest.
#
# First everything on the default python3 with the newest declared versions (arguments go to
# this pytest run). Then the cause table, on the two ends of the declared dependency ranges
# (pyproject.toml's `oldest` and `newest` extras): Python 3.10 with the oldest releases and
# Python 3.13 with the newest. GUNICORN_MONITOR_MATRIX=0 skips those two for a quick local run;
# CI always runs them.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/bootstrap.sh test,tools,newest
source scripts/prometheus.sh
source scripts/docker.sh  # the Docker engine and both composes, for tests/test_containers.py
ruff check .
ruff format --check .

# Alert delivery end to end (tests/test_alert_delivery.py) waits out the shipped rules' `for:`
# durations: about 7 minutes, nearly idle (under a tenth of a core). It runs in the background
# beside everything below and is waited for at the end, or on an early exit.
# GUNICORN_MONITOR_DELIVERY=0 skips it for a quick local run; CI always runs it.
delivery_pid=""
delivery_log="$ROOT/.tools/alert-delivery.log"
delivery_done() {
    [ -n "$delivery_pid" ] || return 0
    local status=0
    wait "$delivery_pid" || status=$?
    delivery_pid=""
    echo "== alert delivery through a real Prometheus and Alertmanager (exit $status)"
    cat "$delivery_log"
    return "$status"
}
if [ "${GUNICORN_MONITOR_DELIVERY:-1}" != 0 ]; then
    pytest -p no:cacheprovider -o log_cli=true --log-cli-level=INFO \
        tests/test_alert_delivery.py >"$delivery_log" 2>&1 &
    delivery_pid=$!
    trap 'delivery_done || true' EXIT
fi
pytest --ignore=tests/test_alert_delivery.py "$@"

# The real-Gunicorn cause tests (every cause on every worker class, a real OOM kill, signals
# that land while a worker boots, the worker's own evidence through directory faults and races,
# timeout captures on every class) and the pure cause decision and worker-class table they rest
# on; the exporter's TLS and basic auth, which are what bcrypt and PyYAML are declared for, and
# its HTTP server, which extends uvicorn's own protocol (tests/test_http.py); and the app's
# metrics, read, folded on disk and in memory through prometheus_client's own file format and
# merge, and followed from scrape to scrape by inotify (what inotify-simple is declared for).
MATRIX_TESTS=(
    tests/test_lifecycle.py tests/test_oom.py tests/test_early_signals.py tests/test_causes.py
    tests/test_channel.py tests/test_workerclasses.py tests/test_forensics.py
    tests/test_webconfig.py tests/test_http.py tests/test_compaction.py
)
if [ "${GUNICORN_MONITOR_MATRIX:-1}" != 0 ]; then
    for end in oldest:3.10 newest:3.13; do
        name=${end%:*} version=${end#*:}
        python=$(find_python "$version")
        venv "$ROOT/.venv-$name" "$python" "test,$name"
        echo "== the cause table, web config and app metrics on Python $version, the $name declared versions"
        "$ROOT/.venv-$name/bin/python" -m pytest -p no:cacheprovider "${MATRIX_TESTS[@]}"
    done
fi
delivery_done
