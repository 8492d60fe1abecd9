"""``mtls-guard lint``: loader shapes, every check (fires on a bad config, silent on a good one), CLI output."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from plugins.mtls_guard.identity import load_pem
from plugins.mtls_guard.library import PolicyLibrary
from plugins.mtls_guard.policy import compile_policy
from plugins.mtls_guard.tools.lint import LintResult, lint_files, render_json, render_text
from plugins.mtls_guard.tools.lint_coverage import hosts_overlap
from plugins.mtls_guard.tools.lint_exempt import route_hosts_exempt, rule_may_apply
from plugins.mtls_guard.tools.lint_findings import CODES, Finding, Findings, Severity
from plugins.mtls_guard.tools.lint_load import Resource
from plugins.mtls_guard.tools.lint_read import InputError
from plugins.mtls_guard.tools.lint_regex import analyse, catch_all, may_exempt_route_uri, unmatched_example
from plugins.mtls_guard.tools.lint_tls import host_covers
from runner.cli import main as cli_main
from tests.certs import CertFactory, Issued

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "lint"
FACTORY = CertFactory()
NOW = FACTORY.now
LONG = NOW + timedelta(days=300)


@dataclass(frozen=True)
class Pki:
    server_root: Issued
    server_issuing: Issued
    server: Issued  # api.example.com, chain_pem = leaf + issuing CA
    wildcard: Issued  # *.svc.example.com
    client_root: Issued
    client_issuing: Issued  # intermediate under client_root
    partner_root: Issued  # unrelated to everything above


def _build_pki() -> Pki:
    server_root = FACTORY.ca("Server Root", not_after=LONG)
    server_issuing = FACTORY.ca("Server Issuing", parent=server_root, not_after=LONG)
    server = FACTORY.leaf(
        server_issuing,
        cn="api.example.com",
        dns=["api.example.com"],
        client_auth=False,
        chain=[server_issuing],
        not_after=LONG,
    )
    wildcard = FACTORY.leaf(
        server_issuing, cn="svc", dns=["*.svc.example.com"], client_auth=False, chain=[server_issuing], not_after=LONG
    )
    client_root = FACTORY.ca("Client Root", not_after=LONG)
    client_issuing = FACTORY.ca("Client Issuing", parent=client_root, not_after=LONG)
    partner_root = FACTORY.ca("Partner Root", not_after=LONG)
    return Pki(server_root, server_issuing, server, wildcard, client_root, client_issuing, partner_root)


PKI = _build_pki()


# -- config builders ---------------------------------------------------------------------------------


def guard(policy: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"name": "mtls-guard", "value": json.dumps(policy or {})}


def pre_req(*entries: dict[str, Any], phase: str = "ext-plugin-pre-req", **options: Any) -> dict[str, Any]:
    return {phase: {"conf": list(entries) or [guard()], **options}}


def ssl(
    ident: str = "api",
    snis: tuple[str, ...] = ("api.example.com",),
    *,
    cert: str | None = None,
    ca: str | None = None,
    skip: list[str] | None = None,
    **extra: Any,
) -> dict[str, Any]:
    obj: dict[str, Any] = {"id": ident, "snis": list(snis), "cert": cert or PKI.server.chain_pem, **extra}
    if ca is not None:
        obj["client"] = {"ca": ca}
        if skip is not None:
            obj["client"]["skip_mtls_uri_regex"] = skip
    return obj


def good_config() -> dict[str, Any]:
    """SSL with client CA + catch-all skip, global rule with mtls-guard in pre-req, valid policy."""
    return {
        "routes": [{"id": "1", "uri": "/*", "host": "api.example.com", "upstream_id": "1"}],
        "ssls": [ssl(ca=PKI.client_root.pem, skip=["^/"])],
        "global_rules": [
            {
                "id": "1",
                "plugins": pre_req(
                    guard({"exempt": [{"id": "health", "path": "/health", "methods": ["GET"]}]}),
                    allow_degradation=False,
                ),
            }
        ],
    }


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., str]:
    def _write(data: Any, name: str = "apisix.yaml", *, end: bool = True) -> str:
        path = tmp_path / name
        if name.endswith(".json"):
            path.write_text(json.dumps(data), encoding="utf-8")
        else:
            path.write_text(yaml.safe_dump(data, sort_keys=False) + ("#END\n" if end else ""), encoding="utf-8")
        return str(path)

    return _write


@pytest.fixture
def lint(write: Callable[..., str]) -> Callable[..., LintResult]:
    def _lint(data: Any, **kwargs: Any) -> LintResult:
        kwargs.setdefault("now", NOW)
        return lint_files([write(data)], **kwargs)

    return _lint


def codes(result: LintResult) -> set[str]:
    return {f.code for f in result.findings}


def found(result: LintResult, code: str) -> list[Finding]:
    return [f for f in result.findings if f.code == code]


# -- findings model ----------------------------------------------------------------------------------


class TestFindings:
    def test_every_code_has_a_severity_and_a_meaning(self) -> None:
        """Each code maps to exactly one severity and a non-empty description."""
        for code, (severity, meaning) in CODES.items():
            assert code.startswith("MG")
            assert len(code) == 5
            assert isinstance(severity, Severity)
            assert meaning

    def test_unknown_code_is_refused(self) -> None:
        """A check reporting an undeclared code fails loudly instead of emitting an unstable code."""
        with pytest.raises(KeyError):
            Findings().add("MG999", "routes/1", "m", "f")

    def test_same_finding_twice_is_reported_once(self) -> None:
        """Two paths detecting the same problem on the same object produce one finding."""
        findings = Findings()
        findings.add("MG010", "routes/1", "m", "f")
        findings.add("MG010", "routes/1", "m", "f")
        assert len(findings) == 1

    def test_errors_sort_before_warnings_before_notes(self) -> None:
        """sorted() orders by severity and keeps discovery order within one severity."""
        findings = Findings()
        findings.add("MG014", "routes/1", "info", "f")
        findings.add("MG030", "ssls/a", "warn", "f")
        findings.add("MG016", "routes/2", "err-a", "f")
        findings.add("MG010", "routes/3", "err-b", "f")
        assert [f.message for f in findings.sorted()] == ["err-a", "err-b", "warn", "info"]


# -- loader --------------------------------------------------------------------------------------------


class TestLoader:
    def test_standalone_yaml_is_loaded_with_ids_and_lines(self, write: Callable[..., str]) -> None:
        """Top-level resource lists become resources labelled kind/id, with the YAML line of each object."""
        result = lint_files([write(good_config())], now=NOW)
        route = result.config.of("routes")[0]
        assert route.label == "routes/1"
        assert route.line == 2
        assert [r.label for r in result.config.of("ssls")] == ["ssls/api"]
        assert result.config.files[0].shape == "standalone"

    def test_missing_end_flag_warns(self) -> None:
        """A standalone YAML without #END gets MG001, because APISIX ignores such a file."""
        result = lint_files([str(FIXTURES / "no-end-flag.yaml")], now=NOW)
        assert [f.code for f in found(result, "MG001")] == ["MG001"]
        assert result.exit_code == 0

    def test_end_flag_present_is_silent(self, write: Callable[..., str]) -> None:
        """A file ending in #END gets no MG001."""
        assert "MG001" not in codes(lint_files([write(good_config())], now=NOW))

    def test_json_export_needs_no_end_flag(self, write: Callable[..., str]) -> None:
        """#END is a standalone-YAML rule; JSON exports are not warned about it."""
        assert "MG001" not in codes(lint_files([write(good_config(), "export.json")], now=NOW))

    def test_admin_list_shape_takes_kind_and_id_from_key(self) -> None:
        """{"list": [{"key": "/apisix/routes/<id>", "value": ...}]} yields routes; ids come from value or key."""
        result = lint_files([str(FIXTURES / "admin-routes.json")], now=NOW)
        assert [r.label for r in result.config.of("routes")] == ["routes/orders", "routes/public"]
        assert result.config.files[0].shape == "admin-list"
        assert not [f for f in result.findings if f.code in ("MG002", "MG003")]

    def test_bare_list_takes_kind_from_file_name(self) -> None:
        """A plain JSON list named global_rules.json is read as global rules."""
        result = lint_files([str(FIXTURES / "global_rules.json")], now=NOW)
        assert [r.label for r in result.config.of("global_rules")] == ["global_rules/guard"]

    def test_several_files_merge_into_one_config(self, write: Callable[..., str]) -> None:
        """routes, ssls and global rules from separate files are cross-checked together."""
        ssls = {"list": [{"key": "/apisix/ssls/api", "value": ssl(ca=PKI.client_root.pem, skip=["^/"])}], "total": 1}
        paths = [str(FIXTURES / "admin-routes.json"), write(ssls, "ssls.json"), str(FIXTURES / "global_rules.json")]
        result = lint_files(paths, now=NOW)
        assert {k: len(v) for k, v in result.config.resources.items() if v} == {
            "routes": 2,
            "ssls": 1,
            "global_rules": 1,
        }
        assert "MG010" not in codes(result)  # the global rule from another file covers the routes

    def test_combined_export_with_list_responses_per_resource(self, write: Callable[..., str]) -> None:
        """{"routes": {"list": [...]}, ...} (one list response per resource) is accepted."""
        data = {"routes": {"list": [{"key": "/apisix/routes/7", "value": {"uri": "/x"}}], "total": 1}}
        result = lint_files([write(data, "dump.json")], now=NOW)
        assert [r.label for r in result.config.of("routes")] == ["routes/7"]

    def test_admin_single_object_and_v2_shapes(self, write: Callable[..., str]) -> None:
        """A single {"key", "value"} response and the 2.x {"node": {"nodes": [...]}} response are accepted."""
        single = {"key": "/apisix/routes/9", "value": {"uri": "/nine"}}
        v2 = {"action": "get", "node": {"key": "/apisix/ssls", "nodes": [{"key": "/apisix/ssls/s", "value": ssl("s")}]}}
        result = lint_files([write(single, "one.json"), write(v2, "two.json")], now=NOW)
        assert [r.label for r in result.config.of("routes")] == ["routes/9"]
        assert [r.label for r in result.config.of("ssls")] == ["ssls/s"]

    def test_unrecognised_file_is_an_error(self) -> None:
        """A file with no APISIX resource at all is MG003 (error) and its unknown keys are listed (MG002)."""
        result = lint_files([str(FIXTURES / "not-apisix.json")], now=NOW)
        assert {"MG002", "MG003"} <= codes(result)
        assert any("'apiVersion'" in f.message for f in found(result, "MG002"))
        assert result.exit_code == 1

    def test_known_but_unchecked_resources_are_not_unrecognised(self, write: Callable[..., str]) -> None:
        """An upstreams export is understood (no MG003) even though no check reads upstreams."""
        result = lint_files([write([{"id": "1", "nodes": {"10.0.0.1:80": 1}}], "upstreams.json")], now=NOW)
        assert not {"MG002", "MG003"} & codes(result)
        assert result.config.files[0].shape == "list"

    def test_combined_json_export_with_plain_objects(self, write: Callable[..., str]) -> None:
        """{"routes": [...], "ssls": [...]} in JSON is a combined export of plain objects."""
        result = lint_files([write(good_config(), "export.json")], now=NOW)
        assert result.config.files[0].shape == "combined"
        assert [r.label for r in result.config.of("global_rules")] == ["global_rules/1"]

    def test_list_of_unknown_kind_is_reported(self, write: Callable[..., str]) -> None:
        """Objects without Admin API keys in a file whose name names no resource are counted and reported."""
        result = lint_files([write([{"uri": "/x"}, {"uri": "/y"}], "dump.json")], now=NOW)
        assert any("2 object(s) of unknown kind" in f.message for f in found(result, "MG002"))
        assert "MG003" in codes(result)

    def test_id_less_objects_are_numbered_like_apisix(self, write: Callable[..., str]) -> None:
        """Objects without an id are labelled #<1-based index>, as APISIX's standalone loader names them."""
        result = lint_files([write({"routes": [{"uri": "/a"}, {"uri": "/b"}]})], now=NOW)
        assert [r.label for r in result.config.of("routes")] == ["routes/#1", "routes/#2"]

    def test_duplicate_yaml_key_is_reported_with_its_line(self, tmp_path: Path) -> None:
        """A key given twice in one mapping is MG004 with the line of the second copy."""
        path = tmp_path / "apisix.yaml"
        path.write_text("routes:\n  - id: 1\n    uri: /a\n    uri: /b\n#END\n", encoding="utf-8")
        (finding,) = found(lint_files([str(path)], now=NOW), "MG004")
        assert finding.line == 4
        assert "'uri'" in finding.message

    def test_duplicate_id_across_files_is_reported(self, write: Callable[..., str]) -> None:
        """The same kind/id in two files is MG005."""
        a = write({"routes": [{"id": "1", "uri": "/a"}]}, "a.yaml")
        b = write({"routes": [{"id": "1", "uri": "/b"}]}, "b.yaml")
        assert [f.obj for f in found(lint_files([a, b], now=NOW), "MG005")] == ["routes/1"]

    def test_invalid_yaml_raises_with_line(self) -> None:
        """Broken YAML is an InputError naming the line and column."""
        with pytest.raises(InputError, match=r"invalid YAML at line 4 column \d+"):
            lint_files([str(FIXTURES / "broken.yaml")], now=NOW)

    def test_invalid_json_raises_with_line(self, tmp_path: Path) -> None:
        """Broken JSON is an InputError naming the line and column."""
        path = tmp_path / "routes.json"
        path.write_text('{"list": [\n  {"value": }\n]}', encoding="utf-8")
        with pytest.raises(InputError, match=r"invalid JSON at line 2 column 13"):
            lint_files([str(path)], now=NOW)

    def test_missing_file_raises(self, tmp_path: Path) -> None:
        """A path that does not exist is an InputError."""
        with pytest.raises(InputError, match="no such file"):
            lint_files([str(tmp_path / "nope.yaml")], now=NOW)


