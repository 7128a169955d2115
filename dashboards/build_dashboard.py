"""Builds the Grafana dashboard for gunicorn-monitor: `dashboards/gunicorn.json`.

The dashboard is code, written with the typed builders of the pinned grafana-foundation-sdk
(Grafana 11.6 schema); the JSON next to this file is its committed output.

    python dashboards/build_dashboard.py           # regenerate dashboards/gunicorn.json
    python dashboards/build_dashboard.py --check   # exit 1 if the committed JSON is stale

`dashboard_queries()` returns every PromQL expression of the dashboard with Grafana's variables
substituted, ready for `promtool check rules` or for a live Prometheus.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from grafana_foundation_sdk.builders import bargauge, common, dashboard, heatmap, stat, timeseries
from grafana_foundation_sdk.builders.prometheus import Dataquery
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models import common as cm
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import heatmap as hm
from grafana_foundation_sdk.models.prometheus import PromQueryFormat

from monitor.contract import causes

OUTPUT = Path(__file__).resolve().parent / "gunicorn.json"
UID = "gunicorn-monitor"
GRAFANA_VERSION = "11.6.0"

# Every query goes through the dashboard's datasource variable; the import-time input below only
# chooses that variable's default, so the JSON never holds a real datasource UID.
DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
DS_INPUT = "DS_PROMETHEUS"

# The filter every expression carries, so the job/instance pickers scope every panel.
SEL = 'job=~"$job",instance=~"$instance"'
# The window of every per-interval rate and increase: at least four scrapes, whatever the zoom.
RATE = "[$__rate_interval]"

# What Grafana's variables become when an expression is checked outside Grafana.
SUBSTITUTIONS = {
    "$__rate_interval": "5m",
    "$__interval": "5m",
    "$__range": "5m",
    "$job": ".*",
    "$instance": ".*",
}


def _label_variable(name: str, query: str, refresh: dm.VariableRefresh) -> dashboard.QueryVariable:
    """A multi-value `job`/`instance` picker over gunicorn_up, `All` meaning any value."""
    return (
        dashboard.QueryVariable(name)
        .label(name.capitalize())
        .datasource(DS)
        .query(query)
        .refresh(refresh)
        .sort(dm.VariableSort.ALPHABETICAL_ASC)
        .multi(True)
        .include_all(True)
        .all_value(".*")
    )


def sel(metric: str, extra: str = "") -> str:
    """`metric{job=~"$job",instance=~"$instance"[,extra]}`."""
    return f"{metric}{{{SEL}{',' + extra if extra else ''}}}"


def q(expr: str, legend: str = "__auto", ref: str = "A") -> Dataquery:
    """A range query (a graph over time)."""
    return Dataquery().datasource(DS).expr(expr).legend_format(legend).ref_id(ref).range()


def q_instant(expr: str, legend: str = "__auto", ref: str = "A") -> Dataquery:
    """An instant query (one value per series, at the end of the time range)."""
    return Dataquery().datasource(DS).expr(expr).legend_format(legend).ref_id(ref).instant()


def q_heatmap(expr: str, instant: bool = False) -> Dataquery:
    """Histogram buckets, which Grafana turns from cumulative `le` series into per-bucket counts."""
    query = Dataquery().datasource(DS).expr(expr).legend_format("{{le}}").ref_id("A")
    query = query.format(PromQueryFormat.HEATMAP)
    return query.instant() if instant else query.range()


def table_legend() -> common.VizLegendOptions:
    return (
        common.VizLegendOptions()
        .display_mode(cm.LegendDisplayMode.TABLE)
        .placement(cm.LegendPlacement.RIGHT)
        .show_legend(True)
        .calcs(["max", "lastNotNull"])
    )


def graph(title: str, unit: str, *targets: Dataquery, w: int = 12, h: int = 8) -> timeseries.Panel:
    panel = (
        timeseries.Panel()
        .title(title)
        .datasource(DS)
        .unit(unit)
        .span(w)
        .height(h)
        .fill_opacity(10)
        .tooltip(
            common.VizTooltipOptions()
            .mode(cm.TooltipDisplayMode.MULTI)
            .sort(cm.SortOrder.DESCENDING)
        )
    )
    for target in targets:
        panel = panel.with_target(target)
    return panel


def stacked_bars(title: str, *targets: Dataquery, w: int = 12) -> timeseries.Panel:
    """Event counts per interval, stacked, so the height is the total and colours the split."""
    return (
        graph(title, "short", *targets, w=w)
        .draw_style(cm.GraphDrawStyle.BARS)
        .fill_opacity(80)
        .line_width(1)
        .stacking(common.StackingConfig().mode(cm.StackingMode.NORMAL))
        .min(0)
        .legend(table_legend())
    )


def single_stat(title: str, unit: str, target: Dataquery, w: int = 6) -> stat.Panel:
    return (
        stat.Panel()
        .title(title)
        .datasource(DS)
        .unit(unit)
        .span(w)
        .height(4)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .with_target(target)
    )


def bars(title: str, unit: str, target: Dataquery, w: int = 6) -> bargauge.Panel:
    """Horizontal bars, one per series, for values over the whole time range."""
    return (
        bargauge.Panel()
        .title(title)
        .datasource(DS)
        .span(w)
        .height(8)
        .orientation(cm.VizOrientation.HORIZONTAL)
        .display_mode(cm.BarGaugeDisplayMode.BASIC)
        .reduce_options(common.ReduceDataOptions().calcs(["lastNotNull"]).values(False))
        .unit(unit)
        .min(0)
        .with_target(target)
    )


def distribution(title: str, expr: str) -> bargauge.Panel:
    """Per-bucket counts over the whole time range: exits are rare, so a range shows them best."""
    return bars(title, "short", q_heatmap(expr, instant=True)).description(
        "Exits per bucket over the selected time range; each bar is labelled by its upper bound."
    )


def lifetime_heatmap(title: str, unit: str, expr: str, w: int = 12) -> heatmap.Panel:
    return (
        heatmap.Panel()
        .title(title)
        .datasource(DS)
        .span(w)
        .height(8)
        .calculate(False)
        .y_axis(heatmap.YAxisConfig().unit(unit))
        .color(
            heatmap.HeatmapColorOptions()
            .mode(hm.HeatmapColorMode.SCHEME)
            .scheme("Oranges")
            .fill("dark-orange")
            .scale(hm.HeatmapColorScale.EXPONENTIAL)
            .exponent(0.5)
            .steps(64)
        )
        .cell_gap(1)
        .show_legend()
        .with_target(q_heatmap(expr))
    )


def up_stat() -> stat.Panel:
    return (
        single_stat(
            "Masters up",
            "none",
            q_instant(f"min by (instance) ({sel('gunicorn_up')})", "{{instance}}"),
            w=4,
        )
        .description("0 when no master is alive, or when the live one is stopped or wedged.")
        .mappings(
            [
                dm.ValueMap(
                    options={
                        "0": dm.ValueMappingResult(text="DOWN", color="red", index=0),
                        "1": dm.ValueMappingResult(text="UP", color="green", index=1),
                    }
                )
            ]
        )
        .thresholds(
            dashboard.ThresholdsConfig()
            .mode(dm.ThresholdsMode.ABSOLUTE)
            .steps([dm.Threshold(value=None, color="red"), dm.Threshold(value=1, color="green")])
        )
        .color_mode(cm.BigValueColorMode.BACKGROUND)
    )


def exits_in(window: str, extra: str = "") -> str:
    """Worker exits in `window`, as the alerts count them (rules.yml, increase15m): a series
    first seen inside the window counts whole, since increase() never sees a series born at 1
    (the first exit of a kind the sidecar does not pre-create) move. First seen: fewer samples
    in the window than the instance's exit series with the most."""
    exits = sel("gunicorn_worker_exits_total", extra)
    every = sel("gunicorn_worker_exits_total")
    return (
        f"({exits} and (count_over_time({exits}[{window}]) < on (job, instance) group_left "
        f"max by (job, instance) (count_over_time({every}[{window}])))) "
        f"or increase({exits}[{window}])"
    )


