"""Hostile requests through the real nginx (real TLS, raw request lines), judged by what the upstream would do.

The guard decides on APISIX's view of a request (``$uri``, the method, lower-cased headers); the upstream
acts on what nginx+APISIX deliver (the raw request-target, headers in their original spelling) and reads
it like a real framework would (``upstreams``). Every bypass the review found was a difference between
the two, so the oracle looks at the upstream's side:

* A request without a valid client certificate is either refused (400/403/421, the upstream never
  contacted) or EVERY framework reading is covered by an exemption of the route that judged it: the
  resource is public (``/public/...``, ``/api/health``), or the method every framework acts on is the
  one a method exemption allowed, or the Host is the exempt host on a connection made for it.
* For requests with spoofed identity headers, the upstream never sees (in any spelling, after CGI
  folding) an identity header value the plugin did not set, and sees the real one only when verified.
* Paths that look exempt to the upstream but protected to nginx are still served to valid clients,
  with their identity.

Routes of this world (one stack for the module):

``/``       ``main``: exempt ``/public/.*``, ``/api/health``, any OPTIONS request, and Host
            other.example.test; protected resources ``admin``, ``api``, ``orders``.
``/cors/``  ``cors``: only a ``"preflight": true`` rule (OPTIONS with Origin and Access-Control-Request-Method).
``/hdr/``   ``hdr``: header mode, URL-encoded PEM from the trusted front proxy; exempt ``/hdr/health``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import pytest

from tests.certs import Issued, escaped
from tests.e2e.apisix_uri import uri_safe_encode
from tests.e2e.bridge import Route
from tests.e2e.clients import Reply
from tests.e2e.nginx_env import NginxEnv
from tests.e2e.pki import OTHER_HOST, SPIFFE_PROD, Pki, constrained_chains
from tests.e2e.policies import FORWARD, REQUIRE, header_policy
from tests.e2e.stack import Stack, running_stack
from tests.e2e.upstreams import cgi_fold

pytestmark = pytest.mark.e2e

REFUSED = frozenset({400, 403, 421})
IDENTITY = tuple(cgi_fold(name) for name in FORWARD.values())  # X_CLIENT_SUBJECT, X_CLIENT_SAN, ...
PREFLIGHT = [("Origin", "https://app.example.test"), ("Access-Control-Request-Method", "PUT")]


def main_policy() -> dict[str, Any]:
    return {
        "exempt": [
            {"id": "public", "path": "/public/.*"},
            {"id": "health", "path": "/api/health"},
            {"id": "cors-preflight", "methods": ["OPTIONS"]},
            {"id": "status-host", "hosts": [OTHER_HOST]},
        ],
        "require": REQUIRE,
        "reject": {"expose_reason": True},
        "forward": FORWARD,
    }


def cors_policy() -> dict[str, Any]:
    return {
        "exempt": [{"id": "preflight", "preflight": True}],
        "require": REQUIRE,
        "reject": {"expose_reason": True},
        "forward": FORWARD,
    }


@pytest.fixture(scope="module")
def hostile(nginx_env: NginxEnv, pki: Pki, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """The hostile world: routes main, cors and hdr behind one nginx, bridge and runner."""
    routes = [
        Route.mtls_guard("main", "/", main_policy()),
        Route.mtls_guard("cors", "/cors/", cors_policy()),
        Route.mtls_guard("hdr", "/hdr/", header_policy(pki, "/hdr/", "pem-urlencoded")),
    ]
    with running_stack(nginx_env, pki, tmp_path_factory.mktemp("hostile"), routes) as world:
        yield world


@pytest.fixture(scope="module")
def chains(pki: Pki) -> dict[str, Issued]:
    return constrained_chains(pki)


# -- the oracle ------------------------------------------------------------------------------------


def _header(echo: dict[str, Any], name: str) -> list[str]:
    return [v for n, v in echo["headers"] if n.lower() == name]


def _public(route: str, segments: Sequence[str]) -> bool:
    if route == "main":
        return (bool(segments) and segments[0] == "public") or list(segments) == ["api", "health"]
    if route == "hdr":
        return list(segments) == ["hdr", "health"]
    return False


def _covered(echo: dict[str, Any], reading: dict[str, Any], sni: str | None) -> bool:
    """Whether one framework's reading of the delivered request is exempt under the route that judged it."""
    route = echo["route"]
    if _public(route, reading["segments"]):
        return True
    if route == "main" and reading["method"] == "OPTIONS":
        return True
    if route == "cors" and reading["method"] == "OPTIONS":
        return bool(_header(echo, "origin")) and bool(_header(echo, "access-control-request-method"))
    if route == "main":
        return [_host_name(h) for h in _header(echo, "host")] == [OTHER_HOST] and sni in (None, OTHER_HOST)
    return False


