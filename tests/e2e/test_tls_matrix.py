"""Real TLS handshakes against nginx in APISIX's tolerant verify mode, decided by the real runner (source apisix).

Route ``/`` requires a certificate from the test CA with SPIFFE ID prod on every path except
``/health``, ``/public/.*`` and any OPTIONS request; rejections expose their reason.
"""

from __future__ import annotations

import hashlib
import re
import time
from datetime import UTC, datetime, timedelta

import pytest

from tests.certs import CertFactory, escaped
from tests.e2e.pki import OTHER_HOST, SPIFFE_PROD
from tests.e2e.stack import Stack

pytestmark = pytest.mark.e2e

PREFLIGHT = [("Origin", "https://app.example.test"), ("Access-Control-Request-Method", "POST")]

# cert -> (status, reason) on a protected path; exempt paths and preflights are 200 for every cert.
PROTECTED = {
    "valid": (200, None),
    None: (403, "no-cert"),
    "untrusted": (403, "verify-failed"),
    "expired": (403, "verify-failed"),
}
CERTS = list(PROTECTED)
SPOOFED = (
    ("X-Client-Subject", "CN=admin"),
    ("X-Client-San", "URI:spiffe://example.test/ns/prod/sa/admin"),
    ("X-Client-Fingerprint", "00" * 32),
)


def _cert_id(cert: str | None) -> str:
    return cert or "no-cert"


class TestCertificateMatrix:
    """Certificate kind x (exempt path, protected path, CORS preflight) through nginx, bridge and runner."""

    @pytest.mark.parametrize("cert", CERTS, ids=_cert_id)
    @pytest.mark.parametrize("path", ["/health", "/public/docs/index.html"])
    def test_exempt_path_answers_200_whatever_the_certificate(self, stack: Stack, cert: str | None, path: str) -> None:
        """An exempt path reaches the upstream with a valid, missing, untrusted or expired certificate."""
        reply = stack.clients.request(path, cert=cert)
        stack.expect(reply, 200)
        assert reply.upstream()["path"] == path

    @pytest.mark.parametrize("cert", CERTS, ids=_cert_id)
    def test_protected_path_needs_a_valid_certificate(self, stack: Stack, cert: str | None) -> None:
        """A protected path is allowed only with a valid certificate; otherwise 403 with the plugin's reason."""
        status, reason = PROTECTED[cert]
        reply = stack.clients.request("/orders/42", cert=cert)
        stack.expect(reply, status, reason)
        assert reply.outcome == ("stop" if status != 200 else "rewrite")

    @pytest.mark.parametrize("cert", CERTS, ids=_cert_id)
    def test_cors_preflight_is_exempt_on_a_protected_path(self, stack: Stack, cert: str | None) -> None:
        """An OPTIONS preflight to a protected path is exempt, so browsers get CORS answers without a certificate."""
        reply = stack.clients.request("/orders/42", cert=cert, method="OPTIONS", headers=PREFLIGHT)
        stack.expect(reply, 200)
        assert reply.upstream()["method"] == "OPTIONS"

    @pytest.mark.parametrize("cert", ["untrusted", "expired"])
    def test_post_to_protected_path_with_a_bad_certificate_is_refused(self, stack: Stack, cert: str) -> None:
        """A POST with a body is decided like a GET: the body never reaches the upstream with a bad certificate."""
        reply = stack.clients.request("/orders", cert=cert, method="POST", content=b'{"qty": 1}')
        stack.expect(reply, 403, "verify-failed")


