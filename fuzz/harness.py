"""Fuzz harness shared by the atheris targets and the regression tests (no atheris import here).

Three entry points take one fuzzer input (``bytes``) each and raise on a bug:

* :func:`check_codec` -- the frame splitter and every message decoder. Only ``DecodeError`` may
  escape a decoder; whatever decodes must survive an encode/decode round trip unchanged.
* :func:`check_session` -- a real :class:`runner.session.Session` with mtls-guard and a scriptable
  test plugin. Nothing may escape ``data_received``; every frame written must be a well-formed
  runner->APISIX frame; every request gets exactly one answer of the right kind (see
  :func:`_check_exchange`), and the output does not depend on how the bytes were chunked.
* :func:`check_policy` -- path canonicalisation, policy compilation, forwarded-certificate parsing
  and the decision engine: only the documented exceptions may escape, plus a few invariants.

A broken invariant raises :class:`OracleViolation`; any other unexpected exception propagates as is.

Input layout of the codec and session targets (built by :func:`make_input`): one control byte
(low 3 bits: number of cut points; bit 7: feed byte by byte), then two bytes per cut point
(little-endian offset into the stream, modulo its length + 1), then the byte stream itself.
"""

from __future__ import annotations

import base64
import functools
import ipaddress
import json
import logging
import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import quote, unquote

from cryptography.hazmat.primitives.serialization import Encoding

from plugins.mtls_guard import MtlsGuard
from plugins.mtls_guard.decision import VAR_ORDER, Decision, NeedVars, Reason, RequestInput
from plugins.mtls_guard.forwarded import ForwardedFormat, build_xfcc, parse_forwarded
from plugins.mtls_guard.identity import (
    CertificateCache,
    CertificateError,
    ClientCertificate,
    load_der,
    load_pem,
    unescape_nginx,
)
from plugins.mtls_guard.matchers import authority_host
from plugins.mtls_guard.paths import classify_path, exempt_path
from plugins.mtls_guard.policy import CompiledPolicy, compile_policy, san_header_value
from plugins.mtls_guard.policy_config import ApisixSource, HeaderSource, Mode
from plugins.mtls_guard.schema_readers import PolicyError
from runner import BasePlugin, HTTPRequest, HTTPResponse, PluginRegistry, Stop
from runner.confcache import Chain, ConfStore
from runner.protocol import codec
from runner.protocol.messages import (
    MAX_PAYLOAD,
    METHOD_NAMES,
    ConfEntry,
    ErrCode,
    ExtraInfoQuery,
    Frame,
    HTTPReqCallReply,
    HTTPRespCallReply,
    PrepareConfRequest,
    RPCType,
    VarQuery,
)
from runner.session import Session, SessionConfig

from .fixtures import CA_PEM, LEAF_FINGERPRINT, LEAF_PEM

__all__ = [
    "PRESEEDED",
    "TARGETS",
    "OracleViolation",
    "check_codec",
    "check_policy",
    "check_session",
    "configure_logging",
    "make_input",
    "split_input",
]


class OracleViolation(AssertionError):
    """A property the harness checks does not hold: a bug in the code under test (or the harness)."""


def _require(condition: object, message: str) -> None:
    # Not ``assert``: the checks must hold under ``python -O`` too.
    if not condition:
        raise OracleViolation(message)


# --- input layout ------------------------------------------------------------------------------------

_CUT_MASK: Final = 0x07
_DEADLINES: Final = 0x40
_BYTEWISE: Final = 0x80


def make_input(stream: bytes, cuts: Sequence[int] = (), *, bytewise: bool = False, deadlines: bool = False) -> bytes:
    """Encode ``stream`` with up to 7 cut points (offsets into the stream) as a fuzzer input.

    ``deadlines`` (session target): every event-loop turn also runs the call-timeout sweep with the clock
    far ahead, so a call still waiting for ExtraInfo answers is cut off and its late answers discarded.
    """
    if len(cuts) > _CUT_MASK:
        raise ValueError("at most 7 cut points")
    head = bytes([len(cuts) | (_BYTEWISE if bytewise else 0) | (_DEADLINES if deadlines else 0)])
    return head + b"".join((c % 0x10000).to_bytes(2, "little") for c in cuts) + stream


def split_input(data: bytes) -> tuple[bytes, list[bytes]]:
    """(stream, chunks): the bytes to deliver and how to cut them (empty chunks are kept on purpose)."""
    if not data:
        return b"", []
    control = data[0]
    head = 1 + 2 * (control & _CUT_MASK)
    raw, stream = data[1:head], data[head:]
    if control & _BYTEWISE:
        return stream, [stream[i : i + 1] for i in range(len(stream))]
    cuts = sorted({int.from_bytes(raw[i : i + 2], "little") % (len(stream) + 1) for i in range(0, len(raw) - 1, 2)})
    chunks, previous = [], 0
    for cut in [*cuts, len(stream)]:
        chunks.append(stream[previous:cut])
        previous = cut
    return stream, chunks


# --- logging -------------------------------------------------------------------------------------------


class _FormattingSink(logging.Handler):
    """Formats every record (so broken log calls surface) and keeps nothing but formatting failures."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.failures: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.format(record)

    def handleError(self, record: logging.LogRecord) -> None:
        self.failures.append(f"{record.name}: {record.msg!r} % {record.args!r}")


_SINK: Final = _FormattingSink()


def configure_logging() -> None:
    """For fuzzing processes only: format every runner/plugin log record, print none of them."""
    logger = logging.getLogger("mtls_guard")
    logger.handlers[:] = [_SINK]
    logger.setLevel(logging.DEBUG)
    logger.propagate = False


def _check_log_sink() -> None:
    if _SINK.failures:
        failures, _SINK.failures[:] = list(_SINK.failures), []
        raise OracleViolation(f"a log call cannot be formatted: {failures[0]}")


# --- codec target -------------------------------------------------------------------------------------

_SMALL_MAX: Final = 64
_FAILED: Final[Any] = object()


def _attempt(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, or _FAILED when it raises DecodeError (the only exception a decoder may raise)."""
    try:
        return fn(*args)
    except codec.DecodeError:
        return _FAILED