def _host_name(host: str) -> str:
    """A Host header value as an upstream compares it: no port, case-insensitive, FQDN dot dropped."""
    return host.rpartition(":")[0].lower().rstrip(".") if ":" in host else host.lower().rstrip(".")


def _story(stack: Stack, reply: Reply) -> str:
    record = stack.bridge.records[-1] if stack.bridge.records else None
    judged = f"judged {record.method} {record.path!r} (raw {record.target!r})" if record else "no bridge record"
    return f"{reply.describe()}\n{judged}{stack.diagnostics()}"


def assert_refused(stack: Stack, reply: Reply) -> None:
    """Refused by nginx or the plugin (400/403/421): the upstream was never contacted."""
    assert reply.status in REFUSED, f"expected a refusal, the upstream answered:\n{_story(stack, reply)}"
    assert reply.outcome in (None, "stop"), _story(stack, reply)


def assert_no_bypass(stack: Stack, reply: Reply, *, sni: str | None = None) -> None:
    """The oracle for a request without a valid certificate (see the module docstring)."""
    if reply.status in REFUSED and reply.outcome in (None, "stop"):
        return
    echo = reply.upstream()
    exposed = {
        name: f"{reading['method']} {'/'.join(reading['segments'])!r}"
        for name, reading in echo["frameworks"].items()
        if not _covered(echo, reading, sni)
    }
    assert not exposed, (
        f"the upstream received {echo['method']} {echo['path']!r} Host {_header(echo, 'host')} "
        f"(the plugin judged {echo['judged_path']!r}); "
        f"not exempt for {exposed}\n{_story(stack, reply)}"
    )


def assert_identity(reply: Reply, verified: bool) -> dict[str, Any]:
    """Identity headers at the upstream, after CGI folding: only what the plugin set, and only when verified."""
    echo = reply.upstream()
    set_by_plugin: dict[str, list[str]] = {}
    for name, value in echo["rewrite"]["headers"]:
        if value is not None:
            set_by_plugin.setdefault(cgi_fold(name), []).append(value)
    seen = {fold: echo["cgi_headers"].get(fold, []) for fold in IDENTITY}
    assert seen == {fold: set_by_plugin.get(fold, []) for fold in IDENTITY}, (
        f"identity headers not set by the plugin reached the upstream: {seen}; delivered {echo['headers']}"
    )
    if verified:
        assert seen["X_CLIENT_SUBJECT"] == ["CN=web-prod"], seen
        assert seen["X_CLIENT_SAN"] == [f"URI:{SPIFFE_PROD}"], seen
        assert len(seen["X_CLIENT_FINGERPRINT"]) == 1, seen
    else:
        assert seen == {fold: [] for fold in IDENTITY}, seen
    return echo


def assert_served(stack: Stack, reply: Reply) -> dict[str, Any]:
    """A valid client is served; where any framework reads a protected resource, the identity comes along."""
    assert reply.status == 200, _story(stack, reply)
    echo = reply.upstream()
    if not all(_public(echo["route"], r["segments"]) for r in echo["frameworks"].values()):
        assert_identity(reply, verified=True)
    return echo


# -- paths -----------------------------------------------------------------------------------------

