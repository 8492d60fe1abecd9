"""Deployment files: compose, Dockerfile, APISIX/runner configs, standalone YAML, Kubernetes, Helm, scripts.

No container engine runs here, so these tests check what can be checked without one: every file
parses, every path one file names exists where another file puts it, every mtls-guard attachment is
fail-closed and compiles, and the demo PKI script really produces the certificates the demo needs.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, NamedTuple

import pytest
import yaml

from plugins.mtls_guard.library import PolicyLibrary
from plugins.mtls_guard.plugin import MtlsGuard
from plugins.mtls_guard.policy import compile_policy
from plugins.mtls_guard.schema import parse_policy
from runner.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
CONF = ROOT / "conf"
K8S = DEPLOY / "kubernetes"
HELM = DEPLOY / "helm"
STANDALONE = DEPLOY / "standalone"
GEN_CERTS = DEPLOY / "gen-certs.sh"
ADMIN_API = DEPLOY / "admin-api.sh"

COMPOSE_FILES = (
    ROOT / "docker-compose.yml",
    ROOT / "docker-compose.sidecar.yml",
    STANDALONE / "docker-compose.yml",
)
APISIX_CONFIGS = (CONF / "config.yaml", CONF / "config.sidecar.yaml", STANDALONE / "config.yaml")
HELM_VALUES = (HELM / "values-mtls-guard.yaml", HELM / "values-mtls-guard-sidecar.yaml")
APISIX_CONF_DIR = "/usr/local/apisix/conf"
RUNNER_CONFIG = f"{APISIX_CONF_DIR}/mtls-guard.yaml"
CATCH_ALL = ["^/.*"]
APISIX_TAG = re.compile(r"3\.(\d+)\.\d+-debian")

ADMIN_KEY_PLACEHOLDER = "demo-admin-key-CHANGE-ME"


def load(path: Path) -> Any:
    return yaml.safe_load(path.read_text(encoding="utf-8"))


def load_all(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def dockerfile_venv() -> str:
    match = re.search(r"python3 -m venv (\S+)", (ROOT / "Dockerfile").read_text(encoding="utf-8"))
    assert match, "the Dockerfile must create the runner's virtualenv with python3 -m venv"
    return match.group(1)


def dockerfile_default_tag() -> str:
    match = re.search(r"^ARG APISIX_TAG=(\S+)$", (ROOT / "Dockerfile").read_text(encoding="utf-8"), re.M)
    assert match, "the Dockerfile must pin the APISIX tag in ARG APISIX_TAG=<tag>"
    return match.group(1)


def service_volumes(compose: Path, service: str) -> list[tuple[str, str, bool]]:
    """(source, target, read_only) of a service's short-syntax volumes."""
    out = []
    for spec in load(compose)["services"][service].get("volumes", []):
        parts = spec.split(":")
        out.append((parts[0], parts[1], len(parts) > 2 and "ro" in parts[2].split(",")))
    return out


def bind_mounts(compose: Path) -> Iterator[tuple[str, Path, str, bool]]:
    """(service, host path, container path, read_only) for every bind mount of a compose file."""
    for name in load(compose)["services"]:
        for source, target, read_only in service_volumes(compose, name):
            if source.startswith((".", "/")):
                yield name, (compose.parent / source).resolve(), target, read_only


def mount_source(compose: Path, service: str, target: str) -> Path:
    for name, host, container, _ in bind_mounts(compose):
        if name == service and container == target:
            return host
    raise AssertionError(f"{compose.name}: {service} mounts nothing at {target}")


def runner_policy_file() -> str:
    """Where the runner reads its policy library in the containers: a relative policy_file is
    relative to the runner config's directory (runner.settings)."""
    policy_file = load(CONF / "mtls-guard.yaml")["plugins"]["mtls-guard"]["policy_file"]
    return os.path.join(os.path.dirname(RUNNER_CONFIG), policy_file)


def metrics_port(argv: list[str]) -> int:
    """The port the runner's /metrics, /healthz, /readyz listen on: --metrics-addr beats the config file."""
    address = argv[argv.index("--metrics-addr") + 1] if "--metrics-addr" in argv else None
    address = address or load(CONF / "mtls-guard.yaml")["metrics_addr"]
    return int(address.rpartition(":")[2])


def gen_certs_outputs() -> set[str]:
    """File names deploy/gen-certs.sh writes into its output directory."""
    text = GEN_CERTS.read_text(encoding="utf-8")
    block = re.search(r"CERT_FILES=\((.*?)\)", text, re.S)
    assert block, "gen-certs.sh must list its files in CERT_FILES=(...)"
    return set(block.group(1).split()) | {"apisix.yaml"}


def policy_library() -> Any:
    return PolicyLibrary.from_yaml_file(CONF / "policies.yaml")


# -- collecting every mtls-guard attachment ------------------------------------------------------------


def _plugin_objects(node: Any) -> Iterator[dict[str, Any]]:
    """Every ext-plugin-pre-req config in a document: APISIX's map form and the CRDs' list form."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "ext-plugin-pre-req" and isinstance(value, dict):
                yield value
            else:
                yield from _plugin_objects(value)
        if node.get("name") == "ext-plugin-pre-req" and isinstance(node.get("config"), dict):
            yield node["config"]
    elif isinstance(node, list):
        for item in node:
            yield from _plugin_objects(item)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh run of deploy/gen-certs.sh (it also renders the standalone apisix.yaml)."""
    assert shutil.which("openssl"), "openssl is needed to test deploy/gen-certs.sh"
    out = tmp_path_factory.mktemp("certs")
    subprocess.run(["bash", str(GEN_CERTS), "--out", str(out)], check=True, capture_output=True)
    return out


