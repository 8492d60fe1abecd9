"""The plugin-facing API: Headers, HTTPRequest (-> one Rewrite), HTTPResponse (-> full header set)."""

from __future__ import annotations

from collections.abc import Coroutine, Sequence
from typing import Any, TypeVar

import pytest

from runner import BasePlugin, Headers, HTTPRequest, HTTPResponse, Plugin
from runner.driver import Pending
from runner.protocol import codec
from runner.protocol.messages import ExtraInfoQuery, Pairs, ReqBodyQuery, RespBodyQuery, Rewrite, VarQuery
from runner.testing import http_req_call_frame

T = TypeVar("T")


class FakeChannel:
    """Answers ExtraInfo queries at once from a table and records every batch."""

    def __init__(self, vars: dict[str, bytes | None] | None = None, body: bytes | None = None) -> None:
        self.vars = vars or {}
        self.body = body
        self.batches: list[list[ExtraInfoQuery]] = []

    def query(self, queries: Sequence[ExtraInfoQuery]) -> Pending[list[bytes | None]]:
        self.batches.append(list(queries))
        pending: Pending[list[bytes | None]] = Pending()
        pending.set_result([self.vars.get(q.name) if isinstance(q, VarQuery) else self.body for q in queries])
        return pending


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that only awaits already-resolved Pendings."""
    try:
        coro.send(None)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]
    coro.close()
    raise AssertionError("coroutine suspended")


def make_request(channel: FakeChannel | None = None, **kwargs: Any) -> HTTPRequest:
    kwargs.setdefault("conf_token", 1)
    frame = http_req_call_frame(**kwargs)
    return HTTPRequest(codec.decode_http_req_call(frame[4:]), channel or FakeChannel())


def make_response(
    channel: FakeChannel | None = None, *, status: int = 200, headers: Pairs = (), id: int = 1
) -> HTTPResponse:
    frame = codec.http_resp_call_frame(id=id, conf_token=1, status=status, headers=headers)
    return HTTPResponse(codec.decode_http_resp_call(frame[4:]), channel or FakeChannel())


class TestHeaders:
    def test_lookup_is_case_insensitive(self) -> None:
        """Header names match regardless of case; values keep theirs."""
        headers = Headers((("Content-Type", "Text/Plain"),))

        assert headers.get("content-type") == "Text/Plain"
        assert "CONTENT-TYPE" in headers

    def test_repeated_names(self) -> None:
        """get() is the first value, get_all() every value in order."""
        headers = Headers((("x-req", "foo"), ("other", "1"), ("X-Req", "bar")))

        assert headers.get("x-req") == "foo"
        assert headers.get_all("x-req") == ("foo", "bar")
        assert len(headers) == 3

    def test_flag_without_value(self) -> None:
        """A name without value is present, get() falls back to the default, get_all() shows None."""
        args = Headers((("debug", None),))

        assert "debug" in args
        assert args.get("debug") is None
        assert args.get("debug", "set") == "set"
        assert args.get_all("debug") == (None,)

    def test_absent_name(self) -> None:
        """Missing names give the default and an empty tuple."""
        headers = Headers(())

        assert headers.get("x", "d") == "d"
        assert headers.get_all("x") == ()
        assert "x" not in headers
        assert 5 not in headers


class TestRequestView:
    def test_fields_as_sent(self) -> None:
        """id, token, method, path and source address come straight from the call."""
        request = make_request(id=0, conf_token=9, method="DELETE", path="/p", src_ip="10.1.2.3")

        assert (request.id, request.conf_token, request.method, request.path, request.src_ip) == (
            0,
            9,
            "DELETE",
            "/p",
            "10.1.2.3",
        )

    def test_ipv6_and_missing_source_address(self) -> None:
        """IPv6 addresses are formatted compactly; no address is None."""
        assert make_request(src_ip="::1").src_ip == "::1"
        assert make_request(src_ip=None).src_ip is None

    def test_args_keep_flags_and_repeats(self) -> None:
        """Query args are a multi-valued view with flags as None."""
        request = make_request(args=(("a", "1"), ("a", "2"), ("flag", None), ("empty", "")))

        assert request.args.get_all("a") == ("1", "2")
        assert request.args.get_all("flag") == (None,)
        assert request.args.get("empty") == ""


class TestRequestChanges:
    def test_no_change_no_rewrite(self) -> None:
        """A plugin that only reads produces no Rewrite at all."""
        request = make_request(headers=(("a", "b"),))
        _ = request.headers.get("a")

        assert request.rewrite() is None

    def test_changes_form_one_rewrite(self) -> None:
        """Path, header set/delete, args, response headers and body all land in one Rewrite."""
        request = make_request(path="/old")
        request.set_path("/new")
        request.set_header("X-User", "alice")
        request.delete_header("Authorization")
        request.set_arg("tag", "a", "b")
        request.delete_arg("token")
        request.add_response_header("X-Trace", "1")
        request.add_response_header("X-Trace", "2")
        request.set_body(b"{}")

        assert request.path == "/new"
        assert request.rewrite() == Rewrite(
            path="/new",
            headers=(("x-user", "alice"), ("authorization", None)),
            args=(("tag", "a"), ("tag", "b"), ("token", None)),
            resp_headers=(("x-trace", "1"), ("x-trace", "2")),
            body=b"{}",
        )

    def test_last_header_change_wins(self) -> None:
        """Setting then deleting a header (any case) leaves only the delete."""
        request = make_request()
        request.set_header("X-A", "1")
        request.delete_header("x-a")

        rewrite = request.rewrite()
        assert rewrite is not None
        assert rewrite.headers == (("x-a", None),)

    @pytest.mark.parametrize("path", ["relative", "/with?query", ""])
    def test_bad_path_rejected(self, path: str) -> None:
        """Paths must be absolute and carry no query (APISIX would percent-encode the '?')."""
        with pytest.raises(ValueError, match="path"):
            make_request().set_path(path)

    @pytest.mark.parametrize("name", ["", "a b", "x:y", "a\r\nb", "nul\x00"])
    def test_bad_header_names_rejected(self, name: str) -> None:
        """Header names that could split or corrupt the upstream request are refused."""
        request = make_request()
        with pytest.raises(ValueError, match="header name"):
            request.set_header(name, "v")
        with pytest.raises(ValueError, match="header name"):
            request.add_response_header(name, "v")

    def test_set_arg_needs_a_value(self) -> None:
        """set_arg without values would be a silent delete; it must be explicit."""
        with pytest.raises(ValueError, match="delete_arg"):
            make_request().set_arg("a")

    def test_empty_body_rejected(self) -> None:
        """APISIX ignores an empty body rewrite, so asking for one is an error."""
        with pytest.raises(ValueError, match="empty body"):
            make_request().set_body(b"")


class TestExtraInfo:
    def test_vars_in_one_batch_absent_is_none(self) -> None:
        """vars() asks for all missing names at once; absent vars are None, empty ones ""."""
        channel = FakeChannel({"route_id": b"1", "empty": b""})
        request = make_request(channel)

        values = run(request.vars("route_id", "missing", "empty", "route_id"))

        assert values == {"route_id": "1", "missing": None, "empty": ""}
        assert channel.batches == [[VarQuery("route_id"), VarQuery("missing"), VarQuery("empty")]]

    def test_vars_are_cached(self) -> None:
        """A var already fetched (even an absent one) is not asked for again."""
        channel = FakeChannel({"a": b"1"})
        request = make_request(channel)
        run(request.vars("a", "gone"))

        assert run(request.var("gone")) is None
        assert run(request.vars("a", "b")) == {"a": "1", "b": None}
        assert channel.batches == [[VarQuery("a"), VarQuery("gone")], [VarQuery("b")]]

    def test_non_utf8_var_survives(self) -> None:
        """Bytes that are not UTF-8 are kept (surrogateescape), not replaced or rejected."""
        request = make_request(FakeChannel({"v": b"\xff\xfe"}))

        assert run(request.var("v")) == "\udcff\udcfe"

    def test_body_is_fetched_once(self) -> None:
        """body() costs one ReqBody round trip and is cached; no body is None."""
        channel = FakeChannel(body=b"payload")
        request = make_request(channel)

        assert run(request.body()) == b"payload"
        assert run(request.body()) == b"payload"
        assert channel.batches == [[ReqBodyQuery()]]
        assert run(make_request(FakeChannel(body=None)).body()) is None

    def test_response_body(self) -> None:
        """HTTPResponse.body() asks for RespBody."""
        channel = FakeChannel(body=b"upstream")
        response = make_response(channel)

        assert run(response.body()) == b"upstream"
        assert run(response.body()) == b"upstream"
        assert channel.batches == [[RespBodyQuery()]]


class TestResponse:
    UPSTREAM: Pairs = (("Content-Type", "text/html"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"))

    def test_untouched_response_changes_nothing(self) -> None:
        """Without changes: status 0, no headers (APISIX keeps the upstream's), no body."""
        response = make_response(headers=self.UPSTREAM, status=502)

        assert response.status == 502
        assert response.changes() == (0, (), None)

    def test_header_change_keeps_the_rest(self) -> None:
        """set_header replaces one name and keeps every other upstream header, repeats included."""
        response = make_response(headers=self.UPSTREAM)
        response.set_header("content-type", "application/json")

        _, headers, _ = response.changes()
        assert headers == (("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"), ("content-type", "application/json"))
        assert response.headers.get("Content-Type") == "application/json"

    def test_add_and_delete(self) -> None:
        """add_header appends a repeat; delete_header removes every value of a name, any case."""
        response = make_response(headers=self.UPSTREAM)
        response.add_header("Set-Cookie", "c=3")
        response.delete_header("set-cookie")
        response.add_header("X-New", "1")

        assert response.changes()[1] == (("Content-Type", "text/html"), ("X-New", "1"))

    def test_status_and_body(self) -> None:
        """A new status and body are reported as set."""
        response = make_response(status=200)
        response.set_status(403)
        response.set_body(b"denied")

        assert response.status == 403
        assert response.changes() == (403, (), b"denied")

    @pytest.mark.parametrize("status", [99, 600, 0])
    def test_bad_status_rejected(self, status: int) -> None:
        """Statuses outside 100..599 are refused at once."""
        with pytest.raises(ValueError, match="status"):
            make_response().set_status(status)


class TestContract:
    def test_base_plugin_defaults(self) -> None:
        """BasePlugin passes the raw conf string through and its filters do nothing."""
        plugin: BasePlugin[str] = BasePlugin()

        plugin.setup({"any": "option"})
        assert plugin.parse_conf("raw") == "raw"
        assert run(plugin.on_request("c", make_request())) is None
        assert run(plugin.on_response("c", make_response())) is None

    def test_base_plugin_satisfies_protocol(self) -> None:
        """Subclasses of BasePlugin are Plugins (runtime-checkable protocol)."""
        assert isinstance(BasePlugin(), Plugin)