# A protected resource that nginx's $uri (decoded, dot-resolved, slash-merged) turns into an exempt path.
PROTECTED_AS_EXEMPT = [
    "/admin/..%2Fpublic/x",
    "/admin/../public/x",
    "/admin/%2e%2e/public/x",
    "/admin/.%2e/public/x",
    "/admin/%2E%2E%2Fpublic/x",
    "/admin;x/../public/x",
    "/admin//..//public/x",
    "/admin/x/..%2F..%2Fapi/health",
    "/api/x/../health",
    "/%2570ublic/x",
    "/admin%EF%BC%8F..%EF%BC%8Fpublic/x",
    "/admin\\..\\public\\x",
    "/orders/1/..%2F..%2Fpublic/x?a=1&b=%2F",
]
# An exempt-looking path that nginx or some upstream reads as a protected resource.
EXEMPT_AS_PROTECTED = [
    "/public/..%2Fadmin",
    "/public/%2e%2e/admin",
    "/public/..;/admin",
    "/public%2F..%2Fadmin",
    "/public/%252e%252e/admin",
    "/public/..%252Fadmin",
    "/api/health%0a",
    "/api/health/",
    "/API/health",
    "/public\\..\\admin",
    "/public/x%EF%BC%8F..%EF%BC%8F..%EF%BC%8Fadmin",
    "/public/x\uff0f..\uff0f..\uff0fadmin",
    "/public/x/%EF%BC%8E%EF%BC%8E/%EF%BC%8E%EF%BC%8E/admin",
    "/public/x?/../admin",
    "/public/x%3F/../../admin",
    "/public/x%23/../../admin",
]
# Legitimate encoded requests of a valid client: the upstream receives them byte for byte (query included).
LEGIT = [
    "/public/a%20b",
    "/public/caf%C3%A9",
    "/orders/42?x=%2F",
    "/orders/42?x=%2F&y=a+b&z=%E2%82%AC&flag&_q=%3B",
    "/orders/a;b=c/1?q=%3B",
]


class TestPathConfusion:
    """Paths that nginx and the upstream read differently, sent raw over TLS."""

    @pytest.mark.parametrize("target", PROTECTED_AS_EXEMPT)
    def test_protected_path_dressed_as_exempt_is_not_exempt(self, hostile: Stack, target: str) -> None:
        """Without a certificate, a protected resource whose $uri looks exempt is refused or public to every reader."""
        assert_no_bypass(hostile, hostile.clients.raw(target))

    @pytest.mark.parametrize("target", EXEMPT_AS_PROTECTED)
    def test_exempt_looking_path_read_as_protected_is_not_exempt(self, hostile: Stack, target: str) -> None:
        """Without a certificate, an exempt-looking path some upstream reads as protected is refused."""
        assert_no_bypass(hostile, hostile.clients.raw(target))

    @pytest.mark.parametrize("target", EXEMPT_AS_PROTECTED)
    def test_exempt_looking_path_read_as_protected_serves_valid_clients(self, hostile: Stack, target: str) -> None:
        """With a valid certificate the same request is served, with the identity wherever a framework reads a
        protected resource."""
        assert_served(hostile, hostile.clients.raw(target, cert="valid"))

    @pytest.mark.parametrize("target", LEGIT)
    def test_legitimate_encoded_request_reaches_the_upstream_byte_for_byte(self, hostile: Stack, target: str) -> None:
        """A valid client's encoded path and query reach the upstream exactly as sent."""
        echo = assert_served(hostile, hostile.clients.raw(target, cert="valid"))
        assert echo["path"] == target

    def test_query_survives_an_exempt_path(self, hostile: Stack) -> None:
        """On an exempt path without a certificate the query string reaches the upstream byte for byte."""
        target = "/public/x?next=%2Fadmin%3Fa%3D1&b=%ZZ&c"
        reply = hostile.clients.raw(target)
        assert_no_bypass(hostile, reply)
        assert reply.upstream()["path"].partition("?")[2] == target.partition("?")[2]

    def test_nginx_normalises_uri_but_forwards_the_raw_target(self, hostile: Stack) -> None:
        """The harness itself: the plugin judges $uri, APISIX's variables are answered, the raw target is proxied."""
        reply = hostile.clients.raw("/orders/7/../8?x=%2F", cert="valid")
        echo = assert_served(hostile, reply)
        assert echo["judged_path"] == "/orders/8"
        record = hostile.bridge.records[-1]
        assert record.vars["real_request_uri"] == "/orders/7/../8?x=%2F"
        assert record.vars["upstream_uri"] == ""
        assert record.vars["request_uri"] == "/orders/8?x=%2F"
        if echo["rewrite"]["path"] is None:
            assert echo["path"] == "/orders/7/../8?x=%2F"


# Encoded separators in a valid client's path: every framework should read the delivered request as it
# would have read the request the client sent.
ENCODED_SEPARATORS = ["/orders/a%2Fb", "/orders/a%3Bb", "/orders/a%5Cb", "/orders/50%25", "/orders/42%3Fx%23y"]