def exits_rate(by: str, extra: str = "") -> str:
    return f"sum by ({by}) ({exits_in('$__rate_interval', extra)})"


def _any_of(values: frozenset[str]) -> str:
    """A regex alternation of exactly these label values, in the contract's order."""
    order = {v: i for i, v in enumerate(causes.CAUSES)}
    return "|".join(sorted(values, key=lambda v: (order.get(v, len(order)), v)))


# Every exit falls in exactly one group: what it means to an operator, and which alert acts on
# it (dashboards/RUNBOOK.md). Each group is a regex over "cause:signal", tried in this order on
# what the previous ones left: stray kills take their `signal` exits before crashes take the
# rest. tests/test_dashboard.py holds the groups to the contract, through promtool.
EXIT_GROUPS: tuple[tuple[str, str], ...] = (
    ("stray kills", f"{causes.KILLED}:.*|{causes.SIGNAL}:({_any_of(causes.STOP_SIGNALS)})"),
    ("crashes", f"({_any_of(causes.CRASHES)}):.*|{causes.SIGNAL}:.*"),
    # Unplanned, neither a crash nor a stray kill: timeouts, OOM kills, boot failures.
    (
        "other unplanned",
        f"({_any_of(causes.UNPLANNED - causes.CRASHES - {causes.KILLED, causes.SIGNAL})}):.*",
    ),
    ("planned", f"({_any_of(causes.PLANNED)}):.*"),
    ("missing evidence", f"({_any_of(causes.MISSING_EVIDENCE)}):.*"),
    ("after master death", f"({_any_of(causes.AFTER_MASTER_DEATH)}):.*"),
)
GROUPS_HELP = (
    "Exits by what they mean: crashes (crash, clean_exit, a fault signal: page), stray kills "
    "(killed, a stop signal the master did not send), other unplanned (timeout, oom, boot "
    "failures), planned (reload, shutdown, scale_down, max_requests), missing evidence "
    "(unknown: the monitor could not tell), after master death (orphaned)."
)


