"""Input of ``mtls-guard lint``: standalone ``apisix.yaml``, Admin API exports and Kubernetes manifests
-> one resource model.

Accepted shapes, per file (YAML, several documents allowed, or JSON; told apart by extension, else by
the first character, and parsed by ``lint_read``):

* standalone / combined export: ``{"routes": [...], "ssls": [...], ...}`` with plain objects, Admin API
  items (``{"key": ..., "value": {...}}``) or a list response per resource;
* an Admin API list response ``{"list": [{"key": "/apisix/routes/1", "value": {...}}], "total": n}``;
* an Admin API single object ``{"key": ..., "value": {...}}`` and the 2.x ``{"node": {"nodes": [...]}}``;
* a bare list of objects;
* Kubernetes manifests, when an ``apisix.apache.org`` object is anywhere in the input: the
  controller's CRDs are mapped by ``lint_k8s``, every other Kubernetes object (Secret, Service, ...)
  belongs to the layout and is skipped. Without any CRD, a lone ConfigMap is a wrong file (MG003).

The live Admin API (``lint_admin``) feeds the same model through ``load_export``.

Where an item's kind is not in the data (no ``key``), it comes from the file name (``routes.json``,
``ssls-export.json``). Anything the loader cannot place is reported, never silently dropped: a lint
that quietly checked nothing would look like a clean bill of health.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from .lint_findings import Findings
from .lint_k8s import KubernetesLayout
from .lint_k8s_objects import is_apisix_manifest, kubernetes_objects
from .lint_read import parse_file

__all__ = ["CHECKED_KINDS", "Config", "LoadedFile", "Resource", "load_export", "load_files"]

# Resources the checks read; the others are known APISIX resources that carry nothing mTLS-relevant here.
CHECKED_KINDS: Final = ("routes", "services", "ssls", "global_rules", "plugin_configs")
OTHER_KINDS: Final = frozenset(
    {"upstreams", "consumers", "consumer_groups", "plugin_metadata", "stream_routes", "protos", "secrets", "plugins"}
)
_ALL_KINDS: Final = (*CHECKED_KINDS, *sorted(OTHER_KINDS))
_ADMIN_ITEM_KEYS: Final = frozenset({"key", "value", "createdIndex", "modifiedIndex", "create_time", "update_time"})
# GET /apisix/admin/configs (API-driven standalone, apisix/admin/standalone.lua) stores these beside the lists.
_STANDALONE_META: Final = frozenset({"X-Last-Modified", "X-Digest"})
_KEY_RE: Final = re.compile(r"/apisix/([a-z_]+)(?:/([^/]+))?/?\Z")


@dataclass(frozen=True, slots=True)
class Resource:
    kind: str
    id: str
    value: Mapping[str, Any]
    source: str
    line: int | None = None

    @property
    def label(self) -> str:
        return f"{self.kind}/{self.id}"


@dataclass(slots=True)
class LoadedFile:
    path: str
    format: str  # "yaml" | "json"
    shape: str  # "standalone", "admin-list", "admin-object", "admin-v2", "list", "kubernetes", "admin-api", ...
    resources: int = 0


@dataclass(slots=True)
class Config:
    resources: dict[str, list[Resource]] = field(default_factory=lambda: {k: [] for k in CHECKED_KINDS})
    files: list[LoadedFile] = field(default_factory=list)

    def of(self, kind: str) -> list[Resource]:
        return self.resources[kind]

    def get(self, kind: str, ident: object) -> Resource | None:
        wanted = str(ident)
        return next((r for r in self.resources[kind] if r.id == wanted), None)


# -- recognition -------------------------------------------------------------------------------------


def _kind_from_name(path: str) -> str | None:
    """``routes.json``, ``ssl-prod.json``, ``global_rules.yaml`` -> kind; None if zero or several fit."""
    stem = Path(path).stem.lower().replace("-", "_")
    spans: list[tuple[int, int, str]] = []
    for kind in _ALL_KINDS:
        if kind == "plugins":  # a list of plugin names is not a resource export
            continue
        for name in (kind, kind[:-1]):
            spans += [(m.start(), m.end(), kind) for m in re.finditer(rf"(?<![a-z]){name}(?![a-z])", stem)]
    # "stream_routes" contains "routes", "plugin_configs" contains "plugin": the longer name wins.
    kinds = {k for s, e, k in spans if not any(s2 <= s and e <= e2 and (s2, e2) != (s, e) for s2, e2, _ in spans)}
    return kinds.pop() if len(kinds) == 1 else None


class _Recogniser:
    def __init__(self, config: Config, findings: Findings, loaded: LoadedFile, item_source: str | None = None) -> None:
        self.config = config
        self.findings = findings
        self.file = loaded
        self.name_kind = _kind_from_name(loaded.path)
        self.item_source = item_source  # "admin:" -> each resource's source is "admin:<kind>/<id>"
        self.recognised = 0  # objects placed, checked or not: zero means the file was not understood

    def note(self, code: str, obj: str, message: str, fix: str, line: int | None = None) -> None:
        self.findings.add(code, obj, message, fix, source=self.file.path, line=line)

    def top(self, data: object) -> None:
        if isinstance(data, Mapping):
            if isinstance(data.get("list"), list):
                self.file.shape = "admin-list"
                self.items(None, data["list"], "list")
            elif isinstance(data.get("node"), Mapping):
                self.file.shape = "admin-v2"
                node = data["node"]
                self.items(None, node["nodes"] if isinstance(node.get("nodes"), list) else [node], "node")
            elif isinstance(data.get("value"), Mapping) and isinstance(data.get("key"), str):
                self.file.shape = "admin-object"
                self.items(None, [data], "")
            else:
                self.collections(data)
        elif isinstance(data, list):
            self.file.shape = "list"
            self.items(None, data, "")

    def collections(self, data: Mapping[Any, Any]) -> None:
        self.file.shape = "standalone" if self.file.format == "yaml" else "combined"
        for key, value in data.items():
            if key in CHECKED_KINDS:
                items = value
                if isinstance(value, Mapping) and isinstance(value.get("list"), list):
                    items = value["list"]  # a list response stored under its resource name
                if items is None:
                    continue
                if not isinstance(items, list):
                    self.note("MG004", f"{key}", f"'{key}' must be a list of objects", "make it a YAML/JSON list")
                    continue
                self.items(key, items, key)
            elif key in OTHER_KINDS | _STANDALONE_META or (isinstance(key, str) and key.endswith("_conf_version")):
                self.recognised += 1
            else:
                self.note(
                    "MG002",
                    self.file.path,
                    f"unknown top-level key {key!r} (ignored)",
                    f"expected resource lists: {', '.join(_ALL_KINDS)}",
                    getattr(data, "line", None),
                )

    def items(self, kind: str | None, items: Sequence[object], where: str) -> None:
        unplaced = 0
        for index, item in enumerate(items):
            at = f"{where}[{index}]" if where else f"item {index}"
            value, item_kind, key_id = item, kind, None
            if isinstance(item, Mapping) and isinstance(item.get("value"), Mapping) and set(item) <= _ADMIN_ITEM_KEYS:
                value = item["value"]
                match = _KEY_RE.match(item["key"]) if isinstance(item.get("key"), str) else None
                if match is not None:
                    item_kind, key_id = item_kind or match.group(1), match.group(2)
            item_kind = item_kind or self.name_kind
            if item_kind is None:
                unplaced += 1
                continue
            if item_kind in OTHER_KINDS:
                self.recognised += 1
                continue
            line = getattr(value, "line", None) or getattr(item, "line", None)
            ident = value.get("id", key_id) if isinstance(value, Mapping) else None
            # APISIX's standalone loader names id-less items "<kind>#<1-based index>".
            ident_text = str(ident) if ident is not None else f"#{index + 1}"
            if not isinstance(value, Mapping):
                self.recognised += 1  # placed, just broken: reported here, not as "unrecognised file"
                self.note("MG004", f"{item_kind}/{ident_text}", f"{at} is not an object", "remove it or fix it", line)
                continue
            source = f"{self.item_source}{item_kind}/{ident_text}" if self.item_source else self.file.path
            _add(self.config, self.findings, self.file, Resource(item_kind, ident_text, value, source, line))
            self.recognised += 1
        if unplaced:
            self.note(
                "MG002",
                self.file.path,
                f"{unplaced} object(s) of unknown kind: they carry no Admin API 'key' and the file name "
                "names no resource",
                "name the file after its resource (routes.json, ssls.json, ...) or export with the Admin API keys",
            )


def _add(config: Config, findings: Findings, loaded: LoadedFile, resource: Resource) -> None:
    twin = config.get(resource.kind, resource.id)
    if twin is not None:
        findings.add(
            "MG005",
            resource.label,
            f"defined twice ({twin.source} and {resource.source}); APISIX keeps only one of them",
            "give every object a unique id",
            source=resource.source,
            line=resource.line,
        )
    config.resources[resource.kind].append(resource)
    loaded.resources += 1


_SHAPES_FIX: Final = (
    "give an apisix.yaml with top-level routes/ssls/..., an Admin API export ({'list': [{'value': ...}]}), "
    "or Kubernetes manifests with apisix.apache.org/v2 objects"
)


def _end_flag_present(text: str) -> bool:
    # APISIX's standalone reader searches the last 10 bytes for "#END" and skips the whole file otherwise.
    return "#END" in text.encode("utf-8")[-10:].decode("utf-8", "ignore")


def _unrecognised_detail(documents: Sequence[object]) -> str:
    kinds = dict.fromkeys(str(o.get("kind")) for d in documents for o in kubernetes_objects(d) or ())
    if kinds:
        return f" (Kubernetes {', '.join(kinds)}; no apisix.apache.org object is in the input)"
    data = documents[0] if len(documents) == 1 else documents
    what = "empty" if data is None else f"a {type(data).__name__}" if not isinstance(data, list | dict) else ""
    return f" (the document is {what})" if what else ""


def load_files(paths: Sequence[str], findings: Findings) -> Config:
    """Parse and merge every file; raises lint_read.InputError for a file that cannot be read or parsed."""
    parsed = [parse_file(path) for path in paths]  # the layout mode below depends on every file
    config = Config()
    # Kubernetes objects are read as a layout only when the controller's CRDs are in the input: a
    # Deployment next to an ApisixRoute is part of the deployment, alone it is the wrong file.
    kubernetes = any(is_apisix_manifest(d) for p in parsed for d in p.documents)
    layout = KubernetesLayout(findings) if kubernetes else None
    by_path: dict[str, LoadedFile] = {}
    for p in parsed:
        loaded = by_path[p.path] = LoadedFile(p.path, p.format, "unrecognised")
        config.files.append(loaded)
        for duplicate, line in p.duplicates:
            message = f"{duplicate}: YAML/JSON readers disagree on which copy wins"
            findings.add("MG004", p.path, message, "remove one copy", source=p.path, line=line)
        recogniser = _Recogniser(config, findings, loaded)
        for document in p.documents:
            if layout is not None and layout.take(document, p.path):
                loaded.shape = "kubernetes"
                recogniser.recognised += 1
            else:
                recogniser.top(document)
        if not recogniser.recognised and not all(_is_empty_collection(d) for d in p.documents):
            loaded.shape = "unrecognised"
            message = f"no APISIX resource recognised{_unrecognised_detail(p.documents)}"
            findings.add("MG003", p.path, message, _SHAPES_FIX, source=p.path)
        if p.format == "yaml" and loaded.shape == "standalone" and not _end_flag_present(p.text):
            findings.add(
                "MG001",
                p.path,
                "does not end with '#END': APISIX's standalone mode ignores the file and keeps the old config",
                "add a last line '#END'",
                source=p.path,
            )
    mapped = layout.resources() if layout is not None else []
    for m in mapped:
        _add(config, findings, by_path[m.source], Resource(m.kind, m.id, m.value, m.source, m.line))
    if layout is not None and not mapped:  # only kinds the linter skips: nothing was checked
        for loaded in (f for f in config.files if f.shape == "kubernetes"):
            message = "no APISIX resource recognised (no apisix.apache.org/v2 ApisixRoute, ApisixTls, ...)"
            findings.add("MG003", loaded.path, message, _SHAPES_FIX, source=loaded.path)
    return config


def load_export(config: Config, findings: Findings, kind: str, items: Sequence[object], *, origin: str) -> None:
    """Add objects of one kind read from a live source (``origin`` "admin"): listed as ``admin:<kind>``,
    each resource's source is ``admin:<kind>/<id>``; objects without an id are numbered as in files."""
    loaded = LoadedFile(f"{origin}:{kind}", "json", "admin-api")
    config.files.append(loaded)
    _Recogniser(config, findings, loaded, item_source=f"{origin}:").items(kind, items, kind)


def _is_empty_collection(data: object) -> bool:
    """An explicitly empty export ({"list": [], "total": 0}, {"routes": []}, []) is recognised, not noise."""
    if isinstance(data, list):
        return not data
    if isinstance(data, Mapping):
        if isinstance(data.get("list"), list):
            return not data["list"]
        return bool(data) and all(k in CHECKED_KINDS and not data[k] for k in data)
    return False