# -- skip regex analysis -------------------------------------------------------------------------------


class TestRegexAnalysis:
    @pytest.mark.parametrize(
        ("pattern", "start", "end"),
        [
            ("/health", False, False),
            ("^/health$", True, True),
            (r"^/health\z", True, True),
            ("(^/a$|^/b$)", True, True),
            ("^(?:/a|/b)$", True, True),
            ("^/a$|/b", False, False),
            (r"^/x\$", True, False),
        ],
    )
    def test_anchoring_is_judged_per_alternative(self, pattern: str, start: bool, end: bool) -> None:
        """A pattern is anchored only when every top-level alternative is."""
        analysed = analyse(pattern)
        assert (analysed.start_anchored, analysed.end_anchored) == (start, end)

    def test_pcre_z_is_translated_not_rejected(self) -> None:
        r"""PCRE's \z (absolute end) compiles and does not match before a trailing newline."""
        p = analyse(r"^/health\z")
        assert p.error is None
        assert p.pcre_only is None
        assert p.search("/health")
        assert not p.search("/health\n")

    def test_dollar_matches_before_trailing_newline(self) -> None:
        """$ exempts '/health\\n' as PCRE does, which is why MG033 exists."""
        assert analyse("^/health$").search("/health\n")

    def test_named_group_pcre_spelling_compiles(self) -> None:
        """(?<name>...) is valid PCRE and is translated for Python."""
        assert analyse("^/(?<svc>[a-z]+)$").search("/orders")

    @pytest.mark.parametrize("pattern", [r"\h+", "[[:alpha:]]+", "(?|a|b)", r"\Qa.b\E"])
    def test_pcre_only_syntax_is_flagged(self, pattern: str) -> None:
        """Constructs Python cannot reproduce faithfully are marked PCRE-only, not judged."""
        assert analyse(pattern).pcre_only is not None

    def test_catch_all_and_uncovered_example(self) -> None:
        """'^/' exempts everything; '^/api' leaves '/' to APISIX's own check."""
        assert catch_all([analyse("^/")])
        assert catch_all([analyse(".*")])
        assert not catch_all([analyse("^/api")])
        assert unmatched_example([analyse("^/api")]) == "/"

    @pytest.mark.parametrize(
        ("pattern", "prefix"),
        [("^/healthz?", "/health"), (r"^/health\z", "/health"), ("^/", "/"), ("/x", None), ("^/a|^/b", None)],
    )
    def test_literal_prefix(self, pattern: str, prefix: str | None) -> None:
        """An anchored single alternative exposes the literal every match starts with (quantified chars excluded)."""
        assert analyse(pattern).literal_prefix == prefix

    @pytest.mark.parametrize(
        ("patterns", "route_uri", "may"),
        [
            ([r"^/health\z"], "/admin/*", False),
            ([r"^/health\z"], "/admin", False),
            ([r"^/health\z"], "/health", True),
            ([r"^/health\z"], "/*", True),
            (["/health"], "/admin/*", True),
            (["^/admin/public/"], "/admin/*", True),
            (["^/("], "/x/*", False),
            (["^/api/v1"], "/api/:version/orders", True),
        ],
    )
    def test_route_uri_vs_skip_list(self, patterns: list[str], route_uri: str, may: bool) -> None:
        """A route escapes APISIX's own check only if some of its URIs can match the skip list."""
        assert may_exempt_route_uri([analyse(p) for p in patterns], route_uri) is may


