#!/usr/bin/env bash
# Sourced: puts Debian's prometheus and promtool on PATH, extracted from the package without
# installing it, so no service starts and nothing outside .tools/ changes.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
if [ ! -x "$TOOLS/root/usr/bin/promtool" ]; then
    mkdir -p "$TOOLS"
    (
        cd "$TOOLS"
        if ! apt-get download prometheus >/dev/null 2>&1; then
            apt-get update -qq >/dev/null
            apt-get download prometheus >/dev/null
        fi
        for deb in prometheus_*.deb; do dpkg -x "$deb" root; done
        rm -f prometheus_*.deb
    )
fi
export PATH="$TOOLS/root/usr/bin:$PATH"
