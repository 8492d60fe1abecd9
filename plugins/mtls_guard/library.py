"""The runner's policy file: named policies that route confs refer to with ``{"policy": "<name>"}``.

Loading validates every named policy (through :func:`schema.parse_policy`) and freezes the result,
so a broken file fails at start-up rather than on the first request of some route. YAML is read with
a loader that rejects duplicate keys, for the same reason the schema rejects unknown ones.
"""

from __future__ import annotations

import os
import re
from collections.abc import Hashable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import yaml

from .schema import parse_policy
from .schema_readers import PolicyError, join_path, read_object

__all__ = ["PolicyLibrary"]

_POLICY_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")


def _frozen(value: object) -> object:
    if isinstance(value, Mapping):
        return MappingProxyType({k: _frozen(v) for k, v in value.items()})
    if isinstance(value, list | tuple):
        return tuple(_frozen(v) for v in value)
    return value


def _freeze(value: object) -> Mapping[str, object]:
    """Deep read-only copy (mappings -> MappingProxyType, lists -> tuples) so a library cannot drift."""
    frozen = _frozen(value)
    assert isinstance(frozen, Mapping)
    return frozen


def _located(exc: PolicyError, source: str) -> PolicyError:
    """The same error, prefixed with the file it came from; ``path`` keeps the key path."""
    located = PolicyError("", f"{source}: {exc}")
    located.path = exc.path
    return located


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        keys: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in keys:
                line, column = key_node.start_mark.line + 1, key_node.start_mark.column + 1
                raise PolicyError("", f"duplicate key {key!r} at line {line} column {column}")
            keys.add(key)
        return super().construct_mapping(node, deep=deep)


@dataclass(frozen=True, slots=True)
class PolicyLibrary:
    """Named policies from the runner's policy file.

    ``defaults`` apply to every named policy; a route conf ``{"policy": "<name>", ...}`` is the shallow
    merge defaults < named policy < route keys, per top-level key. Routes that name no policy are not
    affected by the file. Every part is validated when the library is built, so a broken file fails at
    start-up, not on the first request of some route.
    """

    defaults: Mapping[str, object]
    policies: Mapping[str, Mapping[str, object]]
    source: str = "<policies>"

    @classmethod
    def from_mapping(cls, data: object, *, source: str = "<policies>") -> PolicyLibrary:
        try:
            top = read_object(data, "", frozenset({"defaults", "policies"}))
            defaults = top.get("defaults", {})
            parse_policy(defaults, "defaults")
            policies = top.get("policies", {})
            if not isinstance(policies, Mapping):
                raise PolicyError("policies", "must be an object of name -> policy")
            for name, policy in policies.items():
                if not isinstance(name, str) or not _POLICY_NAME.match(name):
                    raise PolicyError(join_path("policies", str(name)), "names are [A-Za-z0-9_.-], at most 128")
                parse_policy(policy, join_path("policies", name))
        except PolicyError as exc:
            raise _located(exc, source) from None
        return cls(_freeze(defaults), MappingProxyType({n: _freeze(p) for n, p in policies.items()}), source)

    @classmethod
    def from_yaml_file(cls, path: str | os.PathLike[str]) -> PolicyLibrary:
        name = os.fspath(path)
        try:
            with open(name, encoding="utf-8") as handle:
                data = yaml.load(handle, Loader=_StrictLoader)  # noqa: S506 - _StrictLoader is a SafeLoader
        except OSError as exc:
            raise PolicyError("", f"{name}: cannot read policy file: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise PolicyError("", f"{name}: policy file is not UTF-8") from None
        except PolicyError as exc:
            raise _located(exc, name) from None
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
            problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
            raise PolicyError("", f"{name}: invalid YAML{where}: {problem}") from None
        return cls.from_mapping({} if data is None else data, source=name)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self.policies))

    def resolve(self, route: Mapping[str, object]) -> tuple[dict[str, object], str]:
        """Merge a route conf that names a policy; returns (merged policy object, policy name)."""
        name = route["policy"]
        if not isinstance(name, str) or name not in self.policies:
            known = ", ".join(self.names()) or "none"
            raise PolicyError("policy", f"unknown policy {name!r} in {self.source} (known: {known})")
        merged = {**self.defaults, **self.policies[name]}
        merged.update((k, v) for k, v in route.items() if k != "policy")
        return merged, name