def _reference_frames(stream: bytes, max_payload: int) -> tuple[list[Frame], bool]:
    """An obviously correct splitter: (frames, whether a header announced an invalid size)."""
    frames: list[Frame] = []
    pos = 0
    while pos + 4 <= len(stream):
        size = int.from_bytes(stream[pos + 1 : pos + 4], "big")
        if not 1 <= size <= max_payload:
            return frames, True
        if pos + 4 + size > len(stream):
            break
        frames.append(Frame(stream[pos], stream[pos + 4 : pos + 4 + size]))
        pos += 4 + size
    return frames, False


def _split_frames(chunks: Sequence[bytes], max_payload: int) -> tuple[list[Frame], bool, int]:
    """Run FrameDecoder over ``chunks``: (frames, failed, bytes still buffered)."""
    decoder = codec.FrameDecoder(max_payload)
    frames: list[Frame] = []
    for chunk in chunks:
        try:
            decoder.feed(chunk)
            while (frame := decoder.next_frame()) is not None:
                frames.append(frame)
        except codec.DecodeError:
            # An unusable decoder must keep refusing, never resume mid-stream.
            for again in (lambda: decoder.feed(b"\x00"), decoder.next_frame):
                try:
                    again()
                except codec.DecodeError:
                    continue
                raise OracleViolation("FrameDecoder accepted input after an error") from None
            return frames, True, -1
    return frames, False, decoder.buffered


def check_codec(data: bytes) -> None:
    """Frames split at fuzzer-chosen points equal a reference split; every payload goes through every decoder."""
    stream, chunks = split_input(data)
    for max_payload in (MAX_PAYLOAD, _SMALL_MAX):
        expected, bad_header = _reference_frames(stream, max_payload)
        frames, failed, buffered = _split_frames(chunks, max_payload)
        _require(frames == expected, f"chunked FrameDecoder(max={max_payload}) disagrees with the reference split")
        _require(failed == bad_header, f"FrameDecoder(max={max_payload}) error={failed}, reference says {bad_header}")
        if not failed:
            consumed = sum(4 + len(f.payload) for f in frames)
            _require(buffered == len(stream) - consumed, "FrameDecoder.buffered is wrong")
    # Every payload through every decoder, whatever its frame type: the type byte is attacker-chosen too.
    payloads = [f.payload for f in _reference_frames(stream, MAX_PAYLOAD)[0]] or [stream]
    for payload in payloads[:16]:
        check_payload(payload)


def check_payload(payload: bytes) -> None:
    """Run one payload through all runner-side and APISIX-side decoders and round-trip what decodes."""
    _runner_side(payload)
    _apisix_side(payload)


def _runner_side(payload: bytes) -> None:
    conf = _attempt(codec.decode_prepare_conf, payload)
    if conf is not _FAILED:
        _check_decoded_size(payload, conf.key, *(t for e in conf.entries for t in (e.name, e.value)))
        again = codec.decode_prepare_conf(codec.prepare_conf_request_frame(conf.entries, conf.key)[4:])
        _require(again == conf, f"PrepareConf round trip changed {conf!r} into {again!r}")
    req = _attempt(codec.decode_http_req_call, payload)
    if req is not _FAILED:
        _touch_req_call(req, payload)
    resp = _attempt(codec.decode_http_resp_call, payload)
    if resp is not _FAILED:
        _touch_resp_call(resp, payload)
    info = _attempt(codec.decode_extra_info_result, payload)
    if info is not _FAILED:
        info_again = codec.decode_extra_info_result(codec.extra_info_result_frame(info)[4:])
        _require(info_again == info, "ExtraInfo result round trip changed the result")


def _header_lookup_agrees(view: codec.HTTPReqCall | codec.HTTPRespCall, headers: Sequence[tuple[str, Any]]) -> None:
    """``view.header(name)`` equals the first entry whose name matches ASCII-case-insensitively."""
    names = [name for name, _ in headers[:6]]
    names += ["host", "X-Forwarded-Client-Cert", "\ud800", ""]
    names += ["".join(c.swapcase() if c.isascii() else c for c in n) for n in names[:3]]
    for name in names:
        got = _attempt(view.header, name)
        _require(got is not _FAILED, f"header({name!r}) raised although headers decoded")
        try:
            wanted = name.encode("utf-8", "surrogateescape").lower()
        except UnicodeEncodeError:
            _require(got is None, f"header({name!r}) found a name that cannot be encoded")
            continue
        expected = next((v for n, v in headers if n.encode("utf-8", "surrogateescape").lower() == wanted), None)
        _require(got == expected, f"header({name!r}) = {got!r}, but the decoded headers say {expected!r}")
    # header_spellings: every name (as sent) that folds ('_' = '-', ASCII case) into the set, once each.
    folded = frozenset(
        codec.fold_header_name(n.encode("utf-8", "surrogateescape"))
        for n in (*names[:4], "x-client-subject", "X_Forwarded-Client-Cert")
        if n and n.isascii()
    )
    got_spellings = _attempt(view.header_spellings, folded)
    _require(got_spellings is not _FAILED, "header_spellings raised although headers decoded")
    wanted_spellings = tuple(
        dict.fromkeys(n for n, _ in headers if codec.fold_header_name(n.encode("utf-8", "surrogateescape")) in folded)
    )
    _require(got_spellings == wanted_spellings, f"header_spellings = {got_spellings!r}, expected {wanted_spellings!r}")


def _check_decoded_size(payload: bytes, *texts: Any) -> None:
    """Decoded text may not exceed the payload: every string of a sane buffer has bytes of its own."""
    size = sum(len(t) for t in texts if isinstance(t, str))
    if size > len(payload):
        raise OracleViolation(f"a {len(payload)}-byte payload decoded into {size} characters of text")