class TestHostMatching:
    @pytest.mark.parametrize(
        ("a", "b", "overlap"),
        [
            ("api.example.com", "api.example.com", True),
            ("*.example.com", "api.example.com", True),
            ("api.example.com", "*.example.com", True),
            ("*.example.com", "*.a.example.com", True),
            ("*.example.com", "example.com", False),
            ("api.example.com", "www.example.com", False),
            ("*.example.org", "api.example.com", False),
        ],
    )
    def test_route_host_vs_sni(self, a: str, b: str, overlap: bool) -> None:
        """Route hosts and SNIs overlap when some host name could match both."""
        assert hosts_overlap(a, b) is overlap

    @pytest.mark.parametrize(
        ("san", "sni", "covers"),
        [
            ("*.svc.example.com", "a.svc.example.com", True),
            ("*.svc.example.com", "a.b.svc.example.com", False),
            ("*.svc.example.com", "svc.example.com", False),
            ("api.example.com", "api.example.com", True),
        ],
    )
    def test_certificate_name_vs_sni(self, san: str, sni: str, covers: bool) -> None:
        """A certificate wildcard covers exactly one label."""
        assert host_covers(san, sni) is covers


# -- ext-plugin configuration ----------------------------------------------------------------------------


class TestExtPluginChecks:
    def test_allow_degradation_true_is_an_error(self, lint: Callable[..., LintResult]) -> None:
        """allow_degradation: true on a pre-req carrying mtls-guard is MG020."""
        data = good_config()
        data["global_rules"][0]["plugins"]["ext-plugin-pre-req"]["allow_degradation"] = True
        result = lint(data)
        assert [f.obj for f in found(result, "MG020")] == ["global_rules/1"]
        assert result.exit_code == 1

    def test_allow_degradation_on_other_plugins_is_not_flagged(self, lint: Callable[..., LintResult]) -> None:
        """allow_degradation on an ext-plugin chain without mtls-guard is not MG020."""
        data = good_config()
        data["routes"][0]["plugins"] = pre_req({"name": "audit", "value": "{}"}, allow_degradation=True)
        assert "MG020" not in codes(lint(data, known_plugins={"audit"}))

    @pytest.mark.parametrize(
        ("phase", "code", "severity"),
        [("ext-plugin-post-req", "MG021", Severity.WARNING), ("ext-plugin-post-resp", "MG029", Severity.ERROR)],
    )
    def test_guard_in_post_phases(
        self, lint: Callable[..., LintResult], phase: str, code: str, severity: Severity
    ) -> None:
        """mtls-guard in post-req is MG021 (a warning), in post-resp MG029 (an error: every call is a 503)."""
        data = good_config()
        data["routes"][0]["plugins"] = pre_req(guard(), phase=phase)
        result = lint(data)
        (finding,) = found(result, code)
        assert (finding.obj, finding.severity) == ("routes/1", severity)
        assert not ({"MG021", "MG029"} - {code}) & codes(result)
        assert not {"MG021", "MG029"} & codes(lint(good_config()))

    def test_invalid_policy_is_an_error_with_the_schema_message(self, lint: Callable[..., LintResult]) -> None:
        """An invalid mtls-guard value is MG022 carrying the PolicyError text."""
        data = good_config()
        data["global_rules"][0]["plugins"] = pre_req(guard({"exempt": [{"paht": "/x"}]}))
        (finding,) = found(lint(data), "MG022")
        assert "exempt[0].paht: unknown key" in finding.message

    def test_named_policy_needs_and_uses_the_policy_file(self, lint: Callable[..., LintResult]) -> None:
        """{"policy": name} is MG022 without --policy-file and valid with a library that defines it."""
        data = good_config()
        data["global_rules"][0]["plugins"] = pre_req(guard({"policy": "strict"}))
        assert "MG022" in codes(lint(data))
        library = PolicyLibrary.from_mapping({"policies": {"strict": {"exempt": [{"path": "/health"}]}}})
        assert "MG022" not in codes(lint(data, library=library))

    def test_unknown_plugin_name_is_an_error(self, lint: Callable[..., LintResult]) -> None:
        """A conf entry naming a plugin the runner lacks is MG023, unless that name is declared known."""
        data = good_config()
        data["global_rules"][0]["plugins"]["ext-plugin-pre-req"]["conf"].append({"name": "geo-fence", "value": ""})
        assert "MG023" in codes(lint(data))
        assert "MG023" not in codes(lint(data, known_plugins={"geo-fence"}))

    def test_value_that_is_not_a_string_is_malformed(self, lint: Callable[..., LintResult]) -> None:
        """APISIX's schema wants value as a JSON string; an inline mapping is MG024."""
        data = good_config()
        data["global_rules"][0]["plugins"] = pre_req({"name": "mtls-guard", "value": {"exempt": []}})
        assert "MG024" in codes(lint(data))

    def test_empty_conf_list_is_malformed(self, lint: Callable[..., LintResult]) -> None:
        """An ext-plugin with an empty conf list is MG024."""
        data = good_config()
        data["global_rules"][0]["plugins"] = {"ext-plugin-pre-req": {"conf": []}}
        assert "MG024" in codes(lint(data))

    def test_disabled_guard_warns_and_stops_covering(self, lint: Callable[..., LintResult]) -> None:
        """_meta.disable on the guard's pre-req is MG025, and the tolerant SNI's route becomes MG010."""
        data = good_config()
        data["global_rules"][0]["plugins"]["ext-plugin-pre-req"]["_meta"] = {"disable": True}
        assert {"MG025", "MG010"} <= codes(lint(data))

    def test_filtered_guard_warns_and_stops_covering(self, lint: Callable[..., LintResult]) -> None:
        """_meta.filter makes the guard conditional: MG026, and the route is not counted as covered."""
        data = good_config()
        data["global_rules"][0]["plugins"]["ext-plugin-pre-req"]["_meta"] = {"filter": [["arg_x", "==", "1"]]}
        assert {"MG026", "MG010"} <= codes(lint(data))

    def test_report_mode_warns(self, lint: Callable[..., LintResult]) -> None:
        """A policy in report mode is MG027; enforce mode is not."""
        data = good_config()
        data["global_rules"][0]["plugins"] = pre_req(guard({"mode": "report"}))
        assert "MG027" in codes(lint(data))
        assert "MG027" not in codes(lint(good_config()))

    def test_route_pre_req_shadows_plugin_config_guard(self, lint: Callable[..., LintResult]) -> None:
        """A route's own pre-req without mtls-guard replaces its plugin config's guarded one: MG028 + MG010."""
        data = good_config()
        data["global_rules"] = []
        data["plugin_configs"] = [{"id": "pc", "plugins": pre_req(guard())}]
        data["routes"][0]["plugin_config_id"] = "pc"
        data["routes"][0]["plugins"] = pre_req({"name": "audit", "value": "{}"})
        result = lint(data, known_plugins={"audit"})
        assert [f.obj for f in found(result, "MG028")] == ["routes/1"]
        assert "MG010" in codes(result)

    def test_missing_plugin_config_and_service_are_errors(self, lint: Callable[..., LintResult]) -> None:
        """plugin_config_id / service_id naming nothing is MG016 (APISIX answers 503)."""
        data = good_config()
        data["routes"][0].update(plugin_config_id="nope", service_id=42)
        messages = [f.message for f in found(lint(data), "MG016")]
        assert len(messages) == 2
        assert any("plugin_config_id 'nope'" in m for m in messages)
        assert any("service_id 42" in m for m in messages)

    def test_existing_references_are_silent(self, lint: Callable[..., LintResult]) -> None:
        """References to objects present in the input raise no MG016."""
        data = good_config()
        data["plugin_configs"] = [{"id": "pc", "plugins": {}}]
        data["services"] = [{"id": "svc"}]
        data["routes"][0].update(plugin_config_id="pc", service_id="svc")
        assert "MG016" not in codes(lint(data))


