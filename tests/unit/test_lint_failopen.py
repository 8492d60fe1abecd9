"""Fail-open policies: catch-all and dead exemption patterns, broad proxies, SNI binding off, report-mode
overrides, mtls-guard in post-resp; the host rules MG061 judges through services and plugin configs; and the
findings table in docs/lint-findings.md against lint_findings.CODES."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from plugins.mtls_guard.library import PolicyLibrary
from plugins.mtls_guard.matchers import APISIX_METHODS
from plugins.mtls_guard.paths import classify_path
from plugins.mtls_guard.policy import compile_policy
from plugins.mtls_guard.policy_config import PolicyConfig
from plugins.mtls_guard.tools.lint import LintResult, lint_files
from plugins.mtls_guard.tools.lint_findings import CODES, Severity
from plugins.mtls_guard.tools.lint_pattern import (
    PROBE_PATHS,
    dead_alternatives,
    matches_every_path,
    top_level_alternatives,
)
from plugins.mtls_guard.tools.lint_policy import PolicyFinding, policy_findings
from tests.certs import CertFactory

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "lint"
PROXY_CA = CertFactory().ca("Front Proxy CA").pem
STRICT_LIBRARY = PolicyLibrary.from_mapping({"policies": {"strict": {"require": {"subject": {"O": ["Example"]}}}}})
ALL_METHODS = sorted(APISIX_METHODS)
REFERENCE = "$secret://vault/1/"


# -- builders ------------------------------------------------------------------------------------------


def guard(policy: dict[str, Any]) -> dict[str, Any]:
    return {"ext-plugin-pre-req": {"conf": [{"name": "mtls-guard", "value": json.dumps(policy)}]}}


def mtls_ssl(*snis: str) -> dict[str, Any]:
    """An SSL object that requests client certificates; references keep the test free of PEM parsing."""
    return {
        "id": "mtls",
        "snis": list(snis),
        "cert": REFERENCE + "cert",
        "key": REFERENCE + "key",
        "client": {"ca": REFERENCE + "ca", "skip_mtls_uri_regex": ["^/"]},
    }


def config(policy: dict[str, Any], *, where: str = "routes", **route: Any) -> dict[str, Any]:
    """One route (host api.example.com unless given) whose mtls-guard ``policy`` sits on ``where``."""
    data: dict[str, Any] = {
        "routes": [{"id": "1", "uri": "/*", "upstream_id": "1", **({"host": "api.example.com"} | route)}],
        "ssls": [mtls_ssl("api.example.com", "www.example.com")],
    }
    if where == "routes":
        data["routes"][0]["plugins"] = guard(policy)
    elif where == "global_rules":
        data["global_rules"] = [{"id": "1", "plugins": guard(policy)}]
    else:
        data[where] = [{"id": "s", "plugins": guard(policy)}]
        data["routes"][0]["service_id" if where == "services" else "plugin_config_id"] = "s"
    return data


@pytest.fixture
def lint(tmp_path: Path) -> Callable[..., LintResult]:
    def _lint(data: dict[str, Any], **kwargs: Any) -> LintResult:
        path = tmp_path / "apisix.yaml"
        path.write_text(yaml.safe_dump(data, sort_keys=False) + "#END\n", encoding="utf-8")
        return lint_files([str(path)], **kwargs)

    return _lint


def found(result: LintResult, code: str) -> list[tuple[str, Severity]]:
    return [(f.obj, f.severity) for f in result.findings if f.code == code]


def policy(document: dict[str, Any], library: PolicyLibrary | None = None) -> PolicyConfig:
    return compile_policy(document, library).config


def codes_of(findings: list[PolicyFinding]) -> list[str]:
    return [f.code for f in findings]


# -- catch-all patterns ----------------------------------------------------------------------------------


class TestCatchAllPattern:
    def test_probe_paths_are_canonical(self) -> None:
        """Every probe is a path mtls-guard can match, so failing one is a real restriction."""
        for path in PROBE_PATHS:
            assert classify_path(path, encoded=False) == (path, "")

    @pytest.mark.parametrize("pattern", [".*", "/.*", ".+", "/(.*)?", "(?s).*", "/.*|/", "[^;]*", "(?:/[^/]*)+"])
    def test_patterns_matching_every_canonical_path(self, pattern: str) -> None:
        """Spellings of "anything", including ones that only exclude what no canonical path holds, are catch-all."""
        assert matches_every_path(pattern)

    @pytest.mark.parametrize(
        "pattern", ["/public/.*", "/[^/]*", r"/.*\.css", ".*/health", "/.{0,40}", "/[a-z/]*", "/", "/healthz|/readyz"]
    )
    def test_restricting_patterns_are_not_catch_all(self, pattern: str) -> None:
        """Prefixes, suffixes, depth, length and character limits each fail on some probe path."""
        assert not matches_every_path(pattern)


# -- patterns that never match a canonical path ----------------------------------------------------------------


class TestDeadPattern:
    @pytest.mark.parametrize(
        ("pattern", "required"),
        [
            (r"/public/\.\./admin", "/public/../admin"),
            (r"/a/\./b", "/a/./b"),
            (r"/a/(\.\.)/b", "/a/../b"),
            (r"/a/\.{2}/b", "/a/../b"),
            (r"/a/[.][.]/b", "/a/../b"),
            (r"/a/\.?\./b", "/a/./b"),
            (r"/p(?:/\.\.|/\.)/x", "/p/../x"),
            (r"/a/.*/\.\.", "/.."),
            ("//x", "//x"),
            ("/x//y.*", "/x//y"),
            ("/%2e%2e/admin", "/%2e%2e/admin"),
            ("/files/%20x", "/files/%20x"),
            (r"/search\?q=.*", "/search?q="),
            ("/a;jsessionid=.*", "/a;jsessionid="),
            (r"/x\\y", "/x\\y"),
            ("admin/.*", "admin/"),
            ("^$", ""),
        ],
    )
    def test_required_non_canonical_text_makes_a_pattern_dead(self, pattern: str, required: str) -> None:
        """A pattern whose every match holds text canonical paths never hold is dead, naming that text."""
        (dead,), total = dead_alternatives(pattern)
        assert total == 1
        assert (dead.required, dead.by_reading) == (required, False)

    @pytest.mark.parametrize("pattern", ["/public/../admin", "/a/./b", "/i18n/.."])
    def test_unescaped_dots_reading_as_dot_segments_are_reported(self, pattern: str) -> None:
        """'/public/../admin' matches '/public/xy/admin', never '/admin': reported as read, not as dead."""
        (dead,), _ = dead_alternatives(pattern)
        assert dead.by_reading
        assert dead.required == pattern

    @pytest.mark.parametrize(
        "pattern",
        [
            r"/public/.*\.css",
            ".*/health",
            "/.well-known/.*",
            "/a/..b",
            r"/\.\.foo",
            r"/a/.*\.\.",
            "/(.*)?",
            "(/.*)?",
            ".*",
            "/files/[^/]+",
            r"/x(/\.\.)?/y",
            "(?i)/Admin/.*",
            "/healthz|/readyz",
            "/caf\u00e9",
        ],
    )
    def test_legitimate_patterns_are_not_dead(self, pattern: str) -> None:
        """Suffixes, dots inside names, optional groups and non-ASCII literals are not dead."""
        assert dead_alternatives(pattern)[0] == []

    @pytest.mark.parametrize("pattern", [r"\pL+/\.\./x", r"/[[:alpha:]]+/\.\./x", r"/a/\C/\.\./x"])
    def test_syntax_python_reads_differently_is_not_judged(self, pattern: str) -> None:
        """RE2-only escapes and POSIX classes are skipped rather than misjudged."""
        assert dead_alternatives(pattern)[0] == []

    def test_only_the_dead_alternative_is_reported(self) -> None:
        """In '/ok|/a/\\.\\./b' the first alternative is live; the second alone is reported."""
        (dead,), total = dead_alternatives(r"/ok|/a/\.\./b")
        assert (dead.text, total) == (r"/a/\.\./b", 2)

    def test_alternatives_split_outside_groups_classes_and_escapes(self) -> None:
        """'|' splits only at the top level: not inside (...), [...] or after a backslash."""
        assert top_level_alternatives(r"/a|(b|c)|[|]x|\|y|[]|]") == ["/a", "(b|c)", "[|]x", r"\|y", "[]|]"]


# -- policy-level findings (also for `mtls-guard check`) -----------------------------------------------------


class TestPolicyFindings:
    def test_a_safe_policy_has_no_findings(self) -> None:
        """Narrow path rules, a preflight rule, a path-bound host rule and narrow proxies raise nothing."""
        document = {
            "exempt": [
                {"id": "health", "path": "/healthz|/readyz", "methods": ["GET", "HEAD"]},
                {"id": "cors", "preflight": True},
                {"id": "docs", "path": "/docs/.*", "hosts": ["docs.example.com"]},
            ],
        }
        assert policy_findings(policy(document)) == []
        header = {"source": {"type": "header", "format": "xfcc", "trusted_proxies": ["10.0.0.0/8"], "ca": PROXY_CA}}
        assert policy_findings(policy(header)) == []

    @pytest.mark.parametrize(
        "rule",
        [{"path": ".*"}, {"path": "/(.*)?", "methods": ALL_METHODS}, {"methods": ALL_METHODS}, {"path": ".+"}],
    )
    def test_a_rule_restricting_nothing_is_mg070(self, rule: dict[str, Any]) -> None:
        """No path (or a catch-all one), no method list (or all methods), no hosts: MG070, an error."""
        (finding,) = policy_findings(policy({"exempt": [{"id": "all", **rule}]}))
        assert (finding.code, finding.severity) == ("MG070", Severity.ERROR)
        assert "'all'" in finding.message

    @pytest.mark.parametrize(
        "rule",
        [
            {"path": "/public/.*"},
            {"hosts": ["www.example.com"]},
            {"preflight": True},
            {"path": ".*", "hosts": ["www.example.com"]},
        ],
    )
    def test_a_path_host_or_preflight_condition_is_not_mg070(self, rule: dict[str, Any]) -> None:
        """A real path, a host (judged per route: MG060/MG061/MG071) or a preflight rule is not MG070."""
        assert "MG070" not in codes_of(policy_findings(policy({"exempt": [rule]})))

    def test_a_method_only_rule_is_mg072(self) -> None:
        """methods without path or hosts exempt those methods everywhere: MG072 (warning) naming them."""
        (finding,) = policy_findings(policy({"exempt": [{"id": "reads", "methods": ["HEAD", "GET"]}]}))
        assert (finding.code, finding.severity) == ("MG072", Severity.WARNING)
        assert "every GET or HEAD request" in finding.message

    @pytest.mark.parametrize("rule", [{"methods": ["OPTIONS"]}, {"methods": ["GET"], "path": "/public/.*"}])
    def test_options_only_or_path_bound_method_rules_are_not_mg072(self, rule: dict[str, Any]) -> None:
        """OPTIONS alone is MG063's; a method rule with a path is an ordinary exemption."""
        assert policy_findings(policy({"exempt": [rule]})) == []

    def test_a_dead_path_is_mg073_with_the_reason(self) -> None:
        """A dot-segment pattern is MG073 (warning) explaining canonical matching, quoted without doubled escapes."""
        (finding,) = policy_findings(policy({"exempt": [{"id": "legacy", "path": r"/public/\.\./status"}]}))
        assert (finding.code, finding.severity) == ("MG073", Severity.WARNING)
        assert r"'/public/\.\./status'" in finding.message
        assert "resolves '.' and '..' segments" in finding.message

    @pytest.mark.parametrize(
        ("network", "code"),
        [
            ("0.0.0.0/0", "MG074"),
            ("::/0", "MG074"),
            ("0.0.0.0/1", "MG075"),
            ("10.0.0.0/7", "MG075"),
            ("2000::/3", "MG075"),
            ("10.0.0.0/8", None),
            ("10.0.1.5/32", None),
            ("fc00::/7", None),
            ("2001:db8::/32", None),
        ],
    )
    def test_trusted_proxy_ranges(self, network: str, code: str | None) -> None:
        """/0 is MG074 (error), wider than /8 v4 or /16 v6 outside ULA/link-local MG075 (warning), else nothing."""
        source = {"type": "header", "format": "xfcc", "trusted_proxies": ["192.0.2.1/32", network], "ca": PROXY_CA}
        assert codes_of(policy_findings(policy({"source": source}))) == ([code] if code else [])

    def test_proxy_findings_are_errors_and_warnings(self) -> None:
        """MG074 is an error (any client forges the header), MG075 a warning."""
        assert (CODES["MG074"][0], CODES["MG075"][0]) == (Severity.ERROR, Severity.WARNING)

    def test_sni_match_off_is_mg076_unless_the_certificate_comes_from_a_header(self) -> None:
        """require_sni_match: false is MG076 with the APISIX source; a header source never checks SNI anyway."""
        (finding,) = policy_findings(policy({"require_sni_match": False}))
        assert (finding.code, finding.severity) == ("MG076", Severity.WARNING)
        assert "HTTP/2" in finding.message
        source = {"type": "header", "format": "xfcc", "trusted_proxies": ["10.0.0.1/32"], "ca": PROXY_CA}
        assert policy_findings(policy({"require_sni_match": False, "source": source})) == []

    def test_report_override_of_an_enforcing_named_policy_is_mg077(self) -> None:
        """{"policy": "strict", "mode": "report"} is MG077 naming 'strict'; the library's own report mode is not."""
        downgraded = policy({"policy": "strict", "mode": "report"}, STRICT_LIBRARY)
        (finding,) = policy_findings(downgraded, STRICT_LIBRARY)
        assert (finding.code, finding.severity) == ("MG077", Severity.WARNING)
        assert "'strict'" in finding.message
        assert policy_findings(downgraded) == []  # without the policy file nothing says it was enforcing
        trial = PolicyLibrary.from_mapping({"policies": {"trial": {"mode": "report"}}})
        assert policy_findings(policy({"policy": "trial", "mode": "report"}, trial), trial) == []
        assert policy_findings(policy({"policy": "strict"}, STRICT_LIBRARY), STRICT_LIBRARY) == []

    def test_messages_and_fixes_are_one_line_with_known_codes(self) -> None:
        """Every finding has a declared code and a one-line message and fix."""
        document = {
            "exempt": [{"path": ".*"}, {"methods": ["GET"]}, {"path": "//x"}],
            "require_sni_match": False,
        }
        findings = policy_findings(policy(document))
        assert codes_of(findings) == ["MG070", "MG072", "MG073", "MG076"]
        for finding in findings:
            assert finding.code in CODES
            assert "\n" not in finding.message
            assert "\n" not in finding.fix