def _pair_texts(pairs: Any) -> list[Any]:
    return [] if pairs is _FAILED else [t for pair in pairs for t in pair]


def _touch_req_call(view: codec.HTTPReqCall, payload: bytes) -> None:
    fields: dict[str, Any] = {"id": view.id, "conf_token": view.conf_token, "method": view.method}
    _require(0 <= view.method < len(METHOD_NAMES), f"method {view.method} out of range")
    for name in ("path", "src_ip", "headers", "args"):
        fields[name] = _attempt(getattr, view, name)
    repr(view)
    request = HTTPRequest(view, _NoChannel())
    for name in ("method", "path", "src_ip", "id", "conf_token"):
        _attempt(getattr, request, name)
    headers = _attempt(lambda: request.headers)
    if headers is not _FAILED:
        headers.get("host")
        headers.get_all("x-forwarded-client-cert")
        _require(len(headers) == len(fields["headers"]), "Headers length differs from the view's")
    args = _attempt(lambda: request.args)
    if args is not _FAILED:
        args.get("a")
    _check_decoded_size(payload, fields["path"], *_pair_texts(fields["headers"]), *_pair_texts(fields["args"]))
    if fields["headers"] is not _FAILED:
        _header_lookup_agrees(view, fields["headers"])
    if _FAILED in fields.values():
        return
    frame = codec.http_req_call_frame(**fields)
    again = codec.decode_http_req_call(frame[4:])
    for name, value in fields.items():
        _require(getattr(again, name) == value, f"HTTPReqCall round trip changed {name}")


def _touch_resp_call(view: codec.HTTPRespCall, payload: bytes) -> None:
    repr(view)
    headers = _attempt(getattr, view, "headers")
    if headers is _FAILED:
        return
    _check_decoded_size(payload, *_pair_texts(headers))
    _header_lookup_agrees(view, headers)
    response = HTTPResponse(view, _NoChannel())
    response.headers.get("content-type")
    _require(response.status == view.status, "HTTPResponse.status differs from the view's")
    frame = codec.http_resp_call_frame(id=view.id, conf_token=view.conf_token, status=view.status, headers=headers)
    again = codec.decode_http_resp_call(frame[4:])
    _require(
        (again.id, again.conf_token, again.status, again.headers) == (view.id, view.conf_token, view.status, headers),
        "HTTPRespCall round trip changed a field",
    )


def _apisix_side(payload: bytes) -> None:
    _attempt(codec.decode_error, payload)
    _attempt(codec.decode_prepare_conf_reply, payload)
    reply = _attempt(codec.decode_http_req_call_reply, payload)
    if reply is not _FAILED:
        again = codec.decode_http_req_call_reply(codec.http_req_call_reply_frame(reply)[4:])
        _require(again == reply, f"HTTPReqCall reply round trip changed {reply!r} into {again!r}")
    resp = _attempt(codec.decode_http_resp_call_reply, payload)
    if resp is not _FAILED:
        resp_again = codec.decode_http_resp_call_reply(codec.http_resp_call_reply_frame(resp)[4:])
        _require(resp_again == resp, f"HTTPRespCall reply round trip changed {resp!r} into {resp_again!r}")
    query = _attempt(codec.decode_extra_info_query, payload)
    if query is not _FAILED:
        query_again = codec.decode_extra_info_query(codec.extra_info_query_frame(query)[4:])
        _require(query_again == query, f"ExtraInfo query round trip changed {query!r} into {query_again!r}")


class _NoChannel:
    """ExtraInfo channel for the codec target, which never awaits anything."""

    def query(self, queries: Sequence[ExtraInfoQuery]) -> Any:
        raise OracleViolation("the codec target does not run filters")


# --- session target: plugins -------------------------------------------------------------------------

_REQUEST_COMMANDS: Final = frozenset(
    {"var", "vars", "body", "read", "yield", "set", "del", "arg", "delarg", "path", "resp", "setbody", "stop", "raise"}
)
_RESPONSE_COMMANDS: Final = frozenset(
    {"var", "vars", "body", "read", "yield", "set", "add", "del", "status", "setbody"}
)
Script = tuple[tuple[str, str], ...]


class ScriptPlugin(BasePlugin[Script]):
    """Conf ``cmd[:arg];cmd[:arg];...``: a tiny script so the fuzzer can steer the whole plugin API.

    Request commands: var:NAME, vars:A,B, body, read[:HEADER], yield, set:N=V, del:N, arg:N=V,
    delarg:N, path:/P, resp:N=V, setbody:TEXT, stop[:STATUS], raise[:MSG]. Response commands: var,
    vars, body, read, yield, set:N=V, add:N=V, del:N, status:N, setbody:TEXT (and raise).
    """

    name = "fz-script"

    def parse_conf(self, value: str) -> Script:
        steps = []
        for part in value.split(";") if value else ():
            command, _, arg = part.partition(":")
            if command not in _REQUEST_COMMANDS | _RESPONSE_COMMANDS:
                raise ValueError(f"unknown command {command!r}")
            if command in ("stop", "status"):
                int(arg or "200")  # refuse a non-number now, like a real plugin would
            steps.append((command, arg))
        if len(steps) > 32:
            raise ValueError("script too long")
        return tuple(steps)

    async def on_request(self, conf: Script, request: HTTPRequest) -> Stop | None:
        for command, arg in conf:
            name, _, value = arg.partition("=")
            if command == "var":
                await request.var(arg)
            elif command == "vars":
                await request.vars(*arg.split(","))
            elif command == "body":
                await request.body()
            elif command == "read":
                _read_request(request, arg)
            elif command == "yield":
                await _bare_yield()
            elif command == "set":
                request.set_header(name, value)
            elif command == "del":
                request.delete_header(arg)
            elif command == "arg":
                request.set_arg(name, value)
            elif command == "delarg":
                request.delete_arg(arg)
            elif command == "path":
                request.set_path(arg)
            elif command == "resp":
                request.add_response_header(name, value)
            elif command == "setbody":
                request.set_body(arg.encode("utf-8", "surrogateescape"))
            elif command == "stop":
                return Stop(int(arg or "200"), (("x-fz", "stop"),), b"stopped")
            elif command == "raise":
                raise RuntimeError(f"scripted failure {arg!r}")
        return None

    async def on_response(self, conf: Script, response: HTTPResponse) -> None:
        for command, arg in conf:
            name, _, value = arg.partition("=")
            if command == "var":
                await response.var(arg)
            elif command == "vars":
                await response.vars(*arg.split(","))
            elif command == "body":
                await response.body()
            elif command == "read":
                response.headers.get(arg or "content-type")
                _ = response.status, response.id, response.conf_token
            elif command == "yield":
                await _bare_yield()
            elif command == "set":
                response.set_header(name, value)
            elif command == "add":
                response.add_header(name, value)
            elif command == "del":
                response.delete_header(arg)
            elif command == "status":
                response.set_status(int(arg or "200"))
            elif command == "setbody":
                response.set_body(arg.encode("utf-8", "surrogateescape"))
            elif command == "raise":
                raise RuntimeError(f"scripted failure {arg!r}")


