"""`gunicorn-monitor`: the sidecar exporter and the small tools around it.

    gunicorn-monitor serve [--dir DIR] [--listen HOST:PORT] [--web.config.file FILE]
                           [--[no-]collector.NAME ...]
    gunicorn-monitor mark-deploy [--dir DIR]
    gunicorn-monitor events [--dir DIR] [--last N] [--stacks]
    gunicorn-monitor status [--dir DIR] [--watch SECONDS] [--json]
    gunicorn-monitor doctor [--dir DIR] [--json] [-- GUNICORN COMMAND LINE]

Every flag has an environment twin (PROMETHEUS_MULTIPROC_DIR, GUNICORN_MONITOR_LISTEN,
GUNICORN_MONITOR_WEB_CONFIG, GUNICORN_MONITOR_LOG_LEVEL, GUNICORN_MONITOR_FOLD_APP_METRICS). A bad
flag, config file or directory is one line on stderr and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry

from monitor.contract import appfiles, directory, journal, metrics
from monitor.contract.store import set_max_locked
from monitor.sidecar import (
    cache,
    doctor,
    readiness,
    retirement,
    server,
    stacks,
    status,
    webconfig,
)
from monitor.sidecar.basicauth import BasicAuth
from monitor.sidecar.collectors import scrape
from monitor.sidecar.collectors.appmetrics import AppMetricsCollector
from monitor.sidecar.collectors.lifecycle import LifecycleCollector
from monitor.sidecar.collectors.scrape import ScrapeCollector
from monitor.sidecar.collectors.workers import WorkerSampler, WorkersCollector
from monitor.sidecar.exporter import Exporter
from monitor.sidecar.liveness import Liveness
from monitor.sidecar.masters import MasterIndex

DEFAULT_LISTEN = "0.0.0.0:9971"
log = logging.getLogger("gunicorn_monitor")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2, no usage dump
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def _fold_switch(text: str) -> bool:
    try:
        return appfiles.parse_switch(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not true or false (the flag, or env {appfiles.FOLD_ENV})"
        ) from None


# Optional collectors, node_exporter style: --collector.NAME / --no-collector.NAME, each with an
# environment twin GUNICORN_MONITOR_COLLECTOR_<NAME> (true/false). All on by default: what they
# cost is in the README's "Series per pod".
COLLECTORS = {
    "smaps": "pss, uss and swap of each worker and the master (smaps_rollup, every 5 minutes)",
    "lifetime": "the worker lifetime histogram, by cause",
    "exit_memory": "the memory-at-exit histogram, by cause",
    "app": "the app's own prometheus_client multiprocess metrics in the shared directory",
}


def _switch(env: str) -> Callable[[str], bool]:
    """The parser of a collector's environment twin (flags themselves take no value)."""

    def parse(text: str) -> bool:
        try:
            return appfiles.parse_boolean(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"env {env}={text!r}: expected true or false"
            ) from None

    return parse


