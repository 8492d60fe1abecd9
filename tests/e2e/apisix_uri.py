"""What APISIX does with the request-target: the request line the upstream receives, and HTTPReqCall's args.

Strings hold raw bytes as UTF-8 with ``surrogateescape`` (like the runner's codec), so a target that is
not valid UTF-8 survives the round trip byte for byte.

* ``$upstream_uri`` empty (the default, ngx_tpl.lua ``set $upstream_uri '';``): ``proxy_pass
  $upstream_scheme://apisix_backend$upstream_uri`` sends the client's raw request-target unchanged.
* A runner Rewrite with ``path`` P (apisix/plugins/ext-plugin/init.lua, APISIX 3.18):
  ``var.upstream_uri = uri_safe_encode(P) .. (var.is_args or '') .. (var.args or '')``, so the raw
  query follows the re-encoded path.
* HTTPReqCall.args: ``core.request.get_uri_args(ctx)`` (``ngx.req.get_uri_args``), see ``uri_args``.
"""

from __future__ import annotations

import re
from typing import Final

# One copy of APISIX's uri_safe_encode, shipped with the runner's fake APISIX peer.
from runner.testing import uri_safe_encode

__all__ = ["split_target", "upstream_target", "uri_args", "uri_safe_encode"]

_HEX_ESCAPE: Final = re.compile(rb"%([0-9A-Fa-f]{2})")


def _bytes(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def split_target(target: str) -> tuple[str, str]:
    """(path, query) of a raw request-target; the query is "" when there is none (nginx's ``$args``)."""
    path, _, query = target.partition("?")
    return path, query


def upstream_target(raw_target: str, rewrite_path: str | None, *, uri: str = "", args: str | None = None) -> str:
    """The request-target the upstream receives.

    ``rewrite_path``: the runner Rewrite's path (None: none). ``args``: ``$args`` after a Rewrite changed
    the arguments (None: unchanged); ``uri``: ``$uri``, only used in that case, where nginx no longer
    sends the unparsed target but the escaped ``$uri`` and the new arguments.
    """
    _, query = split_target(raw_target)
    new_args = query if args is None else args
    if rewrite_path is None and new_args == query:
        return raw_target  # $upstream_uri is "": nginx proxies the request-target as the client sent it
    base = uri_safe_encode(rewrite_path if rewrite_path is not None else uri)
    # $is_args is "?" only when $args is not empty.
    return base + (f"?{new_args}" if new_args else "")


def _unescape(raw: bytes) -> bytes:
    return _HEX_ESCAPE.sub(lambda m: bytes([int(m.group(1), 16)]), raw.replace(b"+", b" "))


def uri_args(query: str) -> tuple[tuple[str, str | None], ...]:
    """HTTPReqCall.args as APISIX builds them from ``ngx.req.get_uri_args()``: names and values unescaped
    ("+" is a space), a bare ``name`` is a flag (no value), repeated names grouped in first-seen order
    (a Lua table keeps one entry per name), empty names dropped, at most 100 arguments."""
    grouped: dict[str, list[str | None]] = {}
    for part in _bytes(query).split(b"&")[:100]:
        if not part:
            continue
        name, sep, value = part.partition(b"=")
        if not name:
            continue
        grouped.setdefault(_text(_unescape(name)), []).append(_text(_unescape(value)) if sep else None)
    return tuple((name, value) for name, values in grouped.items() for value in values)
