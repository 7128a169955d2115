"""The shipped pod's probes, run as the kubelet runs them, against a real Gunicorn in a timeout
storm: every worker stuck in a request, Gunicorn not yet aborting any (its timeout is 60 s).

The app's liveness probe asks the master's listening socket, which the kernel answers from the
backlog, so the kubelet never restarts the container and its evidence with it; its readiness
(the app's own judgement, nothing of the monitor's) takes it out of the Service meanwhile.
"""

from __future__ import annotations

import socket
import threading

from tests.harness import http_get, wait_for
from tests.test_packaging import pod_containers


def probe(spec: dict, container: dict, ports: dict[int, int]) -> bool:
    """One try of a Kubernetes httpGet or tcpSocket probe; `ports` maps the container's ports to
    where they listen here."""
    timeout = spec.get("timeoutSeconds", 1)
    action = spec.get("httpGet") or spec["tcpSocket"]
    port = action["port"]
    if isinstance(port, str):
        port = next(p["containerPort"] for p in container["ports"] if p["name"] == port)
    if "httpGet" in spec:
        status, _ = http_get(f"http://127.0.0.1:{ports[port]}{action['path']}", timeout)
        return 200 <= status < 400
    try:
        socket.create_connection(("127.0.0.1", ports[port]), timeout).close()
        return True
    except OSError:
        return False


def test_the_apps_liveness_survives_a_timeout_storm(make_master):
    app = pod_containers()["app"]
    workers = 4
    m = make_master(workers=workers, env={"GUNICORN_TIMEOUT": "60"}).start()
    ports = {app["ports"][0]["containerPort"]: m.port}
    liveness, readiness = app["livenessProbe"], app["readinessProbe"]
    assert probe(liveness, app, ports) and probe(readiness, app, ports)

    stuck = [
        threading.Thread(target=http_get, args=(m.url + "/sleep?s=10", 30)) for _ in range(workers)
    ]
    for t in stuck:
        t.start()
    try:
        wait_for(lambda: http_get(m.url + "/", 1)[0] == 0, 10, "every worker stuck")
        # As many tries as the kubelet makes before it restarts a container: all succeed.
        for _ in range(liveness.get("failureThreshold", 3)):
            assert probe(liveness, app, ports)
        assert not probe(readiness, app, ports)  # the app's own: out of the Service meanwhile
    finally:
        for t in stuck:
            t.join(30)
