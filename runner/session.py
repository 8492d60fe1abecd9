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
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from types import CoroutineType
from typing import Any, TypeAlias

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
    Rewrite,
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

_View: TypeAlias = codec.HTTPReqCall | codec.HTTPRespCall


@dataclass(slots=True)
class SessionConfig:
    """Shared by every session of a server; a reload changes ``call_timeout`` in place (runner.reload)."""

    store: ConfStore
    call_timeout: float = 10.0
    max_payload: int = MAX_PAYLOAD
    observers: tuple[RPCObserver, ...] = field(default=())


class _Call(CoroutineDriver):
    """A plugin chain in progress on this connection, and the driver of its coroutine.

    One object per call that reports its outcome to the session itself (``_finish``) rather than
    through an ``on_done`` closure: fewer allocations per request, and no reference cycle, so a
    finished call is freed at once instead of waiting for the cyclic garbage collector.
    """

    __slots__ = ("_view", "id", "plugin", "request", "rpc_type", "session", "started")

    def __init__(self, session: Session, rpc_type: int, view: _View, started: float) -> None:
        self.session = session
        self.rpc_type = rpc_type
        self.id = view.id
        self.started = started
        self.plugin = ""
        self.request: HTTPRequest | None = None
        self._view = view

    def run(self, chain: Chain) -> None:
        """Start the chain (once this is the session's current call): run it to its first wait or end."""
        view = self._view
        coro: Coroutine[Any, Any, Any]
        if isinstance(view, codec.HTTPReqCall):
            self.request = HTTPRequest(view, self.session)
            coro = self._request_coroutine(chain, self.request)
        else:
            coro = _run_response_chain(chain, HTTPResponse(view, self.session), self)
        self._start(coro, self.session._schedule)
        self.step()

    def _request_coroutine(self, chain: Chain, request: HTTPRequest) -> Coroutine[Any, Any, Any]:
        """The coroutine running ``chain`` on ``request``: it returns the first Stop, or None."""
        if len(chain) != 1:
            return _run_request_chain(chain, request, self)
        # One plugin, the usual route: its own coroutine is driven directly, without the chain loop
        # around it (one coroutine frame less on every resume). Session._finish checks its result
        # as the loop does; whatever the loop would have turned into an Err reply still is one.
        link = chain[0]
        self.plugin = link.name
        try:
            awaitable = link.plugin.on_request(link.conf, request)
        except BaseException as exc:  # noqa: BLE001 - inside the loop this was a plugin failure too
            return _raise(exc)
        if type(awaitable) is CoroutineType:
            return awaitable
        return _await(awaitable)  # not a coroutine (or not awaitable): fails or works as in the loop

    def _finish(self, result: Any, error: BaseException | None) -> None:
        self.finished = True
        self.session._finish(self, result, error)


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
        decoder = self._decoder
        try:
            for rpc_type, payload in decoder.frames(data):
                if rpc_type == _EXTRA_INFO:  # the most frequent frame: no dispatch call for it
                    self._on_extra_info(payload)
                else:
                    self._on_frame(rpc_type, payload)
                if self.closed:
                    return
            if decoder.error is not None:
                raise decoder.error  # a bad header after the frames just handled (see frames())
        except codec.DecodeError as exc:
            self._abort(f"malformed frame: {exc}")
        except ProtocolViolation as exc:
            self._abort(str(exc))

    def connection_lost(self) -> None:
        """The peer went away: abandon a running call; nothing can be answered any more."""
        self.closed = True
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        self._outstanding.clear()

    def enforce_deadline(self, now: float) -> None:
        """Cut off a call that has run longer than the call timeout (well before APISIX's 60 s)."""
        call = self._call
        if call is None or now - call.started < self._config.call_timeout:
            return
        call.cancel()
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
            view: _View = codec.HTTPReqCall(payload) if rpc_type == _HTTP_REQ_CALL else codec.HTTPRespCall(payload)
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
        call = self._call = _Call(self, rpc_type, view, started)
        call.run(chain)

    def _finish(self, call: _Call, result: Any, error: BaseException | None) -> None:
        if self._call is not call or self.closed:
            return  # cut off or disconnected meanwhile: the outcome no longer matters
        if error is not None:
            self._fail(call, error)
            return
        request = call.request
        if request is not None and result is not None and not isinstance(result, Stop):
            # Only a one-plugin chain gets here (the chain loop checks each plugin's result itself).
            what = type(result).__name__
            self._fail(call, PluginFailure(f"plugin {call.plugin!r} returned {what}, not Stop or None"))
            return
        try:
            if request is not None:
                frame = _request_reply_frame(call.id, result if result is not None else request.rewrite())
            else:
                frame = codec.http_resp_call_reply_frame(result)
        except Exception as exc:  # noqa: BLE001 - e.g. a non-str header value; must become an Err reply
            self._fail(call, PluginFailure(f"plugin produced an invalid reply: {type(exc).__name__}: {exc}"))
            return
        self._call = None
        if self._outstanding:
            self._discard += sum(size - len(results) for _, results, size in self._outstanding)
            self._outstanding.clear()
        self._write(frame)
        if self._config.observers:
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
            self._write(b"".join([codec.extra_info_query_frame(q) for q in queries]))
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
        if call is not None and call.waiting_on is pending:
            call.step()

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


async def _run_request_chain(chain: Chain, request: HTTPRequest, call: _Call) -> Stop | None:
    """Run the plugins in order; the first Stop ends the chain (Session._finish builds the reply)."""
    for link in chain:
        call.plugin = link.name
        stop = await link.plugin.on_request(link.conf, request)
        if stop is not None:
            if not isinstance(stop, Stop):
                raise PluginFailure(f"plugin {link.name!r} returned {type(stop).__name__}, not Stop or None")
            return stop
    call.plugin = ""
    return None


async def _raise(error: BaseException) -> None:
    raise error


async def _await(awaitable: Any) -> Any:
    return await awaitable


async def _run_response_chain(chain: Chain, response: HTTPResponse, call: _Call) -> HTTPRespCallReply:
    for link in chain:
        call.plugin = link.name
        await link.plugin.on_response(link.conf, response)
    call.plugin = ""
    status, headers, body = response.changes()
    return HTTPRespCallReply(response.id, status, headers, body)


def _request_reply_frame(call_id: int, action: Stop | Rewrite | None) -> bytes:
    if isinstance(action, Stop) and not (action.status == 0 or 100 <= action.status <= 599):
        raise ValueError(f"Stop status {action.status} outside 100..599")
    return codec.http_req_call_action_frame(call_id, action)


def _empty_reply(rpc_type: int, call_id: int) -> bytes:
    if rpc_type == RPCType.HTTP_REQ_CALL:
        return codec.http_req_call_reply_frame(HTTPReqCallReply(call_id))
    return codec.http_resp_call_reply_frame(HTTPRespCallReply(call_id))
