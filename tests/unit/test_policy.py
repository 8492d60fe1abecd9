"""CompiledPolicy: the decision table, the variable protocol, reject responses and upstream headers."""

from __future__ import annotations

import base64
import dataclasses
import json
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import pytest

if TYPE_CHECKING:
    import re2

from plugins.mtls_guard.forwarded import build_xfcc
from plugins.mtls_guard.identity import CertificateCache, load_pem
from plugins.mtls_guard.matchers import authority_host
from plugins.mtls_guard.policy import (
    REASON_HEADER,
    CompiledPolicy,
    Decision,
    NeedVars,
    Reason,
    RequestInput,
    compile_policy,
)
from plugins.mtls_guard.policy_config import Mode
from runner.protocol import codec
from tests.certs import CertFactory, escaped

FACTORY = CertFactory()
CACHE = CertificateCache()
NOW = FACTORY.now
ROOT = FACTORY.ca("Example Root", subject_extra={"O": "Example CA"})
OTHER_ROOT = FACTORY.ca("Other Root", subject_extra={"O": "Other CA"})
INTERMEDIATE = FACTORY.ca("Example Issuing", parent=ROOT)
BILLING = FACTORY.leaf(
    ROOT,
    cn="client-a",
    subject_extra={"O": "Example"},
    dns=["billing.svc.example.com"],
    uris=["spiffe://example.org/ns/prod/sa/billing"],
    emails=["billing@example.com"],
)
URI_ONLY = FACTORY.leaf(ROOT, cn="uri-only", uris=["spiffe://billing.example.org/x"])
EMAIL_ONLY = FACTORY.leaf(ROOT, cn="email-only", emails=["svc@billing.example.org"])
DEEP_SPIFFE = FACTORY.leaf(ROOT, cn="deep", uris=["spiffe://example.org/ns/prod/extra/sa/billing"])
DOTDOT_SPIFFE = FACTORY.leaf(ROOT, cn="dots", uris=["spiffe://example.org/ns/../sa/billing"])
UPPER_SPIFFE = FACTORY.leaf(ROOT, cn="upper", uris=["SPIFFE://EXAMPLE.ORG/ns/dev/sa/billing"])
CASE_PATH_SPIFFE = FACTORY.leaf(ROOT, cn="case", uris=["spiffe://example.org/NS/dev/sa/billing"])
EXPIRED = FACTORY.leaf(ROOT, cn="client-a", not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(days=1))
NOT_YET = FACTORY.leaf(ROOT, cn="client-a", not_before=NOW + timedelta(days=1), not_after=NOW + timedelta(days=30))
FOREIGN = FACTORY.leaf(OTHER_ROOT, cn="client-a", subject_extra={"O": "Example"})
VIA_INTERMEDIATE = FACTORY.leaf(INTERMEDIATE, cn="client-b", chain=[INTERMEDIATE])
ROGUE = FACTORY.self_signed_leaf("client-a")

HOST = "api.example.com"
TRUSTED_PEER = "10.1.2.3"
HEADER_SOURCE = {"type": "header", "format": "xfcc", "trusted_proxies": ["10.0.0.0/8", "2001:db8::/32"]}


