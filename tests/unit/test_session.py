"""Session, sans-IO: frames built with the codec's APISIX-side encoders go in, reply frames come out.

No sockets and no event loop (except where a test drives a real asyncio timer): ``write`` appends
to a list, ``close`` counts, ``schedule`` queues callbacks the test runs by hand.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from runner import BasePlugin, HTTPRequest, PluginRegistry
from runner.confcache import ConfStore
from runner.protocol import codec
from runner.protocol.messages import (
    MAX_PAYLOAD,
    ErrCode,
    Frame,
    HTTPReqCallReply,
    HTTPRespCallReply,
    ReqBodyQuery,
    Rewrite,
    RPCType,
    Stop,
    VarQuery,
)
from runner.session import Session, SessionConfig
from runner.testing import conf, http_req_call_frame, prepare_conf_frame
from tests.plugins_for_tests import Hang, make_registry


class Wire:
    """One Session with everything it writes captured and decodable."""

    def __init__(
        self,
        registry: PluginRegistry | None = None,
        *,
        call_timeout: float = 10.0,
        max_payload: int = MAX_PAYLOAD,
        schedule: Callable[[Callable[[], None]], object] | None = None,
    ) -> None:
        self.registry = registry or make_registry()
        self.store = ConfStore(self.registry, ttl=100, max_entries=100, clock=time.monotonic)
        self.written: list[bytes] = []
        self.closes = 0
        self.scheduled: list[Callable[[], None]] = []
        self.observed: list[tuple[str, str]] = []
        config = SessionConfig(
            store=self.store,
            call_timeout=call_timeout,
            max_payload=max_payload,
            observers=(lambda rpc, outcome, _secs: self.observed.append((rpc, outcome)),),
        )
        self.session = Session(config, self.written.append, self._close, schedule or self.scheduled.append)

    def _close(self) -> None:
        self.closes += 1

    def feed(self, data: bytes) -> None:
        self.session.data_received(data)

    def take(self) -> list[Frame]:
        """Every frame written since the last take()."""
        decoder = codec.FrameDecoder()
        decoder.feed(b"".join(self.written))
        self.written.clear()
        frames = []
        while (frame := decoder.next_frame()) is not None:
            frames.append(frame)
        assert decoder.buffered == 0, "a reply frame was written partially"
        return frames

    def prepare(self, *entries: tuple[str, str]) -> int:
        self.feed(prepare_conf_frame(conf(*entries)))
        (frame,) = self.take()
        assert frame.type == RPCType.PREPARE_CONF, frame
        return codec.decode_prepare_conf_reply(frame.payload)

    def call(self, token: int, **kwargs: Any) -> list[Frame]:
        self.feed(http_req_call_frame(conf_token=token, **kwargs))
        return self.take()

    def reply(self, token: int, **kwargs: Any) -> HTTPReqCallReply:
        (frame,) = self.call(token, **kwargs)
        assert frame.type == RPCType.HTTP_REQ_CALL, f"expected a reply, got type {frame.type}"
        return codec.decode_http_req_call_reply(frame.payload)

    def answer(self, *results: bytes | None) -> None:
        self.feed(b"".join(codec.extra_info_result_frame(r) for r in results))


def error_code(frames: list[Frame]) -> ErrCode:
    """The code of the single Err frame in ``frames`` (and proof nothing else was sent)."""
    assert [f.type for f in frames] == [RPCType.ERR], f"expected one Err frame, got types {[f.type for f in frames]}"
    return codec.decode_error(frames[0].payload)


def stop_body(reply: HTTPReqCallReply) -> Any:
    assert isinstance(reply.action, Stop), reply
    return json.loads(reply.action.body)


def queries(frames: list[Frame]) -> list[object]:
    assert all(f.type == RPCType.EXTRA_INFO for f in frames), [f.type for f in frames]
    return [codec.decode_extra_info_query(f.payload) for f in frames]


def largest_body_frame() -> bytes:
    """An ExtraInfo answer whose payload is exactly MAX_PAYLOAD (16 MiB - 1) bytes.

    FlatBuffers builders pad buffers to 4 bytes, so the odd maximum is reached with unreferenced
    trailing bytes, which any FlatBuffers reader must ignore.
    """
    empty = len(codec.extra_info_result_frame(b"")) - 4
    payload = codec.extra_info_result_frame(b"\xab" * (MAX_PAYLOAD - empty - 8))[4:]
    return codec.encode_frame(RPCType.EXTRA_INFO, payload + b"\x00" * (MAX_PAYLOAD - len(payload)))


class ReturnsString(BasePlugin[str]):
    name = "returns-string"

    async def on_request(self, conf: str, request: HTTPRequest) -> Any:
        return "not a Stop"


class UnencodableStop(BasePlugin[str]):
    """Returns a Stop the codec cannot encode (an int header value), optionally after a real await."""

    name = "unencodable"

    async def on_request(self, conf: str, request: HTTPRequest) -> Any:
        if conf == "after-await":
            await asyncio.sleep(0)
        return Stop(403, (("x-count", 5),))  # type: ignore[arg-type]


class UnencodableResponse(BasePlugin[str]):
    name = "unencodable-resp"

    async def on_response(self, conf: str, response: Any) -> None:
        response.set_header("x-count", 5)


class VarsInTask(BasePlugin[str]):
    """Awaits vars() inside a separate asyncio Task it spawns."""

    name = "vars-in-task"

    async def on_request(self, conf: str, request: HTTPRequest) -> Any:
        await asyncio.ensure_future(request.vars("a"))
        return Stop(200)


class RaisesInResponse(BasePlugin[str]):
    name = "resp-raise"

    async def on_response(self, conf: str, response: Any) -> None:
        raise ValueError("response filter bug")


@pytest.fixture
def wire() -> Wire:
    return Wire()


class TestErrorMapping:
    def test_unknown_token_is_conf_token_not_found(self, wire: Wire) -> None:
        """An unknown token gets a type-0 Err with CONF_TOKEN_NOT_FOUND, so APISIX re-prepares."""
        assert error_code(wire.call(4242, id=1)) == ErrCode.CONF_TOKEN_NOT_FOUND
        assert wire.closes == 0
        assert wire.observed == [("http_req_call", "conf_token_not_found")]

    def test_unknown_token_on_response_call(self, wire: Wire) -> None:
        """HTTPRespCall with an unknown token maps the same way."""
        wire.feed(codec.http_resp_call_frame(id=3, conf_token=999))

        assert error_code(wire.take()) == ErrCode.CONF_TOKEN_NOT_FOUND

    def test_malformed_call_payload_is_bad_request(self, wire: Wire) -> None:
        """A payload that is not an HTTPReqCall table gets BAD_REQUEST; the connection stays usable."""
        wire.feed(codec.encode_frame(RPCType.HTTP_REQ_CALL, b"\xff" * 12))

        assert error_code(wire.take()) == ErrCode.BAD_REQUEST
        assert wire.closes == 0
        token = wire.prepare(("stop", '{"status": 401}'))
        assert wire.reply(token, id=5) == HTTPReqCallReply(5, Stop(401))

    def test_malformed_prepare_payload_is_bad_request(self, wire: Wire) -> None:
        """A PrepareConf that cannot be decoded is answered with BAD_REQUEST, not a token."""
        wire.feed(codec.encode_frame(RPCType.PREPARE_CONF, b"\x01\x02\x03"))

        assert error_code(wire.take()) == ErrCode.BAD_REQUEST

    def test_unknown_rpc_type_is_bad_request(self, wire: Wire) -> None:
        """RPC type 9 does not exist: BAD_REQUEST as type 0, and the connection carries on."""
        wire.feed(codec.encode_frame(9, b"\x00" * 12))

        assert error_code(wire.take()) == ErrCode.BAD_REQUEST
        assert wire.closes == 0
        assert wire.call(77) != []

    def test_plugin_raising_is_service_unavailable(self, wire: Wire) -> None:
        """A filter exception fails the call closed with SERVICE_UNAVAILABLE."""
        token = wire.prepare(("raise", "x"))

        assert error_code(wire.call(token, id=8)) == ErrCode.SERVICE_UNAVAILABLE
        assert wire.closes == 0

    @pytest.mark.parametrize("status", [99, 600, 700, 70000, -1])
    def test_bad_stop_status_is_service_unavailable(self, wire: Wire, status: int) -> None:
        """A Stop status outside 100..599 is a plugin bug: SERVICE_UNAVAILABLE, never a pass."""
        token = wire.prepare(("bad-stop", str(status)))

        assert error_code(wire.call(token)) == ErrCode.SERVICE_UNAVAILABLE

    def test_stop_status_zero_means_200(self, wire: Wire) -> None:
        """Status 0 is valid on the wire (APISIX turns it into 200)."""
        token = wire.prepare(("bad-stop", "0"))

        assert wire.reply(token, id=2).action == Stop(0)

    def test_plugin_returning_non_stop_is_service_unavailable(self) -> None:
        """Returning anything but Stop or None fails the call."""
        wire = Wire(PluginRegistry([ReturnsString()]))
        token = wire.prepare(("returns-string", ""))

        assert error_code(wire.call(token)) == ErrCode.SERVICE_UNAVAILABLE

    @pytest.mark.parametrize("conf_value", ["", "after-await"])
    def test_unencodable_stop_is_service_unavailable(self, conf_value: str) -> None:
        """A Stop the codec cannot encode fails the call with an Err; nothing escapes the session."""
        wire = Wire(PluginRegistry([UnencodableStop()]))
        token = wire.prepare(("unencodable", conf_value))
        frames = wire.call(token)
        while wire.scheduled:
            wire.scheduled.pop(0)()
            frames += wire.take()

        assert error_code(frames) == ErrCode.SERVICE_UNAVAILABLE
        assert not wire.session.busy

    def test_unencodable_response_is_service_unavailable(self) -> None:
        """The same holds for an ext-plugin-post-resp reply."""
        wire = Wire(PluginRegistry([UnencodableResponse()]))
        token = wire.prepare(("unencodable-resp", ""))
        wire.feed(codec.http_resp_call_frame(id=1, conf_token=token))

        assert error_code(wire.take()) == ErrCode.SERVICE_UNAVAILABLE

    def test_response_filter_raising_is_service_unavailable(self) -> None:
        """ext-plugin-post-resp failures are Err frames too, not an unchanged response."""
        wire = Wire(PluginRegistry([RaisesInResponse()]))
        token = wire.prepare(("resp-raise", ""))
        wire.feed(codec.http_resp_call_frame(id=1, conf_token=token))

        assert error_code(wire.take()) == ErrCode.SERVICE_UNAVAILABLE

    @pytest.mark.parametrize(
        "entries",
        [
            (("strict-json", "[1, 2]"),),
            (("strict-json", "{bad"),),
            (("echo", ""), ("no-such-plugin", "{}")),
            (("set-header", "no colon"),),
        ],
    )
    def test_invalid_conf_is_an_error_at_prepare(self, wire: Wire, entries: tuple[tuple[str, str], ...]) -> None:
        """A conf a plugin rejects (or an unknown plugin) gets an Err at PrepareConf, never a token."""
        wire.feed(prepare_conf_frame(conf(*entries)))

        assert error_code(wire.take()) == ErrCode.BAD_REQUEST
        assert len(wire.store) == 0
        assert wire.observed == [("prepare_conf", "bad_request")]

    @pytest.mark.parametrize(
        "entries",
        [(("raise", "x"),), (("bad-stop", "1000"),), (("set-header", "x: y"), ("raise", "late"))],
    )
    def test_never_an_action_less_reply_on_failure(self, wire: Wire, entries: tuple[tuple[str, str], ...]) -> None:
        """No failing call is ever answered with type 2 (which APISIX would treat as "pass")."""
        token = wire.prepare(*entries)
        frames = wire.call(token)

        assert RPCType.HTTP_REQ_CALL not in [f.type for f in frames]
        assert error_code(frames) == ErrCode.SERVICE_UNAVAILABLE


class TestRequestContents:
    def test_id_zero_round_trips(self, wire: Wire) -> None:
        """id 0 (the first request of worker 0) is a normal id: the Stop is sent with id 0."""
        token = wire.prepare(("stop", '{"status": 403, "body": "no"}'))

        assert wire.reply(token, id=0) == HTTPReqCallReply(0, Stop(403, (), b"no"))

    def test_largest_id_round_trips(self, wire: Wire) -> None:
        """The id is echoed as a full uint32."""
        token = wire.prepare(("stop", "{}"))

        assert wire.reply(token, id=0xFFFFFFFF).id == 0xFFFFFFFF

    def test_empty_chain_passes_with_id(self, wire: Wire) -> None:
        """An empty conf list is a success with no action (the route has no runner plugins)."""
        token = wire.prepare()

        assert wire.reply(token, id=12) == HTTPReqCallReply(12)

    def test_flag_args_are_none(self, wire: Wire) -> None:
        """?debug (no value) reaches the plugin as None; ?y= as an empty string."""
        token = wire.prepare(("echo", ""))
        seen = stop_body(wire.reply(token, args=(("xx", "y"), ("xx", "z"), ("y", ""), ("debug", None))))

        assert seen["args"] == [["xx", "y"], ["xx", "z"], ["y", ""], ["debug", None]]

    def test_repeated_headers_keep_every_value(self, wire: Wire) -> None:
        """Repeated header names are all visible, in order."""
        token = wire.prepare(("echo", ""))
        headers = (("x-req", "foo"), ("host", "localhost"), ("x-req", "bar"))
        seen = stop_body(wire.reply(token, headers=headers))

        assert seen["x_req"] == ["foo", "bar"]
        assert seen["headers"] == [list(h) for h in headers]

    def test_request_fields(self, wire: Wire) -> None:
        """Method, path, IPv6 source address and id reach the plugin as sent."""
        token = wire.prepare(("echo", "c"))
        seen = stop_body(wire.reply(token, id=9, method="PATCH", path="/a/b", src_ip="2001:db8::1"))

        assert seen == {
            "id": 9,
            "method": "PATCH",
            "path": "/a/b",
            "src_ip": "2001:db8::1",
            "headers": [],
            "args": [],
            "x_req": [],
            "conf": "c",
        }

    def test_missing_src_ip_is_none(self, wire: Wire) -> None:
        """A call without src_ip does not crash the plugin (it sees None)."""
        token = wire.prepare(("echo", ""))

        assert stop_body(wire.reply(token, src_ip=None))["src_ip"] is None

    def test_plugin_chain_in_order_first_stop_wins(self, wire: Wire) -> None:
        """Plugins run in conf order; a Stop ends the chain."""
        token = wire.prepare(("order", "a"), ("order", "b!"), ("raise", "never reached"))
        reply = wire.reply(token)

        assert reply.action == Stop(299, (), b"a,b")

    def test_rewrite_collects_changes_of_all_plugins(self, wire: Wire) -> None:
        """Header changes of several plugins and a new path form one Rewrite."""
        token = wire.prepare(("set-header", "x-a: 1"), ("order", "/new"), ("set-header", "x-b: 2"))

        assert wire.reply(token, id=4) == HTTPReqCallReply(
            4, Rewrite(path="/new", headers=(("x-a", "1"), ("x-b", "2")))
        )


class TestExtraInfo:
    def test_five_vars_are_pipelined(self, wire: Wire) -> None:
        """One vars() call with 5 names writes 5 ExtraInfo frames before any answer is read."""
        token = wire.prepare(("vars", "a,b,c,d,e"))
        frames = wire.call(token, id=6)

        assert queries(frames) == [VarQuery(n) for n in "abcde"]
        wire.answer(b"1", b"2", b"3")
        assert wire.take() == []
        wire.answer(b"4", b"5")
        (reply,) = wire.take()
        decoded = codec.decode_http_req_call_reply(reply.payload)
        assert decoded.id == 6
        assert stop_body(decoded) == {"a": "1", "b": "2", "c": "3", "d": "4", "e": "5"}

    def test_absent_var_is_none_not_empty(self, wire: Wire) -> None:
        """A var APISIX does not have (no result) is None; an empty one is ""."""
        token = wire.prepare(("vars", "missing,empty"))
        wire.call(token)
        wire.answer(None, b"")
        (reply,) = wire.take()

        assert stop_body(codec.decode_http_req_call_reply(reply.payload)) == {"missing": None, "empty": ""}

    def test_request_body(self, wire: Wire) -> None:
        """ReqBody is one ExtraInfo query; the bytes arrive intact."""
        body = bytes(range(256)) * 1200  # 300 KB, every byte value
        token = wire.prepare(("body-digest", ""))

        assert queries(wire.call(token)) == [ReqBodyQuery()]
        wire.answer(body)
        (reply,) = wire.take()
        stop = codec.decode_http_req_call_reply(reply.payload).action
        assert isinstance(stop, Stop)
        assert dict(stop.headers) == {
            "x-body-length": str(len(body)),
            "x-body-sha256": hashlib.sha256(body).hexdigest(),
        }

    def test_wrong_type_while_waiting_closes(self, wire: Wire) -> None:
        """APISIX answering with anything but type 3 while ExtraInfo is pending closes the connection."""
        token = wire.prepare(("vars", "a"))
        wire.call(token)
        wire.feed(http_req_call_frame(conf_token=token))

        assert wire.take() == []
        assert wire.closes == 1
        assert wire.session.closed
        assert ("http_req_call", "aborted") in wire.observed

    def test_answer_when_nothing_was_asked_closes(self, wire: Wire) -> None:
        """An ExtraInfo answer out of the blue is a protocol violation: close, don't answer."""
        wire.answer(b"surprise")

        assert wire.take() == []
        assert wire.closes == 1

    def test_malformed_answer_closes(self, wire: Wire) -> None:
        """An ExtraInfo answer that does not decode ends the connection."""
        token = wire.prepare(("vars", "a"))
        wire.call(token)
        wire.feed(codec.encode_frame(RPCType.EXTRA_INFO, b"\xff" * 8))

        assert wire.take() == []
        assert wire.closes == 1

    def test_input_after_close_is_ignored(self, wire: Wire) -> None:
        """Once closed, the session neither answers nor closes again."""
        wire.answer(b"x")
        wire.feed(prepare_conf_frame(conf()))

        assert wire.take() == []
        assert wire.closes == 1