class TestVerifiedRequestsGetTheJudgedPath:
    """What the upstream receives for a valid client's percent-encoded separators: the $uri that was judged.

    The documented trade-off (SECURITY.md): mtls-guard delivers nginx's decoded $uri to every request it lets
    through, verified ones included, because the route (and so the identity rules) was chosen on that $uri.
    A %2F inside a segment therefore reaches the upstream as "/", a %3B as ";".
    """

    @pytest.mark.parametrize("target", ENCODED_SEPARATORS)
    def test_encoded_separator_is_delivered_as_judged(self, hostile: Stack, target: str) -> None:
        """A verified request with %2F, %3B, %5C, %25, %3F or %23 reaches the upstream as the re-encoded $uri,
        and every framework reads the resource the route was judged for."""
        echo = assert_served(hostile, hostile.clients.raw(target, cert="valid"))
        judged = echo["judged_path"]
        assert echo["path"].split("?", 1)[0] == uri_safe_encode(judged)
        for name, reading in echo["frameworks"].items():
            assert reading["segments"][:1] == ["orders"], (name, reading)


class TestThroughTheFrontProxy:
    """Path tricks through the header-mode front proxy (it forwards the raw target too)."""

    @pytest.mark.parametrize("target", ["/hdr/orders/..%2Fhealth", "/hdr/orders/../health", "/hdr/x/%2e%2e/health"])
    def test_protected_path_dressed_as_exempt_through_the_proxy(self, hostile: Stack, target: str) -> None:
        """Without a certificate, a header-mode route's protected path that nginx resolves to its exempt path is
        refused or read as the exempt path everywhere."""
        assert_no_bypass(hostile, hostile.clients.raw(target, listener="front"))


# -- identity headers --------------------------------------------------------------------------------

SPELLINGS = {
    "underscored": [("x_client_subject", "CN=admin")],
    "mixed": [("X_Client-San", "URI:spiffe://example.test/ns/prod/sa/admin")],
    "mixed-case": [("x-CLIENT_fingerprint", "00" * 32)],
    "two-spellings": [("X-Client-Subject", "CN=admin"), ("x_client_subject", "CN=root")],
    "canonical": [("X-Client-Subject", "CN=admin"), ("X-CLIENT-SAN", "URI:spiffe://example.test/admin")],
    "all-underscored": [
        ("x_client_subject", "CN=admin"),
        ("x_client_san", "URI:spiffe://example.test/admin"),
        ("x_client_fingerprint", "ff" * 32),
    ],
}


class TestIdentitySpellings:
    """Client-sent identity headers in every spelling an upstream folds into the same name."""

    @pytest.mark.parametrize("spelling", SPELLINGS)
    def test_spoofed_spellings_are_deleted_on_an_exempt_path(self, hostile: Stack, spelling: str) -> None:
        """On an exempt path without a certificate no spelling of an identity header reaches the upstream."""
        reply = hostile.clients.raw("/public/x", headers=SPELLINGS[spelling])
        assert reply.status == 200, _story(hostile, reply)
        assert_identity(reply, verified=False)

    @pytest.mark.parametrize("spelling", SPELLINGS)
    def test_spoofed_spellings_are_replaced_on_a_verified_request(self, hostile: Stack, spelling: str) -> None:
        """With a valid certificate the upstream sees exactly the real identity, whatever the client sent."""
        reply = hostile.clients.raw("/orders/1", cert="valid", headers=SPELLINGS[spelling])
        assert reply.status == 200, _story(hostile, reply)
        assert_identity(reply, verified=True)

    @pytest.mark.parametrize("spelling", SPELLINGS)
    def test_spoofed_spellings_through_the_front_proxy(self, hostile: Stack, spelling: str) -> None:
        """Through a front proxy passing underscored headers, a header-mode route forwards only the real identity."""
        reply = hostile.clients.raw("/hdr/orders/1", cert="valid", listener="front", headers=SPELLINGS[spelling])
        assert reply.status == 200, _story(hostile, reply)
        assert_identity(reply, verified=True)

    def test_underscored_certificate_header_without_a_certificate_is_refused(self, hostile: Stack) -> None:
        """x_client_cert with a valid PEM, passed on by the front proxy next to its own empty X-Client-Cert, is
        never taken for the forwarded certificate."""
        forged = [("x_client_cert", escaped(hostile.pki.clients["valid"].issued.pem))]
        assert_refused(hostile, hostile.clients.raw("/hdr/orders/1", listener="front", headers=forged))

    def test_underscored_certificate_header_next_to_a_real_one(self, hostile: Stack) -> None:
        """With a real certificate at the proxy and a forged x_client_cert, the request is refused or served as the
        real client, and the upstream never sees a certificate header in any spelling."""
        forged = [("x_client_cert", escaped(hostile.pki.clients["wrong_id"].issued.pem))]
        reply = hostile.clients.raw("/hdr/orders/1", cert="valid", listener="front", headers=forged)
        if reply.status in REFUSED:
            assert_refused(hostile, reply)
            return
        echo = assert_identity(reply, verified=True)
        assert "X_CLIENT_CERT" not in echo["cgi_headers"], echo["headers"]

    def test_underscored_certificate_header_is_stripped_on_the_exempt_path(self, hostile: Stack) -> None:
        """The header-mode exempt path reaches the upstream without any spelling of the certificate header."""
        forged = [("x_client_cert", escaped(hostile.pki.clients["valid"].issued.pem)), ("X_Client_Subject", "CN=a")]
        reply = hostile.clients.raw("/hdr/health", listener="front", headers=forged)
        assert reply.status == 200, _story(hostile, reply)
        echo = assert_identity(reply, verified=False)
        assert "X_CLIENT_CERT" not in echo["cgi_headers"], echo["headers"]


