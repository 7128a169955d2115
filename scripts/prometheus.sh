#!/usr/bin/env bash
# Sourced: puts Debian's prometheus, promtool and prometheus-alertmanager on PATH, extracted from
# their packages without installing them, so no service starts and nothing outside .tools/
# changes but two files: Debian's build of Alertmanager reads its notification templates from a
# path compiled into it, /usr/share/prometheus/alertmanager/{default,email}.tmpl (it exits at
# start-up without them), so the package's copies are put there when they are missing.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
for package in prometheus:promtool prometheus-alertmanager:prometheus-alertmanager; do
    name=${package%%:*} binary=${package#*:}
    if [ ! -x "$TOOLS/root/usr/bin/$binary" ]; then
        mkdir -p "$TOOLS"
        (
            cd "$TOOLS"
            if ! apt-get download "$name" >/dev/null 2>&1; then
                apt-get update -qq >/dev/null
                apt-get download "$name" >/dev/null
            fi
            for deb in "${name}"_*.deb; do dpkg -x "$deb" root; done
            rm -f "${name}"_*.deb
        )
    fi
done
AM_TEMPLATES=/usr/share/prometheus/alertmanager
for template in "$TOOLS/root$AM_TEMPLATES"/*.tmpl; do
    if [ ! -f "$AM_TEMPLATES/${template##*/}" ]; then
        if ! { mkdir -p "$AM_TEMPLATES" 2>/dev/null && cp "$template" "$AM_TEMPLATES/" 2>/dev/null; }; then
            echo "scripts/prometheus.sh: cannot write $AM_TEMPLATES/${template##*/} (needs root): Alertmanager will not start" >&2
        fi
    fi
done
export PATH="$TOOLS/root/usr/bin:$PATH"
