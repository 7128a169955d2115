"""Everything that runs inside Gunicorn: the master's recorder and what workers tell it.

Code in this package runs in the Gunicorn master or in its workers, next to the user's
production traffic, so it keeps rules the sidecar does not need:

- It never raises into Gunicorn. Every entry point runs under `contain.guard`: a failure is
  logged once through Gunicorn's logger and counted, and the hook returns as if nothing happened
  (an exception out of child_exit kills the master).
- It never blocks. No locks shared with other processes on the serving path, no network, no
  waiting on the sidecar; a dead or hung sidecar changes nothing here.
- Its I/O is bounded: small writes to the shared directory, a fixed number per event, and
  files of bounded size.
- It writes only through the contract (monitor/contract/), and imports nothing from the
  sidecar (monitor/sidecar/): a test walks the imports.

Use it from a Gunicorn config file as its last line: `from monitor.hooks import wire;
wire(globals())`.
"""

from monitor.hooks.wiring import HOOKS, wire

__all__ = ["HOOKS", "wire"]
