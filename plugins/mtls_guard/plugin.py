"""The runner adapter of mtls-guard: turns a compiled policy's decision into a Stop or a Rewrite.

Everything that decides lives in ``policy``; this module only fetches the variables the policy
asks for (one pipelined ExtraInfo round trip), counts, logs one line per decision and applies the
outcome. Any exception here fails the call closed (the runner answers SERVICE_UNAVAILABLE).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from runner.errors import PluginFailure
from runner.metrics import CounterSnapshot
from runner.plugin import BasePlugin, HTTPRequest, HTTPResponse
from runner.protocol.messages import Stop

from .identity import CertificateCache
from .library import PolicyLibrary
from .policy import CompiledPolicy, Decision, NeedVars, RequestInput, compile_policy
from .schema import PolicyError

__all__ = ["DecisionCounter", "MtlsGuard", "decide_request"]

log = logging.getLogger("mtls_guard.decision")

_OPTIONS = frozenset({"policy_file", "cert_cache_size"})


class DecisionCounter(Counter[tuple[str, str, str]]):
    """Decisions by (verdict, reason, mode): bounded labels, safe for metrics."""

    def record(self, decision: Decision) -> None:
        self[(decision.verdict, str(decision.reason), str(decision.mode))] += 1


async def decide_request(
    policy: CompiledPolicy, request: HTTPRequest, cache: CertificateCache, now: datetime | None = None
) -> tuple[RequestInput, Decision]:
    """The policy's decision for one request, fetching variables only when the policy needs them."""
    # Decoding all headers is the costliest part of reading a request; only a policy that strips
    # identity headers or reads a forwarded certificate (header mode) needs them.
    headers = request.call.headers if policy.strip_names else ()
    facts = RequestInput(method=request.method, path=request.path, headers=headers)
    when = now or datetime.now(UTC)
    outcome = policy.decide(facts, None, now=when, cache=cache)
    if isinstance(outcome, NeedVars):
        values = await request.vars(*outcome.names)
        outcome = policy.decide(facts, values, now=when, cache=cache)
        if isinstance(outcome, NeedVars):  # the policy contract says this cannot happen: fail closed
            raise RuntimeError(f"policy asked for variables twice: {outcome.names}")
    return facts, outcome


class MtlsGuard(BasePlugin[CompiledPolicy]):
    """``{"name": "mtls-guard", "value": "<JSON policy>"}`` in ext-plugin-pre-req."""

    name = "mtls-guard"

    def __init__(self) -> None:
        self.library: PolicyLibrary | None = None
        self.cache = CertificateCache()
        self.decisions = DecisionCounter()
        self.observers: list[Callable[[HTTPRequest, Decision], None]] = []
        """Called after every decision (metrics, the demo); must not raise."""

    def setup(self, options: Mapping[str, Any]) -> None:
        unknown = sorted(set(options) - _OPTIONS)
        if unknown:
            raise ValueError(f"unknown mtls-guard option(s): {', '.join(unknown)}")
        size = options.get("cert_cache_size", 4096)
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError("cert_cache_size must be a positive integer")
        self.cache = CertificateCache(size)
        policy_file = options.get("policy_file")
        if policy_file is not None:
            try:
                self.library = PolicyLibrary.from_yaml_file(str(policy_file))
            except PolicyError as exc:
                raise ValueError(f"policy file {policy_file}: {exc}") from exc

    def metrics(self) -> list[CounterSnapshot]:
        """Decision counts by bounded labels (runner.metrics.MetricsSource)."""
        return [
            CounterSnapshot(
                "mtls_guard_decisions",
                "mtls-guard decisions by verdict, reason and mode",
                ("verdict", "reason", "mode"),
                {labels: float(n) for labels, n in self.decisions.items()},
            ),
            CounterSnapshot(
                "mtls_guard_certificate_parses",
                "Client certificate cache lookups by result",
                ("result",),
                {("hit",): self.cache.hits, ("miss",): self.cache.misses},
            ),
        ]

    def parse_conf(self, value: str) -> CompiledPolicy:
        return compile_policy(value, self.library)

    async def on_response(self, conf: CompiledPolicy, response: HTTPResponse) -> None:
        """Attached to ext-plugin-post-resp, the request has already reached the upstream: nothing
        can be protected any more. Fail every such call (503) so the mistake cannot go unnoticed,
        instead of silently letting responses through as a no-op would."""
        raise PluginFailure(
            "mtls-guard runs in ext-plugin-pre-req (or post-req), not ext-plugin-post-resp: "
            "by then the request has reached the upstream"
        )

    async def on_request(self, conf: CompiledPolicy, request: HTTPRequest) -> Stop | None:
        facts, decision = await decide_request(conf, request, self.cache)
        request.state["mtls_guard.decision"] = decision
        self.decisions.record(decision)
        _log_decision(request, decision)
        for observe in self.observers:
            observe(request, decision)
        if not decision.allowed:
            status, headers, body = conf.reject_response(decision)
            return Stop(status, headers, body)
        for name, value in conf.upstream_headers(decision, facts.headers):
            if value is None:
                request.delete_header(name)
            else:
                request.set_header(name, value)
        return None


def _log_decision(request: HTTPRequest, decision: Decision) -> None:
    would_deny = decision.verdict == "deny" and decision.allowed
    forged = decision.detail == "forged-header"
    level = logging.WARNING if would_deny or forged else logging.INFO
    if not log.isEnabledFor(level):
        return
    log.log(
        level,
        "event=decision verdict=%s allowed=%s reason=%s detail=%r mode=%s status=%d method=%s path=%r token=%d id=%d",
        decision.verdict,
        "yes" if decision.allowed else "no",
        decision.reason,
        decision.detail,
        decision.mode,
        decision.status,
        request.method,
        (request.path or "")[:256],
        request.conf_token,
        request.id,
    )
