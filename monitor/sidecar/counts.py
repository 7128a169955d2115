"""What one counts file of the hooks contributes, checked against the contract, and the sum.

Each file (`counter_`, `histogram_`, `gauge_max_<ident>.db`, monitor/contract/store.py) is read
whole by the compaction's validating reader, then entry by entry against the contract
(monitor/contract/metrics.py): a known metric in the right type of file, its labels, label
values from their fixed sets, a finite count that is not negative. What passes is a sample:
(family, sample name, labels) and its value. Files sum (counters, histogram buckets and sums:
buckets are stored per bucket, not cumulative) or take the larger value (the `max` gauge).

Checked per file, so that what a file contributes can be kept, summed and folded on its own
(collectors/lifecycle.py keeps a file's last good contribution; sidecar/retirement.py folds a
gone master's into `retired.json`): a histogram label set with a rejected sample in one file
costs that file's samples of it, never another file's, and is never folded half.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from prometheus_client.core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.utils import floatToGoString

from monitor.contract import causes, metrics
from monitor.sidecar.compaction import Entry

# The families the hooks write, by name: every Spec of the contract that lives in a file.
_DERIVED = {
    metrics.UP.name,
    metrics.MASTER_HEARTBEAT_AGE.name,
    metrics.WORKERS.name,
    metrics.WORKERS_DESIRED.name,
    metrics.WORKERS_STUCK_BOOTING.name,
}
SPECS = {
    spec.name: spec
    for spec in vars(metrics).values()
    if isinstance(spec, metrics.Spec) and spec.name not in _DERIVED
}
KINDS = ("counter", "histogram", "gauge")
# The only gauge mode the hooks write (store.Store.set_max): the largest value of any writer.
GAUGE_MODE = "max"

Labels = tuple[tuple[str, str], ...]
Key = tuple[str, str, Labels]  # family, sample name, sorted labels


@dataclass
class FileCounts:
    """One file's samples that passed, and why the others did not (error kind -> count)."""

    kind: str
    samples: dict[Key, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def error(self, kind: str, n: int = 1) -> None:
        self.errors[kind] = self.errors.get(kind, 0) + n


def of_entries(typ: str, mode: str, entries: list[Entry]) -> FileCounts:
    """What one file of type `typ` (gauge files: of mode `mode`) contributes."""
    counts = FileCounts(typ)
    tainted: set[tuple[str, Labels]] = set()
    foreign: list[tuple[metrics.Spec, Entry]] = []
    gauge = typ == "gauge"
    for e in entries:
        why, key, taint = _checked(typ, mode, e.key or (e.metric_name, e.name, e.labels), e)
        value = e.value
        if not why and not (value == value and abs(value) != math.inf and (gauge or value >= 0)):
            why = "malformed"  # counts are finite and never negative
            taint = _taint(SPECS[e.metric_name], e.labels)
        if why == "foreign":
            foreign.append((SPECS[e.metric_name], e))
            continue
        if why:
            counts.error(why)
            if taint is not None:
                tainted.add(taint)
            continue
        counts.samples[key] = counts.samples.get(key, 0.0) + value
    if foreign:
        _rebucket(counts, tainted, entries, foreign)
    if tainted:
        # A label set with a rejected bucket would serve a _count that is not the sum of its
        # buckets: this file's samples of it are left out instead.
        for key in [k for k in counts.samples if (k[0], _without_le(k[2])) in tainted]:
            del counts.samples[key]
    return counts


_CHECKED: dict[tuple, tuple[str, Key | None, tuple | None]] = {}


def _checked(typ: str, mode: str, ident: object, e: Entry) -> tuple[str, Key | None, tuple | None]:
    """What the contract says of an entry's key, whatever its value: why it may not be served
    ("" if it may), its sample key, and the histogram label set it taints if it may not.
    Kept by key: thousands of files repeat the same few dozen keys."""
    known = _CHECKED.get((typ, mode, ident))
    if known is None:
        spec = SPECS.get(e.metric_name)
        why = _invalid(spec, typ, e.name, dict(e.labels))
        if typ == "gauge" and mode != GAUGE_MODE and not why:
            why = "rejected"  # a mode the hooks never write: its merge is not ours to guess
        key = (spec.name, e.name, e.labels) if spec is not None else None
        taint = _taint(spec, e.labels) if why and why != "foreign" else None
        known = (why, key, taint)
        if len(_CHECKED) < 1 << 16:  # the contract's keys fit many times over; forged ones stop
            _CHECKED[(typ, mode, ident)] = known
    return known


def _taint(spec: metrics.Spec | None, labels: Labels) -> tuple[str, Labels] | None:
    if spec is None or spec.kind != "histogram":
        return None
    return spec.name, _without_le(labels)


def _without_le(labels: Labels) -> Labels:
    return tuple(p for p in labels if p[0] != "le")


def _rebucket(
    counts: FileCounts,
    tainted: set,
    entries: list[Entry],
    foreign: list[tuple[metrics.Spec, Entry]],
) -> None:
    """A file written with other buckets (by an earlier version of the hooks): its buckets
    fold exactly into ours when each of our bounds is one of its bounds, because then no
    bucket of its straddles one of ours. Otherwise its label sets are left out."""
    written: dict[str, set[float]] = {}
    for e in entries:
        le = dict(e.labels).get("le")
        if le is not None and e.name.endswith("_bucket"):
            written.setdefault(e.metric_name, set()).add(_float(le))
    for spec, entry in foreign:
        bounds = sorted(spec.buckets) + [math.inf]
        labels = dict(entry.labels)
        le = _float(labels.pop("le"))
        if not set(bounds) <= written[spec.name]:
            counts.error("rejected")
            tainted.add((spec.name, tuple(sorted(labels.items()))))
            continue
        ours = next(b for b in bounds if b >= le)
        labels["le"] = "+Inf" if ours == math.inf else floatToGoString(ours)
        key = (spec.name, entry.name, tuple(sorted(labels.items())))
        counts.samples[key] = counts.samples.get(key, 0.0) + entry.value


def add(total: dict[Key, float], samples: dict[Key, float]) -> None:
    """Fold one file's samples into a sum: counts add up, the `max` gauge keeps the larger."""
    for key, value in samples.items():
        known = total.get(key)
        if known is None:
            total[key] = value
        elif SPECS[key[0]].kind == "gauge":
            total[key] = max(known, value)
        else:
            total[key] = known + value


def families(
    total: dict[Key, float], whole: Iterable[str], lifetime: bool = True
) -> Iterator[Metric]:
    """The families served from a sum of files. `whole`: the kinds (counter, histogram, gauge)
    whose every file was read, so that a series no file holds is truly 0 (see _with_defaults);
    `lifetime`: --collector.lifetime."""
    whole = set(whole)
    found: dict[str, Metric] = {}
    for (name, sample, labels), value in total.items():
        spec = SPECS[name]
        metric = found.get(name)
        if metric is None:
            metric = found[name] = Metric(name, spec.help, spec.kind)
            if spec.kind == "gauge":
                metric._multiprocess_mode = GAUGE_MODE
        # Labels as sorted pairs: the shape the library's accumulation expects; a gauge's by
        # writer, which `max` takes out again.
        metric.add_sample(
            sample, labels + (("pid", "all"),) if spec.kind == "gauge" else labels, value
        )
    _complete_histograms(found)
    merged = {m.name: m for m in MultiProcessCollector._accumulate_metrics(found, True)}
    for spec in SPECS.values():
        if spec is metrics.WORKER_LIFETIME and not lifetime:
            continue
        if spec is metrics.WORKER_EXIT_MEMORY:
            continue  # measured by the sidecar itself (collectors/workers.py)
        family = merged.get(spec.name)
        if spec.kind == "counter" and (spec.kind in whole or family is not None):
            yield _with_defaults(spec, family, spec.kind in whole)
        elif family is not None and family.samples:
            family.documentation = spec.help
            yield family


def _invalid(spec: metrics.Spec | None, typ: str, name: str, labels: dict) -> str:
    """Why an entry's key may not be served ("rejected"), or "" if it may; "foreign" for a
    well-formed bucket whose bound is not one of ours."""
    if spec is None or typ not in KINDS or typ != spec.kind:
        return "rejected"  # not a family of the contract, or in the wrong type of file
    names, foreign = set(spec.labels), False
    if spec.kind == "counter":
        ok_name = name == spec.name + "_total"
    elif spec.kind == "histogram":
        ok_name = name in (spec.name + "_sum", spec.name + "_bucket")
        if name == spec.name + "_bucket":
            names.add("le")
            if labels.get("le") not in _bounds(spec):
                if _float(labels.get("le")) is None:
                    return "rejected"
                foreign = True
    else:
        ok_name = name == spec.name
    if not ok_name or set(labels) != names:
        return "rejected"
    for label in spec.labels:
        if labels[label] not in metrics.LABEL_VALUES.get(label, ()):
            return "rejected"
    return "foreign" if foreign else ""


def _float(le: object) -> float | None:
    """A bucket bound as written by prometheus_client (floatToGoString), or None."""
    try:
        bound = float(le)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return bound if bound == bound and bound > -math.inf else None


def _bounds(spec: metrics.Spec) -> frozenset[str]:
    return frozenset([floatToGoString(b) for b in spec.buckets] + ["+Inf"])


def _with_defaults(spec: metrics.Spec, found: Metric | None, whole: bool) -> Metric:
    """A counter family, with the series that start at 0 if every file of counts was read.

    Every pod pays for each zero series, so only those an alert must see rise from 0 start
    there: every known (cause, signal) pair of exits, and the unlabelled counters. Other
    labelled counters (hook errors, directory faults, timeouts by phase) appear with their
    first event, even where the hooks stored a 0: absent is unknown, never a false zero. And
    while a file of counts could not be read, no series starts at 0: it may hold that one.
    """
    family = Metric(spec.name, spec.help, "counter")
    present = {}
    if found is not None:
        for s in found.samples:
            if s.value or spec is metrics.WORKER_EXITS or not spec.labels:
                present[tuple(sorted(s.labels.items()))] = s.value
    if not whole:
        defaults = []
    elif spec is metrics.WORKER_EXITS:
        defaults = [{"cause": c, "signal": sig} for c, sig in causes.KNOWN_EXITS]
    elif spec.labels:
        defaults = []
    else:
        defaults = [{}]
    for labels in defaults:
        present.setdefault(tuple(sorted(labels.items())), 0.0)
    for key, value in sorted(present.items()):
        family.add_sample(spec.name + "_total", dict(key), value)
    return family


def _complete_histograms(found: dict[str, Metric]) -> None:
    """Every bucket and a _sum for each label set seen, before accumulation.

    Buckets are stored per bucket (non-cumulative), so a bucket no file holds is a bucket with
    no observation: 0. Adding the zeros makes each label set whole whatever the writer chose
    to store, and a whole histogram is what promtool and Prometheus expect.
    """
    for metric in found.values():
        if metric.type != "histogram":
            continue
        spec = SPECS[metric.name]
        seen = {tuple(p for p in s.labels if p[0] != "le") for s in metric.samples}
        for key in seen:
            metric.add_sample(spec.name + "_sum", key, 0.0)
            for le in _bounds(spec):
                metric.add_sample(spec.name + "_bucket", tuple(sorted(key + (("le", le),))), 0.0)