def admin_api(function: str, certs: Path) -> str:
    """Call one function of deploy/admin-api.sh (sourcing it does not touch the Admin API)."""
    result = subprocess.run(
        ["bash", "-c", f'source "$1" && {function}', "bash", str(ADMIN_API)],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, "CERTS_DIR": str(certs)},
    )
    return result.stdout


ADMIN_BODIES = ("ssl_body", "upstream_body", "global_rule_body", "billing_route_body", "report_route_body")


@pytest.fixture(scope="module")
def admin_bodies(certs: Path) -> dict[str, Any]:
    return {name: json.loads(admin_api(name, certs)) for name in ADMIN_BODIES}


@pytest.fixture(scope="module")
def attachments(admin_bodies: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, ext-plugin-pre-req config) for every attachment in every deployment path."""
    found: list[tuple[str, dict[str, Any]]] = []
    documents: list[tuple[str, Any]] = [("deploy/standalone/apisix.yaml", load(STANDALONE / "apisix.yaml"))]
    documents += [(f"deploy/kubernetes/{p.name}", doc) for p in sorted(K8S.glob("*.yaml")) for doc in load_all(p)]
    documents += [(f"admin-api.sh {name}", body) for name, body in admin_bodies.items()]
    for where, document in documents:
        found += [(where, conf) for conf in _plugin_objects(document)]
    return found


# -- tests ---------------------------------------------------------------------------------------------


class TestCompose:
    @pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
    def test_parses_with_services(self, compose: Path) -> None:
        """Each compose file is YAML with an apisix service and networks every service joins."""
        data = load(compose)
        assert "apisix" in data["services"]
        for name, service in data["services"].items():
            assert service.get("networks"), f"{name} joins no network"

    @pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
    def test_bind_mounts_exist_or_are_generated(self, compose: Path) -> None:
        """Every bind-mounted host path is in the repo, or is a file deploy/gen-certs.sh creates."""
        certs_dir = (DEPLOY / "certs").resolve()
        for service, host, _, _ in bind_mounts(compose):
            if host.is_relative_to(certs_dir):
                assert host.name in gen_certs_outputs(), f"{service}: gen-certs.sh does not create {host}"
            else:
                assert host.exists(), f"{compose.name}: {service} mounts missing {host}"

    @pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
    def test_bind_mounts_are_read_only(self, compose: Path) -> None:
        """Configuration is mounted read-only: nothing in a container can rewrite the repo's files."""
        for service, host, _, read_only in bind_mounts(compose):
            assert read_only, f"{compose.name}: {service} mounts {host} read-write"

    def test_published_ports(self) -> None:
        """The main stack publishes HTTP 9080, HTTPS 9443 and the Admin API 9180, and not etcd."""
        services = load(ROOT / "docker-compose.yml")["services"]
        published = {p.split(":")[0] for p in services["apisix"]["ports"]}
        assert published == {"9080", "9443", "9180"}
        assert "ports" not in services["etcd"]

    @pytest.mark.parametrize("compose", COMPOSE_FILES[:2], ids=lambda p: p.name)
    def test_etcd_service(self, compose: Path) -> None:
        """etcd follows the apisix-docker example: bitnamilegacy/etcd 3.5.11, no auth, a named volume."""
        etcd = load(compose)["services"]["etcd"]
        assert etcd["image"] == "bitnamilegacy/etcd:3.5.11"
        assert etcd["environment"]["ALLOW_NONE_AUTHENTICATION"] == "yes"
        assert etcd["environment"]["ETCD_ADVERTISE_CLIENT_URLS"] == "http://etcd:2379"
        assert any(v.startswith("etcd_data:") for v in etcd["volumes"])

    @pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
    def test_runner_files_are_mounted(self, compose: Path) -> None:
        """The runner's settings and policy library are mounted where ext-plugin.cmd and policy_file point."""
        services = load(compose)["services"]
        runner_service = "mtls-guard" if "mtls-guard" in services else "apisix"
        assert mount_source(compose, runner_service, RUNNER_CONFIG) == CONF / "mtls-guard.yaml"
        assert mount_source(compose, runner_service, runner_policy_file()) == CONF / "policies.yaml"

    @pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
    def test_apisix_config_mount(self, compose: Path) -> None:
        """APISIX's config.yaml comes from one of the checked APISIX configs."""
        assert mount_source(compose, "apisix", f"{APISIX_CONF_DIR}/config.yaml") in APISIX_CONFIGS

    def test_admin_key_default_matches_config(self) -> None:
        """The compose default admin key is the one conf/config.yaml falls back to and admin-api.sh uses."""
        services = load(ROOT / "docker-compose.yml")["services"]
        assert ADMIN_KEY_PLACEHOLDER in services["apisix"]["environment"]["APISIX_ADMIN_KEY"]
        key = load(CONF / "config.yaml")["deployment"]["admin"]["admin_key"][0]["key"]
        assert key == "${{APISIX_ADMIN_KEY:=" + ADMIN_KEY_PLACEHOLDER + "}}"
        assert f"APISIX_ADMIN_KEY:-{ADMIN_KEY_PLACEHOLDER}" in ADMIN_API.read_text(encoding="utf-8")