# -- coverage ------------------------------------------------------------------------------------------


class TestHostCoverage:
    def test_good_config_has_no_errors_or_warnings(self, lint: Callable[..., LintResult]) -> None:
        """CA + catch-all skip + global mtls-guard (no degradation) + valid policy: only the plain-HTTP note."""
        result = lint(good_config())
        assert codes(result) == {"MG014"}
        assert result.exit_code == 0

    def test_good_config_with_https_redirect_is_clean(self, lint: Callable[..., LintResult]) -> None:
        """Redirecting plain HTTP to HTTPS removes the last note."""
        data = good_config()
        data["global_rules"][0]["plugins"]["redirect"] = {"http_to_https": True}
        assert len(lint(data).findings) == 0

    def test_route_without_guard_on_tolerant_sni_is_an_error(self, lint: Callable[..., LintResult]) -> None:
        """No mtls-guard anywhere while the SNI tolerates missing certificates: MG010 per route."""
        data = good_config()
        data["global_rules"] = []
        result = lint(data)
        (finding,) = found(result, "MG010")
        assert finding.obj == "routes/1"
        assert "every URI" in finding.message
        assert result.exit_code == 1

    @pytest.mark.parametrize("holder", ["route", "plugin_config", "service"])
    def test_guard_through_route_plugin_config_or_service_covers(
        self, lint: Callable[..., LintResult], holder: str
    ) -> None:
        """mtls-guard on the route itself, its plugin config or its service all count."""
        data = good_config()
        data["global_rules"] = []
        route = data["routes"][0]
        if holder == "route":
            route["plugins"] = pre_req(guard())
        elif holder == "plugin_config":
            data["plugin_configs"] = [{"id": "pc", "plugins": pre_req(guard())}]
            route["plugin_config_id"] = "pc"
        else:
            data["services"] = [{"id": "svc", "plugins": pre_req(guard())}]
            route["service_id"] = "svc"
        assert "MG010" not in codes(lint(data))

    def test_route_for_another_host_is_not_affected(self, lint: Callable[..., LintResult]) -> None:
        """A route whose hosts cannot match the tolerant SNI needs no guard."""
        data = good_config()
        data["global_rules"] = []
        data["routes"][0]["host"] = "www.example.com"
        assert "MG010" not in codes(lint(data))

    def test_route_without_host_matches_every_sni(self, lint: Callable[..., LintResult]) -> None:
        """A route with no host is reachable through every SNI, the tolerant one included."""
        data = good_config()
        data["global_rules"] = []
        del data["routes"][0]["host"]
        assert "MG010" in codes(lint(data))

    def test_wildcard_hosts_and_service_hosts_count(self, lint: Callable[..., LintResult]) -> None:
        """A *.example.com route host, or hosts inherited from the service, can serve api.example.com."""
        data = good_config()
        data["global_rules"] = []
        data["routes"] = [
            {"id": "wild", "uri": "/*", "hosts": ["*.example.com"]},
            {"id": "svc", "uri": "/*", "service_id": "s"},
            {"id": "other", "uri": "/*", "service_id": "o"},
        ]
        data["services"] = [{"id": "s", "hosts": ["api.example.com"]}, {"id": "o", "hosts": ["other.example.org"]}]
        assert sorted(f.obj for f in found(lint(data), "MG010")) == ["routes/svc", "routes/wild"]

    def test_narrow_skip_list_only_flags_routes_it_can_exempt(self, lint: Callable[..., LintResult]) -> None:
        """With skip '^/health\\z', /admin/* stays enforced by APISIX itself; /health and /* are reachable."""
        data = good_config()
        data["global_rules"] = []
        data["ssls"][0]["client"]["skip_mtls_uri_regex"] = [r"^/health\z"]
        data["routes"] = [
            {"id": name, "uri": uri, "host": "api.example.com"}
            for name, uri in (("admin", "/admin/*"), ("health", "/health"), ("all", "/*"))
        ]
        flagged = found(lint(data), "MG010")
        assert sorted(f.obj for f in flagged) == ["routes/all", "routes/health"]
        assert all("URIs matching the skip regex" in f.message for f in flagged)

    def test_disabled_route_is_ignored(self, lint: Callable[..., LintResult]) -> None:
        """status: 0 routes are not served, so they are not reported."""
        data = good_config()
        data["global_rules"] = []
        data["routes"][0]["status"] = 0
        assert "MG010" not in codes(lint(data))

    def test_non_catch_all_skip_notes_what_apisix_enforces(self, lint: Callable[..., LintResult]) -> None:
        """A skip list that does not match everything gets MG011 with an example URI APISIX still enforces."""
        data = good_config()
        data["ssls"][0]["client"]["skip_mtls_uri_regex"] = [r"^/public/.*"]
        (finding,) = found(lint(data), "MG011")
        assert "(e.g. /)" in finding.message
        assert "MG011" not in codes(lint(good_config()))

    def test_client_without_skip_notes_handshake_rejection(self, lint: Callable[..., LintResult]) -> None:
        """client.ca without a skip regex is MG013, and MG012 once a route on it relies on exemptions."""
        plain = good_config()
        del plain["ssls"][0]["client"]["skip_mtls_uri_regex"]
        plain["global_rules"][0]["plugins"] = pre_req(guard())  # no exemptions
        assert "MG013" in codes(lint(plain))
        assert "MG012" not in codes(lint(plain))
        exempting = good_config()
        del exempting["ssls"][0]["client"]["skip_mtls_uri_regex"]
        result = lint(exempting)
        assert [f.obj for f in found(result, "MG012")] == ["ssls/api"]
        assert "MG010" not in codes(result)  # the handshake itself enforces

    def test_guard_on_sni_without_client_ca_warns(self, lint: Callable[..., LintResult]) -> None:
        """mtls-guard on a route whose SSL objects request no certificate denies everything protected: MG015."""
        data = good_config()
        del data["ssls"][0]["client"]
        assert [f.obj for f in found(lint(data), "MG015")] == ["routes/1"]

    def test_plain_http_note_for_unguarded_strict_sni(self, lint: Callable[..., LintResult]) -> None:
        """A route relying only on the handshake check is noted as open on plain HTTP (MG014, info)."""
        data = good_config()
        data["global_rules"] = []
        del data["ssls"][0]["client"]["skip_mtls_uri_regex"]
        (finding,) = found(lint(data), "MG014")
        assert finding.severity is Severity.INFO
        assert "no client certificate at all" in finding.message

    def test_no_ssl_objects_is_noted(self, lint: Callable[..., LintResult]) -> None:
        """Routes without any SSL objects in the input get MG006 (TLS checks skipped)."""
        data = good_config()
        del data["ssls"]
        assert "MG006" in codes(lint(data))


