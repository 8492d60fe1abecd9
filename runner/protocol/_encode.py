"""Runner side, outbound: the frames the runner writes, whole and ready to send.

Replies to PrepareConf, HTTPReqCall and HTTPRespCall, the Err reply, and the ExtraInfo queries a
plugin makes while it handles a call. What repeats is built once: error frames and body queries
ahead of time, var queries per name, HTTPReqCall replies per action (with the call's id written
in). Public under ``runner.protocol.codec``.
"""

from __future__ import annotations

import struct
from functools import partial
from typing import Final

from . import _flat
from ._flat import (
    ACTION_REWRITE,
    ACTION_STOP,
    INFO_REQ_BODY,
    INFO_RESP_BODY,
    INFO_VAR,
    build_frame,
    check_uint,
)
from .messages import (
    ErrCode,
    ExtraInfoQuery,
    HTTPReqCallReply,
    HTTPRespCallReply,
    ReqBodyQuery,
    RespBodyQuery,
    Rewrite,
    RPCType,
    Stop,
    VarQuery,
)

__all__ = [
    "error_frame",
    "extra_info_query_frame",
    "http_req_call_action_frame",
    "http_req_call_reply_frame",
    "http_resp_call_reply_frame",
    "prepare_conf_reply_frame",
]

_PACK_U32: Final = struct.Struct("<I").pack


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
