"""Read what a running APISIX serves, from its Admin API (``mtls-guard lint --admin-url``).

Wire shapes, from APISIX 3.x's source (apache/apisix, read through the code search):

* ``GET {url}/apisix/admin/<kind>`` answers ``{"total": n, "list": [{"key": "/apisix/<kind>/<id>",
  "value": {...}, "createdIndex": i, "modifiedIndex": j}]}``: items from ``apisix/core/etcd.lua``
  (``kvs_to_node``), ``total`` counted over every item before paging (``apisix/admin/v3_adapter.lua``,
  ``filter``). Old releases encode an empty list as ``{}``.
* Paging (v3_adapter.lua ``pagination``): query ``page`` (from 1) and ``page_size`` (10..500, else 400
  "page_size must be between 10 and 500"); items sorted by createdIndex; a page past the end is empty.
* The key goes in the ``X-API-KEY`` header (``apisix/admin/init.lua``, ``check_token``); a missing or
  wrong key is 401.
* A kind whose etcd directory does not exist is 404 ``{"message": "Key not found"}`` (etcd.lua
  ``not_found``): that kind simply has no objects.
* The 2.x shape ``{"node": {"nodes": [...]}}`` is accepted too; it has no paging.

Only the standard library is used. Redirects are not followed and proxies are not used: either would
hand the admin key to another party. Every failure is one ``AdminError`` line (exit code 2) that
names the URL and never the key.
"""

from __future__ import annotations

import http.client
import json
import ssl
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["DEFAULT_KEY_ENV", "KINDS", "AdminError", "AdminSnapshot", "admin_base", "fetch_admin"]

KINDS: Final = ("routes", "services", "plugin_configs", "global_rules", "ssls")
DEFAULT_KEY_ENV: Final = "APISIX_ADMIN_KEY"
PAGE_SIZE: Final = 500  # the largest page APISIX accepts: fewest round trips
_MAX_PAGES: Final = 10_000
_MAX_BODY: Final = 32 << 20


class AdminError(Exception):
    """The Admin API could not be read (exit code 2). One line; never contains the key."""


@dataclass(frozen=True, slots=True)
class AdminSnapshot:
    url: str
    objects: dict[str, list[object]]  # kind -> objects (with "id"), in APISIX's order


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # urllib then raises HTTPError with the 3xx status, reported below


