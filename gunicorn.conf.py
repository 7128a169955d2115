"""Drop-in production Gunicorn config with worker lifecycle monitoring.

Every setting below comes from the environment (GUNICORN_TIMEOUT, GUNICORN_WORKERS, ...; see
monitor/hooks/settings.py for the table) and is validated before the master starts. Command-line
flags override it as usual: `gunicorn -c gunicorn.conf.py --timeout 10 app:app`.

Your own hooks: define them anywhere above the `wire(globals())` line. They keep working and
run right after the monitor's hooks of the same name.
"""

import os

from monitor.contract import directory
from monitor.hooks import settings, wire

globals().update(settings.load_or_exit())

# The shared directory: the hooks record into it, the app's own prometheus_client (if any)
# writes its multiprocess files there, and the gunicorn-monitor sidecar serves it all.
os.environ[directory.ENV] = directory.create_or_exit().root

# Your hooks here, e.g.:
# def post_fork(server, worker):
#     ...

wire(globals())
