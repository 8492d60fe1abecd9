"""Runner metrics, kept in plain counters on the hot path and turned into Prometheus families only
when scraped (``prometheus_client`` is an optional extra and is imported lazily).

Labels are bounded by construction: RPC type and outcome come from fixed sets, plugins report their
own bounded label sets through ``CounterSnapshot`` and ``GaugeSnapshot`` (mtls-guard: verdict, reason,
mode — never DNs, paths or fingerprints).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

__all__ = [
    "CounterSnapshot",
    "GaugeSnapshot",
    "MetricsSource",
    "MetricsView",
    "RPCStats",
    "build_registry",
    "live_view",
    "merge",
    "to_json",
]

# Seconds; the runner answers in tens of microseconds, a slow plugin in up to call_timeout.
_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 5.0)


@dataclass(frozen=True, slots=True)
class CounterSnapshot:
    """A counter family a plugin exposes: values keyed by label-value tuples."""

    name: str
    documentation: str
    labels: tuple[str, ...]
    values: Mapping[tuple[str, ...], float]


@dataclass(frozen=True, slots=True)
class GaugeSnapshot:
    """A gauge family a plugin exposes: values keyed by label-value tuples.

    ``merge`` says how the supervisor combines the same series from several workers at scrape
    time: each worker holds its own copy of plugin state (a CRL's seconds to nextUpdate is the
    same everywhere, so "max" or "min" is right; per-worker sizes that add up want "sum").
    """

    name: str
    documentation: str
    labels: tuple[str, ...]
    values: Mapping[tuple[str, ...], float]
    merge: Literal["sum", "min", "max"] = "max"


@runtime_checkable
class MetricsSource(Protocol):
    """Plugins that have counters or gauges implement this; the runner scrapes it on demand."""

    def metrics(self) -> Iterable[CounterSnapshot | GaugeSnapshot]: ...


class RPCStats:
    """RPC counts by (type, outcome) and a latency histogram by type: an RPCObserver."""

    __slots__ = ("counts", "histograms")

    def __init__(self) -> None:
        self.counts: dict[tuple[str, str], int] = {}
        # type -> [bucket counts..., +Inf count], sum
        self.histograms: dict[str, tuple[list[int], list[float]]] = {}

    def __call__(self, rpc_type: str, outcome: str, seconds: float) -> None:
        key = (rpc_type, outcome)
        self.counts[key] = self.counts.get(key, 0) + 1
        hist = self.histograms.get(rpc_type)
        if hist is None:
            hist = self.histograms[rpc_type] = ([0] * (len(_BUCKETS) + 1), [0.0])
        hist[0][bisect.bisect_left(_BUCKETS, seconds)] += 1
        hist[1][0] += seconds


@dataclass(frozen=True, slots=True)
class MetricsView:
    """Everything one scrape exposes."""

    stats: RPCStats
    gauges: Mapping[str, tuple[str, float]]
    counters: tuple[CounterSnapshot, ...]
    labelled_gauges: tuple[GaugeSnapshot, ...] = ()


def live_view(
    stats: RPCStats, gauges: Mapping[str, tuple[str, Callable[[], float]]], sources: Iterable[MetricsSource]
) -> Callable[[], MetricsView]:
    """The view of this process, read at scrape time."""
    source_list = list(sources)

    def read() -> MetricsView:
        snaps = [snap for source in source_list for snap in source.metrics()]
        return MetricsView(
            stats,
            {name: (doc, value()) for name, (doc, value) in gauges.items()},
            tuple(s for s in snaps if isinstance(s, CounterSnapshot)),
            tuple(s for s in snaps if isinstance(s, GaugeSnapshot)),
        )

    return read


def to_json(view: MetricsView) -> dict[str, Any]:
    """A worker's view, for the supervisor to add up (runner.process.supervisor)."""
    return {
        "rpc": [[t, o, n] for (t, o), n in view.stats.counts.items()],
        "hist": {t: [counts, total[0]] for t, (counts, total) in view.stats.histograms.items()},
        "gauges": {name: [doc, value] for name, (doc, value) in view.gauges.items()},
        "counters": [
            [c.name, c.documentation, list(c.labels), [[list(k), v] for k, v in c.values.items()]]
            for c in view.counters
        ],
        "labelled_gauges": [
            [g.name, g.documentation, list(g.labels), g.merge, [[list(k), v] for k, v in g.values.items()]]
            for g in view.labelled_gauges
        ],
    }


