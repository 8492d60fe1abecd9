"""Reference FlatBuffers builders/readers and Hypothesis strategies for the codec tests (test-only).

Messages are built with ``flatbuffers.Builder`` through the generated ``A6`` modules from
a6pluginprotos 0.2.1. What that release lacks (Rewrite slots 3/4, HTTPRespCall, ExtraInfo
RespBody) is built with raw ``StartObject``/``Prepend*Slot`` calls and read with
``flatbuffers.table.Table`` at ``Offset(4 + 2*slot)``, following ext-plugin.fbs v0.6.1.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flatbuffers
from A6 import TextEntry
from A6.Err import Resp as ErrResp
from A6.ExtraInfo import Req as InfoReq
from A6.ExtraInfo import ReqBody as InfoReqBody
from A6.ExtraInfo import Resp as InfoResp
from A6.ExtraInfo import Var as InfoVar
from A6.HTTPReqCall import Req as CallReq
from A6.HTTPReqCall import Resp as CallResp
from A6.HTTPReqCall import Stop as CallStop
from A6.PrepareConf import Req as ConfReq
from A6.PrepareConf import Resp as ConfResp
from flatbuffers.number_types import Uint8Flags, Uint16Flags, Uint32Flags
from flatbuffers.table import Table
from hypothesis import strategies as st

from runner.protocol.messages import (
    ConfEntry,
    ExtraInfoQuery,
    HTTPReqCallReply,
    HTTPRespCallReply,
    PrepareConfRequest,
    ReqBodyQuery,
    RespBodyQuery,
    Rewrite,
    Stop,
    VarQuery,
)

Pairs = tuple[tuple[str, str | None], ...]


def enc(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def dec(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


# --- Hypothesis strategies -------------------------------------------------------------------

# Strings that survive a surrogateescape round trip: real text, or arbitrary bytes decoded once
# (decoding two byte strings separately and concatenating could form an invalid sequence).
http_text = st.one_of(st.text(max_size=40), st.binary(max_size=40).map(dec))
utf8_text = st.text(max_size=40)
u32 = st.integers(0, 2**32 - 1)
u16 = st.integers(0, 2**16 - 1)
pairs = st.lists(st.tuples(http_text, st.none() | http_text), max_size=8).map(tuple)
valued_pairs = st.lists(st.tuples(http_text, http_text), max_size=8).map(tuple)
bodies = st.binary(max_size=300)
stops = st.builds(Stop, status=u16, headers=valued_pairs, body=bodies)
rewrites = st.builds(
    Rewrite,
    path=st.none() | http_text,
    headers=pairs,
    args=pairs,
    resp_headers=valued_pairs,
    body=st.none() | bodies,
)
req_call_replies = st.builds(HTTPReqCallReply, id=u32, action=st.none() | stops | rewrites)
resp_call_replies = st.builds(HTTPRespCallReply, id=u32, status=u16, headers=valued_pairs, body=st.none() | bodies)
queries: st.SearchStrategy[ExtraInfoQuery] = st.one_of(
    st.builds(VarQuery, name=utf8_text), st.just(ReqBodyQuery()), st.just(RespBodyQuery())
)
conf_entries = st.lists(st.builds(ConfEntry, name=utf8_text, value=utf8_text), max_size=6).map(tuple)
req_calls = st.fixed_dictionaries(
    {
        "id": u32,
        "conf_token": u32,
        "method": st.integers(0, 14),
        "path": st.none() | http_text,
        "src_ip": st.none() | st.binary(min_size=4, max_size=4) | st.binary(min_size=16, max_size=16),
        "headers": pairs,
        "args": pairs,
    }
)


# --- building --------------------------------------------------------------------------------


def _string(b: flatbuffers.Builder, text: str) -> int:
    return int(b.CreateString(enc(text)))


def _entries(b: flatbuffers.Builder, items: Pairs) -> int:
    offsets = []
    for name, value in items:
        name_off = _string(b, name)
        value_off = None if value is None else _string(b, value)
        TextEntry.Start(b)
        TextEntry.AddName(b, name_off)
        if value_off is not None:
            TextEntry.AddValue(b, value_off)
        offsets.append(TextEntry.End(b))
    b.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        b.PrependUOffsetTRelative(off)
    return int(b.EndVector())


def _finish(b: flatbuffers.Builder, root: int) -> bytes:
    b.Finish(root)
    return bytes(b.Output())


def build_prepare_conf(entries: tuple[ConfEntry, ...], key: str | None) -> bytes:
    b = flatbuffers.Builder(256)
    conf = _entries(b, tuple((e.name, e.value) for e in entries))
    key_off = None if key is None else _string(b, key)
    ConfReq.Start(b)
    ConfReq.AddConf(b, conf)
    if key_off is not None:
        ConfReq.AddKey(b, key_off)
    return _finish(b, ConfReq.End(b))


def build_http_req_call(
    *,
    id: int,
    conf_token: int,
    method: int,
    path: str | None,
    src_ip: bytes | None,
    headers: Pairs,
    args: Pairs,
) -> bytes:
    b = flatbuffers.Builder(1024)
    ip = None if src_ip is None else b.CreateByteVector(src_ip)
    path_off = None if path is None else _string(b, path)
    args_off = _entries(b, args) if args else None
    headers_off = _entries(b, headers) if headers else None
    CallReq.Start(b)
    CallReq.AddId(b, id)
    CallReq.AddConfToken(b, conf_token)
    CallReq.AddMethod(b, method)
    if ip is not None:
        CallReq.AddSrcIp(b, ip)
    if path_off is not None:
        CallReq.AddPath(b, path_off)
    if args_off is not None:
        CallReq.AddArgs(b, args_off)
    if headers_off is not None:
        CallReq.AddHeaders(b, headers_off)
    return _finish(b, CallReq.End(b))


def build_http_resp_call(*, id: int, conf_token: int, status: int, headers: Pairs) -> bytes:
    b = flatbuffers.Builder(256)
    headers_off = _entries(b, headers) if headers else None
    b.StartObject(4)
    b.PrependUint32Slot(0, id, 0)
    b.PrependUint16Slot(1, status, 0)
    if headers_off is not None:
        b.PrependUOffsetTRelativeSlot(2, headers_off, 0)
    b.PrependUint32Slot(3, conf_token, 0)
    return _finish(b, b.EndObject())


def build_extra_info_result(result: bytes | None) -> bytes:
    b = flatbuffers.Builder(64)
    vec = None if result is None else b.CreateByteVector(result)
    InfoResp.Start(b)
    if vec is not None:
        InfoResp.AddResult(b, vec)
    return _finish(b, InfoResp.End(b))


def build_prepare_conf_reply(token: int) -> bytes:
    b = flatbuffers.Builder(32)
    ConfResp.Start(b)
    ConfResp.AddConfToken(b, token)
    return _finish(b, ConfResp.End(b))


def build_error(code: int) -> bytes:
    b = flatbuffers.Builder(32)
    ErrResp.Start(b)
    ErrResp.AddCode(b, code)
    return _finish(b, ErrResp.End(b))


def _stop(b: flatbuffers.Builder, stop: Stop) -> int:
    headers = _entries(b, stop.headers) if stop.headers else None
    body = b.CreateByteVector(stop.body) if stop.body else None
    CallStop.Start(b)
    CallStop.AddStatus(b, stop.status)
    if headers is not None:
        CallStop.AddHeaders(b, headers)
    if body is not None:
        CallStop.AddBody(b, body)
    return int(CallStop.End(b))


def _rewrite(b: flatbuffers.Builder, rw: Rewrite) -> int:
    # a6pluginprotos 0.2.1's Rewrite.Start() is StartObject(3): slots 3/4 need the raw calls.
    refs = [
        (0, None if rw.path is None else _string(b, rw.path)),
        (1, _entries(b, rw.headers) if rw.headers else None),
        (2, _entries(b, rw.args) if rw.args else None),
        (3, _entries(b, rw.resp_headers) if rw.resp_headers else None),
        (4, None if rw.body is None else b.CreateByteVector(rw.body)),
    ]
    b.StartObject(5)
    for slot, off in refs:
        if off is not None:
            b.PrependUOffsetTRelativeSlot(slot, off, 0)
    return int(b.EndObject())


def build_http_req_call_reply(reply: HTTPReqCallReply) -> bytes:
    b = flatbuffers.Builder(256)
    kind, action = 0, None
    if isinstance(reply.action, Stop):
        kind, action = 1, _stop(b, reply.action)
    elif isinstance(reply.action, Rewrite):
        kind, action = 2, _rewrite(b, reply.action)
    CallResp.Start(b)
    CallResp.AddId(b, reply.id)
    if action is not None:
        CallResp.AddActionType(b, kind)
        CallResp.AddAction(b, action)
    return _finish(b, CallResp.End(b))


def build_http_resp_call_reply(reply: HTTPRespCallReply) -> bytes:
    b = flatbuffers.Builder(256)
    headers = _entries(b, reply.headers) if reply.headers else None
    body = None if reply.body is None else b.CreateByteVector(reply.body)
    b.StartObject(4)
    b.PrependUint32Slot(0, reply.id, 0)
    b.PrependUint16Slot(1, reply.status, 0)
    if headers is not None:
        b.PrependUOffsetTRelativeSlot(2, headers, 0)
    if body is not None:
        b.PrependUOffsetTRelativeSlot(3, body, 0)
    return _finish(b, b.EndObject())


def build_extra_info_query(query: ExtraInfoQuery) -> bytes:
    b = flatbuffers.Builder(64)
    if isinstance(query, VarQuery):
        name = _string(b, query.name)
        InfoVar.Start(b)
        InfoVar.AddName(b, name)
        kind, info = 1, InfoVar.End(b)
    elif isinstance(query, ReqBodyQuery):
        InfoReqBody.Start(b)
        kind, info = 2, InfoReqBody.End(b)
    else:  # RespBody (proto 0.6.0) is missing from a6pluginprotos 0.2.1
        b.StartObject(0)
        kind, info = 3, b.EndObject()
    InfoReq.Start(b)
    InfoReq.AddInfoType(b, kind)
    InfoReq.AddInfo(b, info)
    return _finish(b, InfoReq.End(b))


# --- reading ---------------------------------------------------------------------------------


def _root(payload: bytes) -> Table:
    return Table(bytearray(payload), flatbuffers.encode.Get(flatbuffers.packer.uoffset, payload, 0))


def _field(tab: Table, slot: int) -> int:
    return int(tab.Offset(4 + 2 * slot))


def _scalar(tab: Table, slot: int, flags: Any) -> int:
    o = _field(tab, slot)
    return int(tab.Get(flags, o + tab.Pos)) if o else 0


def _read_entries(tab: Table, slot: int) -> Pairs:
    o = _field(tab, slot)
    if not o:
        return ()
    start, out = tab.Vector(o), []
    for j in range(tab.VectorLen(o)):
        entry = TextEntry.TextEntry()
        entry.Init(tab.Bytes, tab.Indirect(start + 4 * j))
        value = entry.Value()
        out.append((dec(entry.Name()), None if value is None else dec(value)))
    return tuple(out)


def _read_bytes(tab: Table, slot: int) -> bytes | None:
    o = _field(tab, slot)
    if not o:
        return None
    start = tab.Vector(o)
    return bytes(tab.Bytes[start : start + tab.VectorLen(o)])


def _read_string(tab: Table, slot: int) -> str | None:
    o = _field(tab, slot)
    return dec(tab.String(o + tab.Pos)) if o else None


def _sub(tab: Table, slot: int) -> Table:
    return Table(tab.Bytes, tab.Indirect(_field(tab, slot) + tab.Pos))


def _valued(items: Pairs) -> tuple[tuple[str, str], ...]:
    assert all(v is not None for _, v in items)
    return tuple((k, v) for k, v in items if v is not None)


def read_prepare_conf(payload: bytes) -> PrepareConfRequest:
    req = ConfReq.Req.GetRootAs(bytearray(payload), 0)
    entries = []
    for j in range(req.ConfLength()):
        entry = req.Conf(j)
        entries.append(ConfEntry(entry.Name().decode(), entry.Value().decode()))
    key = req.Key()
    return PrepareConfRequest(tuple(entries), None if key is None else key.decode())


def read_http_req_call(payload: bytes) -> dict[str, Any]:
    req = CallReq.Req.GetRootAs(bytearray(payload), 0)
    tab = req._tab
    path = req.Path()
    return {
        "id": req.Id(),
        "conf_token": req.ConfToken(),
        "method": req.Method(),
        "path": None if path is None else dec(path),
        "src_ip": None if req.SrcIpIsNone() else bytes(req.SrcIp(j) for j in range(req.SrcIpLength())),
        "headers": _read_entries(tab, 5),
        "args": _read_entries(tab, 4),
    }


def read_http_resp_call(payload: bytes) -> dict[str, Any]:
    tab = _root(payload)
    return {
        "id": _scalar(tab, 0, Uint32Flags),
        "status": _scalar(tab, 1, Uint16Flags),
        "headers": _read_entries(tab, 2),
        "conf_token": _scalar(tab, 3, Uint32Flags),
    }


def read_extra_info_result(payload: bytes) -> bytes | None:
    return _read_bytes(_root(payload), 0)


def read_prepare_conf_reply(payload: bytes) -> int:
    return int(ConfResp.Resp.GetRootAs(bytearray(payload), 0).ConfToken())


def read_error(payload: bytes) -> int:
    return int(ErrResp.Resp.GetRootAs(bytearray(payload), 0).Code())


def read_http_req_call_reply(payload: bytes) -> HTTPReqCallReply:
    tab = _root(payload)
    rid, kind = _scalar(tab, 0, Uint32Flags), _scalar(tab, 1, Uint8Flags)
    if kind == 1:
        stop = _sub(tab, 2)
        body = _read_bytes(stop, 2)
        return HTTPReqCallReply(rid, Stop(_scalar(stop, 0, Uint16Flags), _valued(_read_entries(stop, 1)), body or b""))
    if kind == 2:
        rw = _sub(tab, 2)
        action = Rewrite(
            path=_read_string(rw, 0),
            headers=_read_entries(rw, 1),
            args=_read_entries(rw, 2),
            resp_headers=_valued(_read_entries(rw, 3)),
            body=_read_bytes(rw, 4),
        )
        return HTTPReqCallReply(rid, action)
    assert kind == 0
    return HTTPReqCallReply(rid)


def read_http_resp_call_reply(payload: bytes) -> HTTPRespCallReply:
    tab = _root(payload)
    return HTTPRespCallReply(
        id=_scalar(tab, 0, Uint32Flags),
        status=_scalar(tab, 1, Uint16Flags),
        headers=_valued(_read_entries(tab, 2)),
        body=_read_bytes(tab, 3),
    )


def read_extra_info_query(payload: bytes) -> ExtraInfoQuery:
    tab = _root(payload)
    kind = _scalar(tab, 0, Uint8Flags)
    info = _sub(tab, 1)
    if kind == 1:
        name = _read_string(info, 0)
        assert name is not None
        return VarQuery(name)
    readers: dict[int, Callable[[], ExtraInfoQuery]] = {2: ReqBodyQuery, 3: RespBodyQuery}
    return readers[kind]()
