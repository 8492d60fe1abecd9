"""Property tests over whole conversations with a sans-IO Session: APISIX's side is generated.

A conversation is a list of steps (PrepareConf, HTTPReqCall/HTTPRespCall with an ExtraInfo answering
style, garbage frames, a framing error). ``play`` runs it against a real Session, answering ExtraInfo
queries as they appear, and records every exchange plus the exact input byte stream, which is then
replayed in other chunkings. Everything is in memory: no sockets, no event loop.
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import quote

from cryptography.hazmat.primitives import hashes
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugins.mtls_guard import MtlsGuard
from runner import PluginRegistry
from runner.confcache import ConfStore
from runner.protocol import codec
from runner.protocol.messages import (
    ConfEntry,
    ErrCode,
    Frame,
    HTTPReqCallReply,
    ReqBodyQuery,
    RespBodyQuery,
    Rewrite,
    RPCType,
    Stop,
    VarQuery,
)
from runner.session import Session, SessionConfig
from tests.certs import CertFactory
from tests.plugins_for_tests import make_registry

FACTORY = CertFactory()
CA = FACTORY.ca()
LEAF = FACTORY.leaf(CA, cn="client", dns=["client.example"])
ROGUE = FACTORY.self_signed_leaf()
GOOD_CERT = quote(LEAF.pem, safe="")
FINGERPRINT = LEAF.cert.fingerprint(hashes.SHA256()).hex()
ENFORCE = json.dumps({"require": {"fingerprint_sha256": [FINGERPRINT]}})
EXEMPT = json.dumps(
    {
        "exempt": [{"path": "/public/[a-z]+", "methods": ["GET"]}],
        "require_sni_match": False,
        "require": {"fingerprint_sha256": [FINGERPRINT]},
    }
)
MAX_PAYLOAD = 4096

VALID_ENTRIES = [  # mtls-guard first: Hypothesis favours early elements
    ("mtls-guard", ENFORCE),
    ("mtls-guard", EXEMPT),
    ("raise", "boom"),
    ("stop", '{"status": 403, "body": "no"}'),
    ("set-header", "x-a: 1"),
    ("order", "1"),
    ("vars", "a,b"),
    ("body-digest", ""),
    ("echo", ""),
    ("resp-header", "x-r: 1"),
    ("bad-stop", "700"),
    ("mtls-guard", '{"mode": "report"}'),
]
INVALID_ENTRIES = [
    ("strict-json", "[]"),
    ("mtls-guard", "{"),
    ("mtls-guard", '{"mode": "block"}'),
    ("stop", "not json"),
    ("set-header", "no colon"),
    ("no-such-plugin", ""),
]
FAILING = {"raise", "bad-stop"}
# Paths for the EXEMPT policy: exempt exactly when GET and the decoded path is /public/[a-z]+.
# path -> exempt under EXEMPT, given the upstream_uri variable: $uri is matched literally, an earlier
# plugin's encoded $upstream_uri after decoding it once (plugins/mtls_guard/paths.py).
EXEMPT_PATHS: Mapping[str, Callable[[str | None], bool]] = {
    "/public/abc": lambda upstream_uri: True,
    "/public/%61bc": bool,
}
OTHER_PATHS = ["/admin", "/public/ABC", "/public/abc/", "/public//abc", "/public/abc/../admin", "/public/a;b", "/"]


def registry() -> PluginRegistry:
    plugins = make_registry()
    plugins.register(MtlsGuard())
    return plugins


# --- steps -----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Prepare:
    entries: tuple[tuple[str, str], ...]


Answering = Literal["right", "extra", "wrong-type", "malformed"]


@dataclass(frozen=True)
class Call:
    route: int | None  # index into the routes prepared so far (modulo), None: a token never issued
    id: int
    method: int
    path: str
    vars: Mapping[str, str | None]
    answering: Answering = "right"
    bad_payload: bool = False
    response: bool = False  # HTTPRespCall (ext-plugin-post-resp) instead of HTTPReqCall


@dataclass(frozen=True)
class Garbage:
    type: int
    payload: bytes


@dataclass(frozen=True)
class FramingError:
    size: int  # 0 or more than the session's max payload
    tail: bytes


Step = Prepare | Call | Garbage | FramingError

CALL_HOST = "a.example"  # the Host header of every call
GOOD_VARS: Mapping[str, str | None] = {
    "ssl_client_verify": "SUCCESS",
    "ssl_client_escaped_cert": GOOD_CERT,
    "scheme": "https",
    "ssl_server_name": "a.example",
    "host": "a.example",
    "a": "1",
    "b": "x",
}
# Wrong values per variable. A conversation's variables are the good set with zero to three of them
# replaced, so near misses (everything right but one thing) are common: that is where fail-open bugs hide.
WRONG_VALUES: Mapping[str, list[str | None]] = {
    "ssl_client_verify": ["NONE", "FAILED:certificate revoked", "success", "", None],
    "ssl_client_escaped_cert": [quote(ROGUE.pem, safe=""), quote(CA.pem, safe=""), "%zz", "", None],
    "scheme": ["http", "HTTPS", None],
    "ssl_server_name": ["b.example", "", None],
    "host": ["b.example", None],
    # Not wrong as such: an earlier plugin's $upstream_uri makes "/public/%61bc" an encoded path.
    "upstream_uri": ["/public/%61bc"],
    "a": ["", None],
}
var_values = (
    st.lists(st.sampled_from(sorted(WRONG_VALUES)), max_size=3, unique=True)
    .flatmap(lambda names: st.fixed_dictionaries({n: st.sampled_from(WRONG_VALUES[n]) for n in names}))
    .map(lambda wrong: {**GOOD_VARS, **wrong})
)


def weighted(*choices: tuple[st.SearchStrategy[Any], int]) -> st.SearchStrategy[Any]:
    """Like st.one_of, with integer weights (one_of would merge repeated identical strategies)."""
    return st.sampled_from([s for s, weight in choices for _ in range(weight)]).flatmap(lambda s: s)


valid_chains = st.lists(st.sampled_from(VALID_ENTRIES), min_size=1, max_size=3).map(tuple)
prepares = st.builds(
    Prepare,
    weighted(
        (valid_chains, 6),
        (st.just(()), 1),
        (st.lists(st.sampled_from(VALID_ENTRIES + INVALID_ENTRIES), min_size=1, max_size=3).map(tuple), 2),
    ),
)
calls = st.builds(
    Call,
    route=st.sampled_from([0, 0, 1, 1, 2, 3, 4, None]),
    id=st.integers(0, 2**32 - 1),
    method=st.sampled_from([0, 0, 2, 4]),
    path=st.sampled_from([*EXEMPT_PATHS, *OTHER_PATHS]),
    vars=var_values,
    answering=st.sampled_from(["right"] * 8 + ["extra", "wrong-type", "malformed"]),
    bad_payload=st.sampled_from([False, False, False, False, True]),
    response=st.sampled_from([False, False, False, True]),
)
garbage = st.builds(Garbage, st.integers(0, 255), st.binary(min_size=1, max_size=64))
framing_errors = st.builds(FramingError, st.sampled_from([0, MAX_PAYLOAD + 1, 0xFFFFFF]), st.binary(max_size=16))


@st.composite
def conversations(draw: st.DrawFn) -> list[Step]:
    """One or two PrepareConfs first (so calls find routes), then anything, maybe a framing error last."""
    head: list[Step] = draw(st.lists(prepares, min_size=1, max_size=2))
    body: list[Step] = draw(st.lists(weighted((prepares, 2), (calls, 5), (garbage, 1)), max_size=8))
    tail: list[Step] = []
    ending = draw(st.sampled_from(["none", "none", "none", "framing", "framing-then-more"]))
    if ending != "none":
        tail.append(draw(framing_errors))
    if ending == "framing-then-more":
        tail.append(draw(st.one_of(prepares, calls)))
    return head + body + tail


@st.composite
def mtls_conversations(draw: st.DrawFn) -> list[Step]:
    """Routes 0 and 1 enforce mtls-guard (with and without an exemption); most calls go to them."""
    head: list[Step] = [Prepare((("mtls-guard", ENFORCE),)), Prepare((("mtls-guard", EXEMPT),))]
    mtls_calls = calls.map(lambda c: replace(c, route=c.id % 2, response=False, bad_payload=False))
    return head + draw(st.lists(weighted((mtls_calls, 6), (calls, 1), (prepares, 1)), min_size=1, max_size=6))


# --- playing APISIX ------------------------------------------------------------------------------


@dataclass
class Exchange:
    step: Step
    token: int | None = None
    chain: tuple[tuple[str, str], ...] = ()
    queries: list[object] = field(default_factory=list)
    final: Frame | None = None
    closed_after: bool = False


@dataclass
class Transcript:
    exchanges: list[Exchange]
    stream: bytes
    output: bytes
    writes: list[bytes]
    closes: int
    writes_after_close: int


class Wire:
    """A Session with list-collecting write and a close counter; no scheduling happens."""

    def __init__(self) -> None:
        store = ConfStore(registry(), ttl=1e6, max_entries=1000, clock=lambda: 1000.0)
        self.writes: list[bytes] = []
        self.closes = 0
        self.writes_after_close = 0
        config = SessionConfig(store=store, max_payload=MAX_PAYLOAD)
        self.session = Session(config, self._write, self._close, self._schedule)

    def _write(self, data: bytes) -> None:
        self.writes_after_close += self.closes > 0
        self.writes.append(bytes(data))

    def _close(self) -> None:
        self.closes += 1

    def _schedule(self, callback: Callable[[], None]) -> None:
        raise AssertionError("no plugin in these conversations yields to the event loop")

    def feed(self, data: bytes) -> None:
        self.session.data_received(data)


def split(data: bytes) -> list[Frame]:
    """Whole frames from bytes the session wrote (a partial frame fails the test)."""
    decoder = codec.FrameDecoder()
    decoder.feed(data)
    frames = []
    while (frame := decoder.next_frame()) is not None:
        frames.append(frame)
    assert decoder.buffered == 0, "the session wrote a partial frame"
    return frames


def answer(query: object, values: Mapping[str, str | None]) -> bytes:
    if isinstance(query, VarQuery):
        value = values.get(query.name)
        return codec.extra_info_result_frame(None if value is None else value.encode())
    assert isinstance(query, ReqBodyQuery | RespBodyQuery)
    return codec.extra_info_result_frame(b"body")


def play(conversation: list[Step]) -> Transcript:
    """Run the conversation against a fresh Session, answering ExtraInfo the way each Call asks."""
    wire = Wire()
    stream = bytearray()
    routes: list[tuple[int, tuple[tuple[str, str], ...]]] = []
    exchanges: list[Exchange] = []

    def send(data: bytes) -> list[Frame]:
        before = len(wire.writes)
        stream.extend(data)
        wire.feed(data)
        return split(b"".join(wire.writes[before:]))

    for step in conversation:
        ex = Exchange(step)
        exchanges.append(ex)
        if isinstance(step, Prepare):
            frames = send(codec.prepare_conf_request_frame(tuple(ConfEntry(n, v) for n, v in step.entries)))
        elif isinstance(step, Garbage):
            frames = send(codec.encode_frame(step.type, step.payload))
        elif isinstance(step, FramingError):
            frames = send(step.size.to_bytes(4, "big") + step.tail)
        else:
            if step.route is not None and routes:
                ex.token, ex.chain = routes[step.route % len(routes)]
            else:
                ex.token = 0xFFFF0000 + (step.route or 0)  # never issued: tokens count up from 1
            frames = send(call_frame(step, ex.token))
            frames = converse(step, ex, frames, send)
        for frame in frames:
            if frame.type == RPCType.EXTRA_INFO:
                ex.queries.append(codec.decode_extra_info_query(frame.payload))
            else:
                assert ex.final is None, "two final replies to one request"
                ex.final = frame
        ex.closed_after = wire.closes > 0
        if isinstance(step, Prepare) and ex.final is not None and ex.final.type == RPCType.PREPARE_CONF:
            routes.append((codec.decode_prepare_conf_reply(ex.final.payload), step.entries))
    return Transcript(
        exchanges, bytes(stream), b"".join(wire.writes), wire.writes, wire.closes, wire.writes_after_close
    )


def call_frame(call: Call, token: int) -> bytes:
    kind = RPCType.HTTP_RESP_CALL if call.response else RPCType.HTTP_REQ_CALL
    if call.bad_payload:
        return codec.encode_frame(kind, b"\xff" * 12)
    if call.response:
        return codec.http_resp_call_frame(id=call.id, conf_token=token, headers=(("Content-Type", "text/plain"),))
    return codec.http_req_call_frame(
        id=call.id,
        conf_token=token,
        method=call.method,
        path=call.path,
        src_ip=ipaddress.ip_address("192.0.2.7").packed,
        headers=(("host", CALL_HOST), ("x-a", "v")),
    )


def converse(call: Call, ex: Exchange, frames: list[Frame], send: Callable[[bytes], list[Frame]]) -> list[Frame]:
    """Answer ExtraInfo queries until a final reply (or the session stops talking); return all frames."""
    seen = list(frames)
    mode = call.answering
    for _ in range(8):
        queries = [codec.decode_extra_info_query(f.payload) for f in frames if f.type == RPCType.EXTRA_INFO]
        if not queries or any(f.type != RPCType.EXTRA_INFO for f in frames):
            break
        if mode == "wrong-type":
            frames = send(codec.http_req_call_frame(id=1, conf_token=1))
        elif mode == "malformed":
            frames = send(codec.encode_frame(RPCType.EXTRA_INFO, b"\x01\x02\x03"))
        else:
            extra = codec.extra_info_result_frame(b"surplus") if mode == "extra" else b""
            frames = send(b"".join(answer(q, call.vars) for q in queries) + extra)
        seen += frames
    return seen


def replay(stream: bytes, chunks: list[int] | None) -> tuple[bytes, int]:
    """Feed the recorded stream again: byte by byte (chunks=[]), in one piece (None) or cut at ``chunks``."""
    wire = Wire()
    if chunks is None:
        wire.feed(stream)
    elif not chunks:
        for i in range(len(stream)):
            wire.feed(stream[i : i + 1])
    else:
        cuts = sorted({c % (len(stream) + 1) for c in chunks})
        for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
            wire.feed(stream[start:end])
    return b"".join(wire.writes), wire.closes


def err(frame: Frame | None) -> ErrCode | None:
    return None if frame is None or frame.type != RPCType.ERR else codec.decode_error(frame.payload)


def verified(values: Mapping[str, str | None], *, sni: bool) -> bool:
    """What the fixture policies accept: the fixture leaf, verified by nginx (which also means TLS:
    ssl_client_verify is "not found" on plain HTTP), and SNI == the call's Host header (a.example).

    ``scheme`` and ``host`` variables are deliberately ignored: the policy never asks for them.
    """
    good = values.get("ssl_client_verify") == "SUCCESS" and values.get("ssl_client_escaped_cert") == GOOD_CERT
    if not good or not sni:
        return good
    # The policy binds SNI to the Host header (case-insensitive, trailing dot ignored).
    sni_value = values.get("ssl_server_name")
    return bool(sni_value) and sni_value.lower().rstrip(".") == CALL_HOST  # type: ignore[union-attr]


SETTINGS = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- properties ----------------------------------------------------------------------------------


class TestRobustness:
    @SETTINGS
    @given(conversations())
    def test_session_never_raises_and_writes_valid_frames(self, conversation: list[Step]) -> None:
        """Whatever APISIX sends, data_received returns normally and every written frame decodes as a reply."""
        transcript = play(conversation)
        decoders: dict[int, Callable[[bytes], Any]] = {
            RPCType.ERR: codec.decode_error,
            RPCType.PREPARE_CONF: codec.decode_prepare_conf_reply,
            RPCType.HTTP_REQ_CALL: codec.decode_http_req_call_reply,
            RPCType.EXTRA_INFO: codec.decode_extra_info_query,
            RPCType.HTTP_RESP_CALL: codec.decode_http_resp_call_reply,
        }
        for write in transcript.writes:
            for frame in split(write):
                decoders[frame.type](frame.payload)
        assert transcript.closes <= 1


class TestErrorReplies:
    @SETTINGS
    @given(conversations())
    def test_failures_get_the_right_err_code(self, conversation: list[Step]) -> None:
        """Unknown token: CONF_TOKEN_NOT_FOUND; bad payload or conf: BAD_REQUEST; plugin error: SERVICE_UNAVAILABLE."""
        for ex in play(conversation).exchanges:
            step, final = ex.step, ex.final
            if final is None:
                continue
            if isinstance(step, Prepare):
                valid = all(e in VALID_ENTRIES for e in step.entries)
                assert (final.type == RPCType.PREPARE_CONF) == valid, step
                if not valid:
                    assert err(final) == ErrCode.BAD_REQUEST
                else:
                    assert codec.decode_prepare_conf_reply(final.payload) != 0
            elif isinstance(step, Garbage) and step.type not in (1, 2, 3, 4):
                assert err(final) == ErrCode.BAD_REQUEST
            elif isinstance(step, Call):
                if step.bad_payload:
                    assert err(final) == ErrCode.BAD_REQUEST
                elif not ex.chain and ex.token is not None and ex.token >= 0xFFFF0000:
                    assert err(final) == ErrCode.CONF_TOKEN_NOT_FOUND
                elif not step.response and ex.chain and ex.chain[0][0] in FAILING:
                    assert err(final) == ErrCode.SERVICE_UNAVAILABLE
                elif step.response and any(name == "mtls-guard" for name, _ in ex.chain):
                    # mtls-guard refuses ext-plugin-post-resp: the request already reached the upstream.
                    assert err(final) == ErrCode.SERVICE_UNAVAILABLE
                elif step.response or (ex.chain and ex.chain[0][0] == "stop"):
                    assert final.type == (RPCType.HTTP_RESP_CALL if step.response else RPCType.HTTP_REQ_CALL)

    @SETTINGS
    @given(conversations())
    def test_never_an_action_less_reply_for_a_failed_call(self, conversation: list[Step]) -> None:
        """A call whose chain fails is answered with a type-0 Err, and every success echoes the call's id."""
        for ex in play(conversation).exchanges:
            step, final = ex.step, ex.final
            if not isinstance(step, Call) or final is None or step.bad_payload:
                continue
            if final.type == RPCType.HTTP_REQ_CALL:
                assert not (ex.chain and ex.chain[0][0] in FAILING), ex
                assert codec.decode_http_req_call_reply(final.payload).id == step.id
            if final.type == RPCType.HTTP_RESP_CALL:
                assert codec.decode_http_resp_call_reply(final.payload).id == step.id
            if not ex.chain and ex.token is not None and ex.token < 0xFFFF0000 and final.type != RPCType.ERR:
                empty = HTTPReqCallReply(step.id)
                assert step.response or codec.decode_http_req_call_reply(final.payload) == empty


