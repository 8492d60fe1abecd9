"""Sans-IO codec for APISIX's ext-plugin protocol: bytes <-> typed messages.

No I/O here: :class:`FrameDecoder` splits a byte stream into frames, ``decode_*`` turn payloads
into messages, and ``*_frame`` encoders return whole frames ready to write. Both sides of the
conversation are covered so tests and benchmarks can play APISIX.

This module is the codec's one public home and holds no code of its own: importers write
``codec.decode_http_req_call`` whatever module a name is defined in, and a module attribute costs
the same lookup here as in the defining module, so the hot path pays nothing for the split. Where
things are defined: ``_framing`` (frame headers, :class:`FrameDecoder`), ``_decode`` (the runner
reading APISIX's messages: the lazy :class:`HTTPReqCall` / :class:`HTTPRespCall` views),
``_encode`` (the runner's replies and ExtraInfo queries) and ``_peer`` (APISIX's side).

Decoding is strict: any malformed payload raises :class:`DecodeError` (never ``IndexError``,
``struct.error`` or ``UnicodeDecodeError``). HTTP text (path, header and arg names and values)
is decoded from UTF-8 with ``errors="surrogateescape"``: clients can send bytes that are not
UTF-8, and this keeps them intact — encoding with the same handler gives the original bytes
back. Text the runner interprets (conf entries, PrepareConf key, var names) must be UTF-8.
"""

from __future__ import annotations

from . import _decode, _encode
from ._decode import (
    HTTPReqCall,
    HTTPRespCall,
    decode_extra_info_result,
    decode_http_req_call,
    decode_http_resp_call,
    decode_prepare_conf,
)
from ._encode import (
    error_frame,
    extra_info_query_frame,
    http_req_call_action_frame,
    http_req_call_reply_frame,
    http_resp_call_reply_frame,
    prepare_conf_reply_frame,
)
from ._flat import DecodeError, FrameTooLarge, fold_header_name
from ._framing import FrameDecoder, encode_frame
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

# Not public: the call tables' shapes and the var-query cache, which tests/unit/test_codec.py reads
# through this module. Bound here rather than imported so that type checkers let the tests see them;
# the cache is the very dict _encode fills (it is only ever mutated, never rebound).
_REQ_CALL = _decode._REQ_CALL
_RESP_CALL = _decode._RESP_CALL
_VAR_CACHE_SIZE = _encode._VAR_CACHE_SIZE
_var_frames = _encode._var_frames
