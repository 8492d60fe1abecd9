"""One APISIX connection as a state machine: frames in, frames out, plugins driven in between.

No sockets here: the server feeds received bytes to ``data_received`` and gives the session a
``write`` and a ``close`` callback. A connection carries one exchange at a time (APISIX does not
multiplex); while a plugin waits for ExtraInfo answers the only frames allowed are type 3.

Failure policy (fail closed): every failed call is answered with an Err frame carrying the mapped
code, never with an action-less reply. Framing errors (oversized or zero-length frames) and frames
that break the conversation close this connection only.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .confcache import Chain, ConfStore
from .driver import CoroutineDriver, Pending
from .errors import PluginFailure, ProtocolViolation, RunnerError, error_code_for
from .plugin import HTTPRequest, HTTPResponse
from .protocol import codec
from .protocol.messages import (
    MAX_PAYLOAD,
    ErrCode,
    ExtraInfoQuery,
    HTTPReqCallReply,
    HTTPRespCallReply,
    RPCType,
    Stop,
)

__all__ = ["RPCObserver", "Session", "SessionConfig"]

log = logging.getLogger("mtls_guard.runner")

RPCObserver = Callable[[str, str, float], None]
"""Called as ``observer(rpc_type, outcome, seconds)`` after every RPC (metrics hook)."""

_RPC_NAMES = {t.value: t.name.lower() for t in RPCType}
# Plain ints for the per-frame dispatch (attribute lookups on the IntEnum cost more).
_PREPARE_CONF = int(RPCType.PREPARE_CONF)
_HTTP_REQ_CALL = int(RPCType.HTTP_REQ_CALL)
_EXTRA_INFO = int(RPCType.EXTRA_INFO)
_HTTP_RESP_CALL = int(RPCType.HTTP_RESP_CALL)


@dataclass(frozen=True, slots=True)
class SessionConfig:
    store: ConfStore
    call_timeout: float = 10.0
    max_payload: int = MAX_PAYLOAD
    observers: tuple[RPCObserver, ...] = field(default=())


class _Call:
    """A plugin chain in progress on this connection."""

    __slots__ = ("driver", "id", "plugin", "rpc_type", "started")

    def __init__(self, rpc_type: int, call_id: int, started: float) -> None:
        self.rpc_type = rpc_type
        self.id = call_id
        self.started = started
        self.plugin = ""
        self.driver: CoroutineDriver | None = None


class Session:
    __slots__ = (
        "_call",
        "_close",
        "_config",
        "_decoder",
        "_discard",
        "_outstanding",
        "_schedule",
        "_write",
        "closed",
        "last_activity",
    )

    def __init__(
        self,
        config: SessionConfig,
        write: Callable[[bytes], None],
        close: Callable[[], None],
        schedule: Callable[[Callable[[], None]], object],
    ) -> None:
        self._config = config
        self._write = write
        self._close = close
        self._schedule = schedule
        self._decoder = codec.FrameDecoder(config.max_payload)
        self._call: _Call | None = None
        # ExtraInfo batches sent and not yet fully answered, oldest first: (pending, results, size)
        self._outstanding: deque[tuple[Pending[list[bytes | None]], list[bytes | None], int]] = deque()
        # ExtraInfo answers still to come for a call that was cut off; they are dropped.
        self._discard = 0
        self.closed = False
        self.last_activity = time.monotonic()

    # -- server-facing API ----------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._call is not None

    @property
    def call_started(self) -> float | None:
        return None if self._call is None else self._call.started

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_activity = time.monotonic()
        try:
            self._decoder.feed(data)
            while not self.closed:
                frame = self._decoder.next_frame()
                if frame is None:
                    return
                self._on_frame(frame.type, frame.payload)
        except codec.DecodeError as exc:
            self._abort(f"malformed frame: {exc}")
        except ProtocolViolation as exc:
            self._abort(str(exc))

    def connection_lost(self) -> None:
        """The peer went away: abandon a running call; nothing can be answered any more."""
        self.closed = True
        call, self._call = self._call, None
        if call is not None and call.driver is not None:
            call.driver.cancel()
        self._outstanding.clear()

    def enforce_deadline(self, now: float) -> None:
        """Cut off a call that has run longer than the call timeout (well before APISIX's 60 s)."""
        call = self._call
        if call is None or now - call.started < self._config.call_timeout:
            return
        if call.driver is not None:
            call.driver.cancel()
        self._discard += sum(size - len(results) for _, results, size in self._outstanding)
        self._outstanding.clear()
        what = f"plugin {call.plugin!r}" if call.plugin else "call"
        self._fail(call, PluginFailure(f"{what} did not finish within {self._config.call_timeout:g}s"))

    # -- frames ---------------------------------------------------------------------------------
    def _on_frame(self, rpc_type: int, payload: bytes) -> None:
        if rpc_type == _EXTRA_INFO:
            self._on_extra_info(payload)
            return
        if self._call is not None or self._outstanding:
            raise ProtocolViolation(f"got RPC type {rpc_type} while waiting for ExtraInfo answers")
        if self._discard:
            raise ProtocolViolation(f"got RPC type {rpc_type}, expected {self._discard} more ExtraInfo answers")
        if rpc_type == _HTTP_REQ_CALL:
            self._start_call(rpc_type, payload)
        elif rpc_type == _PREPARE_CONF:
            self._prepare(payload)
        elif rpc_type == _HTTP_RESP_CALL:
            self._start_call(rpc_type, payload)
        else:
            self._reply_error(rpc_type, ErrCode.BAD_REQUEST, f"unknown RPC type {rpc_type}", time.perf_counter())

    def _prepare(self, payload: bytes) -> None:
        started = time.perf_counter()
        try:
            request = codec.decode_prepare_conf(payload)
            token = self._config.store.prepare(request)
        except (RunnerError, codec.DecodeError) as exc:
            self._reply_error(RPCType.PREPARE_CONF, error_code_for(exc), f"PrepareConf rejected: {exc}", started)
            return
        self._write(codec.prepare_conf_reply_frame(token))
        self._observe(RPCType.PREPARE_CONF, "ok", started)

    def _start_call(self, rpc_type: int, payload: bytes) -> None:
        started = time.perf_counter()
        call_id = 0
        try:
            view: codec.HTTPReqCall | codec.HTTPRespCall
            if rpc_type == _HTTP_REQ_CALL:
                view = codec.decode_http_req_call(payload)
            else:
                view = codec.decode_http_resp_call(payload)
            call_id = view.id
            chain = self._config.store.lookup(view.conf_token)
        except (RunnerError, codec.DecodeError) as exc:
            code = error_code_for(exc)
            level = logging.INFO if code == ErrCode.CONF_TOKEN_NOT_FOUND else logging.WARNING
            self._reply_error(rpc_type, code, f"call {call_id} rejected: {exc}", started, level)
            return
        if not chain:
            self._write(_empty_reply(rpc_type, call_id))
            self._observe(rpc_type, "ok", started)
            return
        call = _Call(rpc_type, call_id, started)
        self._call = call
        if rpc_type == _HTTP_REQ_CALL:
            assert isinstance(view, codec.HTTPReqCall)
            coro: Any = _run_request_chain(chain, HTTPRequest(view, self), call)
        else:
            assert isinstance(view, codec.HTTPRespCall)
            coro = _run_response_chain(chain, HTTPResponse(view, self), call)
        call.driver = CoroutineDriver(coro, lambda result, error: self._finish(call, result, error), self._schedule)
        call.driver.step()

    def _finish(self, call: _Call, result: Any, error: BaseException | None) -> None:
        if self._call is not call or self.closed:
            return  # cut off or disconnected meanwhile: the outcome no longer matters
        if error is not None:
            self._fail(call, error)
            return
        try:
            frame = _reply_frame(call, result)
        except Exception as exc:  # noqa: BLE001 - e.g. a non-str header value; must become an Err reply
            self._fail(call, PluginFailure(f"plugin produced an invalid reply: {type(exc).__name__}: {exc}"))
            return
        self._call = None
        if self._outstanding:
            self._discard += sum(size - len(results) for _, results, size in self._outstanding)
            self._outstanding.clear()
        self._write(frame)
        self._observe(call.rpc_type, "ok", call.started)

    def _fail(self, call: _Call, error: BaseException) -> None:
        self._call = None
        if isinstance(error, RunnerError):
            message = str(error)
        else:
            who = f"plugin {call.plugin!r}" if call.plugin else "plugin chain"
            message = f"{who} failed: {type(error).__name__}: {error}"
        self._reply_error(call.rpc_type, error_code_for(error), f"call {call.id}: {message}", call.started)

    # -- ExtraInfo --------------------------------------------------------------------------------
    def query(self, queries: Sequence[ExtraInfoQuery]) -> Pending[list[bytes | None]]:
        """ExtraInfoChannel: send the queries at once (pipelined) and await all answers."""
        pending: Pending[list[bytes | None]] = Pending()
        if self.closed or self._call is None:
            pending.set_error(PluginFailure("ExtraInfo requested outside a running call"))
            return pending
        if not queries:
            pending.set_result([])
            return pending
        if len(queries) == 1:
            self._write(codec.extra_info_query_frame(queries[0]))
        else:
            self._write(b"".join(codec.extra_info_query_frame(q) for q in queries))
        self._outstanding.append((pending, [], len(queries)))
        return pending

    def _on_extra_info(self, payload: bytes) -> None:
        if self._discard:
            self._discard -= 1
            return
        if not self._outstanding:
            raise ProtocolViolation("unexpected ExtraInfo answer: nothing was asked")
        pending, results, size = self._outstanding[0]
        try:
            results.append(codec.decode_extra_info_result(payload))
        except codec.DecodeError as exc:
            raise ProtocolViolation(f"malformed ExtraInfo answer: {exc}") from exc
        if len(results) < size:
            return
        self._outstanding.popleft()
        pending.set_result(results)
        call = self._call
        if call is not None and call.driver is not None and call.driver.waiting_on is pending:
            call.driver.step()

    # -- output -----------------------------------------------------------------------------------
    def _reply_error(
        self, rpc_type: int, code: ErrCode, message: str, started: float, level: int = logging.ERROR
    ) -> None:
        log.log(level, "event=rpc_error rpc=%s code=%s %s", _rpc_name(rpc_type), code.name, message)
        self._write(codec.error_frame(code))
        self._observe(rpc_type, code.name.lower(), started)

    def _abort(self, reason: str) -> None:
        log.warning("event=connection_closed reason=%r", reason)
        call = self._call
        self.connection_lost()
        if call is not None:
            self._observe(call.rpc_type, "aborted", call.started)
        self._close()

    def _observe(self, rpc_type: int, outcome: str, started: float) -> None:
        if self._config.observers:
            elapsed = time.perf_counter() - started
            name = _rpc_name(rpc_type)
            for observer in self._config.observers:
                observer(name, outcome, elapsed)


def _rpc_name(rpc_type: int) -> str:
    return _RPC_NAMES.get(rpc_type, "unknown")


async def _run_request_chain(chain: Chain, request: HTTPRequest, call: _Call) -> HTTPReqCallReply:
    for link in chain:
        call.plugin = link.name
        stop = await link.plugin.on_request(link.conf, request)
        if stop is not None:
            if not isinstance(stop, Stop):
                raise PluginFailure(f"plugin {link.name!r} returned {type(stop).__name__}, not Stop or None")
            return HTTPReqCallReply(request.id, stop)
    call.plugin = ""
    return HTTPReqCallReply(request.id, request.rewrite())


async def _run_response_chain(chain: Chain, response: HTTPResponse, call: _Call) -> HTTPRespCallReply:
    for link in chain:
        call.plugin = link.name
        await link.plugin.on_response(link.conf, response)
    call.plugin = ""
    status, headers, body = response.changes()
    return HTTPRespCallReply(response.id, status, headers, body)


def _reply_frame(call: _Call, result: Any) -> bytes:
    if call.rpc_type == _HTTP_REQ_CALL:
        if isinstance(result.action, Stop) and not (result.action.status == 0 or 100 <= result.action.status <= 599):
            raise ValueError(f"Stop status {result.action.status} outside 100..599")
        return codec.http_req_call_reply_frame(result)
    return codec.http_resp_call_reply_frame(result)


def _empty_reply(rpc_type: int, call_id: int) -> bytes:
    if rpc_type == RPCType.HTTP_REQ_CALL:
        return codec.http_req_call_reply_frame(HTTPReqCallReply(call_id))
    return codec.http_resp_call_reply_frame(HTTPRespCallReply(call_id))