class TestFraming:
    def test_byte_by_byte_gives_same_result(self) -> None:
        """Feeding one byte at a time produces exactly the bytes a single feed does."""
        script = [
            prepare_conf_frame(conf(("vars", "a,b"), ("set-header", "x: y"))),
            http_req_call_frame(id=1, conf_token=1, headers=(("a", "b"),), args=(("f", None),)),
            codec.extra_info_result_frame(b"A"),
            codec.extra_info_result_frame(None),
        ]
        whole, split = Wire(), Wire()
        for chunk in script:
            whole.feed(chunk)
            for i in range(len(chunk)):
                split.feed(chunk[i : i + 1])

        assert split.written != []
        assert b"".join(split.written) == b"".join(whole.written)
        frames = split.take()
        assert [f.type for f in frames] == [1, 3, 3, 2]

    def test_frames_in_one_chunk_are_all_answered(self, wire: Wire) -> None:
        """Several frames arriving together are handled in order."""
        wire.feed(prepare_conf_frame(conf(("stop", "{}"))) + http_req_call_frame(id=3, conf_token=1))

        assert [f.type for f in wire.take()] == [RPCType.PREPARE_CONF, RPCType.HTTP_REQ_CALL]

    @pytest.mark.parametrize("split", [False, True], ids=["one-chunk", "buffered"])
    def test_frames_before_a_bad_header_are_answered_then_closed(self, wire: Wire, split: bool) -> None:
        """Whole frames ahead of a bad header in the same read are answered, then the connection closes."""
        token = wire.prepare(("stop", '{"status": 401}'))
        data = http_req_call_frame(id=3, conf_token=token) + b"\x02\x00\x00\x00"
        if split:  # part of the request arrived earlier, so the decoder's buffer is in use
            wire.feed(data[:5])
            data = data[5:]
        wire.feed(data)

        (frame,) = wire.take()
        assert codec.decode_http_req_call_reply(frame.payload) == HTTPReqCallReply(3, Stop(401))
        assert wire.closes == 1
        assert wire.session.closed

    def test_zero_length_frame_closes(self, wire: Wire) -> None:
        """A frame announcing an empty payload is a framing error: close, no reply."""
        wire.feed(b"\x02\x00\x00\x00")

        assert wire.take() == []
        assert wire.closes == 1

    def test_oversize_frame_closes_before_body(self) -> None:
        """A header announcing more than the limit closes at once, without buffering the body."""
        wire = Wire(max_payload=1024)
        wire.feed(b"\x02\x00\x04\x01")

        assert wire.closes == 1
        assert wire.take() == []

    def test_largest_frame_is_accepted(self, wire: Wire) -> None:
        """A 16 MiB - 1 payload (the protocol maximum) is a valid frame."""
        token = wire.prepare(("body-digest", ""))
        wire.call(token)
        frame = largest_body_frame()
        assert len(frame) == 4 + MAX_PAYLOAD
        body_length = len(codec.decode_extra_info_result(frame[4:]) or b"")
        assert body_length > MAX_PAYLOAD - 64
        wire.feed(frame)
        (reply,) = wire.take()

        stop = codec.decode_http_req_call_reply(reply.payload).action
        assert isinstance(stop, Stop)
        assert dict(stop.headers)["x-body-length"] == str(body_length)
        assert wire.closes == 0


