"""Sans-IO codec for APISIX's ext-plugin protocol: bytes <-> typed messages.

No I/O here: :class:`FrameDecoder` splits a byte stream into frames, ``decode_*`` turn payloads
into messages, and ``*_frame`` encoders return whole frames ready to write. Both sides of the
conversation are covered so tests and benchmarks can play APISIX (that side is implemented in
``_peer`` and re-exported here).

Decoding is strict: any malformed payload raises :class:`DecodeError` (never ``IndexError``,
``struct.error`` or ``UnicodeDecodeError``). HTTP text (path, header and arg names and values)
is decoded from UTF-8 with ``errors="surrogateescape"``: clients can send bytes that are not
UTF-8, and this keeps them intact — encoding with the same handler gives the original bytes
back. Text the runner interprets (conf entries, PrepareConf key, var names) must be UTF-8.
"""

from __future__ import annotations

import re
import struct
from collections.abc import Callable
from enum import Enum
from functools import partial
from typing import Final

from . import _flat
from ._flat import (
    ACTION_REWRITE,
    ACTION_STOP,
    INFO_REQ_BODY,
    INFO_RESP_BODY,
    INFO_VAR,
    DecodeError,
    FrameTooLarge,
    build_frame,
    check_uint,
    entries_or_empty,
    fold_header_name,
    valued,
)

# APISIX's side of the conversation (tests, benchmarks, runner.testing) lives in _peer; its
# public home is here, so ``codec.http_req_call_frame`` and friends keep working.
from ._peer import (
    decode_error,
    decode_extra_info_query,
    decode_http_req_call_reply,
    decode_http_resp_call_reply,
    decode_prepare_conf_reply,
    extra_info_result_frame,
    http_req_call_frame,
    http_resp_call_frame,
    prepare_conf_request_frame,
)
from .messages import (
    MAX_PAYLOAD,
    METHOD_NAMES,
    ConfEntry,
    ErrCode,
    ExtraInfoQuery,
    Frame,
    HTTPReqCallReply,
    HTTPRespCallReply,
    Pairs,
    PrepareConfRequest,
    ReqBodyQuery,
    RespBodyQuery,
    Rewrite,
    RPCType,
    Stop,
    VarQuery,
)

__all__ = [
    "DecodeError",
    "FrameDecoder",
    "FrameTooLarge",
    "HTTPReqCall",
    "HTTPRespCall",
    "decode_error",
    "decode_extra_info_query",
    "decode_extra_info_result",
    "decode_http_req_call",
    "decode_http_req_call_reply",
    "decode_http_resp_call",
    "decode_http_resp_call_reply",
    "decode_prepare_conf",
    "decode_prepare_conf_reply",
    "encode_frame",
    "error_frame",
    "extra_info_query_frame",
    "extra_info_result_frame",
    "fold_header_name",
    "http_req_call_action_frame",
    "http_req_call_frame",
    "http_req_call_reply_frame",
    "http_resp_call_frame",
    "http_resp_call_reply_frame",
    "prepare_conf_reply_frame",
    "prepare_conf_request_frame",
]

_HEADER: Final = struct.Struct(">I")
_HEADER_UNPACK: Final = _HEADER.unpack_from
_U32: Final = struct.Struct("<I").unpack_from
_U16: Final = struct.Struct("<H").unpack_from
_PACK_U32: Final = struct.Struct("<I").pack
# Below this many consumed bytes a partly-read buffer is not worth moving.
_COMPACT_AT: Final = 1 << 16


# --- framing ---------------------------------------------------------------------------------