def merge(views: Iterable[Mapping[str, Any]]) -> MetricsView:
    """Combine the workers' views: counters, histograms and the runner's gauges (connections, tokens
    per worker) add up; plugin gauges combine as their ``GaugeSnapshot.merge`` says."""
    stats = RPCStats()
    gauges: dict[str, tuple[str, float]] = {}
    counters: dict[str, tuple[str, tuple[str, ...], dict[tuple[str, ...], float]]] = {}
    labelled: dict[str, tuple[str, tuple[str, ...], Literal["sum", "min", "max"], dict[tuple[str, ...], float]]] = {}
    for view in views:
        for rpc_type, outcome, n in view.get("rpc", ()):
            stats.counts[(rpc_type, outcome)] = stats.counts.get((rpc_type, outcome), 0) + int(n)
        for rpc_type, (counts, total) in view.get("hist", {}).items():
            mine = stats.histograms.setdefault(rpc_type, ([0] * (len(_BUCKETS) + 1), [0.0]))
            for i, n in enumerate(counts[: len(_BUCKETS) + 1]):
                mine[0][i] += int(n)
            mine[1][0] += float(total)
        for name, (doc, value) in view.get("gauges", {}).items():
            gauges[name] = (doc, gauges.get(name, (doc, 0.0))[1] + float(value))
        for name, doc, labels, values in view.get("counters", ()):
            family = counters.setdefault(name, (doc, tuple(labels), {}))
            for key, value in values:
                family[2][tuple(key)] = family[2].get(tuple(key), 0.0) + float(value)
        for name, doc, labels, how, values in view.get("labelled_gauges", ()):
            kind = _merge_kind(how)
            series = labelled.setdefault(name, (doc, tuple(labels), kind, {}))[3]
            combine = _COMBINE[kind]
            for key, value in values:
                k = tuple(key)
                series[k] = combine(series[k], float(value)) if k in series else float(value)
    return MetricsView(
        stats,
        gauges,
        tuple(CounterSnapshot(n, d, labels, v) for n, (d, labels, v) in sorted(counters.items())),
        tuple(GaugeSnapshot(n, d, labels, v, kind) for n, (d, labels, kind, v) in sorted(labelled.items())),
    )


_COMBINE: dict[str, Callable[[float, float], float]] = {"sum": lambda a, b: a + b, "min": min, "max": max}


def _merge_kind(how: object) -> Literal["sum", "min", "max"]:
    if how == "sum":
        return "sum"
    if how == "min":
        return "min"
    return "max"


def build_registry(read: Callable[[], MetricsView]) -> Any:
    """A private CollectorRegistry exposing ``read()`` at each scrape; needs the ``metrics`` extra."""
    from prometheus_client.core import (
        CollectorRegistry,
        CounterMetricFamily,
        GaugeMetricFamily,
        HistogramMetricFamily,
    )

    class _Collector:
        def collect(self) -> Iterator[Any]:
            view = read()
            rpc = CounterMetricFamily("mtls_guard_rpc", "RPCs handled, by type and outcome", labels=["type", "outcome"])
            for (rpc_type, outcome), n in sorted(view.stats.counts.items()):
                rpc.add_metric([rpc_type, outcome], n)
            yield rpc
            latency = HistogramMetricFamily(
                "mtls_guard_rpc_duration_seconds", "Time from an RPC's arrival to its reply", labels=["type"]
            )
            for rpc_type, (counts, total) in sorted(view.stats.histograms.items()):
                cumulative, buckets = 0, []
                for bound, n in zip((*_BUCKETS, float("inf")), counts, strict=True):
                    cumulative += n
                    buckets.append((_bound(bound), cumulative))
                latency.add_metric([rpc_type], buckets, sum_value=total[0])
            yield latency
            for name, (doc, value) in view.gauges.items():
                yield GaugeMetricFamily(name, doc, value=value)
            for snap in view.counters:
                family = CounterMetricFamily(snap.name, snap.documentation, labels=list(snap.labels))
                for labels, value in sorted(snap.values.items()):
                    family.add_metric(list(labels), value)
                yield family
            for gauge in view.labelled_gauges:
                gfamily = GaugeMetricFamily(gauge.name, gauge.documentation, labels=list(gauge.labels))
                for labels, value in sorted(gauge.values.items()):
                    gfamily.add_metric(list(labels), value)
                yield gfamily

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector())
    return registry


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)
