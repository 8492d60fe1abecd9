"""`mtls-guard explain`: nginx's $uri from a raw request-target, what the upstream receives, why no exemption."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from plugins.mtls_guard.explain import nginx_uri, query_args

ROOT = Path(__file__).resolve().parents[2]
POLICY = json.dumps(
    {
        "exempt": [
            {"id": "public", "path": "/public/.*"},
            {"id": "cors", "preflight": True},
            {"id": "docs", "hosts": ["docs.example.test"]},
        ]
    }
)


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


def explain(*argv: str) -> tuple[int, dict[str, object]]:
    command = [sys.executable, "-m", "runner", "explain", "--json", "--policy", POLICY, "--host", "api.example.test"]
    result = subprocess.run([*command, *argv], capture_output=True, text=True, check=False, cwd=ROOT)
    assert result.returncode in (0, 1), result.stderr
    return result.returncode, json.loads(result.stdout)


class TestExplainCommand:
    def test_raw_target_is_judged_as_nginx_decodes_it_and_delivered_as_judged(self) -> None:
        """A raw target resolving into an exempt path is exempt and the upstream gets the judged path, query kept."""
        code, out = explain("--target", "/admin/..%2Fpublic/x?a=%2F")
        assert code == 0
        assert (out["reason"], out["uri"], out["upstream_target"]) == ("exempt", "/public/x", "/public/x?a=%2F")

    def test_literal_percent_says_why_no_exemption(self) -> None:
        """A %25 that would decode into an exempt path is refused, and each rule says why it did not apply."""
        code, out = explain("--target", "/%2570ublic/x")
        assert code == 1
        assert (
            out["exemptions"][0]
            == "[public] no: the path is ambiguous (literal-percent): ambiguous paths are never exempt"
        )

    def test_method_override_defeats_preflight_rule(self) -> None:
        """A preflight carrying ?_method=DELETE is not exempt, and the preflight rule says so."""
        headers = ["--header", "Origin: https://a.example", "--header", "Access-Control-Request-Method: POST"]
        code, out = explain("--method", "OPTIONS", "--target", "/x?_method=DELETE", *headers)
        assert code == 1
        assert "method-override" in str(out["exemptions"][1])

    def test_real_preflight_is_exempt(self) -> None:
        """An OPTIONS request with Origin and Access-Control-Request-Method is exempt by the preflight rule."""
        headers = ["--header", "Origin: https://a.example", "--header", "Access-Control-Request-Method: POST"]
        code, out = explain("--method", "OPTIONS", "--target", "/x", *headers)
        assert (code, out["detail"]) == (0, "cors")

    def test_host_rule_with_another_sni_is_421(self) -> None:
        """A Host naming an exempt host over a TLS connection made for another name is 421, explained."""
        code, out = explain("--target", "/x", "--host", "docs.example.test", "--sni", "api.example.test")
        assert (code, out["status"], out["reason"]) == (1, 421, "host-mismatch")
        assert "TLS SNI or the routed host" in str(out["exemptions"][2])

    def test_target_nginx_refuses(self) -> None:
        """A target nginx answers with 400 is reported as such, without a traceback."""
        result = subprocess.run(
            [sys.executable, "-m", "runner", "explain", "--policy", POLICY, "--target", "/../x"],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
        assert result.returncode != 0
        assert "nginx answers 400" in result.stderr
        assert "Traceback" not in result.stderr
