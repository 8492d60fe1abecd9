"""One APISIX connection as a state machine: frames in, frames out, plugins driven in between.

No sockets here: the server feeds received bytes to ``data_received`` and gives the session a
``write`` and a ``close`` callback. A connection carries one exchange at a time (APISIX does not
multiplex); while a plugin waits for ExtraInfo answers the only frames allowed are type 3.

Failure policy (fail closed): every failed call is answered with an Err frame carrying the mapped
code, never with an action-less reply. Framing errors (oversized or zero-length frames) and frames
that break the conversation close this connection only.

A call runs in an asyncio Task, or is driven directly when its plugins declare they need no Task
(runner.call). A call in a Task starts and resumes on later loop turns: frames other than ExtraInfo
answers that arrive meanwhile wait until it ends, so that a peer sees the same conversation either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeAlias

from .call import Call, View
from .confcache import ConfStore
from .driver import Pending
from .errors import PluginFailure, ProtocolViolation, RunnerError, error_code_for
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

_Results: TypeAlias = list[bytes | None]
# What a plugin awaits for one ExtraInfo batch: the runner's Pending on the fast path, a real future in
# a Task (so that Tasks the plugin spawns, asyncio.gather among them, can await it as well).
_Waiter: TypeAlias = Pending[_Results] | asyncio.Future[_Results]


@dataclass(slots=True)
class SessionConfig:
    """Shared by every session of a server; a reload changes ``call_timeout`` in place (runner.reload)."""

    store: ConfStore
    call_timeout: float = 10.0
    max_payload: int = MAX_PAYLOAD
    observers: tuple[RPCObserver, ...] = field(default=())


class Session:
    __slots__ = (
        "_call",
        "_close",
        "_config",
        "_decoder",
        "_discard",
        "_held",
        "_outstanding",
        "_schedule",
        "_waiting",
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
        self._call: Call | None = None
        # ExtraInfo batches sent and not yet fully answered, oldest first: (pending, results, size)
        self._outstanding: deque[tuple[_Waiter, _Results, int]] = deque()
        # ExtraInfo answers still to come for a call that was cut off; they are dropped.
        self._discard = 0
        # Frames that arrived while a call in a Task had not yet reached a wait for ExtraInfo (_hold).
        self._waiting: list[tuple[int, bytes]] | None = None
        self._held = 0  # bytes received since frames began to wait
        self.closed = False
        self.last_activity = time.monotonic()

    # -- server-facing API ----------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self._call is not None

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        self.last_activity = time.monotonic()
        if self._waiting is not None:
            self._wait_more(self._waiting, data)
            return
        decoder = self._decoder
        try:
            frames = decoder.frames(data)
            # The loop of _handle(), inline: one call less per read on the hot path.
            for rpc_type, payload in frames:
                if rpc_type == _EXTRA_INFO:  # the most frequent frame: no dispatch call for it
                    self._on_extra_info(payload)
                elif (call := self._call) is not None and call.task is not None and not self._outstanding:
                    self._hold(frames, payload)
                    return
                else:
                    self._on_frame(rpc_type, payload)
                if self.closed:
                    return
            if decoder.error is not None:  # a bad header after the frames just handled (see frames())
                self._bad_header(decoder.error)
        except codec.DecodeError as exc:
            self._abort(f"malformed frame: {exc}")
        except ProtocolViolation as exc:
            self._abort(str(exc))

    def _handle(self, frames: list[tuple[int, bytes]]) -> None:
        """Handle frames that waited (see _hold) as data_received handles those it decodes."""
        decoder = self._decoder
        try:
            for rpc_type, payload in frames:
                if rpc_type == _EXTRA_INFO:
                    self._on_extra_info(payload)
                elif (call := self._call) is not None and call.task is not None and not self._outstanding:
                    self._hold(frames, payload)
                    return
                else:
                    self._on_frame(rpc_type, payload)
                if self.closed:
                    return
            if decoder.error is not None:
                self._bad_header(decoder.error)
        except codec.DecodeError as exc:
            self._abort(f"malformed frame: {exc}")
        except ProtocolViolation as exc:
            self._abort(str(exc))

    def _hold(self, frames: list[tuple[int, bytes]], payload: bytes) -> None:
        """Keep the frame carrying ``payload`` and those after it until the call in a Task ends.

        That call has not yet had the loop turn that starts or resumes it; driven directly it would
        have ended by now, or be waiting for ExtraInfo answers (see query() for that case). So the
        peer sees the same conversation either way."""
        start = next(i for i, (_, p) in enumerate(frames) if p is payload)  # by identity: equal frames repeat
        self._waiting = frames[start:]
        self._held = 0

    def _bad_header(self, error: codec.DecodeError) -> None:
        if (call := self._call) is not None and call.task is not None and not self._outstanding:
            self._waiting = []  # as in _hold: the call ends first, then call_ended() raises it
            self._held = 0
            return
        raise error

    def _wait_more(self, waiting: list[tuple[int, bytes]], data: bytes) -> None:
        if self._decoder.error is not None:
            return  # nothing after a bad header counts; it is raised once the frames before it are handled
        self._held += len(data)
        if self._held > self._config.max_payload:
            # APISIX never sends ahead (one exchange at a time): bound what a peer can make us keep.
            self._abort(f"more than {self._config.max_payload} bytes sent ahead while a call runs")
            return
        with contextlib.suppress(codec.DecodeError):  # see above: _handle raises it in turn
            waiting += self._decoder.frames(data)

    def call_ended(self) -> None:
        """CallOwner: a call in a Task was answered, failed or cut off; handle the frames that waited."""
        waiting = self._waiting
        if waiting is not None and self._call is None and not self.closed:
            self._waiting = None
            self._handle(waiting)

    def connection_lost(self) -> None:
        """The peer went away: abandon a running call; nothing can be answered any more."""
        self.closed = True
        call, self._call = self._call, None
        if call is not None:
            call.cancel()
        self._outstanding.clear()
        self._waiting = None

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
        self.call_ended()

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
            view: View = codec.HTTPReqCall(payload) if rpc_type == _HTTP_REQ_CALL else codec.HTTPRespCall(payload)
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
        call = self._call = Call(self, rpc_type, view, started)
        call.run(chain, self._schedule)

    def call_done(self, call: Call, result: Any, error: BaseException | None) -> None:
        """CallOwner: a call reports its outcome (also one cut off meanwhile, which is ignored)."""
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

    def _fail(self, call: Call, error: BaseException) -> None:
        self._call = None
        if isinstance(error, RunnerError):
            message = str(error)
        else:
            who = f"plugin {call.plugin!r}" if call.plugin else "plugin chain"
            message = f"{who} failed: {type(error).__name__}: {error}"
        self._reply_error(call.rpc_type, error_code_for(error), f"call {call.id}: {message}", call.started)

    # -- ExtraInfo --------------------------------------------------------------------------------
    def query(self, queries: Sequence[ExtraInfoQuery]) -> _Waiter:
        """ExtraInfoChannel: send the queries at once (pipelined) and await all answers."""
        call = self._call
        if self.closed or call is None:
            failed: Pending[_Results] = Pending()
            failed.set_error(PluginFailure("ExtraInfo requested outside a running call"))
            return failed
        if not queries:
            empty: Pending[_Results] = Pending()
            empty.set_result([])
            return empty
        if (waiting := self._waiting) is not None:
            # The peer sent its next RPC (or a bad header) before this call, in a Task, asked anything.
            # Driven directly the call would have asked first and then met it: the same end, seen
            # late (and the answers the call needs would queue behind it).
            self._abort(
                f"got RPC type {waiting[0][0]} while waiting for ExtraInfo answers"
                if waiting
                else f"malformed frame: {self._decoder.error}"
            )
            failed = Pending()
            failed.set_error(PluginFailure("connection closed: the peer broke the conversation"))
            return failed
        if len(queries) == 1:
            self._write(codec.extra_info_query_frame(queries[0]))
        else:
            self._write(b"".join([codec.extra_info_query_frame(q) for q in queries]))
        waiter: _Waiter = Pending() if call.task is None else call.task.get_loop().create_future()
        self._outstanding.append((waiter, [], len(queries)))
        return waiter

    def _on_extra_info(self, payload: bytes) -> None:
        if self._discard:
            self._discard -= 1
            return
        if not self._outstanding:
            raise ProtocolViolation("unexpected ExtraInfo answer: nothing was asked")
        waiter, results, size = self._outstanding[0]
        try:
            results.append(codec.decode_extra_info_result(payload))
        except codec.DecodeError as exc:
            raise ProtocolViolation(f"malformed ExtraInfo answer: {exc}") from exc
        if len(results) < size:
            return
        self._outstanding.popleft()
        call = self._call
        if call is not None and call.waiting_on is waiter:  # a call driven directly waits for this Pending
            waiter.set_result(results)
            call.step()
        elif isinstance(waiter, Pending) or not waiter.done():
            # A future is done when the filter stopped waiting (its own timeout cancelled it).
            waiter.set_result(results)

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


def _request_reply_frame(call_id: int, action: Stop | Rewrite | None) -> bytes:
    if isinstance(action, Stop) and not (action.status == 0 or 100 <= action.status <= 599):
        raise ValueError(f"Stop status {action.status} outside 100..599")
    return codec.http_req_call_action_frame(call_id, action)


def _empty_reply(rpc_type: int, call_id: int) -> bytes:
    if rpc_type == RPCType.HTTP_REQ_CALL:
        return codec.http_req_call_reply_frame(HTTPReqCallReply(call_id))
    return codec.http_resp_call_reply_frame(HTTPRespCallReply(call_id))
