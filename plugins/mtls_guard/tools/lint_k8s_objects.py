"""Kubernetes manifests as the lint's Kubernetes layout (:mod:`.lint_k8s`) reads them.

Generic object handling, nothing APISIX-specific beyond telling its API group apart: the objects of a
document (``kind: List`` flattened), an object's metadata read defensively (manifests are user input
and may be half-written), the YAML line a node starts on, lookup by namespace/name the way ``kubectl
apply`` resolves a manifest without namespace, and where a finding about an object points.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

__all__ = [
    "APISIX_GROUP",
    "KubernetesObject",
    "Location",
    "api_group",
    "as_mapping",
    "find_by_name",
    "is_apisix_manifest",
    "kubernetes_objects",
    "yaml_line",
]

APISIX_GROUP: Final = "apisix.apache.org"
_T = TypeVar("_T")


def kubernetes_objects(document: object) -> list[Mapping[str, Any]] | None:
    """The Kubernetes objects of one document, a ``kind: List`` (``kubectl get -o yaml``) flattened;
    None when the document is not a Kubernetes object."""
    if not isinstance(document, Mapping) or not all(isinstance(document.get(k), str) for k in ("apiVersion", "kind")):
        return None
    items = document.get("items")
    if document["kind"].endswith("List") and isinstance(items, list):
        return [item for item in items if isinstance(item, Mapping)]
    return [document]


def api_group(obj: Mapping[str, Any]) -> str:
    """The group of ``apiVersion``; "" for the core group (``v1``)."""
    version = str(obj.get("apiVersion", ""))
    return version.split("/", 1)[0] if "/" in version else ""


def is_apisix_manifest(document: object) -> bool:
    """An ``apisix.apache.org`` object (or a List holding one): the input is a Kubernetes layout."""
    return any(api_group(obj) == APISIX_GROUP for obj in kubernetes_objects(document) or ())


def yaml_line(node: object) -> int | None:
    line = getattr(node, "line", None)  # set by lint_read's YAML loader; JSON has no lines
    return line if isinstance(line, int) else None


def as_mapping(value: object) -> Mapping[str, Any]:
    return value if isinstance(value, Mapping) else {}


@dataclass(frozen=True, slots=True)
class KubernetesObject:
    """One object of a manifest file; metadata fields read as "" when missing or malformed."""

    doc: Mapping[str, Any]
    source: str

    @property
    def kind(self) -> str:
        return str(self.doc.get("kind"))

    @property
    def version(self) -> str:
        return str(self.doc.get("apiVersion"))

    @property
    def name(self) -> str:
        return str(as_mapping(self.doc.get("metadata")).get("name") or "")

    @property
    def namespace(self) -> str:
        # "": applied to whatever namespace kubectl was pointed at.
        return str(as_mapping(self.doc.get("metadata")).get("namespace") or "")

    @property
    def spec(self) -> Mapping[str, Any]:
        return as_mapping(self.doc.get("spec"))

    @property
    def line(self) -> int | None:
        return yaml_line(self.doc)

    def ref(self, *more: str) -> str:
        return "/".join(part for part in (self.namespace, self.name, *more) if part)


@dataclass(frozen=True, slots=True)
class Location:
    """Where a finding points: the manifest, the object it is about, the field, the YAML line."""

    obj: KubernetesObject
    label: str  # "routes/ns/name/rule"
    field: str  # "spec.http[0].plugins[1]"
    line: int | None

    def inner(self, field: str, node: object) -> Location:
        return Location(self.obj, self.label, field, yaml_line(node) or self.line)


def find_by_name(table: Mapping[tuple[str, str], _T], namespace: str, name: str) -> _T | None:
    """Exact namespace/name; a manifest without namespace (applied with ``kubectl -n``) matches by name."""
    hit = table.get((namespace, name), table.get(("", name)))
    if hit is None and not namespace:
        candidates = [value for (_, n), value in table.items() if n == name]
        hit = candidates[0] if len(candidates) == 1 else None
    return hit
