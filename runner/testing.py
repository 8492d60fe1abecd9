"""Test helpers shipped with the runner: a protocol-faithful fake APISIX peer and message builders.

``FakeApisix`` talks to a runner over its Unix socket the way APISIX's ext-plugin does
(apache/apisix ``apisix/plugins/ext-plugin/init.lua``): PrepareConf on its own connection, a token
cache keyed by the route's idempotent key, up to 3 tries with a cache flush on
CONF_TOKEN_NOT_FOUND, ExtraInfo answered from a variable table in order, pooled connections, and
503 (or pass-through with ``allow_degradation``) on any other error. Unlike APISIX it also checks
every reply strictly (type, id, payload), so a test fails loudly on a wrong answer.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .protocol import codec
from .protocol.messages import (
    ConfEntry,
    ErrCode,
    Frame,
    HTTPReqCallReply,
    Method,
    Pairs,
    ReqBodyQuery,
    RespBodyQuery,
    Rewrite,
    RPCType,
    Stop,
    VarQuery,
)

__all__ = [
    "ApisixOutcome",
    "FakeApisix",
    "PrepareFailed",
    "ProtocolMismatch",
    "conf",
    "http_req_call_frame",
    "prepare_conf_frame",
    "uri_safe_encode",
]

MAX_TRIES = 3  # apache/apisix ext-plugin init.lua communicate()


# nginx's NGX_ESCAPE_URI table (src/core/ngx_string.c, ngx_escape_uri): controls, space, '#', '%',
# '?', DEL and every byte >= 0x80. APISIX's core.utils.uri_safe_encode is ngx_escape_uri(..., 0).
_URI_UNSAFE = frozenset(range(0x21)) | {ord("#"), ord("%"), ord("?")} | frozenset(range(0x7F, 0x100))


def uri_safe_encode(path: str) -> str:
    """What APISIX proxies for a Rewrite ``path`` (apisix/plugins/ext-plugin/init.lua applies
    ``core.utils.uri_safe_encode`` to it): unsafe bytes as upper-case %XX, the rest literal."""
    raw = path.encode("utf-8", "surrogateescape")
    return "".join(f"%{b:02X}" if b in _URI_UNSAFE else chr(b) for b in raw)


class ProtocolMismatch(AssertionError):
    """The runner answered something APISIX would not accept (or not as a test expected)."""


def conf(*entries: tuple[str, str]) -> tuple[ConfEntry, ...]:
    """``conf(("mtls-guard", '{"mode": "report"}'))`` -> PrepareConf entries."""
    return tuple(ConfEntry(name, value) for name, value in entries)


def prepare_conf_frame(entries: Sequence[ConfEntry], key: str | None = None) -> bytes:
    return codec.prepare_conf_request_frame(tuple(entries), key)


def http_req_call_frame(
    *,
    id: int = 0,
    conf_token: int,
    method: str = "GET",
    path: str | None = "/",
    src_ip: str | None = "127.0.0.1",
    headers: Pairs = (),
    args: Pairs = (),
) -> bytes:
    return codec.http_req_call_frame(
        id=id,
        conf_token=conf_token,
        method=Method[method].value,
        path=path,
        src_ip=None if src_ip is None else ipaddress.ip_address(src_ip).packed,
        headers=headers,
        args=args,
    )


@dataclass(frozen=True, slots=True)
class ApisixOutcome:
    """What APISIX would do with the request after the runner answered."""

    kind: str  # "stop" | "rewrite" | "pass" | "error"
    stop: Stop | None = None
    rewrite: Rewrite | None = None
    error: ErrCode | None = None
    tries: int = 1
    round_trips: int = 0
    """Times APISIX waited on the runner during the final try (1 + ExtraInfo batches)."""
    extra_info: tuple[str, ...] = ()
    """ExtraInfo queries of the final try, in order (``var:<name>``, ``req_body``, ``resp_body``)."""

    @property
    def client_status(self) -> int | None:
        """Status the client gets from APISIX itself; None when the request goes upstream."""
        if self.kind == "stop":
            assert self.stop is not None
            return self.stop.status or 200
        if self.kind == "error":
            return 503
        return None

    @property
    def upstream_headers(self) -> Pairs:
        return () if self.rewrite is None else self.rewrite.headers


@dataclass
class _Conn:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    decoder: codec.FrameDecoder = field(default_factory=codec.FrameDecoder)

    async def next_frame(self) -> tuple[Frame, bool]:
        """The next frame and whether APISIX had to wait for it (a round trip)."""
        frame = self.decoder.next_frame()
        if frame is not None:
            return frame, False
        while frame is None:
            data = await self.reader.read(1 << 16)
            if not data:
                raise ConnectionError("runner closed the connection")
            self.decoder.feed(data)
            frame = self.decoder.next_frame()
        return frame, True

    def close(self) -> None:
        self.writer.close()


@dataclass
class _Exchange:
    frames: list[Frame]
    round_trips: int
    queries: list[str]


class FakeApisix:
    """A stand-in for one APISIX worker talking to a runner socket."""

    def __init__(
        self,
        path: str,
        *,
        vars: Mapping[str, str | None] | None = None,
        pool_size: int = 32,
        timeout: float = 10.0,
    ) -> None:
        self.path = path
        self.vars: dict[str, str | None] = dict(vars or {})
        self.pool_size = pool_size
        self.timeout = timeout
        self._pool: list[_Conn] = []
        self._tokens: dict[str, int] = {}
        self._next_id = 0
        self.prepare_count = 0

    async def __aenter__(self) -> FakeApisix:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        for conn in self._pool:
            conn.close()
        self._pool.clear()

    def flush_tokens(self) -> None:
        self._tokens.clear()

    # -- connections --------------------------------------------------------------------------
    async def _connect(self) -> _Conn:
        while self._pool:
            conn = self._pool.pop()
            if not (conn.reader.at_eof() or conn.writer.is_closing()):
                return conn
            conn.close()  # nginx's keepalive pool drops connections the runner closed (e.g. a restart)
        # Connect the way nginx does: non-blocking, and EAGAIN (the runner's listen queue is full)
        # is a failure, not "in progress" as asyncio would take it on a Unix socket.
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(self.path)
        except BlockingIOError:
            sock.close()
            raise ConnectionRefusedError(f"connect() to unix:{self.path} failed (EAGAIN: listen queue full)") from None
        except OSError:
            sock.close()
            raise
        reader, writer = await asyncio.wait_for(asyncio.open_unix_connection(sock=sock), 1.0)
        return _Conn(reader, writer)

    def _release(self, conn: _Conn) -> None:
        if len(self._pool) < self.pool_size and not conn.writer.is_closing():
            self._pool.append(conn)
        else:
            conn.close()

    async def exchange(
        self,
        frame: bytes,
        *,
        vars: Mapping[str, str | None] | None = None,
        body: bytes | None = None,
        resp_body: bytes | None = None,
    ) -> _Exchange:
        """Send one RPC and answer ExtraInfo until the final reply (raw frames, no checks)."""
        table = self.vars if vars is None else {**self.vars, **vars}
        conn = await self._connect()
        try:
            result = await asyncio.wait_for(self._converse(conn, frame, table, body, resp_body), self.timeout)
        except BaseException:
            conn.close()
            raise
        self._release(conn)
        return result

    async def _converse(
        self,
        conn: _Conn,
        frame: bytes,
        table: Mapping[str, str | None],
        body: bytes | None,
        resp_body: bytes | None,
    ) -> _Exchange:
        conn.writer.write(frame)
        await conn.writer.drain()
        round_trips = 0
        queries: list[str] = []
        while True:
            reply, waited = await conn.next_frame()
            round_trips += waited
            if reply.type != RPCType.EXTRA_INFO:
                return _Exchange([reply], round_trips, queries)
            query = codec.decode_extra_info_query(reply.payload)
            if isinstance(query, VarQuery):
                queries.append(f"var:{query.name}")
                value = table.get(query.name)
                answer = None if value is None else value.encode("utf-8", "surrogateescape")
            elif isinstance(query, ReqBodyQuery):
                queries.append("req_body")
                answer = body
            else:
                assert isinstance(query, RespBodyQuery)
                queries.append("resp_body")
                answer = resp_body
            conn.writer.write(codec.extra_info_result_frame(answer))

    # -- APISIX behaviour ---------------------------------------------------------------------
    async def prepare(self, entries: Sequence[ConfEntry], key: str | None = None) -> int:
        """Send PrepareConf on its own connection; returns the token or raises ProtocolMismatch."""
        self.prepare_count += 1
        ex = await self.exchange(prepare_conf_frame(entries, key))
        reply = ex.frames[0]
        if reply.type == RPCType.ERR:
            raise PrepareFailed(codec.decode_error(reply.payload))
        if reply.type != RPCType.PREPARE_CONF:
            raise ProtocolMismatch(f"PrepareConf answered with type {reply.type}")
        token = codec.decode_prepare_conf_reply(reply.payload)
        if token == 0:
            raise ProtocolMismatch("runner issued token 0")
        return token

    async def request(
        self,
        entries: Sequence[ConfEntry],
        *,
        key: str = "route#1#ext-plugin-pre-req#1",
        method: str = "GET",
        path: str | None = "/",
        headers: Pairs = (),
        args: Pairs = (),
        src_ip: str | None = "127.0.0.1",
        vars: Mapping[str, str | None] | None = None,
        body: bytes | None = None,
        allow_degradation: bool = False,
    ) -> ApisixOutcome:
        """One client request through ext-plugin-pre-req, exactly as APISIX's communicate() runs it."""
        error: ErrCode | None = None
        for tries in range(1, MAX_TRIES + 1):
            token = self._tokens.get(key)
            if token is None:
                try:
                    token = await self.prepare(entries, key)
                except PrepareFailed as failed:
                    return _failed(failed.code, tries, allow_degradation)
                self._tokens[key] = token
            call_id = self._next_id
            self._next_id = (self._next_id + 1) % (1 << 22)
            frame = http_req_call_frame(
                id=call_id,
                conf_token=token,
                method=method,
                path=path,
                src_ip=src_ip,
                headers=headers,
                args=args,
            )
            ex = await self.exchange(frame, vars=vars, body=body)
            reply = ex.frames[0]
            if reply.type == RPCType.ERR:
                error = codec.decode_error(reply.payload)
                if error == ErrCode.CONF_TOKEN_NOT_FOUND:
                    self.flush_tokens()  # "refresh cache and try again"
                    continue
                return _failed(error, tries, allow_degradation, ex)
            if reply.type != RPCType.HTTP_REQ_CALL:
                raise ProtocolMismatch(f"HTTPReqCall answered with type {reply.type}")
            decoded = codec.decode_http_req_call_reply(reply.payload)
            if decoded.id != call_id:
                raise ProtocolMismatch(f"reply id {decoded.id} != request id {call_id}")
            return _outcome(decoded, tries, ex)
        return _failed(error or ErrCode.CONF_TOKEN_NOT_FOUND, MAX_TRIES, allow_degradation)


class PrepareFailed(Exception):
    def __init__(self, code: ErrCode) -> None:
        super().__init__(f"PrepareConf failed with {code.name}")
        self.code = code


def _outcome(reply: HTTPReqCallReply, tries: int, ex: _Exchange) -> ApisixOutcome:
    common = {"tries": tries, "round_trips": ex.round_trips, "extra_info": tuple(ex.queries)}
    if isinstance(reply.action, Stop):
        return ApisixOutcome("stop", stop=reply.action, **common)  # type: ignore[arg-type]
    if isinstance(reply.action, Rewrite) and not reply.action.is_empty():
        return ApisixOutcome("rewrite", rewrite=reply.action, **common)  # type: ignore[arg-type]
    return ApisixOutcome("pass", **common)  # type: ignore[arg-type]


def _failed(code: ErrCode, tries: int, allow_degradation: bool, ex: _Exchange | None = None) -> ApisixOutcome:
    kind = "pass" if allow_degradation else "error"
    extra = {} if ex is None else {"round_trips": ex.round_trips, "extra_info": tuple(ex.queries)}
    return ApisixOutcome(kind, error=code, tries=tries, **extra)  # type: ignore[arg-type]
