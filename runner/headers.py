"""Header and query-argument views for plugins, and the check applied to header names they set."""

from __future__ import annotations

from .protocol.messages import Pairs

__all__ = ["Headers", "header_name", "text"]


class Headers:
    """Read-only multi-valued view of ``(name, value)`` pairs; lookups are case-insensitive."""

    __slots__ = ("_index", "_pairs")

    def __init__(self, pairs: Pairs) -> None:
        self._pairs = pairs
        self._index: dict[str, list[str | None]] | None = None

    def _lookup(self) -> dict[str, list[str | None]]:
        if self._index is None:
            index: dict[str, list[str | None]] = {}
            for name, value in self._pairs:
                index.setdefault(name.lower(), []).append(value)
            self._index = index
        return self._index

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first value of ``name`` (a flag without value gives ``default``)."""
        values = self._lookup().get(name.lower())
        if not values or values[0] is None:
            return default
        return values[0]

    def get_all(self, name: str) -> tuple[str | None, ...]:
        return tuple(self._lookup().get(name.lower(), ()))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._lookup()

    def __len__(self) -> int:
        return len(self._pairs)

    @property
    def pairs(self) -> Pairs:
        return self._pairs


def text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", "surrogateescape")


_HEADER_NAME_CACHE_SIZE = 1024
_header_names: dict[str, str] = {}


def header_name(name: str) -> str:
    """``name`` lower-cased, or ValueError for a name that would corrupt the request. Names come
    from plugin code and configuration, so they repeat: each is checked once (bounded cache)."""
    lowered = _header_names.get(name)
    if lowered is not None:
        return lowered
    if not isinstance(name, str) or not name or any(c in name for c in "\r\n:\x00 "):
        raise ValueError(f"invalid header name {name!r}")
    lowered = name.lower()
    if len(_header_names) >= _HEADER_NAME_CACHE_SIZE:
        _header_names.clear()
    _header_names[name] = lowered
    return lowered