class TestRouteCa:
    @staticmethod
    def config(client_ca: str, route_ca: str) -> dict[str, Any]:
        data = good_config()
        data["ssls"][0]["client"]["ca"] = client_ca
        data["routes"][0]["plugins"] = pre_req(guard({"require": {"ca": route_ca}}))
        return data

    def test_disjoint_route_ca_is_an_error(self, lint: Callable[..., LintResult]) -> None:
        """A route CA that client.ca does not trust is MG050 on the object holding the policy."""
        (finding,) = found(lint(self.config(PKI.client_root.pem, PKI.partner_root.pem)), "MG050")
        assert finding.obj == "routes/1"
        assert "ssls/api" in finding.message

    def test_route_ca_inside_client_ca_is_silent(self, lint: Callable[..., LintResult]) -> None:
        """client.ca containing the route CA (among others) raises nothing."""
        result = lint(self.config(PKI.client_root.pem + PKI.partner_root.pem, PKI.partner_root.pem))
        assert not {"MG050", "MG051"} & codes(result)

    def test_route_ca_issued_under_client_ca_is_a_note(self, lint: Callable[..., LintResult]) -> None:
        """A route CA that is an intermediate of client.ca's root is MG051 (depth matters), not MG050."""
        result = lint(self.config(PKI.client_root.pem, PKI.client_issuing.pem))
        assert "MG051" in codes(result)
        assert "MG050" not in codes(result)


# -- exemption rules: host rules against route hosts, CORS rules ------------------------------------------


def host_rule(*hosts: str, **extra: Any) -> dict[str, Any]:
    return {"id": "public", "hosts": list(hosts), **extra}


def route_with_rules(*rules: dict[str, Any], **route: Any) -> dict[str, Any]:
    """good_config() without the global guard; route 1 carries mtls-guard with ``rules`` and ``route`` keys."""
    data = good_config()
    data["global_rules"] = []
    data["routes"][0] = {"id": "1", "uri": "/*", "upstream_id": "1", **route}
    data["routes"][0]["plugins"] = pre_req(guard({"exempt": list(rules)}))
    return data


class TestHostExemptionHelpers:
    @pytest.mark.parametrize(
        ("route", "rule", "uncovered"),
        [
            (("www.example.com",), ("www.example.com",), []),
            (("a.example.com",), ("*.example.com",), []),
            (("*.example.com",), ("*.example.com",), []),
            (("example.com",), ("*.example.com",), ["example.com"]),
            (("a.b.example.com",), ("*.example.com",), ["a.b.example.com"]),
            (("*.example.com",), ("www.example.com",), ["*.example.com"]),
            (("www.example.com", "api.example.com"), ("www.example.com",), ["api.example.com"]),
        ],
    )
    def test_route_hosts_the_rule_does_not_exempt(
        self, route: tuple[str, ...], rule: tuple[str, ...], uncovered: list[str]
    ) -> None:
        """A route host counts as exempt when the rule's hosts match it (a route wildcard only by the same wildcard)."""
        assert route_hosts_exempt(route, rule) == uncovered

    @pytest.mark.parametrize(
        ("rule", "route", "applies"),
        [
            ({"path": "/docs/.*"}, {"uri": "/docs/*"}, True),
            ({"path": "/docs/.*"}, {"uri": "/admin/*"}, False),
            ({"path": "/docs/.*"}, {"uri": "/docs/index.html"}, True),
            ({"path": "/docs/.*"}, {"uri": "/admin"}, False),
            ({"path": "/docs?/.*"}, {"uri": "/doc/*"}, True),
            ({"path": "/docs|/admin/.*"}, {"uri": "/admin/*"}, True),
            ({"path": "/users/[0-9]+"}, {"uri": "/users/:id"}, True),
            ({"path": "/docs/.*"}, {}, True),
            ({"methods": ["GET"]}, {"uri": "/*", "methods": ["POST"]}, False),
            ({"methods": ["GET"]}, {"uri": "/*", "methods": ["get", "POST"]}, True),
            ({"preflight": True}, {"uri": "/*", "methods": ["GET"]}, False),
        ],
    )
    def test_rule_may_apply_to_route(self, rule: dict[str, Any], route: dict[str, Any], applies: bool) -> None:
        """A rule whose path or methods no request of the route can match is ruled out; anything else may apply."""
        (compiled,) = compile_policy({"exempt": [host_rule("www.example.com", **rule)]}).config.exempt
        resource = Resource("routes", "1", route, "apisix.yaml")
        assert rule_may_apply(compiled, resource) is applies