def group_of(cause: str, signal_label: str) -> str:
    """The group `exits_by_group` gives an exit, as Prometheus applies the regexes (anchored)."""
    label = f"{cause}:{signal_label}"
    for name, regex in EXIT_GROUPS:
        if re.fullmatch(regex, label):
            label = name
    return label


def exits_by_group(window: str) -> str:
    """Exits in `window` by group: a `group` label made of "cause:signal", then renamed by each
    group's regex in turn (label_replace leaves a label its regex does not match as it was)."""
    expr = f'label_join({exits_in(window)}, "group", ":", "cause", "signal")'
    for name, regex in EXIT_GROUPS:
        expr = f'label_replace({expr}, "group", "{name}", "group", "{regex}")'
    return f"sum by (group) ({expr})"


def per_slot_memory(kind: str) -> timeseries.Panel:
    memory = sel("gunicorn_worker_memory_bytes", f'type="{kind}"')
    expr = f"sum by (instance, worker) ({memory})"
    legend = "{{instance}} #{{worker}}"
    return graph(f"Worker memory per slot ({kind.upper()})", "bytes", q(expr, legend), w=8)


def overview(d: dashboard.Dashboard) -> dashboard.Dashboard:
    """Is Gunicorn up, with all its workers, and since when."""
    heartbeat = f"max by (instance) ({sel('gunicorn_master_heartbeat_age_seconds')})"
    heartbeat_help = (
        "Seconds since the master's main loop last turned, the largest over live masters. Past "
        "the sidecar's bound a stopped or wedged master counts as down (gunicorn_up 0, alert "
        "GunicornMasterDown)."
    )
    return (
        d.with_row(dashboard.Row("Overview"))
        .with_panel(up_stat())
        .with_panel(
            single_stat(
                "Master heartbeat age", "s", q_instant(heartbeat, "{{instance}}"), w=4
            ).description(heartbeat_help)
        )
        .with_panel(
            single_stat(
                "Live / desired workers",
                "percentunit",
                q_instant(
                    f"sum({sel('gunicorn_workers')}) / sum({sel('gunicorn_workers_desired')})"
                ),
                w=4,
            )
            .description("Live workers as a share of the configured worker count.")
            .thresholds(
                dashboard.ThresholdsConfig()
                .mode(dm.ThresholdsMode.ABSOLUTE)
                .steps(
                    [
                        dm.Threshold(value=None, color="red"),
                        dm.Threshold(value=0.75, color="orange"),
                        dm.Threshold(value=1, color="green"),
                    ]
                )
            )
        )
        .with_panel(
            single_stat(
                "Since last deploy",
                "s",
                q_instant(f"time() - max({sel('gunicorn_last_deploy_timestamp_seconds')})"),
                w=4,
            )
        )
        .with_panel(
            single_stat(
                "Gunicorn",
                "none",
                q_instant(
                    f"count by (version, worker_class) ({sel('gunicorn_build_info')})",
                    "{{version}} {{worker_class}}",
                ),
                w=8,
            ).text_mode(cm.BigValueTextMode.NAME)
        )
        .with_panel(
            graph(
                "Live vs desired workers",
                "none",
                q(f"sum by (instance) ({sel('gunicorn_workers')})", "live {{instance}}", "A"),
                q(
                    f"sum by (instance) ({sel('gunicorn_workers_desired')})",
                    "desired {{instance}}",
                    "B",
                ),
            ).min(0)
        )
        .with_panel(
            graph("Master heartbeat age", "s", q(heartbeat, "{{instance}}"))
            .min(0)
            .description(heartbeat_help)
        )
    )


