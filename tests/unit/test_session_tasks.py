"""Session with calls in asyncio Tasks (the default) and on the fast path (``needs_task = False``).

Sans-IO like test_session, but inside a running event loop, which Task mode needs: the Task's
steps come on later loop turns, so tests let the loop turn (``settle``) before looking at the output.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pytest

from plugins.mtls_guard import MtlsGuard
from runner import BasePlugin, HTTPRequest, PluginRegistry, Stop
from runner.call import needs_task
from runner.confcache import ChainLink
from runner.protocol import codec
from runner.protocol.messages import ErrCode, Frame, HTTPReqCallReply, RPCType, VarQuery
from runner.testing import http_req_call_frame
from tests.plugins_for_tests import Hang, make_registry
from tests.unit.test_session import Wire, error_code, queries

T = TypeVar("T")


class Where(BasePlugin[str]):
    """Records the task it runs in (``asyncio.current_task()``); stops with 200 if its conf says so."""

    name = "where"

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any] | None] = []

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        self.tasks.append(asyncio.current_task())
        return Stop(200) if conf == "stop" else None


class FastWhere(Where):
    name = "fast-where"
    needs_task = False


class Gather(BasePlugin[str]):
    """Two ExtraInfo round trips at once through asyncio.gather, then a bare yield."""

    name = "gather"

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        a, b = await asyncio.gather(request.vars("a"), request.var("b"))
        await asyncio.sleep(0)
        return Stop(200, body=json.dumps([a, b]).encode())


class OwnTimeout(BasePlugin[float]):
    """Gives ExtraInfo ``conf`` seconds (asyncio.timeout) and answers 504 itself when they run out."""

    name = "own-timeout"

    def parse_conf(self, value: str) -> float:
        return float(value)

    async def on_request(self, conf: float, request: HTTPRequest) -> Stop | None:
        try:
            async with asyncio.timeout(conf):
                await request.var("slow")
        except TimeoutError:
            return Stop(504, body=b"timed out")
        return Stop(200)


class FastSleeper(BasePlugin[str]):
    """Declares the fast path but sleeps: a contract violation."""

    name = "fast-sleeper"
    needs_task = False

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        await asyncio.sleep(0.001)
        return Stop(200)


def registry(*plugins: BasePlugin[Any]) -> PluginRegistry:
    return PluginRegistry([*plugins, *make_registry()])


async def settle(turns: int = 5) -> None:
    for _ in range(turns):
        await asyncio.sleep(0)


def in_loop(main: Callable[[Wire], Awaitable[T]], reg: PluginRegistry | None = None, **kwargs: Any) -> T:
    """Run ``main(wire)`` in a fresh event loop, the session scheduling on that loop."""

    async def run() -> T:
        wire = Wire(reg, schedule=asyncio.get_running_loop().call_soon, **kwargs)
        return await main(wire)

    return asyncio.run(run())


def reply(frame: Frame) -> HTTPReqCallReply:
    assert frame.type == RPCType.HTTP_REQ_CALL, frame
    return codec.decode_http_req_call_reply(frame.payload)


class TestTaskMode:
    def test_call_runs_in_a_task_of_its_own(self) -> None:
        """By default the filter runs in a fresh Task (not the caller's), finished once the reply is out."""
        where = Where()

        async def main(wire: Wire) -> tuple[list[Frame], list[Frame], asyncio.Task[Any] | None]:
            token = wire.prepare(("where", "stop"))
            before = wire.call(token, id=3)
            await settle()
            return before, wire.take(), asyncio.current_task()

        before, after, caller = in_loop(main, registry(where))
        assert before == []  # the Task starts on the next loop turn
        assert reply(after[0]) == HTTPReqCallReply(3, Stop(200))
        (task,) = where.tasks
        assert task is not None
        assert task is not caller
        assert task.done()

    def test_gather_of_extra_info_and_a_sleep(self) -> None:
        """asyncio.gather of two ExtraInfo exchanges, then a bare yield: both queries go out, answers come in order."""

        async def main(wire: Wire) -> tuple[list[object], list[Frame]]:
            token = wire.prepare(("gather", ""))
            wire.call(token)
            await settle()
            asked = queries(wire.take())
            wire.answer(b"A", b"B")
            await settle()
            return asked, wire.take()

        asked, (frame,) = in_loop(main, registry(Gather()))
        assert asked == [VarQuery("a"), VarQuery("b")]
        stop = reply(frame).action
        assert isinstance(stop, Stop)
        assert json.loads(stop.body) == [{"a": "A"}, "B"]

    def test_own_timeout_while_waiting_for_extra_info(self) -> None:
        """The filter's asyncio.timeout fires during an ExtraInfo wait: its 504 goes out, the late answer is dropped."""

        async def main(wire: Wire) -> tuple[list[Frame], list[Frame], list[Frame]]:
            token = wire.prepare(("own-timeout", "0.01"))
            wire.call(token, id=1)
            await settle()
            asked = wire.take()
            await asyncio.sleep(0.05)
            timed_out = wire.take()
            wire.answer(b"late")
            assert wire.take() == []
            token2 = wire.prepare(("stop", '{"status": 418}'))
            wire.call(token2, id=2)
            await settle()
            return asked, timed_out, wire.take()

        asked, (frame,), (after,) = in_loop(main, registry(OwnTimeout()))
        assert queries(asked) == [VarQuery("slow")]
        assert reply(frame) == HTTPReqCallReply(1, Stop(504, (), b"timed out"))
        assert reply(after) == HTTPReqCallReply(2, Stop(418))

    def test_exception_fails_closed(self) -> None:
        """A filter raising in its Task gets SERVICE_UNAVAILABLE, the connection stays usable."""

        async def main(wire: Wire) -> tuple[ErrCode, int]:
            token = wire.prepare(("raise", "x"))
            wire.call(token)
            await settle()
            return error_code(wire.take()), wire.closes

        assert in_loop(main) == (ErrCode.SERVICE_UNAVAILABLE, 0)

    def test_deadline_cancels_the_task(self) -> None:
        """enforce_deadline answers at once; the Task is cancelled (finally runs) and ends."""
        hang, where = Hang(), Where()

        async def main(wire: Wire) -> ErrCode:
            token = wire.prepare(("where", ""), ("hang", ""))
            wire.call(token)
            await settle()
            assert hang.started == 1
            wire.session.enforce_deadline(float("inf"))
            code = error_code(wire.take())
            await settle()
            assert hang.closed == 1
            assert not wire.session.busy
            return code

        assert in_loop(main, PluginRegistry([hang, where]), call_timeout=0.5) == ErrCode.SERVICE_UNAVAILABLE
        (task,) = where.tasks
        assert task is not None
        assert task.done()

    def test_cancel_before_the_first_step(self) -> None:
        """A call cut off before its Task ever ran leaves no coroutine behind (no never-awaited warning)."""
        hang = Hang()

        async def main(wire: Wire) -> int:
            token = wire.prepare(("hang", ""))
            wire.call(token)
            wire.session.connection_lost()
            await settle()
            gc.collect()
            return hang.started

        assert in_loop(main, PluginRegistry([hang])) == 0

    def test_pipelined_calls_wait_for_the_task(self) -> None:
        """Calls sent back to back are answered in order, each after the Task before it ended."""

        async def main(wire: Wire) -> list[HTTPReqCallReply]:
            token = wire.prepare(("stop", '{"status": 401}'))
            wire.feed(b"".join(http_req_call_frame(id=i, conf_token=token) for i in range(3)))
            await settle(10)
            return [reply(f) for f in wire.take()]

        assert in_loop(main) == [HTTPReqCallReply(i, Stop(401)) for i in range(3)]

    def test_frames_before_a_bad_header_are_answered_then_closed(self) -> None:
        """A call in a Task followed by a bad header: the call is answered first, then the connection closes."""

        async def main(wire: Wire) -> tuple[list[Frame], int]:
            token = wire.prepare(("stop", '{"status": 401}'))
            wire.feed(http_req_call_frame(id=5, conf_token=token) + b"\x02\x00\x00\x00")
            assert wire.closes == 0
            await settle()
            return wire.take(), wire.closes

        (frame,), closes = in_loop(main)
        assert reply(frame) == HTTPReqCallReply(5, Stop(401))
        assert closes == 1

    def test_next_rpc_before_the_query_closes(self) -> None:
        """A call sent before the previous one asked its ExtraInfo breaks the conversation, as on the fast path."""

        async def main(wire: Wire) -> tuple[list[Frame], int, list[tuple[str, str]]]:
            token = wire.prepare(("vars", "a"))
            wire.observed.clear()
            wire.feed(http_req_call_frame(id=1, conf_token=token) + http_req_call_frame(id=2, conf_token=token))
            await settle()
            return wire.take(), wire.closes, wire.observed

        frames, closes, observed = in_loop(main)
        assert frames == []
        assert closes == 1
        assert observed == [("http_req_call", "aborted")]

    def test_bad_header_before_the_query_closes(self) -> None:
        """A bad header behind a call that then asks ExtraInfo closes the connection without an answer."""

        async def main(wire: Wire) -> tuple[list[Frame], int]:
            token = wire.prepare(("vars", "a"))
            wire.feed(http_req_call_frame(id=1, conf_token=token) + b"\x02\x00\x00\x00")
            await settle()
            return wire.take(), wire.closes

        assert in_loop(main) == ([], 1)

    def test_sending_ahead_is_bounded(self) -> None:
        """Frames piling up behind a running call are kept up to max_payload bytes, then the connection closes."""
        hang = Hang()

        async def main(wire: Wire) -> tuple[int, int]:
            token = wire.prepare(("hang", ""))
            wire.call(token)
            await settle()
            wire.feed(http_req_call_frame(id=2, conf_token=token))  # held: the call is still running
            closes = wire.closes
            wire.feed(b"".join(http_req_call_frame(id=i, conf_token=token) for i in range(30)))
            await settle()
            return closes, wire.closes

        assert in_loop(main, PluginRegistry([hang]), max_payload=1024) == (0, 1)
        assert hang.closed == 1

    def test_response_call_in_a_task(self) -> None:
        """ext-plugin-post-resp filters run in a Task too."""

        async def main(wire: Wire) -> list[Frame]:
            token = wire.prepare(("resp-header", "x-a: 1"))
            wire.feed(codec.http_resp_call_frame(id=4, conf_token=token, status=200))
            await settle()
            return wire.take()

        (frame,) = in_loop(main)
        assert codec.decode_http_resp_call_reply(frame.payload).headers == (("x-a", "1"),)

    def test_finished_calls_leave_no_cyclic_garbage(self) -> None:
        """A call's Task, its future and the call are freed by reference counting alone."""

        async def main(wire: Wire) -> int:
            token = wire.prepare(("vars", "host"))
            gc.collect()
            gc.disable()
            try:
                for call_id in range(20):
                    wire.feed(http_req_call_frame(conf_token=token, id=call_id))
                    await settle(2)
                    wire.answer(b"example.com")
                    await settle(2)
                    assert wire.take()[-1].type == RPCType.HTTP_REQ_CALL
                return gc.collect()
            finally:
                gc.enable()

        assert in_loop(main) == 0


class TestFastPath:
    def test_declared_plugins_skip_the_task(self) -> None:
        """A chain of plugins declaring needs_task = False runs where the frame was handled, no Task of its own."""
        where = FastWhere()

        async def main(wire: Wire) -> tuple[list[Frame], asyncio.Task[Any] | None]:
            token = wire.prepare(("fast-where", "stop"))
            return wire.call(token, id=1), asyncio.current_task()

        (frame,), caller = in_loop(main, registry(where))
        assert reply(frame) == HTTPReqCallReply(1, Stop(200))
        assert where.tasks == [caller]  # the caller's task: none was created for the call

    def test_one_plugin_needing_a_task_puts_the_chain_in_one(self) -> None:
        """A fast plugin chained with a default one runs in the call's Task as well."""
        fast, slow = FastWhere(), Where()

        async def main(wire: Wire) -> list[Frame]:
            token = wire.prepare(("fast-where", ""), ("where", "stop"))
            wire.call(token)
            await settle()
            return wire.take()

        (frame,) = in_loop(main, registry(fast, slow))
        assert reply(frame).action == Stop(200)
        assert fast.tasks == slow.tasks
        assert fast.tasks[0] is not None

    def test_foreign_await_fails_closed_with_a_clear_message(self, caplog: pytest.LogCaptureFixture) -> None:
        """A fast-path filter awaiting a timer is answered SERVICE_UNAVAILABLE at once, the log says why."""

        async def main(wire: Wire) -> list[Frame]:
            token = wire.prepare(("fast-sleeper", ""))
            return wire.call(token)

        with caplog.at_level(logging.ERROR, logger="mtls_guard.runner"):
            frames = in_loop(main, registry(FastSleeper()))
        assert error_code(frames) == ErrCode.SERVICE_UNAVAILABLE
        (message,) = [r.getMessage() for r in caplog.records]
        assert "plugin 'fast-sleeper' failed: TaskRequired" in message
        assert "needs_task = False" in message

    def test_mtls_guard_declares_the_fast_path(self) -> None:
        """mtls-guard declares the fast path; BasePlugin's default, or anything but False, means a Task."""
        assert not needs_task((ChainLink("mtls-guard", MtlsGuard(), None),))
        assert needs_task((ChainLink("where", Where(), None),))
        assert BasePlugin.needs_task is True
        odd = FastWhere()
        odd.needs_task = None  # type: ignore[assignment]
        assert needs_task((ChainLink("fast-where", odd, None),))
