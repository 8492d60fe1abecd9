"""The APISIX stand-in behind nginx: a small HTTP/1.1 server that runs ext-plugin-pre-req through FakeApisix.

nginx proxies every request here, with the client's raw request-target and header lines as sent
(``underscores_in_headers on``, original spelling and case), after its Lua code has put the nginx
variables in ``X-E2E-Var-<name>: =<urlencoded value>`` headers (header absent = variable not found; the
``=`` keeps an empty value distinguishable). The bridge strips those headers, picks the route by the
longest ``$uri`` prefix (APISIX routes by URI), and asks the runner exactly as APISIX's ext-plugin does
(apisix/plugins/ext-plugin/init.lua): ``FakeApisix.request`` with the route's conf, ``$uri`` as path,
the query as ``ngx.req.get_uri_args()`` would give it, the headers as ``ngx.req.get_headers()`` gives
them (names lower-cased, underscores kept, repeats kept, ``host`` = the Host header as sent),
``$remote_addr`` as src_ip, and as ExtraInfo answers the nginx variables plus the APISIX ones nginx does
not know: ``upstream_uri`` (""), ``real_request_uri`` (the raw target) and ``request_uri`` (which
APISIX overwrites with ``$uri`` + ``$is_args`` + ``$args``).

The runner's answer is applied like APISIX applies it: Stop -> that response; an error -> 503;
pass/Rewrite -> a fake upstream answers 200 with a JSON echo of the request it receives, computed
like nginx+APISIX deliver it: the raw request-target, or ``uri_safe_encode(path)`` + the raw query
after a Rewrite with a path (``apisix_uri``); the client's headers in their original spelling minus
the Rewrite's deletions (case-insensitive, otherwise exact: deleting ``x-client-subject`` leaves
``x_client_subject``) plus its sets. The echo also says how real upstream stacks would read that
request (``upstreams.interpret``).

Every response carries ``x-e2e-outcome`` (stop/rewrite/pass/error), ``x-e2e-route`` and ``x-e2e-tries``
so that tests can tell a runner decision from a harness failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote, unquote_to_bytes

from runner.protocol.messages import ConfEntry, Pairs, Rewrite
from runner.testing import ApisixOutcome, FakeApisix, conf
from tests.e2e.apisix_uri import split_target, upstream_target, uri_args
from tests.e2e.upstreams import interpret

__all__ = ["VAR_HEADER_PREFIX", "Bridge", "BridgeRecord", "Route", "apply_args", "apply_rewrite", "delivered_target"]

VAR_HEADER_PREFIX = "x-e2e-var-"
_HEADER_PREFIX = "x-e2e-"
# Hop-by-hop headers nginx itself writes on the proxied request: not the client's.
_PROXY_HEADERS = frozenset({"connection"})
# APISIX never copies these from a Rewrite's resp_headers (ext-plugin init.lua exclude_resp_header).
_EXCLUDED_RESP_HEADERS = frozenset(
    {
        "connection",
        "content-length",
        "transfer-encoding",
        "location",
        "server",
        "www-authenticate",
        "content-encoding",
        "content-type",
        "content-location",
        "content-language",
    }
)
_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 421: "Misdirected Request", 503: "Service Unavailable"}
_MAX_HEAD = 64 * 1024
_MAX_BODY = 1 << 20


@dataclass(frozen=True)
class Route:
    """An APISIX route: URI prefix + the ext-plugin-pre-req conf list."""

    id: str
    prefix: str
    entries: tuple[ConfEntry, ...]

    @classmethod
    def mtls_guard(cls, id: str, prefix: str, policy: Mapping[str, object]) -> Route:
        return cls(id, prefix, conf(("mtls-guard", json.dumps(policy))))

    @property
    def key(self) -> str:
        return f"route#{self.id}#ext-plugin-pre-req#1"


@dataclass(frozen=True)
class BridgeRecord:
    """What the bridge did with one request (for assertions on the harness itself)."""

    route: str
    method: str
    path: str  # what the runner judged: $uri
    outcome: str
    status: int
    tries: int
    error: str = ""
    vars: Mapping[str, str | None] = field(default_factory=dict)  # the ExtraInfo answers on offer
    at: float = field(default_factory=time.monotonic)  # when the bridge answered
    target: str = ""  # the raw request-target nginx received
    upstream_target: str | None = None  # what the upstream received (None: it was not contacted)


def apply_rewrite(headers: Sequence[tuple[str, str]], rewrite: Rewrite | None) -> list[tuple[str, str]]:
    """The request headers the upstream receives after APISIX applied ``rewrite``.

    ``headers`` keep the spelling the client sent. Each Rewrite entry is ``core.request.set_header``:
    names compare case-insensitively but otherwise exactly (``x-client-subject`` is not
    ``x_client_subject``); a value replaces every same-name header, None deletes them all.
    """
    out = list(headers)
    for name, value in rewrite.headers if rewrite is not None else ():
        lower = name.lower()
        index = next((i for i, (n, _) in enumerate(out) if n.lower() == lower), None)
        out = [(n, v) for n, v in out if n.lower() != lower]
        if value is not None:
            out.insert(len(out) if index is None else min(index, len(out)), (name, value))
    return out


def apply_args(query: str, rewrite: Rewrite | None) -> str:
    """``$args`` after a Rewrite's ``args`` (ext-plugin init.lua: the get_uri_args table changed, then
    ``core.request.set_uri_args`` re-encodes it like ``ngx.encode_args``); untouched without args."""
    if rewrite is None or not rewrite.args:
        return query
    table: dict[str, list[str | None]] = {}
    for name, value in uri_args(query):
        table.setdefault(name, []).append(value)
    changed: set[str] = set()
    for name, value in rewrite.args:
        if value is None:
            table.pop(name, None)
        else:
            table[name] = [*table[name], value] if name in changed and name in table else [value]
            changed.add(name)
    return "&".join(
        quote(n, safe="") if v is None else f"{quote(n, safe='')}={quote(v, safe='')}"
        for n, values in table.items()
        for v in values
    )


def delivered_target(raw_target: str, uri: str, rewrite: Rewrite | None) -> str:
    """The request-target the upstream receives after APISIX applied ``rewrite`` (see ``apisix_uri``)."""
    _, query = split_target(raw_target)
    args = apply_args(query, rewrite)
    return upstream_target(raw_target, rewrite.path if rewrite is not None else None, uri=uri, args=args)


class _BadRequest(Exception):
    pass


@dataclass
class _Request:
    method: str
    target: str  # raw, as nginx sent it (UTF-8 with surrogateescape: the bytes survive)
    version: str
    headers: list[tuple[str, str]]  # original spelling and case, in order
    body: bytes

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for n, v in self.headers if n.lower() == "connection" for t in v.split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens


async def _read_request(reader: asyncio.StreamReader) -> _Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if exc.partial.strip():
            raise _BadRequest("truncated request head") from None
        return None
    except asyncio.LimitOverrunError:
        raise _BadRequest("request head too large") from None
    lines = head.decode("utf-8", "surrogateescape").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise _BadRequest(f"bad request line {lines[0]!r}")
    headers: list[tuple[str, str]] = []
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise _BadRequest(f"bad header line {line!r}")
        headers.append((name, value.strip(" \t")))
    if any(n.lower() == "transfer-encoding" for n, _ in headers):
        raise _BadRequest("chunked request bodies are not supported (nginx buffers bodies)")
    lengths = {v for n, v in headers if n.lower() == "content-length"}
    if len(lengths) > 1 or any(not v.isdigit() for v in lengths):
        raise _BadRequest("bad content-length")
    length = int(next(iter(lengths), "0"))
    if length > _MAX_BODY:
        raise _BadRequest("body too large")
    body = await reader.readexactly(length) if length else b""
    return _Request(parts[0], parts[1], parts[2], headers, body)


def _decode_var(value: str) -> str | None:
    if not value.startswith("="):
        return None
    return unquote_to_bytes(value[1:]).decode("utf-8", "surrogateescape")


class Bridge:
    """The HTTP server plus one FakeApisix ("one APISIX worker"), on its own event loop thread."""

    def __init__(self, runner_socket: str, routes: Sequence[Route], *, timeout: float = 5.0) -> None:
        self.runner_socket = runner_socket
        self.routes = sorted(routes, key=lambda r: len(r.prefix), reverse=True)
        self.timeout = timeout
        self.records: list[BridgeRecord] = []
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._apisix: FakeApisix | None = None
        self._server: asyncio.AbstractServer | None = None
        self._stopped: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._conns: set[asyncio.StreamWriter] = set()

    # -- lifecycle (called from the test thread) ------------------------------------------------
    def start(self) -> Bridge:
        self._thread = threading.Thread(target=self._thread_main, name="e2e-bridge", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("bridge did not start")
        if self._error is not None:
            raise RuntimeError(f"bridge failed to start: {self._error!r}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._stopped is not None and self._thread is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stopped.set)
            self._thread.join(10)

    def __enter__(self) -> Bridge:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def prepare_count(self) -> int:
        return 0 if self._apisix is None else self._apisix.prepare_count

    def route_for(self, path: str) -> Route:
        for route in self.routes:
            if path.startswith(route.prefix):
                return route
        raise LookupError(f"no route for {path!r}")

    # -- event loop thread ----------------------------------------------------------------------
    def _thread_main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._main())
        except BaseException as exc:  # surfaced by start()
            self._error = exc
            self._ready.set()
        finally:
            loop.close()

    async def _main(self) -> None:
        self._stopped = asyncio.Event()
        self._apisix = FakeApisix(self.runner_socket, timeout=self.timeout)
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=_MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        try:
            await self._stopped.wait()
        finally:
            self._server.close()
            for writer in list(self._conns):
                writer.close()
            await self._server.wait_closed()
            await self._apisix.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._conns.add(writer)
        try:
            while True:
                try:
                    request = await _read_request(reader)
                except _BadRequest as exc:
                    await self._send(writer, 400, [("x-e2e-outcome", "bad-request")], f"{exc}\n".encode(), "GET")
                    return
                if request is None:
                    return
                status, headers, body = await self._handle(request)
                await self._send(writer, status, headers, body, request.method, keep_alive=request.keep_alive)
                if not request.keep_alive:
                    return
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self._conns.discard(writer)
            writer.close()

    async def _send(
        self,
        writer: asyncio.StreamWriter,
        status: int,
        headers: list[tuple[str, str]],
        body: bytes,
        method: str,
        *,
        keep_alive: bool = False,
    ) -> None:
        lines = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}"]
        lines += [f"{n}: {v}" for n, v in headers]
        lines.append(f"content-length: {len(body)}")
        lines.append("connection: keep-alive" if keep_alive else "connection: close")
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        if method != "HEAD":
            writer.write(body)
        await writer.drain()

    async def _handle(self, request: _Request) -> tuple[int, list[tuple[str, str]], bytes]:
        assert self._apisix is not None
        nginx_vars: dict[str, str | None] = {}
        sent: list[tuple[str, str]] = []  # the client's headers as nginx proxied them (spelling kept)
        for name, value in request.headers:
            lower = name.lower()
            if lower.startswith(VAR_HEADER_PREFIX):
                nginx_vars[lower[len(VAR_HEADER_PREFIX) :]] = _decode_var(value)
            elif not lower.startswith(_HEADER_PREFIX) and lower not in _PROXY_HEADERS:
                sent.append((name, value))
        path = nginx_vars.get("uri")
        if path is None:
            return 500, [("x-e2e-outcome", "harness-error")], b"nginx did not send $uri\n"
        if nginx_vars.get("request_uri") != request.target:
            # proxy_pass without a URI must forward the request-target exactly as the client sent it.
            detail = f"nginx forwarded {request.target!r} for $request_uri {nginx_vars.get('request_uri')!r}\n"
            return 500, [("x-e2e-outcome", "harness-error")], detail.encode("utf-8", "surrogateescape")
        _, query = split_target(request.target)
        apisix_vars = {
            **nginx_vars,
            # APISIX variables (apisix/init.lua http_access_phase; ngx_tpl.lua sets $upstream_uri '').
            "upstream_uri": "",
            "real_request_uri": request.target,
            "request_uri": path + (f"?{query}" if query else ""),
        }
        route = self.route_for(path)
        common = [("x-e2e-route", route.id)]
        # ngx.req.get_headers(): lower-cased names (underscores kept), repeats kept; "host" is
        # $upstream_host, which is $http_host at this point: the Host header as sent.
        runner_headers: Pairs = tuple((name.lower(), value) for name, value in sent)
        try:
            outcome = await self._apisix.request(
                route.entries,
                key=route.key,
                method=request.method,
                path=path,
                headers=runner_headers,
                args=uri_args(query),
                src_ip=nginx_vars.get("remote_addr"),
                vars=apisix_vars,
            )
        except Exception as exc:
            # APISIX: "failed to connect to the unix socket" / read errors -> 503 (allow_degradation false).
            self._record(route, request, path, "error", 503, 0, f"{type(exc).__name__}: {exc}", apisix_vars)
            headers = [*common, ("x-e2e-outcome", "error"), ("x-e2e-error", type(exc).__name__)]
            return 503, headers, b"503 Service Temporarily Unavailable\n"
        return self._apply(route, request, path, sent, apisix_vars, outcome, common)

    def _apply(
        self,
        route: Route,
        request: _Request,
        path: str,
        sent: Sequence[tuple[str, str]],
        apisix_vars: Mapping[str, str | None],
        outcome: ApisixOutcome,
        common: list[tuple[str, str]],
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        common = [*common, ("x-e2e-outcome", outcome.kind), ("x-e2e-tries", str(outcome.tries))]
        if outcome.kind == "stop":
            assert outcome.stop is not None
            status = outcome.stop.status or 200
            self._record(route, request, path, "stop", status, outcome.tries, "", apisix_vars)
            headers = [(n.lower(), v) for n, v in outcome.stop.headers]
            return status, [*headers, *common], outcome.stop.body
        if outcome.kind == "error":
            code = outcome.error.name if outcome.error is not None else "?"
            self._record(route, request, path, "error", 503, outcome.tries, code, apisix_vars)
            return 503, [*common, ("x-e2e-error", code)], b"503 Service Temporarily Unavailable\n"
        rewrite = outcome.rewrite
        target = delivered_target(request.target, path, rewrite)
        headers = apply_rewrite(sent, rewrite)
        upstream: dict[str, Any] = {
            "route": route.id,
            "method": request.method,
            "path": target,  # the request-target the upstream receives (path and query)
            "headers": headers,  # as the upstream receives them: original spelling, repeats kept
            "body_length": len(request.body),
            "judged_path": path,  # HTTPReqCall.path: what the plugin decided on
            "rewrite": {
                "path": rewrite.path if rewrite is not None else None,
                "headers": list(rewrite.headers) if rewrite is not None else [],
            },
            **interpret(request.method, target, headers),
        }
        resp_headers = [
            (n.lower(), v)
            for n, v in (rewrite.resp_headers if rewrite is not None else ())
            if n.lower() not in _EXCLUDED_RESP_HEADERS
        ]
        self._record(route, request, path, outcome.kind, 200, outcome.tries, "", apisix_vars, target)
        body = json.dumps(upstream).encode()
        return 200, [("content-type", "application/json"), *resp_headers, *common], body

    def _record(
        self,
        route: Route,
        request: _Request,
        path: str,
        outcome: str,
        status: int,
        tries: int,
        error: str,
        apisix_vars: Mapping[str, str | None],
        upstream: str | None = None,
    ) -> None:
        record = BridgeRecord(
            route.id,
            request.method,
            path,
            outcome,
            status,
            tries,
            error,
            dict(apisix_vars),
            target=request.target,
            upstream_target=upstream,
        )
        self.records.append(record)
