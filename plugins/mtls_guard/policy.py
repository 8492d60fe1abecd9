"""Compile a policy once into an immutable ``CompiledPolicy``; the per-request entry points live on it.

``compile_policy`` accepts the route's conf (JSON text or an already-parsed mapping), resolves a named
policy from the policy file, validates (``schema``), and builds every matcher, bundle, response body and
variable tuple up front so that ``decide`` does no configuration work per request.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Final

from runner.protocol.codec import fold_header_name

from .decision import VAR_ORDER, Decision, Engine, IdentityChecks, NeedVars, Reason, RequestInput
from .exemptions import ExemptMatcher, ExemptRuleSpec
from .forwarded import build_xfcc
from .identity import CertificateCache, ClientCertificate
from .library import PolicyLibrary
from .matchers import DomainSet, SanMatcher
from .policy_config import HOST_MISMATCH_STATUS, ExemptRule, HeaderSource, Mode, PolicyConfig
from .revocation import NO_REVOCATION, RevocationTable
from .schema import parse_policy
from .schema_readers import PolicyError
from .trust import TrustBundle

__all__ = [
    "REASON_HEADER",
    "CompiledPolicy",
    "Decision",
    "NeedVars",
    "Reason",
    "RequestInput",
    "compile_policy",
    "load_json",
]

REASON_HEADER: Final = "x-mtls-guard-reason"
FORWARD_MEMO_ENTRIES: Final = 1024
# TLS or not follows from ssl_client_verify (decision.is_tls) and the Host comes with the call itself
# (decision.RequestInput.host), so neither "scheme" nor "host" is ever asked: at most three variables.
_APISIX_VARS: Final = frozenset({"ssl_client_verify", "ssl_client_escaped_cert"})
_SNI_VARS: Final = frozenset({"ssl_server_name"})
# Header mode checks neither scheme nor Host/SNI (TLS ended at the front proxy): only the peer matters.
_HEADER_VARS: Final = frozenset({"realip_remote_addr"})
# What a host exemption needs to bind the Host header to the routing and the connection (decision.host_binds).
_HOST_RULE_VARS: Final = frozenset({"ssl_client_verify", "ssl_server_name", "host"})
_PATH_ORIGIN_VARS: Final = frozenset({"upstream_uri"})
# Method-override headers honoured by common frameworks (Express method-override, Rails, Laravel,
# Symfony, Spring's HiddenHttpMethodFilter reads _method): folded names (schema.fold_name).
METHOD_OVERRIDE_HEADERS: Final = frozenset({b"x-http-method-override", b"x-http-method", b"x-method-override"})
METHOD_OVERRIDE_ARG: Final = "_method"
Response = tuple[int, tuple[tuple[str, str], ...], bytes]


def _folded(names: frozenset[str]) -> frozenset[bytes]:
    return frozenset(fold_header_name(n.encode("ascii")) for n in names)


def _ordered(names: frozenset[str]) -> NeedVars:
    return NeedVars(tuple(n for n in VAR_ORDER if n in names))


def _no_duplicates(pairs: list[tuple[str, object]]) -> dict[str, object]:
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            # Two JSON parsers could disagree on which copy wins; refuse instead of picking one.
            raise PolicyError("", f"duplicate key {key!r}")
        out[key] = value
    return out


def _no_constants(name: str) -> object:
    raise PolicyError("", f"invalid JSON: {name} is not allowed")


def load_json(text: str) -> object:
    """Parse a route's JSON conf; syntax errors carry line and column. Blank text is ``{}``."""
    if not text.strip():
        return {}
    try:
        return json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constants)
    except json.JSONDecodeError as exc:
        raise PolicyError("", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def _escape_list_value(value: str) -> str:
    # "," separates entries and control characters would corrupt the header: percent-encode both.
    return "".join(f"%{ord(c):02X}" if c in ",%" or not " " <= c <= "~" else c for c in value)


def san_header_value(cert: ClientCertificate) -> str:
    """Typed, comma-joined SAN list, e.g. ``DNS:a.example,URI:spiffe://example.org/x,email:a@b,IP:10.0.0.1``."""
    typed = (("DNS", cert.san_dns), ("URI", cert.san_uri), ("email", cert.san_email), ("IP", cert.san_ip))
    return ",".join(f"{kind}:{_escape_list_value(v)}" for kind, values in typed for v in values)


@dataclass(frozen=True, slots=True)
class CompiledPolicy:
    """An immutable, ready-to-run policy. Build it with ``compile_policy``."""

    config: PolicyConfig
    engine: Engine
    responses: Mapping[Reason, Response]
    forward_names: frozenset[str]
    source_names: frozenset[str] = frozenset()  # header mode: the forwarded-certificate headers
    # Deleted, under every spelling an upstream could fold into them, from every request that has
    # them: folded once here (codec.fold_header_name), looked up per request by HTTPReqCall.header_spellings.
    strip_folded: frozenset[bytes] = field(init=False)
    source_folded: frozenset[bytes] = field(init=False)
    # Certificate fingerprint -> its rendered identity headers (upstream_headers); a bounded cache.
    forward_memo: dict[str, tuple[tuple[str, str | None], ...]] = field(
        default_factory=dict, init=False, compare=False, repr=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "strip_folded", _folded(self.forward_names | self.source_names))
        object.__setattr__(self, "source_folded", _folded(self.source_names))

    @property
    def header_mode(self) -> bool:
        return self.engine.header_source is not None

    @property
    def reads_host(self) -> bool:
        """Whether decisions read the Host header (host rules, or the SNI check of protected requests)."""
        return self.engine.exempt.has_host_rules or (self.engine.require_sni_match and not self.header_mode)

    def decide(
        self,
        request: RequestInput,
        vars: Mapping[str, str | None] | None,
        *,
        now: datetime,
        cache: CertificateCache,
        revocation: RevocationTable = NO_REVOCATION,
    ) -> Decision | NeedVars:
        """Decide for one request; call first with ``vars=None``, then again with the requested vars.

        ``revocation`` is the runner's CRL table (the plugin's current one, swapped on reload): passed per
        call rather than compiled in, so that policies compiled earlier see new CRLs at once."""
        return self.engine.decide(request, vars, now=now, cache=cache, revocation=revocation)

    def reject_response(self, decision: Decision) -> Response:
        """(status, headers, body) for a denied decision; the reason is shown only with expose_reason."""
        if decision.allowed:
            raise ValueError("reject_response() called for a request that is allowed")
        return self.responses[decision.reason]

    def upstream_headers(self, decision: Decision, present: Sequence[str]) -> tuple[tuple[str, str | None], ...]:
        """Header changes for the upstream: deletions (value None) first, then identity headers.

        ``present`` lists every spelling of the identity and certificate headers the request carries
        (``HTTPReqCall.header_spellings(strip_folded)``): each is deleted on every request, exempt and
        report-mode ones included, because APISIX deletes names exactly and an upstream that folds
        ``_`` into ``-`` would read ``x_client_subject`` as ``x-client-subject``. In header mode the
        forwarded-certificate headers (``source.header``, ``source.chain_header``) are deleted on every
        request too, verified ones included: the upstream cannot tell a proxy's header from a client's,
        so it must never see one it might trust. Identity headers are set only for an "allow" verdict
        with a certificate: in report mode a certificate that failed the checks is let through but
        never vouched for.
        """
        deletions = tuple((name, None) for name in present)
        cert = decision.identity
        if decision.verdict != "allow" or not decision.allowed or cert is None or not self.forward_names:
            return deletions
        # Rendering DNs and SAN lists is the costliest part of a verified request: once per certificate.
        identity = self.forward_memo.get(cert.fingerprint_sha256)
        if identity is None:
            identity = self._identity_headers(cert)
            if len(self.forward_memo) >= FORWARD_MEMO_ENTRIES:
                self.forward_memo.clear()
            self.forward_memo[cert.fingerprint_sha256] = identity
        return deletions + identity

    def _identity_headers(self, cert: ClientCertificate) -> tuple[tuple[str, str | None], ...]:
        fwd = self.config.forward
        headers: list[tuple[str, str | None]] = []
        if fwd.subject:
            headers.append((fwd.subject, cert.subject.rfc4514(ascii_only=True)))
        if fwd.san:
            headers.append((fwd.san, san_header_value(cert)))
        if fwd.fingerprint:
            headers.append((fwd.fingerprint, cert.fingerprint_sha256))
        if fwd.xfcc:
            headers.append((fwd.xfcc, build_xfcc(cert)))
        return tuple(headers)

    def describe(self) -> str:
        """Human-readable explanation of the policy (``mtls-guard check``)."""
        return describe_policy(self.config)


def _bundle_text(bundle: TrustBundle) -> str:
    subjects = "; ".join(a.subject.rfc4514(ascii_only=True) for a in bundle.anchors)
    return f"{len(bundle.anchors)} CA certificate(s): {subjects}"


def _describe_rule(index: int, rule: ExemptRule) -> str:
    conditions = []
    if rule.path is not None:
        conditions.append(f"path full-matches {rule.path!r}")
    if rule.preflight:
        conditions.append("a CORS preflight (OPTIONS with Origin and Access-Control-Request-Method)")
    elif rule.methods is not None:
        conditions.append("method is " + "|".join(sorted(rule.methods)))
    if rule.hosts is not None:
        conditions.append("Host is " + "|".join(rule.hosts) + " (over HTTPS only if the TLS SNI names it too)")
    return f"  {index + 1}. [{rule.id}] " + " AND ".join(conditions)


def describe_policy(config: PolicyConfig) -> str:
    """Multi-line explanation of what ``config`` enforces, in evaluation order."""
    lines = [f"policy: {config.name or '(inline route policy)'}"]
    if config.mode is Mode.REPORT:
        lines.append("mode: report -- decisions are logged, but denied requests are LET THROUGH")
    else:
        lines.append(f"mode: enforce -- denied requests get {config.reject.status} (421 on Host/SNI mismatch)")
    lines.append("exempt without a certificate (first matching rule wins):")
    lines.extend(_describe_rule(i, r) for i, r in enumerate(config.exempt))
    if not config.exempt:
        lines.append("  (no rules: every request needs a certificate)")
    lines.append("  paths with .., //, ;, backslash, control characters or a literal % (sent as %25) are never exempt")
    lines.append("  rules naming methods never apply with a method-override header, a _method argument or a POST form")
    lines.append("  the upstream receives the path that was judged (Rewrite path; the query is kept as sent)")
    lines.append("every other request needs:")
    source = config.source
    if isinstance(source, HeaderSource):
        nets = ", ".join(str(n) for n in source.trusted_proxies)
        lines.append(f"  - a direct peer (realip_remote_addr) inside {nets}, else 'untrusted-proxy'")
        chain = f" (+ chain header {source.chain_header!r})" if source.chain_header else ""
        lines.append(f"  - a certificate in header {source.header!r} ({source.format.value}){chain}")
        lines.append(f"  - re-verified against the source CA bundle: {_bundle_text(source.ca)}")
    else:
        lines.append("  - https (plain http is denied)")
        if config.require_sni_match:
            lines.append("  - TLS SNI equal to Host, else 421 Misdirected Request")
        lines.append("  - a client certificate verified by APISIX (ssl_client_verify=SUCCESS)")
    lines.append("  - certificate valid now (re-checked on every request)")
    req = config.require
    if req.ca is not None:
        lines.append(f"  - chaining to the route CA bundle: {_bundle_text(req.ca)}")
    if req.crl is not None:
        lines.extend(f"  - not revoked by route CRL {info.describe(datetime.now(UTC))}" for info in req.crl.crls)
    lines.append("  - not revoked by the runner's CRLs (crl_files), where it has one for the issuer")
    if req.fingerprints is not None:
        lines.append("  - SHA-256 fingerprint one of: " + ", ".join(sorted(req.fingerprints)))
    if req.san is not None:
        pats = [f"DNS {d}" for d in req.san.dns] + [f"URI {u.text()}" for u in req.san.uri]
        pats += [f"email {e.text()}" for e in req.san.email]
        lines.append("  - a SAN matching one of: " + ", ".join(pats))
    for label, name_req in (("subject", req.subject), ("issuer", req.issuer)):
        for attribute, values in name_req.attributes if name_req is not None else ():
            lines.append(f"  - {label} {attribute} one of: " + ", ".join(repr(v) for v in sorted(values)))
    reject = config.reject
    exposed = "with" if reject.expose_reason else "without"
    lines.append(f"rejections: {reject.content_type!r} body, {exposed} the reason ({REASON_HEADER})")
    names = config.forward.names()
    if names:
        fwd = config.forward
        sent = [
            f"{k} -> {v}"
            for k, v in (
                ("subject", fwd.subject),
                ("san", fwd.san),
                ("fingerprint", fwd.fingerprint),
                ("xfcc", fwd.xfcc),
            )
            if v
        ]
        lines.append("forwarded to the upstream on verified requests: " + ", ".join(sent))
        lines.append("  inbound copies of " + ", ".join(names) + " are always removed")
    if isinstance(source, HeaderSource):
        # Stated outright: operators used to proxies that pass XFCC on may expect the upstream to get it.
        cert_headers = ", ".join(n for n in (source.header, source.chain_header) if n)
        lines.append(f"certificate headers removed from every request, verified ones too: {cert_headers}")
        lines.append("  (the upstream gets the verified identity only through forward headers)")
    return "\n".join(lines)


def _build_responses(config: PolicyConfig) -> Mapping[Reason, Response]:
    reject = config.reject
    out: dict[Reason, Response] = {}
    for reason in Reason:
        status = HOST_MISMATCH_STATUS if reason is Reason.HOST_MISMATCH else reject.status
        headers: tuple[tuple[str, str], ...] = (("content-type", reject.content_type),)
        body = reject.body
        if reject.expose_reason:
            headers += ((REASON_HEADER, reason.value),)
            body += ("" if not body or body.endswith("\n") else "\n") + f"reason: {reason.value}\n"
        out[reason] = (status, headers, body.encode("utf-8"))
    return MappingProxyType(out)


def build(config: PolicyConfig) -> CompiledPolicy:
    """Compile a validated configuration."""
    source = config.source if isinstance(config.source, HeaderSource) else None
    try:
        exempt = ExemptMatcher.of(
            ExemptRuleSpec(r.id, r.path, r.methods, DomainSet.of(r.hosts) if r.hosts is not None else None, r.preflight)
            for r in config.exempt
        )
    except ValueError as exc:
        raise PolicyError("exempt", str(exc)) from None
    req = config.require
    checks = IdentityChecks(
        ca=req.ca,
        crl=req.crl,
        fingerprints=req.fingerprints,
        san=SanMatcher.of(req.san.dns, req.san.uri, req.san.email) if req.san is not None else None,
        subject=req.subject.attributes if req.subject is not None else (),
        issuer=req.issuer.attributes if req.issuer is not None else (),
    )
    if source is not None:
        protected = _HEADER_VARS
    else:
        protected = _APISIX_VARS | (_SNI_VARS if config.require_sni_match else frozenset())
    proxies = source.trusted_proxies if source is not None else ()
    engine = Engine(
        mode=config.mode,
        exempt=exempt,
        checks=checks,
        header_source=source,
        require_sni_match=config.require_sni_match,
        reject_status=config.reject.status,
        need_protected=_ordered(protected),
        need_sni_check=_ordered(protected | _HOST_RULE_VARS),
        need_path_origin=_ordered(
            protected | _PATH_ORIGIN_VARS | (_HOST_RULE_VARS if exempt.has_host_rules else frozenset())
        ),
        exempt_decisions=MappingProxyType(
            {r.id: Decision(True, "allow", Reason.EXEMPT, r.id, config.mode, 0) for r in config.exempt}
        ),
        trusted_v4=tuple(n for n in proxies if n.version == 4),
        trusted_v6=tuple(n for n in proxies if n.version == 6),
    )
    source_names = frozenset(n for n in (source.header, source.chain_header) if n) if source else frozenset()
    return CompiledPolicy(config, engine, _build_responses(config), frozenset(config.forward.names()), source_names)


def compile_policy(value: str | Mapping[str, object], library: PolicyLibrary | None = None) -> CompiledPolicy:
    """Route conf (JSON text or mapping) -> CompiledPolicy; raises PolicyError with the key path."""
    data = load_json(value) if isinstance(value, str) else value
    if not isinstance(data, Mapping):
        raise PolicyError("", "the policy must be a JSON object")
    name: str | None = None
    if "policy" in data:
        if library is None:
            raise PolicyError("policy", "named policies need a policy file, and none is configured")
        data, name = library.resolve(data)
    return build(parse_policy(data, name=name))