class TestHostExemptions:
    def test_host_rule_in_global_rule_is_an_error(self, lint: Callable[..., LintResult]) -> None:
        """A host rule in a global rule's mtls-guard policy is MG060 on the global rule, and lint exits 1."""
        data = good_config()
        policy = {"exempt": [{"id": "health", "path": "/health"}, host_rule("www.example.com")]}
        data["global_rules"][0]["plugins"] = pre_req(guard(policy))
        result = lint(data)
        (finding,) = found(result, "MG060")
        assert finding.obj == "global_rules/1"
        assert finding.severity is Severity.ERROR
        assert "'public'" in finding.message
        assert "www.example.com" in finding.message
        assert result.exit_code == 1

    def test_global_rule_without_host_rule_is_silent(self, lint: Callable[..., LintResult]) -> None:
        """A global policy whose exemptions name no hosts raises no MG060."""
        assert "MG060" not in codes(lint(good_config()))

    def test_host_rule_on_route_is_not_a_global_finding(self, lint: Callable[..., LintResult]) -> None:
        """A host rule on a route's own policy is judged per route (MG061), never as MG060."""
        result = lint(route_with_rules(host_rule("www.example.com")))
        assert "MG060" not in codes(result)
        assert "MG061" in codes(result)

    def test_route_without_hosts_is_an_error(self, lint: Callable[..., LintResult]) -> None:
        """A host rule on a route without host/hosts is MG061 (error): the route answers for every name."""
        result = lint(route_with_rules(host_rule("www.example.com")))
        (finding,) = found(result, "MG061")
        assert finding.obj == "routes/1"
        assert finding.severity is Severity.ERROR
        assert "no host/hosts" in finding.message
        assert "split the route" in finding.fix
        assert result.exit_code == 1

    def test_route_with_other_hosts_too_is_an_error(self, lint: Callable[..., LintResult]) -> None:
        """A route answering for the exempt host and another one is MG061 naming the host left protected."""
        data = route_with_rules(host_rule("www.example.com"), hosts=["www.example.com", "api.example.com"])
        (finding,) = found(lint(data), "MG061")
        assert "also answers for api.example.com" in finding.message
        assert "one for api.example.com" in finding.fix

    def test_route_with_only_other_hosts_is_silent(self, lint: Callable[..., LintResult]) -> None:
        """A rule exempting none of the route's hosts never applies there (mtls-guard needs Host == $host)."""
        data = route_with_rules(host_rule("www.example.com"), host="api.example.com")
        assert not {"MG061", "MG062"} & codes(lint(data))

    @pytest.mark.parametrize(
        ("route_hosts", "rule_hosts"),
        [
            (["www.example.com"], ["www.example.com"]),
            (["www.example.com"], ["www.example.com", "docs.example.com"]),
            (["a.example.com", "b.example.com"], ["*.example.com"]),
            (["*.example.com"], ["*.example.com"]),
            (["WWW.Example.com."], ["www.example.com"]),
        ],
    )
    def test_route_serving_only_exempt_hosts_is_silent(
        self, lint: Callable[..., LintResult], route_hosts: list[str], rule_hosts: list[str]
    ) -> None:
        """A route whose hosts are all exempt by the rule (the split-route pattern) raises neither MG061 nor MG062."""
        result = lint(route_with_rules(host_rule(*rule_hosts), hosts=route_hosts))
        assert not {"MG061", "MG062"} & codes(result)

    def test_route_host_outside_the_rule_wildcard_is_an_error(self, lint: Callable[..., LintResult]) -> None:
        """The rule's *.example.com does not exempt example.com itself, so a route for both is MG061."""
        data = route_with_rules(host_rule("*.example.com"), hosts=["*.example.com", "example.com"])
        (finding,) = found(lint(data), "MG061")
        assert "also answers for example.com," in finding.message

    @pytest.mark.parametrize("holder", ["plugin_config", "service"])
    def test_rule_from_plugin_config_or_service_is_reported_on_the_route(
        self, lint: Callable[..., LintResult], holder: str
    ) -> None:
        """A host rule reaching a route via its plugin config or service is MG061 on the route, naming the holder."""
        data = route_with_rules(hosts=["www.example.com", "api.example.com"])
        route = data["routes"][0]
        del route["plugins"]
        plugins = pre_req(guard({"exempt": [host_rule("www.example.com")]}))
        if holder == "plugin_config":
            data["plugin_configs"] = [{"id": "pc", "plugins": plugins}]
            route["plugin_config_id"] = "pc"
            label = "plugin_configs/pc"
        else:
            data["services"] = [{"id": "svc", "plugins": plugins}]
            route["service_id"] = "svc"
            label = "services/svc"
        (finding,) = found(lint(data), "MG061")
        assert finding.obj == "routes/1"
        assert f"of {label}" in finding.message
        assert label in finding.fix

    def test_service_hosts_are_the_route_hosts(self, lint: Callable[..., LintResult]) -> None:
        """A route without hosts inherits its service's; exempt service hosts make the route safe, others do not."""
        data = route_with_rules()
        route = data["routes"][0]
        del route["plugins"]
        data["services"] = [
            {
                "id": "svc",
                "hosts": ["www.example.com"],
                "plugins": pre_req(guard({"exempt": [host_rule("www.example.com")]})),
            }
        ]
        route["service_id"] = "svc"
        assert "MG061" not in codes(lint(data))
        data["services"][0]["hosts"] = ["api.example.com", "www.example.com"]
        assert "MG061" in codes(lint(data))

    def test_route_own_pre_req_replaces_the_service_rule(self, lint: Callable[..., LintResult]) -> None:
        """A route whose own ext-plugin-pre-req replaces its service's host-exempting one raises no MG061."""
        data = route_with_rules(host="api.example.com")
        data["services"] = [{"id": "svc", "plugins": pre_req(guard({"exempt": [host_rule("www.example.com")]}))}]
        data["routes"][0]["service_id"] = "svc"
        assert "MG061" not in codes(lint(data))

    def test_rule_that_cannot_match_the_route_is_silent(self, lint: Callable[..., LintResult]) -> None:
        """A host rule whose path or methods no request of the route can match raises no MG061 for that route."""
        rule = host_rule("www.example.com", path="/docs/.*")
        assert "MG061" not in codes(lint(route_with_rules(rule, uri="/admin/*")))
        assert "MG061" in codes(lint(route_with_rules(rule, uri="/docs/*")))
        by_method = host_rule("www.example.com", methods=["GET"])
        assert "MG061" not in codes(lint(route_with_rules(by_method, methods=["POST"])))

    def test_disabled_route_is_ignored(self, lint: Callable[..., LintResult]) -> None:
        """A route with status 0 is not served, so its host rule is not reported."""
        assert "MG061" not in codes(lint(route_with_rules(host_rule("www.example.com"), status=0)))

    def test_plain_http_reachable_unsafe_host_rule_warns(self, lint: Callable[..., LintResult]) -> None:
        """An MG061 route served on the plain-HTTP port (no http_to_https redirect) also gets MG062 (warning)."""
        result = lint(route_with_rules(host_rule("www.example.com")))
        (finding,) = found(result, "MG062")
        assert finding.obj == "routes/1"
        assert finding.severity is Severity.WARNING
        assert "no TLS SNI" in finding.message

    @pytest.mark.parametrize("where", ["route", "global_rule"])
    def test_https_redirect_silences_plain_http_warning(self, lint: Callable[..., LintResult], where: str) -> None:
        """With http_to_https on the route or a global rule, MG062 goes away while MG061 stays."""
        data = route_with_rules(host_rule("www.example.com"))
        if where == "route":
            data["routes"][0]["plugins"]["redirect"] = {"http_to_https": True}
        else:
            data["global_rules"] = [{"id": "tls", "plugins": {"redirect": {"http_to_https": True}}}]
        result = lint(data)
        assert "MG062" not in codes(result)
        assert "MG061" in codes(result)