def exits(d: dashboard.Dashboard) -> dashboard.Dashboard:
    """Every worker exit by cause and by signal, and the spawns that replaced them."""
    return (
        d.with_row(dashboard.Row("Worker exits"))
        .with_panel(
            stacked_bars(
                "Worker exits by group", q(exits_by_group("$__rate_interval"), "{{group}}")
            ).description(GROUPS_HELP)
        )
        .with_panel(stacked_bars("Worker exits by cause", q(exits_rate("cause"), "{{cause}}")))
        .with_panel(
            stacked_bars(
                "Worker exits by signal",
                q(exits_rate("signal", 'signal!="none"'), "{{signal}}"),
                w=8,
            ).description(
                "Exits that ended by a signal: SIGTERM (stop), SIGABRT (Gunicorn timeout), "
                "SIGKILL (timeout escalation, OOM killer, kill -9)."
            )
        )
        .with_panel(
            stacked_bars(
                "Worker aborts (timeouts)",
                q(
                    f"sum by (instance) (increase({sel('gunicorn_worker_aborts_total')}{RATE}))",
                    "{{instance}}",
                ),
                w=8,
            ).description("SIGABRTs the master sent to workers that missed their heartbeat.")
        )
        .with_panel(
            graph(
                "Spawns, restarts and reloads",
                "short",
                q(
                    f"sum(increase({sel('gunicorn_worker_spawns_total')}{RATE}))",
                    "spawns",
                    "A",
                ),
                q(
                    f"sum(increase({sel('gunicorn_worker_restarts_total')}{RATE}))",
                    "restarts",
                    "B",
                ),
                q(
                    f"sum(increase({sel('gunicorn_master_reloads_total')}{RATE}))",
                    "master reloads",
                    "C",
                ),
                w=8,
            )
            .draw_style(cm.GraphDrawStyle.BARS)
            .fill_opacity(80)
            .min(0)
        )
        .with_panel(
            bars(
                "Exits in range by group",
                "short",
                q_instant(f"sort_desc({exits_by_group('$__range')})", "{{group}}"),
                w=12,
            ).description(GROUPS_HELP)
        )
        .with_panel(
            bars(
                "Exits in range by cause",
                "short",
                q_instant(f"sort_desc(sum by (cause) ({exits_in('$__range')}))", "{{cause}}"),
                w=12,
            )
        )
    )


def hangs(d: dashboard.Dashboard) -> dashboard.Dashboard:
    """Why workers hung: timeouts by what the worker was doing, stuck boots, boot time."""
    return (
        d.with_row(dashboard.Row("Why workers hung"))
        .with_panel(
            stacked_bars(
                "Worker timeouts by phase",
                q(
                    f"sum by (phase) (increase({sel('gunicorn_worker_timeouts_total')}{RATE}))",
                    "{{phase}}",
                ),
            ).description(
                "Workers aborted for a missed heartbeat, by what they were doing: boot (still "
                "importing the app), request, idle, unknown (UvicornWorker reports no requests). "
                "The stack of each one: gunicorn-monitor events --stacks."
            )
        )
        .with_panel(
            graph(
                "Workers stuck booting",
                "short",
                q(f"sum by (instance) ({sel('gunicorn_workers_stuck_booting')})", "{{instance}}"),
                w=6,
            )
            .min(0)
            .description(
                "Workers still booting after `timeout` seconds. Gunicorn never times these out."
            )
        )
        .with_panel(
            graph(
                "Worker boot time",
                "s",
                q(
                    "histogram_quantile(0.5, sum by (le) "
                    f"(increase({sel('gunicorn_worker_boot_seconds_bucket')}{RATE})))",
                    "p50",
                    "A",
                ),
                q(
                    "histogram_quantile(0.99, sum by (le) "
                    f"(increase({sel('gunicorn_worker_boot_seconds_bucket')}{RATE})))",
                    "p99",
                    "B",
                ),
                w=6,
            ).description("From the fork to post_worker_init (the app is loaded).")
        )
    )