class TestSidecarCompose:
    def test_runner_listens_where_apisix_connects(self) -> None:
        """The runner's --listen path is the path_for_test of the config mounted into APISIX."""
        compose = ROOT / "docker-compose.sidecar.yml"
        runner = load(compose)["services"]["mtls-guard"]
        argv = runner["entrypoint"]
        config = load(mount_source(compose, "apisix", f"{APISIX_CONF_DIR}/config.yaml"))
        assert "cmd" not in config["ext-plugin"]
        assert argv[argv.index("--listen") + 1] == config["ext-plugin"]["path_for_test"]
        assert argv[:2] == [f"{dockerfile_venv()}/bin/mtls-guard", "run"]
        assert argv[argv.index("--config") + 1] == RUNNER_CONFIG

    def test_socket_volume_is_shared_and_owned_by_apisix_uid(self) -> None:
        """Both containers mount the socket directory, a tmpfs owned by uid/gid 636."""
        compose = ROOT / "docker-compose.sidecar.yml"
        data = load(compose)
        socket_dir = os.path.dirname(load(CONF / "config.sidecar.yaml")["ext-plugin"]["path_for_test"])
        for service in ("apisix", "mtls-guard"):
            assert ("mtls-guard-socket", socket_dir, False) in service_volumes(compose, service)
        options = data["volumes"]["mtls-guard-socket"]["driver_opts"]
        assert options["type"] == "tmpfs"
        assert "uid=636" in options["o"]
        assert "gid=636" in options["o"]
        assert data["services"]["mtls-guard"]["user"] == "636:636"

    def test_supervision_replaces_apisix(self) -> None:
        """The runner restarts by itself, stops on SIGTERM, and APISIX waits for its healthcheck."""
        services = load(ROOT / "docker-compose.sidecar.yml")["services"]
        runner = services["mtls-guard"]
        assert runner["restart"] == "unless-stopped"
        assert runner["stop_signal"] == "SIGTERM"
        assert services["apisix"]["depends_on"]["mtls-guard"]["condition"] == "service_healthy"

    def test_healthcheck_asks_readyz_on_the_metrics_port(self) -> None:
        """The healthcheck GETs /readyz on the port the runner's --metrics-addr opens, bound beyond loopback."""
        runner = load(ROOT / "docker-compose.sidecar.yml")["services"]["mtls-guard"]
        argv = runner["entrypoint"]
        assert argv[argv.index("--metrics-addr") + 1].startswith("0.0.0.0:")
        check = " ".join(runner["healthcheck"]["test"])
        assert f"http://127.0.0.1:{metrics_port(argv)}/readyz" in check
        assert runner["healthcheck"]["test"][1] == f"{dockerfile_venv()}/bin/python"