def collectors(args: argparse.Namespace) -> dict[str, bool]:
    """{collector name: on} from parsed `serve` arguments."""
    return {name: getattr(args, f"collector_{name}") for name in COLLECTORS}


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="gunicorn-monitor", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def with_dir(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--dir",
            default=os.environ.get(directory.ENV),
            help=f"shared directory (env {directory.ENV}; default {directory.DEFAULT})",
        )

    serve = sub.add_parser("serve", help="serve /metrics from the shared directory")
    with_dir(serve)
    serve.add_argument(
        "--listen",
        default=os.environ.get("GUNICORN_MONITOR_LISTEN", DEFAULT_LISTEN),
        help=f"HOST:PORT to listen on (env GUNICORN_MONITOR_LISTEN; default {DEFAULT_LISTEN})",
    )
    serve.add_argument(
        "--log-level",
        default=os.environ.get("GUNICORN_MONITOR_LOG_LEVEL", "info"),
        choices=["debug", "info", "warning", "error"],
        help="log level (env GUNICORN_MONITOR_LOG_LEVEL; default info)",
    )
    serve.add_argument(
        "--web.config.file",
        dest="web_config_file",
        default=os.environ.get("GUNICORN_MONITOR_WEB_CONFIG") or None,
        metavar="FILE",
        help="exporter-toolkit web config: TLS and basic auth (env GUNICORN_MONITOR_WEB_CONFIG)",
    )
    serve.add_argument(
        "--app-metrics.fold",
        dest="app_metrics_fold",
        nargs="?",
        const="true",
        default=os.environ.get(appfiles.FOLD_ENV, "false"),
        type=_fold_switch,
        metavar="BOOL",
        help="fold dead workers' app metric files into aggregates: fast scrapes with 10k+ dead "
        "workers, but a stock collector in the app then sees dips; set the same in Gunicorn's "
        f"environment (env {appfiles.FOLD_ENV}; default false)",
    )
    for name, what in COLLECTORS.items():
        env = f"GUNICORN_MONITOR_COLLECTOR_{name.upper()}"
        action = serve.add_argument(
            f"--collector.{name}",
            dest=f"collector_{name}",
            action=argparse.BooleanOptionalAction,
            default=os.environ.get(env, "true"),  # a string default goes through .type
            help=f"{what} (env {env})",
        )
        action.type = _switch(env)  # set after: BooleanOptionalAction(type=) is deprecated

    deploy = sub.add_parser("mark-deploy", help="record a deploy now (for CI/CD pipelines)")
    with_dir(deploy)

    events = sub.add_parser("events", help="print the event journal as JSON lines")
    with_dir(events)
    events.add_argument("--last", type=int, default=0, help="only the last N events")
    events.add_argument(
        "--stacks", action="store_true", help="print the captures of hung workers instead"
    )

    top = sub.add_parser("status", help="masters, worker slots and recent exits, live")
    with_dir(top)
    top.add_argument("--watch", type=float, default=0.0, metavar="SECONDS", help="redraw")
    top.add_argument("--json", action="store_true", help="one JSON object (per redraw)")

    doc = sub.add_parser("doctor", help="check the server a Gunicorn command line starts")
    with_dir(doc)
    doc.add_argument(
        "command_line",
        nargs="*",
        metavar="-- GUNICORN COMMAND LINE",
        help="how Gunicorn is started, after `--`: `-- gunicorn -c CONF -k gevent app:app` "
        "(default: `gunicorn` as run here, with GUNICORN_CMD_ARGS)",
    )
    doc.add_argument(
        "--termination-grace",
        type=float,
        default=None,
        metavar="SECONDS",
        help="the platform's termination grace period (Kubernetes default 30)",
    )
    doc.add_argument(
        "--lb-idle-timeout",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="the load balancer's idle timeout (default 60, as AWS ALB)",
    )
    doc.add_argument("--json", action="store_true", help="the checks as one JSON object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (directory.DirectoryError, webconfig.WebConfigError) as e:
        sys.stderr.write(f"gunicorn-monitor: {e}\n")
        return 2


def build_registry(
    layout: directory.Layout,
    gate: readiness.DirectoryGate,
    fold: bool = False,
    enabled: dict[str, bool] | None = None,
) -> tuple[CollectorRegistry, cache.DirectoryInputs]:
    """flags -> collectors -> registry: every source of facts, behind one single-flight scrape,
    and the inputs of a collection, which say when a kept body or a source's families stand.

    `enabled` switches the optional collectors (COLLECTORS; missing means on).
    """
    on = {name: True for name in COLLECTORS} | (enabled or {})
    index = MasterIndex(layout, background=True)  # the state files, parsed as they change
    sampler = WorkerSampler(layout, smaps=on["smaps"], exit_memory=on["exit_memory"], masters=index)
    sampler.start()
    # Gone masters' files: folded, then removed; its thread reads the backlog of them first.
    retirer = retirement.Retirer(layout, index)
    retirer.start()
    liveness = Liveness(layout)  # one verdict a master a scrape, for the inputs and the collection
    sources = {
        "lifecycle": LifecycleCollector(
            layout, lifetime=on["lifetime"], liveness=liveness, retirer=retirer, index=index
        ),
        "workers": WorkersCollector(sampler),
    }
    app = None
    if on["app"]:
        app = sources["app"] = AppMetricsCollector(layout.root, compact=fold)
        app.start()  # reads the directory now, not at the first scrape
    # Only an app collector that folds can fail to: no series for what cannot happen.
    kinds = tuple(k for k in scrape.KINDS if k != "compaction" or (on["app"] and fold))
    inputs = cache.DirectoryInputs(layout, sampler, gate, app, liveness, retirer, masters=index)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ScrapeCollector(sources, kinds, inputs.take_parts))
    return registry, inputs


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s level=%(levelname)s %(message)s",
    )
    for sig in (signal.SIGTERM, signal.SIGINT):  # while starting: stop at once, cleanly
        signal.signal(sig, _exit_cleanly)
    try:
        server.parse_listen(args.listen)
    except ValueError as e:
        sys.stderr.write(f"gunicorn-monitor: {e}\n")
        return 2
    web_config = webconfig.load(args.web_config_file) if args.web_config_file else None
    context = web_config.ssl_context() if web_config is not None else None
    auth = BasicAuth(web_config.users) if web_config is not None and web_config.users else None
    # Missing is fine (Gunicorn may start later); there but unusable or unsafe is exit 2.
    layout = directory.open_for_reading(args.dir, missing_ok=True)
    try:
        sock = server.bind(args.listen)
    except OSError as e:
        sys.stderr.write(f"gunicorn-monitor: cannot listen on {args.listen}: {e.strerror}\n")
        return 2
    gate = readiness.DirectoryGate(layout)
    gate.problem()  # says at start if the directory is not there yet
    registry, inputs = build_registry(layout, gate, args.app_metrics_fold, collectors(args))
    served = CollectorRegistry(auto_describe=False)
    served.register(readiness.GatedCollector(registry, gate))

    def ready() -> tuple[bool, str]:
        problem = gate.problem()
        if problem is not None:
            return False, problem
        busy = inputs.app.busy if inputs.app is not None else None
        if busy is not None:
            return False, busy
        if not any(m.alive for m in inputs.masters.look().masters):
            return False, "no live Gunicorn master recorded"
        reading = inputs.retirer.reading if inputs.retirer is not None else None
        return (True, f"Ready; {reading}") if reading is not None else (True, "Ready.")

    app = Exporter(cache.RenderedMetrics(served, inputs), ready, served, auth)
    if auth is not None and context is None:
        log.warning("event=basic_auth_without_tls (passwords cross the network in clear)")
    log.info(
        "event=listening address=%s tls=%s basic_auth=%s pid=%d",
        args.listen,
        context is not None,
        auth is not None,
        os.getpid(),
    )
    # uvicorn handles SIGTERM and SIGINT while it serves: it finishes the answers in flight,
    # then raises the signal again under the handler it found, which then has nothing to do.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    try:
        server.serve(sock, server.config(app, context))
    finally:
        app.close()
        sock.close()
    log.info("event=stopped")
    return 0


