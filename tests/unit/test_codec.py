"""Unit tests for runner.protocol.codec messages: round trips, edge cases, fixtures, malformed input."""

from __future__ import annotations

import contextlib
import struct
from collections.abc import Callable
from functools import partial

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from runner.protocol import _flat, _flat_read, codec
from runner.protocol.codec import DecodeError
from runner.protocol.messages import (
    MAX_PAYLOAD,
    ConfEntry,
    ErrCode,
    ExtraInfoQuery,
    HTTPReqCallReply,
    HTTPRespCallReply,
    Method,
    PrepareConfRequest,
    ReqBodyQuery,
    RespBodyQuery,
    Rewrite,
    RPCType,
    Stop,
    VarQuery,
)
from tests.unit import _reference as ref

# Sample payloads from runner.md §1.5 (built with a6pluginprotos 0.2.1 + flatbuffers 25.12.19).
CONF_REPLY_TOKEN_1 = bytes.fromhex("0c00000000000600080004000600000001000000")
ERR_CONF_TOKEN_NOT_FOUND = bytes.fromhex("0c00000000000600080007000600000000000002")
EMPTY_TABLE = bytes.fromhex("080000000400040004000000")
STOP_403_HI = bytes.fromhex(
    "1000000000000a0012000c000b0004000a00000018000000000000010700000000000a000c000a000000"
    "04000a00000008000000000093010200000068690000"
)


def payload(frame: bytes, rpc_type: int) -> bytes:
    """Check a whole frame's header and return its payload."""
    assert frame[0] == rpc_type
    assert int.from_bytes(frame[1:4], "big") == len(frame) - 4 > 0
    return frame[4:]


def req_call(**fields: object) -> codec.HTTPReqCall:
    args = {"id": 1, "conf_token": 1, **fields}
    return codec.decode_http_req_call(payload(codec.http_req_call_frame(**args), RPCType.HTTP_REQ_CALL))  # type: ignore[arg-type]


class TestPrepareConf:
    @given(entries=ref.conf_entries, key=st.none() | ref.utf8_text)
    def test_round_trip(self, entries: tuple[ConfEntry, ...], key: str | None) -> None:
        """A PrepareConf request decodes to the entries (in order) and key it was built from."""
        frame = codec.prepare_conf_request_frame(entries, key)
        assert codec.decode_prepare_conf(payload(frame, 1)) == PrepareConfRequest(entries, key)

    def test_empty_and_absent_conf(self) -> None:
        """An empty conf vector and an absent one both give no entries."""
        assert codec.decode_prepare_conf(payload(codec.prepare_conf_request_frame(()), 1)).entries == ()
        assert codec.decode_prepare_conf(EMPTY_TABLE) == PrepareConfRequest(())

    def test_non_json_values_and_duplicates(self) -> None:
        """Conf values are opaque strings and duplicate plugin names are kept in order."""
        entries = (ConfEntry("a", "not json {"), ConfEntry("a", ""), ConfEntry("b", '{"x": "é"}'))
        frame = codec.prepare_conf_request_frame(entries, "k")
        assert codec.decode_prepare_conf(payload(frame, 1)).entries == entries

    def test_non_utf8_conf_rejected(self) -> None:
        """A conf entry that is not UTF-8 is a DecodeError, not a surrogate-escaped string."""
        frame = codec.prepare_conf_request_frame((ConfEntry("a", "\udcff"),))
        with pytest.raises(DecodeError, match="UTF-8"):
            codec.decode_prepare_conf(payload(frame, 1))

    def test_entry_without_value_rejected(self) -> None:
        """A conf entry without a value is a DecodeError."""
        out = _flat.new_frame()
        frame = _flat.finish(out, 1, _flat.put_object(out, [], [(0, (("a", None),))]))
        with pytest.raises(DecodeError, match="without a value"):
            codec.decode_prepare_conf(payload(frame, 1))

    def test_reply(self) -> None:
        """The conf token reply round-trips and matches the runner.md fixture's value."""
        assert codec.decode_prepare_conf_reply(payload(codec.prepare_conf_reply_frame(1), 1)) == 1
        assert codec.decode_prepare_conf_reply(payload(codec.prepare_conf_reply_frame(2**32 - 1), 1)) == 2**32 - 1
        assert codec.decode_prepare_conf_reply(CONF_REPLY_TOKEN_1) == 1

    @pytest.mark.parametrize("token", [-1, 2**32])
    def test_reply_token_range(self, token: int) -> None:
        """A token outside uint32 raises ValueError."""
        with pytest.raises(ValueError, match="uint32"):
            codec.prepare_conf_reply_frame(token)