class TestDeadline:
    def test_hung_plugin_is_cut_off_and_late_answers_dropped(self) -> None:
        """enforce_deadline answers SERVICE_UNAVAILABLE, drops the late ExtraInfo answers, keeps serving."""
        hang = Hang()
        wire = Wire(PluginRegistry([hang, *[p for p in make_registry() if p.name != "hang"]]), call_timeout=0.5)
        token = wire.prepare(("hang", "a,b,c"))
        assert queries(wire.call(token, id=7)) == [VarQuery("a"), VarQuery("b"), VarQuery("c")]
        wire.answer(b"1")

        wire.session.enforce_deadline(time.perf_counter() + 0.6)

        assert error_code(wire.take()) == ErrCode.SERVICE_UNAVAILABLE
        assert hang.closed == 1
        assert not wire.session.busy
        wire.answer(b"2", b"3")  # APISIX answers the queries it read before the Err
        assert wire.take() == []
        assert wire.closes == 0
        token2 = wire.prepare(("stop", '{"status": 418}'))
        assert wire.reply(token2, id=8) == HTTPReqCallReply(8, Stop(418))

    def test_not_cut_off_before_timeout(self) -> None:
        """A call inside its time budget is left alone."""

        async def main() -> None:
            wire = Wire(call_timeout=5)
            token = wire.prepare(("hang", ""))
            assert wire.call(token) == []

            wire.session.enforce_deadline(time.perf_counter())

            assert wire.take() == []
            assert wire.session.busy

        asyncio.run(main())

    def test_idle_session_ignores_deadline(self, wire: Wire) -> None:
        """No call, nothing to cut off."""
        wire.session.enforce_deadline(time.perf_counter() + 1000)

        assert wire.take() == []
        assert wire.closes == 0

    def test_new_call_before_late_answers_closes(self) -> None:
        """After a cut-off APISIX must still answer the queries it got; a new call first is a violation."""
        wire = Wire(call_timeout=0.5)
        token = wire.prepare(("hang", "a,b"))
        wire.call(token)
        wire.session.enforce_deadline(time.perf_counter() + 1)
        wire.take()

        wire.feed(http_req_call_frame(conf_token=token))

        assert wire.closes == 1

    def test_connection_lost_closes_the_plugin(self) -> None:
        """A vanished peer cancels the filter's Task (its finally block runs); nothing is written."""
        hang = Hang()

        async def main() -> None:
            wire = Wire(PluginRegistry([hang]), schedule=asyncio.get_running_loop().call_soon)
            token = wire.prepare(("hang", ""))
            assert wire.call(token) == []
            await asyncio.sleep(0)  # the Task's first step
            assert hang.started == 1

            wire.session.connection_lost()
            await asyncio.sleep(0)

            assert hang.closed == 1
            assert wire.take() == []
            assert not wire.session.busy

        asyncio.run(main())