# -- Host vs SNI -----------------------------------------------------------------------------------------


class TestHostExemption:
    """Route main exempts Host other.example.test; the server certificate covers it too."""

    def test_exempt_host_on_a_connection_for_another_name_gets_421(self, hostile: Stack) -> None:
        """SNI api.example.test with Host other.example.test (the exempt host) is misdirected: 421, no upstream."""
        reply = hostile.clients.raw("/orders/1", host=OTHER_HOST, sni="api.example.test")
        assert reply.status == 421, _story(hostile, reply)
        assert_refused(hostile, reply)

    def test_exempt_host_with_port_on_a_connection_for_another_name_gets_421(self, hostile: Stack) -> None:
        """The same with ``Host: other.example.test:<port>`` (the form curl and browsers send)."""
        host = f"{OTHER_HOST}:{hostile.front.ports.https}"
        reply = hostile.clients.raw("/admin/users", host=host, sni="api.example.test")
        assert reply.status == 421, _story(hostile, reply)
        assert_refused(hostile, reply)

    def test_exempt_host_on_its_own_connection_is_exempt(self, hostile: Stack) -> None:
        """SNI and Host other.example.test: the host exemption applies without a certificate."""
        reply = hostile.clients.raw("/orders/1", host=OTHER_HOST, sni=OTHER_HOST)
        assert reply.status == 200, _story(hostile, reply)
        assert_no_bypass(hostile, reply, sni=OTHER_HOST)
        assert_identity(reply, verified=False)

    def test_other_host_on_a_connection_for_the_exempt_name_gets_421(self, hostile: Stack) -> None:
        """SNI other.example.test (the exempt host) with Host api.example.test is protected, so misdirected: 421."""
        reply = hostile.clients.raw("/orders/1", host="api.example.test", sni=OTHER_HOST)
        assert reply.status == 421, _story(hostile, reply)
        assert_refused(hostile, reply)

    @pytest.mark.parametrize(
        ("target", "host", "sni"),
        [
            ("https://other.example.test/orders/1", "api.example.test", OTHER_HOST),
            ("https://other.example.test/orders/1", OTHER_HOST, "api.example.test"),
            ("https://api.example.test/orders/1", OTHER_HOST, OTHER_HOST),
            ("/orders/1", "OTHER.Example.TEST.", OTHER_HOST),
            ("/orders/1", f"{OTHER_HOST}:1", OTHER_HOST),
        ],
        ids=[
            "absolute-exempt-host-host-header-api",
            "absolute-exempt-host-sni-api",
            "absolute-api",
            "case-dot",
            "port",
        ],
    )
    def test_absolute_form_and_host_spellings(self, hostile: Stack, target: str, host: str, sni: str) -> None:
        """Absolute-form targets (nginx's $host comes from the request line, the upstream gets the Host header)
        and odd Host spellings never exempt a request the upstream reads as another host."""
        assert_no_bypass(hostile, hostile.clients.raw(target, host=host, sni=sni), sni=sni)

    def test_exempt_host_over_plain_http_matches_the_host_header(self, hostile: Stack) -> None:
        """Over plain HTTP there is no SNI: the host exemption matches the Host header alone, so Host
        other.example.test is exempt (200 without a certificate), documented plugin behaviour."""
        reply = hostile.clients.raw("/orders/1", listener="http", host=OTHER_HOST)
        assert reply.status == 200, _story(hostile, reply)
        assert_no_bypass(hostile, reply)
        assert_identity(reply, verified=False)

    def test_other_host_over_plain_http_is_refused_as_plain_http(self, hostile: Stack) -> None:
        """Over plain HTTP a non-exempt Host on a protected path gets 403 plain-http."""
        reply = hostile.clients.raw("/orders/1", listener="http")
        assert (reply.status, reply.reason) == (403, "plain-http"), _story(hostile, reply)