class TestHTTPReqCall:
    @given(fields=ref.req_calls)
    def test_round_trip(self, fields: dict[str, object]) -> None:
        """Every field of an HTTPReqCall decodes to the value it was built from."""
        req = req_call(**fields)
        assert {name: getattr(req, name) for name in fields} == fields

    def test_id_zero_and_defaults(self) -> None:
        """id 0 is valid, and absent method/path/vectors read as GET/None/()."""
        req = codec.decode_http_req_call(EMPTY_TABLE)
        assert (req.id, req.conf_token, req.method) == (0, 0, Method.GET)
        assert (req.path, req.src_ip, req.headers, req.args) == (None, None, (), ())

    def test_flag_args_and_empty_values(self) -> None:
        """A flag arg has value None while an empty arg keeps the empty string."""
        args = (("xx", "y"), ("xx", "z"), ("y", ""), ("z", None))
        assert req_call(args=args).args == args

    def test_repeated_headers_in_order(self) -> None:
        """Repeated header names are all kept, in the order sent."""
        headers = (("x-req", "foo"), ("host", "localhost"), ("x-req", "bar"))
        req = req_call(headers=headers)
        assert req.headers == headers
        assert req.header("x-req") == "foo"
        assert req.header("X-REQ") == "foo"
        assert req.header("missing") is None
        assert req.header("\ud800") is None

    @given(headers=ref.pairs, name=ref.http_text)
    def test_header_lookup_matches_headers(self, headers: ref.Pairs, name: str) -> None:
        """header() returns the first value whose name matches ASCII-case-insensitively, as in headers."""
        req = req_call(headers=headers)

        def fold(text: str) -> bytes:
            return text.encode("utf-8", "surrogateescape").lower()

        for probe in (name, *(k for k, _ in headers), *(k.upper() for k, _ in headers)):
            expected = next((v for k, v in req.headers if fold(k) == fold(probe)), None)
            assert req.header(probe) == expected

    @pytest.mark.parametrize("src_ip", [None, bytes([127, 0, 0, 1]), bytes(15) + b"\x01"])
    def test_src_ip(self, src_ip: bytes | None) -> None:
        """src_ip is absent, 4 bytes (IPv4) or 16 bytes (IPv6) as sent."""
        assert req_call(src_ip=src_ip).src_ip == src_ip

    def test_unicode_and_surrogateescape(self) -> None:
        """UTF-8 text decodes normally and other bytes survive as surrogate escapes."""
        raw = b"/caf\xc3\xa9/\xff\xfe"
        path = raw.decode("utf-8", "surrogateescape")
        req = req_call(path=path, headers=(("x-name", "Zoë ☃"),))
        assert req.path == "/café/\udcff\udcfe"
        assert req.path.encode("utf-8", "surrogateescape") == raw
        assert req.headers == (("x-name", "Zoë ☃"),)

    def test_fields_are_cached_and_read_only(self) -> None:
        """Lazily decoded fields are decoded once, and the view cannot be modified."""
        req = req_call(headers=(("a", "b"),), args=(("c", None),))
        assert req.headers is req.headers
        assert req.args is req.args
        with pytest.raises(AttributeError):
            req.path = "/x"  # type: ignore[misc]
        with pytest.raises(AttributeError):
            req.extra = 1  # type: ignore[attr-defined]

    def test_lazy_field_errors_at_access(self) -> None:
        """A malformed headers vector raises DecodeError on access, not at construction."""
        data = bytearray(payload(codec.http_req_call_frame(id=5, conf_token=6, headers=(("a", "b"),)), 2))
        headers_field = _flat.root(bytes(data), codec._REQ_CALL)[5]
        struct.pack_into("<I", data, headers_field, len(data))
        req = codec.decode_http_req_call(bytes(data))
        assert (req.id, req.conf_token, req.path) == (5, 6, "/")
        with pytest.raises(DecodeError):
            _ = req.headers

    def test_unknown_method_rejected(self) -> None:
        """A method value outside the enum is a DecodeError at construction."""
        with pytest.raises(DecodeError, match="method"):
            req_call(method=15)

    def test_repr(self) -> None:
        """The repr names id, token, method and path."""
        assert repr(req_call(id=3, conf_token=4, method=Method.PUT, path="/p")) == (
            "HTTPReqCall(id=3, conf_token=4, method=PUT, path='/p')"
        )

    @pytest.mark.parametrize(("field", "value"), [("id", -1), ("id", 2**32), ("conf_token", 2**32), ("method", 256)])
    def test_out_of_range_numbers(self, field: str, value: int) -> None:
        """Numbers that do not fit their field raise ValueError when encoding."""
        with pytest.raises(ValueError, match="does not fit"):
            codec.http_req_call_frame(**{"id": 0, "conf_token": 0, field: value})  # type: ignore[arg-type]