class TestTolerantHandshake:
    """nginx's verify_client in tolerant mode hands invalid certificates to the plugin instead of failing TLS."""

    @pytest.mark.parametrize(
        ("cert", "nginx_reason"),
        [("expired", "certificate has expired"), ("untrusted", "unable to verify the first certificate")],
    )
    def test_invalid_certificate_reaches_the_plugin_as_failed(self, stack: Stack, cert: str, nginx_reason: str) -> None:
        """An expired or untrusted certificate completes the handshake and arrives as FAILED:<reason>."""
        reply = stack.clients.request("/orders/7", cert=cert)
        stack.expect(reply, 403, "verify-failed")
        record = stack.bridge.records[-1]
        assert record.vars["ssl_client_verify"] == f"FAILED:{nginx_reason}"
        assert record.vars["ssl_client_escaped_cert"], "nginx should still expose the presented certificate"
        assert f"detail='{nginx_reason}'" in stack.runner.log()

    def test_valid_certificate_is_verified_by_nginx(self, stack: Stack) -> None:
        """A certificate from the test CA arrives as SUCCESS with the leaf, the SNI and the scheme."""
        reply = stack.clients.request("/orders/7", cert="valid")
        stack.expect(reply, 200)
        record = stack.bridge.records[-1]
        assert record.vars["ssl_client_verify"] == "SUCCESS"
        assert record.vars["ssl_client_escaped_cert"] == escaped(stack.pki.clients["valid"].issued.pem)
        assert (record.vars["ssl_server_name"], record.vars["scheme"]) == ("api.example.test", "https")

    def test_no_certificate_arrives_as_none(self, stack: Stack) -> None:
        """A client without a certificate completes the handshake and arrives as NONE."""
        stack.expect(stack.clients.request("/orders/7"), 403, "no-cert")
        assert stack.bridge.records[-1].vars["ssl_client_verify"] == "NONE"


class TestIdentityMismatch:
    """A valid certificate whose SPIFFE ID is not the required one."""

    def test_wrong_spiffe_id_is_refused_on_a_protected_path(self, stack: Stack) -> None:
        """A certificate from the trusted CA with SPIFFE ID dev gets 403 identity-mismatch."""
        stack.expect(stack.clients.request("/orders/42", cert="wrong_id"), 403, "identity-mismatch")

    def test_wrong_spiffe_id_passes_an_exempt_path(self, stack: Stack) -> None:
        """Exempt paths do not look at identity at all."""
        stack.expect(stack.clients.request("/health", cert="wrong_id"), 200)

    def test_wrong_spiffe_id_passes_a_preflight(self, stack: Stack) -> None:
        """A preflight with the wrong identity is still exempt."""
        reply = stack.clients.request("/orders/42", cert="wrong_id", method="OPTIONS", headers=PREFLIGHT)
        stack.expect(reply, 200)


class TestHostSniMismatch:
    """The TLS identity belongs to the SNI; a request for another Host on that connection is misdirected."""

    @pytest.mark.parametrize("cert", ["valid", None])
    def test_host_other_than_sni_gets_421(self, stack: Stack, cert: str | None) -> None:
        """Host other.example.test on a connection made for api.example.test gets 421, certificate or not."""
        reply = stack.clients.request("/orders/42", cert=cert, host=OTHER_HOST)
        stack.expect(reply, 421, "host-mismatch")

    def test_host_with_port_matches_its_sni(self, stack: Stack) -> None:
        """curl's Host ``api.example.test:<port>`` is the same origin as SNI api.example.test."""
        reply = stack.clients.curl("/orders/42", cert="valid")
        stack.expect(reply, 200)
        assert reply.upstream_headers("host") == [f"api.example.test:{stack.front.ports.https}"]

    def test_exempt_path_is_not_affected_by_the_host(self, stack: Stack) -> None:
        """Exemption is decided before the Host/SNI check, so an exempt path answers 200."""
        stack.expect(stack.clients.request("/health", host=OTHER_HOST), 200)


class TestPlainHttp:
    """The plain-HTTP listener of the same routes (APISIX's port 9080)."""

    def test_protected_path_over_plain_http_is_refused(self, stack: Stack) -> None:
        """Plain HTTP on a protected path gets 403 plain-http."""
        stack.expect(stack.clients.request("/orders/42", listener="http"), 403, "plain-http")

    def test_exempt_path_over_plain_http_answers_200(self, stack: Stack) -> None:
        """Plain HTTP on an exempt path still reaches the upstream."""
        stack.expect(stack.clients.request("/health", listener="http"), 200)

    def test_forged_https_indicators_over_plain_http_change_nothing(self, stack: Stack) -> None:
        """X-Forwarded-Proto and forged harness variables cannot make plain HTTP look like verified TLS."""
        forged = [
            ("X-Forwarded-Proto", "https"),
            ("X-SSL-Client-Verify", "SUCCESS"),
            ("X-E2E-Var-scheme", "=https"),
            ("X-E2E-Var-ssl_client_verify", "=SUCCESS"),
        ]
        reply = stack.clients.request("/orders/42", listener="http", headers=forged)
        stack.expect(reply, 403, "plain-http")
        assert stack.bridge.records[-1].vars.get("scheme") == "http"