class TestDockerfile:
    def test_base_image_is_pinned_bookworm_debian_3x(self) -> None:
        """The default base is apache/apisix:3.x-debian from a bookworm release (apt python3 >= 3.11)."""
        text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
        assert "ARG APISIX_IMAGE=apache/apisix" in text
        assert "FROM ${APISIX_IMAGE}:${APISIX_TAG}" in text
        match = APISIX_TAG.fullmatch(dockerfile_default_tag())
        assert match, dockerfile_default_tag()
        # The -debian images switched from bullseye (python3 3.9) to bookworm after 3.16.0.
        assert int(match.group(1)) >= 17

    def test_user_switches(self) -> None:
        """Root only for the install steps; the image ends as the unprivileged apisix user again."""
        users = re.findall(r"^USER (\S+)$", (ROOT / "Dockerfile").read_text(encoding="utf-8"), re.M)
        assert users == ["root", "apisix"]

    def test_installs_python_venv_and_cleans_apt_lists(self) -> None:
        """apt installs python3 and python3-venv without recommends and removes its package lists."""
        text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
        assert re.search(r"apt-get install -y --no-install-recommends python3 python3-venv", text)
        assert "rm -rf /var/lib/apt/lists/*" in text
        assert f"{dockerfile_venv()}/bin/pip install" in text

    def test_copies_exactly_what_the_wheel_needs(self) -> None:
        """Only pyproject.toml, the readme and the wheel's packages are copied, and all of them exist."""
        text = (ROOT / "Dockerfile").read_text(encoding="utf-8")
        sources: list[str] = []
        for line in re.findall(r"^COPY (.+)$", text, re.M):
            sources += line.split()[:-1]
        pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
        packages = re.search(r"packages = \[(.*?)\]", pyproject)
        readme = re.search(r'^readme = "(.+)"$', pyproject, re.M)
        assert packages
        assert readme
        expected = {"pyproject.toml", readme.group(1)} | {f"{p}/" for p in re.findall(r'"(\w+)"', packages.group(1))}
        assert set(sources) == expected
        for source in sources:
            assert (ROOT / source).exists(), source

    def test_dockerignore_keeps_secrets_out(self) -> None:
        """The build context is an allow-list: certificates, the venv and tests never reach the daemon."""
        lines = [
            line
            for line in (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
            if line and line[0] != "#"
        ]
        assert lines[0] == "*"
        allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
        assert allowed == {"pyproject.toml", "README.md", "runner", "plugins"}


class TestApisixConfigs:
    @pytest.mark.parametrize("path", APISIX_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
    def test_runner_command_uses_the_image_venv(self, path: Path) -> None:
        """ext-plugin.cmd calls the console script in the Dockerfile's venv with the mounted settings."""
        ext = load(path)["ext-plugin"]
        if "path_for_test" in ext:
            assert "cmd" not in ext, "cmd and path_for_test are exclusive"
            assert not ext["path_for_test"].startswith("unix:"), "path_for_test takes a bare path"
            return
        assert ext["cmd"] == [f"{dockerfile_venv()}/bin/mtls-guard", "run", "--config", RUNNER_CONFIG]

    @pytest.mark.parametrize("path", APISIX_CONFIGS, ids=lambda p: str(p.relative_to(ROOT)))
    def test_plugins_and_https(self, path: Path) -> None:
        """The plugin list keeps ext-plugin-pre-req and HTTPS listens on 9443."""
        config = load(path)
        assert "ext-plugin-pre-req" in config["plugins"]
        assert config["apisix"]["ssl"]["enable"] is True
        assert config["apisix"]["ssl"]["listen"] == [{"port": 9443}]

    def test_sidecar_config_differs_only_in_ext_plugin(self) -> None:
        """config.sidecar.yaml is config.yaml with path_for_test instead of cmd, nothing else."""
        main, sidecar = load(CONF / "config.yaml"), load(CONF / "config.sidecar.yaml")
        main.pop("ext-plugin")
        sidecar.pop("ext-plugin")
        assert main == sidecar

    def test_standalone_config_is_data_plane_yaml(self) -> None:
        """The standalone config reads routes from apisix.yaml and has no etcd or Admin API section."""
        deployment = load(STANDALONE / "config.yaml")["deployment"]
        assert deployment["role"] == "data_plane"
        assert deployment["role_data_plane"] == {"config_provider": "yaml"}
        assert "etcd" not in deployment
        assert "admin" not in deployment

    def test_runner_settings_load(self, tmp_path: Path) -> None:
        """conf/mtls-guard.yaml passes the runner's settings validation as APISIX would start it, policy_file too."""
        settings = load_settings(
            environ={"APISIX_LISTEN_ADDRESS": f"unix:{tmp_path}/r.sock", "APISIX_CONF_EXPIRE_TIME": "3600"},
            config_file=str(CONF / "mtls-guard.yaml"),
        )
        assert settings.listen == f"{tmp_path}/r.sock"
        assert set(settings.plugins) == {"mtls-guard"}
        # Relative to the config file, wherever the runner starts: here the checkout's conf/.
        assert settings.plugins["mtls-guard"]["policy_file"] == str(CONF / "policies.yaml")

    def test_runner_plugin_setup_accepts_options(self) -> None:
        """The mtls-guard plugin accepts its options, with policy_file mapped to the mounted repo file."""
        options = dict(load(CONF / "mtls-guard.yaml")["plugins"]["mtls-guard"])
        options["policy_file"] = str(CONF / "policies.yaml")
        plugin = MtlsGuard()
        plugin.setup(options)
        assert plugin.library is not None
        assert {"gateway-baseline", "billing-only"} <= set(plugin.library.names())


class TestImageTags:
    def compose_tags(self) -> dict[str, str]:
        tags = {}
        for compose in COMPOSE_FILES:
            for name, service in load(compose)["services"].items():
                if "build" in service:
                    default = re.fullmatch(r"\$\{APISIX_TAG:-(.+)\}", service["build"]["args"]["APISIX_TAG"])
                    assert default, f"{compose.name}: {name} must pass APISIX_TAG with a default"
                    tags[f"{compose.name}:{name}"] = default.group(1)
        return tags

    def test_compose_builds_use_the_dockerfile_tag(self) -> None:
        """Every compose build passes the Dockerfile's default APISIX tag."""
        tags = self.compose_tags()
        assert tags
        assert set(tags.values()) == {dockerfile_default_tag()}

    @pytest.mark.parametrize("path", HELM_VALUES, ids=lambda p: p.name)
    def test_helm_image_tag_names_the_same_base(self, path: Path) -> None:
        """Our image's tag in the Helm values says which APISIX tag it was built on."""
        tag = load(path)["image"]["tag"]
        assert tag.endswith(f"-apisix-{dockerfile_default_tag()}")

    @pytest.mark.parametrize("compose", COMPOSE_FILES, ids=lambda p: str(p.relative_to(ROOT)))
    def test_compose_apisix_image_is_ours(self, compose: Path) -> None:
        """The apisix service runs the image built from our Dockerfile, never a stock APISIX image."""
        service = load(compose)["services"]["apisix"]
        assert service["image"] == "apisix-mtls-guard:dev"
        assert (compose.parent / service["build"]["context"]).resolve() == ROOT


class TestStandalone:
    def test_template_ends_with_end_marker(self) -> None:
        """APISIX ignores apisix.yaml unless its last line is #END."""
        assert (STANDALONE / "apisix.yaml").read_text(encoding="utf-8").endswith("\n#END\n")

    def test_ssl_object_requests_and_tolerates_certificates(self) -> None:
        """The SSL object has a client CA, an explicit depth and the catch-all skip regex."""
        (ssl,) = load(STANDALONE / "apisix.yaml")["ssls"]
        assert ssl["snis"] == ["api.example.test"]
        assert ssl["client"]["skip_mtls_uri_regex"] == CATCH_ALL
        assert ssl["client"]["depth"] >= 1
        assert ssl["client"]["ca"].strip() == "<<ca.crt>>"

    def test_references_resolve(self) -> None:
        """Routes point at plugin configs and upstreams defined in the same file, and a global rule exists."""
        data = load(STANDALONE / "apisix.yaml")
        plugin_configs = {p["id"] for p in data["plugin_configs"]}
        upstreams = {u["id"] for u in data["upstreams"]}
        for route in data["routes"]:
            assert route["upstream_id"] in upstreams
            assert route.get("plugin_config_id", next(iter(plugin_configs))) in plugin_configs
            assert "plugin_config_id" in route or "ext-plugin-pre-req" in route["plugins"]
        assert any("ext-plugin-pre-req" in rule["plugins"] for rule in data["global_rules"])

    def test_placeholders_are_generated_files(self) -> None:
        """Every <<file>> placeholder names a file deploy/gen-certs.sh writes."""
        names = re.findall(r"^\s*<<([\w.-]+)>>\s*$", (STANDALONE / "apisix.yaml").read_text(encoding="utf-8"), re.M)
        assert set(names) == {"server.crt", "server.key", "ca.crt"}
        assert set(names) <= gen_certs_outputs()

    def test_rendered_copy(self, certs: Path) -> None:
        """gen-certs.sh renders a valid apisix.yaml with the generated PEMs, still ending with #END."""
        text = (certs / "apisix.yaml").read_text(encoding="utf-8")
        assert text.endswith("\n#END\n")
        assert not re.search(r"^\s*<<[\w.-]+>>\s*$", text, re.M)
        assert text.startswith("# Rendered by deploy/gen-certs.sh")
        (ssl,) = yaml.safe_load(text)["ssls"]
        assert ssl["cert"] == (certs / "server.crt").read_text(encoding="utf-8")
        assert ssl["key"] == (certs / "server.key").read_text(encoding="utf-8")
        assert ssl["client"]["ca"] == (certs / "ca.crt").read_text(encoding="utf-8")


class TestLint:
    def test_rendered_standalone_has_no_lint_errors(self, certs: Path) -> None:
        """`mtls-guard lint` finds no fail-open or broken configuration in the rendered standalone file."""
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "runner",
                "lint",
                "--policy-file",
                str(CONF / "policies.yaml"),
                str(certs / "apisix.yaml"),
            ],
            capture_output=True,
            text=True,
            check=False,
            cwd=ROOT,
        )
        assert result.returncode == 0, result.stdout + result.stderr


