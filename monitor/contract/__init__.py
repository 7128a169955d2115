"""The shared directory: the only thing the Gunicorn side and the sidecar have in common.

The hooks (monitor/hooks/) write it; the sidecar (monitor/sidecar/) reads it. This package is
its whole definition: where each file lives (directory.py), the lifecycle counters in
prometheus_client's file format (store.py, metrics.py), the event journal (journal.py), each
master's live state (state.py), the fixed set of causes (causes.py) and how the app's own
prometheus_client files are named and staged (appfiles.py). It imports neither side.
"""
