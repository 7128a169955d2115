#!/usr/bin/env bash
# The demo: the example app under Gunicorn with the monitor's hooks, and the exporter beside it,
# both on localhost. Ctrl-C stops both.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/bootstrap.sh uvicorn

export PROMETHEUS_MULTIPROC_DIR="${PROMETHEUS_MULTIPROC_DIR:-$ROOT/.demo/multiproc}"
export GUNICORN_BIND="${GUNICORN_BIND:-127.0.0.1:8000}"
export GUNICORN_WORKERS="${GUNICORN_WORKERS:-2}"
export GUNICORN_TIMEOUT="${GUNICORN_TIMEOUT:-5}"
LISTEN="${GUNICORN_MONITOR_LISTEN:-127.0.0.1:9971}"
mkdir -p "$PROMETHEUS_MULTIPROC_DIR"

gunicorn -c gunicorn.conf.py --no-control-socket examples.app:app &
app=$!
gunicorn-monitor serve --dir "$PROMETHEUS_MULTIPROC_DIR" --listen "$LISTEN" &
exporter=$!
trap 'kill -TERM $app $exporter 2>/dev/null; wait $app $exporter 2>/dev/null' EXIT INT TERM

python - "$LISTEN" <<'PY'
import sys, time, urllib.request
for _ in range(100):
    try:
        urllib.request.urlopen(f"http://{sys.argv[1]}/-/ready", timeout=1)
        break
    except OSError:
        time.sleep(0.1)
PY
cat <<MSG

  app:     http://$GUNICORN_BIND/   (try /sleep?s=10 for a timeout, /exit?code=7 for a crash)
  metrics: http://$LISTEN/metrics   <- scrape this
  journal: gunicorn-monitor events --dir $PROMETHEUS_MULTIPROC_DIR

  Try: kill -TERM <worker pid>, kill -HUP $app (a reload), then look at gunicorn_worker_exits_total.
  Ctrl-C stops both.

MSG
wait $app
