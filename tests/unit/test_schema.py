"""Policy schema: accepted vocabulary, normalisation, and errors that name the offending key path."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Any

import pytest

from plugins.mtls_guard.forwarded import ForwardedFormat
from plugins.mtls_guard.library import PolicyLibrary
from plugins.mtls_guard.matchers import EmailPattern, UriPattern
from plugins.mtls_guard.policy import compile_policy
from plugins.mtls_guard.policy_config import (
    ApisixSource,
    ExemptRule,
    Forward,
    HeaderSource,
    Mode,
    PolicyConfig,
    Reject,
    Requirements,
)
from plugins.mtls_guard.schema import parse_policy
from plugins.mtls_guard.schema_readers import PolicyError
from tests.certs import CertFactory

FACTORY = CertFactory()
CA = FACTORY.ca("Schema Root")
LEAF = FACTORY.leaf(CA, cn="not-a-ca")
FP = "AB:" * 31 + "CD"
HEADER_SOURCE = {"type": "header", "format": "xfcc", "trusted_proxies": ["10.0.0.0/8"], "ca": CA.pem}


def error_of(document: object) -> str:
    with pytest.raises(PolicyError) as info:
        compile_policy(document if isinstance(document, str) else json.dumps(document))
    return str(info.value)


class TestValidPolicies:
    def test_empty_policy_defaults(self) -> None:
        """An empty object is the strictest default: enforce, no exemptions, APISIX source, SNI match."""
        assert parse_policy({}) == PolicyConfig()
        assert PolicyConfig().mode is Mode.ENFORCE
        assert PolicyConfig().require_sni_match

    def test_blank_conf_is_the_default_policy(self) -> None:
        """A blank route conf compiles to the default policy rather than failing."""
        assert compile_policy("  ").config == PolicyConfig()

    def test_full_vocabulary(self) -> None:
        """Every documented key is accepted and normalised into typed fields."""
        config = parse_policy(
            {
                "mode": "report",
                "exempt": [
                    {"id": "health", "path": "/healthz|/readyz", "methods": ["get", "HEAD"]},
                    {"hosts": ["API.Example.com.", "*.example.com"]},
                ],
                "require": {
                    "san": {
                        "dns": ["*.svc.Example.com"],
                        "uri": ["SPIFFE://Example.org/ns/*/sa/billing"],
                        "email": ["*@Example.com", "ops@example.com"],
                    },
                    "subject": {"cn": ["client-a"], "2.5.4.10": ["Example"]},
                    "issuer": {"O": ["Example CA"]},
                    "fingerprint_sha256": [FP],
                    "ca": CA.pem,
                },
                "require_sni_match": False,
                "reject": {"status": 401, "body": "no\n", "content_type": "text/plain", "expose_reason": True},
                "source": {"type": "apisix"},
                "forward": {"subject": "X-Client-Subject", "fingerprint": "x-client-fp"},
            }
        )
        assert config.mode is Mode.REPORT
        assert config.exempt[0] == ExemptRule("health", "/healthz|/readyz", frozenset({"GET", "HEAD"}), None)
        assert config.exempt[1] == ExemptRule("exempt[1]", None, None, ("api.example.com", "*.example.com"))
        san = config.require.san
        assert san is not None
        assert san.dns == ("*.svc.example.com",)
        assert san.uri == (UriPattern("spiffe", "example.org", ("ns", "*", "sa", "billing")),)
        assert san.email == (EmailPattern("*", "example.com"), EmailPattern("ops", "example.com"))
        assert config.require.subject is not None
        assert config.require.subject.attributes == (
            ("CN", frozenset({"client-a"})),
            ("2.5.4.10", frozenset({"Example"})),
        )
        assert config.require.fingerprints == frozenset({"ab" * 31 + "cd"})
        assert config.require.ca is not None
        assert len(config.require.ca.anchors) == 1
        assert config.reject == Reject(401, "no\n", "text/plain", True)
        assert config.source == ApisixSource()
        assert config.forward == Forward(subject="x-client-subject", fingerprint="x-client-fp")

    @pytest.mark.parametrize(
        ("fmt", "header", "chain"),
        [
            ("xfcc", "x-forwarded-client-cert", None),
            ("pem-urlencoded", "x-client-cert", None),
            ("rfc9440", "client-cert", "client-cert-chain"),
        ],
    )
    def test_header_source_defaults(self, fmt: str, header: str, chain: str | None) -> None:
        """Each forwarded format gets its conventional header name (and chain header for RFC 9440)."""
        source = parse_policy({"source": {**HEADER_SOURCE, "format": fmt}}).source
        assert isinstance(source, HeaderSource)
        assert (source.format, source.header, source.chain_header) == (ForwardedFormat(fmt), header, chain)
        assert source.trusted_proxies == (ipaddress.ip_network("10.0.0.0/8"),)

    def test_header_source_explicit_names(self) -> None:
        """Configured header names are lower-cased; IPv6 CIDRs and bare addresses are accepted."""
        source = parse_policy(
            {
                "source": {
                    **HEADER_SOURCE,
                    "format": "pem-urlencoded",
                    "header": "X-Amzn-Mtls-Clientcert",
                    "chain_header": "X-Chain",
                    "trusted_proxies": ["2001:db8::/32", "192.0.2.7"],
                }
            }
        ).source
        assert isinstance(source, HeaderSource)
        assert (source.header, source.chain_header) == ("x-amzn-mtls-clientcert", "x-chain")
        assert [str(n) for n in source.trusted_proxies] == ["2001:db8::/32", "192.0.2.7/32"]

    def test_json_text_and_mapping_agree(self) -> None:
        """compile_policy accepts JSON text or an already-parsed mapping with the same result."""
        doc = {"exempt": [{"methods": ["OPTIONS"]}], "mode": "report"}
        assert compile_policy(json.dumps(doc)).config == compile_policy(doc).config


class TestUnknownKeys:
    @pytest.mark.parametrize(
        ("document", "path"),
        [
            ({"modes": "enforce"}, "modes"),
            ({"exempt": [{"path": "/x", "method": ["GET"]}]}, "exempt[0].method"),
            ({"require": {"sans": {}}}, "require.sans"),
            ({"require": {"san": {"ip": ["10.0.0.1"]}}}, "require.san.ip"),
            ({"reject": {"code": 401}}, "reject.code"),
            ({"source": {"type": "apisix", "format": "xfcc"}}, "source.format"),
            ({"source": {**HEADER_SOURCE, "verify_header": "x-ssl-client-verify"}}, "source.verify_header"),
            ({"forward": {"issuer": "x-issuer"}}, "forward.issuer"),
        ],
    )
    def test_unknown_key_names_its_path(self, document: dict[str, Any], path: str) -> None:
        """An unknown key at any level is an error whose message starts with its key path."""
        assert error_of(document).startswith(f"{path}: unknown key")


class TestInvalidValues:
    @pytest.mark.parametrize(
        ("document", "message"),
        [
            ({"mode": "audit"}, 'mode: must be "enforce" or "report"'),
            ({"exempt": {}}, "exempt: must be a list, not an object"),
            ({"exempt": []}, "exempt: must not be empty"),
            ({"exempt": [{"id": "x"}]}, "exempt[0]: needs at least one of path, methods, hosts"),
            ({"exempt": [{"path": "/a("}]}, "exempt[0].path: not a valid RE2 regular expression"),
            ({"exempt": [{"path": "(?=x)"}]}, "exempt[0].path: not a valid RE2 regular expression"),
            ({"exempt": [{"path": "/" + "a" * 5000}]}, "exempt[0].path: longer than 4096 characters"),
            ({"exempt": [{"path": "((a{100}){100}){100}"}]}, "exempt[0].path: not a valid RE2"),
            ({"exempt": [{"methods": ["GET", "FETCH"]}]}, "exempt[0].methods[1]: unknown method 'FETCH'"),
            ({"exempt": [{"methods": ["GET", "get"]}]}, "exempt[0].methods[1]: duplicate entry"),
            ({"exempt": [{"hosts": ["a*.example.com"]}]}, "exempt[0].hosts[0]: wildcard must be a whole label"),
            ({"exempt": [{"hosts": ["*.com"]}]}, "exempt[0].hosts[0]: not a valid host name"),
            ({"exempt": [{"hosts": ["bad host"]}]}, "exempt[0].hosts[0]: not a valid host name"),
            (
                {"exempt": [{"id": "a", "methods": ["GET"]}, {"id": "a", "methods": ["PUT"]}]},
                "exempt[1].id: duplicate rule id 'a'",
            ),
            (
                {"exempt": [{"methods": ["GET"]}, {"id": "exempt[0]", "methods": ["PUT"]}]},
                "exempt[1].id: duplicate rule id",
            ),
            ({"require": {"san": {}}}, "require.san: needs at least one of dns, uri, email"),
            (
                {"require": {"san": {"dns": ["ok.example.com", "a*.x.example.com"]}}},
                "require.san.dns[1]: wildcard must be a whole label",
            ),
            ({"require": {"san": {"dns": ["a.*.example.com"]}}}, "require.san.dns[0]: wildcard must be a whole"),
            ({"require": {"san": {"uri": ["spiffe://*.org/x"]}}}, "require.san.uri[0]: wildcard is not allowed"),
            ({"require": {"san": {"uri": ["spiffe://ex.org/ns-*/x"]}}}, "require.san.uri[0]: wildcard must be a"),
            ({"require": {"san": {"uri": ["billing"]}}}, "require.san.uri[0]: must be an absolute URI"),
            ({"require": {"san": {"uri": ["spiffe://ex.org/a?b"]}}}, "require.san.uri[0]: must be an absolute"),
            ({"require": {"san": {"email": ["a*@example.com"]}}}, "require.san.email[0]: wildcard must be"),
            ({"require": {"san": {"email": ["example.com"]}}}, "require.san.email[0]: must be local@domain"),
            ({"require": {"subject": {"CNN": ["a"]}}}, "require.subject.CNN: unknown attribute"),
            ({"require": {"issuer": {"CN": []}}}, "require.issuer.CN: must not be empty"),
            ({"require": {"subject": {}}}, "require.subject: must be a non-empty object"),
            ({"require": {"fingerprint_sha256": ["abc"]}}, "require.fingerprint_sha256[0]: must be a SHA-256"),
            ({"require": {"fingerprint_sha256": ["g" * 64]}}, "require.fingerprint_sha256[0]: must be a SHA-256"),
            ({"require": {"fingerprint_sha256": [FP, FP.lower()]}}, "require.fingerprint_sha256[1]: duplicate"),
            ({"require": {"ca": "not a pem"}}, "require.ca: invalid CA bundle"),
            ({"require": {"ca": LEAF.pem}}, "require.ca: invalid CA bundle"),
            ({"require_sni_match": "yes"}, "require_sni_match: must be true or false"),
            ({"reject": {"status": 200}}, "reject.status: must be an integer from 400 to 599"),
            ({"reject": {"status": 600}}, "reject.status: must be an integer from 400 to 599"),
            ({"reject": {"status": True}}, "reject.status: must be an integer"),
            ({"reject": {"status": 421}}, "reject.status: 421 is reserved"),
            ({"reject": {"body": 5}}, "reject.body: must be a string"),
            ({"reject": {"content_type": "text/plain\r\nx: y"}}, "reject.content_type: must be printable ASCII"),
            ({"source": {"type": "tls"}}, 'source.type: must be "apisix" or "header"'),
            ({"source": {"type": "header", "format": "xfcc", "ca": CA.pem}}, "source.trusted_proxies: is required"),
            (
                {"source": {"type": "header", "format": "xfcc", "trusted_proxies": ["10.0.0.0/8"]}},
                "source.ca: is required",
            ),
            ({"source": {**HEADER_SOURCE, "trusted_proxies": []}}, "source.trusted_proxies: must not be empty"),
            ({"source": {**HEADER_SOURCE, "trusted_proxies": ["10.0.0.0/33"]}}, "source.trusted_proxies[0]: not a"),
            ({"source": {**HEADER_SOURCE, "trusted_proxies": ["10.0.0.1/8"]}}, "source.trusted_proxies[0]: not a"),
            ({"source": {**HEADER_SOURCE, "trusted_proxies": ["proxy.lan"]}}, "source.trusted_proxies[0]: not a"),
            ({"source": {**HEADER_SOURCE, "format": "json"}}, "source.format: must be one of"),
            ({"source": {**HEADER_SOURCE, "ca": "x"}}, "source.ca: invalid CA bundle"),
            ({"source": {**HEADER_SOURCE, "chain_header": "x-chain"}}, "source.chain_header: xfcc carries"),
            ({"source": {**HEADER_SOURCE, "header": "bad header"}}, "source.header: not a valid HTTP header name"),
            ({"forward": {"subject": "host"}}, "forward.subject: 'host' is reserved"),
            ({"forward": {"subject": "x-id", "san": "X-ID"}}, "forward.san: same header as subject"),
            ({"policy": "strict"}, "policy: named policies need a policy file"),
        ],
    )
    def test_error_message(self, document: dict[str, Any], message: str) -> None:
        """Invalid values are rejected with the key path and the rule they break."""
        assert error_of(document).startswith(message)

    @pytest.mark.parametrize(
        ("text", "message"),
        [
            ('{"mode": "report",\n "exempt": [}', "invalid JSON at line 2 column 13"),
            ('{"mode": "report", "mode": "enforce"}', "duplicate key 'mode'"),
            ('{"reject": {"status": NaN}}', "invalid JSON: NaN is not allowed"),
            ("[]", "the policy must be a JSON object"),
        ],
    )
    def test_json_errors(self, text: str, message: str) -> None:
        """JSON syntax errors carry line/column; duplicate keys and NaN are refused."""
        assert error_of(text).startswith(message)

    def test_error_exposes_path_attribute(self) -> None:
        """PolicyError.path holds the key path separately for tooling."""
        with pytest.raises(PolicyError) as info:
            parse_policy({"require": {"san": {"dns": ["ok.example", "a*.b.example"]}}})
        assert info.value.path == "require.san.dns[1]"


LIBRARY_YAML = f"""
defaults:
  reject: {{status: 401}}
  forward: {{subject: x-client-subject}}