class TestExtPluginAttachments:
    def test_every_path_attaches_mtls_guard(self, attachments: list[tuple[str, dict[str, Any]]]) -> None:
        """Standalone YAML, every Kubernetes manifest kind that can, and the Admin API script attach it."""
        where = {w for w, _ in attachments}
        assert "deploy/standalone/apisix.yaml" in where
        for name in ("apisixroute.yaml", "apisixpluginconfig.yaml", "apisixglobalrule.yaml"):
            assert f"deploy/kubernetes/{name}" in where
        for name in ("global_rule_body", "billing_route_body", "report_route_body"):
            assert f"admin-api.sh {name}" in where

    def test_fail_closed(self, attachments: list[tuple[str, dict[str, Any]]]) -> None:
        """No attachment lets requests through when the runner is unavailable (allow_degradation false)."""
        for where, conf in attachments:
            assert conf.get("allow_degradation", False) is False, where

    def test_conf_entry_is_mtls_guard_with_json_value(self, attachments: list[tuple[str, dict[str, Any]]]) -> None:
        """Each attachment has exactly one conf entry named mtls-guard whose value is a JSON object string."""
        for where, conf in attachments:
            entries = [entry for entry in conf["conf"] if entry["name"] == "mtls-guard"]
            assert len(entries) == 1, where
            assert isinstance(entries[0]["value"], str), where
            assert isinstance(json.loads(entries[0]["value"]), dict), where

    def test_policies_compile(self, attachments: list[tuple[str, dict[str, Any]]]) -> None:
        """Every route policy compiles with the runner's policy compiler and the shipped policy library."""
        library = policy_library()
        for where, conf in attachments:
            for entry in conf["conf"]:
                assert compile_policy(entry["value"], library) is not None, where

    def test_global_rule_in_every_path(self, admin_bodies: dict[str, Any]) -> None:
        """Every deployment path installs mtls-guard as a global rule, the safe default."""
        assert load(STANDALONE / "apisix.yaml")["global_rules"]
        assert [d for d in load_all(K8S / "apisixglobalrule.yaml") if d["kind"] == "ApisixGlobalRule"]
        assert "ext-plugin-pre-req" in admin_bodies["global_rule_body"]["plugins"]

    def test_route_exemptions_are_also_global_exemptions(self, attachments: list[tuple[str, dict[str, Any]]]) -> None:
        """The global rule runs before every route, so a route exemption only works if the global rule grants it."""
        library = policy_library()

        def exemptions(value: str) -> set[tuple[Any, ...]]:
            data = json.loads(value)
            if "policy" in data:
                data, _ = library.resolve(data)
            config = parse_policy(data)
            return {(r.path, r.methods, r.hosts) for r in config.exempt}

        baseline = exemptions('{"policy": "gateway-baseline"}')
        for where, conf in attachments:
            for entry in conf["conf"]:
                assert exemptions(entry["value"]) <= baseline, where


class DemoCheck(NamedTuple):
    """One curl check of deploy/admin-api.sh: what is sent, and the status the script expects."""

    status: int
    description: str
    path: str = "/api/invoices"
    method: str = "GET"
    route: str = "billing_route_body"
    scheme: str = "https"
    cert: str | None = None
    verify: str | None = None  # nginx's $ssl_client_verify when it is not SUCCESS


DEMO_CHECKS = (
    DemoCheck(200, "GET /healthz without a certificate", "/healthz"),
    DemoCheck(200, "OPTIONS /api/invoices (CORS preflight), no certificate", method="OPTIONS"),
    DemoCheck(403, "GET /api/invoices without a certificate"),
    DemoCheck(200, "GET /api/invoices, valid billing certificate", cert="client"),
    DemoCheck(403, "GET /api/invoices, valid chain, wrong identity (frontend)", cert="client-wrong-identity"),
    DemoCheck(
        403, "GET /api/invoices, expired certificate", cert="client-expired", verify="FAILED:certificate has expired"
    ),
    DemoCheck(
        403,
        "GET /api/invoices, certificate from an untrusted CA",
        cert="client-untrusted",
        verify="FAILED:unable to get local issuer certificate",
    ),
    DemoCheck(
        200,
        "GET /report/x, wrong identity (logged: verdict=deny allowed=yes)",
        "/report/x",
        route="report_route_body",
        cert="client-wrong-identity",
    ),
    DemoCheck(403, "GET /report/x without a certificate (global rule)", "/report/x", route="report_route_body"),
    DemoCheck(200, "GET http /healthz", "/healthz", scheme="http"),
    DemoCheck(403, "GET http /api/invoices", scheme="http"),
)