# -- lint: where the findings are reported ----------------------------------------------------------------


class TestLintFailOpen:
    @pytest.mark.parametrize("where", ["global_rules", "routes", "services", "plugin_configs"])
    def test_catch_all_rule_is_an_error_wherever_it_is_written(
        self, lint: Callable[..., LintResult], where: str
    ) -> None:
        """A catch-all rule is MG070 on the object holding it, and lint exits 1."""
        result = lint(config({"exempt": [{"path": "/.*"}]}, where=where))
        label = {"global_rules": "global_rules/1", "routes": "routes/1"}.get(where, f"{where}/s")
        assert found(result, "MG070") == [(label, Severity.ERROR)]
        assert result.exit_code == 1

    def test_ordinary_prefix_is_clean(self, lint: Callable[..., LintResult]) -> None:
        """'/public/.*' for GET raises none of the fail-open findings."""
        result = lint(config({"exempt": [{"path": "/public/.*", "methods": ["GET"]}]}))
        assert not {f.code for f in result.findings} & {f"MG07{i}" for i in range(10)}

    def test_path_less_host_rule_on_its_own_mtls_host_route_is_mg071(self, lint: Callable[..., LintResult]) -> None:
        """A www.example.com route whose rule exempts that whole host, an mTLS host per its SSL object: MG071."""
        data = config({"exempt": [{"id": "site", "hosts": ["www.example.com"]}]}, host="www.example.com")
        result = lint(data)
        assert found(result, "MG071") == [("routes/1", Severity.WARNING)]
        assert not found(result, "MG061")

    def test_whole_host_rule_from_a_service_is_reported_on_the_route(self, lint: Callable[..., LintResult]) -> None:
        """The host rule may come from the service; the route's host may come from the service too."""
        data = config({"exempt": [{"hosts": ["www.example.com"]}]}, where="services")
        del data["routes"][0]["host"]
        data["services"][0]["hosts"] = ["www.example.com"]
        assert found(lint(data), "MG071") == [("routes/1", Severity.WARNING)]

    @pytest.mark.parametrize(
        "change",
        [
            pytest.param({"rule": {"path": "/docs/.*"}}, id="path-bound"),
            pytest.param({"rule": {"methods": ["GET"]}}, id="method-bound"),
            pytest.param({"ssl": {"id": "mtls", "snis": ["www.example.com"], "cert": REFERENCE + "c"}}, id="no-client"),
        ],
    )
    def test_whole_host_needs_no_path_no_methods_and_an_mtls_host(
        self, lint: Callable[..., LintResult], change: dict[str, Any]
    ) -> None:
        """A path or method condition, or an SSL object that asks no certificate, means no MG071."""
        rule = {"hosts": ["www.example.com"], **change.get("rule", {})}
        data = config({"exempt": [rule]}, host="www.example.com")
        if "ssl" in change:
            data["ssls"] = [change["ssl"]]
        assert not found(lint(data), "MG071")

    def test_dead_pattern_sign_and_header_findings_reach_lint(self, lint: Callable[..., LintResult]) -> None:
        """MG073, MG074 and MG076 from one policy are reported on its holder; MG074 makes lint exit 1."""
        source = {"type": "header", "format": "xfcc", "trusted_proxies": ["0.0.0.0/0"], "ca": PROXY_CA}
        result = lint(config({"exempt": [{"path": "//x"}], "source": source}))
        assert found(result, "MG073") == [("routes/1", Severity.WARNING)]
        assert found(result, "MG074") == [("routes/1", Severity.ERROR)]
        assert result.exit_code == 1
        assert found(lint(config({"require_sni_match": False})), "MG076") == [("routes/1", Severity.WARNING)]

    def test_named_policy_downgrade_replaces_the_generic_report_mode_warning(
        self, lint: Callable[..., LintResult]
    ) -> None:
        """A route switching 'strict' to report mode gets MG077 naming it instead of MG027; plain report keeps MG027."""
        result = lint(config({"policy": "strict", "mode": "report"}), library=STRICT_LIBRARY)
        assert found(result, "MG077") == [("routes/1", Severity.WARNING)]
        assert not found(result, "MG027")
        plain = lint(config({"mode": "report"}), library=STRICT_LIBRARY)
        assert found(plain, "MG027")
        assert not found(plain, "MG077")

    def test_post_resp_is_an_error(self, lint: Callable[..., LintResult]) -> None:
        """mtls-guard in ext-plugin-post-resp (every call a 503) is MG029 and lint exits 1."""
        data = config({})
        data["routes"][0]["plugins"] = {"ext-plugin-post-resp": data["routes"][0]["plugins"]["ext-plugin-pre-req"]}
        result = lint(data)
        assert found(result, "MG029") == [("routes/1", Severity.ERROR)]
        assert result.exit_code == 1

    def test_fixture_reports_each_problem_on_its_object(self) -> None:
        """fail-open.yaml yields exactly the fail-open findings its comments list."""
        result = lint_files([str(FIXTURES / "fail-open.yaml")], library=STRICT_LIBRARY)
        reported = {(f.code, f.obj) for f in result.findings if f.code.startswith("MG07") or f.code == "MG029"}
        assert reported == {
            ("MG070", "global_rules/open-all"),
            ("MG071", "routes/www-whole-host"),
            ("MG072", "routes/reads"),
            ("MG073", "routes/dot-segment"),
            ("MG076", "services/coalesced"),
            ("MG077", "routes/trial"),
            ("MG029", "routes/post-resp"),
        }