def admin_base(url: str) -> str:
    """``http(s)://host:port[/prefix]``; a trailing ``/apisix/admin`` is accepted and dropped."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise AdminError("--admin-url must not carry credentials; pass the key with --admin-key-env VAR")
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.query or parts.fragment:
        raise AdminError(f"--admin-url {url!r}: expected http(s)://host:port, e.g. http://127.0.0.1:9180")
    path = parts.path.rstrip("/")
    path = path.removesuffix("/apisix/admin")
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", ""))


def _reason(reason: object, timeout: float) -> str:
    if isinstance(reason, ssl.SSLCertVerificationError):
        return f"TLS certificate verification failed ({reason.verify_message})"
    if isinstance(reason, ssl.SSLError):
        return f"TLS error ({reason.reason or reason})"
    if isinstance(reason, ConnectionRefusedError):
        return "connection refused (is the Admin API listening there? APISIX's default is port 9180)"
    if isinstance(reason, TimeoutError):
        return f"no answer within {timeout:g} s"
    if isinstance(reason, OSError):
        return reason.strerror or str(reason)
    return str(reason)


def _error_text(body: bytes) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    text = data.get("error_msg") or data.get("message") if isinstance(data, Mapping) else None
    return f": {' '.join(str(text).split())[:200]}" if text else ""


class _Client:
    def __init__(self, base: str, key: str | None, key_env: str | None, timeout: float, page_size: int) -> None:
        self.base = base
        self.key_env = key_env
        self.timeout = timeout
        self.page_size = page_size
        self.headers = {"Accept": "application/json", "User-Agent": "mtls-guard-lint"}
        if key is not None:
            if not key.isascii() or not key.isprintable():
                raise AdminError(f"the admin key in ${key_env} holds characters an HTTP header cannot carry")
            self.headers["X-API-KEY"] = key
        self.opener = urllib.request.build_opener(
            urllib.request.ProxyHandler({}),
            _NoRedirect(),
            urllib.request.HTTPSHandler(context=ssl.create_default_context()),
        )

    def get(self, url: str) -> object | None:
        """The decoded JSON answer; None for APISIX's "Key not found" (a kind that has no objects)."""
        request = urllib.request.Request(url, headers=self.headers, method="GET")  # noqa: S310 -- scheme checked
        try:
            with self.opener.open(request, timeout=self.timeout) as response:
                body = response.read(_MAX_BODY + 1)
        except urllib.error.HTTPError as exc:
            with exc:
                body = exc.read(_MAX_BODY)
            if exc.code == 404 and _error_text(body) == ": Key not found":
                return None
            raise AdminError(f"GET {url}: {self._status(exc, body)}") from None
        except urllib.error.URLError as exc:
            raise AdminError(f"GET {url}: {_reason(exc.reason, self.timeout)}") from None
        except (TimeoutError, http.client.HTTPException, OSError) as exc:
            what = _reason(exc, self.timeout) if isinstance(exc, OSError) else f"broken HTTP answer ({exc!r})"
            raise AdminError(f"GET {url}: {what}") from None
        if len(body) > _MAX_BODY:
            raise AdminError(f"GET {url}: answer larger than {_MAX_BODY} bytes")
        try:
            data: object = json.loads(body)
        except ValueError:
            raise AdminError(f"GET {url}: the answer is not JSON (is this APISIX's Admin API?)") from None
        return data

    def _status(self, exc: urllib.error.HTTPError, body: bytes) -> str:
        head = f"HTTP {exc.code} {exc.reason}"
        if exc.code == 401:
            sent = f"the key from ${self.key_env}" if self.key_env else "no key (none was configured)"
            return f"{head}: the Admin API refused {sent}; check deployment.admin.admin_key"
        if exc.code == 403:
            return f"{head}: refused (the key's role, or deployment.admin.allow_admin does not list this address)"
        if exc.code == 404:
            return f"{head}: no Admin API here; give the base URL, e.g. http://127.0.0.1:9180"
        if 300 <= exc.code < 400:
            return f"{head}: redirected to {exc.headers.get('Location')!r}, not followed (the key would go along)"
        return head + _error_text(body)

    def objects(self, kind: str) -> list[object]:
        collected: dict[str, object] = {}
        for page in range(1, _MAX_PAGES + 1):
            url = f"{self.base}/apisix/admin/{kind}?page={page}&page_size={self.page_size}"
            items, total, paged = _page(self.get(url), url)
            new = {k: item for k, item in ((_identity(i), i) for i in items) if k not in collected}
            collected.update(new)
            # A server that ignores paging sends the same items again: nothing new ends the walk too.
            if not paged or not new or len(items) < self.page_size or (total is not None and len(collected) >= total):
                return [_unwrap(item) for item in collected.values()]
        raise AdminError(f"GET {self.base}/apisix/admin/{kind}: more than {_MAX_PAGES} pages")


def _page(body: object, url: str) -> tuple[list[object], int | None, bool]:
    """(items, total or None, whether the shape pages)."""
    if body is None:
        return [], 0, False
    if isinstance(body, Mapping):
        items = body.get("list")
        if isinstance(items, list) or items == {}:
            total = body.get("total")
            return list(items or []), total if isinstance(total, int) and not isinstance(total, bool) else None, True
        node = body.get("node")
        if isinstance(node, Mapping):
            nodes = node.get("nodes")
            return (list(nodes) if isinstance(nodes, list) else []), None, False
    raise AdminError(f'GET {url}: unexpected answer (expected {{"total": n, "list": [...]}})')


def _identity(item: object) -> str:
    key = item.get("key") if isinstance(item, Mapping) else None
    return key if isinstance(key, str) else json.dumps(item, sort_keys=True, default=str)


def _unwrap(item: object) -> object:
    """The stored object, its id filled in from the etcd key (the key prefix is configurable)."""
    if not isinstance(item, Mapping) or not isinstance(item.get("value"), Mapping):
        return item
    value = dict(item["value"])
    if "id" not in value and isinstance(item.get("key"), str):
        value["id"] = item["key"].rstrip("/").rsplit("/", 1)[-1]
    return value


def fetch_admin(
    url: str, key: str | None, *, key_env: str | None = None, timeout: float = 10.0, page_size: int = PAGE_SIZE
) -> AdminSnapshot:
    """Every route, service, plugin config, global rule and SSL object; raises AdminError."""
    if not 10 <= page_size <= 500:
        raise ValueError("APISIX accepts page_size 10..500")
    client = _Client(admin_base(url), key, key_env, timeout, page_size)
    return AdminSnapshot(client.base, {kind: client.objects(kind) for kind in KINDS})