class TestHTTPRespCall:
    @given(id=ref.u32, conf_token=ref.u32, status=ref.u16, headers=ref.pairs)
    def test_round_trip(self, id: int, conf_token: int, status: int, headers: ref.Pairs) -> None:
        """Every field of an HTTPRespCall decodes to the value it was built from."""
        frame = codec.http_resp_call_frame(id=id, conf_token=conf_token, status=status, headers=headers)
        resp = codec.decode_http_resp_call(payload(frame, 4))
        assert (resp.id, resp.conf_token, resp.status, resp.headers) == (id, conf_token, status, headers)

    def test_original_case_lookup_and_repr(self) -> None:
        """Header names keep their case, lookup ignores it, and repr names the scalars."""
        frame = codec.http_resp_call_frame(id=1, conf_token=2, status=502, headers=(("Content-Type", "x"),))
        resp = codec.decode_http_resp_call(payload(frame, 4))
        assert resp.headers == (("Content-Type", "x"),)
        assert resp.header("content-type") == "x"
        assert repr(resp) == "HTTPRespCall(id=1, conf_token=2, status=502)"


class TestHTTPReqCallReply:
    @given(reply=ref.req_call_replies)
    def test_round_trip(self, reply: HTTPReqCallReply) -> None:
        """Replies with no action, a Stop or a Rewrite decode back to themselves."""
        assert codec.decode_http_req_call_reply(payload(codec.http_req_call_reply_frame(reply), 2)) == reply

    def test_action_less_reply_is_small(self) -> None:
        """A reply without action carries just the id, including id 0."""
        for rid in (0, 7, 2**32 - 1):
            frame = codec.http_req_call_reply_frame(HTTPReqCallReply(rid))
            assert len(frame) == 24
            assert codec.decode_http_req_call_reply(payload(frame, 2)) == HTTPReqCallReply(rid)

    def test_fixture_stop(self) -> None:
        """The Stop sample from runner.md §1.5 decodes to id 7, status 403, body "hi"."""
        reply = codec.decode_http_req_call_reply(STOP_403_HI)
        assert reply == HTTPReqCallReply(7, Stop(403, (), b"hi"))

    def test_empty_table_has_no_action(self) -> None:
        """An empty table decodes as id 0 without action."""
        assert codec.decode_http_req_call_reply(EMPTY_TABLE) == HTTPReqCallReply(0)

    def test_stop_omits_empty_body(self) -> None:
        """A Stop with an empty body writes no body field (APISIX ignores one anyway)."""
        for body, present in ((b"", False), (b"x", True)):
            data = payload(codec.http_req_call_reply_frame(HTTPReqCallReply(1, Stop(403, (), body))), 2)
            stop = _flat.sub_table(data, _flat.root(data, (4, 1, 4))[2], (2, 4, 4))
            assert bool(stop[2]) is present
            assert codec.decode_http_req_call_reply(data).action == Stop(403, (), body)

    def test_rewrite_empty_body_and_path_kept(self) -> None:
        """A Rewrite's empty path or body is written, unlike None, so it round-trips."""
        for action in (Rewrite(path="", body=b""), Rewrite()):
            data = payload(codec.http_req_call_reply_frame(HTTPReqCallReply(2, action)), 2)
            assert codec.decode_http_req_call_reply(data).action == action

    def test_rewrite_deletes(self) -> None:
        """Header and arg deletes are TextEntries without a value."""
        action = Rewrite(headers=(("x-drop", None), ("x-set", "1")), args=(("a", None),))
        got = ref.read_http_req_call_reply(payload(codec.http_req_call_reply_frame(HTTPReqCallReply(2, action)), 2))
        assert got == HTTPReqCallReply(2, action)

    @pytest.mark.parametrize(
        "reply",
        [HTTPReqCallReply(-1), HTTPReqCallReply(2**32), HTTPReqCallReply(1, Stop(status=65536))],
    )
    def test_out_of_range_numbers(self, reply: HTTPReqCallReply) -> None:
        """An id outside uint32 or a status outside uint16 raises ValueError."""
        with pytest.raises(ValueError, match="does not fit"):
            codec.http_req_call_reply_frame(reply)

    def test_union_without_value_rejected(self) -> None:
        """An action type without an action table is a DecodeError."""
        data = payload(codec.http_req_call_reply_frame(HTTPReqCallReply(1, Stop())), 2)
        with pytest.raises(DecodeError, match="without a value"):
            codec.decode_http_req_call_reply(_drop_slot(data, 2))

    def test_unknown_action_rejected(self) -> None:
        """An action type other than NONE, Stop or Rewrite is a DecodeError."""
        data = bytearray(payload(codec.http_req_call_reply_frame(HTTPReqCallReply(1, Stop())), 2))
        type_field = _flat.root(bytes(data), (4, 1, 4))[1]
        data[type_field] = 3
        with pytest.raises(DecodeError, match="action type"):
            codec.decode_http_req_call_reply(bytes(data))

    def test_valueless_stop_header_rejected(self) -> None:
        """A Stop header without a value cannot be represented and is a DecodeError."""

        def stop(out: bytearray) -> int:
            return _flat.put_object(out, [], [(1, (("a", None),))])

        out = _flat.new_frame()
        frame = _flat.finish(out, 2, _flat.put_object(out, [(0, 4, 1), (1, 1, 1)], [(2, stop)]))
        with pytest.raises(DecodeError, match="without a value"):
            codec.decode_http_req_call_reply(payload(frame, 2))


