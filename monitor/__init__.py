"""gunicorn-monitor: every Gunicorn worker's birth and death as a trustworthy Prometheus number."""

__version__ = "0.1.0"