class TestForeignAwaitables:
    def test_plugin_awaiting_a_timer_is_answered(self) -> None:
        """A filter awaiting asyncio.sleep is resumed by the loop and its Stop is written."""

        async def main() -> list[Frame]:
            wire = Wire(schedule=asyncio.get_running_loop().call_soon)
            token = wire.prepare(("sleep", "0.001"))
            assert wire.call(token, id=1) == []
            for _ in range(200):
                if wire.written:
                    break
                await asyncio.sleep(0.001)
            return wire.take()

        (frame,) = asyncio.run(main())
        assert codec.decode_http_req_call_reply(frame.payload) == HTTPReqCallReply(1, Stop(200, (), b"slept"))

    def test_extra_info_inside_a_spawned_task(self) -> None:
        """A filter in a Task may await ExtraInfo from a Task it spawns (the answer is a real future)."""

        async def main() -> tuple[list[object], list[Frame]]:
            wire = Wire(PluginRegistry([VarsInTask(), *make_registry()]), schedule=asyncio.get_running_loop().call_soon)
            token = wire.prepare(("vars-in-task", ""))
            assert wire.call(token) == []
            for _ in range(3):
                await asyncio.sleep(0)
            asked = queries(wire.take())
            wire.answer(b"1")
            for _ in range(3):
                await asyncio.sleep(0)
            return asked, wire.take()

        asked, (frame,) = asyncio.run(main())
        assert asked == [VarQuery("a")]
        assert codec.decode_http_req_call_reply(frame.payload).action == Stop(200)


