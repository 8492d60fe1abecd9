"""``mtls-guard lint`` on Kubernetes manifests: the shipped layout, the CRD mapping, Secrets, other kinds."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import yaml

from plugins.mtls_guard.library import PolicyLibrary
from plugins.mtls_guard.tools.lint import LintResult, lint_files
from plugins.mtls_guard.tools.lint_findings import Finding, Severity
from plugins.mtls_guard.tools.lint_read import InputError
from runner.cli import main as cli_main
from tests.certs import CertFactory

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))
POLICIES = ROOT / "conf" / "policies.yaml"
FACTORY = CertFactory()
NOW = FACTORY.now
LONG = NOW + timedelta(days=300)
HOST = "api.example.test"
CLIENT_CA = FACTORY.ca("Client CA", not_after=LONG)
SERVER = FACTORY.leaf(CLIENT_CA, cn=HOST, dns=[HOST], client_auth=False, not_after=LONG)


# -- manifest builders -------------------------------------------------------------------------------


def meta(name: str, namespace: str | None) -> dict[str, Any]:
    return {"name": name, **({"namespace": namespace} if namespace else {})}


def crd(kind: str, name: str, spec: dict[str, Any], namespace: str | None = "demo") -> dict[str, Any]:
    return {"apiVersion": "apisix.apache.org/v2", "kind": kind, "metadata": meta(name, namespace), "spec": spec}


def guard(policy: dict[str, Any] | None = None, **entry: Any) -> dict[str, Any]:
    conf = {"conf": [{"name": "mtls-guard", "value": json.dumps(policy or {})}], "allow_degradation": False}
    return {"name": "ext-plugin-pre-req", "config": conf, **entry}


def rule(
    name: str = "main", *, paths: tuple[str, ...] = ("/*",), methods: list[str] | None = None, **extra: Any
) -> dict[str, Any]:
    match: dict[str, Any] = {"hosts": [HOST], "paths": list(paths)}
    if methods:
        match["methods"] = methods
    return {"name": name, "match": match, **extra}


def route(*rules: dict[str, Any], name: str = "api", namespace: str | None = "demo") -> dict[str, Any]:
    return crd("ApisixRoute", name, {"http": list(rules) or [rule()]}, namespace)


def tls(*, skip: list[str] | None = None, depth: int | None = 1, ca_secret: str = "client-ca") -> dict[str, Any]:
    client: dict[str, Any] = {"caSecret": {"name": ca_secret, "namespace": "demo"}}
    if depth is not None:
        client["depth"] = depth
    client["skip_mtls_uri_regex"] = skip or ["^/"]
    return crd(
        "ApisixTls", "api", {"hosts": [HOST], "secret": {"name": "api-tls", "namespace": "demo"}, "client": client}
    )


def secret(name: str, namespace: str | None = "demo", **data: str) -> dict[str, Any]:
    encoded = {key.replace("_", "."): base64.b64encode(value.encode()).decode() for key, value in data.items()}
    return {"apiVersion": "v1", "kind": "Secret", "metadata": meta(name, namespace), "data": encoded}


def k8s(kind: str, name: str, api_version: str = "v1") -> dict[str, Any]:
    return {"apiVersion": api_version, "kind": kind, "metadata": meta(name, "demo"), "spec": {}}


@pytest.fixture
def write(tmp_path: Path) -> Callable[..., str]:
    def _write(*documents: Any, name: str = "layout.yaml") -> str:
        path = tmp_path / name
        if name.endswith(".json"):
            path.write_text(json.dumps(documents[0]), encoding="utf-8")
        else:
            path.write_text(yaml.safe_dump_all(documents, sort_keys=False), encoding="utf-8")
        return str(path)

    return _write


@pytest.fixture
def lint(write: Callable[..., str]) -> Callable[..., LintResult]:
    def _lint(*documents: Any) -> LintResult:
        return lint_files([write(*documents)], now=NOW)

    return _lint


def found(result: LintResult, code: str) -> list[Finding]:
    return [f for f in result.findings if f.code == code]


def codes(result: LintResult) -> set[str]:
    return {f.code for f in result.findings}


# -- the shipped layout ------------------------------------------------------------------------------


class TestShippedManifests:
    def test_shipped_manifests_lint_without_errors(self) -> None:
        """deploy/kubernetes/*.yaml, linted with the shipped policy library, has no error and no unread content."""
        assert SHIPPED, "deploy/kubernetes has no manifests"
        library = PolicyLibrary.from_yaml_file(str(POLICIES))
        result = lint_files([str(p) for p in SHIPPED], library=library)
        assert result.exit_code == 0, [f.as_dict() for f in result.findings if f.severity is Severity.ERROR]
        assert not codes(result) & {"MG002", "MG003", "MG004", "MG016", "MG035", "MG040"}
        documents = [d for p in SHIPPED for d in yaml.safe_load_all(p.read_text(encoding="utf-8")) if d]
        rules = [r for d in documents if d["kind"] == "ApisixRoute" for r in d["spec"]["http"]]
        assert len(result.config.of("routes")) == len(rules)
        assert {f.shape for f in result.config.files} == {"kubernetes"}

    def test_shipped_manifests_pass_on_the_command_line(self, capsys: pytest.CaptureFixture[str]) -> None:
        """`mtls-guard lint --policy-file conf/policies.yaml deploy/kubernetes/*.yaml` exits 0."""
        assert cli_main(["lint", "--policy-file", str(POLICIES), *map(str, SHIPPED)]) == 0
        assert "0 error(s)" in capsys.readouterr().out


# -- ApisixRoute, ApisixPluginConfig, ApisixGlobalRule ---------------------------------------------------


class TestRoutes:
    def test_rules_become_routes_with_ids_lines_and_match_fields(self, tmp_path: Path) -> None:
        """Each spec.http rule is a route <namespace>/<name>/<rule> with its hosts, paths, methods and YAML line."""
        doc = route(rule("a", methods=["GET"], plugins=[guard()]), rule("b", paths=("/b",)))
        path = tmp_path / "route.yaml"
        path.write_text("# comment\n---\n" + yaml.safe_dump(doc, sort_keys=False), encoding="utf-8")
        result = lint_files([str(path)], now=NOW)
        a, b = result.config.of("routes")
        assert (a.label, b.label) == ("routes/demo/api/a", "routes/demo/api/b")
        assert a.value["hosts"] == [HOST]
        assert a.value["uris"] == ["/*"]
        assert a.value["methods"] == ["GET"]
        assert "ext-plugin-pre-req" in a.value["plugins"]
        text = path.read_text(encoding="utf-8").splitlines()
        assert a.line is not None
        assert text[a.line - 1].lstrip().startswith("- name: a")
        assert b.value["uris"] == ["/b"]

    def test_route_without_guard_on_a_tolerant_sni_points_at_its_rule(self, write: Callable[..., str]) -> None:
        """An unguarded rule on a catch-all skip SNI is MG010, reported with the manifest file and the rule's line."""
        path = write(route(rule("open")), tls())
        (finding,) = found(lint_files([path], now=NOW), "MG010")
        assert (finding.obj, finding.source) == ("routes/demo/api/open", path)
        assert finding.line is not None
        assert Path(path).read_text(encoding="utf-8").splitlines()[finding.line - 1].lstrip().startswith("- name: open")

    def test_plugin_config_from_another_file_guards_the_route(self, write: Callable[..., str]) -> None:
        """plugin_config_name links the ApisixPluginConfig (any file order), whose mtls-guard then covers the route."""
        routes = write(route(rule(plugin_config_name="guarded")), tls(), name="route.yaml")
        configs = write(crd("ApisixPluginConfig", "guarded", {"plugins": [guard()]}), name="pc.yaml")
        result = lint_files([routes, configs], now=NOW)
        assert result.config.of("routes")[0].value["plugin_config_id"] == "demo/guarded"
        assert not {"MG010", "MG016"} & codes(result)

    def test_plugin_config_namespace_overrides_the_route_namespace(self, lint: Callable[..., LintResult]) -> None:
        """plugin_config_namespace selects the plugin config's namespace instead of the route's."""
        pc = crd("ApisixPluginConfig", "shared", {"plugins": [guard()]}, namespace="ops")
        result = lint(route(rule(plugin_config_name="shared", plugin_config_namespace="ops")), pc)
        assert result.config.of("routes")[0].value["plugin_config_id"] == "ops/shared"

    def test_missing_plugin_config_is_mg016_and_leaves_the_route_unguarded(
        self, lint: Callable[..., LintResult]
    ) -> None:
        """A plugin_config_name with no ApisixPluginConfig is MG016, and the route runs without its plugins (MG010)."""
        result = lint(route(rule(plugin_config_name="absent")), tls())
        (finding,) = found(result, "MG016")
        assert "no ApisixPluginConfig in the input (demo/absent)" in finding.message
        assert "plugin_config_id" not in result.config.of("routes")[0].value
        assert [f.obj for f in found(result, "MG010")] == ["routes/demo/api/main"]

    def test_disabled_guard_is_reported_and_left_out(self, lint: Callable[..., LintResult]) -> None:
        """enable: false on a guarded ext-plugin-pre-req is MG025, and the controller's omission leaves MG010."""
        result = lint(route(rule(plugins=[guard(enable=False)])), tls())
        (finding,) = found(result, "MG025")
        assert "enable: false" in finding.message
        assert finding.line is not None
        assert result.config.of("routes")[0].value["plugins"] == {}
        assert found(result, "MG010")

    def test_enable_defaults_to_true(self, lint: Callable[..., LintResult]) -> None:
        """A plugin entry without 'enable' is enabled, as the CRD defaults it."""
        entry = guard()
        assert "enable" not in entry
        assert not {"MG010", "MG025"} & codes(lint(route(rule(plugins=[entry])), tls()))

    def test_plugin_listed_twice_is_mg004(self, lint: Callable[..., LintResult]) -> None:
        """Two entries for one plugin name are MG004: the controller keeps only the last one."""
        result = lint(route(rule(plugins=[guard(), guard()])))
        assert any("listed twice" in f.message for f in found(result, "MG004"))

    def test_unnamed_rule_and_missing_paths_are_mg004(self, lint: Callable[..., LintResult]) -> None:
        """A rule without a name or without match.paths is MG004; the route is still checked."""
        result = lint(route({"match": {"hosts": [HOST]}}))
        messages = [f.message for f in found(result, "MG004")]
        assert any("needs a 'name'" in m for m in messages)
        assert any("match.paths" in m for m in messages)
        assert [r.label for r in result.config.of("routes")] == ["routes/demo/api/#1"]

    def test_global_rule_guards_every_route(self, lint: Callable[..., LintResult]) -> None:
        """An ApisixGlobalRule carrying mtls-guard covers routes that have none of their own."""
        result = lint(route(rule("a"), rule("b")), tls(), crd("ApisixGlobalRule", "base", {"plugins": [guard()]}))
        assert [r.label for r in result.config.of("global_rules")] == ["global_rules/demo/base"]
        assert "MG010" not in codes(result)

    def test_two_global_rules_configuring_one_plugin_is_mg005(self, lint: Callable[..., LintResult]) -> None:
        """Two ApisixGlobalRules configuring the same plugin are MG005: the controller keeps one per plugin name."""
        result = lint(
            crd("ApisixGlobalRule", "one", {"plugins": [guard()]}),
            crd("ApisixGlobalRule", "two", {"plugins": [guard()]}),
        )
        (finding,) = found(result, "MG005")
        assert finding.obj == "global_rules/demo/two"

    def test_secret_ref_values_merge_into_the_plugin_config(self, lint: Callable[..., LintResult]) -> None:
        """secretRef Secret keys are inserted by dotted path; without the Secret the plugin config is MG046."""
        plugin = {"name": "limit-count", "config": {"count": 1}, "secretRef": "redis"}
        result = lint(route(rule(plugins=[plugin])), secret("redis", **{"redis_password": "pw"}))
        config = result.config.of("routes")[0].value["plugins"]["limit-count"]
        assert config == {"count": 1, "redis": {"password": "pw"}}
        assert any("Secret demo/redis" in f.message for f in found(lint(route(rule(plugins=[plugin]))), "MG046"))


# -- ApisixTls and Secrets -----------------------------------------------------------------------------


class TestTls:
    def test_secret_absent_is_an_offline_note_not_a_broken_certificate(self, lint: Callable[..., LintResult]) -> None:
        """Without the Secret manifests, cert and client.ca are MG046 notes; the SNI still counts as tolerant."""
        result = lint(route(rule(plugins=[guard()])), tls())
        (ssl,) = result.config.of("ssls")
        assert ssl.label == "ssls/demo/api"
        assert ssl.value["snis"] == [HOST]
        assert ssl.value["cert"] == "$secret://kubernetes/demo/api-tls"
        assert len(found(result, "MG046")) == 2
        assert not {"MG035", "MG040"} & codes(result)
        assert found(lint(route(rule()), tls()), "MG010")  # tolerant SNI, unguarded route

    def test_certificates_in_secret_manifests_are_checked(self, lint: Callable[..., LintResult]) -> None:
        """tls.crt and ca.crt from Secret data are parsed: a leaf given as client CA is MG045, no MG046."""
        leaf = FACTORY.leaf(CLIENT_CA, cn="workload", not_after=LONG)
        server = secret("api-tls", tls_crt=SERVER.pem, tls_key=SERVER.key_pem)
        result = lint(route(rule(plugins=[guard()])), tls(), server, secret("client-ca", ca_crt=leaf.pem))
        assert result.config.of("ssls")[0].value["cert"] == SERVER.pem
        assert "MG046" not in codes(result)
        assert [f.code for f in result.findings if f.severity is Severity.ERROR] == []
        assert found(result, "MG045")

    def test_expired_server_certificate_from_string_data_is_mg041(self, lint: Callable[..., LintResult]) -> None:
        """A Secret's stringData is read too, so an expired server certificate there is MG041."""
        old = FACTORY.leaf(
            CLIENT_CA, cn=HOST, dns=[HOST], not_before=NOW - timedelta(days=9), not_after=NOW - timedelta(days=1)
        )
        server = {"apiVersion": "v1", "kind": "Secret", "metadata": meta("api-tls", "demo")}
        server["stringData"] = {"cert": old.pem, "key": old.key_pem}
        result = lint(route(rule(plugins=[guard()])), tls(), server, secret("client-ca", cert=CLIENT_CA.pem))
        assert [f.obj for f in found(result, "MG041")] == ["ssls/demo/api"]

    def test_secret_without_certificate_keys_is_mg035(self, write: Callable[..., str]) -> None:
        """A server Secret without cert/tls.crt (or without its private key) is MG035 pointing at the Secret."""
        path = write(tls(), secret("api-tls", tls_crt=SERVER.pem), secret("client-ca", other="x"))
        messages = {f.message.split(";")[0] for f in found(lint_files([path], now=NOW), "MG035")}
        assert messages == {
            "Secret demo/api-tls has no cert + key or tls.crt + tls.key",
            "Secret demo/client-ca has no cert or tls.crt or ca.crt",
        }

    def test_secret_data_that_is_not_base64_is_mg004(self, lint: Callable[..., LintResult]) -> None:
        """Secret data that does not decode is MG004 (Kubernetes rejects it); the certificate is left unchecked."""
        broken = secret("api-tls")
        broken["data"] = {"tls.crt": "not base64!", "tls.key": "eA=="}
        result = lint(tls(), broken)
        assert any("not base64-encoded" in f.message for f in found(result, "MG004"))
        assert "MG040" not in codes(result)

    def test_client_settings_are_mapped_like_the_controller(self, lint: Callable[..., LintResult]) -> None:
        """An omitted depth is sent as 0, and skip regexes reach the regex checks (MG030 for an unanchored one)."""
        result = lint(tls(depth=None, skip=["/health"]))
        client = result.config.of("ssls")[0].value["client"]
        assert client["depth"] == 0
        assert client["skip_mtls_uri_regex"] == ["/health"]
        assert found(result, "MG030")


# -- other kinds and layouts ---------------------------------------------------------------------------


class TestOtherKinds:
    def test_other_kubernetes_kinds_in_a_layout_are_skipped_silently(self, write: Callable[..., str]) -> None:
        """Deployment, Service, ConfigMap, Namespace, Secret and ApisixUpstream in a layout are not reported."""
        others = write(
            k8s("Namespace", "demo"),
            k8s("Deployment", "web", "apps/v1"),
            k8s("Service", "web"),
            k8s("ConfigMap", "conf"),
            secret("unused"),
            k8s("ApisixUpstream", "web", "apisix.apache.org/v2"),
            name="others.yaml",
        )
        result = lint_files([write(route(rule(plugins=[guard()])), name="route.yaml"), others], now=NOW)
        assert not {"MG002", "MG003"} & codes(result)
        assert [(f.shape, f.resources) for f in result.config.files] == [("kubernetes", 1), ("kubernetes", 0)]

    def test_kinds_the_linter_does_not_read_are_mg002(self, lint: Callable[..., LintResult]) -> None:
        """Ingress, Gateway API routes and other apisix.apache.org versions are reported as not checked."""
        old = route()
        old["apiVersion"] = "apisix.apache.org/v2beta3"
        result = lint(
            route(rule(plugins=[guard()])),
            old,
            k8s("Ingress", "web", "networking.k8s.io/v1"),
            k8s("HTTPRoute", "web", "gateway.networking.k8s.io/v1"),
        )
        assert len(found(result, "MG002")) == 3
        assert len(result.config.of("routes")) == 1

    def test_a_layout_of_only_unread_kinds_is_mg003(self, lint: Callable[..., LintResult]) -> None:
        """Manifests that yield no APISIX resource at all are MG003: nothing was checked."""
        old = route()
        old["apiVersion"] = "apisix.apache.org/v2beta3"
        result = lint(old, k8s("Service", "web"))
        assert found(result, "MG003")
        assert result.exit_code == 1

    def test_lone_configmap_without_crds_stays_unrecognised(self, write: Callable[..., str]) -> None:
        """Without any apisix.apache.org object, a Kubernetes manifest is the wrong file (MG003), as before."""
        result = lint_files([write(k8s("ConfigMap", "conf"), k8s("Service", "web"))], now=NOW)
        (finding,) = found(result, "MG003")
        assert "Kubernetes ConfigMap, Service" in finding.message

    def test_kubectl_list_json_is_flattened(self, write: Callable[..., str]) -> None:
        """`kubectl get -o json` output (kind: List with items) is read like separate manifests."""
        listing = {"apiVersion": "v1", "kind": "List", "items": [route(rule(plugins=[guard()])), tls()]}
        result = lint_files([write(listing, name="cluster.json")], now=NOW)
        assert [r.label for r in result.config.of("routes")] == ["routes/demo/api/main"]
        assert result.config.of("ssls")[0].line is None
        assert result.config.files[0].shape == "kubernetes"

    def test_manifests_merge_with_a_standalone_file(self, write: Callable[..., str], tmp_path: Path) -> None:
        """A standalone apisix.yaml global rule and Kubernetes routes are checked as one configuration."""
        standalone = tmp_path / "apisix.yaml"
        rules = {"global_rules": [{"id": "g", "plugins": {"ext-plugin-pre-req": guard()["config"]}}]}
        standalone.write_text(yaml.safe_dump(rules) + "#END\n", encoding="utf-8")
        result = lint_files([str(standalone), write(route(), tls())], now=NOW)
        assert "MG010" not in codes(result)
        assert [f.shape for f in result.config.files] == ["standalone", "kubernetes"]

    def test_namespace_less_manifests_match_by_name(self, lint: Callable[..., LintResult]) -> None:
        """Manifests without metadata.namespace (applied with kubectl -n) still find their plugin config."""
        pc = crd("ApisixPluginConfig", "guarded", {"plugins": [guard()]}, namespace=None)
        result = lint(route(rule(plugin_config_name="guarded"), namespace=None), pc)
        assert result.config.of("routes")[0].value["plugin_config_id"] == "guarded"
        assert result.config.of("routes")[0].label == "routes/api/main"

    def test_broken_later_document_names_its_line(self, tmp_path: Path) -> None:
        """A YAML error in the second document is an InputError with that document's line."""
        path = tmp_path / "layout.yaml"
        path.write_text(yaml.safe_dump(route()) + "---\nkind: [\n", encoding="utf-8")
        with pytest.raises(InputError, match=r"invalid YAML at line \d+"):
            lint_files([str(path)], now=NOW)