def _read_request(request: HTTPRequest, header: str) -> None:
    _ = request.method, request.path, request.src_ip, request.id, request.conf_token
    request.headers.get(header or "host")
    request.headers.get_all(header or "host")
    _ = (header in request.headers), request.args.pairs, request.call.header(header or "host")


class _BareYield:
    def __await__(self) -> Any:
        yield None  # what asyncio.sleep(0) yields: the driver reschedules the step


async def _bare_yield() -> None:
    await _BareYield()


# --- session target: configuration --------------------------------------------------------------------

_ESCAPED_LEAF: Final = quote(LEAF_PEM, safe="")
_ENFORCE_POLICY: Final = json.dumps({"require": {"fingerprint_sha256": [LEAF_FINGERPRINT]}})
_EXEMPT_POLICY: Final = json.dumps(
    {
        "exempt": [{"id": "pub", "path": "/public/[a-z]+", "methods": ["GET", "HEAD"]}],
        "require_sni_match": False,
        "require": {"fingerprint_sha256": [LEAF_FINGERPRINT]},
        "forward": {"subject": "x-client-subject", "fingerprint": "x-client-fp"},
    }
)
_REPORT_POLICY: Final = json.dumps({"mode": "report", "require": {"san": {"dns": ["*.fuzz.example"]}}})
_XFCC_POLICY: Final = json.dumps(
    {
        "source": {"type": "header", "format": "xfcc", "trusted_proxies": ["10.0.0.0/8", "fd00::/8"], "ca": CA_PEM},
        "forward": {"san": "x-client-san"},
    }
)
_RFC9440_POLICY: Final = json.dumps(
    {"source": {"type": "header", "format": "rfc9440", "trusted_proxies": ["127.0.0.1/32"], "ca": CA_PEM}}
)

PRESEEDED: Final[tuple[tuple[tuple[str, str], ...], ...]] = (
    (("mtls-guard", _ENFORCE_POLICY),),  # token 1: enforce, APISIX source, only the fixture leaf passes
    (("mtls-guard", _EXEMPT_POLICY),),  # 2: enforce with a GET/HEAD /public/[a-z]+ exemption, forwards identity
    (("mtls-guard", _REPORT_POLICY),),  # 3: report mode (lets everything through)
    (("mtls-guard", _XFCC_POLICY),),  # 4: header mode, XFCC from 10/8 or fd00::/8
    (("mtls-guard", _RFC9440_POLICY),),  # 5: header mode, RFC 9440 from 127.0.0.1
    (("fz-script", "read;var:a;vars:b,c;body;set:x-a=1;arg:k=v;resp:x-r=1;path:/moved"),),  # 6
    (("fz-script", "raise:boom"),),  # 7: always SERVICE_UNAVAILABLE
    (),  # 8: empty chain, passes untouched
    (("mtls-guard", _ENFORCE_POLICY), ("fz-script", "read;set:x-after=1")),  # 9
    (("fz-script", "yield;read:x-a;stop:403"),),  # 10
    (("fz-script", "body;read;set:content-type=text/plain;status:201;setbody:hi"),),  # 11: for HTTPRespCall
    (("fz-script", "stop:700"),),  # 12: a Stop APISIX cannot take -> SERVICE_UNAVAILABLE
)
"""Routes prepared before every session run; their tokens are 1..len(PRESEEDED) in this order."""
_SESSION_MAX_PAYLOAD: Final = 1 << 14
_FAR_FUTURE: Final = 1e12
_MAX_SCHEDULED: Final = 1000


def _registry() -> PluginRegistry:
    guard = MtlsGuard()
    # Every run builds fresh stores; compiling the same policies again each time would be most of the
    # cost of an input. CompiledPolicy is immutable, so sharing it across runs changes nothing.
    guard.parse_conf = functools.lru_cache(maxsize=256)(guard.parse_conf)  # type: ignore[method-assign]
    return PluginRegistry([guard, ScriptPlugin()])


_REGISTRY: Final = _registry()