def lifetime(d: dashboard.Dashboard) -> dashboard.Dashboard:
    """How long workers lived before they exited, and how old the live ones are."""
    return (
        d.with_row(dashboard.Row("Worker lifetime"))
        .with_panel(
            lifetime_heatmap(
                "Worker lifetime at exit",
                "s",
                f"sum by (le) (increase({sel('gunicorn_worker_lifetime_seconds_bucket')}{RATE}))",
            )
        )
        .with_panel(
            distribution(
                "Lifetime distribution (range)",
                "sum by (le) "
                f"(increase({sel('gunicorn_worker_lifetime_seconds_bucket')}[$__range]))",
            )
        )
        .with_panel(
            bars(
                "Median lifetime by cause (range)",
                "s",
                q_instant(
                    "histogram_quantile(0.5, sum by (le, cause) "
                    f"(increase({sel('gunicorn_worker_lifetime_seconds_bucket')}[$__range])))",
                    "{{cause}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Worker age per slot",
                "s",
                q(
                    "max by (instance, worker) "
                    f"(time() - {sel('gunicorn_worker_start_time_seconds')})",
                    "{{instance}} #{{worker}}",
                ),
                w=24,
            )
            .fill_opacity(0)
            .description("Seconds since each worker slot was last (re)spawned; drops are restarts.")
        )
    )


def memory_and_cpu(d: dashboard.Dashboard) -> dashboard.Dashboard:
    """Per-slot memory and CPU, and the memory workers held when they exited."""
    return (
        d.with_row(dashboard.Row("Memory and CPU"))
        .with_panel(per_slot_memory("rss"))
        .with_panel(per_slot_memory("pss"))
        .with_panel(per_slot_memory("uss"))
        .with_panel(
            lifetime_heatmap(
                "Memory at exit",
                "bytes",
                f"sum by (le) (increase({sel('gunicorn_worker_exit_memory_bytes_bucket')}{RATE}))",
            ).description("Last RSS sampled before each worker exited.")
        )
        .with_panel(
            distribution(
                "Memory at exit distribution (range)",
                "sum by (le) "
                f"(increase({sel('gunicorn_worker_exit_memory_bytes_bucket')}[$__range]))",
            )
        )
        .with_panel(
            bars(
                "p90 memory at exit by cause (range)",
                "bytes",
                q_instant(
                    "histogram_quantile(0.9, sum by (le, cause) "
                    f"(increase({sel('gunicorn_worker_exit_memory_bytes_bucket')}[$__range])))",
                    "{{cause}}",
                ),
            )
        )
        .with_panel(
            graph(
                "Worker CPU per slot",
                "percentunit",
                q(
                    "sum by (instance, worker) "
                    f"(rate({sel('gunicorn_worker_cpu_seconds_total')}{RATE}))",
                    "{{instance}} #{{worker}}",
                ),
            ).min(0)
        )
        .with_panel(
            graph(
                "Master memory",
                "bytes",
                q(
                    f"sum by (instance, type) ({sel('gunicorn_master_memory_bytes')})",
                    "{{instance}} {{type}}",
                ),
            )
        )
    )


def exporter(d: dashboard.Dashboard) -> dashboard.Dashboard:
    """The sidecar itself: scrape cost and what it could not read."""
    return (
        d.with_row(dashboard.Row("Exporter"))
        .with_panel(
            graph(
                "Exporter scrape duration",
                "s",
                q(
                    f"max by (instance) ({sel('gunicorn_exporter_scrape_duration_seconds')})",
                    "{{instance}}",
                ),
                w=8,
            ).min(0)
        )
        .with_panel(
            graph(
                "Exporter errors by kind",
                "short",
                q(
                    f"sum by (kind) (increase({sel('gunicorn_exporter_errors_total')}{RATE}))",
                    "{{kind}}",
                ),
                w=8,
            ).min(0)
        )
        .with_panel(
            graph(
                "Shared files skipped",
                "short",
                q(
                    "sum by (instance) "
                    f"(increase({sel('gunicorn_exporter_files_skipped_total')}{RATE}))",
                    "{{instance}}",
                ),
                w=8,
            ).min(0)
        )
    )


def build() -> dict:
    """The dashboard as a plain dict, exactly as it is written to gunicorn.json."""
    d = (
        dashboard.Dashboard("Gunicorn workers")
        .uid(UID)
        .description(
            "Gunicorn worker lifecycle from gunicorn-monitor: every spawn and every exit, "
            "classified by cause; per-slot memory and CPU; exporter health."
        )
        .tags(["gunicorn", "gunicorn-monitor"])
        .editable()
        .tooltip(dm.DashboardCursorSync.CROSSHAIR)
        .refresh("30s")
        .time("now-6h", "now")
        .timezone("browser")
        .with_variable(
            dashboard.DatasourceVariable("datasource")
            .label("Data source")
            .type("prometheus")
            .current(dm.VariableOption(text="Prometheus", value="${" + DS_INPUT + "}"))
        )
        .with_variable(
            _label_variable(
                "job", "label_values(gunicorn_up, job)", dm.VariableRefresh.ON_DASHBOARD_LOAD
            )
        )
        .with_variable(
            _label_variable(
                "instance",
                'label_values(gunicorn_up{job=~"$job"}, instance)',
                dm.VariableRefresh.ON_TIME_RANGE_CHANGED,
            )
        )
        .annotation(
            dashboard.AnnotationQuery()
            .name("Annotations & Alerts")
            .datasource(dm.DataSourceRef(type_val="grafana", uid="-- Grafana --"))
            .enable(True)
            .hide(True)
            .icon_color("rgba(0, 211, 255, 1)")
            .type("dashboard")
            .built_in(1)
        )
        .annotation(
            dashboard.AnnotationQuery()
            .name("Deploys")
            .datasource(DS)
            .enable(True)
            .icon_color("blue")
            .expr(f"changes({sel('gunicorn_last_deploy_timestamp_seconds')}{RATE}) > 0")
        )
    )
    for row in (overview, exits, hangs, lifetime, memory_and_cpu, exporter):
        d = row(d)
    return _post_process(json.loads(JSONEncoder(sort_keys=True).encode(d.build())))


def _post_process(data: dict) -> dict:
    """Adds what the SDK's models cannot express."""
    # Panel ids: the SDK leaves them unset; number every panel (rows included) in layout order.
    for number, panel in enumerate(data["panels"], start=1):
        panel["id"] = number
    # Import inputs: the SDK's Dashboard model has no `__inputs`/`__requires`. On import, Grafana
    # asks for a Prometheus datasource and writes it where `${DS_PROMETHEUS}` appears: only the
    # default of the `datasource` variable, which every panel and variable query uses.
    data["__inputs"] = [
        {
            "description": "Prometheus scraping the gunicorn-monitor sidecar",
            "label": "Prometheus",
            "name": DS_INPUT,
            "pluginId": "prometheus",
            "pluginName": "Prometheus",
            "type": "datasource",
        }
    ]
    panel_types = sorted({p["type"] for p in data["panels"] if p["type"] != "row"})
    data["__requires"] = [
        {"id": "grafana", "name": "Grafana", "type": "grafana", "version": GRAFANA_VERSION},
        {"id": "prometheus", "name": "Prometheus", "type": "datasource", "version": "1.0.0"},
    ] + [{"id": t, "name": t, "type": "panel", "version": ""} for t in panel_types]
    # Prometheus annotation fields the SDK's AnnotationQuery model has no setters for.
    for annotation in data["annotations"]["list"]:
        if annotation.get("expr"):
            annotation.update({"step": "1m", "tagKeys": "job,instance", "titleFormat": "Deploy"})
    return data


def render(data: dict) -> str:
    return json.dumps(data, sort_keys=True, indent=2) + "\n"


def substitute(expr: str) -> str:
    """An expression with Grafana's variables replaced, as Prometheus itself would accept it."""
    for variable, value in SUBSTITUTIONS.items():
        expr = expr.replace(variable, value)
    return expr


def raw_queries(data: dict | None = None) -> list[str]:
    """Every PromQL expression of the dashboard (panel targets, then annotations), unsubstituted."""
    data = build() if data is None else data
    exprs = [t["expr"] for p in data["panels"] for t in p.get("targets", [])]
    exprs += [a["expr"] for a in data["annotations"]["list"] if a.get("expr")]
    return exprs


def dashboard_queries(data: dict | None = None) -> list[str]:
    """Every PromQL expression of the dashboard, variables substituted, in dashboard order."""
    return [substitute(expr) for expr in raw_queries(data)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the committed JSON differs from the code"
    )
    args = parser.parse_args(argv)
    text = render(build())
    if args.check:
        committed = OUTPUT.read_text() if OUTPUT.exists() else ""
        if committed != text:
            sys.stderr.write(
                f"{OUTPUT.name} is out of date: run python dashboards/build_dashboard.py\n"
            )
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