# -- MG061 through services, plugin configs and global rules ---------------------------------------------------


class TestHostRuleReach:
    def rule(self) -> dict[str, Any]:
        return {"exempt": [{"id": "public", "hosts": ["www.example.com"]}]}

    def test_service_hosts_with_a_plugin_config_rule(self, lint: Callable[..., LintResult]) -> None:
        """Hosts from the service and the host rule from the plugin config still make MG061 on the route."""
        data = config(self.rule(), where="plugin_configs")
        del data["routes"][0]["host"]
        data["services"] = [{"id": "svc", "hosts": ["www.example.com", "api.example.com"]}]
        data["routes"][0]["service_id"] = "svc"
        assert found(lint(data), "MG061") == [("routes/1", Severity.ERROR)]
        data["services"][0]["hosts"] = ["www.example.com"]
        assert not found(lint(data), "MG061")

    def test_service_hosts_with_the_route_own_rule(self, lint: Callable[..., LintResult]) -> None:
        """A route without hosts takes its service's: a route rule exempting only one of them is MG061."""
        data = config(self.rule())
        del data["routes"][0]["host"]
        data["services"] = [{"id": "svc", "hosts": ["www.example.com", "api.example.com"]}]
        data["routes"][0]["service_id"] = "svc"
        assert found(lint(data), "MG061") == [("routes/1", Severity.ERROR)]

    def test_route_hosts_override_exempt_service_hosts(self, lint: Callable[..., LintResult]) -> None:
        """Service hosts that are exactly the exempt name do not help a route with hosts of its own."""
        data = config(self.rule(), where="services", hosts=["www.example.com", "api.example.com"])
        del data["routes"][0]["host"]
        data["services"][0]["hosts"] = ["www.example.com"]
        assert found(lint(data), "MG061") == [("routes/1", Severity.ERROR)]

    def test_global_host_rule_is_reported_once_on_the_global_rule(self, lint: Callable[..., LintResult]) -> None:
        """A host rule in a global rule is MG060 on the global rule, not MG061 repeated on every route."""
        result = lint(config(self.rule(), where="global_rules"))
        assert found(result, "MG060") == [("global_rules/1", Severity.ERROR)]
        assert not found(result, "MG061")


# -- documentation --------------------------------------------------------------------------------------------


def test_findings_table_lists_exactly_the_codes_and_severities() -> None:
    """docs/lint-findings.md has one row per code of lint_findings.CODES, with the same severity."""
    text = (ROOT / "docs" / "lint-findings.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| (MG\d{3}) \| (\w+) \|", text, flags=re.MULTILINE)
    assert len(rows) == len({code for code, _ in rows}), "a code is documented twice"
    assert dict(rows) == {code: str(severity) for code, (severity, _) in CODES.items()}