class TestMtlsGuardFailsClosed:
    @SETTINGS
    @given(mtls_conversations())
    def test_protected_request_without_verified_cert_never_passes(self, conversation: list[Step]) -> None:
        """A protected request through an enforcing mtls-guard passes only with SUCCESS + the right cert."""
        for ex in play(conversation).exchanges:
            step, final = ex.step, ex.final
            if not isinstance(step, Call) or step.response or final is None or not ex.chain:
                continue
            name, value = ex.chain[0]
            if name != "mtls-guard" or value not in (ENFORCE, EXEMPT) or final.type != RPCType.HTTP_REQ_CALL:
                continue
            action = codec.decode_http_req_call_reply(final.payload).action
            exempt_rule = EXEMPT_PATHS.get(step.path)
            upstream_uri = step.vars.get("upstream_uri") if step.answering in ("right", "extra") else None
            exempt = value == EXEMPT and step.method == 0 and exempt_rule is not None and exempt_rule(upstream_uri)
            good = verified(step.vars, sni=value == ENFORCE) and step.answering in ("right", "extra")
            if not (exempt or good):
                assert isinstance(action, Stop), (step, action)
                assert action.status in (403, 421)
            elif len(ex.chain) == 1:
                assert action is None or isinstance(action, Rewrite), (step, action)

    @SETTINGS
    @given(mtls_conversations())
    def test_verify_result_other_than_success_is_a_stop(self, conversation: list[Step]) -> None:
        """Any ssl_client_verify other than SUCCESS gets a Stop (or an Err), never a pass or rewrite."""
        for ex in play(conversation).exchanges:
            step, final = ex.step, ex.final
            if not isinstance(step, Call) or final is None or not ex.chain or ex.chain[0] != ("mtls-guard", ENFORCE):
                continue
            if step.response or step.vars.get("ssl_client_verify") == "SUCCESS":
                continue
            assert final.type == RPCType.ERR or isinstance(codec.decode_http_req_call_reply(final.payload).action, Stop)


