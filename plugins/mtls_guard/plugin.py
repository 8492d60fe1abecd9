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
from functools import partial
from typing import Any, Final, NamedTuple

from runner.errors import PluginFailure
from runner.metrics import CounterSnapshot
from runner.plugin import BasePlugin, HTTPRequest, HTTPResponse
from runner.protocol.codec import HTTPReqCall, fold_header_name
from runner.protocol.messages import Stop

from .exemptions import MethodTraits
from .identity import CertificateCache
from .library import PolicyLibrary
from .matchers import authority_host
from .policy import (
    METHOD_OVERRIDE_ARG,
    METHOD_OVERRIDE_HEADERS,
    CompiledPolicy,
    Decision,
    NeedVars,
    RequestInput,
    compile_policy,
)
from .schema import PolicyError

__all__ = ["DecisionCounter", "Judgement", "MtlsGuard", "decide_request", "method_traits", "read_facts"]

log = logging.getLogger("mtls_guard.decision")

_OPTIONS = frozenset({"policy_file", "cert_cache_size"})


class DecisionCounter(Counter[tuple[str, str, str]]):
    """Decisions by (verdict, reason, mode): bounded labels, safe for metrics."""

    def record(self, decision: Decision) -> None:
        # Reason and Mode are StrEnums: equal to, and hashed like, their values, without a str() per request.
        self[(decision.verdict, decision.reason, decision.mode)] += 1


class Judgement(NamedTuple):
    """One request as judged: the facts read from the call, the decision, and what delivery needs."""

    facts: RequestInput
    decision: Decision
    spellings: tuple[str, ...]  # every spelling present of the identity/certificate headers (all deleted)
    deliver_path: str | None  # the path the upstream must receive (a Rewrite), or None to leave it


_FORM_TYPES: Final = ("application/x-www-form-urlencoded", "multipart/form-data")


def _mentions_override(text: str) -> bool:
    # APISIX splits the query on "&" only; an upstream that also splits on ";" reads "?a=1;_method=DELETE"
    # as a _method argument, and a double-decoding one reads "%5Fmethod". Any mention defeats method rules.
    lowered = text.lower()
    return METHOD_OVERRIDE_ARG in lowered or "%5fmethod" in lowered


def _may_override(folded_frame: bytes) -> bool:
    """Prefilter on the folded frame (codec fold_header_name: "_" reads as "-"): every override header
    name and every mention of "_method" or "%5fmethod" leaves "-method" or "%5fmethod" there. No
    character outside ASCII lower-cases to one of their letters, so str.lower() in _mentions_override
    finds nothing this misses. One scan for "method" in the common case (an alternation is slower)."""
    return b"method" in folded_frame and (b"-method" in folded_frame or b"%5fmethod" in folded_frame)


def method_traits(call: HTTPReqCall, method: str) -> MethodTraits:
    """Whether the upstream may act on another method than the one judged (a method-override header in
    any spelling, a ``_method`` argument, or a POST form body: Rails, Laravel and Symfony read
    ``_method`` from forms), and whether the request is a real CORS preflight."""
    overridden = _may_override(call.folded_frame) and (
        bool(call.header_spellings(METHOD_OVERRIDE_HEADERS))
        or any(
            _mentions_override(name) or (value is not None and _mentions_override(value)) for name, value in call.args
        )
    )
    if not overridden and method == "POST":
        overridden = (call.header("content-type") or "").lower().startswith(_FORM_TYPES)
    preflight = (
        method == "OPTIONS"
        and call.header("origin") is not None
        and call.header("access-control-request-method") is not None
    )
    return MethodTraits(overridden, preflight)


def read_facts(policy: CompiledPolicy, request: HTTPRequest) -> tuple[RequestInput, tuple[str, ...]]:
    """What the decision needs from the call itself, reading only what this policy uses: the Host
    only for host rules (the protected phase adds it, see decide_request), method traits only when a
    rule naming methods could apply."""
    call = request.call
    method = request.method
    spellings = call.header_spellings(policy.strip_folded)
    facts = RequestInput(
        method=method,
        path=request.path,
        host=authority_host(call.header("host")) if policy.engine.exempt.has_host_rules else None,
        # Decoding all headers is the costliest part of reading a request: header mode only.
        headers=call.headers if policy.header_mode else (),
        method_traits=partial(method_traits, call, method),
        aliased_source=bool(spellings)
        and any(
            n.lower() not in policy.source_names
            and fold_header_name(n.encode("utf-8", "surrogateescape")) in policy.source_folded
            for n in spellings
        ),
    )
    return facts, spellings


async def decide_request(
    policy: CompiledPolicy, request: HTTPRequest, cache: CertificateCache, now: datetime | None = None
) -> Judgement:
    """The policy's decision for one request, fetching variables only when the policy needs them."""
    facts, spellings = read_facts(policy, request)
    when = now or datetime.now(UTC)
    values: dict[str, str | None] | None = None
    outcome = policy.decide(facts, None, now=when, cache=cache)
    if isinstance(outcome, NeedVars):
        if facts.host is None and policy.reads_host:
            # The SNI check of a protected request compares with the Host header: read it now.
            host = authority_host(request.call.header("host"))
            method, path, headers, _, traits, aliased = facts
            facts = RequestInput(method, path, headers, host, traits, aliased)  # _replace() costs ~1 µs
        values = await request.vars(*outcome.names)
        outcome = policy.decide(facts, values, now=when, cache=cache)
        if isinstance(outcome, NeedVars):  # the policy contract says this cannot happen: fail closed
            raise RuntimeError(f"policy asked for variables twice: {outcome.names}")
    deliver = facts.path if policy.engine.delivers_as_judged(facts, values) else None
    return Judgement(facts, outcome, spellings, deliver)


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
        judged = await decide_request(conf, request, self.cache)
        decision = judged.decision
        request.state["mtls_guard.decision"] = decision
        self.decisions.record(decision)
        _log_decision(request, decision)
        for observe in self.observers:
            observe(request, decision)
        if not decision.allowed:
            status, headers, body = conf.reject_response(decision)
            return Stop(status, headers, body)
        if judged.deliver_path is not None:
            # Without it nginx proxies the client's raw request-target, which is not the $uri judged
            # (/admin/..%2Fpublic/x is judged as /public/x): SECURITY.md "The path judged is the path delivered".
            request.set_path(judged.deliver_path, literal_question_mark=True)
        for name, value in conf.upstream_headers(decision, judged.spellings):
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