def _drop_slot(data: bytes, slot: int) -> bytes:
    buf = bytearray(data)
    table = struct.unpack_from("<I", buf, 0)[0]
    vt = table - struct.unpack_from("<i", buf, table)[0]
    struct.pack_into("<H", buf, vt + 4 + 2 * slot, 0)
    return bytes(buf)


class TestHTTPRespCallReply:
    @given(reply=ref.resp_call_replies)
    def test_round_trip(self, reply: HTTPRespCallReply) -> None:
        """Post-resp replies decode back to themselves."""
        assert codec.decode_http_resp_call_reply(payload(codec.http_resp_call_reply_frame(reply), 4)) == reply

    def test_absent_and_empty_body_differ(self) -> None:
        """body None writes no field while b"" writes an empty vector."""
        absent = codec.http_resp_call_reply_frame(HTTPRespCallReply(1))
        empty = codec.http_resp_call_reply_frame(HTTPRespCallReply(1, body=b""))
        assert codec.decode_http_resp_call_reply(payload(absent, 4)).body is None
        assert codec.decode_http_resp_call_reply(payload(empty, 4)).body == b""

    def test_oversized_body_refused(self) -> None:
        """A reply whose payload would exceed 16 MiB - 1 raises FrameTooLarge."""
        with pytest.raises(codec.FrameTooLarge):
            codec.http_resp_call_reply_frame(HTTPRespCallReply(1, body=bytes(MAX_PAYLOAD)))
        assert (
            len(codec.http_resp_call_reply_frame(HTTPRespCallReply(1, body=bytes(MAX_PAYLOAD - 64)))) > MAX_PAYLOAD - 64
        )

    def test_status_range(self) -> None:
        """A status outside uint16 raises ValueError."""
        with pytest.raises(ValueError, match="uint16"):
            codec.http_resp_call_reply_frame(HTTPRespCallReply(1, status=70000))


