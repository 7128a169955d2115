"""The sidecar: a separate process that serves the shared directory to Prometheus.

It reads what the hooks recorded (through monitor/contract/), samples the workers' memory with
psutil, compacts the app's dead workers' files, retires gone masters' files, and serves it all
over HTTP (exporter.py); the CLI (cli.py) is its entry point. A failure here costs a scrape,
never a request: still, every fault is counted in `gunicorn_exporter_*`, and nothing here is
imported by the Gunicorn side.
"""
