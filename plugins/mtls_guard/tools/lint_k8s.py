"""Kubernetes manifests of the APISIX Ingress Controller -> the lint resource model.

The mapping repeats what the controller does with ``apisix.apache.org/v2`` objects, so the checks judge
what APISIX will actually be given. Field names and behaviour come from the controller's source
(apache/apisix-ingress-controller 2.x, read through the code search: ``api/v2/apisix{route,tls,
pluginconfig,globalrule}_types.go``; ``internal/adc/translator/apisixroute.go``, ``apisixtls.go``,
``globalrule.go``; ``internal/ssl/util.go``), cross-checked with the repo's deploy/kubernetes files:

* ``ApisixRoute`` ``spec.http[]``: one route per rule, id ``<namespace>/<name>/<rule name>``;
  ``match.paths/hosts/methods`` -> ``uris/hosts/methods``; ``plugins[]`` -> ``plugins``;
  ``plugin_config_name`` (+ ``plugin_config_namespace``, default the route's) -> ``plugin_config_id``.
  The controller copies the plugin config's plugins under the route's own, the route winning per
  plugin name: APISIX's own plugin_config_id precedence, so the checks need no special case.
* ``ApisixPluginConfig`` / ``ApisixGlobalRule`` ``spec.plugins[]`` -> plugin config / global rule.
* ``ApisixTls``: ``hosts`` -> ``snis``; the certificate from the ``secret`` Secret (keys ``cert``,
  else ``tls.crt``); ``client.caSecret`` (``cert``, ``tls.crt``, else ``ca.crt``), ``depth`` (sent as 0
  when omitted) and ``skip_mtls_uri_regex`` -> ``client``.
* A plugin entry is ``{name, enable (default true), config, secretRef}``; the controller leaves out
  disabled entries and merges a ``secretRef`` Secret's keys (dotted paths) into ``config``.

Certificates and secretRef values are read from Secret manifests in the input (``data`` base64,
``stringData`` plain). A Secret that is not in the input is normal (it holds a private key), so its
certificate becomes a ``$secret://kubernetes/...`` placeholder, which the TLS checks report as not
checkable offline (MG046) rather than as broken. Private keys are never read.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Final

from .lint_findings import Findings
from .lint_k8s_objects import (
    APISIX_GROUP,
    KubernetesObject,
    Location,
    api_group,
    as_mapping,
    find_by_name,
    kubernetes_objects,
    yaml_line,
)

__all__ = ["KubernetesLayout", "Mapped"]

_V2: Final = f"{APISIX_GROUP}/v2"
# v2 kinds that carry nothing the checks read (upstream settings, consumers, controller settings).
_IGNORED_V2: Final = frozenset({"ApisixUpstream", "ApisixConsumer", "ApisixClusterConfig"})
# Kinds the controller also turns into routes or SSL objects, which this mapping does not read.
_UNREAD: Final = frozenset({"Ingress", "Gateway", "HTTPRoute", "GRPCRoute", "TLSRoute", "TCPRoute", "UDPRoute"})
_UNREAD_GROUPS: Final = frozenset({"networking.k8s.io", "gateway.networking.k8s.io"})
_SERVER_KEYS: Final = (("cert", "key"), ("tls.crt", "tls.key"))  # (certificate, private key), in this order
_CA_KEYS: Final = ("cert", "tls.crt", "ca.crt")
_PRE_REQ: Final = "ext-plugin-pre-req"


@dataclass(frozen=True, slots=True)
class Mapped:
    """One APISIX object the controller makes of a manifest (lint_load turns it into a Resource)."""

    kind: str
    id: str
    value: dict[str, Any]
    source: str
    line: int | None


def _carries_guard(config: object) -> bool:
    conf = as_mapping(config).get("conf")
    return isinstance(conf, list) and any(as_mapping(entry).get("name") == "mtls-guard" for entry in conf)


def _insert_dotted(config: dict[str, Any], key: str, value: str) -> None:
    # The controller's InsertKeyInMap: "a.b" lands in config["a"]["b"], replacing a non-object "a".
    head, _, rest = key.partition(".")
    if not rest:
        config[head] = value
        return
    inner = config.get(head)
    inner = dict(inner) if isinstance(inner, Mapping) else {}
    config[head] = inner
    _insert_dotted(inner, rest, value)


class KubernetesLayout:
    """Collects the Kubernetes objects of every input file, then maps them once all are known: an
    ApisixTls may come before the Secret it names, a route before its plugin config."""

    def __init__(self, findings: Findings) -> None:
        self.findings = findings
        self._objects: list[KubernetesObject] = []
        self._secrets: dict[tuple[str, str], KubernetesObject] = {}
        self._plugin_configs: dict[tuple[str, str], str] = {}

    def take(self, document: object, source: str) -> bool:
        """Collect the document's Kubernetes objects; False when it is not a Kubernetes document."""
        objects = kubernetes_objects(document)
        if objects is None:
            return False
        self._objects += [KubernetesObject(obj, source) for obj in objects]
        return True

    def _add(self, code: str, at: Location, message: str, fix: str) -> None:
        self.findings.add(code, at.label, message, fix, source=at.obj.source, line=at.line)

    def resources(self) -> list[Mapped]:
        v2 = [o for o in self._objects if o.version == _V2]
        self._secrets = {(o.namespace, o.name): o for o in self._objects if o.kind == "Secret" and o.version == "v1"}
        self._plugin_configs = {(o.namespace, o.name): o.ref() for o in v2 if o.kind == "ApisixPluginConfig"}
        out: list[Mapped] = []
        for obj in self._objects:
            if obj.version != _V2:
                if api_group(obj.doc) == APISIX_GROUP or (api_group(obj.doc) in _UNREAD_GROUPS and obj.kind in _UNREAD):
                    self._unread(obj)
            elif obj.kind == "ApisixRoute":
                out += self._route(obj)
            elif obj.kind in ("ApisixPluginConfig", "ApisixGlobalRule"):
                kind = "plugin_configs" if obj.kind == "ApisixPluginConfig" else "global_rules"
                at = Location(obj, f"{kind}/{obj.ref()}", "spec.plugins", obj.line)
                plugins = self._plugins(at, obj.spec.get("plugins"))
                out.append(Mapped(kind, obj.ref(), {"id": obj.ref(), "plugins": plugins}, obj.source, obj.line))
            elif obj.kind == "ApisixTls":
                out.append(self._tls(obj))
            elif obj.kind not in _IGNORED_V2:
                self._unread(obj)
        self._global_plugin_clashes([m for m in out if m.kind == "global_rules"])
        return out

    def _unread(self, obj: KubernetesObject) -> None:
        self._add(
            "MG002",
            Location(obj, obj.source, "", obj.line),
            f"{obj.version} {obj.kind} {obj.ref()!r} is not read by the linter (it reads {_V2} ApisixRoute, "
            "ApisixPluginConfig, ApisixTls, ApisixGlobalRule): the routes, SSL objects or plugins the controller "
            "makes of it are not checked",
            "lint what APISIX runs instead: mtls-guard lint --admin-url URL",
        )

    # -- plugins ------------------------------------------------------------------------------------

    def _plugins(self, at: Location, raw: object) -> dict[str, Any]:
        if raw is None:
            return {}
        if not isinstance(raw, list):
            self._add("MG004", at, f"{at.field} must be a list of {{name, enable, config}}", "fix the list")
            return {}
        plugins: dict[str, Any] = {}
        for index, entry in enumerate(raw):
            here = at.inner(f"{at.field}[{index}]", entry)
            name = as_mapping(entry).get("name")
            if not isinstance(name, str) or not name:
                self._add("MG004", here, f"{here.field} needs a plugin 'name'", "add the plugin name")
                continue
            assert isinstance(entry, Mapping)  # a name was found in it
            config = entry.get("config")
            config = dict(config) if isinstance(config, Mapping) else {} if config is None else config
            enable = entry.get("enable", True)  # the CRD defaults it to true
            if enable is not True:
                self._disabled(here, name, enable, config)
                continue
            secret_ref = entry.get("secretRef")
            if isinstance(secret_ref, str) and secret_ref and isinstance(config, dict):
                self._merge_secret(here, f"{name} config", secret_ref, config)
            if name in plugins:
                self._add(
                    "MG004",
                    here,
                    f"{here.field}: plugin {name!r} is listed twice; the controller keeps only the last entry",
                    "merge the two entries into one",
                )
            plugins[name] = config
        return plugins

    def _disabled(self, at: Location, name: str, enable: object, config: object) -> None:
        if not isinstance(enable, bool):
            self._add("MG004", at, f"{at.field}: 'enable' must be true or false", "use a YAML boolean")
        elif name == _PRE_REQ and _carries_guard(config):
            self._add(
                "MG025",
                at,
                f"{at.field}: {_PRE_REQ} carrying mtls-guard has enable: false; the ingress controller leaves "
                "disabled plugins out, so this policy never runs",
                "set enable: true, or remove the plugin if it is not wanted",
            )

    def _merge_secret(self, at: Location, what: str, ref: str, config: dict[str, Any]) -> None:
        secret = find_by_name(self._secrets, at.obj.namespace, ref)
        data = self._secret_data(secret, at) if secret is not None else None
        if data is None:
            where = f"{at.obj.namespace}/{ref}" if at.obj.namespace else ref
            self._add(
                "MG046",
                at,
                f"{at.field}: part of the {what} comes from Secret {where}, which is not in the input: that part "
                "cannot be checked offline",
                "lint the Secret manifest together with this one to check it",
            )
            return
        for key, value in data.items():
            _insert_dotted(config, key, value)

    def _global_plugin_clashes(self, rules: list[Mapped]) -> None:
        # The controller publishes global rules per plugin name, so two ApisixGlobalRules configuring
        # the same plugin leave APISIX with one of the two configurations.
        seen: dict[str, Mapped] = {}
        for rule in rules:
            for name in rule.value["plugins"]:
                first = seen.setdefault(name, rule)
                if first is not rule:
                    self.findings.add(
                        "MG005",
                        f"global_rules/{rule.id}",
                        f"plugin {name!r} is also configured by global_rules/{first.id}; the controller keeps one "
                        "global configuration per plugin name, so only one of the two runs",
                        "configure each global plugin in one ApisixGlobalRule",
                        source=rule.source,
                        line=rule.line,
                    )

    # -- routes -------------------------------------------------------------------------------------

    def _route(self, obj: KubernetesObject) -> Iterator[Mapped]:
        http = obj.spec.get("http")
        if http is None:
            return  # stream-only: APISIX's stream subsystem always rejects missing certificates itself
        if not isinstance(http, list):
            self._add(
                "MG004",
                Location(obj, f"routes/{obj.ref()}", "spec.http", obj.line),
                "spec.http must be a list",
                "fix it",
            )
            return
        for index, rule in enumerate(http):
            line = yaml_line(rule) or obj.line
            rule_name = as_mapping(rule).get("name")
            named = isinstance(rule_name, str) and bool(rule_name)
            ident = obj.ref(str(rule_name) if named else f"#{index + 1}")
            at = Location(obj, f"routes/{ident}", f"spec.http[{index}]", line)
            if not isinstance(rule, Mapping) or not named:
                self._add("MG004", at, f"{at.field} needs a 'name'", "name every http rule")
            if not isinstance(rule, Mapping):
                continue
            match = as_mapping(rule.get("match"))
            value: dict[str, Any] = {"id": ident, "name": ident.replace("/", "_")}
            paths = match.get("paths")
            if isinstance(paths, list) and paths and all(isinstance(p, str) for p in paths):
                value["uris"] = paths
            else:
                self._add("MG004", at, f"{at.field}.match.paths must list URI paths", "add the paths")
            for key in ("hosts", "methods"):
                if isinstance(match.get(key), list) and match[key]:
                    value[key] = match[key]
            value["plugins"] = self._plugins(at.inner(f"{at.field}.plugins", None), rule.get("plugins"))
            self._plugin_config(at, rule, value)
            yield Mapped("routes", ident, value, obj.source, line)

    def _plugin_config(self, at: Location, rule: Mapping[str, Any], value: dict[str, Any]) -> None:
        name = rule.get("plugin_config_name")
        if not isinstance(name, str) or not name:
            return
        namespace = rule.get("plugin_config_namespace") or at.obj.namespace
        target = find_by_name(self._plugin_configs, str(namespace), name)
        if target is not None:
            value["plugin_config_id"] = target
            return
        where = f"{namespace}/{name}" if namespace else name
        self._add(
            "MG016",
            at,
            f"{at.field}.plugin_config_name {name!r} names no ApisixPluginConfig in the input ({where}); the "
            "controller then builds the route without it, so none of its plugins (mtls-guard included) run",
            "lint the ApisixPluginConfig together with the route, or fix the name",
        )

    # -- TLS ----------------------------------------------------------------------------------------

    def _tls(self, obj: KubernetesObject) -> Mapped:
        spec, at = obj.spec, Location(obj, f"ssls/{obj.ref()}", "spec", obj.line)
        value: dict[str, Any] = {"id": obj.ref()}
        if "hosts" in spec:
            value["snis"] = spec["hosts"]
        if isinstance(spec.get("secret"), Mapping):
            value["cert"] = self._certificate(at, spec["secret"], server=True)
        client = spec.get("client")
        if isinstance(client, Mapping):
            mapped: dict[str, Any] = {"depth": client.get("depth", 0)}  # the controller sends an omitted depth as 0
            if isinstance(client.get("caSecret"), Mapping):
                mapped["ca"] = self._certificate(at, client["caSecret"], server=False)
            if "skip_mtls_uri_regex" in client:
                mapped["skip_mtls_uri_regex"] = client["skip_mtls_uri_regex"]
            value["client"] = mapped
        elif client is not None:
            value["client"] = client  # the TLS checks report the shape
        return Mapped("ssls", obj.ref(), value, obj.source, obj.line)

    def _certificate(self, at: Location, ref: Mapping[str, Any], *, server: bool) -> str:
        name, namespace = str(ref.get("name") or ""), str(ref.get("namespace") or at.obj.namespace)
        where = f"{namespace}/{name}" if namespace else name
        placeholder = f"$secret://kubernetes/{where}"
        secret = find_by_name(self._secrets, namespace, name)
        data = self._secret_data(secret, at) if secret is not None else None
        if secret is None or data is None:
            return placeholder
        pairs = _SERVER_KEYS if server else tuple((key, None) for key in _CA_KEYS)
        for cert_key, key_key in pairs:
            if cert_key in data:
                if key_key is not None and key_key not in data:
                    break
                return data[cert_key]
        wanted = " or ".join(f"{c} + {k}" if k else c for c, k in pairs)
        self._add(
            "MG035",
            Location(secret, at.label, "data", secret.line),
            f"Secret {where} has no {wanted}; the ingress controller cannot build this SSL object from it",
            "store the PEM certificate (and for the server its key) under those keys",
        )
        return placeholder

    def _secret_data(self, secret: KubernetesObject, at: Location) -> dict[str, str] | None:
        """The Secret's values as text (``stringData`` wins, as on apply); None when one does not decode."""
        data: dict[str, str] = {}
        for key, raw in as_mapping(secret.doc.get("data")).items():
            try:
                data[str(key)] = base64.b64decode(str(raw), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                self._add(
                    "MG004",
                    Location(secret, at.label, "data", secret.line),
                    f"Secret {secret.ref()} data {key!r} is not base64-encoded UTF-8 text; Kubernetes rejects it",
                    "base64-encode the PEM text (or put it under stringData)",
                )
                return None
        data.update({str(key): str(value) for key, value in as_mapping(secret.doc.get("stringData")).items()})
        return data
