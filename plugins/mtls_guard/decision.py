"""The per-request decision: exempt or protected, and for protected requests whether the certificate holds.

Pure and synchronous: inputs are the request, the nginx variables fetched so far and the clock; the
output is a ``Decision`` or a ``NeedVars`` asking for exactly the variables still required (fetched by
the caller in one ExtraInfo round trip). Everything configurable was compiled beforehand; a missing
variable is treated as absent, never as success.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Final, Literal

from .forwarded import parse_forwarded
from .identity import CertificateCache, CertificateError, ClientCertificate, load_pem, unescape_nginx
from .matchers import ExemptMatcher, SanMatcher, normalize_host
from .paths import canonical_value
from .schema import HOST_MISMATCH_STATUS, HeaderSource, IPNetwork, Mode
from .trust import TrustBundle

__all__ = ["Decision", "Engine", "IdentityChecks", "NeedVars", "Reason", "RequestInput", "sanitize_detail"]

MAX_DETAIL: Final = 80
# The order variables are requested in; also the order NeedVars lists them.
VAR_ORDER: Final = (
    "ssl_client_verify",
    "ssl_client_escaped_cert",
    "ssl_server_name",
    "host",
    "scheme",
    "realip_remote_addr",
)
# Cache keys are namespaced per parse function (identity.CertificateCache requires it).
_ESCAPED_KEY: Final = "nginx-escaped:"


class Reason(StrEnum):
    EXEMPT = "exempt"
    VERIFIED = "verified"
    NO_CERT = "no-cert"
    VERIFY_FAILED = "verify-failed"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    IDENTITY_MISMATCH = "identity-mismatch"
    FINGERPRINT_MISMATCH = "fingerprint-mismatch"
    CA_MISMATCH = "ca-mismatch"
    HOST_MISMATCH = "host-mismatch"
    PLAIN_HTTP = "plain-http"
    UNTRUSTED_PROXY = "untrusted-proxy"
    FORWARDED_CERT_INVALID = "forwarded-cert-invalid"


@dataclass(frozen=True, slots=True)
class RequestInput:
    method: str
    path: str | None
    headers: tuple[tuple[str, str | None], ...] = ()  # lower-case names, repeats allowed


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
    fingerprints: frozenset[str] | None = None
    san: SanMatcher | None = None
    subject: tuple[tuple[str, frozenset[str]], ...] = ()
    issuer: tuple[tuple[str, frozenset[str]], ...] = ()

    def check(self, cert: ClientCertificate, now: datetime) -> tuple[Reason, str] | None:
        # Re-checked on every request: a resumed TLS session must not keep an expired cert alive.
        validity = cert.validity_at(now)
        if validity == "expired":
            return Reason.EXPIRED, ""
        if validity == "not-yet-valid":
            return Reason.NOT_YET_VALID, ""
        if self.ca is not None:
            # $ssl_client_escaped_cert is the leaf only: the route bundle must hold its issuer.
            problem = self.ca.verify(cert, (), now=now)
            if problem is not None:
                return Reason.CA_MISMATCH, problem
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
    need_host_and_protected: NeedVars
    exempt_decisions: Mapping[str, Decision]  # one immutable Decision per rule id, built once
    trusted_v4: tuple[IPNetwork, ...] = ()
    trusted_v6: tuple[IPNetwork, ...] = ()

    def decide(
        self,
        request: RequestInput,
        vars: Mapping[str, str | None] | None,
        *,
        now: datetime,
        cache: CertificateCache,
    ) -> Decision | NeedVars:
        canonical = canonical_value(request.path)
        # Ambiguous paths are matched by no rule at all, methods-only rules included (fail closed).
        path = None if canonical is None else canonical.encode("utf-8")
        host = vars.get("host") if vars is not None else None
        rule_id, needs_host = self.exempt.match(request.method.upper(), path, host, vars is not None)
        if rule_id:
            return self.exempt_decisions[rule_id]
        if vars is None:
            # One round trip: when a host rule may still exempt, fetch the protected set with "host".
            return self.need_host_and_protected if needs_host else self.need_protected
        if self.header_source is not None:
            outcome = self._header_mode(self.header_source, request, vars, now, cache)
        else:
            outcome = self._apisix_mode(vars, now, cache)
        return self._finish(*outcome)

    def _finish(self, reason: Reason, detail: str, identity: ClientCertificate | None) -> Decision:
        if reason is Reason.VERIFIED:
            return Decision(True, "allow", reason, detail, self.mode, 0, identity)
        if self.mode is Mode.REPORT:
            return Decision(True, "deny", reason, detail, self.mode, 0, identity)
        status = HOST_MISMATCH_STATUS if reason is Reason.HOST_MISMATCH else self.reject_status
        return Decision(False, "deny", reason, detail, self.mode, status, identity)

    def _verified(self, cert: ClientCertificate, now: datetime) -> tuple[Reason, str, ClientCertificate | None]:
        failure = self.checks.check(cert, now)
        if failure is not None:
            return failure[0], failure[1], cert
        return Reason.VERIFIED, "", cert

    def _apisix_mode(
        self, vars: Mapping[str, str | None], now: datetime, cache: CertificateCache
    ) -> tuple[Reason, str, ClientCertificate | None]:
        if vars.get("scheme") != "https":
            return Reason.PLAIN_HTTP, "", None
        if self.require_sni_match:
            # An HTTP/2 connection coalesced onto another origin carries that origin's TLS identity;
            # 421 tells the client to retry on a fresh connection (nginx, Traefik and Caddy do the same).
            sni, host = vars.get("ssl_server_name"), vars.get("host")
            if not sni or not host or normalize_host(sni) != normalize_host(host):
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
        return self._verified(cert, now)

    def _header_mode(
        self,
        source: HeaderSource,
        request: RequestInput,
        vars: Mapping[str, str | None],
        now: datetime,
        cache: CertificateCache,
    ) -> tuple[Reason, str, ClientCertificate | None]:
        values: list[str] = []
        chain_values: list[str] = []
        for name, value in request.headers:
            if name == source.header:
                values.append(value or "")
            elif name == source.chain_header:
                chain_values.append(value or "")
        # Only the direct TCP peer counts: X-Forwarded-For is written by whoever connects.
        if not _peer_trusted(vars.get("realip_remote_addr"), self.trusted_v4, self.trusted_v6):
            return Reason.UNTRUSTED_PROXY, "forged-header" if values or chain_values else "", None
        try:
            forwarded = parse_forwarded(source.format, values, chain_values, cache)
        except CertificateError as exc:
            # identity.CertificateError messages are fixed texts without certificate contents.
            return Reason.FORWARDED_CERT_INVALID, sanitize_detail(str(exc)), None
        if forwarded is None:
            return Reason.NO_CERT, "", None
        # Whatever the proxy claims about verification is ignored: the certificate is re-verified here.
        problem = source.ca.verify(forwarded.leaf, forwarded.chain, now=now)
        if problem is not None:
            return Reason.VERIFY_FAILED, problem, forwarded.leaf
        return self._verified(forwarded.leaf, now)
