"""Runner metrics: plain counters on the hot path, Prometheus families at scrape time."""

from __future__ import annotations

import asyncio

import pytest

from runner.httpd import HealthEndpoint, parse_host_port
from runner.metrics import CounterSnapshot, MetricsView, RPCStats, build_registry, live_view, merge, to_json

prometheus_client = pytest.importorskip("prometheus_client")


def _exposition(view: MetricsView) -> str:
    return str(prometheus_client.generate_latest(build_registry(lambda: view)).decode())


class TestRPCStats:
    def test_counts_by_type_and_outcome(self) -> None:
        """Each observation adds one to its (type, outcome) pair."""
        stats = RPCStats()
        stats("http_req_call", "ok", 0.0001)
        stats("http_req_call", "ok", 0.0002)
        stats("prepare_conf", "bad_request", 0.001)
        assert stats.counts == {("http_req_call", "ok"): 2, ("prepare_conf", "bad_request"): 1}

    def test_histogram_buckets_and_sum(self) -> None:
        """Durations land in the first bucket whose bound is not smaller, and add up in the sum."""
        stats = RPCStats()
        stats("http_req_call", "ok", 0.00004)
        stats("http_req_call", "ok", 7.0)
        counts, total = stats.histograms["http_req_call"]
        assert counts[0] == 1
        assert counts[-1] == 1
        assert sum(counts) == 2
        assert total[0] == pytest.approx(7.00004)


class TestExposition:
    def test_families_and_labels(self) -> None:
        """The scrape shows RPC counts, the latency histogram, gauges and plugin counters."""
        stats = RPCStats()
        stats("http_req_call", "ok", 0.0003)
        decisions = CounterSnapshot(
            "mtls_guard_decisions", "d", ("verdict", "reason", "mode"), {("deny", "no-cert", "enforce"): 3.0}
        )
        text = _exposition(MetricsView(stats, {"mtls_guard_conf_tokens": ("tokens", 5.0)}, (decisions,)))
        assert 'mtls_guard_rpc_total{outcome="ok",type="http_req_call"} 1.0' in text
        assert 'mtls_guard_rpc_duration_seconds_bucket{le="0.0005",type="http_req_call"} 1.0' in text
        assert 'mtls_guard_rpc_duration_seconds_bucket{le="0.00025",type="http_req_call"} 0.0' in text
        assert 'mtls_guard_rpc_duration_seconds_count{type="http_req_call"} 1.0' in text
        assert "mtls_guard_conf_tokens 5.0" in text
        assert 'mtls_guard_decisions_total{mode="enforce",reason="no-cert",verdict="deny"} 3.0' in text

    def test_live_view_reads_gauges_at_scrape_time(self) -> None:
        """Gauges are functions evaluated on every scrape, not values captured once."""
        value = [1.0]
        read = live_view(RPCStats(), {"g": ("doc", lambda: value[0])}, [])
        assert read().gauges["g"] == ("doc", 1.0)
        value[0] = 9.0
        assert read().gauges["g"] == ("doc", 9.0)


class TestMerge:
    def test_workers_views_add_up(self) -> None:
        """Counters, histogram buckets, gauges and plugin counters of several workers are summed."""
        views = []
        for n in (1, 2):
            stats = RPCStats()
            for _ in range(n):
                stats("http_req_call", "ok", 0.0001)
            snap = CounterSnapshot("c", "doc", ("reason",), {("no-cert",): float(n)})
            views.append(to_json(MetricsView(stats, {"g": ("doc", float(n))}, (snap,))))
        merged = merge(views)
        assert merged.stats.counts == {("http_req_call", "ok"): 3}
        assert sum(merged.stats.histograms["http_req_call"][0]) == 3
        assert merged.gauges == {"g": ("doc", 3.0)}
        assert merged.counters[0].values == {("no-cert",): 3.0}

    def test_merge_of_nothing_is_empty(self) -> None:
        """No worker views (none written yet) give an empty but valid exposition."""
        text = _exposition(merge([]))
        assert "mtls_guard_rpc_total" in text


class TestHealthEndpoint:
    def test_parse_host_port(self) -> None:
        """HOST:PORT, [v6]:PORT and :PORT parse; anything else is refused."""
        assert parse_host_port("127.0.0.1:9464") == ("127.0.0.1", 9464)
        assert parse_host_port("[::1]:9464") == ("::1", 9464)
        assert parse_host_port(":9464") == ("127.0.0.1", 9464)
        for bad in ("9464", "host:", "host:0", "host:70000", "host:x"):
            with pytest.raises(ValueError, match="HOST:PORT"):
                parse_host_port(bad)

    def test_routes(self) -> None:
        """/healthz is 200, /readyz follows the ready callback, /metrics serves the bytes, others 404/405."""
        ready = [True]

        async def scenario() -> list[bytes]:
            endpoint = HealthEndpoint("127.0.0.1:0", ready=lambda: ready[0], metrics=lambda: b"m 1\n")
            await endpoint.start()
            answers = []
            try:
                for line in (b"GET /healthz", b"GET /readyz", b"GET /metrics", b"GET /nope", b"POST /healthz"):
                    if line == b"GET /metrics":
                        ready[0] = False
                    reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
                    writer.write(line + b" HTTP/1.1\r\nHost: x\r\n\r\n")
                    answers.append(await reader.read())
                    writer.close()
                reader, writer = await asyncio.open_connection("127.0.0.1", endpoint.port)
                writer.write(b"GET /readyz HTTP/1.1\r\n\r\n")
                answers.append(await reader.read())
                writer.close()
            finally:
                await endpoint.close()
            return answers

        healthz, readyz, metrics, missing, post, not_ready = asyncio.run(scenario())
        assert healthz.startswith(b"HTTP/1.1 200")
        assert healthz.endswith(b"ok\n")
        assert readyz.startswith(b"HTTP/1.1 200")
        assert metrics.startswith(b"HTTP/1.1 200")
        assert metrics.endswith(b"m 1\n")
        assert missing.startswith(b"HTTP/1.1 404")
        assert post.startswith(b"HTTP/1.1 405")
        assert not_ready.startswith(b"HTTP/1.1 503")