class TestDemoExpectations:
    """admin-api.sh's expected statuses, recomputed with `mtls-guard explain` (global rule first, then route)."""

    def decide(self, policy: str, check: DemoCheck, certs: Path) -> dict[str, Any]:
        argv = [sys.executable, "-m", "runner", "explain", "--json", "--policy", policy]
        argv += ["--policy-file", str(CONF / "policies.yaml"), "--host", "api.example.test"]
        argv += ["--method", check.method, "--target", check.path, "--scheme", check.scheme]
        if check.method == "OPTIONS":  # the script sends a real preflight
            argv += ["--header", "Origin: https://app.example.test", "--header", "Access-Control-Request-Method: POST"]
        argv += ["--cert", str(certs / f"{check.cert}.crt")] if check.cert else ["--no-cert"]
        argv += ["--verify", check.verify] if check.verify else []
        result = subprocess.run(argv, capture_output=True, text=True, check=False, cwd=ROOT)
        assert result.returncode in (0, 1), result.stderr
        outcome: dict[str, Any] = json.loads(result.stdout)
        return outcome

    def test_script_lists_the_same_checks(self) -> None:
        """Every check here appears in admin-api.sh with the same expected status, in order, and no other."""
        script = ADMIN_API.read_text(encoding="utf-8")
        found = re.findall(r'^\s*check (\d{3}) "([^"]+)"', script, re.M)
        assert [(int(status), text) for status, text in found] == [(c.status, c.description) for c in DEMO_CHECKS]

    @pytest.mark.parametrize("check", DEMO_CHECKS, ids=lambda c: c.description)
    def test_expected_status(self, check: DemoCheck, certs: Path, admin_bodies: dict[str, Any]) -> None:
        """The runner's decisions for the global rule and then the route give the status the demo expects."""
        policies = [
            admin_bodies[body]["plugins"]["ext-plugin-pre-req"]["conf"][0]["value"]
            for body in ("global_rule_body", check.route)
        ]
        status = 200
        for policy in policies:
            outcome = self.decide(policy, check, certs)
            if not outcome["allowed"]:
                status = outcome["status"]
                break
        assert status == check.status


class TestKubernetes:
    EXPECTED: ClassVar[dict[str, str]] = {
        "ApisixTls": "apisix.apache.org/v2",
        "ApisixRoute": "apisix.apache.org/v2",
        "ApisixPluginConfig": "apisix.apache.org/v2",
        "ApisixGlobalRule": "apisix.apache.org/v2",
        "Namespace": "v1",
        "Deployment": "apps/v1",
        "Service": "v1",
    }

    def documents(self) -> list[dict[str, Any]]:
        return [doc for path in sorted(K8S.glob("*.yaml")) for doc in load_all(path)]

    def test_kinds_and_api_versions(self) -> None:
        """Every manifest parses (multi-document YAML) and uses the expected apiVersion for its kind."""
        docs = self.documents()
        assert {d["kind"] for d in docs} == set(self.EXPECTED)
        for doc in docs:
            assert doc["apiVersion"] == self.EXPECTED[doc["kind"]], doc["metadata"]["name"]

    def test_apisix_resources_name_the_ingress_class(self) -> None:
        """The controller only picks up resources of its ingress class."""
        for doc in self.documents():
            if doc["apiVersion"].startswith("apisix.apache.org/"):
                assert doc["spec"]["ingressClassName"] == "apisix", doc["metadata"]["name"]

    def test_apisixtls(self) -> None:
        """ApisixTls: SNI, server secret, client CA secret, explicit depth and the catch-all skip regex."""
        (tls,) = [d for d in self.documents() if d["kind"] == "ApisixTls"]
        spec = tls["spec"]
        assert spec["hosts"] == ["api.example.test"]
        assert spec["secret"]["namespace"]
        assert spec["client"]["caSecret"]["namespace"]
        # The controller sends an omitted depth as 0 instead of APISIX's default 1.
        assert spec["client"]["depth"] >= 1
        assert spec["client"]["skip_mtls_uri_regex"] == CATCH_ALL

    def test_references_resolve(self) -> None:
        """Routes use a plugin config and Services that exist, in their own namespace."""
        docs = self.documents()
        named = {(d["kind"], d["metadata"].get("namespace"), d["metadata"]["name"]) for d in docs}
        for route in (d for d in docs if d["kind"] == "ApisixRoute"):
            namespace = route["metadata"]["namespace"]
            for rule in route["spec"]["http"]:
                if "plugin_config_name" in rule:
                    assert ("ApisixPluginConfig", namespace, rule["plugin_config_name"]) in named
                for backend in rule["backends"]:
                    assert ("Service", namespace, backend["serviceName"]) in named
        assert any("plugin_config_name" in r for d in docs if d["kind"] == "ApisixRoute" for r in d["spec"]["http"])
        assert any("plugins" in r for d in docs if d["kind"] == "ApisixRoute" for r in d["spec"]["http"])

    def test_bootstrap_creates_referenced_secrets_and_configmaps(self) -> None:
        """Every Secret and ConfigMap the manifests and Helm values mention is created by bootstrap.sh."""
        script = (K8S / "bootstrap.sh").read_text(encoding="utf-8")
        (tls,) = [d for d in self.documents() if d["kind"] == "ApisixTls"]
        names = {tls["spec"]["secret"]["name"], tls["spec"]["client"]["caSecret"]["name"]}
        for doc in self.documents():
            if doc["kind"] == "Deployment":
                names |= {v["configMap"]["name"] for v in doc["spec"]["template"]["spec"]["volumes"]}
        for path in HELM_VALUES:
            names |= {v["configMap"]["name"] for v in load(path)["extraVolumes"] if "configMap" in v}
        for name in names:
            assert re.search(rf"create (secret \w+|configmap) {re.escape(name)}\b", script), name


