"""The per-request decision: exempt or protected, and for protected requests whether the certificate holds.

Pure and synchronous: inputs are the request, the nginx variables fetched so far and the clock; the
output is a ``Decision`` or a ``NeedVars`` asking for exactly the variables still required (fetched by
the caller in one ExtraInfo round trip). Everything configurable was compiled beforehand; a missing
variable is treated as absent, never as success.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final, Literal, NamedTuple

from .exemptions import CompiledRule, ExemptMatcher, MethodTraits, plain_method, select
from .forwarded import parse_forwarded
from .identity import CertificateCache, CertificateError, ClientCertificate, load_pem, unescape_nginx
from .matchers import SanMatcher, normalize_host
from .paths import exempt_path
from .policy_config import HOST_MISMATCH_STATUS, HeaderSource, IPNetwork, Mode
from .reasons import Reason
from .revocation import NO_REVOCATION, RevocationTable, first_problem
from .trust import TrustBundle

__all__ = [
    "Decision",
    "Engine",
    "IdentityChecks",
    "NeedVars",
    "Reason",
    "RequestInput",
    "host_binds",
    "is_tls",
    "sanitize_detail",
    "sni_matches_host",
]

MAX_DETAIL: Final = 80
IDENTITY_MEMO_ENTRIES: Final = 4096
# Engine.verified_memo holds certificates (a few KB each) per policy: kept small, the hot ones repeat.
VERIFIED_MEMO_ENTRIES: Final = 256
# Engine._candidates' memo, shared by every compiled policy of the process: a pure function's cache,
# bounded in entries and in the length of the paths it keeps.
MEMO_ENTRIES: Final = 8192
MEMO_MAX_PATH: Final = 512
_MEMO: dict[tuple[int, str, str | None, bool], tuple[Engine, tuple[CompiledRule, ...]]] = {}
# The order variables are requested in; also the order NeedVars lists them.
VAR_ORDER: Final = (
    "ssl_client_verify",
    "ssl_client_escaped_cert",
    "ssl_server_name",
    "host",
    "upstream_uri",
    "realip_remote_addr",
)
# Cache keys are namespaced per parse function (identity.CertificateCache requires it).
_ESCAPED_KEY: Final = "nginx-escaped:"


class RequestInput(NamedTuple):
    """What the decision reads from the HTTPReqCall itself (no variable round trip needed).

    A NamedTuple rather than a frozen dataclass: one is built per request, and this is ~4x cheaper.
    """

    method: str
    path: str | None
    headers: tuple[tuple[str, str | None], ...] = ()  # header mode only: lower-case names, repeats allowed
    # The Host header as APISIX passes it on: ext-plugin init.lua build_headers() replaces the "host"
    # entry's value with $upstream_host, which ngx_tpl.lua sets to $http_host and nothing changes
    # before ext-plugin-pre-req. So this is the Host the upstream receives; normalised, port removed
    # (matchers.authority_host).
    host: str | None = None
    # Read only when a rule naming methods could exempt the request (it costs a header scan).
    method_traits: Callable[[], MethodTraits] = plain_method
    aliased_source: bool = False  # header mode: a certificate header sent under another spelling


@dataclass(frozen=True, slots=True)
class NeedVars:
    names: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    verdict: Literal["allow", "deny"]
    reason: Reason
    detail: str  # bounded printable ASCII; never certificate contents or full DNs
    mode: Mode
    status: int  # 0 when allowed (report mode included)
    identity: ClientCertificate | None = field(default=None, compare=False)


def sanitize_detail(text: str, limit: int = MAX_DETAIL) -> str:
    """Printable ASCII only, bounded: details end up in logs and, optionally, response headers."""
    return "".join(c if " " <= c <= "~" else "?" for c in text[:limit])


def _parse_escaped(key: str) -> ClientCertificate:
    return load_pem(unescape_nginx(key[len(_ESCAPED_KEY) :]))


@dataclass(frozen=True, slots=True)
class IdentityChecks:
    """require.*: checked in a fixed order so that the reported reason is deterministic."""

    ca: TrustBundle | None = None
    crl: RevocationTable | None = None  # require.crl: the route's own CRLs, verified against ``ca``
    fingerprints: frozenset[str] | None = None
    san: SanMatcher | None = None
    subject: tuple[tuple[str, frozenset[str]], ...] = ()
    issuer: tuple[tuple[str, frozenset[str]], ...] = ()

    # Certificate fingerprint -> the outcome of the checks that do not depend on the time (a bounded cache).
    memo: dict[str, tuple[Reason, str] | None] = field(default_factory=dict, compare=False, repr=False)

    def check(
        self, cert: ClientCertificate, now: datetime, revocation: RevocationTable = NO_REVOCATION
    ) -> tuple[Reason, str] | None:
        # Re-checked on every request: a resumed TLS session must not keep an expired cert alive.
        validity = cert.validity_at(now)
        if validity == "expired":
            return Reason.EXPIRED, ""
        if validity == "not-yet-valid":
            return Reason.NOT_YET_VALID, ""
        # Revocation is never memoised (only the path is): a CRL installed or gone stale applies at once.
        if self.ca is not None:
            # $ssl_client_escaped_cert is the leaf only: the route bundle must hold its issuer.
            problem, path = self.ca.verify_path(cert, (), now=now)
            if problem is not None:
                return Reason.CA_MISMATCH, problem
            revoked = self.crl.check_path(path, now, revocation.allow_stale) if self.crl is not None else None
            if revocation.active:
                revoked = first_problem(revoked, revocation.check_path(path, now, revocation.allow_stale))
            if revoked is not None:
                return revoked
        elif revocation.active and (revoked := revocation.check_leaf(cert, now, revocation.allow_stale)):
            return revoked
        key = cert.fingerprint_sha256
        try:
            return self.memo[key]
        except KeyError:
            pass
        outcome = self._identity(cert)
        if len(self.memo) >= IDENTITY_MEMO_ENTRIES:
            self.memo.clear()
        self.memo[key] = outcome
        return outcome

    def _identity(self, cert: ClientCertificate) -> tuple[Reason, str] | None:
        """Fingerprint, SAN, subject and issuer: functions of the certificate alone."""
        if self.fingerprints is not None and cert.fingerprint_sha256 not in self.fingerprints:
            return Reason.FINGERPRINT_MISMATCH, ""
        if self.san is not None and not self.san.matches(cert.san_dns, cert.san_uri, cert.san_email):
            return Reason.IDENTITY_MISMATCH, "san"
        for label, name, constraints in (("subject", cert.subject, self.subject), ("issuer", cert.issuer, self.issuer)):
            for attribute, accepted in constraints:
                # Parsed attribute values, never DN strings: renderings differ between producers.
                if accepted.isdisjoint(name.values(attribute)):
                    return Reason.IDENTITY_MISMATCH, f"{label}.{attribute}"
        return None


def _peer_trusted(value: str | None, v4: tuple[IPNetwork, ...], v6: tuple[IPNetwork, ...]) -> bool:
    if not value:
        return False
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is None:
            return any(address in net for net in v6)
        address = mapped
    return any(address in net for net in v4)


def is_tls(vars: Mapping[str, str | None]) -> bool:
    """Whether the request came over TLS, from ``ssl_client_verify`` alone (saves the ``scheme`` variable).

    nginx's ssl variables report "not found" on a plain connection and ``ssl_client_verify`` is set on
    every TLS one ("NONE" without a certificate): src/http/modules/ngx_http_ssl_module.c,
    ngx_http_ssl_variable() and ngx_http_ssl_client_verify() both test ``r->connection->ssl`` first.
    APISIX's ExtraInfo Var then sends no result (apisix/plugins/ext-plugin/init.lua,
    handle_extra_info: ``if res then ... end``), which reads as None here.
    """
    return vars.get("ssl_client_verify") is not None


def sni_matches_host(host: str | None, vars: Mapping[str, str | None]) -> bool:
    """Over TLS, whether the SNI the handshake was made for names the Host header (the Host the
    upstream receives). Over plain HTTP there is nothing to compare: True (see SECURITY.md)."""
    if not is_tls(vars):
        return True
    sni = vars.get("ssl_server_name")
    return sni is not None and host is not None and normalize_host(sni) == host


def host_binds(host: str | None, vars: Mapping[str, str | None]) -> bool:
    """Whether a host exemption may believe the Host header: it must also be the host APISIX routed
    on (nginx's ``$host``, which an absolute-form request line overrides: apisix/http/route.lua
    matches ``ctx.var.host``), and over TLS the SNI must name it."""
    routed = vars.get("host")
    if routed is None or host is None or normalize_host(routed) != host:
        return False
    return sni_matches_host(host, vars)


def _already_encoded(raw: str | None, vars: Mapping[str, str | None] | None) -> bool:
    """Whether ``raw`` is an ``$upstream_uri`` an earlier plugin set (delivered as is, still encoded)
    rather than ``$uri``. Only a path holding "%" can tell the two apart, and it always fetches
    ``upstream_uri`` (APISIX's ngx_tpl.lua sets it to '' until a plugin rewrites the path)."""
    return raw is not None and "%" in raw and vars is not None and bool(vars.get("upstream_uri"))


@dataclass(frozen=True, slots=True)
class Engine:
    """Compiled decision procedure for one policy (built by policy.compile_policy)."""

    mode: Mode
    exempt: ExemptMatcher
    checks: IdentityChecks
    header_source: HeaderSource | None
    require_sni_match: bool
    reject_status: int
    need_protected: NeedVars
    need_sni_check: NeedVars  # protected + what a host rule needs to bind the Host ($host, SNI)
    need_path_origin: NeedVars  # a path holding "%": protected + host-rule vars + upstream_uri
    exempt_decisions: Mapping[str, Decision]  # one immutable Decision per rule id, built once
    trusted_v4: tuple[IPNetwork, ...] = ()
    trusted_v6: tuple[IPNetwork, ...] = ()
    # Certificate fingerprint -> the "verified" Decision for that certificate object (a bounded cache).
    verified_memo: dict[str, Decision] = field(default_factory=dict, compare=False, repr=False)

    def decide(
        self,
        request: RequestInput,
        vars: Mapping[str, str | None] | None,
        *,
        now: datetime,
        cache: CertificateCache,
        revocation: RevocationTable = NO_REVOCATION,
    ) -> Decision | NeedVars:
        raw = request.path
        if vars is None and raw is not None and "%" in raw:
            # Only here can "$uri, delivered by our Rewrite" and "an $upstream_uri an earlier plugin
            # set, delivered as is" read differently (paths module docstring): ask which it is.
            return self.need_path_origin
        candidates = self._candidates(request.method.upper(), raw, _already_encoded(raw, vars))
        host_bound = None
        if vars is not None and self.exempt.has_host_rules:
            host_bound = host_binds(request.host, vars)
        match = select(candidates, request.host, host_bound=host_bound, method_traits=request.method_traits)
        if match.rule:
            return self.exempt_decisions[match.rule]
        if vars is None:
            # One round trip: when a host rule may still exempt, fetch its SNI along with the protected set.
            return self.need_sni_check if match.needs_sni else self.need_protected
        if match.host_refused:
            # The Host names an exempt host, but the connection (SNI) or the routing ($host) another: the
            # same 421 as protected requests.
            return self._finish(Reason.HOST_MISMATCH, "host-rule", None)
        if self.header_source is not None:
            outcome = self._header_mode(self.header_source, request, vars, now, cache, revocation=revocation)
        else:
            outcome = self._apisix_mode(request, vars, now, cache, revocation)
        return self._finish(*outcome)

    def _candidates(self, method: str, raw: str | None, encoded: bool) -> tuple[CompiledRule, ...]:
        """The rules whose method and path conditions hold, memoised per (policy, method, path):
        classifying the path and running the RE2 Set cost more than everything else an exempt request
        needs, and health checks and other frequent requests repeat."""
        key = (id(self), method, raw, encoded)
        hit = _MEMO.get(key)
        # The entry holds the engine itself, so its id cannot be reused by another engine while cached.
        if hit is not None and hit[0] is self:
            return hit[1]
        path = exempt_path(raw, encoded=encoded)
        found = self.exempt.candidates(method, None if path is None else path.encode("utf-8"))
        if raw is None or len(raw) <= MEMO_MAX_PATH:
            if len(_MEMO) >= MEMO_ENTRIES:
                _MEMO.clear()  # bounded, whatever the paths clients send and however many routes
            _MEMO[key] = (self, found)
        return found

    def delivers_as_judged(self, request: RequestInput, vars: Mapping[str, str | None] | None) -> bool:
        """Whether the caller must Rewrite the path to the judged one (False: an earlier plugin's
        already-encoded ``$upstream_uri`` that reaches the upstream as it is)."""
        return request.path is not None and not _already_encoded(request.path, vars)

    def _finish(self, reason: Reason, detail: str, identity: ClientCertificate | None) -> Decision:
        if reason is Reason.VERIFIED:
            if identity is None:
                return Decision(True, "allow", reason, detail, self.mode, 0, identity)
            # One immutable Decision per cached certificate: building it costs ~1 µs per request.
            known = self.verified_memo.get(identity.fingerprint_sha256)
            if known is not None and known.identity is identity and known.detail == detail:
                return known
            decision = Decision(True, "allow", reason, detail, self.mode, 0, identity)
            if len(self.verified_memo) >= VERIFIED_MEMO_ENTRIES:
                self.verified_memo.clear()
            self.verified_memo[identity.fingerprint_sha256] = decision
            return decision
        if self.mode is Mode.REPORT:
            return Decision(True, "deny", reason, detail, self.mode, 0, identity)
        status = HOST_MISMATCH_STATUS if reason is Reason.HOST_MISMATCH else self.reject_status
        return Decision(False, "deny", reason, detail, self.mode, status, identity)

    def _verified(
        self, cert: ClientCertificate, now: datetime, revocation: RevocationTable
    ) -> tuple[Reason, str, ClientCertificate | None]:
        failure = self.checks.check(cert, now, revocation)
        if failure is not None:
            return failure[0], failure[1], cert
        return Reason.VERIFIED, "", cert

    def _apisix_mode(
        self,
        request: RequestInput,
        vars: Mapping[str, str | None],
        now: datetime,
        cache: CertificateCache,
        revocation: RevocationTable,
    ) -> tuple[Reason, str, ClientCertificate | None]:
        if not is_tls(vars):
            return Reason.PLAIN_HTTP, "", None
        # An HTTP/2 connection coalesced onto another origin carries that origin's TLS identity;
        # 421 tells the client to retry on a fresh connection (nginx, Traefik and Caddy do the same).
        if self.require_sni_match and not sni_matches_host(request.host, vars):
            return Reason.HOST_MISMATCH, "", None
        verify = vars.get("ssl_client_verify")
        if not verify or verify == "NONE":
            return Reason.NO_CERT, "", None
        if verify != "SUCCESS":
            detail = verify[len("FAILED:") :] if verify.startswith("FAILED:") else verify
            return Reason.VERIFY_FAILED, sanitize_detail(detail), None
        escaped = vars.get("ssl_client_escaped_cert")
        if not escaped:
            return Reason.NO_CERT, "unreadable", None
        try:
            cert = cache.get(_ESCAPED_KEY + escaped, _parse_escaped)
        except CertificateError:
            return Reason.NO_CERT, "unreadable", None
        return self._verified(cert, now, revocation)

    def _header_mode(
        self,
        source: HeaderSource,
        request: RequestInput,
        vars: Mapping[str, str | None],
        now: datetime,
        cache: CertificateCache,
        *,
        revocation: RevocationTable,
    ) -> tuple[Reason, str, ClientCertificate | None]:
        values: list[str] = []
        chain_values: list[str] = []
        for name, value in request.headers:
            if name == source.header:
                values.append(value or "")
            elif name == source.chain_header:
                chain_values.append(value or "")
        forged = values or chain_values or request.aliased_source
        # Only the direct TCP peer counts: X-Forwarded-For is written by whoever connects.
        if not _peer_trusted(vars.get("realip_remote_addr"), self.trusted_v4, self.trusted_v6):
            return Reason.UNTRUSTED_PROXY, "forged-header" if forged else "", None
        if request.aliased_source:
            # A trusted proxy writes the header under its configured name; another spelling was
            # passed through from the client (a proxy that strips "x-client-cert" may keep "x_client_cert").
            return Reason.FORWARDED_CERT_INVALID, "aliased-header", None
        try:
            forwarded = parse_forwarded(source.format, values, chain_values, cache)
        except CertificateError as exc:
            # identity.CertificateError messages are fixed texts without certificate contents.
            return Reason.FORWARDED_CERT_INVALID, sanitize_detail(str(exc)), None
        if forwarded is None:
            return Reason.NO_CERT, "", None
        # Whatever the proxy claims about verification is ignored: the certificate is re-verified here.
        problem, path = source.ca.verify_path(forwarded.leaf, forwarded.chain, now=now)
        if problem is not None:
            return Reason.VERIFY_FAILED, problem, forwarded.leaf
        # Every certificate of the path verified here, the forwarded intermediates included.
        if revocation.active and (revoked := revocation.check_path(path, now, revocation.allow_stale)):
            return revoked[0], revoked[1], forwarded.leaf
        return self._verified(forwarded.leaf, now, revocation)
