"""`mtls-guard explain`: nginx's $uri from a raw request-target, what the upstream receives, why each exemption
did or did not apply, what it assumes about the TLS handshake, and --client-ca checking it instead."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from plugins.mtls_guard.tools.commands_explain import ASSUMED_VERIFY
from plugins.mtls_guard.tools.explain import nginx_uri, query_args
from runner.cli import main
from tests.certs import CertFactory

ROOT = Path(__file__).resolve().parents[2]
POLICY = json.dumps(
    {
        "exempt": [
            {"id": "public", "path": "/public/.*"},
            {"id": "cors", "preflight": True},
            {"id": "docs", "hosts": ["docs.example.test"]},
            {"id": "health", "path": "/healthz", "methods": ["GET", "HEAD"]},
            {"id": "hook", "path": "/hook", "methods": ["POST"]},
        ]
    }
)
PREFLIGHT = ("--header", "Origin: https://a.example", "--header", "Access-Control-Request-Method: POST")
FACTORY = CertFactory()


class TestNginxUri:
    @pytest.mark.parametrize(
        ("target", "uri", "query"),
        [
            ("/a/b", "/a/b", ""),
            ("/admin/..%2Fpublic/x?a=1", "/public/x", "a=1"),
            ("/admin/../public/x", "/public/x", ""),
            ("/admin/%2e%2e/public/x", "/public/x", ""),
            ("/admin//..//public/x", "/public/x", ""),
            ("/a//b///c", "/a/b/c", ""),
            ("/a/./b/.", "/a/b/", ""),
            ("/a/b/..", "/a/", ""),
            ("/%2570ublic/x", "/%70ublic/x", ""),
            ("/caf%C3%A9", "/café", ""),
            ("/admin;x/../public/x", "/public/x", ""),
            ("https://evil.example/p/q?x", "/p/q", "x"),
        ],
    )
    def test_uri(self, target: str, uri: str, query: str) -> None:
        """The $uri nginx hands APISIX: decoded once, dot segments resolved, slashes merged; the query raw."""
        assert nginx_uri(target) == (uri, query)

    @pytest.mark.parametrize("target", ["/..", "/a/../../b", "/a%zz", "/a%4", "/a%00b", "relative"])
    def test_refused(self, target: str) -> None:
        """Targets nginx answers with 400 are a ValueError."""
        with pytest.raises(ValueError, match=r"."):
            nginx_uri(target)

    def test_query_args(self) -> None:
        """Query arguments are unescaped like ngx.req.get_uri_args, a bare name being a flag."""
        assert query_args("a=%2F&b&_method=DELETE&c=x+y") == (
            ("a", "/"),
            ("b", None),
            ("_method", "DELETE"),
            ("c", "x y"),
        )


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `mtls-guard explain --policy POLICY --host api.example.test ARGV`."""
    try:
        code = main(["explain", "--policy", POLICY, "--host", "api.example.test", *argv])
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def explain(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, err = run(capsys, "--json", *argv)
    assert code in (0, 1), err
    return code, json.loads(out)


class TestExplainCommand:
    def test_raw_target_is_judged_as_nginx_decodes_it_and_delivered_as_judged(
        self, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A raw target resolving into an exempt path is exempt and the upstream gets the judged path, query kept."""
        code, out = explain(capsys, "--target", "/admin/..%2Fpublic/x?a=%2F")
        assert code == 0
        assert (out["reason"], out["uri"], out["upstream_target"]) == ("exempt", "/public/x", "/public/x?a=%2F")

    def test_real_preflight_is_exempt(self, capsys: pytest.CaptureFixture[str]) -> None:
        """An OPTIONS request with Origin and Access-Control-Request-Method is exempt by the preflight rule."""
        code, out = explain(capsys, "--method", "OPTIONS", "--target", "/x", *PREFLIGHT)
        assert (code, out["detail"]) == (0, "cors")

    def test_host_rule_with_another_sni_is_421(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A Host naming an exempt host over a TLS connection made for another name is 421."""
        code, out = explain(capsys, "--target", "/x", "--host", "docs.example.test", "--sni", "api.example.test")
        assert (code, out["status"], out["reason"]) == (1, 421, "host-mismatch")

    def test_lower_case_method_is_read_as_upper_case(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`--method get` is GET: nginx refuses lower-case methods, so no request could mean anything else."""
        code, out = explain(capsys, "--method", "get", "--path", "/healthz")
        assert (code, out["detail"]) == (0, "health")

    def test_target_nginx_refuses_in_a_real_process(self) -> None:
        """A target nginx answers with 400 is a rejection (exit 1) told in one line, without a traceback."""
        result = subprocess.run(
            [sys.executable, "-m", "runner", "explain", "--policy", POLICY, "--target", "/../x"],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1
        assert "nginx answers 400" in result.stderr
        assert "Traceback" not in result.stderr


class TestWhyNoExemption:
    """Every rule gets a line; a rule that does not apply names the concrete fact that stopped it."""

    @pytest.mark.parametrize(
        ("argv", "rule", "line"),
        [
            pytest.param(
                ("--target", "/%2570ublic/x"),
                "public",
                "no: the path '/%70ublic/x' is ambiguous (literal-percent): ambiguous paths are never exempt",
                id="ambiguous",
            ),
            pytest.param(
                ("--target", "/public/../private/x"),
                "public",
                "no: the path pattern '/public/.*' does not match the canonical path '/private/x'",
                id="path",
            ),
            pytest.param(
                ("--method", "POST", "--path", "/healthz"),
                "health",
                "no: the method POST is not listed (GET|HEAD)",
                id="method",
            ),
            pytest.param(
                ("--path", "/x"), "cors", "no: not a CORS preflight: the method is GET, not OPTIONS", id="not-options"
            ),
            pytest.param(
                ("--method", "OPTIONS", "--path", "/x", "--header", "Origin: https://a.example"),
                "cors",
                "no: not a CORS preflight: OPTIONS without Access-Control-Request-Method",
                id="not-preflight",
            ),
            pytest.param(
                ("--method", "OPTIONS", "--target", "/x?_method=DELETE", *PREFLIGHT),
                "cors",
                "no: a method override is present (the query argument _method=DELETE): "
                "the upstream may act on another method",
                id="override-argument",
            ),
            pytest.param(
                ("--path", "/healthz", "--header", "X-HTTP-Method-Override: DELETE"),
                "health",
                "no: a method override is present (the header x-http-method-override): "
                "the upstream may act on another method",
                id="override-header",
            ),
            pytest.param(
                ("--method", "POST", "--path", "/hook", "--header", "Content-Type: application/x-www-form-urlencoded"),
                "hook",
                "no: a method override is present (a POST form body (application/x-www-form-urlencoded), which may "
                "hold _method): the upstream may act on another method",
                id="override-form",
            ),
            pytest.param(
                ("--path", "/x"),
                "docs",
                "no: the Host 'api.example.test' differs from the rule's hosts (docs.example.test)",
                id="host",
            ),
            pytest.param(
                ("--path", "/x", "--host", "docs.example.test", "--sni", "api.example.test"),
                "docs",
                "no: the TLS SNI 'api.example.test' is another name than the Host 'docs.example.test', "
                "so the Host cannot be believed (421)",
                id="sni",
            ),
            pytest.param(
                ("--target", "https://api.example.test/x", "--host", "docs.example.test"),
                "docs",
                "no: nginx routed on another host ($host 'api.example.test') than the Host 'docs.example.test'",
                id="routed-host",
            ),
            pytest.param(
                ("--path", "/x", "--host", ""),
                "docs",
                "no: the request has no usable Host header (the rule names docs.example.test)",
                id="no-host",
            ),
            pytest.param(("--path", "/public/x"), "public", "yes: exempts this request", id="applies"),
            pytest.param(
                ("--path", "/public/x", "--host", "docs.example.test"),
                "docs",
                "yes, but [public] comes first",
                id="shadowed",
            ),
        ],
    )
    def test_reason(self, capsys: pytest.CaptureFixture[str], argv: tuple[str, ...], rule: str, line: str) -> None:
        """The rule's line states why it did (not) apply, in the JSON and the text output alike."""
        _, out = explain(capsys, *argv)
        assert f"[{rule}] {line}" in out["exemptions"]
        _, text, _ = run(capsys, *argv)
        assert f"  [{rule}] {line}\n" in text

    def test_policy_without_rules_says_so(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A policy without exemption rules says there are none rather than printing nothing."""
        code = main(["explain", "--policy", "{}", "--path", "/x"])
        assert code == 1
        assert "exemptions: none in this policy" in capsys.readouterr().out


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """PEM files: a client CA and certificates it did, did not, or no longer vouches for."""
    root = FACTORY.ca("Explain Root")
    inter = FACTORY.ca("Explain Intermediate", parent=root)
    deep = FACTORY.ca("Explain Deep Intermediate", parent=inter)
    past = FACTORY.now - timedelta(days=2)
    files = {
        "ca": root.pem,
        "inter-only": inter.pem,
        "good": FACTORY.leaf(root).pem,
        "chain": FACTORY.leaf(inter).pem + inter.pem,
        "deep-chain": FACTORY.leaf(deep).pem + deep.pem + inter.pem,
        "untrusted": FACTORY.leaf(FACTORY.ca("Other Root")).pem,
        "self-signed": FACTORY.self_signed_leaf().pem,
        "expired": FACTORY.leaf(root, not_before=past - timedelta(days=1), not_after=past).pem,
    }
    out = tmp_path_factory.mktemp("pki")
    for name, pem in files.items():
        (out / f"{name}.pem").write_text(pem, encoding="ascii")
    return {name: str(out / f"{name}.pem") for name in files}


class TestAssumptions:
    def test_cert_without_verify_states_the_assumption(
        self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]
    ) -> None:
        """--cert alone assumes APISIX verified it, and says so in the text and the JSON output."""
        code, text, _ = run(capsys, "--path", "/api", "--cert", pki["untrusted"])
        assert code == 0
        assert f"\n{ASSUMED_VERIFY}\n" in text
        _, out = explain(capsys, "--path", "/api", "--cert", pki["untrusted"])
        assert (out["ssl_client_verify"], out["assumptions"]) == ("SUCCESS", [ASSUMED_VERIFY])

    def test_explicit_verify_is_no_assumption(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """--verify says what nginx found, so nothing is assumed about it."""
        code, out = explain(capsys, "--path", "/api", "--cert", pki["good"], "--verify", "FAILED:certificate revoked")
        assert (code, out["reason"], out["detail"], out["assumptions"]) == (
            1,
            "verify-failed",
            "certificate revoked",
            [],
        )

    def test_encoded_path_states_the_upstream_uri_assumption(self, capsys: pytest.CaptureFixture[str]) -> None:
        """A path holding "%" is judged assuming no earlier plugin rewrote it, and says so."""
        _, out = explain(capsys, "--path", "/a%25b")
        assert out["assumptions"] == ["assuming no earlier plugin rewrote the path ($upstream_uri is empty)"]

    def test_header_mode_says_cert_plays_no_part(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """A policy reading the certificate from a proxy header says --cert is not what it judges."""
        ca = Path(pki["ca"]).read_text(encoding="ascii")
        source = {"type": "header", "format": "pem-urlencoded", "header": "x-client-cert", "ca": ca}
        policy = {"source": {**source, "trusted_proxies": ["10.0.0.0/8"]}}
        code = main(["explain", "--json", "--policy", json.dumps(policy), "--path", "/x", "--cert", pki["good"]])
        out = json.loads(capsys.readouterr().out)
        assert code == 1
        assert len(out["assumptions"]) == 1
        assert "from the x-client-cert header" in out["assumptions"][0]


class TestClientCa:
    @pytest.mark.parametrize(
        ("cert", "ca", "verify"),
        [
            ("good", "ca", "SUCCESS"),
            ("chain", "ca", "SUCCESS"),
            ("untrusted", "ca", "FAILED:unable to get local issuer certificate"),
            ("self-signed", "ca", "FAILED:self-signed certificate"),
            ("expired", "ca", "FAILED:certificate has expired"),
            ("deep-chain", "ca", "FAILED:certificate chain too long"),
            ("chain", "inter-only", "FAILED:unable to get issuer certificate"),
        ],
    )
    def test_verdict_decides(
        self, capsys: pytest.CaptureFixture[str], pki: dict[str, str], cert: str, ca: str, verify: str
    ) -> None:
        """--client-ca verifies the chain as nginx would: SUCCESS passes, FAILED:<reason> is rejected."""
        code, out = explain(capsys, "--path", "/api", "--cert", pki[cert], "--client-ca", pki[ca])
        assert (out["ssl_client_verify"], out["client_ca"]["ssl_client_verify"]) == (verify, verify)
        assert code == (0 if verify == "SUCCESS" else 1)
        assert ASSUMED_VERIFY not in out["assumptions"]

    def test_depth_admits_longer_chains(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """--client-depth 2 (the SSL object's client.depth) accepts a chain with two intermediates."""
        argv = ("--path", "/api", "--cert", pki["deep-chain"], "--client-ca", pki["ca"], "--client-depth", "2")
        code, out = explain(capsys, *argv)
        assert (code, out["ssl_client_verify"]) == (0, "SUCCESS")

    def test_root_missing_from_the_ca_file_is_explained(
        self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]
    ) -> None:
        """A CA file certificate without its root is named: nginx does not anchor on it."""
        _, out = explain(capsys, "--path", "/api", "--cert", pki["chain"], "--client-ca", pki["inter-only"])
        assert any("certificate #1 has no self-signed root" in a for a in out["assumptions"])

    def test_text_output_shows_the_check(self, capsys: pytest.CaptureFixture[str], pki: dict[str, str]) -> None:
        """The text output says the certificate was checked against the CA file, and with what result."""
        code, text, _ = run(capsys, "--path", "/api", "--cert", pki["untrusted"], "--client-ca", pki["ca"])
        assert code == 1
        expected = f"certificate checked against --client-ca {pki['ca']}: "
        assert f"{expected}ssl_client_verify=FAILED:unable to get local issuer certificate\n" in text