@dataclass
class _Run:
    """One Session with its store, everything it wrote (per write) and how often it closed."""

    store: ConfStore
    deadlines: bool = False
    session: Session = field(init=False)
    writes: list[bytes] = field(default_factory=list)
    closes: int = 0
    scheduled: list[Callable[[], None]] = field(default_factory=list)

    def __post_init__(self) -> None:
        config = SessionConfig(store=self.store, call_timeout=5.0, max_payload=_SESSION_MAX_PAYLOAD)
        self.session = Session(config, self._write, self._close, self.scheduled.append)

    def _write(self, data: bytes) -> None:
        _require(self.closes == 0, "the session wrote after closing the connection")
        _require(isinstance(data, bytes | bytearray | memoryview) and len(data) > 0, "empty or non-bytes write")
        self.writes.append(bytes(data))

    def _close(self) -> None:
        self.closes += 1

    def feed(self, chunk: bytes, *, loop_turn: bool = True) -> None:
        self.session.data_received(chunk)
        if loop_turn:
            self.run_scheduled()
            if self.deadlines:
                self.session.enforce_deadline(_FAR_FUTURE)
                self.run_scheduled()

    def run_scheduled(self) -> None:
        """A stand-in for one event-loop turn: run callbacks (e.g. a filter's bare yield) until quiet."""
        for _ in range(_MAX_SCHEDULED):
            if not self.scheduled:
                return
            self.scheduled.pop(0)()
        raise OracleViolation("scheduled callbacks never stop (a filter loops through the event loop)")

    def finish(self) -> None:
        """Whatever is still running is cut off, as the server's deadline sweeper would do."""
        self.session.enforce_deadline(_FAR_FUTURE)
        self.run_scheduled()


def _new_store() -> ConfStore:
    store = ConfStore(_REGISTRY, ttl=1e9, max_entries=1 << 20, clock=lambda: 1000.0)
    for index, entries in enumerate(PRESEEDED, start=1):
        token = store.prepare(PrepareConfRequest(tuple(ConfEntry(n, v) for n, v in entries)))
        if token != index:
            raise RuntimeError(f"pre-seeded route {index} got token {token}")
    return store


def _output_frames(writes: Sequence[bytes]) -> list[Frame]:
    """Split what the session wrote; each write must hold whole, well-formed runner->APISIX frames."""
    frames: list[Frame] = []
    for data in writes:
        decoder = codec.FrameDecoder()
        try:
            decoder.feed(data)
            while (frame := decoder.next_frame()) is not None:
                _check_outgoing(frame)
                frames.append(frame)
        except codec.DecodeError as exc:
            raise OracleViolation(f"the session wrote a malformed frame: {exc}") from None
        _require(decoder.buffered == 0, "the session wrote a partial frame")
    return frames


def _check_outgoing(frame: Frame) -> None:
    decoders: dict[int, Callable[[bytes], Any]] = {
        RPCType.ERR: codec.decode_error,
        RPCType.PREPARE_CONF: codec.decode_prepare_conf_reply,
        RPCType.HTTP_REQ_CALL: codec.decode_http_req_call_reply,
        RPCType.EXTRA_INFO: codec.decode_extra_info_query,
        RPCType.HTTP_RESP_CALL: codec.decode_http_resp_call_reply,
    }
    decode = decoders.get(frame.type)
    _require(decode is not None, f"the session wrote a frame of type {frame.type}")
    assert decode is not None
    try:
        value = decode(frame.payload)
    except codec.DecodeError as exc:
        raise OracleViolation(f"type-{frame.type} frame from the session does not decode: {exc}") from None
    if frame.type == RPCType.PREPARE_CONF:
        _require(value != 0, "the session issued conf token 0")
    if isinstance(value, HTTPReqCallReply) and isinstance(value.action, Stop):
        _require(value.action.status == 0 or 100 <= value.action.status <= 599, "Stop status APISIX cannot send")


# --- session target: the conversation model ------------------------------------------------------------


@dataclass
class _Exchange:
    """One request frame, the ExtraInfo traffic of its call, and its final answer (if any)."""

    request: Frame
    queries: list[ExtraInfoQuery] = field(default_factory=list)
    answers: list[bytes] = field(default_factory=list)
    final: Frame | None = None

    def var_answer(self, name: str) -> bytes | None:
        for query, raw in zip(self.queries, self.answers, strict=False):
            if query == VarQuery(name):
                result = _attempt(codec.decode_extra_info_result, raw)
                return None if result is _FAILED else result
        return None


def _walk(steps: Sequence[tuple[Frame | None, list[Frame]]]) -> list[_Exchange]:
    """Attribute every frame the session wrote to the request it belongs to."""
    exchanges: list[_Exchange] = []
    current: _Exchange | None = None
    for frame, outs in steps:
        if frame is not None:
            if frame.type == RPCType.EXTRA_INFO:
                if current is not None and current.final is None:
                    current.answers.append(frame.payload)
            else:
                current = _Exchange(frame)
                exchanges.append(current)
        for out in outs:
            _require(current is not None and current.final is None, f"type-{out.type} frame written with no call open")
            assert current is not None
            if out.type == RPCType.EXTRA_INFO:
                current.queries.append(codec.decode_extra_info_query(out.payload))
            else:
                current.final = out
    return exchanges


def _err(frame: Frame) -> ErrCode | None:
    return codec.decode_error(frame.payload) if frame.type == RPCType.ERR else None