def _exit_cleanly(*_: object) -> None:
    raise SystemExit(0)


def _mark_deploy(args: argparse.Namespace) -> int:
    layout = directory.create(args.dir)
    now = time.time()
    set_max_locked(layout, "deploy", metrics.LAST_DEPLOY, now)
    journal.Journal(layout).append({"time": now, "event": "mark_deploy", "pid": os.getpid()})
    return 0


def _events(args: argparse.Namespace) -> int:
    layout = directory.open_for_reading(args.dir)
    if args.stacks:
        text, _ = stacks.render(layout, args.last)
        sys.stdout.write(text)
        return 0
    try:
        # --last N reads from the end; all of it streams: memory never grows with the journal.
        if args.last > 0:
            records: Iterable[dict] = journal.last(layout, args.last)[0]
            _write_records(records)
        else:
            with journal.Reader(layout) as reader:
                _write_records(reader.records())
    except BrokenPipeError:  # `events | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as e:
        raise directory.DirectoryError(e.errno, directory.cannot_read(layout.own, e)) from None
    return 0


def _write_records(records: Iterable[dict]) -> None:
    for rec in records:
        sys.stdout.write(json.dumps(rec, sort_keys=True) + "\n")
    sys.stdout.flush()


def _status(args: argparse.Namespace) -> int:
    if args.watch < 0:
        sys.stderr.write("gunicorn-monitor: --watch must be >= 0\n")
        return 2
    return status.run(directory.open_for_reading(args.dir), args.watch, args.json)


def _doctor(args: argparse.Namespace) -> int:
    return doctor.run(
        args.command_line, args.dir, args.termination_grace, args.lb_idle_timeout, args.json
    )


COMMANDS = {
    "serve": _serve,
    "mark-deploy": _mark_deploy,
    "events": _events,
    "status": _status,
    "doctor": _doctor,
}

if __name__ == "__main__":
    sys.exit(main())