class TestErrorFrame:
    @pytest.mark.parametrize("code", list(ErrCode))
    def test_round_trip(self, code: ErrCode) -> None:
        """Each error code has a type-0 frame that decodes back to it."""
        frame = codec.error_frame(code)
        assert codec.decode_error(payload(frame, RPCType.ERR)) is code
        assert codec.error_frame(code) is frame

    def test_fixtures(self) -> None:
        """The runner.md samples decode: an empty table is BAD_REQUEST."""
        assert codec.decode_error(ERR_CONF_TOKEN_NOT_FOUND) is ErrCode.CONF_TOKEN_NOT_FOUND
        assert codec.decode_error(EMPTY_TABLE) is ErrCode.BAD_REQUEST

    def test_unknown_code(self) -> None:
        """An unknown code is refused when encoding and when decoding."""
        with pytest.raises(ValueError, match="unknown error code"):
            codec.error_frame(9)  # type: ignore[arg-type]
        with pytest.raises(DecodeError, match="unknown error code"):
            codec.decode_error(ERR_CONF_TOKEN_NOT_FOUND[:-1] + b"\x09")


class TestExtraInfo:
    @pytest.mark.parametrize("query", [VarQuery("remote_addr"), VarQuery(""), ReqBodyQuery(), RespBodyQuery()])
    def test_query_round_trip(self, query: ExtraInfoQuery) -> None:
        """Each query kind decodes back to itself on the APISIX side."""
        assert codec.decode_extra_info_query(payload(codec.extra_info_query_frame(query), 3)) == query

    def test_not_a_query(self) -> None:
        """Anything but the three query types is a TypeError."""
        with pytest.raises(TypeError):
            codec.extra_info_query_frame("remote_addr")  # type: ignore[arg-type]

    def test_var_frames_are_cached(self) -> None:
        """Asking twice for the same variable reuses the encoded frame."""
        first = codec.extra_info_query_frame(VarQuery("ssl_client_s_dn"))
        assert codec.extra_info_query_frame(VarQuery("ssl_client_s_dn")) is first

    def test_var_cache_is_bounded(self) -> None:
        """Endless distinct variable names do not grow the frame cache past its bound."""
        for i in range(codec._VAR_CACHE_SIZE + 10):
            query = VarQuery(f"var_{i}")
            assert codec.decode_extra_info_query(payload(codec.extra_info_query_frame(query), 3)) == query
        assert len(codec._var_frames) <= codec._VAR_CACHE_SIZE

    @pytest.mark.parametrize("result", [None, b"", b"value", bytes(range(256)) * 100])
    def test_result_round_trip(self, result: bytes | None) -> None:
        """An absent result stays None and bytes stay bytes, even empty."""
        assert codec.decode_extra_info_result(payload(codec.extra_info_result_frame(result), 3)) == result

    def test_none_info_rejected(self) -> None:
        """A query without an info type is a DecodeError on the APISIX side."""
        with pytest.raises(DecodeError, match="info type"):
            codec.decode_extra_info_query(EMPTY_TABLE)


class TestWriterLayout:
    @given(fields=st.lists(st.tuples(st.integers(0, 9), st.sampled_from([1, 2, 4])), unique_by=lambda f: f[0]))
    def test_fields_aligned(self, fields: list[tuple[int, int]]) -> None:
        """Every inline field is aligned to its size and lies inside the table."""
        lay = _flat.layout(tuple(fields))
        for slot, size in fields:
            assert lay.offsets[slot] % size == 0
            assert lay.offsets[slot] + size <= lay.size
        assert len(lay.vtable) % 4 == 0
        assert lay.size % 4 == 0

    @given(items=ref.pairs, data=st.binary(max_size=20))
    def test_children_keep_alignment(self, items: ref.Pairs, data: bytes) -> None:
        """Strings, byte vectors and entry vectors start 4-aligned and leave the buffer 4-aligned."""
        out = _flat.new_frame()
        for put in (_flat.put_string, _flat.put_bytes):
            assert put(out, data) % 4 == 0
            assert len(out) % 4 == 0
        assert _flat.put_entries(out, items) % 4 == 0
        assert len(out) % 4 == 0


# --- malformed input ---------------------------------------------------------------------------


def _full_req(data: bytes) -> object:
    req = codec.decode_http_req_call(data)
    lookups = req.header("name"), req.header("missing")
    return req.id, req.conf_token, req.method, req.path, req.src_ip, lookups, req.headers, req.args, repr(req)


def _full_resp(data: bytes) -> object:
    resp = codec.decode_http_resp_call(data)
    resp.header("content-type")
    return resp.id, resp.status, resp.conf_token, resp.headers, repr(resp)


DECODERS: list[Callable[[bytes], object]] = [
    codec.decode_prepare_conf,
    _full_req,
    _full_resp,
    codec.decode_extra_info_result,
    codec.decode_prepare_conf_reply,
    codec.decode_error,
    codec.decode_http_req_call_reply,
    codec.decode_http_resp_call_reply,
    codec.decode_extra_info_query,
]