def _check_exchange(ex: _Exchange, known: set[int], store: ConfStore) -> None:
    request, final = ex.request, ex.final
    assert final is not None
    kind = request.type
    if kind not in (RPCType.PREPARE_CONF, RPCType.HTTP_REQ_CALL, RPCType.HTTP_RESP_CALL):
        _require(_err(final) == ErrCode.BAD_REQUEST, f"unknown RPC type {kind} not answered with BAD_REQUEST")
        return
    if kind == RPCType.PREPARE_CONF:
        if final.type == RPCType.PREPARE_CONF:
            _require(_attempt(codec.decode_prepare_conf, request.payload) is not _FAILED, "malformed conf got a token")
            known.add(codec.decode_prepare_conf_reply(final.payload))
        else:
            _require(_err(final) == ErrCode.BAD_REQUEST, f"PrepareConf answered with type {final.type}/{_err(final)}")
        return
    decode = codec.decode_http_req_call if kind == RPCType.HTTP_REQ_CALL else codec.decode_http_resp_call
    view = _attempt(decode, request.payload)
    if view is _FAILED:
        _require(_err(final) == ErrCode.BAD_REQUEST, "undecodable call not answered with BAD_REQUEST")
        return
    if view.conf_token not in known:
        _require(
            _err(final) == ErrCode.CONF_TOKEN_NOT_FOUND, f"unknown token {view.conf_token}: not CONF_TOKEN_NOT_FOUND"
        )
        return
    code = _err(final)
    _require(code != ErrCode.CONF_TOKEN_NOT_FOUND, f"known token {view.conf_token} answered CONF_TOKEN_NOT_FOUND")
    chain = store.lookup(view.conf_token)
    if code is None:
        _require(final.type == kind, f"type-{kind} call answered with type {final.type}")
        reply = (
            codec.decode_http_req_call_reply if kind == RPCType.HTTP_REQ_CALL else codec.decode_http_resp_call_reply
        )(final.payload)
        _require(reply.id == view.id, f"reply id {reply.id} != call id {view.id}")
        if not chain:
            empty = HTTPReqCallReply(view.id) if kind == RPCType.HTTP_REQ_CALL else HTTPRespCallReply(view.id)
            _require(reply == empty, "a route without plugins changed the request")
    if chain and chain[0].name == "fz-script" and chain[0].conf[:1] and chain[0].conf[0][0] == "raise":
        _require(code == ErrCode.SERVICE_UNAVAILABLE, "a failing plugin was not answered with SERVICE_UNAVAILABLE")
    if kind == RPCType.HTTP_REQ_CALL and code is None and chain and chain[0].name == "mtls-guard":
        action = codec.decode_http_req_call_reply(final.payload).action
        if not isinstance(action, Stop):
            _check_mtls_pass(ex, view, chain)


def _exempt_by_fixture_rule(method: str, path: str | None, encoded: bool) -> bool:
    """Independent reading of token 2's rule: GET/HEAD and a path that is plainly /public/[a-z]+.

    ``encoded``: the path is an earlier plugin's $upstream_uri (decoded once before matching); else
    it is $uri, which is matched literally, so a "%" in it never matches.
    """
    if method.upper() not in ("GET", "HEAD") or path is None:
        return False
    if re.fullmatch(r"[/a-zA-Z0-9%]*", path) is None:
        return False
    return re.fullmatch(r"/public/[a-z]+", unquote(path, errors="strict") if encoded else path) is not None


def _check_mtls_pass(ex: _Exchange, view: codec.HTTPReqCall, chain: Chain) -> None:
    """A request mtls-guard (first in the chain, enforce mode) let through must have earned it."""
    policy = chain[0].conf
    assert isinstance(policy, CompiledPolicy)
    config = policy.config
    if config.mode is not Mode.ENFORCE:
        return
    encoded = bool(ex.var_answer("upstream_uri"))
    if view.conf_token == 2 and _exempt_by_fixture_rule(METHOD_NAMES[view.method], view.path, encoded):
        return
    if config.exempt and view.conf_token != 2:
        return  # a fuzzer-made policy with exemptions: no independent oracle for its rules
    source = config.source
    if isinstance(source, ApisixSource):
        # ssl_client_verify is "not found" over plain HTTP (decision.is_tls), so SUCCESS also means TLS.
        verify = ex.var_answer("ssl_client_verify")
        _require(verify == b"SUCCESS", f"mtls-guard let a request through with ssl_client_verify={verify!r}")
        if view.conf_token in (1, 2, 9):
            escaped = ex.var_answer("ssl_client_escaped_cert") or b""
            try:
                cert = load_pem(unescape_nginx(escaped.decode("utf-8", "surrogateescape")))
            except CertificateError:
                raise OracleViolation("mtls-guard let a request through without a readable certificate") from None
            _require(cert.fingerprint_sha256 == LEAF_FINGERPRINT, "mtls-guard accepted a certificate it must not")
    elif isinstance(source, HeaderSource):
        peer = (ex.var_answer("realip_remote_addr") or b"").decode("utf-8", "surrogateescape")
        _require(_peer_in(peer, source.trusted_proxies), f"header mode trusted the peer {peer!r}")
        headers = [v for n, v in view.headers if n == source.header]
        _require(len(headers) == 1, "header mode accepted a request without exactly one certificate header")


def _peer_in(peer: str, networks: Sequence[ipaddress.IPv4Network | ipaddress.IPv6Network]) -> bool:
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return any(address.version == net.version and address in net for net in networks)


def _loop_turns(chunks: Sequence[bytes], frames: Sequence[Frame], bad_header: bool) -> set[int]:
    """After how many complete frames the event loop gets a turn when ``chunks`` arrive one by one.

    A filter that yields to the loop finishes only on such a turn, so whether the next frame finds
    it finished depends on where the chunks ended (timing, in real life). Between turns the chunking
    must not matter at all, which is what the comparison below checks. A turn after the last frame
    happens only if the chunk ended before the 4 bytes of an invalid header that follows it: the
    session closes as soon as it sees them, within the same ``data_received`` call.
    """
    ends = [4 + len(f.payload) for f in frames]
    turns, position, done = set(), 0, 0
    for chunk in chunks:
        position += len(chunk)
        while done < len(ends) and ends[done] <= position:
            position -= ends[done]
            done += 1
        if not (bad_header and done == len(ends) and position >= 4):
            turns.add(done)
    return turns


