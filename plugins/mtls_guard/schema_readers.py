"""The building blocks of strict policy validation: :class:`PolicyError`, which names the offending key
path, and readers for the JSON/YAML value types that raise it.

Shared by :mod:`.schema` (one policy) and :mod:`.library` (the policy file around named policies), so
that every document error reads the same way: ``require.san.dns[1]: must be a string, not a list``.
Each reader takes the value and its key path and returns the value checked, or raises.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Final, TypeVar

__all__ = [
    "PolicyError",
    "join_path",
    "parsed_reader",
    "read_bool",
    "read_list",
    "read_object",
    "read_optional",
    "read_str",
]

_T = TypeVar("_T")
_D = TypeVar("_D")

MAX_LIST: Final = 1024
_PRINTABLE: Final = re.compile(r"[\x20-\x7e]*\Z")


class PolicyError(ValueError):
    """A policy document is invalid; ``path`` is the offending key path ("" for the document)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


def join_path(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def read_object(value: object, path: str, allowed: frozenset[str]) -> Mapping[str, object]:
    """``value`` as an object whose keys are strings from ``allowed`` (else PolicyError at that key)."""
    if not isinstance(value, Mapping):
        raise PolicyError(path, f"must be an object, not {_type_name(value)}")
    for key in value:
        if not isinstance(key, str):
            raise PolicyError(path, f"keys must be strings, not {_type_name(key)}")
        if key not in allowed:
            raise PolicyError(join_path(path, key), f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return value


def read_str(value: object, path: str, *, max_len: int = 256, printable: bool = True) -> str:
    if not isinstance(value, str):
        raise PolicyError(path, f"must be a string, not {_type_name(value)}")
    if not value:
        raise PolicyError(path, "must not be empty")
    if len(value) > max_len:
        raise PolicyError(path, f"longer than {max_len} characters")
    if printable and not _PRINTABLE.match(value):
        raise PolicyError(path, "must be printable ASCII")
    return value


def read_bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(path, f"must be true or false, not {_type_name(value)}")
    return value


def read_list(value: object, path: str, item: Callable[[object, str], _T], *, unique: bool = True) -> tuple[_T, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise PolicyError(path, f"must be a list, not {_type_name(value)}")
    if not value:
        raise PolicyError(path, "must not be empty")
    if len(value) > MAX_LIST:
        raise PolicyError(path, f"more than {MAX_LIST} entries")
    out = tuple(item(v, join_path(path, i)) for i, v in enumerate(value))
    if unique:
        seen: set[object] = set()
        for i, v in enumerate(out):
            if isinstance(v, Hashable) and v in seen:
                raise PolicyError(join_path(path, i), "duplicate entry")
            seen.add(v)
    return out


def read_optional(
    m: Mapping[str, object], path: str, key: str, read: Callable[[object, str], _T], default: _D
) -> _T | _D:
    """``read`` the optional ``key`` of ``m`` (with its key path), or ``default`` when absent."""
    return read(m[key], join_path(path, key)) if key in m else default


def parsed_reader(parse: Callable[[str], _T], max_len: int = 512) -> Callable[[object, str], _T]:
    """Adapt a matchers.parse_* function (ValueError) into an item reader (PolicyError with path)."""

    def read(value: object, path: str) -> _T:
        try:
            return parse(read_str(value, path, max_len=max_len))
        except ValueError as exc:
            if isinstance(exc, PolicyError):
                raise
            raise PolicyError(path, str(exc)) from None

    return read