# -- method override -------------------------------------------------------------------------------------

OVERRIDES = {
    "X-HTTP-Method-Override": ("/orders/1", [("X-HTTP-Method-Override", "DELETE")]),
    "x_http_method_override": ("/orders/1", [("x_http_method_override", "DELETE")]),
    "X-Method-Override": ("/orders/1", [("X-Method-Override", "DELETE")]),
    "X-HTTP-Method": ("/orders/1", [("X-HTTP-Method", "DELETE")]),
    "X_HTTP_Method": ("/orders/1", [("X_HTTP_Method", "delete")]),
    "_method": ("/orders/1?_method=DELETE", []),
    "_method-lower": ("/orders/1?a=1&_method=delete", []),
    "_method-encoded": ("/orders/1?%5Fmethod=DELETE", []),
    "_method-after-semicolon": ("/orders/1?a=1;_method=DELETE", []),
}


class TestMethodOverride:
    """Route main exempts OPTIONS; frameworks honour method overrides, so an OPTIONS may act as a DELETE."""

    @pytest.mark.parametrize("override", OVERRIDES)
    def test_options_with_a_method_override_is_refused(self, hostile: Stack, override: str) -> None:
        """An OPTIONS to a protected path that some framework would run as DELETE is refused without a certificate."""
        target, headers = OVERRIDES[override]
        reply = hostile.clients.raw(target, method="OPTIONS", headers=headers)
        assert_refused(hostile, reply)

    @pytest.mark.parametrize("override", OVERRIDES)
    def test_preflight_with_a_method_override_is_refused(self, hostile: Stack, override: str) -> None:
        """The same override on a well-formed preflight (Origin, Access-Control-Request-Method) is refused too."""
        target, headers = OVERRIDES[override]
        reply = hostile.clients.raw(target, method="OPTIONS", headers=[*PREFLIGHT, *headers])
        assert_refused(hostile, reply)

    @pytest.mark.parametrize(
        ("method", "target"), [("options", "/orders/1"), ("OPTIONS", "*"), ("OPTIONS ", "/orders/1")]
    )
    def test_odd_options_request_lines(self, hostile: Stack, method: str, target: str) -> None:
        """A lower-case method, the asterisk form and a doubled space are refused or read as OPTIONS everywhere."""
        assert_no_bypass(hostile, hostile.clients.raw(target, method=method))

    def test_plain_options_is_exempt(self, hostile: Stack) -> None:
        """An OPTIONS without any override is exempt under the methods rule and every framework runs OPTIONS."""
        reply = hostile.clients.raw("/orders/1", method="OPTIONS")
        assert reply.status == 200, _story(hostile, reply)
        assert_no_bypass(hostile, reply)

    def test_override_on_a_public_path_is_harmless(self, hostile: Stack) -> None:
        """A method override on a path exemption (any method) is exempt: every framework reads a public resource."""
        reply = hostile.clients.raw("/public/x", method="POST", headers=[("X-HTTP-Method-Override", "DELETE")])
        assert reply.status == 200, _story(hostile, reply)
        assert_no_bypass(hostile, reply)

    @pytest.mark.parametrize("cert", [None, "valid"])
    def test_delete_overridden_to_options(self, hostile: Stack, cert: str | None) -> None:
        """A DELETE claiming to be an OPTIONS is judged as a DELETE: refused without a certificate, served with one."""
        headers = [("X-HTTP-Method-Override", "OPTIONS")]
        reply = hostile.clients.raw("/orders/1", method="DELETE", cert=cert, headers=headers)
        if cert is None:
            assert_refused(hostile, reply)
        else:
            assert_served(hostile, reply)


