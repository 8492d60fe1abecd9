"""The APISIX stand-in behind nginx: a small HTTP/1.1 server that runs ext-plugin-pre-req through FakeApisix.

nginx proxies every request here after its Lua code has put the nginx variables in
``X-E2E-Var-<name>: =<urlencoded value>`` headers (header absent = variable not found; the ``=``
keeps an empty value distinguishable). The bridge strips those headers, picks the route by the
longest path prefix (APISIX routes by URI), and asks the runner exactly as APISIX's ext-plugin
would: ``FakeApisix.request`` with the route's conf, the lower-cased client headers (``host``
included), ``$uri`` as path, ``$remote_addr`` as src_ip and the nginx variables as ExtraInfo answers.
The runner's answer is applied like APISIX applies it: Stop -> that response; an error -> 503;
pass/Rewrite -> a fake upstream answers 200 with a JSON echo of the request it would receive.

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
from urllib.parse import unquote_to_bytes

from runner.protocol.messages import ConfEntry, Pairs, Rewrite
from runner.testing import ApisixOutcome, FakeApisix, conf

__all__ = ["VAR_HEADER_PREFIX", "Bridge", "BridgeRecord", "Route", "apply_rewrite"]

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
    path: str
    outcome: str
    status: int
    tries: int
    error: str = ""
    vars: Mapping[str, str | None] = field(default_factory=dict)
    at: float = field(default_factory=time.monotonic)  # when the bridge answered


def apply_rewrite(headers: Pairs, rewrite: Rewrite | None) -> list[tuple[str, str]]:
    """The request headers the upstream receives after APISIX applied ``rewrite`` (set replaces, None deletes)."""
    out = [(n, v or "") for n, v in headers]
    for name, value in rewrite.headers if rewrite is not None else ():
        lower = name.lower()
        index = next((i for i, (n, _) in enumerate(out) if n == lower), None)
        out = [(n, v) for n, v in out if n != lower]
        if value is not None:
            out.insert(len(out) if index is None else index, (lower, value))
    return out


class _BadRequest(Exception):
    pass


@dataclass
class _Request:
    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for n, v in self.headers if n == "connection" for t in v.split(",")}
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
    lines = head.decode("latin-1").split("\r\n")
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
        headers.append((name.lower(), value.strip(" \t")))
    if any(n == "transfer-encoding" for n, _ in headers):
        raise _BadRequest("chunked request bodies are not supported (nginx buffers bodies)")
    lengths = {v for n, v in headers if n == "content-length"}
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
        client_headers: list[tuple[str, str | None]] = []
        for name, value in request.headers:
            if name.startswith(VAR_HEADER_PREFIX):
                nginx_vars[name[len(VAR_HEADER_PREFIX) :]] = _decode_var(value)
            elif not name.startswith(_HEADER_PREFIX) and name not in _PROXY_HEADERS:
                client_headers.append((name, value))
        path = nginx_vars.get("uri")
        if path is None:
            return 500, [("x-e2e-outcome", "harness-error")], b"nginx did not send $uri\n"
        route = self.route_for(path)
        common = [("x-e2e-route", route.id)]
        try:
            outcome = await self._apisix.request(
                route.entries,
                key=route.key,
                method=request.method,
                path=path,
                headers=tuple(client_headers),
                src_ip=nginx_vars.get("remote_addr"),
                vars=nginx_vars,
            )
        except Exception as exc:
            # APISIX: "failed to connect to the unix socket" / read errors -> 503 (allow_degradation false).
            self._record(route, request.method, path, "error", 503, 0, f"{type(exc).__name__}: {exc}", nginx_vars)
            headers = [*common, ("x-e2e-outcome", "error"), ("x-e2e-error", type(exc).__name__)]
            return 503, headers, b"503 Service Temporarily Unavailable\n"
        return self._apply(route, request, path, tuple(client_headers), nginx_vars, outcome, common)

    def _apply(
        self,
        route: Route,
        request: _Request,
        path: str,
        client_headers: Pairs,
        nginx_vars: Mapping[str, str | None],
        outcome: ApisixOutcome,
        common: list[tuple[str, str]],
    ) -> tuple[int, list[tuple[str, str]], bytes]:
        common = [*common, ("x-e2e-outcome", outcome.kind), ("x-e2e-tries", str(outcome.tries))]
        if outcome.kind == "stop":
            assert outcome.stop is not None
            status = outcome.stop.status or 200
            self._record(route, request.method, path, "stop", status, outcome.tries, "", nginx_vars)
            headers = [(n.lower(), v) for n, v in outcome.stop.headers]
            return status, [*headers, *common], outcome.stop.body
        if outcome.kind == "error":
            code = outcome.error.name if outcome.error is not None else "?"
            self._record(route, request.method, path, "error", 503, outcome.tries, code, nginx_vars)
            return 503, [*common, ("x-e2e-error", code)], b"503 Service Temporarily Unavailable\n"
        rewrite = outcome.rewrite
        upstream = {
            "route": route.id,
            "method": request.method,
            "path": rewrite.path if rewrite is not None and rewrite.path is not None else path,
            "headers": apply_rewrite(client_headers, rewrite),
            "body_length": len(request.body),
        }
        resp_headers = [
            (n.lower(), v)
            for n, v in (rewrite.resp_headers if rewrite is not None else ())
            if n.lower() not in _EXCLUDED_RESP_HEADERS
        ]
        self._record(route, request.method, path, outcome.kind, 200, outcome.tries, "", nginx_vars)
        body = json.dumps(upstream).encode()
        return 200, [("content-type", "application/json"), *resp_headers, *common], body

    def _record(
        self,
        route: Route,
        method: str,
        path: str,
        outcome: str,
        status: int,
        tries: int,
        error: str,
        nginx_vars: Mapping[str, str | None],
    ) -> None:
        self.records.append(BridgeRecord(route.id, method, path, outcome, status, tries, error, dict(nginx_vars)))
