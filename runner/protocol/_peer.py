"""APISIX's side of the ext-plugin conversation: encode its requests, decode the runner's replies.

The runner never calls these; ``runner.testing``, the tests and the benchmarks do, to play
APISIX. They live apart from the runner side (``_decode``, ``_encode``) so the runner's own path
stays short to read, and are re-exported from ``codec`` (their public home). Decoding is as strict
as on the runner side: malformed payloads raise :class:`DecodeError` and nothing else.
"""

from __future__ import annotations

import struct
from typing import Final

from . import _flat
from ._flat import (
    ACTION_NONE,
    ACTION_REWRITE,
    ACTION_STOP,
    INFO_REQ_BODY,
    INFO_RESP_BODY,
    INFO_VAR,
    DecodeError,
    build_frame,
    check_uint,
    entries_or_empty,
    valued,
)
from .messages import (
    ConfEntry,
    ErrCode,
    ExtraInfoQuery,
    HTTPReqCallReply,
    HTTPRespCallReply,
    Pairs,
    ReqBodyQuery,
    RespBodyQuery,
    Rewrite,
    RPCType,
    Stop,
    VarQuery,
)

__all__ = [
    "decode_error",
    "decode_extra_info_query",
    "decode_http_req_call_reply",
    "decode_http_resp_call_reply",
    "decode_prepare_conf_reply",
    "extra_info_result_frame",
    "http_req_call_frame",
    "http_resp_call_frame",
    "prepare_conf_request_frame",
]

_U32: Final = struct.Struct("<I").unpack_from
_U16: Final = struct.Struct("<H").unpack_from


# --- encode requests ---------------------------------------------------------------------------


def prepare_conf_request_frame(entries: tuple[ConfEntry, ...], key: str | None = None) -> bytes:
    """APISIX side: frame of A6.PrepareConf.Req (the conf vector is written even when empty)."""
    refs: list[tuple[int, _flat.Child]] = [(0, tuple((e.name, e.value) for e in entries))]
    if key is not None:
        refs.append((1, key))
    return build_frame(RPCType.PREPARE_CONF, [], refs)


def http_req_call_frame(
    *,
    id: int,
    conf_token: int,
    method: int = 0,
    path: str | None = "/",
    src_ip: bytes | None = None,
    headers: Pairs = (),
    args: Pairs = (),
) -> bytes:
    """APISIX side: frame of A6.HTTPReqCall.Req; ``None``/empty fields are omitted."""
    scalars = [(0, 4, check_uint(id, 32, "id")), (6, 4, check_uint(conf_token, 32, "conf token"))]
    if method:
        scalars.append((2, 1, check_uint(method, 8, "method")))
    refs: list[tuple[int, _flat.Child]] = [] if src_ip is None else [(1, src_ip)]
    if path is not None:
        refs.append((3, path))
    refs += [(slot, pairs) for slot, pairs in ((4, args), (5, headers)) if pairs]
    return build_frame(RPCType.HTTP_REQ_CALL, scalars, refs)


def http_resp_call_frame(*, id: int, conf_token: int, status: int = 200, headers: Pairs = ()) -> bytes:
    """APISIX side: frame of A6.HTTPRespCall.Req (type 4)."""
    scalars = [(0, 4, check_uint(id, 32, "id")), (3, 4, check_uint(conf_token, 32, "conf token"))]
    if status:
        scalars.append((1, 2, check_uint(status, 16, "status")))
    return build_frame(RPCType.HTTP_RESP_CALL, scalars, [(2, headers)] if headers else [])


def extra_info_result_frame(result: bytes | None) -> bytes:
    """APISIX side: frame of A6.ExtraInfo.Resp; ``None`` writes no ``result`` field."""
    return build_frame(RPCType.EXTRA_INFO, [], [] if result is None else [(0, result)])


# --- decode replies ----------------------------------------------------------------------------


def decode_prepare_conf_reply(payload: bytes) -> int:
    """APISIX side: the conf token of A6.PrepareConf.Resp."""
    f = _flat.root(payload, (4,))  # conf_token
    return _U32(payload, f[0])[0] if f[0] else 0


def decode_error(payload: bytes) -> ErrCode:
    """APISIX side: the code of A6.Err.Resp (absent means BAD_REQUEST)."""
    f = _flat.root(payload, (1,))  # code
    code = payload[f[0]] if f[0] else 0
    try:
        return ErrCode(code)
    except ValueError:
        raise DecodeError(f"unknown error code {code}") from None


def _union(payload: bytes, type_field: int, value_field: int) -> int:
    kind = payload[type_field] if type_field else 0
    if kind and not value_field:
        raise DecodeError(f"union of type {kind} without a value")
    return kind


def decode_http_req_call_reply(payload: bytes) -> HTTPReqCallReply:
    """APISIX side: A6.HTTPReqCall.Resp; action NONE or an empty table gives ``action=None``."""
    f = _flat.root(payload, (4, 1, 4))  # id, action_type, action
    rid = _U32(payload, f[0])[0] if f[0] else 0
    kind = _union(payload, f[1], f[2])
    if kind == ACTION_NONE:
        return HTTPReqCallReply(rid)
    if kind == ACTION_STOP:
        s = _flat.sub_table(payload, f[2], (2, 4, 4))  # status, headers, body
        status = _U16(payload, s[0])[0] if s[0] else 0
        body = _flat.byte_vector(payload, s[2]) if s[2] else b""
        return HTTPReqCallReply(rid, Stop(status, valued(entries_or_empty(payload, s[1]), "Stop header"), body))
    if kind == ACTION_REWRITE:
        r = _flat.sub_table(payload, f[2], (4, 4, 4, 4, 4))  # path, headers, args, resp_headers, body
        rewrite = Rewrite(
            path=_flat.string(payload, r[0]) if r[0] else None,
            headers=entries_or_empty(payload, r[1]),
            args=entries_or_empty(payload, r[2]),
            resp_headers=valued(entries_or_empty(payload, r[3]), "resp header"),
            body=_flat.byte_vector(payload, r[4]) if r[4] else None,
        )
        return HTTPReqCallReply(rid, rewrite)
    raise DecodeError(f"unknown action type {kind}")


def decode_http_resp_call_reply(payload: bytes) -> HTTPRespCallReply:
    """APISIX side: A6.HTTPRespCall.Resp."""
    f = _flat.root(payload, (4, 2, 4, 4))  # id, status, headers, body
    return HTTPRespCallReply(
        id=_U32(payload, f[0])[0] if f[0] else 0,
        status=_U16(payload, f[1])[0] if f[1] else 0,
        headers=valued(entries_or_empty(payload, f[2]), "response header"),
        body=_flat.byte_vector(payload, f[3]) if f[3] else None,
    )


def decode_extra_info_query(payload: bytes) -> ExtraInfoQuery:
    """APISIX side: A6.ExtraInfo.Req; NONE or an unknown info type is a DecodeError."""
    f = _flat.root(payload, (1, 4))  # info_type, info
    kind = _union(payload, f[0], f[1])
    if kind == INFO_VAR:
        v = _flat.sub_table(payload, f[1], (4,))  # name
        if not v[0]:
            raise DecodeError("Var without a name")
        return VarQuery(_flat.string(payload, v[0], "strict"))
    if kind in (INFO_REQ_BODY, INFO_RESP_BODY):
        _flat.sub_table(payload, f[1], ())
        return ReqBodyQuery() if kind == INFO_REQ_BODY else RespBodyQuery()
    raise DecodeError(f"unsupported info type {kind}")
