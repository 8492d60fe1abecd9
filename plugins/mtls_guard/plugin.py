"""The runner adapter of mtls-guard: turns a compiled policy's decision into a Stop or a Rewrite.

Everything that decides lives in ``policy``; this module only fetches the variables the policy
asks for (one pipelined ExtraInfo round trip), counts, logs one line per decision and applies the
outcome. Any exception here fails the call closed (the runner answers SERVICE_UNAVAILABLE).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import partial
from typing import Any, Final, NamedTuple

from runner.errors import PluginFailure
from runner.metrics import CounterSnapshot, GaugeSnapshot
from runner.plugin import BasePlugin, HTTPRequest, HTTPResponse
from runner.protocol.codec import HTTPReqCall, fold_header_name
from runner.protocol.messages import Stop

from .exemptions import MethodTraits
from .identity import CertificateCache
from .library import PolicyLibrary
from .matchers import authority_host
from .options import load_options
from .policy import (
    METHOD_OVERRIDE_ARG,
    METHOD_OVERRIDE_HEADERS,
    CompiledPolicy,
    Decision,
    NeedVars,
    RequestInput,
    compile_policy,
)
from .revocation import NO_REVOCATION, RevocationTable

__all__ = ["DecisionCounter", "Judgement", "MtlsGuard", "decide_request", "method_traits", "read_facts"]

log = logging.getLogger("mtls_guard.decision")


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
    policy: CompiledPolicy,
    request: HTTPRequest,
    cache: CertificateCache,
    now: datetime | None = None,
    revocation: RevocationTable = NO_REVOCATION,
) -> Judgement:
    """The policy's decision for one request, fetching variables only when the policy needs them."""
    facts, spellings = read_facts(policy, request)
    when = now or datetime.now(UTC)
    values: dict[str, str | None] | None = None
    outcome = policy.decide(facts, None, now=when, cache=cache, revocation=revocation)
    if isinstance(outcome, NeedVars):
        if facts.host is None and policy.reads_host:
            # The SNI check of a protected request compares with the Host header: read it now.
            host = authority_host(request.call.header("host"))
            method, path, headers, _, traits, aliased = facts
            facts = RequestInput(method, path, headers, host, traits, aliased)  # _replace() costs ~1 µs
        values = await request.vars(*outcome.names)
        outcome = policy.decide(facts, values, now=when, cache=cache, revocation=revocation)
        if isinstance(outcome, NeedVars):  # the policy contract says this cannot happen: fail closed
            raise RuntimeError(f"policy asked for variables twice: {outcome.names}")
    deliver = facts.path if policy.engine.delivers_as_judged(facts, values) else None
    return Judgement(facts, outcome, spellings, deliver)


@dataclass(frozen=True, slots=True)
class _Serving:
    """What requests are judged with, swapped as a whole by a reconfigure's commit (one assignment)."""

    library: PolicyLibrary | None
    revocation: RevocationTable
    cache: CertificateCache


class MtlsGuard(BasePlugin[CompiledPolicy]):
    """``{"name": "mtls-guard", "value": "<JSON policy>"}`` in ext-plugin-pre-req."""

    name = "mtls-guard"
    # Its filters await only request.vars (ExtraInfo): no asyncio Task per call (runner.plugin.Plugin).
    needs_task = False

    def __init__(self) -> None:
        self._serving = _Serving(None, NO_REVOCATION, CertificateCache())
        self.decisions = DecisionCounter()
        self.observers: list[Callable[[HTTPRequest, Decision], None]] = []
        """Called after every decision (metrics, the demo); must not raise."""

    @property
    def library(self) -> PolicyLibrary | None:
        return self._serving.library

    @library.setter
    def library(self, library: PolicyLibrary | None) -> None:
        self._serving = _Serving(library, self._serving.revocation, self._serving.cache)

    @property
    def revocation(self) -> RevocationTable:
        """The runner's CRLs (crl_files): read by every decision, so a commit reaches compiled policies at once."""
        return self._serving.revocation

    @revocation.setter
    def revocation(self, revocation: RevocationTable) -> None:
        self._serving = _Serving(self._serving.library, revocation, self._serving.cache)

    @property
    def cache(self) -> CertificateCache:
        return self._serving.cache

    def setup(self, options: Mapping[str, Any]) -> None:
        self.reconfigure(options)()

    def reconfigure(self, options: Mapping[str, Any]) -> Callable[[], None]:
        """Read and validate ``options`` and every file they name (ValueError, nothing changed); the
        returned commit installs the result in one assignment and cannot fail. Decision counts and
        observers are kept; so is the certificate cache (parse results only, never revocation) unless
        its size changes, and then its hit and miss counts carry over."""
        loaded = load_options(options)
        fresh = CertificateCache(loaded.cert_cache_size)

        def commit() -> None:
            cache = self._serving.cache
            if cache.max_entries != loaded.cert_cache_size:
                fresh.hits, fresh.misses = cache.hits, cache.misses
                cache = fresh
            self._serving = _Serving(loaded.library, loaded.revocation, cache)

        return commit

    def metrics(self) -> list[CounterSnapshot | GaugeSnapshot]:
        """Decision counts and CRL state by bounded labels (runner.metrics.MetricsSource)."""
        cache, crls, now = self.cache, self.revocation.crls, datetime.now(UTC)
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
                {("hit",): cache.hits, ("miss",): cache.misses},
            ),
            GaugeSnapshot(
                "mtls_guard_crl_next_update_seconds",
                "Seconds until a CRL's nextUpdate (negative: stale), by issuer CN and CRL file",
                ("issuer", "crl"),
                {(i.issuer, i.label): (i.next_update - now).total_seconds() for i in crls if i.next_update},
                merge="min",
            ),
            GaugeSnapshot(
                "mtls_guard_crl_entries",
                "Revoked certificates listed by a CRL in use, by issuer CN and CRL file",
                ("issuer", "crl"),
                {(i.issuer, i.label): float(i.entries) for i in crls},
                merge="max",
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
        serving = self._serving  # one consistent state for the whole request, even across a reload
        judged = await decide_request(conf, request, serving.cache, revocation=serving.revocation)
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