class TestReportMode:
    """Route /report/: the same rules, but denials are only logged."""

    @pytest.mark.parametrize(
        ("cert", "reason"),
        [
            (None, "no-cert"),
            ("untrusted", "verify-failed"),
            ("expired", "verify-failed"),
            ("wrong_id", "identity-mismatch"),
        ],
    )
    def test_would_deny_passes_and_is_logged(self, stack: Stack, cert: str | None, reason: str) -> None:
        """A request enforce mode would refuse reaches the upstream and the runner logs the would-deny."""
        path = f"/report/orders/{cert or 'none'}"
        reply = stack.clients.request(path, cert=cert, headers=[("X-Client-Subject", "CN=admin")])
        stack.expect(reply, 200)
        assert reply.upstream_headers("x-client-subject") == [], "a failed certificate must never be vouched for"
        pattern = rf"WARNING event=decision verdict=deny allowed=yes reason={reason} .*mode=report .*path='{path}'"
        assert re.search(pattern, stack.runner.log()), stack.diagnostics()

    def test_valid_certificate_in_report_mode_forwards_identity(self, stack: Stack) -> None:
        """A verified request in report mode is forwarded with its identity headers, like in enforce mode."""
        reply = stack.clients.request("/report/orders/1", cert="valid")
        stack.expect(reply, 200)
        assert reply.upstream_headers("x-client-subject") == ["CN=web-prod"]

    def test_plain_http_in_report_mode_passes(self, stack: Stack) -> None:
        """Even plain HTTP to a protected path passes in report mode."""
        stack.expect(stack.clients.request("/report/orders/1", listener="http"), 200)


class TestIdentityForwarding:
    """Identity headers for the upstream and removal of client-sent copies."""

    def test_verified_request_carries_identity_headers(self, stack: Stack) -> None:
        """The upstream receives subject, SAN list and SHA-256 fingerprint of the verified certificate."""
        reply = stack.clients.request("/orders/42", cert="valid")
        stack.expect(reply, 200)
        der = stack.pki.clients["valid"].issued.der
        assert reply.upstream_headers("x-client-subject") == ["CN=web-prod"]
        assert reply.upstream_headers("x-client-san") == [f"URI:{SPIFFE_PROD}"]
        assert reply.upstream_headers("x-client-fingerprint") == [hashlib.sha256(der).hexdigest()]

    def test_spoofed_identity_headers_are_replaced(self, stack: Stack) -> None:
        """Client-sent identity headers never reach the upstream next to (or instead of) the real ones."""
        reply = stack.clients.request("/orders/42", cert="valid", headers=SPOOFED)
        stack.expect(reply, 200)
        assert reply.upstream_headers("x-client-subject") == ["CN=web-prod"]
        assert reply.upstream_headers("x-client-san") == [f"URI:{SPIFFE_PROD}"]
        assert reply.upstream_headers("x-client-fingerprint") != ["00" * 32]

    @pytest.mark.parametrize("cert", ["valid", None])
    def test_spoofed_identity_headers_are_stripped_on_an_exempt_path(self, stack: Stack, cert: str | None) -> None:
        """On an exempt path no identity is vouched for and the spoofed copies are deleted."""
        reply = stack.clients.request("/health", cert=cert, headers=SPOOFED)
        stack.expect(reply, 200)
        forwarded = {name.lower() for name, _ in reply.upstream()["headers"]}
        assert not forwarded & {"x-client-subject", "x-client-san", "x-client-fingerprint"}

    def test_spoofed_identity_headers_are_stripped_on_a_preflight(self, stack: Stack) -> None:
        """A preflight carrying spoofed identity headers reaches the upstream without them."""
        reply = stack.clients.request("/orders/1", method="OPTIONS", headers=[*PREFLIGHT, *SPOOFED])
        stack.expect(reply, 200)
        assert reply.upstream_headers("x-client-subject") == []