VALID = [
    payload(codec.prepare_conf_request_frame((ConfEntry("a", "{}"), ConfEntry("b", "x")), "key"), 1),
    payload(
        codec.http_req_call_frame(
            id=1,
            conf_token=2,
            method=2,
            path="/path",
            src_ip=bytes(4),
            headers=(("name", "hvalue"), ("d", None)),
            args=(("a", "b"),),
        ),
        2,
    ),
    payload(codec.http_resp_call_frame(id=1, conf_token=2, headers=(("Content-Type", "x"),)), 4),
    payload(codec.http_req_call_reply_frame(HTTPReqCallReply(3, Stop(403, (("a", "b"),), b"no"))), 2),
    payload(
        codec.http_req_call_reply_frame(
            HTTPReqCallReply(3, Rewrite("/p", (("a", None),), (("q", "1"),), (("r", "s"),), b"body"))
        ),
        2,
    ),
    payload(codec.http_resp_call_reply_frame(HTTPRespCallReply(4, 201, (("a", "b"),), b"x")), 4),
    payload(codec.extra_info_query_frame(VarQuery("remote_addr")), 3),
    payload(codec.extra_info_result_frame(b"result"), 3),
    STOP_403_HI,
    ERR_CONF_TOKEN_NOT_FOUND,
]


def _only_decode_errors(data: bytes) -> None:
    for decode in DECODERS:
        with contextlib.suppress(DecodeError):
            decode(data)