def tls(cert: Any = BILLING, **overrides: str | None) -> dict[str, str | None]:
    """nginx variables of an HTTPS request on which APISIX verified ``cert`` (override any of them)."""
    values: dict[str, str | None] = {
        "ssl_client_verify": "SUCCESS",
        "ssl_client_escaped_cert": escaped(cert.pem) if cert is not None else None,
        "ssl_server_name": HOST,
        "host": HOST,
        "scheme": "https",
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def peer(address: str | None = TRUSTED_PEER) -> dict[str, str | None]:
    return {"realip_remote_addr": address, "host": HOST, "scheme": "http"}


def xfcc(cert: Any) -> tuple[tuple[str, str | None], ...]:
    return (("x-forwarded-client-cert", build_xfcc(load_pem(cert.pem))),)


def present(policy: CompiledPolicy, headers: tuple[tuple[str, str | None], ...]) -> tuple[str, ...]:
    """The spellings of the identity/certificate headers the runner finds in a call carrying ``headers``."""
    frame = codec.http_req_call_frame(id=0, conf_token=1, method=0, path="/", headers=headers)
    return codec.decode_http_req_call(frame[4:]).header_spellings(policy.strip_folded)


def fp(cert: Any) -> str:
    return load_pem(cert.pem).fingerprint_sha256


def compiled(document: dict[str, Any]) -> CompiledPolicy:
    return compile_policy(json.dumps(document))


def run(
    policy: CompiledPolicy, request: RequestInput, variables: dict[str, str | None], now: datetime = NOW
) -> Decision:
    """Drive the two-call protocol like the adapter: first without vars, then with the requested ones.

    ``variables["host"]`` ($host) also stands for the Host header the call carries, unless
    ``variables["header_host"]`` gives another one (an absolute-form request line).
    """
    header_host = variables.get("header_host", variables.get("host"))
    if request.host is None and header_host is not None:
        request = request._replace(host=authority_host(header_host))
    cache = CertificateCache()
    first = policy.decide(request, None, now=now, cache=cache)
    if isinstance(first, Decision):
        return first
    # Only the requested variables are handed over, so a policy that forgets to ask for one fails.
    fetched = {name: variables.get(name) for name in first.names}
    second = policy.decide(request, fetched, now=now, cache=cache)
    assert isinstance(second, Decision)
    return second


EXEMPTIONS: dict[str, Any] = {
    "exempt": [
        {"id": "health", "path": "/healthz|/readyz", "methods": ["GET", "HEAD"]},
        {"id": "public", "path": "/public(/.*)?"},
        {"id": "preflight", "methods": ["OPTIONS"]},
        {"id": "docs-host", "path": "/docs/.*", "hosts": ["docs.example.com", "*.docs.example.com"]},
    ]
}


@dataclass(frozen=True)
class Case:
    id: str
    policy: dict[str, Any]
    vars: dict[str, str | None]
    reason: Reason
    allowed: bool
    status: int = 0
    detail: str | None = None  # None: not checked
    method: str = "GET"
    path: str = "/api/orders"
    headers: tuple[tuple[str, str | None], ...] = ()
    mode: Mode = Mode.ENFORCE
    extra: dict[str, Any] = field(default_factory=dict)


def case(id: str, policy: dict[str, Any], vars: dict[str, str | None], expect: tuple[Any, ...], **kw: Any) -> Any:
    reason, allowed, status, *detail = expect
    return pytest.param(Case(id, policy, vars, reason, allowed, status, detail[0] if detail else None, **kw), id=id)


OK = (Reason.VERIFIED, True, 0, "")
DENY = 403
SPIFFE = {"require": {"san": {"uri": ["spiffe://example.org/ns/*/sa/billing"]}}}

CASES = [
    # -- APISIX mode: the certificate itself ------------------------------------------------------
    case("valid-cert", {}, tls(), OK),
    case("valid-cert-via-intermediate", {}, tls(VIA_INTERMEDIATE), OK),
    case("no-cert-NONE", {}, tls(None, ssl_client_verify="NONE"), (Reason.NO_CERT, False, DENY, "")),
    # Without ssl_client_verify the request did not come over TLS (decision.is_tls): never a success.
    case("verify-var-absent", {}, tls(None, ssl_client_verify=None), (Reason.PLAIN_HTTP, False, DENY, "")),
    case("no-cert-var-empty", {}, tls(None, ssl_client_verify=""), (Reason.NO_CERT, False, DENY)),
    case(
        "untrusted-nginx-failed",
        {},
        tls(ROGUE, ssl_client_verify="FAILED:self-signed certificate"),
        (Reason.VERIFY_FAILED, False, DENY, "self-signed certificate"),
    ),
    case(
        "failed-reason-sanitised-and-truncated",
        {},
        tls(ROGUE, ssl_client_verify="FAILED:bad\r\nx-injected: 1" + "z" * 200),
        (Reason.VERIFY_FAILED, False, DENY, ("bad??x-injected: 1" + "z" * 200)[:80]),
    ),
    case("verify-not-exactly-success", {}, tls(ssl_client_verify="success"), (Reason.VERIFY_FAILED, False, DENY)),
    case(
        "success-without-cert",
        {},
        tls(None),
        (Reason.NO_CERT, False, DENY, "unreadable"),
    ),
    case(
        "success-with-garbage-cert",
        {},
        tls(ssl_client_escaped_cert="-----BEGIN%20CERTIFICATE-----%0Azz"),
        (Reason.NO_CERT, False, DENY, "unreadable"),
    ),
    case("expired-on-resumed-session", {}, tls(EXPIRED), (Reason.EXPIRED, False, DENY)),
    case("not-yet-valid", {}, tls(NOT_YET), (Reason.NOT_YET_VALID, False, DENY)),
    # -- typed SANs and SPIFFE IDs ----------------------------------------------------------------
    case("san-dns-ok", {"require": {"san": {"dns": ["*.svc.example.com"]}}}, tls(), OK),
    case(
        "san-dns-wildcard-is-one-label",
        {"require": {"san": {"dns": ["*.example.com"]}}},
        tls(),
        (Reason.IDENTITY_MISMATCH, False, DENY, "san"),
    ),
    case(
        "dns-pattern-never-matches-uri-san",
        {"require": {"san": {"dns": ["billing.example.org"]}}},
        tls(URI_ONLY),
        (Reason.IDENTITY_MISMATCH, False, DENY, "san"),
    ),
    case(
        "dns-pattern-never-matches-email-san",
        {"require": {"san": {"dns": ["billing.example.org"]}}},
        tls(EMAIL_ONLY),
        (Reason.IDENTITY_MISMATCH, False, DENY, "san"),
    ),
    case(
        "uri-pattern-never-matches-dns-san",
        {"require": {"san": {"uri": ["spiffe://billing.svc.example.com"]}}},
        tls(),
        (Reason.IDENTITY_MISMATCH, False, DENY, "san"),
    ),
    case("spiffe-wildcard-segment", SPIFFE, tls(), OK),
    case("spiffe-scheme-host-case-insensitive", SPIFFE, tls(UPPER_SPIFFE), OK),
    case("spiffe-path-case-sensitive", SPIFFE, tls(CASE_PATH_SPIFFE), (Reason.IDENTITY_MISMATCH, False, DENY, "san")),
    case("spiffe-wildcard-is-one-segment", SPIFFE, tls(DEEP_SPIFFE), (Reason.IDENTITY_MISMATCH, False, DENY, "san")),
    case("spiffe-wildcard-not-dot-dot", SPIFFE, tls(DOTDOT_SPIFFE), (Reason.IDENTITY_MISMATCH, False, DENY, "san")),
    case("email-domain-wildcard", {"require": {"san": {"email": ["*@EXAMPLE.com"]}}}, tls(), OK),
    case(
        "email-local-part-case-sensitive",
        {"require": {"san": {"email": ["Billing@example.com"]}}},
        tls(),
        (Reason.IDENTITY_MISMATCH, False, DENY, "san"),
    ),
    # -- subject / issuer / pins / per-route CA ----------------------------------------------------
    case("subject-ok", {"require": {"subject": {"CN": ["client-b", "client-a"], "O": ["Example"]}}}, tls(), OK),
    case(
        "subject-cn-mismatch",
        {"require": {"subject": {"CN": ["client-b"]}}},
        tls(),
        (Reason.IDENTITY_MISMATCH, False, DENY, "subject.CN"),
    ),
    case(
        "subject-exact-case-sensitive",
        {"require": {"subject": {"CN": ["CLIENT-A"]}}},
        tls(),
        (Reason.IDENTITY_MISMATCH, False, DENY, "subject.CN"),
    ),
    case("subject-by-oid", {"require": {"subject": {"2.5.4.3": ["client-a"]}}}, tls(), OK),
    case(
        "issuer-o-mismatch",
        {"require": {"issuer": {"O": ["Other CA"]}}},
        tls(),
        (Reason.IDENTITY_MISMATCH, False, DENY, "issuer.O"),
    ),
    case("fingerprint-pin-ok", {"require": {"fingerprint_sha256": [fp(BILLING).upper()]}}, tls(), OK),
    case(
        "fingerprint-pin-mismatch",
        {"require": {"fingerprint_sha256": [fp(EXPIRED)]}},
        tls(),
        (Reason.FINGERPRINT_MISMATCH, False, DENY),
    ),
    case("route-ca-ok", {"require": {"ca": ROOT.pem}}, tls(), OK),
    case("route-ca-intermediate-in-bundle", {"require": {"ca": INTERMEDIATE.pem}}, tls(VIA_INTERMEDIATE), OK),
    case(
        "route-ca-cert-from-other-ca",
        {"require": {"ca": OTHER_ROOT.pem}},
        tls(),
        (Reason.CA_MISMATCH, False, DENY, "untrusted-issuer"),
    ),
    case(
        "checks-in-order-expiry-before-ca",
        {"require": {"ca": OTHER_ROOT.pem}},
        tls(EXPIRED),
        (Reason.EXPIRED, False, DENY),
    ),
    # -- exemptions ---------------------------------------------------------------------------------
    case("exempt-path-and-method", EXEMPTIONS, {}, (Reason.EXEMPT, True, 0, "health"), path="/healthz"),
    case("exempt-rule-order", EXEMPTIONS, {}, (Reason.EXEMPT, True, 0, "public"), path="/public/x"),
    case(
        "exempt-path-wrong-method",
        EXEMPTIONS,
        tls(None, ssl_client_verify="NONE"),
        (Reason.NO_CERT, False, DENY),
        method="POST",
        path="/healthz",
    ),
    case(
        "exempt-regex-is-full-match",
        EXEMPTIONS,
        tls(None, ssl_client_verify="NONE"),
        (Reason.NO_CERT, False, DENY),
        path="/healthz/admin",
    ),
    case("options-preflight", EXEMPTIONS, {}, (Reason.EXEMPT, True, 0, "preflight"), method="OPTIONS"),
    case("lower-case-method-input", EXEMPTIONS, {}, (Reason.EXEMPT, True, 0, "health"), method="head", path="/readyz"),
    case(
        "exempt-ignores-invalid-cert",
        EXEMPTIONS,
        tls(ROGUE, ssl_client_verify="FAILED:x"),
        (Reason.EXEMPT, True, 0),
        path="/public",
    ),
    case(
        "host-exemption-match",
        EXEMPTIONS,
        tls(None, ssl_client_verify="NONE", host="v2.docs.example.com", ssl_server_name="v2.docs.example.com"),
        (Reason.EXEMPT, True, 0, "docs-host"),
        path="/docs/intro",
    ),
    case(
        "host-exemption-port-in-host-header",
        EXEMPTIONS,
        tls(
            None,
            ssl_client_verify="NONE",
            host="docs.example.com",
            header_host="docs.example.com:8443",
            ssl_server_name="docs.example.com",
        ),
        (Reason.EXEMPT, True, 0, "docs-host"),
        path="/docs/intro",
    ),
    case(
        "host-exemption-needs-the-sni-to-agree",
        EXEMPTIONS,
        tls(None, ssl_client_verify="NONE", host="docs.example.com"),
        (Reason.HOST_MISMATCH, False, 421, "host-rule"),
        path="/docs/intro",
    ),
    case(
        "host-exemption-needs-the-sni-even-with-the-sni-check-off",
        {**EXEMPTIONS, "require_sni_match": False},
        tls(BILLING, host="docs.example.com"),
        (Reason.HOST_MISMATCH, False, 421, "host-rule"),
        path="/docs/intro",
    ),
    case(
        # An absolute-form request line (GET https://api.example.com/docs/intro) makes nginx's $host, on
        # which APISIX routes, differ from the Host header: the exemption must not believe the header.
        "host-exemption-needs-the-routed-host-to-agree",
        EXEMPTIONS,
        {
            "ssl_client_verify": "NONE",
            "ssl_server_name": "docs.example.com",
            "host": HOST,
            "header_host": "docs.example.com",
        },
        (Reason.HOST_MISMATCH, False, 421, "host-rule"),
        path="/docs/intro",
    ),
    case(
        "host-exemption-over-plain-http-takes-the-host-header",
        EXEMPTIONS,
        {"host": "docs.example.com"},
        (Reason.EXEMPT, True, 0, "docs-host"),
        path="/docs/intro",
    ),
    case(
        "host-exemption-wildcard-one-label",
        EXEMPTIONS,
        tls(None, ssl_client_verify="NONE", host="a.b.docs.example.com", ssl_server_name="a.b.docs.example.com"),
        (Reason.NO_CERT, False, DENY),
        path="/docs/intro",
    ),
    case(
        "host-exemption-other-host",
        EXEMPTIONS,
        tls(None, ssl_client_verify="NONE"),
        (Reason.NO_CERT, False, DENY),
        path="/docs/intro",
    ),
    case(
        "host-exemption-host-var-missing",
        EXEMPTIONS,
        tls(None, ssl_client_verify="NONE", host=None),
        (Reason.HOST_MISMATCH, False, 421),
        path="/docs/intro",
    ),
    # -- path tricks: protected, never exempt ------------------------------------------------------
    *(
        case(
            f"path-trick-{label}",
            EXEMPTIONS,
            tls(None, ssl_client_verify="NONE"),
            (Reason.NO_CERT, False, DENY),
            path=path,
        )
        for label, path in [
            ("dotdot", "/public/../admin"),
            ("double-slash", "//public"),
            ("encoded-slash", "/public%2F..%2Fadmin"),
            ("encoded-dots", "/public/%2e%2e/admin"),
            ("semicolon", "/public;/../admin"),
            ("semicolon-dotdot", "/public/..;/admin"),
            ("newline", "/healthz%0A"),
            ("raw-newline", "/healthz\n"),
            ("backslash", "/public\\..\\admin"),
            ("case", "/Public"),
            ("double-encoding", "/public/%252e%252e/admin"),
            ("no-path", ""),
        ]
    ),
    case(
        "ambiguous-path-even-for-preflight",
        EXEMPTIONS,
        tls(None, ssl_client_verify="NONE"),
        (Reason.NO_CERT, False, DENY),
        method="OPTIONS",
        path="/a/../b",
    ),
    case(
        "encoded-upstream-uri-decoded-once",
        EXEMPTIONS,
        {"upstream_uri": "/p%75blic"},
        (Reason.EXEMPT, True, 0, "public"),
        path="/p%75blic",
    ),
    # A "%" in $uri came from "%25": delivered as "%25" again, a double-decoding upstream reads "/public".
    case(
        "literal-percent-in-uri-never-exempt",
        EXEMPTIONS,
        tls(None, ssl_client_verify="NONE"),
        (Reason.NO_CERT, False, DENY),
        path="/p%75blic",
    ),
    # -- transport: scheme and Host/SNI ------------------------------------------------------------
    case("plain-http", {}, {"host": HOST}, (Reason.PLAIN_HTTP, False, DENY)),
    case("plain-http-scheme-is-not-read", {}, tls(scheme="http"), OK),
    case("host-mismatch-421", {}, tls(ssl_server_name="other.example.com"), (Reason.HOST_MISMATCH, False, 421)),
    case("sni-missing-421", {}, tls(ssl_server_name=None), (Reason.HOST_MISMATCH, False, 421)),
    case("sni-host-case-and-trailing-dot", {}, tls(ssl_server_name="API.example.com."), OK),
    case("sni-check-disabled", {"require_sni_match": False}, tls(ssl_server_name="other.example.com"), OK),
    case(
        "custom-status", {"reject": {"status": 401}}, tls(None, ssl_client_verify="NONE"), (Reason.NO_CERT, False, 401)
    ),
    # -- forged "verified" headers in APISIX mode ---------------------------------------------------
    case(
        "forged-verify-header-ignored",
        {},
        tls(None, ssl_client_verify="NONE"),
        (Reason.NO_CERT, False, DENY),
        headers=(("x-ssl-client-verify", "SUCCESS"), *xfcc(BILLING), ("x-client-cert", escaped(BILLING.pem))),
    ),
    # -- report mode -------------------------------------------------------------------------------
    case(
        "report-mode-lets-deny-through",
        {"mode": "report"},
        tls(None, ssl_client_verify="NONE"),
        (Reason.NO_CERT, True, 0),
        mode=Mode.REPORT,
    ),
    case("report-mode-allow", {"mode": "report"}, tls(), OK, mode=Mode.REPORT),
    case(
        "report-mode-host-mismatch",
        {"mode": "report"},
        tls(ssl_server_name="x.example.com"),
        (Reason.HOST_MISMATCH, True, 0),
        mode=Mode.REPORT,
    ),
    # -- header mode -------------------------------------------------------------------------------
    *(
        case(
            f"header-mode-{label}",
            {"source": {**HEADER_SOURCE, "ca": ROOT.pem}, **extra},
            cast("dict[str, str | None]", v),
            expect,
            headers=h,
        )
        for label, extra, v, h, expect in [
            ("trusted-peer", {}, peer(), xfcc(BILLING), OK),
            ("trusted-ipv6-peer", {}, peer("2001:db8::7"), xfcc(BILLING), OK),
            ("ipv4-mapped-peer", {}, peer("::ffff:10.9.9.9"), xfcc(BILLING), OK),
            (
                "untrusted-peer-forged",
                {},
                peer("203.0.113.9"),
                xfcc(BILLING),
                (Reason.UNTRUSTED_PROXY, False, DENY, "forged-header"),
            ),
            ("untrusted-peer-no-header", {}, peer("203.0.113.9"), (), (Reason.UNTRUSTED_PROXY, False, DENY, "")),
            ("peer-var-missing", {}, peer(None), xfcc(BILLING), (Reason.UNTRUSTED_PROXY, False, DENY)),
            ("peer-var-garbage", {}, peer("10.0.0.1, 1.2.3.4"), xfcc(BILLING), (Reason.UNTRUSTED_PROXY, False, DENY)),
            (
                "xff-is-never-used",
                {},
                peer("203.0.113.9"),
                (("x-forwarded-for", TRUSTED_PEER), *xfcc(BILLING)),
                (Reason.UNTRUSTED_PROXY, False, DENY, "forged-header"),
            ),
            (
                "forged-verified-header-untrusted-peer",
                {},
                peer("203.0.113.9"),
                (("x-ssl-client-verify", "SUCCESS"), ("x-ssl-client-s-dn", "CN=client-a")),
                (Reason.UNTRUSTED_PROXY, False, DENY, ""),
            ),
            (
                "verified-header-without-cert",
                {},
                peer(),
                (("x-ssl-client-verify", "SUCCESS"),),
                (Reason.NO_CERT, False, DENY),
            ),
            ("trusted-no-header", {}, peer(), (), (Reason.NO_CERT, False, DENY)),
            (
                "garbage-header",
                {},
                peer(),
                (("x-forwarded-client-cert", "Cert=zz"),),
                (Reason.FORWARDED_CERT_INVALID, False, DENY),
            ),
            (
                "repeated-header",
                {},
                peer(),
                (*xfcc(BILLING), *xfcc(BILLING)),
                (Reason.FORWARDED_CERT_INVALID, False, DENY, "certificate header repeated"),
            ),
            ("other-ca", {}, peer(), xfcc(FOREIGN), (Reason.VERIFY_FAILED, False, DENY, "untrusted-issuer")),
            ("self-signed", {}, peer(), xfcc(ROGUE), (Reason.VERIFY_FAILED, False, DENY)),
            ("expired", {}, peer(), xfcc(EXPIRED), (Reason.EXPIRED, False, DENY)),
            (
                "identity",
                {"require": {"subject": {"CN": ["nobody"]}}},
                peer(),
                xfcc(BILLING),
                (Reason.IDENTITY_MISMATCH, False, DENY, "subject.CN"),
            ),
            ("no-sni-or-scheme-check", {}, {"realip_remote_addr": TRUSTED_PEER}, xfcc(BILLING), OK),
        ]
    ),
]


class TestDecisionTable:
    @pytest.mark.parametrize("c", CASES)
    def test_case(self, c: Case) -> None:
        """Each row of the table yields its expected verdict, reason, detail, status and mode."""
        policy = compiled(c.policy)
        decision = run(policy, RequestInput(c.method, c.path, c.headers), c.vars)
        assert (decision.reason, decision.allowed, decision.status, decision.mode) == (
            c.reason,
            c.allowed,
            c.status,
            c.mode,
        )
        assert decision.verdict == ("allow" if c.reason in (Reason.EXEMPT, Reason.VERIFIED) else "deny")
        if c.detail is not None:
            assert decision.detail == c.detail
        assert len(decision.detail) <= 80
        assert decision.detail.isprintable()
        assert decision.detail.isascii()


class TestIdentityOnDecision:
    def test_identity_set_when_cert_read(self) -> None:
        """A decision made on a parsed certificate carries it, allowed or not."""
        ok = run(compiled({}), RequestInput("GET", "/x"), tls())
        bad = run(compiled({"require": {"subject": {"CN": ["x"]}}}), RequestInput("GET", "/x"), tls())
        assert ok.identity is not None
        assert ok.identity.fingerprint_sha256 == fp(BILLING)
        assert bad.identity is not None
        assert bad.identity.fingerprint_sha256 == fp(BILLING)

    def test_exempt_never_reads_cert(self) -> None:
        """An exempt decision has no identity even when a certificate was presented."""
        decision = run(compiled(EXEMPTIONS), RequestInput("GET", "/public"), tls())
        assert decision.reason is Reason.EXEMPT
        assert decision.identity is None

    def test_validity_rechecked_at_decision_time(self) -> None:
        """The same certificate is accepted now and rejected once its notAfter has passed."""
        policy = compiled({})
        request = RequestInput("GET", "/x")
        assert run(policy, request, tls()).allowed
        later = run(policy, request, tls(), now=NOW + timedelta(days=2))
        assert later.reason is Reason.EXPIRED


class TestVariableProtocol:
    @pytest.mark.parametrize(
        ("document", "method", "path", "names"),
        [
            ({}, "GET", "/x", ("ssl_client_verify", "ssl_client_escaped_cert", "ssl_server_name")),
            ({"require_sni_match": False}, "GET", "/x", ("ssl_client_verify", "ssl_client_escaped_cert")),
            (
                {"require_sni_match": False, **EXEMPTIONS},
                "GET",
                "/docs/a",
                ("ssl_client_verify", "ssl_client_escaped_cert", "ssl_server_name", "host"),
            ),
            (
                {"require_sni_match": False, **EXEMPTIONS},
                "GET",
                "/other",
                ("ssl_client_verify", "ssl_client_escaped_cert"),
            ),
            ({"source": {**HEADER_SOURCE, "ca": ROOT.pem}}, "GET", "/x", ("realip_remote_addr",)),
            (
                {"source": {**HEADER_SOURCE, "ca": ROOT.pem}, **EXEMPTIONS},
                "GET",
                "/docs/a",
                ("ssl_client_verify", "ssl_server_name", "host", "realip_remote_addr"),
            ),
            (
                {"source": {**HEADER_SOURCE, "ca": ROOT.pem}, **EXEMPTIONS},
                "POST",
                "/docs/a",
                ("ssl_client_verify", "ssl_server_name", "host", "realip_remote_addr"),
            ),
            # A "%" in the path: is it $uri (delivered by our Rewrite) or an earlier plugin's $upstream_uri?
            ({}, "GET", "/a%20b", ("ssl_client_verify", "ssl_client_escaped_cert", "ssl_server_name", "upstream_uri")),
            (
                {"require_sni_match": False, **EXEMPTIONS},
                "GET",
                "/docs/%41",
                ("ssl_client_verify", "ssl_client_escaped_cert", "ssl_server_name", "host", "upstream_uri"),
            ),
        ],
    )
    def test_need_vars_is_exact_and_minimal(
        self, document: dict[str, Any], method: str, path: str, names: tuple[str, ...]
    ) -> None:
        """The first call asks, in one NeedVars, for exactly the variables the rest of the decision reads."""
        request = RequestInput(method, path, host="docs.example.com")
        outcome = compiled(document).decide(request, None, now=NOW, cache=CertificateCache())
        assert outcome == NeedVars(names)

    def test_host_rule_not_matching_path_needs_no_sni(self) -> None:
        """A host rule whose path does not match does not add the SNI to the request."""
        policy = compiled({"require_sni_match": False, "exempt": [{"path": "/docs/.*", "hosts": ["d.example.com"]}]})
        outcome = policy.decide(
            RequestInput("GET", "/api", host="d.example.com"), None, now=NOW, cache=CertificateCache()
        )
        assert isinstance(outcome, NeedVars)
        assert "ssl_server_name" not in outcome.names

    def test_host_rule_for_another_host_needs_no_sni(self) -> None:
        """A host rule whose host is not the Host header does not add the SNI to the request."""
        policy = compiled({"require_sni_match": False, "exempt": [{"path": "/docs/.*", "hosts": ["d.example.com"]}]})
        outcome = policy.decide(RequestInput("GET", "/docs/a", host="e.example.com"), None, now=NOW, cache=CACHE)
        assert outcome == NeedVars(("ssl_client_verify", "ssl_client_escaped_cert"))

    def test_exempt_without_hosts_needs_no_vars(self) -> None:
        """A rule decided by method and path alone answers on the first call, without any variable."""
        outcome = compiled(EXEMPTIONS).decide(RequestInput("GET", "/healthz"), None, now=NOW, cache=CertificateCache())
        assert isinstance(outcome, Decision)
        assert outcome.detail == "health"

    def test_hostless_rule_after_host_rule_still_exempts_first_call(self) -> None:
        """When a host rule and a later hostless rule both match, the first call exempts via the latter."""
        policy = compiled(
            {"exempt": [{"id": "h", "path": "/a", "hosts": ["x.example.com"]}, {"id": "m", "methods": ["GET"]}]}
        )
        outcome = policy.decide(RequestInput("GET", "/a"), None, now=NOW, cache=CertificateCache())
        assert isinstance(outcome, Decision)
        assert outcome.detail == "m"

    def test_first_matching_rule_reported_when_host_known(self) -> None:
        """With the host variable available, the first rule in order is reported."""
        policy = compiled(
            {"exempt": [{"id": "h", "path": "/a", "hosts": ["x.example.com"]}, {"id": "m", "methods": ["GET"]}]}
        )
        request = RequestInput("GET", "/a", host="x.example.com")
        over_tls = {"ssl_client_verify": "NONE", "ssl_server_name": "x.example.com", "host": "x.example.com"}
        outcome = policy.decide(request, over_tls, now=NOW, cache=CertificateCache())
        assert isinstance(outcome, Decision)
        assert outcome.detail == "h"

    def test_missing_vars_are_absent_not_success(self) -> None:
        """A second call without the variables denies: absence is never success."""
        outcome = compiled({}).decide(RequestInput("GET", "/x"), {}, now=NOW, cache=CertificateCache())
        assert isinstance(outcome, Decision)
        assert not outcome.allowed

    def test_certificate_parsed_once(self) -> None:
        """Repeated decisions on the same escaped certificate hit the cache instead of re-parsing."""
        policy, cache = compiled({}), CertificateCache()
        for _ in range(3):
            decision = policy.decide(RequestInput("GET", "/x", host=HOST), tls(), now=NOW, cache=cache)
            assert isinstance(decision, Decision)
            assert decision.allowed
        assert (cache.misses, cache.hits) == (1, 2)

    def test_verified_decision_reused_only_for_the_same_certificate(self) -> None:
        """The same cached certificate gets the same Decision object; a new cache (a re-parse) a fresh one."""
        policy, cache = compiled({}), CertificateCache()
        request = RequestInput("GET", "/x", host=HOST)
        first = policy.decide(request, tls(), now=NOW, cache=cache)
        assert policy.decide(request, tls(), now=NOW, cache=cache) is first
        fresh = policy.decide(request, tls(), now=NOW, cache=CertificateCache())
        assert isinstance(first, Decision)
        assert isinstance(fresh, Decision)
        assert fresh is not first
        assert fresh == first
        assert fresh.identity is not first.identity
        # Expiry is judged per request, never memoised with the Decision.
        late = policy.decide(request, tls(), now=NOW + timedelta(days=3650), cache=cache)
        assert isinstance(late, Decision)
        assert late.reason == "expired"

    def test_pathological_regex_on_8kb_path(self) -> None:
        """A backtracking-prone pattern on an 8 KB path returns promptly (RE2 is linear)."""
        policy = compiled({"exempt": [{"path": "(a+)+$"}, {"path": "/(a|aa)*b"}, {"path": "/(.*a){20}"}]})
        outcome = policy.decide(RequestInput("GET", "/" + "a" * 8190 + "!"), None, now=NOW, cache=CertificateCache())
        assert isinstance(outcome, NeedVars)
        hit = policy.decide(RequestInput("GET", "/" + "a" * 8190 + "b"), None, now=NOW, cache=CertificateCache())
        assert isinstance(hit, Decision)
        assert hit.detail == "exempt[1]"


class _AlwaysMatchingSet:
    """Stands in for an RE2 Set that wrongly reports every pattern as matching."""

    def __init__(self, count: int) -> None:
        self.count = count

    def Match(self, text: bytes) -> list[int]:
        return list(range(self.count))


class TestExemptMatcherFailsClosed:
    def test_set_false_positive_never_exempts(self) -> None:
        """A Set hit is confirmed with the rule's own regex, so a wrong Set result cannot exempt."""
        policy = compiled({"exempt": [{"id": "a", "path": "/a"}, {"id": "b", "path": "/b/.*"}]})
        broken = dataclasses.replace(policy.engine.exempt, path_set=cast("re2.Set", _AlwaysMatchingSet(2)))
        assert broken.candidates("GET", b"/admin") == ()
        assert [rule.id for rule in broken.candidates("GET", b"/b/x")] == ["b"]


class TestRejectResponse:
    def deny(self, document: dict[str, Any], variables: dict[str, str | None]) -> tuple[CompiledPolicy, Decision]:
        policy = compiled(document)
        return policy, run(policy, RequestInput("GET", "/x"), variables)

    def test_default_response_hides_reason(self) -> None:
        """By default the client sees 403, the configured body and no reason."""
        policy, decision = self.deny({}, tls(None, ssl_client_verify="NONE"))
        assert policy.reject_response(decision) == (
            403,
            (("content-type", "text/plain; charset=utf-8"),),
            b"Forbidden\n",
        )

    def test_expose_reason(self) -> None:
        """expose_reason adds the reason to the body and the x-mtls-guard-reason header."""
        document = {"reject": {"status": 401, "body": "nope", "content_type": "text/plain", "expose_reason": True}}
        policy, decision = self.deny(document, tls(EXPIRED))
        assert policy.reject_response(decision) == (
            401,
            (("content-type", "text/plain"), (REASON_HEADER, "expired")),
            b"nope\nreason: expired\n",
        )

    def test_host_mismatch_is_421(self) -> None:
        """A Host/SNI mismatch is answered with 421 whatever the configured status."""
        policy, decision = self.deny({"reject": {"status": 401}}, tls(ssl_server_name="x.example.com"))
        assert policy.reject_response(decision)[0] == 421

    def test_allowed_decision_has_no_reject_response(self) -> None:
        """Asking for the reject response of an allowed request is a programming error."""
        policy, decision = self.deny({"mode": "report"}, tls(None, ssl_client_verify="NONE"))
        with pytest.raises(ValueError, match="allowed"):
            policy.reject_response(decision)


FORWARD = {
    "forward": {"subject": "x-client-subject", "san": "x-client-san", "fingerprint": "x-client-fp", "xfcc": "x-fcc"}
}
SPOOFED: tuple[tuple[str, str | None], ...] = (
    ("x-client-subject", "CN=admin"),
    ("x-client-subject", "CN=root"),
    ("x-client-fp", "00"),
    ("accept", "*/*"),
)


class TestUpstreamHeaders:
    def test_exempt_request_spoofed_headers_stripped(self) -> None:
        """On an exempt request every inbound copy of a forward header is deleted and nothing is set."""
        policy = compiled({**FORWARD, **EXEMPTIONS})
        decision = run(policy, RequestInput("GET", "/public", SPOOFED), {})
        assert policy.upstream_headers(decision, present(policy, SPOOFED)) == (
            ("x-client-subject", None),
            ("x-client-fp", None),
        )

    def test_verified_request_gets_identity(self) -> None:
        """A verified request gets deletions first, then subject, typed SANs, fingerprint and XFCC."""
        policy = compiled(FORWARD)
        decision = run(policy, RequestInput("GET", "/x", SPOOFED), tls())
        cert = load_pem(BILLING.pem)
        assert policy.upstream_headers(decision, present(policy, SPOOFED)) == (
            ("x-client-subject", None),
            ("x-client-fp", None),
            ("x-client-subject", "CN=client-a,O=Example"),
            (
                "x-client-san",
                "DNS:billing.svc.example.com,URI:spiffe://example.org/ns/prod/sa/billing,email:billing@example.com",
            ),
            ("x-client-fp", cert.fingerprint_sha256),
            ("x-fcc", build_xfcc(cert)),
        )

    def test_report_mode_failed_cert_not_vouched_for(self) -> None:
        """In report mode a would-be-denied certificate passes, but no identity header is set for it."""
        policy = compiled({**FORWARD, "mode": "report", "require": {"subject": {"CN": ["x"]}}})
        decision = run(policy, RequestInput("GET", "/x", SPOOFED), tls())
        assert decision.allowed
        assert decision.identity is not None
        assert policy.upstream_headers(decision, present(policy, SPOOFED)) == (
            ("x-client-subject", None),
            ("x-client-fp", None),
        )

    def test_no_forward_configured(self) -> None:
        """Without forward headers nothing changes, even with inbound look-alikes."""
        policy = compiled({})
        decision = run(policy, RequestInput("GET", "/x", SPOOFED), tls())
        assert policy.upstream_headers(decision, present(policy, SPOOFED)) == ()

    def test_nothing_inbound_nothing_verified(self) -> None:
        """An exempt request without look-alike headers changes nothing."""
        policy = compiled({**FORWARD, **EXEMPTIONS})
        decision = run(policy, RequestInput("GET", "/public"), {})
        assert policy.upstream_headers(decision, present(policy, (("accept", "*/*"),))) == ()

    def test_header_mode_unverified_forwarded_cert_stripped(self) -> None:
        """In header mode an exempt or untrusted request never passes the certificate headers on."""
        policy = compiled({"source": {**HEADER_SOURCE, "format": "rfc9440", "ca": ROOT.pem}, **EXEMPTIONS})
        inbound = (("client-cert", ":AAAA:"), ("client-cert-chain", ":AAAA:"), ("accept", "*/*"))
        exempt = run(policy, RequestInput("GET", "/public", inbound), {})
        untrusted = run(policy, RequestInput("GET", "/x", inbound), peer("203.0.113.9"))
        for decision in (exempt, untrusted):
            assert policy.upstream_headers(decision, present(policy, inbound)) == (
                ("client-cert", None),
                ("client-cert-chain", None),
            )

    def test_header_mode_verified_forwarded_cert_stripped(self) -> None:
        """Even a verified forwarded certificate is deleted: the upstream must never see a certificate header."""
        policy = compiled({"source": {**HEADER_SOURCE, "ca": ROOT.pem}})
        decision = run(policy, RequestInput("GET", "/x", xfcc(BILLING)), peer())
        assert decision.reason is Reason.VERIFIED
        assert policy.upstream_headers(decision, present(policy, xfcc(BILLING))) == (("x-forwarded-client-cert", None),)

    def test_header_mode_exempt_request_from_untrusted_peer(self) -> None:
        """An exempt request from an untrusted peer passes, but its forged certificate header is deleted."""
        policy = compiled({"source": {**HEADER_SOURCE, "ca": ROOT.pem}, **FORWARD, **EXEMPTIONS})
        inbound = (*xfcc(BILLING), *SPOOFED)
        decision = run(policy, RequestInput("GET", "/public", inbound), peer("203.0.113.9"))
        assert (decision.allowed, decision.reason) == (True, Reason.EXEMPT)
        assert policy.upstream_headers(decision, present(policy, inbound)) == (
            ("x-forwarded-client-cert", None),
            ("x-client-subject", None),
            ("x-client-fp", None),
        )

    def test_header_mode_allowed_request_from_trusted_proxy(self) -> None:
        """A verified request loses the certificate headers and gets the identity only via forward headers."""
        policy = compiled({"source": {**HEADER_SOURCE, "ca": ROOT.pem}, **FORWARD})
        inbound = (*xfcc(BILLING), ("accept", "*/*"))
        decision = run(policy, RequestInput("GET", "/x", inbound), peer())
        assert (decision.allowed, decision.reason) == (True, Reason.VERIFIED)
        cert = load_pem(BILLING.pem)
        assert policy.upstream_headers(decision, present(policy, inbound)) == (
            ("x-forwarded-client-cert", None),
            ("x-client-subject", "CN=client-a,O=Example"),
            (
                "x-client-san",
                "DNS:billing.svc.example.com,URI:spiffe://example.org/ns/prod/sa/billing,email:billing@example.com",
            ),
            ("x-client-fp", cert.fingerprint_sha256),
            ("x-fcc", build_xfcc(cert)),
        )

    def test_header_mode_rfc9440_verified_request_loses_both_headers(self) -> None:
        """With a chain header (rfc9440), a verified request loses the leaf and the chain header."""
        policy = compiled({"source": {**HEADER_SOURCE, "format": "rfc9440", "ca": ROOT.pem}})
        der = base64.b64encode(load_pem(VIA_INTERMEDIATE.pem).der).decode()
        chain = base64.b64encode(load_pem(INTERMEDIATE.pem).der).decode()
        inbound = (("client-cert", f":{der}:"), ("client-cert-chain", f":{chain}:"), ("accept", "*/*"))
        decision = run(policy, RequestInput("GET", "/x", inbound), peer())
        assert decision.reason is Reason.VERIFIED
        assert policy.upstream_headers(decision, present(policy, inbound)) == (
            ("client-cert", None),
            ("client-cert-chain", None),
        )

    @pytest.mark.parametrize(
        ("extra", "reason"),
        [({}, Reason.VERIFIED), ({"require": {"subject": {"CN": ["nobody"]}}}, Reason.IDENTITY_MISMATCH)],
    )
    def test_header_mode_report_mode_forwarded_cert_stripped(self, extra: dict[str, Any], reason: Reason) -> None:
        """In report mode the certificate header is deleted whether the certificate passed or would be denied."""
        policy = compiled({"source": {**HEADER_SOURCE, "ca": ROOT.pem}, "mode": "report", **extra})
        decision = run(policy, RequestInput("GET", "/x", xfcc(BILLING)), peer())
        assert (decision.allowed, decision.reason, decision.mode) == (True, reason, Mode.REPORT)
        assert policy.upstream_headers(decision, present(policy, xfcc(BILLING))) == (("x-forwarded-client-cert", None),)

    def test_san_values_escaped(self) -> None:
        """Commas and control characters inside a SAN value cannot split or break the header."""
        leaf = FACTORY.leaf(ROOT, uris=["urn:a,DNS:evil.example"])
        policy = compiled({"forward": {"san": "x-san"}})
        decision = run(policy, RequestInput("GET", "/x"), tls(leaf))
        assert policy.upstream_headers(decision, present(policy, ())) == (("x-san", "URI:urn:a%2CDNS:evil.example"),)


class TestDescribe:
    def test_describe_mentions_rules_and_requirements(self) -> None:
        """describe() lists exemptions in order and every requirement in plain words."""
        text = compiled({**EXEMPTIONS, **SPIFFE, **FORWARD, "mode": "report"}).describe()
        assert "mode: report" in text
        assert "LET THROUGH" in text
        assert text.index("[health]") < text.index("[public]") < text.index("[preflight]")
        assert "spiffe://example.org/ns/*/sa/billing" in text
        assert "TLS SNI equal to Host" in text
        assert "inbound copies of x-client-subject" in text

    def test_describe_header_mode(self) -> None:
        """describe() of a header-mode policy names the peer CIDRs and the header."""
        text = compiled({"source": {**HEADER_SOURCE, "ca": ROOT.pem}}).describe()
        assert "10.0.0.0/8" in text
        assert "'x-forwarded-client-cert'" in text
        assert "Example Root" in text
        assert "certificate headers removed from every request, verified ones too: x-forwarded-client-cert" in text


def test_compiled_policy_is_immutable() -> None:
    """A CompiledPolicy cannot be modified after compilation."""
    policy = compiled({})
    with pytest.raises(AttributeError):
        policy.engine = policy.engine  # type: ignore[misc]
    with pytest.raises(TypeError):
        policy.responses[Reason.NO_CERT] = (200, (), b"")  # type: ignore[index]


def test_now_must_be_aware() -> None:
    """A naive clock is a programming error, not a silently wrong validity check."""
    request, policy = RequestInput("GET", "/x", host=HOST), compiled({})
    with pytest.raises(ValueError, match="timezone"):
        policy.decide(request, tls(), now=datetime(2030, 1, 1), cache=CertificateCache())


def test_utc_clock_matches_factory() -> None:
    """The factory's clock is timezone-aware UTC (the table relies on it)."""
    assert NOW.tzinfo is UTC


class TestPostRespRefused:
    def test_mtls_guard_in_post_resp_fails_every_call(self) -> None:
        """Attached to ext-plugin-post-resp, mtls-guard answers every call with a failure (503), never a no-op."""
        import asyncio

        from plugins.mtls_guard.plugin import MtlsGuard
        from runner.errors import PluginFailure
        from runner.plugin import HTTPResponse
        from runner.protocol import codec

        plugin = MtlsGuard()
        policy = plugin.parse_conf("{}")
        call = codec.decode_http_resp_call(codec.http_resp_call_frame(id=1, conf_token=1)[4:])
        with pytest.raises(PluginFailure, match="ext-plugin-pre-req"):
            asyncio.run(plugin.on_response(policy, HTTPResponse(call, channel=None)))  # type: ignore[arg-type]