class TestClosing:
    @SETTINGS
    @given(conversations())
    def test_framing_error_closes_and_silences(self, conversation: list[Step]) -> None:
        """After a framing error the session is closed and nothing more is written."""
        transcript = play(conversation)
        assert transcript.writes_after_close == 0
        for index, ex in enumerate(transcript.exchanges):
            if isinstance(ex.step, FramingError):
                assert ex.closed_after
                assert ex.final is None
                assert not ex.queries
                assert all(e.final is None and not e.queries for e in transcript.exchanges[index:])

    @SETTINGS
    @given(conversations())
    def test_broken_extra_info_closes(self, conversation: list[Step]) -> None:
        """A wrong-type or malformed frame where an ExtraInfo answer belongs closes the connection."""
        for ex in play(conversation).exchanges:
            if isinstance(ex.step, Call) and ex.step.answering in ("wrong-type", "malformed") and ex.queries:
                assert ex.closed_after
                assert ex.final is None
            single = len(ex.chain) == 1  # one plugin, one batch of queries: the surplus answer has no taker
            if isinstance(ex.step, Call) and ex.step.answering == "extra" and single and ex.queries and ex.final:
                assert ex.closed_after


class TestChunking:
    @SETTINGS
    @given(conversations(), st.lists(st.integers(0, 1 << 16), max_size=6))
    def test_output_does_not_depend_on_chunking(self, conversation: list[Step], cuts: list[int]) -> None:
        """The same input fed byte by byte, in one chunk or cut anywhere produces identical output."""
        transcript = play(conversation)
        expected = (transcript.output, transcript.closes)
        assert replay(transcript.stream, None) == expected
        assert replay(transcript.stream, []) == expected
        if cuts:
            assert replay(transcript.stream, cuts) == expected


def test_strategy_reaches_every_outcome() -> None:
    """Sanity check of the strategies: verified passes, mtls Stops, Err codes and closes all occur."""
    seen: set[str] = set()

    @settings(max_examples=200, deadline=None, database=None, derandomize=True)
    @given(conversations())
    def collect(conversation: list[Step]) -> None:
        for ex in play(conversation).exchanges:
            code = err(ex.final)
            if code is not None:
                seen.add(f"err-{code.name}")
            if isinstance(ex.step, Call) and ex.final is not None and ex.final.type == RPCType.HTTP_REQ_CALL:
                action = codec.decode_http_req_call_reply(ex.final.payload).action
                if ex.chain and ex.chain[0][0] == "mtls-guard":
                    seen.add(f"mtls-{type(action).__name__}")
            if ex.closed_after:
                seen.add("closed")

    collect()
    wanted = {
        "err-BAD_REQUEST",
        "err-SERVICE_UNAVAILABLE",
        "err-CONF_TOKEN_NOT_FOUND",
        "mtls-Stop",
        # Every request mtls-guard lets through carries the judged path (SECURITY.md), so a pass is a Rewrite.
        "mtls-Rewrite",
        "closed",
    }
    assert wanted <= seen, wanted - seen