class TestHelmValues:
    def test_ext_plugin(self) -> None:
        """The runner is spawned by APISIX from the image's venv, with its settings mounted where cmd reads them."""
        values = load(HELM / "values-mtls-guard.yaml")
        ext = values["apisix"]["extPlugin"]
        assert ext["enabled"] is True
        assert ext["cmd"] == load(CONF / "config.yaml")["ext-plugin"]["cmd"]
        mounts = {m["mountPath"]: m for m in values["extraVolumeMounts"]}
        assert mounts[RUNNER_CONFIG]["subPath"] == "mtls-guard.yaml"
        assert mounts[runner_policy_file()]["subPath"] == "policies.yaml"
        assert values["apisix"]["ssl"]["enabled"] is True
        assert isinstance(values["apisix"]["nginx"]["envs"], list)

    @pytest.mark.parametrize("path", HELM_VALUES, ids=lambda p: p.name)
    def test_admin_key_matches_the_controller(self, path: Path) -> None:
        """The controller authenticates with the same Admin API key APISIX is given."""
        values = load(path)
        key = values["apisix"]["admin"]["credentials"]["admin"]
        control_plane = values["ingress-controller"]["gatewayProxy"]["provider"]["controlPlane"]
        assert control_plane["auth"]["adminKey"]["value"] == key
        full = values["apisix"].get("fullCustomConfig", {})
        if full.get("enabled"):
            assert full["config"]["deployment"]["admin"]["admin_key"][0]["key"] == key

    def test_sidecar(self) -> None:
        """Sidecar values: no cmd, path_for_test equals the runner container's --listen, shared emptyDir."""
        values = load(HELM / "values-mtls-guard-sidecar.yaml")
        assert values["apisix"]["extPlugin"]["enabled"] is False
        socket_path = values["apisix"]["fullCustomConfig"]["config"]["ext-plugin"]["path_for_test"]
        (runner,) = values["extraContainers"]
        argv = runner["command"]
        assert argv[:2] == [f"{dockerfile_venv()}/bin/mtls-guard", "run"]
        assert argv[argv.index("--listen") + 1] == socket_path
        assert runner["image"] == f"{values['image']['repository']}:{values['image']['tag']}"
        assert runner["securityContext"]["runAsUser"] == 636
        volumes = {v["name"]: v for v in values["extraVolumes"]}
        socket_dir = os.path.dirname(socket_path)
        (shared,) = [m for m in values["extraVolumeMounts"] if m["mountPath"] == socket_dir]
        assert "emptyDir" in volumes[shared["name"]]
        assert {"name": shared["name"], "mountPath": socket_dir} in runner["volumeMounts"]
        mounts = {m["mountPath"]: m for m in runner["volumeMounts"]}
        assert mounts[runner_policy_file()]["subPath"] == "policies.yaml"

    def test_sidecar_probes_use_the_runner_endpoint(self) -> None:
        """Readiness GETs /readyz and liveness /healthz, on the container port the runner's --metrics-addr opens."""
        (runner,) = load(HELM / "values-mtls-guard-sidecar.yaml")["extraContainers"]
        argv = runner["command"]
        assert argv[argv.index("--metrics-addr") + 1].startswith("0.0.0.0:")  # kubelet probes the pod IP
        ports = {p["name"]: p["containerPort"] for p in runner["ports"]}
        for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
            get = runner[probe]["httpGet"]
            assert get["path"] == path
            assert ports.get(get["port"], get["port"]) == metrics_port(argv)

    def test_spawned_runner_metrics_stay_on_loopback(self) -> None:
        """When APISIX spawns the runner (no --metrics-addr in cmd) its endpoint binds loopback only."""
        cmd = load(HELM / "values-mtls-guard.yaml")["apisix"]["extPlugin"]["cmd"]
        assert "--metrics-addr" not in cmd
        assert load(CONF / "mtls-guard.yaml")["metrics_addr"].startswith("127.0.0.1:")


class TestNoPromises:
    FILES = (
        *COMPOSE_FILES,
        *APISIX_CONFIGS,
        *HELM_VALUES,
        CONF / "mtls-guard.yaml",
        ROOT / "Dockerfile",
        ROOT / "docs" / "deployment.md",
        *sorted(K8S.glob("*")),
    )

    @pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(ROOT)))
    def test_nothing_is_planned(self, path: Path) -> None:
        """No deployment file describes a feature as planned: what the files say exists."""
        assert "planned" not in path.read_text(encoding="utf-8").lower()


