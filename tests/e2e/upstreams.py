"""How real upstream stacks would read the request the fake upstream received (the echo's ``frameworks``).

The guard decides on one reading of the request (APISIX's ``$uri``, its method, its lower-cased headers);
the upstream acts on another. These models make the other readings visible, generously: a reading
that is more lenient than a given framework's default is kept, since some deployment has it.

``express``       splits the raw path on "/" first, then percent-decodes each segment on its own (so
                  ``%2F`` stays inside its segment); ``..`` segments are not resolved.
``wsgi``          percent-decodes the whole path once, then merges slashes and resolves dot segments
                  (PEP 3333 PATH_INFO, static-file handlers that normalise).
``servlet``       strips ``;params`` from every raw segment, then decodes, then resolves dot segments.
``double_decode`` decodes twice (a proxy hop or a framework that decodes what it was handed), then
                  resolves dot segments.
``windows``       decodes once, applies NFKC (Windows "best fit" / Unicode-normalising stacks), reads
                  ``\\`` as ``/``, resolves dot segments and compares case-insensitively (IIS, ASP.NET).

For each: ``segments`` (the non-empty segments after that reading), ``resource`` (the first one, "" for
the root) and ``method``: the method the framework acts on after method-override headers
(``X-HTTP-Method-Override``, ``X-HTTP-Method``, ``X-Method-Override``, matched after lower-casing and
mapping "_" to "-") or a ``_method`` query argument, honoured whatever the request method.

``cgi_headers`` folds header names the CGI/WSGI/PHP/Rack way (upper-case, "-" and "_" both "_") and
keeps every value: ``X-Client-Subject`` and ``x_client_subject`` are the same variable there.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Sequence
from typing import Any, Final

from tests.e2e.apisix_uri import split_target, uri_args

__all__ = ["FRAMEWORKS", "cgi_fold", "cgi_headers", "effective_methods", "interpret"]

OVERRIDE_HEADERS: Final = frozenset({"x-http-method-override", "x-http-method", "x-method-override"})
_HEX_ESCAPE: Final = re.compile(rb"%([0-9A-Fa-f]{2})")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _decode(text: str) -> str:
    """Percent-decode once; an invalid escape ("%zz", a trailing "%") stays as it is."""
    return _text(_HEX_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), _bytes(text)))


def _resolve(path: str) -> list[str]:
    """Merge slashes and resolve "." and ".." (never above the root); the non-empty segments remain."""
    out: list[str] = []
    for segment in path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            if out:
                out.pop()
            continue
        out.append(segment)
    return out


def _express(path: str) -> list[str]:
    return [s for s in (_decode(raw) for raw in path.split("/")) if s]


def _wsgi(path: str) -> list[str]:
    return _resolve(_decode(path))


def _servlet(path: str) -> list[str]:
    return _resolve(_decode("/".join(segment.partition(";")[0] for segment in path.split("/"))))


def _double_decode(path: str) -> list[str]:
    return _resolve(_decode(_decode(path)))


def _windows(path: str) -> list[str]:
    folded = unicodedata.normalize("NFKC", _decode(path)).replace("\\", "/")
    return [s.lower() for s in _resolve(folded)]


FRAMEWORKS: Final[dict[str, Callable[[str], list[str]]]] = {
    "express": _express,
    "wsgi": _wsgi,
    "servlet": _servlet,
    "double_decode": _double_decode,
    "windows": _windows,
}


def cgi_fold(name: str) -> str:
    """A header name as a CGI/WSGI/PHP/Rack variable sees it (without the ``HTTP_`` prefix)."""
    return name.upper().replace("-", "_")


def cgi_headers(headers: Sequence[tuple[str, str]]) -> dict[str, list[str]]:
    folded: dict[str, list[str]] = {}
    for name, value in headers:
        folded.setdefault(cgi_fold(name), []).append(value)
    return folded


def effective_methods(method: str, query: str, headers: Sequence[tuple[str, str]]) -> list[str]:
    """Every method some framework would act on: the overrides when there are any, else ``method``."""
    overrides = [v.strip().upper() for n, v in headers if n.lower().replace("_", "-") in OVERRIDE_HEADERS]
    # Some stacks (older Python cgi, several Java and Perl ones) also split the query on ";".
    overrides += [(v or "").strip().upper() for n, v in uri_args(query.replace(";", "&")) if n == "_method"]
    found = list(dict.fromkeys(m for m in overrides if m))
    return found or [method.upper()]


def interpret(method: str, target: str, headers: Sequence[tuple[str, str]]) -> dict[str, Any]:
    """The echo's ``frameworks``, ``effective_methods`` and ``cgi_headers`` for one delivered request."""
    path, query = split_target(target)
    methods = effective_methods(method, query, headers)
    readings = {}
    for name, read in FRAMEWORKS.items():
        segments = read(path)
        readings[name] = {"segments": segments, "resource": segments[0] if segments else "", "method": methods[0]}
    return {"frameworks": readings, "effective_methods": methods, "cgi_headers": cgi_headers(headers)}