def check_session(data: bytes) -> None:
    """Feed the input to a real Session twice (frame by frame, then as the fuzzer chunked it) and judge it."""
    stream, chunks = split_input(data)
    incoming, bad_header = _reference_frames(stream, _SESSION_MAX_PAYLOAD)
    turns = _loop_turns(chunks, incoming, bad_header)
    deadlines = bool(data[:1]) and bool(data[0] & _DEADLINES)

    # Run 1: one frame per data_received call, so every written frame can be attributed.
    by_frame = _Run(_new_store(), deadlines)
    steps: list[tuple[Frame | None, list[Frame]]] = []
    consumed = 0
    for index, frame in enumerate(incoming, start=1):
        before = len(by_frame.writes)
        by_frame.feed(stream[consumed : consumed + 4 + len(frame.payload)], loop_turn=index in turns)
        consumed += 4 + len(frame.payload)
        steps.append((frame, _output_frames(by_frame.writes[before:])))
    before = len(by_frame.writes)
    by_frame.feed(stream[consumed:])
    by_frame.finish()
    steps.append((None, _output_frames(by_frame.writes[before:])))

    _require(by_frame.closes <= 1, f"the connection was closed {by_frame.closes} times")
    if bad_header:
        _require(by_frame.closes == 1, "a frame header with an invalid size did not close the connection")
    known = set(range(1, len(PRESEEDED) + 1))
    for ex in _walk(steps):
        if ex.final is not None:
            _check_exchange(ex, known, by_frame.store)
        else:
            _require(by_frame.closes == 1, f"a type-{ex.request.type} request was never answered")

    # Run 2: the fuzzer's chunking must not change a single byte of the output.
    chunked = _Run(_new_store(), deadlines)
    for chunk in chunks:
        chunked.feed(chunk)
    chunked.finish()
    _require(b"".join(chunked.writes) == b"".join(by_frame.writes), "output depends on how the input was chunked")
    _require(chunked.closes == by_frame.closes, "closing depends on how the input was chunked")
    _check_log_sink()


# --- policy target -------------------------------------------------------------------------------------


