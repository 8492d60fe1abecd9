"""Plugin gauges (GaugeSnapshot) and the reload counters in /metrics."""

from __future__ import annotations

from collections.abc import Iterable

import pytest

from runner.metrics import (
    CounterSnapshot,
    GaugeSnapshot,
    MetricsView,
    RPCStats,
    build_registry,
    live_view,
    merge,
    to_json,
)
from runner.reload import ReloadStats

prometheus_client = pytest.importorskip("prometheus_client")


def _exposition(view: MetricsView) -> str:
    return str(prometheus_client.generate_latest(build_registry(lambda: view)).decode())


class Both:
    """A plugin that reports a counter and a gauge, as the CRL support does."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def metrics(self) -> Iterable[CounterSnapshot | GaugeSnapshot]:
        return [
            CounterSnapshot("crl_loads", "loads", ("result",), {("ok",): 2.0}),
            GaugeSnapshot("crl_next_update_seconds", "to nextUpdate", ("crl",), {("ca-1",): self.seconds}, merge="min"),
        ]


def _worker_view(*gauges: GaugeSnapshot) -> dict[str, object]:
    return to_json(MetricsView(RPCStats(), {}, (), gauges))


class TestGaugeSnapshot:
    def test_exported_as_a_labelled_gauge(self) -> None:
        """A GaugeSnapshot is a Prometheus gauge with its labels, next to the plugin's counters."""
        text = _exposition(live_view(RPCStats(), {}, [Both(42.0)])())
        assert "# TYPE crl_next_update_seconds gauge" in text
        assert 'crl_next_update_seconds{crl="ca-1"} 42.0' in text
        assert 'crl_loads_total{result="ok"} 2.0' in text

    def test_default_merge_is_max(self) -> None:
        """Without ``merge`` the workers' values combine as their maximum."""
        assert GaugeSnapshot("g", "d", (), {}).merge == "max"

    @pytest.mark.parametrize(("how", "expected"), [("sum", 9.0), ("min", 2.0), ("max", 4.0)])
    def test_workers_values_combine_as_declared(self, how: str, expected: float) -> None:
        """The same series from three workers is summed, or its minimum or maximum is kept."""
        views = [_worker_view(GaugeSnapshot("g", "d", ("k",), {("a",): v}, merge=how)) for v in (3.0, 2.0, 4.0)]  # type: ignore[arg-type]
        (merged,) = merge(views).labelled_gauges
        assert (merged.values, merged.merge) == ({("a",): expected}, how)

    def test_series_only_some_workers_have_are_kept(self) -> None:
        """A series one worker lacks (its CRL not loaded yet) is taken from the workers that have it."""
        views = [_worker_view(GaugeSnapshot("g", "d", ("k",), {("a",): 1.0, ("b",): 5.0}, merge="min")), _worker_view()]
        assert merge(views).labelled_gauges[0].values == {("a",): 1.0, ("b",): 5.0}


class TestReloadStats:
    def test_reload_counters_and_gauges_are_exposed(self) -> None:
        """/metrics shows reloads by result, the time of the last success and the generation."""
        stats = ReloadStats()
        stats.ok, stats.failed, stats.generation, stats.last_success = 2, 1, 2, 1700000000.0
        text = _exposition(live_view(RPCStats(), {}, [stats])())
        assert 'mtls_guard_reloads_total{result="ok"} 2.0' in text
        assert 'mtls_guard_reloads_total{result="failed"} 1.0' in text
        assert "mtls_guard_config_last_reload_success_timestamp_seconds 1.7e+09" in text
        assert "mtls_guard_config_generation 2.0" in text