class TestPreflightExemptions:
    def test_bare_options_rule_warns(self, lint: Callable[..., LintResult]) -> None:
        """methods: [OPTIONS] is MG063 (warning) on the holder, suggesting preflight: true; lint still exits 0."""
        data = good_config()
        policy = {"exempt": [{"id": "cors", "methods": ["OPTIONS"]}]}
        data["global_rules"][0]["plugins"] = pre_req(guard(policy))
        result = lint(data)
        (finding,) = found(result, "MG063")
        assert finding.obj == "global_rules/1"
        assert finding.severity is Severity.WARNING
        assert '"preflight": true' in finding.fix
        assert result.exit_code == 0

    @pytest.mark.parametrize(
        "rule",
        [
            {"id": "cors", "preflight": True},
            {"id": "cors", "preflight": True, "methods": ["OPTIONS"]},
            {"id": "read", "methods": ["GET", "OPTIONS"]},
            {"id": "health", "path": "/health", "methods": ["GET"]},
        ],
    )
    def test_preflight_and_other_method_rules_are_silent(
        self, lint: Callable[..., LintResult], rule: dict[str, Any]
    ) -> None:
        """A preflight rule, or a rule naming other methods besides or instead of OPTIONS, raises no MG063."""
        data = good_config()
        data["global_rules"][0]["plugins"] = pre_req(guard({"exempt": [rule]}))
        assert "MG063" not in codes(lint(data))

    def test_fixture_reports_every_exemption_finding(self) -> None:
        """The host-exemptions fixture yields MG060-MG063 on exactly the objects that have the problem."""
        result = lint_files([str(FIXTURES / "host-exemptions.yaml")], now=NOW)
        reported = {(f.code, f.obj) for f in result.findings if f.code.startswith("MG06")}
        assert reported == {
            ("MG060", "global_rules/public-site"),
            ("MG061", "routes/mixed"),
            ("MG062", "routes/mixed"),
            ("MG063", "routes/cors"),
        }


# -- SSL objects: skip regexes and certificates ---------------------------------------------------------------


class TestSkipRegexChecks:
    @staticmethod
    def result(lint: Callable[..., LintResult], *patterns: str) -> LintResult:
        data = good_config()
        data["ssls"][0]["client"]["skip_mtls_uri_regex"] = list(patterns)
        return lint(data)

    def test_unanchored_pattern_warns_with_example(self, lint: Callable[..., LintResult]) -> None:
        """'/health' is MG030 (start) and MG031 (end), explaining '/x/health/admin'."""
        result = self.result(lint, "/health")
        assert "'/x/health/admin'" in found(result, "MG030")[0].message
        assert "MG031" in codes(result)

    def test_anchored_pattern_is_silent(self, lint: Callable[..., LintResult]) -> None:
        r"""'^/health\z' raises no regex finding."""
        assert not {"MG030", "MG031", "MG032", "MG033", "MG034"} & codes(self.result(lint, r"^/health\z"))

    def test_uncompilable_pattern_is_an_error(self, lint: Callable[..., LintResult]) -> None:
        """A pattern Python cannot compile is MG032 (error)."""
        result = self.result(lint, "^/metrics(")
        assert "MG032" in codes(result)
        assert result.exit_code == 1

    def test_dollar_end_notes_newline(self, lint: Callable[..., LintResult]) -> None:
        """'^/health$' is MG033 mentioning %0A, and no anchoring warning."""
        result = self.result(lint, "^/health$")
        assert "%0A" in found(result, "MG033")[0].message
        assert not {"MG030", "MG031"} & codes(result)

    def test_pcre_only_pattern_warns(self, lint: Callable[..., LintResult]) -> None:
        r"""'^/\h' is MG034, not a false MG032."""
        result = self.result(lint, r"^/\h+$")
        assert "MG034" in codes(result)
        assert "MG032" not in codes(result)

    def test_empty_skip_list_is_malformed(self, lint: Callable[..., LintResult]) -> None:
        """An empty skip list violates APISIX's minItems: MG035."""
        assert "MG035" in codes(self.result(lint))


class TestCertificates:
    @staticmethod
    def with_ssl(**kwargs: Any) -> dict[str, Any]:
        data = good_config()
        data["ssls"] = [ssl(**{"ca": PKI.client_root.pem, "skip": ["^/"], **kwargs})]
        return data

    def test_good_certificates_are_silent(self, lint: Callable[..., LintResult]) -> None:
        """A complete, valid chain covering the SNI and a CA-only client.ca raise no certificate finding."""
        assert not {c for c in codes(lint(good_config())) if c.startswith("MG04")}

    def test_unparseable_pem_is_an_error(self, lint: Callable[..., LintResult]) -> None:
        """A cert field without a PEM certificate is MG040."""
        assert "MG040" in codes(lint(self.with_ssl(cert="not a certificate")))

    def test_expired_not_yet_valid_and_expiring(self, lint: Callable[..., LintResult]) -> None:
        """Expired is MG041, not yet valid MG043 (errors); expiring within the window MG042 (warning)."""
        expired = FACTORY.ca("Old Client CA", not_before=NOW - timedelta(days=9), not_after=NOW - timedelta(days=1))
        future = FACTORY.ca("Future Client CA", not_before=NOW + timedelta(days=2), not_after=LONG)
        soon = FACTORY.ca("Soon Client CA", not_after=NOW + timedelta(days=10))
        result = lint(self.with_ssl(ca=expired.pem + future.pem + soon.pem))
        assert {"MG041", "MG043", "MG042"} <= codes(result)
        assert "Soon Client CA" in found(result, "MG042")[0].message

    def test_expiry_window_is_configurable(self, lint: Callable[..., LintResult]) -> None:
        """--expiry-warning-days 5 does not warn about a certificate with 10 days left."""
        soon = FACTORY.ca("Soon Client CA", not_after=NOW + timedelta(days=10))
        assert "MG042" not in codes(lint(self.with_ssl(ca=soon.pem), expiry_warning_days=5))
        assert "MG042" in codes(lint(self.with_ssl(ca=soon.pem), expiry_warning_days=30))

    def test_now_moves_the_evaluation_date(self, lint: Callable[..., LintResult]) -> None:
        """Evaluating at a later time turns a valid certificate into an expired one."""
        assert "MG041" in codes(lint(good_config(), now=LONG + timedelta(days=1)))

    def test_incomplete_server_chain_warns(self, lint: Callable[..., LintResult]) -> None:
        """A leaf whose issuer is not in the PEM (and is not self-signed) is MG044."""
        assert "MG044" in codes(lint(self.with_ssl(cert=PKI.server.pem)))
        self_signed = FACTORY.self_signed_leaf("api.example.com", dns=["api.example.com"], not_after=LONG)
        assert "MG044" not in codes(lint(self.with_ssl(cert=self_signed.pem)))

    def test_non_ca_in_client_ca_warns(self, lint: Callable[..., LintResult]) -> None:
        """A leaf certificate inside client.ca is MG045."""
        assert "MG045" in codes(lint(self.with_ssl(ca=PKI.client_root.pem + PKI.server.pem)))

    def test_references_are_noted_not_checked(self, lint: Callable[..., LintResult]) -> None:
        """$secret:// and $env:// values are MG046 (info) and raise no parse error."""
        result = lint(self.with_ssl(cert="$secret://vault/ssl/api/cert", ca="$env://CLIENT_CA"))
        assert len(found(result, "MG046")) == 2
        assert "MG040" not in codes(result)

    def test_certificate_not_covering_sni_warns(self, lint: Callable[..., LintResult]) -> None:
        """An SNI outside the certificate's SANs is MG047; a one-label wildcard SAN covers its SNI."""
        result = lint(self.with_ssl(snis=("api.example.com", "www.example.com")))
        assert ["www.example.com" in f.message for f in found(result, "MG047")] == [True]
        wild = self.with_ssl(snis=("a.svc.example.com",), cert=PKI.wildcard.chain_pem)
        assert "MG047" not in codes(lint(wild))

    def test_pki_sanity(self) -> None:
        """The test PKI is what the tests assume (the server chain carries its issuer)."""
        assert load_pem(PKI.server.pem).issuer == load_pem(PKI.server_issuing.pem).subject