class TestForgedVerificationHeaders:
    """Headers claiming a verified certificate are worth nothing on a TLS route (source apisix)."""

    def test_forged_verify_and_certificate_headers_are_ignored(self, stack: Stack) -> None:
        """x-ssl-client-verify: SUCCESS plus a valid forwarded certificate, without a TLS certificate: still no-cert."""
        valid = stack.pki.clients["valid"].issued.pem
        forged = [
            ("X-SSL-Client-Verify", "SUCCESS"),
            ("X-Client-Cert", escaped(valid)),
            ("X-Forwarded-Client-Cert", f'Cert="{escaped(valid)}"'),
        ]
        stack.expect(stack.clients.request("/orders/42", headers=forged), 403, "no-cert")

    def test_forged_verify_header_does_not_rescue_a_failed_certificate(self, stack: Stack) -> None:
        """An expired certificate stays refused when the client also claims SUCCESS."""
        reply = stack.clients.request("/orders/42", cert="expired", headers=[("X-SSL-Client-Verify", "SUCCESS")])
        stack.expect(reply, 403, "verify-failed")

    def test_forged_harness_variables_are_overwritten_by_nginx(self, stack: Stack) -> None:
        """Client-sent X-E2E-Var-* headers are dropped by nginx, so the harness itself cannot be bypassed."""
        valid = escaped(stack.pki.clients["valid"].issued.pem)
        forged = [("X-E2E-Var-ssl_client_verify", "=SUCCESS"), ("X-E2E-Var-ssl_client_escaped_cert", f"={valid}")]
        stack.expect(stack.clients.request("/orders/42", headers=forged), 403, "no-cert")
        assert stack.bridge.records[-1].vars["ssl_client_verify"] == "NONE"


class TestCurlClient:
    """The same decisions with the curl command line an operator would use."""

    @pytest.mark.parametrize(
        ("cert", "path", "status", "reason"),
        [
            ("valid", "/orders/42", 200, None),
            (None, "/orders/42", 403, "no-cert"),
            ("expired", "/orders/42", 403, "verify-failed"),
            ("self_signed", "/orders/42", 403, "verify-failed"),
            (None, "/health", 200, None),
        ],
    )
    def test_curl_request(self, stack: Stack, cert: str | None, path: str, status: int, reason: str | None) -> None:
        """curl --cert/--key over --resolve gets the same status and reason as httpx."""
        stack.expect(stack.clients.curl(path, cert=cert), status, reason)

    def test_curl_plain_http(self, stack: Stack) -> None:
        """curl over plain HTTP to a protected path gets 403 plain-http."""
        stack.expect(stack.clients.curl("/orders/42", listener="http"), 403, "plain-http")


class TestSessionResumption:
    """TLS session resumption (APISIX's shared session cache): nginx does not re-verify a resumed session."""

    def test_resumed_session_keeps_the_decision(self, stack: Stack) -> None:
        """A resumed session (ssl_session_reused=r) carries the verified certificate and is decided the same."""
        first, session, reused = stack.clients.resumable_request("/orders/1", cert="valid")
        stack.expect(first, 200)
        assert not reused
        second, _, reused = stack.clients.resumable_request("/orders/1", cert="valid", session=session)
        stack.expect(second, 200)
        assert reused
        assert stack.bridge.records[-1].vars["ssl_session_reused"] == "r"

    @pytest.mark.slow
    def test_certificate_expired_since_the_handshake_is_refused_on_resumption(self, stack: Stack) -> None:
        """A session resumed after its certificate expired still says SUCCESS; the plugin re-checks the dates."""
        factory = CertFactory()
        not_after = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=3)
        issued = factory.leaf(stack.pki.ca, cn="web-prod", uris=[SPIFFE_PROD], not_after=not_after)
        stack.pki.add_client("short_lived", issued)
        first, session, _ = stack.clients.resumable_request("/orders/1", cert="short_lived")
        stack.expect(first, 200)
        time.sleep(max(0.0, (not_after - datetime.now(UTC)).total_seconds()) + 1.1)
        later, _, reused = stack.clients.resumable_request("/orders/1", cert="short_lived", session=session)
        assert reused, "the TLS session was not resumed, so this test proves nothing"
        assert stack.bridge.records[-1].vars["ssl_client_verify"] == "SUCCESS"
        stack.expect(later, 403, "expired")