class FrameDecoder:
    """Incremental frame splitter: feed() any chunks, next_frame() returns whole frames or None.

    ``frames(data)`` does both at once and is what the runner uses: one call per received chunk.

    A header announcing an empty or oversized payload raises as soon as its 4 bytes are seen,
    without waiting for the body. After an error every further call raises again.
    """

    __slots__ = ("_buf", "_error", "_max", "_pos")

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        if not 1 <= max_payload <= MAX_PAYLOAD:
            raise ValueError(f"max_payload must be in 1..{MAX_PAYLOAD}")
        self._max = max_payload
        self._buf = bytearray()
        self._pos = 0
        self._error: DecodeError | None = None

    def feed(self, data: bytes) -> None:
        if self._error is not None:
            self._fail_again()
        self._buf += data

    def next_frame(self) -> Frame | None:
        item = self._next()
        return None if item is None else Frame(*item)

    def frames(self, data: bytes) -> list[tuple[int, bytes]]:
        """Feed ``data`` and return every frame it completes, in order, as ``(type, payload)``.

        The same frames as ``feed(data)`` followed by ``next_frame()`` until None, without a
        Frame object per frame and, when nothing is buffered (APISIX sends one whole message at a
        time, so almost always), without copying ``data`` into the buffer first: payloads are
        sliced straight out of it.

        A bad header raises like ``next_frame`` would, but only once the frames before it are
        delivered: if this chunk completed frames first, they are returned and :attr:`error` is
        set; the caller handles them and then raises it (every later call raises too).
        """
        if self._error is not None:
            self._fail_again()
        if self._pos != len(self._buf):
            self._buf += data  # a partial frame is waiting: continue it in the buffer
            return self._drain()
        if type(data) is not bytes:
            data = bytes(data)  # payloads must be bytes whatever the caller passed
        out: list[tuple[int, bytes]] = []
        pos, n, limit = 0, len(data), self._max
        while n - pos >= 4:
            head = _HEADER_UNPACK(data, pos)[0]
            size = head & 0xFFFFFF
            if size == 0 or size > limit:
                self._reject(size)
                if out:
                    return out
                raise self._error  # type: ignore[misc]  # set by _reject
            end = pos + 4 + size
            if end > n:
                break
            out.append((head >> 24, data[pos + 4 : end]))
            pos = end
        if pos < n:
            self._buf += memoryview(data)[pos:]
        return out

    @property
    def error(self) -> DecodeError | None:
        """The framing error that made this decoder unusable, if any."""
        return self._error

    @property
    def buffered(self) -> int:
        """Bytes received but not yet returned as a frame."""
        return len(self._buf) - self._pos

    def _drain(self) -> list[tuple[int, bytes]]:
        out: list[tuple[int, bytes]] = []
        try:
            while (item := self._next()) is not None:
                out.append(item)
        except DecodeError:
            if not out:
                raise
        return out

    def _next(self) -> tuple[int, bytes] | None:
        if self._error is not None:
            self._fail_again()
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return None
        head = _HEADER_UNPACK(buf, pos)[0]
        size = head & 0xFFFFFF
        if size == 0 or size > self._max:
            self._reject(size)
            raise self._error  # type: ignore[misc]  # set by _reject
        end = pos + 4 + size
        if end > len(buf):
            return None
        with memoryview(buf) as view:
            payload = bytes(view[pos + 4 : end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        elif end >= _COMPACT_AT and 2 * end >= len(buf):
            # Moving the tail is cheaper than what was consumed, so compaction stays linear.
            del buf[:end]
            self._pos = 0
        else:
            self._pos = end
        return head >> 24, payload

    def _reject(self, size: int) -> None:
        err = FrameTooLarge if size else DecodeError
        self._error = err(f"frame announces a payload of {size} bytes (allowed 1..{self._max})")

    def _fail_again(self) -> None:
        assert self._error is not None
        raise type(self._error)(f"decoder is unusable after an earlier error: {self._error}")


def encode_frame(rpc_type: int, payload: bytes) -> bytes:
    """Prefix ``payload`` with its frame header (mostly for tests; encoders below return frames)."""
    if not 0 <= rpc_type <= 255:
        raise ValueError(f"frame type {rpc_type} is outside 0..255")
    size = len(payload)
    if size > MAX_PAYLOAD:
        raise FrameTooLarge(f"payload of {size} bytes exceeds {MAX_PAYLOAD}")
    if not size:
        raise ValueError("APISIX cannot handle an empty payload")
    return _HEADER.pack(rpc_type << 24 | size) + payload


# --- lazy request views ------------------------------------------------------------------------


class _Unset(Enum):
    UNSET = 0


_UNSET: Final = _Unset.UNSET
_REQ_CALL: Final = (4, 4, 1, 4, 4, 4, 4)  # id, src_ip, method, path, args, headers, conf_token
_RESP_CALL: Final = (4, 2, 4, 4)  # id, status, headers, conf_token
_REQ_CALL_SHAPE: Final = _flat.Shape(_REQ_CALL)
_RESP_CALL_SHAPE: Final = _flat.Shape(_RESP_CALL)


class _CallView:
    """What both call views share: the buffer, the root table, id, conf_token and headers.

    ``_pos`` is the root table's position and ``_fields`` each slot's offset relative to it (0 if
    absent): absolute positions are computed only for the fields a plugin actually reads.
    """

    __slots__ = ("_buf", "_conf_token", "_fields", "_folded", "_headers", "_id", "_pos")
    _HEADERS_SLOT = 0
    # Set by each subclass's __init__.
    _buf: bytes
    _pos: int
    _fields: tuple[int, ...]
    _id: int
    _conf_token: int
    _headers: Pairs | None
    _folded: bytes | None  # the frame as fold_header_name reads it, made on first use (folded_frame)

    @property
    def id(self) -> int:
        return self._id

    @property
    def folded_frame(self) -> bytes:
        """The whole frame passed through :func:`fold_header_name` (made once per call), for
        prefilters: every name and value of the call is in it, ASCII lower-cased and with ``_``
        read as ``-``, each byte at its place. Text absent from it is absent from the call; text
        present may sit anywhere (a value, another field), so a hit needs the exact check."""
        folded = self._folded
        if folded is None:
            folded = self._folded = fold_header_name(self._buf)
        return folded

    @property
    def conf_token(self) -> int:
        return self._conf_token

    @property
    def headers(self) -> Pairs:
        """Headers in APISIX's order: lower-cased for requests, original case for responses."""
        if self._headers is None:
            f = self._fields[self._HEADERS_SLOT]
            self._headers = _flat.text_entries(self._buf, self._pos + f) if f else ()
        return self._headers

    def header(self, name: str) -> str | None:
        """First value of header ``name`` (ASCII case-insensitive), or None if absent or valueless.

        Scans the raw names without decoding the whole list, which is several times cheaper
        than :attr:`headers` when a plugin needs only a header or two.
        """
        f = self._fields[self._HEADERS_SLOT]
        try:
            wanted = name.encode("utf-8", "surrogateescape").lower()
        except UnicodeEncodeError:
            return None  # decoded names never hold such surrogates, so nothing can match
        return _flat.find_entry(self._buf, self._pos + f, wanted) if f else None

    def header_spellings(self, folded: frozenset[bytes]) -> tuple[str, ...]:
        """Every spelling present of the headers in ``folded`` (names already passed through
        :func:`fold_header_name`): ``x_client_subject`` and ``X-CLIENT_subject`` are both found for
        ``x-client-subject``, since upstreams that fold names cannot tell them apart.

        Folding keeps every byte in its place, so a header whose name folds to one of ``folded``
        leaves that name in the folded frame: when none occurs there, no entry is read at all and
        the common case costs one pass over the bytes.
        """
        f = self._fields[self._HEADERS_SLOT]
        if not f or not folded:
            return ()
        haystack = self._folded
        if haystack is None:
            haystack = self._folded = fold_header_name(self._buf)
        if _prefilter(folded)(haystack) is None:  # the common case: one pass over the bytes, no entry read
            return ()
        return _flat.names_folding_to(self._buf, self._pos + f, folded)


_PREFILTER_CACHE_SIZE: Final = 256
_prefilters: dict[frozenset[bytes], Callable[[bytes], re.Match[bytes] | None]] = {}


def _prefilter(folded: frozenset[bytes]) -> Callable[[bytes], re.Match[bytes] | None]:
    """One search for any of ``folded``: an alternation of literals scans the frame once, where a
    ``name in haystack`` per name scans it once per name (5 names: 0.65 µs instead of 2.4 µs on a
    1.4 KB frame). Name sets come from plugin configuration, so they are few; compiled once each."""
    search = _prefilters.get(folded)
    if search is None:
        longest_first = sorted(folded, key=lambda n: (-len(n), n))
        search = re.compile(b"|".join(re.escape(n) for n in longest_first)).search
        if len(_prefilters) >= _PREFILTER_CACHE_SIZE:
            _prefilters.clear()
        _prefilters[folded] = search
    return search


class HTTPReqCall(_CallView):
    """Lazy read-only view of A6.HTTPReqCall.Req.

    The constructor checks the root table, its vtable and the scalar fields; path, src_ip,
    headers and args are decoded on first access (raising :class:`DecodeError` then if they are
    malformed) and cached. Absent vectors read as ``()``, an absent path as ``None``.
    """

    __slots__ = ("_args", "_method", "_path", "_src_ip")
    _HEADERS_SLOT = 5

    def __init__(self, payload: bytes) -> None:
        # Built once per request: the shared fields are set here rather than in a base __init__.
        buf = payload if type(payload) is bytes else bytes(payload)
        pos, f = _flat.root_offsets(buf, _REQ_CALL_SHAPE)
        self._buf = buf
        self._pos = pos
        self._fields = f
        self._id = _U32(buf, pos + f[0])[0] if f[0] else 0
        self._conf_token = _U32(buf, pos + f[6])[0] if f[6] else 0
        self._headers = None
        self._folded = None
        self._method: int = buf[pos + f[2]] if f[2] else 0
        if self._method >= len(METHOD_NAMES):
            raise DecodeError(f"unknown method {self._method}")
        self._path: str | _Unset | None = _UNSET
        self._src_ip: bytes | _Unset | None = _UNSET
        self._args: Pairs | None = None

    @property
    def method(self) -> int:
        """Method value; 0 (GET) when absent."""
        return self._method

    @property
    def path(self) -> str | None:
        if self._path is _UNSET:
            f = self._fields[3]
            self._path = _flat.string(self._buf, self._pos + f) if f else None
        return self._path

    @property
    def src_ip(self) -> bytes | None:
        """``$binary_remote_addr``: 4 bytes for IPv4, 16 for IPv6."""
        if self._src_ip is _UNSET:
            f = self._fields[1]
            self._src_ip = _flat.byte_vector(self._buf, self._pos + f) if f else None
        return self._src_ip

    @property
    def args(self) -> Pairs:
        """Query args; a flag arg (``?debug``) has the value ``None``."""
        if self._args is None:
            f = self._fields[4]
            self._args = _flat.text_entries(self._buf, self._pos + f) if f else ()
        return self._args

    def __repr__(self) -> str:
        try:
            path = repr(self.path)
        except DecodeError:
            path = "<malformed>"
        method = METHOD_NAMES[self._method]
        return f"HTTPReqCall(id={self._id}, conf_token={self._conf_token}, method={method}, path={path})"


class HTTPRespCall(_CallView):
    """Lazy read-only view of A6.HTTPRespCall.Req (ext-plugin-post-resp); headers are decoded on use."""

    __slots__ = ("_status",)
    _HEADERS_SLOT = 2

    def __init__(self, payload: bytes) -> None:
        buf = payload if type(payload) is bytes else bytes(payload)
        pos, f = _flat.root_offsets(buf, _RESP_CALL_SHAPE)
        self._buf = buf
        self._pos = pos
        self._fields = f
        self._id = _U32(buf, pos + f[0])[0] if f[0] else 0
        self._conf_token = _U32(buf, pos + f[3])[0] if f[3] else 0
        self._headers = None
        self._folded = None
        self._status: int = _U16(buf, pos + f[1])[0] if f[1] else 0

    @property
    def status(self) -> int:
        """Upstream status code."""
        return self._status

    def __repr__(self) -> str:
        return f"HTTPRespCall(id={self._id}, conf_token={self._conf_token}, status={self._status})"


# --- runner side: decode requests --------------------------------------------------------------


def decode_prepare_conf(payload: bytes) -> PrepareConfRequest:
    """Decode A6.PrepareConf.Req; conf names/values and key must be UTF-8, every entry needs a value."""
    f = _flat.root(payload, (4, 4))  # conf, key
    conf = valued(entries_or_empty(payload, f[0], "strict"), "conf")
    key = _flat.string(payload, f[1], "strict") if f[1] else None
    return PrepareConfRequest(tuple(ConfEntry(name, value) for name, value in conf), key)


def decode_http_req_call(payload: bytes) -> HTTPReqCall:
    """Open a lazy view of A6.HTTPReqCall.Req (only the root table and scalars are checked now)."""
    return HTTPReqCall(payload)


def decode_http_resp_call(payload: bytes) -> HTTPRespCall:
    """Open a lazy view of A6.HTTPRespCall.Req."""
    return HTTPRespCall(payload)


def decode_extra_info_result(payload: bytes) -> bytes | None:
    """Decode A6.ExtraInfo.Resp: the raw result, or None when APISIX had none (unknown var, no body)."""
    return _flat.root_byte_vector(payload)  # the table's only field: result


# --- runner side: encode replies ---------------------------------------------------------------


def _u32_reply_head(rpc_type: int) -> bytes:
    # A table whose only field is one uint32: the value is the frame's last 4 bytes.
    frame = build_frame(rpc_type, [(0, 4, 0)], [])
    assert len(frame) == 24
    return frame[:-4]


_CONF_REPLY_HEAD: Final = _u32_reply_head(RPCType.PREPARE_CONF)
_REQ_REPLY_HEAD: Final = _u32_reply_head(RPCType.HTTP_REQ_CALL)
_ERROR_FRAMES: Final = {code: build_frame(RPCType.ERR, [(0, 1, code)], []) for code in ErrCode}
_VAR_CACHE_SIZE: Final = 1024
_var_frames: dict[str, bytes] = {}


def prepare_conf_reply_frame(token: int) -> bytes:
    """Frame of A6.PrepareConf.Resp carrying ``token`` (uint32)."""
    return _CONF_REPLY_HEAD + _PACK_U32(check_uint(token, 32, "conf token"))


def error_frame(code: ErrCode) -> bytes:
    """Prebuilt type-0 frame of A6.Err.Resp for ``code``."""
    try:
        return _ERROR_FRAMES[code]
    except KeyError:
        raise ValueError(f"unknown error code {code!r}") from None


def _put_stop(stop: Stop, out: bytearray) -> int:
    scalars = [(0, 2, check_uint(stop.status, 16, "status"))] if stop.status else []
    refs: list[tuple[int, _flat.Child]] = []
    if stop.headers:
        refs.append((1, stop.headers))
    if stop.body:  # APISIX ignores an empty body ("TODO: support empty body")
        refs.append((2, stop.body))
    return _flat.put_object(out, scalars, refs)


def _put_rewrite(rw: Rewrite, out: bytearray) -> int:
    # None means "unchanged"; an empty path or body is written as given so it round-trips.
    refs: list[tuple[int, _flat.Child]] = [] if rw.path is None else [(0, rw.path)]
    refs += [(slot, pairs) for slot, pairs in ((1, rw.headers), (2, rw.args), (3, rw.resp_headers)) if pairs]
    if rw.body is not None:
        refs.append((4, rw.body))
    return _flat.put_object(out, [], refs)


def http_req_call_reply_frame(reply: HTTPReqCallReply) -> bytes:
    """Frame of A6.HTTPReqCall.Resp; a Stop omits an empty body, a Rewrite writes only non-None/non-empty parts."""
    return http_req_call_action_frame(reply.id, reply.action)


# The reply's id sits at a fixed place for every action: after the frame header, the root offset and the
# root vtable, at the id slot's offset in the root table (the layout put_object computes for these fields).
_ACTION_LAYOUT: Final = _flat.layout(((0, 4), (1, 1), (2, 4)))
_ACTION_ID_AT: Final = 8 + len(_ACTION_LAYOUT.vtable) + _ACTION_LAYOUT.offsets[0]
_ACTION_CACHE_SIZE: Final = 2048
_ACTION_CACHE_MAX_FRAME: Final = 4096
_action_frames: dict[tuple[object, ...], bytes] = {}


def _action_template(action: Stop | Rewrite) -> bytes:
    if isinstance(action, Stop):
        kind, put = ACTION_STOP, partial(_put_stop, action)
    else:
        kind, put = ACTION_REWRITE, partial(_put_rewrite, action)
    return build_frame(RPCType.HTTP_REQ_CALL, [(0, 4, 0), (1, 1, kind)], [(2, put)])


def http_req_call_action_frame(call_id: int, action: Stop | Rewrite | None) -> bytes:
    """``http_req_call_reply_frame(HTTPReqCallReply(call_id, action))`` without building the reply
    object (the runner's path: one reply per request).

    Replies repeat (the same Stop for every denied request of a route, the same Rewrite for every
    request to a health check), so the frame of an action is built once with id 0 and reused with the
    id written in; small frames only, and the cache is cleared when full.
    """
    rid = _PACK_U32(check_uint(call_id, 32, "id"))
    if action is None:
        return _REQ_REPLY_HEAD + rid
    # Keyed by the fields as a plain tuple (the type first): hashed and compared in C, where the
    # dataclasses' generated __hash__ and __eq__ run in Python (about 1 µs per reply).
    if isinstance(action, Rewrite):
        key: tuple[object, ...] = (type(action), action.path, action.headers, action.args, action.resp_headers)
        key += (action.body,)
    else:
        key = (type(action), action.status, action.headers, action.body)
    try:
        template = _action_frames.get(key)
    except TypeError:  # a plugin built its action from lists or a bytearray: not cacheable, still valid
        template = _action_template(action)
    else:
        if template is None:
            template = _action_template(action)
            if len(template) <= _ACTION_CACHE_MAX_FRAME:
                if len(_action_frames) >= _ACTION_CACHE_SIZE:
                    _action_frames.clear()
                _action_frames[key] = template
    return template[:_ACTION_ID_AT] + rid + template[_ACTION_ID_AT + 4 :]


def http_resp_call_reply_frame(reply: HTTPRespCallReply) -> bytes:
    """Frame of A6.HTTPRespCall.Resp; status 0 and empty headers are omitted, ``body=None`` too."""
    scalars = [(0, 4, check_uint(reply.id, 32, "id"))]
    if reply.status:
        scalars.append((1, 2, check_uint(reply.status, 16, "status")))
    refs: list[tuple[int, _flat.Child]] = []
    if reply.headers:
        refs.append((2, reply.headers))
    if reply.body is not None:
        refs.append((3, reply.body))
    return build_frame(RPCType.HTTP_RESP_CALL, scalars, refs)


def _info_frame(kind: int, put: _flat.Child) -> bytes:
    return build_frame(RPCType.EXTRA_INFO, [(0, 1, kind)], [(1, put)])


def _put_var(name: str, out: bytearray) -> int:
    return _flat.put_object(out, [], [(0, name)])


def _put_empty(out: bytearray) -> int:
    return _flat.put_object(out, [], [])


_BODY_QUERY_FRAMES: Final = {
    ReqBodyQuery: _info_frame(INFO_REQ_BODY, _put_empty),
    RespBodyQuery: _info_frame(INFO_RESP_BODY, _put_empty),
}


def extra_info_query_frame(query: ExtraInfoQuery) -> bytes:
    """Frame of A6.ExtraInfo.Req; body queries are prebuilt and var queries cached by name."""
    if isinstance(query, VarQuery):
        frame = _var_frames.get(query.name)
        if frame is None:
            frame = _info_frame(INFO_VAR, partial(_put_var, query.name))
            # Var names come from plugin code, so the set is small; the bound only guards misuse.
            if len(_var_frames) < _VAR_CACHE_SIZE:
                _var_frames[query.name] = frame
        return frame
    frame = _BODY_QUERY_FRAMES.get(type(query))
    if frame is None:
        raise TypeError(f"not an ExtraInfo query: {query!r}")
    return frame