class TestShellScripts:
    SCRIPTS = (GEN_CERTS, ADMIN_API, K8S / "bootstrap.sh")

    @pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
    def test_syntax(self, script: Path) -> None:
        """bash -n accepts the script."""
        subprocess.run(["bash", "-n", str(script)], check=True)

    @pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
    def test_executable_with_strict_mode(self, script: Path) -> None:
        """The script is executable, has a bash shebang and stops on the first error."""
        text = script.read_text(encoding="utf-8")
        assert os.access(script, os.X_OK)
        assert text.startswith("#!/usr/bin/env bash\n")
        assert "set -euo pipefail" in text

    @pytest.mark.parametrize(
        "text",
        [
            '{"policy": "billing-only"}',
            'back\\slash "quoted"\ttab\r\nnext line',
            "-----BEGIN X-----\nAAA=\n-----END X-----\n",
        ],
    )
    def test_json_str_round_trips(self, text: str, tmp_path: Path) -> None:
        """admin-api.sh's JSON string encoder (sed/awk, no jq) produces JSON that decodes to its input."""
        source = tmp_path / "input"
        source.write_bytes(text.encode())
        result = subprocess.run(
            ["bash", "-c", 'source "$1" && json_str < "$2"', "bash", str(ADMIN_API), str(source)],
            check=True,
            capture_output=True,
            text=True,
        )
        # Lines are joined with \n and the final newline is dropped (PEM parsers do not need it).
        assert json.loads(result.stdout) == text.removesuffix("\n")

    def test_admin_bodies(self, admin_bodies: dict[str, Any], certs: Path) -> None:
        """The Admin API request bodies are valid JSON carrying the generated PEMs and the catch-all regex."""
        ssl = admin_bodies["ssl_body"]
        assert ssl["snis"] == ["api.example.test"]
        assert ssl["cert"] == (certs / "server.crt").read_text(encoding="utf-8").rstrip("\n")
        assert ssl["client"]["ca"] == (certs / "ca.crt").read_text(encoding="utf-8").rstrip("\n")
        assert ssl["client"]["skip_mtls_uri_regex"] == CATCH_ALL
        assert admin_bodies["billing_route_body"]["upstream_id"] == "demo-upstream"
        assert admin_bodies["upstream_body"]["nodes"] == {"upstream:80": 1}

    def test_sourcing_admin_api_does_nothing(self, tmp_path: Path) -> None:
        """Sourcing admin-api.sh only defines functions; no request is sent."""
        result = subprocess.run(
            ["bash", "-c", 'source "$1"; echo sourced', "bash", str(ADMIN_API)],
            check=True,
            capture_output=True,
            text=True,
            env={**os.environ, "APISIX_ADMIN_URL": "http://127.0.0.1:9"},
        )
        assert result.stdout == "sourced\n"


class TestGenCerts:
    def verify(self, certs: Path, name: str, *extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["openssl", "verify", "-CAfile", str(certs / "ca.crt"), *extra, str(certs / name)],
            capture_output=True,
            text=True,
            check=False,
        )

    def test_creates_every_listed_file(self, certs: Path) -> None:
        """All files in CERT_FILES exist, keys readable by the owner only."""
        for name in gen_certs_outputs():
            assert (certs / name).is_file(), name
        for key in certs.glob("*.key"):
            assert key.stat().st_mode & 0o077 == 0, key.name

    @pytest.mark.parametrize(
        ("name", "purpose"),
        [("server.crt", "sslserver"), ("client.crt", "sslclient"), ("client-wrong-identity.crt", "sslclient")],
    )
    def test_valid_certificates_verify(self, certs: Path, name: str, purpose: str) -> None:
        """openssl verify accepts the server and the valid client certificates against the demo CA."""
        result = self.verify(certs, name, "-purpose", purpose)
        assert result.returncode == 0, result.stdout + result.stderr

    @pytest.mark.parametrize(
        ("name", "error"),
        [("client-expired.crt", "certificate has expired"), ("client-untrusted.crt", "unable to get local issuer")],
    )
    def test_bad_certificates_are_rejected(self, certs: Path, name: str, error: str) -> None:
        """openssl verify rejects the expired and the untrusted client certificate, for the right reason."""
        result = self.verify(certs, name)
        assert result.returncode != 0
        assert error in result.stdout + result.stderr

    def test_identities(self, certs: Path) -> None:
        """The SANs are the ones the demo policies test: billing, frontend and the server name."""
        x509 = pytest.importorskip("cryptography.x509")

        def sans(name: str) -> tuple[list[str], list[str]]:
            cert = x509.load_pem_x509_certificate((certs / name).read_bytes())
            ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
            uris = ext.get_values_for_type(x509.UniformResourceIdentifier)
            return uris, ext.get_values_for_type(x509.DNSName)

        billing = "spiffe://example.test/ns/prod/sa/billing"
        assert sans("client.crt") == ([billing], ["billing.prod.example.test"])
        assert sans("client-expired.crt")[0] == [billing]
        assert sans("client-untrusted.crt")[0] == [billing]
        assert sans("client-wrong-identity.crt")[0] == ["spiffe://example.test/ns/prod/sa/frontend"]
        assert sans("server.crt") == ([], ["api.example.test"])

    def test_rerun_is_a_no_op_and_partial_output_is_refused(self, certs: Path, tmp_path: Path) -> None:
        """Without --force an existing set is kept (exit 0), a partial set refused; --force regenerates."""
        out = tmp_path / "copy"
        shutil.copytree(certs, out)
        before = (out / "ca.crt").read_bytes()
        run = ["bash", str(GEN_CERTS), "--out", str(out)]

        assert subprocess.run(run, capture_output=True, check=False).returncode == 0
        assert (out / "ca.crt").read_bytes() == before

        (out / "client.key").unlink()
        refused = subprocess.run(run, capture_output=True, text=True, check=False)
        assert refused.returncode != 0
        assert "--force" in refused.stderr

        subprocess.run([*run, "--force"], capture_output=True, check=True)
        assert (out / "client.key").is_file()
        assert (out / "ca.crt").read_bytes() != before

    def test_gitignored(self) -> None:
        """deploy/certs/ (keys, rendered apisix.yaml) is ignored by git."""
        assert "certs/" in (DEPLOY / ".gitignore").read_text(encoding="utf-8").splitlines()
        if shutil.which("git") and (ROOT / ".git").exists():
            result = subprocess.run(
                ["git", "-C", str(ROOT), "check-ignore", "-q", "deploy/certs/ca.key"], check=False, capture_output=True
            )
            assert result.returncode == 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
