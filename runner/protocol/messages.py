"""Typed, immutable messages of APISIX's ext-plugin protocol (api7/ext-plugin-proto 0.6.1).

Nothing here touches bytes: `runner.protocol.codec` turns frames into these objects and back.
Header and arg lists are tuples of ``(name, value)`` pairs because the protocol allows repeated
names and values that are absent (a flag arg ``?debug``, a header delete in a Rewrite), which a
dict would lose.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import TypeAlias

__all__ = [
    "MAX_PAYLOAD",
    "METHOD_NAMES",
    "ConfEntry",
    "ErrCode",
    "ErrorReply",
    "ExtraInfoQuery",
    "Frame",
    "HTTPReqCallReply",
    "HTTPRespCallReply",
    "Method",
    "Pairs",
    "PrepareConfReply",
    "PrepareConfRequest",
    "RPCType",
    "ReqBodyQuery",
    "RespBodyQuery",
    "Rewrite",
    "Stop",
    "VarQuery",
]

# The length field is 24 bits; APISIX refuses to send more (init.lua MAX_DATA_SIZE).
MAX_PAYLOAD = (1 << 24) - 1


class RPCType(IntEnum):
    ERR = 0
    PREPARE_CONF = 1
    HTTP_REQ_CALL = 2
    EXTRA_INFO = 3
    HTTP_RESP_CALL = 4


class ErrCode(IntEnum):
    BAD_REQUEST = 0
    SERVICE_UNAVAILABLE = 1
    CONF_TOKEN_NOT_FOUND = 2


class Method(IntEnum):
    GET = 0
    HEAD = 1
    POST = 2
    PUT = 3
    DELETE = 4
    MKCOL = 5
    COPY = 6
    MOVE = 7
    OPTIONS = 8
    PROPFIND = 9
    PROPPATCH = 10
    LOCK = 11
    UNLOCK = 12
    PATCH = 13
    TRACE = 14


METHOD_NAMES: tuple[str, ...] = tuple(m.name for m in Method)

Pairs: TypeAlias = tuple[tuple[str, str | None], ...]
"""Ordered (name, value) pairs; ``None`` is "no value" (flag arg, or delete in a Rewrite)."""


@dataclass(frozen=True, slots=True)
class Frame:
    """One protocol frame: a type byte and a FlatBuffers payload of at most MAX_PAYLOAD bytes."""

    type: int
    payload: bytes


# --- APISIX -> runner ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfEntry:
    """One element of PrepareConf's ordered conf list: plugin name and its raw config string."""

    name: str
    value: str


@dataclass(frozen=True, slots=True)
class PrepareConfRequest:
    entries: tuple[ConfEntry, ...]
    key: str | None = None


# HTTPReqCall and HTTPRespCall requests are lazy views over the payload; they live with the
# decoders (runner.protocol._decode, public under runner.protocol.codec) because their fields are
# read straight from the buffer on first access.


# --- runner -> APISIX ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrepareConfReply:
    token: int


@dataclass(frozen=True, slots=True)
class ErrorReply:
    code: ErrCode


@dataclass(frozen=True, slots=True)
class Stop:
    """Answer the client directly. APISIX maps status 0 to 200 and ignores an empty body."""

    status: int = 200
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Rewrite:
    """Change the request before it goes upstream; only fields that changed are set.

    ``headers``/``args``: a ``None`` value deletes that name. ``resp_headers`` are added to the
    client response. ``path`` excludes the query string (APISIX would percent-encode a ``?``).
    """

    path: str | None = None
    headers: Pairs = ()
    args: Pairs = ()
    resp_headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None

    def is_empty(self) -> bool:
        return self.path is None and not self.headers and not self.args and not self.resp_headers and not self.body


@dataclass(frozen=True, slots=True)
class HTTPReqCallReply:
    id: int
    action: Stop | Rewrite | None = None


@dataclass(frozen=True, slots=True)
class HTTPRespCallReply:
    """Reply to ext-plugin-post-resp. Non-empty ``headers`` replace the upstream's whole set."""

    id: int
    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class VarQuery:
    """ExtraInfo: the value of an nginx/APISIX variable (``ctx.var[name]``)."""

    name: str


@dataclass(frozen=True, slots=True)
class ReqBodyQuery:
    """ExtraInfo: the request body."""


@dataclass(frozen=True, slots=True)
class RespBodyQuery:
    """ExtraInfo: the upstream response body (ext-plugin-post-resp only)."""


ExtraInfoQuery: TypeAlias = VarQuery | ReqBodyQuery | RespBodyQuery
