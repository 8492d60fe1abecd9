"""Differential tests: runner.protocol.codec against the reference FlatBuffers implementation.

Payloads built with ``flatbuffers.Builder`` (through the generated ``A6`` modules where they
exist) must decode identically with our decoders, and our encoded payloads must read back to
the same values through the reference accessors. See tests/unit/_reference.py.
"""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from runner.protocol import codec
from runner.protocol.messages import (
    ConfEntry,
    ErrCode,
    ExtraInfoQuery,
    HTTPReqCallReply,
    HTTPRespCallReply,
    PrepareConfRequest,
)
from tests.unit import _reference as ref


def body(frame: bytes) -> bytes:
    return frame[4:]


class TestReferenceToCodec:
    """Reference-built payloads decoded by our codec."""

    @given(entries=ref.conf_entries, key=st.none() | ref.utf8_text)
    def test_prepare_conf(self, entries: tuple[ConfEntry, ...], key: str | None) -> None:
        """A reference PrepareConf request decodes to the same entries and key."""
        assert codec.decode_prepare_conf(ref.build_prepare_conf(entries, key)) == PrepareConfRequest(entries, key)

    @given(fields=ref.req_calls)
    def test_http_req_call(self, fields: dict[str, Any]) -> None:
        """A reference HTTPReqCall decodes to the same fields through the lazy view."""
        req = codec.decode_http_req_call(ref.build_http_req_call(**fields))
        assert {name: getattr(req, name) for name in fields} == fields

    @given(id=ref.u32, conf_token=ref.u32, status=ref.u16, headers=ref.pairs)
    def test_http_resp_call(self, id: int, conf_token: int, status: int, headers: ref.Pairs) -> None:
        """A hand-built reference HTTPRespCall decodes to the same fields."""
        resp = codec.decode_http_resp_call(
            ref.build_http_resp_call(id=id, conf_token=conf_token, status=status, headers=headers)
        )
        assert (resp.id, resp.conf_token, resp.status, resp.headers) == (id, conf_token, status, headers)

    @given(result=st.none() | ref.bodies)
    def test_extra_info_result(self, result: bytes | None) -> None:
        """A reference ExtraInfo.Resp decodes to the same result, absent as None."""
        assert codec.decode_extra_info_result(ref.build_extra_info_result(result)) == result

    @given(token=ref.u32)
    def test_prepare_conf_reply(self, token: int) -> None:
        """A reference PrepareConf.Resp decodes to the same token (0 is omitted by the builder)."""
        assert codec.decode_prepare_conf_reply(ref.build_prepare_conf_reply(token)) == token

    @given(code=st.sampled_from(ErrCode))
    def test_error(self, code: ErrCode) -> None:
        """A reference Err.Resp decodes to the same code."""
        assert codec.decode_error(ref.build_error(code)) is code

    @given(reply=ref.req_call_replies)
    def test_http_req_call_reply(self, reply: HTTPReqCallReply) -> None:
        """A reference HTTPReqCall.Resp (Rewrite with slots 3/4 hand-built) decodes to the same reply."""
        assert codec.decode_http_req_call_reply(ref.build_http_req_call_reply(reply)) == reply

    @given(reply=ref.resp_call_replies)
    def test_http_resp_call_reply(self, reply: HTTPRespCallReply) -> None:
        """A hand-built reference HTTPRespCall.Resp decodes to the same reply."""
        assert codec.decode_http_resp_call_reply(ref.build_http_resp_call_reply(reply)) == reply

    @given(query=ref.queries)
    def test_extra_info_query(self, query: ExtraInfoQuery) -> None:
        """A reference ExtraInfo.Req (RespBody hand-built) decodes to the same query."""
        assert codec.decode_extra_info_query(ref.build_extra_info_query(query)) == query


class TestCodecToReference:
    """Our encoded payloads read back by the reference accessors."""

    @given(entries=ref.conf_entries, key=st.none() | ref.utf8_text)
    def test_prepare_conf(self, entries: tuple[ConfEntry, ...], key: str | None) -> None:
        """Our PrepareConf request reads back with the generated accessors."""
        frame = codec.prepare_conf_request_frame(entries, key)
        assert ref.read_prepare_conf(body(frame)) == PrepareConfRequest(entries, key)

    @given(fields=ref.req_calls)
    def test_http_req_call(self, fields: dict[str, Any]) -> None:
        """Our HTTPReqCall reads back with the generated accessors."""
        assert ref.read_http_req_call(body(codec.http_req_call_frame(**fields))) == fields

    @given(id=ref.u32, conf_token=ref.u32, status=ref.u16, headers=ref.pairs)
    def test_http_resp_call(self, id: int, conf_token: int, status: int, headers: ref.Pairs) -> None:
        """Our HTTPRespCall reads back through flatbuffers.table.Table."""
        frame = codec.http_resp_call_frame(id=id, conf_token=conf_token, status=status, headers=headers)
        expected = {"id": id, "conf_token": conf_token, "status": status, "headers": headers}
        assert ref.read_http_resp_call(body(frame)) == expected

    @given(result=st.none() | ref.bodies)
    def test_extra_info_result(self, result: bytes | None) -> None:
        """Our ExtraInfo.Resp reads back with the same result."""
        assert ref.read_extra_info_result(body(codec.extra_info_result_frame(result))) == result

    @given(token=ref.u32)
    def test_prepare_conf_reply(self, token: int) -> None:
        """Our PrepareConf.Resp reads back with the same token."""
        assert ref.read_prepare_conf_reply(body(codec.prepare_conf_reply_frame(token))) == token

    @given(code=st.sampled_from(ErrCode))
    def test_error(self, code: ErrCode) -> None:
        """Our Err.Resp reads back with the same code."""
        assert ref.read_error(body(codec.error_frame(code))) == code

    @given(reply=ref.req_call_replies)
    def test_http_req_call_reply(self, reply: HTTPReqCallReply) -> None:
        """Our HTTPReqCall.Resp reads back (Stop via A6 slots, Rewrite slots 3/4 via Table)."""
        assert ref.read_http_req_call_reply(body(codec.http_req_call_reply_frame(reply))) == reply

    @given(reply=ref.resp_call_replies)
    def test_http_resp_call_reply(self, reply: HTTPRespCallReply) -> None:
        """Our HTTPRespCall.Resp reads back through flatbuffers.table.Table."""
        assert ref.read_http_resp_call_reply(body(codec.http_resp_call_reply_frame(reply))) == reply

    @given(query=ref.queries)
    def test_extra_info_query(self, query: ExtraInfoQuery) -> None:
        """Our ExtraInfo.Req reads back with the same info type and var name."""
        assert ref.read_extra_info_query(body(codec.extra_info_query_frame(query))) == query
