"""The plugin adapter judges what will be delivered: the Rewrite path, every header spelling, overrides."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from plugins.mtls_guard.forwarded import build_xfcc
from plugins.mtls_guard.identity import load_pem
from plugins.mtls_guard.matchers import authority_host
from plugins.mtls_guard.plugin import MtlsGuard, _may_override, _mentions_override
from plugins.mtls_guard.policy import METHOD_OVERRIDE_HEADERS, compile_policy
from plugins.mtls_guard.schema_readers import PolicyError
from plugins.mtls_guard.tools.explain import explain
from runner.protocol import codec
from tests.certs import CertFactory, escaped

FACTORY = CertFactory()
ROOT = FACTORY.ca("Delivery Root")
LEAF = FACTORY.leaf(ROOT, cn="client")
HOST = "api.example.com"
TLS_OK: dict[str, str | None] = {
    "ssl_client_verify": "SUCCESS",
    "ssl_client_escaped_cert": escaped(LEAF.pem),
    "ssl_server_name": HOST,
}
NO_CERT: dict[str, str | None] = {"ssl_client_verify": "NONE", "ssl_server_name": HOST}
FORWARD = {"forward": {"subject": "x-client-subject", "fingerprint": "x-client-fp"}}
EXEMPT = {
    "exempt": [
        {"id": "public", "path": "/public/.*"},
        {"id": "read", "path": "/docs/.*", "methods": ["GET"]},
        {"id": "cors", "preflight": True},
    ]
}


def run(
    policy: dict[str, Any],
    *,
    method: str = "GET",
    path: str = "/x",
    headers: tuple[tuple[str, str], ...] = (),
    args: tuple[tuple[str, str | None], ...] = (),
    variables: dict[str, str | None] | None = None,
) -> Any:
    compiled = compile_policy(json.dumps(policy))
    return explain(
        MtlsGuard(),
        compiled,
        method=method,
        path=path,
        headers=(("host", HOST), *headers),
        variables=TLS_OK if variables is None else variables,
        args=args,
    )


class TestDeliveredPath:
    @pytest.mark.parametrize(("policy", "variables"), [(EXEMPT, NO_CERT), ({}, TLS_OK), ({"mode": "report"}, NO_CERT)])
    def test_every_request_let_through_carries_the_judged_path(self, policy: dict[str, Any], variables: Any) -> None:
        """Exempt, verified and report-mode requests all get a Rewrite path equal to the $uri judged."""
        result = run(policy, path="/public/a b", variables=variables)
        assert result.stop is None
        assert result.upstream_path == "/public/a b"

    def test_denied_request_has_no_rewrite(self) -> None:
        """A denied request is stopped; nothing is delivered."""
        result = run(EXEMPT, path="/admin", variables=NO_CERT)
        assert result.stop is not None
        assert result.upstream_path is None

    def test_encoded_upstream_uri_is_left_as_it_is(self) -> None:
        """A path an earlier plugin already encoded ($upstream_uri set) is judged decoded once and not rewritten."""
        result = run(EXEMPT, path="/public/a%20b", variables={**NO_CERT, "upstream_uri": "/public/a%20b"})
        assert (result.decision.detail, result.upstream_path) == ("public", None)

    def test_literal_percent_in_uri_is_protected_and_still_delivered_as_judged(self) -> None:
        """A $uri holding "%" (the client sent %25) is not exempt; a verified one is delivered as judged."""
        assert run(EXEMPT, path="/public/%41", variables={**NO_CERT, "upstream_uri": ""}).stop is not None
        verified = run(EXEMPT, path="/public/%41", variables={**TLS_OK, "upstream_uri": ""})
        assert verified.upstream_path == "/public/%41"


class TestHeaderSpellings:
    SPOOFED = (("x_client_subject", "CN=admin"), ("X-CLIENT_fp", "00"), ("x-client-subject", "CN=root"))

    def test_every_spelling_is_deleted_on_an_exempt_request(self) -> None:
        """On an exempt request each spelling an upstream could fold into a forward header is deleted."""
        result = run({**FORWARD, **EXEMPT}, path="/public/x", headers=self.SPOOFED, variables=NO_CERT)
        assert result.upstream_headers == (
            ("x_client_subject", None),
            ("x-client_fp", None),
            ("x-client-subject", None),
        )

    def test_verified_request_gets_only_the_real_identity(self) -> None:
        """On a verified request every spelling is deleted and the canonical header set to the verified identity."""
        result = run(FORWARD, headers=self.SPOOFED)
        fingerprint = load_pem(LEAF.pem).fingerprint_sha256
        assert dict(result.upstream_headers) == {
            "x_client_subject": None,
            "x-client_fp": None,
            "x-client-subject": "CN=client",
            "x-client-fp": fingerprint,
        }

    def test_header_spellings_reads_no_entry_when_none_is_present(self) -> None:
        """The codec finds spellings by folding names; a frame without any returns () (fast path)."""
        frame = codec.http_req_call_frame(
            id=1, conf_token=1, method=0, path="/", headers=(("x-other", "x_client_subject"),)
        )
        call = codec.decode_http_req_call(frame[4:])
        assert call.header_spellings(frozenset({b"x-client-subject"})) == ()
        frame = codec.http_req_call_frame(id=1, conf_token=1, method=0, path="/", headers=(("X_Client-Subject", "a"),))
        call = codec.decode_http_req_call(frame[4:])
        assert call.header_spellings(frozenset({b"x-client-subject"})) == ("X_Client-Subject",)

    def test_forwarded_certificate_under_another_spelling_is_refused(self) -> None:
        """In header mode a certificate header sent as x_forwarded_client_cert is refused, never read."""
        policy = {"source": {"type": "header", "format": "xfcc", "trusted_proxies": ["10.0.0.0/8"], "ca": ROOT.pem}}
        xfcc = build_xfcc(load_pem(LEAF.pem))
        good = run(policy, headers=(("x-forwarded-client-cert", xfcc),), variables={"realip_remote_addr": "10.0.0.1"})
        assert good.decision.reason == "verified"
        aliased = run(
            policy, headers=(("x_forwarded_client_cert", xfcc),), variables={"realip_remote_addr": "10.0.0.1"}
        )
        assert (aliased.decision.reason, aliased.decision.detail) == ("forwarded-cert-invalid", "aliased-header")

    def test_forward_names_that_fold_together_are_refused(self) -> None:
        """Two forward headers an upstream would read as one are a policy error."""
        with pytest.raises(PolicyError, match="same header"):
            compile_policy({"forward": {"subject": "x-id", "san": "x_id"}})


class TestMethodRules:
    @pytest.mark.parametrize(
        ("headers", "args"),
        [
            ((("X-HTTP-Method-Override", "DELETE"),), ()),
            ((("x_http_method_override", "DELETE"),), ()),
            ((("X-HTTP-Method", "DELETE"),), ()),
            ((("X-Method-Override", "DELETE"),), ()),
            ((), (("_method", "DELETE"),)),
            ((), (("_METHOD", "DELETE"),)),
            ((), (("a", "1;_method=DELETE"),)),
            ((), (("x", "%5Fmethod=DELETE"),)),
        ],
    )
    def test_override_defeats_method_rules(self, headers: Any, args: Any) -> None:
        """A GET-only rule never exempts a request carrying a method override, whatever its spelling."""
        assert run(EXEMPT, path="/docs/a", headers=headers, args=args, variables=NO_CERT).stop is not None

    @given(st.text(max_size=40), st.sampled_from(["_method", "_METHOD", "_MeThOd", "%5fmethod", "%5FMETHOD"]))
    def test_override_prefilter_never_misses_a_mention(self, text: str, mention: str) -> None:
        """The folded-frame prefilter sees every arg text that mentions _method, Unicode around it included."""
        for value in (text + mention, mention + text, text[:5] + mention + text[5:]):
            assert _mentions_override(value)
            assert _may_override(codec.fold_header_name(value.encode("utf-8", "surrogateescape")))

    def test_override_prefilter_sees_every_override_header(self) -> None:
        """Each method-override header name, in any spelling, passes the prefilter."""
        for name in METHOD_OVERRIDE_HEADERS:
            for spelling in (name, name.upper(), name.replace(b"-", b"_")):
                assert _may_override(codec.fold_header_name(spelling))

    def test_post_form_defeats_method_rules(self) -> None:
        """A POST form may carry _method: a rule naming POST does not exempt it."""
        policy = {"exempt": [{"path": "/hook", "methods": ["POST"]}]}
        form = (("content-type", "application/x-www-form-urlencoded"),)
        assert run(policy, method="POST", path="/hook", headers=form, variables=NO_CERT).stop is not None
        json_body = (("content-type", "application/json"),)
        assert run(policy, method="POST", path="/hook", headers=json_body, variables=NO_CERT).stop is None

    def test_override_does_not_matter_to_rules_without_methods(self) -> None:
        """A path rule exempting every method is unaffected by override headers."""
        headers = (("X-HTTP-Method-Override", "DELETE"),)
        assert run(EXEMPT, path="/public/a", headers=headers, variables=NO_CERT).stop is None

    def test_preflight_needs_both_cors_headers(self) -> None:
        """A preflight rule exempts OPTIONS only with Origin and Access-Control-Request-Method."""
        cors = (("origin", "https://app.example"), ("access-control-request-method", "PUT"))
        assert run(EXEMPT, method="OPTIONS", headers=cors, variables=NO_CERT).decision.detail == "cors"
        assert run(EXEMPT, method="OPTIONS", headers=cors[:1], variables=NO_CERT).stop is not None
        assert run(EXEMPT, method="GET", headers=cors, variables=NO_CERT).stop is not None

    def test_preflight_rule_cannot_name_other_methods(self) -> None:
        """A preflight rule with methods other than OPTIONS is a policy error."""
        with pytest.raises(PolicyError, match="OPTIONS only"):
            compile_policy({"exempt": [{"preflight": True, "methods": ["GET"]}]})


class TestAuthorityHost:
    @pytest.mark.parametrize(
        ("value", "host"),
        [
            ("API.example.com", "api.example.com"),
            ("api.example.com:8443", "api.example.com"),
            ("api.example.com.", "api.example.com"),
            ("[::1]:443", "[::1]"),
            ("api.example.com:x", None),
            ("[::1", None),
            ("", None),
            (None, None),
        ],
    )
    def test_host_header_normalised(self, value: str | None, host: str | None) -> None:
        """The Host header is compared lower-case, without port or trailing dot; malformed values match nothing."""
        assert authority_host(value) == host