# -- command line ----------------------------------------------------------------------------------------


class TestCommandLine:
    def test_exit_zero_and_text_output_for_a_good_config(
        self, write: Callable[..., str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """A config without errors exits 0 and prints a summary line."""
        assert cli_main(["lint", write(good_config())]) == 0
        out = capsys.readouterr().out
        assert "0 error(s)" in out
        assert "info MG014 routes/1:" in out

    def test_exit_one_with_file_line_code_object_and_fix(
        self, write: Callable[..., str], capsys: pytest.CaptureFixture[str]
    ) -> None:
        """Errors exit 1; each line carries file:line, severity, code, object, message and fix."""
        data = good_config()
        data["global_rules"] = []
        path = write(data)
        assert cli_main(["lint", path]) == 1
        line = next(x for x in capsys.readouterr().out.splitlines() if "MG010" in x)
        assert line.startswith(f"{path}:2: error MG010 routes/1: reachable without a client certificate")
        assert "-- fix: attach mtls-guard" in line

    def test_json_output_shape(self, write: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
        """--format json prints files, findings (severity/code/object/message/fix/file/line), summary, exit code."""
        data = good_config()
        data["global_rules"][0]["plugins"]["ext-plugin-pre-req"]["allow_degradation"] = True
        assert cli_main(["lint", "--format", "json", write(data)]) == 1
        document = json.loads(capsys.readouterr().out)
        assert set(document) == {"files", "findings", "summary", "exit_code"}
        assert document["files"][0]["shape"] == "standalone"
        assert document["files"][0]["resources"] == 3
        (error,) = [f for f in document["findings"] if f["severity"] == "error"]
        assert set(error) == {"severity", "code", "object", "message", "fix", "file", "line"}
        assert (error["code"], error["object"]) == ("MG020", "global_rules/1")
        assert document["summary"] == {"errors": 1, "warnings": 0, "infos": 1}
        assert document["exit_code"] == 1

    def test_unreadable_input_exits_two(self, capsys: pytest.CaptureFixture[str]) -> None:
        """Bad YAML exits 2 with the line on stderr, and prints no findings."""
        assert cli_main(["lint", str(FIXTURES / "broken.yaml")]) == 2
        captured = capsys.readouterr()
        assert "invalid YAML at line 4" in captured.err
        assert captured.out == ""

    def test_missing_file_exits_two(self, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
        """A missing file exits 2."""
        assert cli_main(["lint", str(tmp_path / "missing.yaml")]) == 2
        assert "no such file" in capsys.readouterr().err

    def test_bad_now_and_bad_policy_file_exit_two(
        self, write: Callable[..., str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """An unparseable --now or a broken --policy-file is unreadable input (2)."""
        path = write(good_config())
        assert cli_main(["lint", "--now", "yesterday", path]) == 2
        broken = tmp_path / "policies.yaml"
        broken.write_text("policies: [\n", encoding="utf-8")
        assert cli_main(["lint", "--policy-file", str(broken), path]) == 2
        assert "--now 'yesterday'" in capsys.readouterr().err

    def test_now_and_plugin_options(self, write: Callable[..., str], capsys: pytest.CaptureFixture[str]) -> None:
        """--now moves certificate dates; --plugin declares another runner plugin name."""
        data = good_config()
        data["global_rules"][0]["plugins"]["ext-plugin-pre-req"]["conf"].append({"name": "audit", "value": ""})
        path = write(data)
        assert cli_main(["lint", "--plugin", "audit", path]) == 0
        later = (LONG + timedelta(days=2)).isoformat()
        assert cli_main(["lint", "--plugin", "audit", "--now", later, path]) == 1
        assert "MG041" in capsys.readouterr().out

    def test_renderers_agree_on_counts(self, write: Callable[..., str]) -> None:
        """Text and JSON renderings report the same number of findings."""
        data = copy.deepcopy(good_config())
        data["global_rules"] = []
        result = lint_files([write(data)], now=NOW)
        text_lines = render_text(result).splitlines()[:-1]
        assert len(text_lines) == len(json.loads(render_json(result))["findings"]) == len(result.findings)


class TestRawDelivery:
    def test_raw_request_uri_on_a_guarded_route_is_an_error(self, lint: Callable[..., LintResult]) -> None:
        """proxy-rewrite use_real_request_uri_unsafe on a guarded route is MG064: the judged path is replaced."""
        data = route_with_rules({"path": "/public/.*"})
        data["routes"][0]["plugins"]["proxy-rewrite"] = {"use_real_request_uri_unsafe": True}
        (finding,) = found(lint(data), "MG064")
        assert "raw request-target" in finding.message

    def test_raw_request_uri_from_the_service_counts(self, lint: Callable[..., LintResult]) -> None:
        """The setting in the route's service is found too, and named."""
        data = route_with_rules({"path": "/public/.*"})
        data["services"] = [{"id": "svc", "plugins": {"proxy-rewrite": {"use_real_request_uri_unsafe": True}}}]
        data["routes"][0]["service_id"] = "svc"
        (finding,) = found(lint(data), "MG064")
        assert "from service" in finding.message

    def test_uri_rewrite_is_fine(self, lint: Callable[..., LintResult]) -> None:
        """A proxy-rewrite uri (derived from the judged $uri) raises no MG064."""
        data = route_with_rules({"path": "/public/.*"})
        data["routes"][0]["plugins"]["proxy-rewrite"] = {"uri": "/v2$uri"}
        assert "MG064" not in codes(lint(data))