class TestResponseCall:
    def test_header_change_returns_full_header_set(self, wire: Wire) -> None:
        """Touching one response header sends the whole set (APISIX replaces all upstream headers)."""
        token = wire.prepare(("resp-header", "X-Added: yes"))
        upstream = (("Content-Type", "text/plain"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"))
        wire.feed(codec.http_resp_call_frame(id=0, conf_token=token, status=201, headers=upstream))
        (frame,) = wire.take()

        assert frame.type == RPCType.HTTP_RESP_CALL
        assert codec.decode_http_resp_call_reply(frame.payload) == HTTPRespCallReply(
            id=0, status=0, headers=(*upstream, ("X-Added", "yes")), body=None
        )

    def test_unchanged_response_sends_no_headers(self, wire: Wire) -> None:
        """Without changes the reply carries no headers, so APISIX keeps the upstream ones."""
        token = wire.prepare(("echo", ""))  # echo has no response filter
        wire.feed(codec.http_resp_call_frame(id=5, conf_token=token, headers=(("A", "b"),)))
        (frame,) = wire.take()

        assert codec.decode_http_resp_call_reply(frame.payload) == HTTPRespCallReply(id=5)


class WrongSignature(BasePlugin[str]):
    """An async on_request that cannot be called with (conf, request): raises before any coroutine exists."""

    name = "wrong-signature"

    async def on_request(self, conf: str) -> Any:  # type: ignore[override]
        return None


class Replaced(BasePlugin[str]):
    """Registered with an async on_request, then replaced on the instance by a plain function
    (the registry cannot see that): returns None, raises, or returns a non-coroutine awaitable."""

    name = "replaced"

    def __init__(self) -> None:
        self.on_request = self._plain  # type: ignore[method-assign]

    def _plain(self, conf: str, request: HTTPRequest) -> Any:
        if conf == "raise":
            raise ValueError("plain bug")
        if conf == "awaitable":
            return _Ready(Stop(418))
        return None


class _Ready:
    """An awaitable that is not a coroutine and finishes at once."""

    def __init__(self, value: object) -> None:
        self.value = value

    def __await__(self) -> Any:
        return self.value
        yield  # pragma: no cover - makes this a generator


class TestOnePluginChain:
    """A chain of one plugin is driven without the chain loop; it must answer exactly like the loop."""

    @staticmethod
    def outcome(registry: PluginRegistry, *entries: tuple[str, str]) -> tuple[list[Frame], list[tuple[str, str]]]:
        wire = Wire(registry)
        token = wire.prepare(*entries)
        wire.observed.clear()
        frames = wire.call(token, id=7)
        while wire.scheduled:
            wire.scheduled.pop(0)()
            frames += wire.take()
        assert not wire.session.busy
        return frames, wire.observed

    @staticmethod
    def registry(plugin: Any) -> PluginRegistry:
        registry = PluginRegistry([*make_registry()])
        if isinstance(plugin, Replaced):
            plugin.on_request = BasePlugin.on_request.__get__(plugin)  # type: ignore[method-assign]
            registry.register(plugin)
            plugin.on_request = plugin._plain  # type: ignore[method-assign]
        else:
            registry.register(plugin)
        return registry

    @pytest.mark.parametrize(
        ("plugin", "conf_value"),
        [
            (ReturnsString(), ""),
            (WrongSignature(), ""),
            (UnencodableStop(), ""),
            (UnencodableStop(), "after-await"),
            (Replaced(), ""),
            (Replaced(), "raise"),
            (Replaced(), "awaitable"),
        ],
        ids=["non-stop", "wrong-signature", "unencodable", "late", "plain-none", "plain-raise", "plain-awaitable"],
    )
    def test_same_answer_alone_and_in_a_chain(self, plugin: Any, conf_value: str, caplog: Any) -> None:
        """Alone or after a plugin that changes nothing: same frames, same metrics, same log lines."""
        registry = self.registry(plugin)
        with caplog.at_level("INFO", logger="mtls_guard.runner"):
            alone = self.outcome(registry, (plugin.name, conf_value))
            alone_log = [r.getMessage() for r in caplog.records]
            caplog.clear()
            chained = self.outcome(registry, ("order", "first"), (plugin.name, conf_value))
            chained_log = [r.getMessage() for r in caplog.records]

        assert alone == chained
        assert alone_log == chained_log

    def test_broken_plugins_fail_closed(self) -> None:
        """The broken cases above are Err replies (fail closed); a working awaitable still works."""
        for plugin, conf_value in ((WrongSignature(), ""), (Replaced(), ""), (Replaced(), "raise")):
            frames, observed = self.outcome(self.registry(plugin), (plugin.name, conf_value))
            assert error_code(frames) == ErrCode.SERVICE_UNAVAILABLE
            assert observed == [("http_req_call", "service_unavailable")]
        (frame,), _ = self.outcome(self.registry(Replaced()), ("replaced", "awaitable"))
        assert codec.decode_http_req_call_reply(frame.payload) == HTTPReqCallReply(7, Stop(418))

    def test_finished_calls_leave_no_cyclic_garbage(self) -> None:
        """No reference cycle per call: answered calls are freed by reference counting alone."""
        import gc

        wire = Wire()
        token = wire.prepare(("vars", "host"))
        gc.collect()
        gc.disable()
        try:
            for call_id in range(20):
                wire.feed(http_req_call_frame(conf_token=token, id=call_id))
                wire.answer(b"example.com")
                assert wire.take()[-1].type == RPCType.HTTP_REQ_CALL
            assert gc.collect() == 0
        finally:
            gc.enable()
