"""Reading ``mtls-guard lint``'s input files: bounded UTF-8 text, parsed as YAML or JSON.

YAML may hold several documents (``---``, as kubectl reads them); every mapping remembers the line it
starts on so findings can point into the file. Both parsers record duplicate keys instead of silently
keeping the last copy, because APISIX's YAML and JSON readers disagree on which one wins. What the
documents mean is :mod:`.lint_load`'s business; a file that cannot be read or parsed at all is an
:class:`InputError`.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import yaml

__all__ = ["MAX_FILE_BYTES", "InputError", "ParsedFile", "parse_file"]

MAX_FILE_BYTES: Final = 32 << 20


class InputError(Exception):
    """A file cannot be read or parsed at all (exit code 2)."""


class _LocatedDict(dict[Any, Any]):
    """A mapping that remembers the YAML line it started on, so findings can point into the file."""

    line: int | None = None


class _Loader(yaml.SafeLoader):
    """SafeLoader recording duplicate keys (lint reports them) and the line of every mapping."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self.duplicates: list[tuple[str, int | None]] = []

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable) and key in seen:
                self.duplicates.append((f"duplicate key {key!r}", key_node.start_mark.line + 1))
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _construct_located_map(loader: _Loader, node: yaml.MappingNode) -> Iterator[_LocatedDict]:
    # Two-step construction like PyYAML's own: the empty mapping is yielded first so recursive
    # structures (anchors referring to themselves) resolve.
    data = _LocatedDict()
    data.line = node.start_mark.line + 1
    yield data
    data.update(loader.construct_mapping(node))


_Loader.add_constructor("tag:yaml.org,2002:map", _construct_located_map)


def _parse_yaml(text: str, path: str) -> tuple[list[object], list[tuple[str, int | None]]]:
    loader = _Loader(text)
    try:
        documents = []
        while loader.check_data():  # type: ignore[no-untyped-call]  # "---"-separated documents, as kubectl reads
            documents.append(loader.get_data())
        return [d for d in documents if d is not None] or [None], loader.duplicates
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or " ".join(str(exc).split())
        raise InputError(f"{path}: invalid YAML{where}: {problem}") from None
    finally:
        loader.dispose()


def _parse_json(text: str, path: str) -> tuple[list[object], list[tuple[str, int | None]]]:
    duplicates: list[tuple[str, int | None]] = []

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in items:
            if key in out:
                duplicates.append((f"duplicate key {key!r}", None))
            out[key] = value
        return out

    try:
        return [json.loads(text, object_pairs_hook=pairs)], duplicates
    except json.JSONDecodeError as exc:
        raise InputError(f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def _read(path: str) -> str:
    try:
        p = Path(path)
        if p.stat().st_size > MAX_FILE_BYTES:
            raise InputError(f"{path}: larger than {MAX_FILE_BYTES} bytes")
        return p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{path}: is a directory") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InputError(f"{path}: not UTF-8 text") from None


def _format_of(path: str, text: str) -> str:
    suffix = Path(path).suffix.lower()
    if suffix == ".json":
        return "json"
    if suffix in (".yaml", ".yml"):
        return "yaml"
    return "json" if text.lstrip()[:1] in ("{", "[") else "yaml"


@dataclass(frozen=True, slots=True)
class ParsedFile:
    """One input file: its text (the caller looks for APISIX's ``#END`` in it), its documents, and the
    duplicate keys met while parsing them (with their lines when YAML)."""

    path: str
    format: str
    text: str
    documents: list[object]
    duplicates: list[tuple[str, int | None]]


def parse_file(path: str) -> ParsedFile:
    """Read and parse ``path``; :class:`InputError` when it cannot be read or parsed at all."""
    text = _read(path)
    fmt = _format_of(path, text)
    documents, duplicates = _parse_yaml(text, path) if fmt == "yaml" else _parse_json(text, path)
    return ParsedFile(path, fmt, text, documents, duplicates)
