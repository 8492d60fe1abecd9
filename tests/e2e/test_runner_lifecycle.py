"""The runner process dies or is stopped while real traffic flows: requests fail closed, then recover.

Each test starts its own world (the runner is killed in it). Traffic mix: a valid certificate on a
protected path, no certificate on a protected path, no certificate on the exempt path.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator

import pytest

from runner.testing import FakeApisix
from tests.e2e.bridge import Route
from tests.e2e.load import Hit, Load
from tests.e2e.nginx_env import NginxEnv
from tests.e2e.pki import Pki
from tests.e2e.policies import enforce_policy, report_policy
from tests.e2e.stack import Stack, running_stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

MIX: list[tuple[str | None, str]] = [
    ("valid", "/orders/1"),
    ("valid", "/orders/2"),
    (None, "/orders/1"),
    (None, "/orders/2"),
    (None, "/health"),
]
# What a client may see for each kind of request while the runner is up, down or stopping.
ALLOWED = {
    ("valid", "/orders/1"): {200, 503},
    ("valid", "/orders/2"): {200, 503},
    (None, "/orders/1"): {403, 503},
    (None, "/orders/2"): {403, 503},
    (None, "/health"): {200, 503},
}


@pytest.fixture
def two_routes(nginx_env: NginxEnv, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Route 1 enforces at ``/``, route 2 only reports at ``/report/``."""
    routes = [Route.mtls_guard("1", "/", enforce_policy()), Route.mtls_guard("2", "/report/", report_policy())]
    with running_stack(nginx_env, pki, tmp_path_factory.mktemp("tokens"), routes) as stack:
        yield stack


@pytest.fixture
def world(nginx_env: NginxEnv, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """A fresh world per test: these tests kill its runner."""
    routes = [Route.mtls_guard("1", "/", enforce_policy())]
    with running_stack(nginx_env, pki, tmp_path_factory.mktemp("lifecycle"), routes) as stack:
        yield stack


def _assert_fail_closed(hits: list[Hit], stack: Stack) -> None:
    """Every request got an HTTP answer and none was ever let through without a valid certificate."""
    assert hits, "the load generated no traffic"
    errors = [h for h in hits if h.status is None]
    assert not errors, f"client-side failures: {errors[:3]}{stack.diagnostics()}"
    wrong = [h for h in hits if h.status not in ALLOWED[(h.cert, h.path)]]
    assert not wrong, f"{len(wrong)} requests got a forbidden status, e.g. {wrong[:3]}{stack.diagnostics()}"


class TestRunnerKilled:
    """SIGKILL of the runner mid-traffic, then a restart (APISIX respawns it)."""

    def test_requests_fail_closed_during_the_outage_and_recover_through_reprepare(self, world: Stack) -> None:
        """While the runner is dead every request gets 503; after the restart stale tokens are re-prepared."""
        world.expect(world.clients.request("/orders/1", cert="valid"), 200)
        prepares_before = world.bridge.prepare_count
        with Load(world.clients, MIX) as load:
            time.sleep(0.3)
            killed_at = time.monotonic()
            world.runner.kill()
            time.sleep(0.3)
            outage = [
                world.clients.request("/orders/1", cert="valid"),
                world.clients.request("/orders/1"),
                world.clients.request("/health"),
            ]
            world.runner.start()
            restarted_at = time.monotonic()
            time.sleep(0.5)
        hits = load.stop()
        _assert_fail_closed(hits, world)
        for reply in outage:
            world.expect(reply, 503)
            assert reply.outcome == "error"
        assert any(h.status == 503 for h in hits if killed_at < h.started < restarted_at), "no outage was observed"
        assert any(h.status != 503 for h in hits if h.finished < killed_at), "no traffic before the kill"
        after = [h for h in hits if h.started > restarted_at]
        assert after, "no traffic after the restart"
        assert all(h.status != 503 for h in after), f"not recovered: {[h for h in after if h.status == 503][:3]}"
        answers = [r for r in world.bridge.records if r.at > killed_at and r.outcome != "error"]
        assert any(r.tries == 2 for r in answers), "no answer came through CONF_TOKEN_NOT_FOUND and a re-prepare"
        assert world.bridge.prepare_count > prepares_before
        world.expect(world.clients.request("/orders/1", cert="valid"), 200)
        world.expect(world.clients.request("/orders/1"), 403, "no-cert")


class TestRunnerSigterm:
    """SIGTERM as APISIX's exit_worker sends it (SIGKILL follows after 1 s)."""

    def test_sigterm_under_load_exits_within_a_second_and_fails_closed(self, world: Stack) -> None:
        """The runner exits 0 within 1 s under load; in-flight requests get a decision or 503, never a pass."""
        with Load(world.clients, MIX) as load:
            time.sleep(0.5)
            signalled_at = time.monotonic()
            code, elapsed = world.runner.terminate(timeout=5.0)
            time.sleep(0.3)
        hits = load.stop()
        assert code == 0, f"runner exit code {code}{world.diagnostics()}"
        assert elapsed < 1.0, f"runner took {elapsed:.2f}s to exit after SIGTERM"
        assert not os.path.exists(world.runner.socket_path), "a cleanly stopped runner removes its socket"
        _assert_fail_closed(hits, world)
        before = {h.status for h in hits if h.finished < signalled_at}
        assert {200, 403} <= before, f"no decisions before SIGTERM: {before}"
        in_flight = [h for h in hits if h.started <= signalled_at <= h.finished]
        assert in_flight, "no request was in flight at SIGTERM"
        assert any(h.status == 503 for h in hits if h.started > signalled_at + elapsed), "runner still answering"
        world.runner.start()
        world.expect(world.clients.request("/orders/1", cert="valid"), 200)


class TestStaleTokensAfterRestart:
    """Conf tokens cached by APISIX workers outlive a runner process; they must never alias another route."""

    def test_stale_token_never_selects_another_routes_policy(self, two_routes: Stack) -> None:
        """After a restart, worker 1's stale token for the enforcing route is refused, not resolved to report mode."""
        world = two_routes
        world.expect(world.clients.request("/orders/1"), 403, "no-cert")  # route 1 -> token 1 (worker 1)
        world.expect(world.clients.request("/report/orders/1"), 200)  # route 2 -> token 2 (worker 1)
        world.runner.kill()
        world.runner.start()
        report_route = world.bridge.route_for("/report/")

        async def second_worker() -> str:
            # Another APISIX worker (empty token cache) serves route 2 first: the new runner issues token 1.
            async with FakeApisix(world.runner.socket_path) as worker:
                no_cert = {"scheme": "https", "ssl_client_verify": "NONE", "ssl_server_name": "a", "host": "a"}
                outcome = await worker.request(report_route.entries, key=report_route.key, vars=no_cert)
                return outcome.kind

        assert asyncio.run(second_worker()) in ("pass", "rewrite")
        # Worker 1 still caches token 1 for route 1 (APISIX flushes only when the runner answers "not found").
        world.expect(world.clients.request("/orders/1"), 403, "no-cert")