policies:
  strict:
    require:
      san: {{uri: ["spiffe://example.org/ns/prod/*"]}}
  public-health:
    exempt:
      - {{id: health, path: /healthz, methods: [GET]}}
    reject: {{status: 403, expose_reason: true}}
  header:
    source:
      type: header
      format: xfcc
      trusted_proxies: [10.0.0.0/8]
      ca: |
{"".join("        " + line + chr(10) for line in CA.pem.splitlines())}
"""


class TestPolicyLibrary:
    @pytest.fixture
    def library(self, tmp_path: Path) -> PolicyLibrary:
        path = tmp_path / "policies.yaml"
        path.write_text(LIBRARY_YAML)
        return PolicyLibrary.from_yaml_file(path)

    def test_defaults_apply_to_named_policy(self, library: PolicyLibrary) -> None:
        """A route naming a policy gets defaults merged under the named policy."""
        config = compile_policy('{"policy": "strict"}', library).config
        assert config.name == "strict"
        assert config.reject.status == 401
        assert config.forward.subject == "x-client-subject"
        assert config.require.san is not None

    def test_named_policy_overrides_defaults(self, library: PolicyLibrary) -> None:
        """A named policy's top-level key replaces the default's whole value (shallow merge)."""
        config = compile_policy('{"policy": "public-health"}', library).config
        assert config.reject == Reject(status=403, expose_reason=True)

    def test_route_keys_override_named_policy(self, library: PolicyLibrary) -> None:
        """Keys in the route conf win over the named policy and the defaults."""
        config = compile_policy({"policy": "public-health", "mode": "report", "reject": {"status": 410}}, library)
        assert config.config.mode is Mode.REPORT
        assert config.config.reject == Reject(status=410)
        assert config.config.exempt[0].id == "health"

    def test_header_policy_from_yaml(self, library: PolicyLibrary) -> None:
        """A multi-line CA PEM in YAML is loaded into a header source."""
        source = compile_policy('{"policy": "header"}', library).config.source
        assert isinstance(source, HeaderSource)

    def test_routes_without_policy_ignore_defaults(self, library: PolicyLibrary) -> None:
        """The file's defaults apply to named policies only, not to inline route policies."""
        assert compile_policy("{}", library).config == PolicyConfig()

    def test_unknown_policy_name(self, library: PolicyLibrary) -> None:
        """Naming a policy the file does not define is an error listing the known names."""
        with pytest.raises(PolicyError, match=r"^policy: unknown policy 'lax' .*known: header, public-health, strict"):
            compile_policy('{"policy": "lax"}', library)

    def test_route_override_is_validated(self, library: PolicyLibrary) -> None:
        """Route keys merged onto a named policy are validated like any other policy."""
        with pytest.raises(PolicyError, match=r"^reject\.status: must be an integer"):
            compile_policy({"policy": "strict", "reject": {"status": 99}}, library)

    def test_library_is_immutable(self, library: PolicyLibrary) -> None:
        """Neither the defaults nor the named policies can be changed after loading."""
        with pytest.raises(TypeError):
            library.defaults["mode"] = "report"  # type: ignore[index]
        with pytest.raises(TypeError):
            library.policies["strict"]["mode"] = "report"  # type: ignore[index]

    @pytest.mark.parametrize(
        ("data", "message"),
        [
            ({"default": {}}, "<policies>: default: unknown key"),
            ({"defaults": {"mode": "off"}}, '<policies>: defaults.mode: must be "enforce" or "report"'),
            ({"policies": {"x": {"exempt": [{"path": "("}]}}}, "<policies>: policies.x.exempt[0].path: not a valid"),
            ({"policies": {"x": {"policy": "y"}}}, "<policies>: policies.x.policy: a named-policy reference"),
            ({"policies": {"bad name": {}}}, "<policies>: policies.bad name: names are"),
            ({"policies": []}, "<policies>: policies: must be an object"),
        ],
    )
    def test_invalid_library(self, data: object, message: str) -> None:
        """Every part of a policy file is validated at load time, with the source and key path."""
        with pytest.raises(PolicyError) as info:
            PolicyLibrary.from_mapping(data)
        assert str(info.value).startswith(message)

    def test_yaml_syntax_error_names_file(self, tmp_path: Path) -> None:
        """A YAML syntax error is a PolicyError naming the file and position."""
        path = tmp_path / "broken.yaml"
        path.write_text("policies:\n  a: [\n")
        with pytest.raises(
            PolicyError, match=r"broken\.yaml: invalid YAML at line 3 column 1: expected the node content"
        ):
            PolicyLibrary.from_yaml_file(path)

    def test_yaml_duplicate_key(self, tmp_path: Path) -> None:
        """Duplicate YAML keys are refused instead of silently keeping the last."""
        path = tmp_path / "dup.yaml"
        path.write_text("policies:\n  a: {mode: report}\n  a: {mode: enforce}\n")
        with pytest.raises(PolicyError, match=r"dup\.yaml: duplicate key 'a' at line 3"):
            PolicyLibrary.from_yaml_file(path)

    def test_missing_file(self, tmp_path: Path) -> None:
        """An unreadable policy file is a PolicyError naming the file."""
        with pytest.raises(PolicyError, match=r"nope\.yaml: cannot read policy file"):
            PolicyLibrary.from_yaml_file(tmp_path / "nope.yaml")

    def test_empty_file_is_an_empty_library(self, tmp_path: Path) -> None:
        """An empty YAML file defines no policies."""
        path = tmp_path / "empty.yaml"
        path.write_text("")
        assert PolicyLibrary.from_yaml_file(path).names() == ()


def test_requirements_default_is_empty() -> None:
    """Requirements() constrains nothing beyond a verified certificate."""
    assert Requirements() == parse_policy({"require": {}}).require