class TestMalformedInput:
    @given(data=st.binary(max_size=200))
    @example(data=b"")
    @example(data=b"\xff\xff\xff\xff")
    @example(data=b"\x04\x00\x00\x00\xfc\xff\xff\xff")  # table whose vtable is itself
    def test_random_bytes(self, data: bytes) -> None:
        """Random bytes make every decoder return or raise DecodeError, nothing else."""
        _only_decode_errors(data)

    @pytest.mark.parametrize("index", range(len(VALID)))
    def test_truncated(self, index: int) -> None:
        """Every truncation of a valid message decodes or raises DecodeError, nothing else."""
        data = VALID[index]
        for cut in range(len(data)):
            _only_decode_errors(data[:cut])

    @given(index=st.integers(0, len(VALID) - 1), data=st.data())
    def test_corrupted(self, index: int, data: st.DataObject) -> None:
        """Overwriting bytes of a valid message (offsets, lengths, vtables) raises DecodeError at worst."""
        buf = bytearray(VALID[index])
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, len(buf) - 1))
            buf[pos] = data.draw(st.sampled_from([0x00, 0x01, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
        _only_decode_errors(bytes(buf))

    @pytest.mark.parametrize("index", range(len(VALID)))
    def test_offsets_out_of_range(self, index: int) -> None:
        """Pointing any 4-byte word past the end of the buffer raises DecodeError at worst."""
        data = VALID[index]
        for pos in range(0, len(data) - 3):
            buf = bytearray(data)
            struct.pack_into("<I", buf, pos, len(data) + 8)
            _only_decode_errors(bytes(buf))

    def test_missing_nul_terminator(self) -> None:
        """A string whose NUL terminator is overwritten counts as truncated."""
        for text in ("/path", "name", "hvalue"):
            data = VALID[1]
            end = data.index(text.encode()) + len(text)
            broken = data[:end] + b"!" + data[end + 1 :]
            with pytest.raises(DecodeError, match="truncated string"):
                _full_req(broken)

    def test_entry_without_name(self) -> None:
        """A TextEntry whose vtable has no name slot is a DecodeError."""
        data = bytearray(VALID[1])
        vtable = data.index(bytes.fromhex("08000c0004000800"))  # _flat's shared name+value vtable
        data[vtable + 4 : vtable + 6] = b"\x00\x00"
        with pytest.raises(DecodeError, match="without a name"):
            _full_req(bytes(data))

    def test_truncation_detected(self) -> None:
        """Cutting a request inside its strings is reported as DecodeError."""
        data = VALID[1]
        with pytest.raises(DecodeError):
            _full_req(data[: len(data) // 2])


# --- the runner's fast readers agree with the generic ones ----------------------------------------


def _outcome(decode: Callable[[bytes], object], data: bytes) -> tuple[str, object]:
    try:
        return "ok", decode(data)
    except DecodeError as exc:
        return "error", str(exc)


def _generic_offsets(data: bytes, sizes: tuple[int, ...]) -> tuple[int, tuple[int, ...]]:
    fields = _flat.root(data, sizes)
    pos = struct.unpack_from("<I", data, 0)[0]
    return pos, tuple(f - pos if f else 0 for f in fields)


def _generic_result(data: bytes) -> bytes | None:
    (field,) = _flat.root(data, (4,))
    return _flat.byte_vector(data, field) if field else None


SHAPES = [codec._REQ_CALL, codec._RESP_CALL, (4,), (4, 4)]


def _assert_fast_readers_agree(data: bytes, shapes: list[_flat.Shape]) -> None:
    for shape in shapes:
        expected = _outcome(partial(_generic_offsets, sizes=shape.sizes), data)
        assert _outcome(partial(_flat.root_offsets, shape=shape), data) == expected
        # Again: now the vtable may be remembered, and the answer must not change.
        assert _outcome(partial(_flat.root_offsets, shape=shape), data) == expected
    assert _outcome(_flat.root_byte_vector, data) == _outcome(_generic_result, data)


class TestFastReaders:
    """root_offsets (vtables remembered per Shape) and root_byte_vector (ExtraInfo results) accept,
    return and reject exactly what root() + byte_vector() do, with the same messages."""

    @given(data=st.binary(max_size=120))
    @example(data=b"\x04\x00\x00\x00\xfc\xff\xff\xff")
    def test_random_bytes(self, data: bytes) -> None:
        _assert_fast_readers_agree(data, [_flat.Shape(s) for s in SHAPES])

    @given(index=st.integers(0, len(VALID) - 1), data=st.data())
    def test_corrupted(self, index: int, data: st.DataObject) -> None:
        buf = bytearray(VALID[index])
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, len(buf) - 1))
            buf[pos] = data.draw(st.sampled_from([0x00, 0x01, 0x03, 0x7F, 0x80, 0xFF]) | st.integers(0, 255))
        _assert_fast_readers_agree(bytes(buf), [_flat.Shape(s) for s in SHAPES])

    @pytest.mark.parametrize("index", range(len(VALID)))
    def test_truncated_after_the_vtable_is_remembered(self, index: int) -> None:
        """A remembered vtable does not excuse a message too short for its table."""
        shapes = [_flat.Shape(s) for s in SHAPES]
        data = VALID[index]
        _assert_fast_readers_agree(data, shapes)
        for cut in range(len(data)):
            _assert_fast_readers_agree(data[:cut], shapes)

    def test_field_outside_a_remembered_table(self) -> None:
        """Same slot offsets, smaller declared table size: a different vtable, checked afresh."""
        shape = _flat.Shape(codec._REQ_CALL)
        data = VALID[1]
        _flat.root_offsets(data, shape)
        pos = struct.unpack_from("<I", data, 0)[0]
        vt = pos - struct.unpack_from("<i", data, pos)[0]
        broken = bytearray(data)
        struct.pack_into("<H", broken, vt + 2, 8)  # tsize 8: most fields now lie outside the table
        with pytest.raises(DecodeError, match="field outside its table"):
            _flat.root_offsets(bytes(broken), shape)

    def test_remembered_vtables_are_bounded(self) -> None:
        """A peer sending ever-different vtables cannot make a Shape remember more than its bound."""
        shape = _flat.Shape((4, 4))
        for tsize in range(12, 12 + 4 * 2 * _flat_read._KNOWN_VTABLES, 4):
            vtable = struct.pack("<4H", 8, tsize, 4, 8)
            data = struct.pack("<I", 12) + vtable + struct.pack("<i", 8) + bytes(tsize)
            assert _flat.root_offsets(data, shape) == _generic_offsets(data, (4, 4))
        assert len(shape.known) == _flat_read._KNOWN_VTABLES


class TestReplyWithoutObject:
    @given(reply=ref.req_call_replies)
    def test_action_frame_equals_reply_frame(self, reply: HTTPReqCallReply) -> None:
        """http_req_call_action_frame(id, action) is byte for byte http_req_call_reply_frame(reply)."""
        assert codec.http_req_call_action_frame(reply.id, reply.action) == codec.http_req_call_reply_frame(reply)