class TestPreflightRule:
    """Route cors: ``{"preflight": true}`` exempts only OPTIONS with Origin and Access-Control-Request-Method."""

    def test_real_preflight_is_exempt(self, hostile: Stack) -> None:
        """A browser's preflight reaches the upstream without a certificate."""
        reply = hostile.clients.raw("/cors/orders/1", method="OPTIONS", headers=PREFLIGHT)
        assert reply.status == 200, _story(hostile, reply)
        assert_no_bypass(hostile, reply)

    @pytest.mark.parametrize(
        "headers",
        [[], PREFLIGHT[:1], PREFLIGHT[1:]],
        ids=["no-cors-headers", "origin-only", "request-method-only"],
    )
    def test_options_that_is_not_a_preflight_is_refused(self, hostile: Stack, headers: list[tuple[str, str]]) -> None:
        """An OPTIONS without both CORS preflight headers is not exempt under a preflight rule."""
        assert_refused(hostile, hostile.clients.raw("/cors/orders/1", method="OPTIONS", headers=headers))

    @pytest.mark.parametrize("override", OVERRIDES)
    def test_preflight_with_a_method_override_is_refused(self, hostile: Stack, override: str) -> None:
        """A preflight some framework would run as DELETE is refused."""
        target, headers = OVERRIDES[override]
        reply = hostile.clients.raw(f"/cors{target}", method="OPTIONS", headers=[*PREFLIGHT, *headers])
        assert_refused(hostile, reply)

    def test_get_with_preflight_headers_is_refused(self, hostile: Stack) -> None:
        """CORS headers on a GET exempt nothing."""
        assert_refused(hostile, hostile.clients.raw("/cors/orders/1", headers=PREFLIGHT))

    def test_valid_client_is_served(self, hostile: Stack) -> None:
        """A valid certificate is served on the preflight route with its identity."""
        assert_served(hostile, hostile.clients.raw("/cors/orders/1", cert="valid"))


# -- chain constraints in header mode -----------------------------------------------------------------------


class TestForwardedChainConstraints:
    """RFC 5280 path constraints on a chain forwarded in header mode.

    nginx has no variable for the client's chain (``$ssl_client_escaped_cert`` is the leaf), so the front
    proxy cannot forward one; a proxy that does (AWS ALB: leaf then chain in one URL-encoded value) is
    played by a client at the trusted address 127.0.0.1 talking to the plain listener.
    """

    def _send(self, hostile: Stack, cert: Issued) -> Reply:
        return hostile.clients.raw(
            "/hdr/orders/1", listener="http", headers=[("X-Client-Cert", escaped(cert.chain_pem))]
        )

    @pytest.mark.parametrize("name", ["partner_ok", "pathlen_ok"])
    def test_chain_within_its_constraints_is_accepted(
        self, hostile: Stack, chains: dict[str, Issued], name: str
    ) -> None:
        """A leaf inside its sub-CA's constraints is verified (the control: the chain does reach the plugin)."""
        reply = self._send(hostile, chains[name])
        assert reply.status == 200, _story(hostile, reply)
        fingerprint = hashlib.sha256(chains[name].der).hexdigest()
        assert reply.upstream_headers("x-client-fingerprint") == [fingerprint]

    def test_leaf_outside_the_name_constraints_is_refused(self, hostile: Stack, chains: dict[str, Issued]) -> None:
        """A sub-CA permitted only DNS partner.example cannot vouch for a leaf named billing.internal."""
        assert_refused(hostile, self._send(hostile, chains["partner_escape"]))

    def test_path_length_zero_violation_is_refused(self, hostile: Stack, chains: dict[str, Issued]) -> None:
        """A sub-CA with pathLenConstraint 0 cannot have issued the CA that issued the leaf."""
        assert_refused(hostile, self._send(hostile, chains["pathlen_escape"]))