class ByteReader:
    """Turns fuzzer bytes into structured values deterministically (a tiny FuzzedDataProvider)."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def byte(self) -> int:
        if self.pos >= len(self.data):
            return 0
        self.pos += 1
        return self.data[self.pos - 1]

    def text(self, limit: int = 255) -> str:
        size = min(self.byte(), limit)
        raw = self.data[self.pos : self.pos + size]
        self.pos += size
        return raw.decode("utf-8", "surrogateescape")

    def pick(self, options: Sequence[Any]) -> Any:
        return options[self.byte() % len(options)]

    def rest(self) -> str:
        raw, self.pos = self.data[self.pos :], len(self.data)
        return raw.decode("utf-8", "surrogateescape")


_BAD_CATEGORIES: Final = frozenset({"Cc", "Cf", "Zl", "Zp", "Cs", "Co", "Cn"})
_FORBIDDEN: Final = re.compile(r"[\x00-\x1f\x7f-\x9f;\\]")
_NOW: Final = datetime(2030, 6, 1, tzinfo=UTC)
_CACHE: Final = CertificateCache(64)
_XFCC_LEAF: Final = build_xfcc(load_pem(LEAF_PEM))
_RFC9440_LEAF: Final = ":" + base64.b64encode(load_pem(LEAF_PEM).certificate.public_bytes(Encoding.DER)).decode() + ":"
_FORMATS: Final = tuple(ForwardedFormat)


def _check_judged_path(raw: str | None) -> None:
    for encoded in (False, True):
        value, reason = classify_path(raw, encoded=encoded)
        _require(exempt_path(raw, encoded=encoded) == (None if reason else value), "exempt_path disagrees")
        if reason:
            continue
        _require(value.startswith("/"), f"unambiguous path {value!r} is not absolute")
        _require("//" not in value and "%" not in value, f"unambiguous path {value!r} keeps // or %")
        _require(_FORBIDDEN.search(value) is None, f"unambiguous path {value!r} has a forbidden character")
        segments = value.split("/")
        _require("." not in segments and ".." not in segments, f"unambiguous path {value!r} has a dot segment")
        _require(
            all(unicodedata.category(c) not in _BAD_CATEGORIES for c in value if c > "\x7f"),
            f"unambiguous path {value!r} has an invisible or unassigned character",
        )
        if not encoded:
            # $uri is matched literally: never decoded a second time.
            _require(value == raw, f"a decoded path was changed: {raw!r} -> {value!r}")
        elif "?" not in value and "#" not in value:
            again = classify_path(value, encoded=True)
            _require(again == (value, ""), f"classify_path is not idempotent on {value!r}")


def _fuzzed_vars(reader: ByteReader, names: Sequence[str]) -> dict[str, str | None]:
    choices: dict[str, tuple[str | None, ...]] = {
        "ssl_client_verify": ("SUCCESS", "NONE", "FAILED:certificate has expired", None, "success"),
        "ssl_client_escaped_cert": (_ESCAPED_LEAF, quote(CA_PEM, safe=""), None, "", LEAF_PEM),
        "ssl_server_name": ("a.fuzz.example", "A.FUZZ.EXAMPLE.", None, "b.fuzz.example"),
        "upstream_uri": ("", None, "/public/%61bc", "/x%2Fy"),
        "realip_remote_addr": ("10.1.2.3", "::ffff:10.0.0.1", "fd00::1", "127.0.0.1", "11.0.0.1", "::ffff:b00:1", None),
    }
    out: dict[str, str | None] = {}
    for name in names:
        options = choices.get(name, (None,))
        pick = reader.byte()
        out[name] = reader.text() if pick % (len(options) + 1) == len(options) else options[pick % (len(options) + 1)]
    return out


_POLICIES: Final = {
    "enforce": compile_policy(_ENFORCE_POLICY),
    "exempt": compile_policy(_EXEMPT_POLICY),
    "report": compile_policy(_REPORT_POLICY),
    "xfcc": compile_policy(_XFCC_POLICY),
    "rfc9440": compile_policy(_RFC9440_POLICY),
    # Every identity check at once; the fixture leaf fails the SAN one, so nothing is ever verified.
    "strict": compile_policy(
        {
            "require_sni_match": False,
            "require": {
                "ca": CA_PEM,
                "san": {"dns": ["other.fuzz.example"], "uri": ["spiffe://fuzz/*"]},
                "subject": {"CN": ["fuzz-client"]},
                "issuer": {"CN": ["Fuzz Root CA"]},
            },
        }
    ),
}
# The fixture leaf is valid from 2025 to 2125: these instants are inside, after and before that.
_INSTANTS: Final = (_NOW, datetime(2200, 1, 1, tzinfo=UTC), datetime(2020, 1, 1, tzinfo=UTC))


def _check_decide(reader: ByteReader) -> None:
    name = reader.pick(sorted(_POLICIES))
    policy = _POLICIES[name]
    now = reader.pick(_INSTANTS)
    method = reader.pick((*METHOD_NAMES, "get", "CONNECT"))
    path = reader.pick(("/public/abc", "/public/%61bc", "/admin", None, "", "/public/abc/", reader.text()))
    headers: list[tuple[str, str | None]] = []
    for _ in range(reader.byte() % 4):
        header = reader.pick(("x-forwarded-client-cert", "client-cert", "client-cert-chain", "x-client-fp", "host"))
        value = reader.pick((_XFCC_LEAF, _RFC9440_LEAF, quote(LEAF_PEM, safe=""), None, ""))
        headers.append((header, reader.text() if reader.byte() & 1 else value))
    host = authority_host(reader.pick(("a.fuzz.example", "a.fuzz.example:443", None, "[::1]", reader.text())))
    facts = RequestInput(method=method, path=path, headers=tuple(headers), host=host)
    outcome = policy.decide(facts, None, now=now, cache=_CACHE)
    values: dict[str, str | None] = {}
    if isinstance(outcome, NeedVars):
        _require(set(outcome.names) <= set(VAR_ORDER), f"NeedVars asks for unknown variables {outcome.names}")
        values = _fuzzed_vars(reader, outcome.names)
        outcome = policy.decide(facts, values, now=now, cache=_CACHE)
        _require(isinstance(outcome, Decision), "the policy asked for variables twice")
    assert isinstance(outcome, Decision)
    spellings = tuple(
        dict.fromkeys(
            n
            for n, _ in facts.headers
            if codec.fold_header_name(n.encode("utf-8", "surrogateescape")) in policy.strip_folded
        )
    )
    policy.upstream_headers(outcome, spellings)
    if not outcome.allowed:
        policy.reject_response(outcome)
        return
    config = policy.config
    if config.mode is Mode.REPORT or outcome.reason is Reason.EXEMPT:
        if outcome.reason is Reason.EXEMPT:
            _require(name == "exempt", f"policy {name!r} has no exemption but exempted a request")
            encoded = bool(values.get("upstream_uri"))
            _require(_exempt_by_fixture_rule(method, path, encoded), f"exempted {method} {path!r}")
        return
    _require(outcome.reason is Reason.VERIFIED, f"allowed in enforce mode with reason {outcome.reason}")
    _require(now == _NOW, f"a certificate outside its validity was accepted at {now:%Y}")
    _require(name != "strict", "the strict policy verified a certificate whose SAN it does not accept")
    if isinstance(config.source, ApisixSource):
        # ssl_client_verify is "not found" over plain HTTP (decision.is_tls), so SUCCESS also means TLS.
        _require(values.get("ssl_client_verify") == "SUCCESS", "verified without ssl_client_verify=SUCCESS")
    else:
        assert isinstance(config.source, HeaderSource)
        _require(_peer_in(values.get("realip_remote_addr") or "", config.source.trusted_proxies), "untrusted peer")


_PRINTABLE_ASCII: Final = re.compile(r"[\x20-\x7e]*")


def _check_rendering(cert: ClientCertificate) -> None:
    """What mtls-guard puts into upstream headers about a certificate is printable ASCII (no injection)."""
    for what, text in (
        ("subject", cert.subject.rfc4514(ascii_only=True)),
        ("issuer", cert.issuer.rfc4514(ascii_only=True)),
        ("san", san_header_value(cert)),
        ("xfcc", build_xfcc(cert)),
    ):
        _require(_PRINTABLE_ASCII.fullmatch(text), f"{what} header value is not printable ASCII: {text[:80]!r}")
    _require(re.fullmatch(r"[0-9a-f]{64}", cert.fingerprint_sha256), "fingerprint is not 64 lower-case hex digits")
    _require(cert.validity_at(_NOW) in ("valid", "expired", "not-yet-valid"), "validity_at returned nonsense")
    _require(isinstance(cert.client_auth_allowed, bool), "client_auth_allowed is not a bool")


def check_policy(data: bytes) -> None:
    """Paths, policies, forwarded certificates and decisions: only documented exceptions may escape."""
    reader = ByteReader(data)
    mode = reader.byte() % 6
    if mode == 0:
        _check_judged_path(reader.rest())
    elif mode == 1:
        text = reader.rest()
        try:
            policy = compile_policy(text)
        except PolicyError:
            return
        policy.describe()
    elif mode == 2:
        fmt = reader.pick(_FORMATS)
        parts = reader.rest().split("\x01", 1)
        values = parts[0].split("\x00") if parts[0] else []
        chain = parts[1].split("\x00") if len(parts) > 1 and parts[1] else []
        try:
            forwarded = parse_forwarded(fmt, values, chain, _CACHE if len(values) % 2 else None)
        except CertificateError:
            return
        if forwarded is not None:
            _check_rendering(forwarded.leaf)
    elif mode == 3:
        text = reader.rest()
        for pem in (text, None):
            try:
                cert = load_pem(unescape_nginx(text) if pem is None else pem)
            except CertificateError:
                continue
            _check_rendering(cert)
    elif mode == 4:
        _check_decide(reader)
    else:
        try:
            cert = load_der(data[1:])
        except CertificateError:
            return
        _check_rendering(cert)


TARGETS: Final[Mapping[str, Callable[[bytes], None]]] = {
    "codec": check_codec,
    "session": check_session,
    "policy": check_policy,
}
"""Target name -> harness function; also the names of the corpus and crash directories."""
