"""CONTRACT STUB — to be implemented (see the helper brief). Signatures are fixed; bodies are not.

Sans-IO codec: bytes <-> typed messages. No socket/asyncio imports in runner.protocol.
"""

from __future__ import annotations

from .messages import (
    ConfEntry,
    ErrCode,
    ExtraInfoQuery,
    Frame,
    HTTPReqCallReply,
    HTTPRespCallReply,
    Pairs,
    PrepareConfRequest,
    RPCType,
)


class DecodeError(ValueError):
    """The peer sent bytes that are not a valid message (maps to Err BAD_REQUEST / closing)."""


class FrameTooLarge(DecodeError):
    """A frame announced (or an encoder was asked for) more than the allowed payload size."""


class FrameDecoder:
    """Incremental frame splitter: feed() any chunks, next_frame() returns whole frames or None."""

    def __init__(self, max_payload: int = ...) -> None: ...
    def feed(self, data: bytes) -> None: ...
    def next_frame(self) -> Frame | None: ...
    @property
    def buffered(self) -> int: ...


def encode_frame(rpc_type: int, payload: bytes) -> bytes: ...


class HTTPReqCall:
    """Lazy read-only view of A6.HTTPReqCall.Req."""

    id: int
    conf_token: int
    method: int  # Method value; 0 (GET) when absent
    path: str | None
    src_ip: bytes | None
    headers: Pairs
    args: Pairs


class HTTPRespCall:
    id: int
    status: int
    headers: Pairs
    conf_token: int


# runner side
def decode_prepare_conf(payload: bytes) -> PrepareConfRequest: ...
def decode_http_req_call(payload: bytes) -> HTTPReqCall: ...
def decode_http_resp_call(payload: bytes) -> HTTPRespCall: ...
def decode_extra_info_result(payload: bytes) -> bytes | None: ...
def prepare_conf_reply_frame(token: int) -> bytes: ...
def error_frame(code: ErrCode) -> bytes: ...
def http_req_call_reply_frame(reply: HTTPReqCallReply) -> bytes: ...
def http_resp_call_reply_frame(reply: HTTPRespCallReply) -> bytes: ...
def extra_info_query_frame(query: ExtraInfoQuery) -> bytes: ...


# APISIX side (runner.testing, bench)
def prepare_conf_request_frame(entries: tuple[ConfEntry, ...], key: str | None = None) -> bytes: ...
def http_req_call_frame(
    *,
    id: int,
    conf_token: int,
    method: int = 0,
    path: str | None = "/",
    src_ip: bytes | None = None,
    headers: Pairs = (),
    args: Pairs = (),
) -> bytes: ...
def http_resp_call_frame(*, id: int, conf_token: int, status: int = 200, headers: Pairs = ()) -> bytes: ...
def extra_info_result_frame(result: bytes | None) -> bytes: ...
def decode_prepare_conf_reply(payload: bytes) -> int: ...
def decode_error(payload: bytes) -> ErrCode: ...
def decode_http_req_call_reply(payload: bytes) -> HTTPReqCallReply: ...
def decode_http_resp_call_reply(payload: bytes) -> HTTPRespCallReply: ...
def decode_extra_info_query(payload: bytes) -> ExtraInfoQuery: ...


_ = RPCType
