"""Build the seed corpora under ``fuzz/corpus/<target>/`` from real encoded messages.

Run from the repository root: ``python -m fuzz.make_corpus`` (``--check`` only verifies that the
committed seeds are up to date and pass the harness). Seeds are deterministic, so re-running it
changes nothing unless the messages or the harness input layout changed.

* codec: every message type both ways, built by our encoders and (when the test dependencies are
  installed) by the reference ``flatbuffers`` builders, whose layout differs; plus multi-frame
  streams cut at awkward places and framing errors.
* session: whole conversations, recorded by driving a real Session and answering its ExtraInfo
  queries the way APISIX would, for every pre-seeded route of the harness.
* policy: paths, policies, forwarded-certificate headers and decision inputs (see
  ``harness.check_policy`` for the layout).
"""

from __future__ import annotations

import argparse
import hashlib
import ipaddress
import json
import random
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from urllib.parse import quote

from cryptography.hazmat.primitives.serialization import Encoding

from plugins.mtls_guard.identity import load_pem
from runner.protocol import codec
from runner.protocol.messages import (
    ConfEntry,
    ErrCode,
    HTTPReqCallReply,
    HTTPRespCallReply,
    ReqBodyQuery,
    RespBodyQuery,
    Rewrite,
    RPCType,
    Stop,
    VarQuery,
)

from . import harness
from .fixtures import CA_PEM, LEAF_PEM, RICH_PEM

CORPUS = Path(__file__).resolve().parent / "corpus"
ESCAPED_LEAF = quote(LEAF_PEM, safe="")
GOOD_VARS: dict[str, str | None] = {
    "ssl_client_verify": "SUCCESS",
    "ssl_client_escaped_cert": ESCAPED_LEAF,
    "ssl_server_name": "a.fuzz.example",
    "upstream_uri": "",
    "realip_remote_addr": "10.1.2.3",
    "a": "1",
    "b": "",
    "c": None,
}
XFCC_LEAF = harness._XFCC_LEAF
RFC9440_LEAF = harness._RFC9440_LEAF


def _req(token: int, id: int = 7, **kwargs: object) -> bytes:
    fields: dict[str, object] = {
        "id": id,
        "conf_token": token,
        "path": "/api/v1",
        "src_ip": ipaddress.ip_address("192.0.2.1").packed,
        "headers": (("host", "a.fuzz.example"),),
    }
    fields.update(kwargs)
    return codec.http_req_call_frame(**fields)  # type: ignore[arg-type]


# --- codec --------------------------------------------------------------------------------------------


def _reference_payloads() -> Iterator[tuple[str, int, bytes]]:
    """The same messages built by the reference flatbuffers builders (skipped without them)."""
    try:
        from tests.unit import _reference as ref
    except ImportError:
        print("note: flatbuffers/a6pluginprotos missing, no reference-built seeds", file=sys.stderr)
        return
    headers = (("host", "a.fuzz.example"), ("x-req", "foo"), ("x-req", "bar"), ("x-flag", None))
    yield "ref-prepare", RPCType.PREPARE_CONF, ref.build_prepare_conf((ConfEntry("mtls-guard", "{}"),), "route#1")
    yield (
        "ref-req-call",
        RPCType.HTTP_REQ_CALL,
        ref.build_http_req_call(
            id=3,
            conf_token=1,
            src_ip=bytes(16),
            method=2,
            path="/p\udcff",
            args=(("a", "1"), ("z", None)),
            headers=headers,
        ),
    )
    yield (
        "ref-resp-call",
        RPCType.HTTP_RESP_CALL,
        ref.build_http_resp_call(id=4, conf_token=1, status=502, headers=(("Content-Type", "text/html"),)),
    )
    yield "ref-extra-result", RPCType.EXTRA_INFO, ref.build_extra_info_result(b"SUCCESS")
    yield "ref-extra-none", RPCType.EXTRA_INFO, ref.build_extra_info_result(None)
    yield "ref-err", RPCType.ERR, ref.build_error(ErrCode.CONF_TOKEN_NOT_FOUND)
    yield "ref-conf-reply", RPCType.PREPARE_CONF, ref.build_prepare_conf_reply(9)
    rewrite = Rewrite("/x", (("h", "v"), ("d", None)), (("a", None),), (("r", "1"),), b"body")
    yield "ref-rewrite", RPCType.HTTP_REQ_CALL, ref.build_http_req_call_reply(HTTPReqCallReply(5, rewrite))
    yield (
        "ref-stop",
        RPCType.HTTP_REQ_CALL,
        ref.build_http_req_call_reply(HTTPReqCallReply(6, Stop(403, (("a", "b"),), b"no"))),
    )
    yield (
        "ref-resp-reply",
        RPCType.HTTP_RESP_CALL,
        ref.build_http_resp_call_reply(HTTPRespCallReply(7, 201, (("x", "y"),), b"hi")),
    )
    yield "ref-var-query", RPCType.EXTRA_INFO, ref.build_extra_info_query(VarQuery("ssl_client_verify"))


def codec_seeds() -> Iterator[tuple[str, bytes]]:
    headers = (("host", "a.fuzz.example"), ("x-req", "foo"), ("x-req", "bar"), ("x-flag", None), ("x-bin", "\udcff"))
    frames = {
        "prepare": codec.prepare_conf_request_frame((ConfEntry("mtls-guard", "{}"), ConfEntry("fz-script", "")), "k"),
        "prepare-empty": codec.prepare_conf_request_frame(()),
        "req-call": _req(1, headers=headers, args=(("a", "1"), ("flag", None)), method=13),
        "req-call-v6": _req(2, path="/\udc80%2e", src_ip=bytes(15) + b"\x01"),
        "req-call-bare": _req(0, id=0, path=None, src_ip=None),
        "resp-call": codec.http_resp_call_frame(id=9, conf_token=1, status=200, headers=(("Content-Type", "a/b"),)),
        "extra-result": codec.extra_info_result_frame(b"SUCCESS"),
        "extra-none": codec.extra_info_result_frame(None),
        "err": codec.error_frame(ErrCode.SERVICE_UNAVAILABLE),
        "conf-reply": codec.prepare_conf_reply_frame(77),
        "stop": codec.http_req_call_reply_frame(HTTPReqCallReply(1, Stop(403, (("a", "b"),), b"denied"))),
        "rewrite": codec.http_req_call_reply_frame(
            HTTPReqCallReply(2, Rewrite("/n", (("h", "v"), ("d", None)), (("q", None),), (("r", "1"),), b"b"))
        ),
        "resp-reply": codec.http_resp_call_reply_frame(HTTPRespCallReply(3, 201, (("x", "y"),), b"body")),
        "var-query": codec.extra_info_query_frame(VarQuery("ssl_client_escaped_cert")),
        "body-queries": codec.extra_info_query_frame(ReqBodyQuery()) + codec.extra_info_query_frame(RespBodyQuery()),
    }
    for name, frame in frames.items():
        yield name, harness.make_input(frame)
    for name, rpc_type, payload in _reference_payloads():
        yield name, harness.make_input(codec.encode_frame(rpc_type, payload))
    # From runner.md s1.5: bytes an a6pluginprotos-built peer really sends.
    yield (
        "doc-stop",
        harness.make_input(
            codec.encode_frame(
                2,
                bytes.fromhex(
                    "1000000000000a0012000c000b0004000a00000018000000000000010700000000000a000c000a00000004000a"
                    "00000008000000000093010200000068690000"
                ),
            )
        ),
    )
    stream = b"".join(frames.values())
    yield "stream-cut", harness.make_input(stream, [1, 3, 4, 27, 28, 100, 301])
    yield "stream-bytewise", harness.make_input(b"".join(list(frames.values())[:4]), bytewise=True)
    yield "zero-length", harness.make_input(frames["prepare"] + b"\x02\x00\x00\x00tail")
    yield "oversized", harness.make_input(b"\x02\xff\xff\xff" + frames["err"], [2])
    yield "truncated", harness.make_input(frames["req-call"][:-3])


# --- session -----------------------------------------------------------------------------------------


def _answer(query: object, table: Mapping[str, str | None], body: bytes | None) -> bytes:
    if isinstance(query, VarQuery):
        value = table.get(query.name)
        return codec.extra_info_result_frame(None if value is None else value.encode("utf-8", "surrogateescape"))
    return codec.extra_info_result_frame(body)


def converse(requests: list[bytes], table: Mapping[str, str | None] = GOOD_VARS, body: bytes | None = b"{}") -> bytes:
    """Play APISIX against a real Session: the request frames plus every ExtraInfo answer, as one stream."""
    run = harness._Run(harness._new_store())
    stream = bytearray()
    for request in requests:
        pending = [request]
        while pending:
            data = pending.pop(0)
            stream += data
            before = len(run.writes)
            run.feed(data)
            pending.extend(
                _answer(codec.decode_extra_info_query(out.payload), table, body)
                for out in harness._output_frames(run.writes[before:])
                if out.type == RPCType.EXTRA_INFO
            )
    return bytes(stream)


def session_seeds() -> Iterator[tuple[str, bytes]]:
    n_routes = len(harness.PRESEEDED)
    xfcc = (("x-forwarded-client-cert", XFCC_LEAF),)
    conversations: dict[str, bytes] = {
        "enforce-verified": converse([_req(1)]),
        "enforce-no-cert": converse([_req(1)], {**GOOD_VARS, "ssl_client_verify": "NONE"}),
        "enforce-failed": converse([_req(1)], {**GOOD_VARS, "ssl_client_verify": "FAILED:unable to verify"}),
        "enforce-plain-http": converse([_req(1)], {**GOOD_VARS, "ssl_client_verify": None}),
        "enforce-sni-mismatch": converse([_req(1)], {**GOOD_VARS, "ssl_server_name": "b.fuzz.example"}),
        "exempt-public": converse([_req(2, path="/public/abc"), _req(2, path="/public/%61bc", method=1)]),
        "exempt-protected": converse([_req(2, path="/admin", headers=(("x-client-fp", "forged"),))]),
        "exempt-tricky": converse(
            [_req(2, path="/public/abc/../admin"), _req(2, path="/public/a;b"), _req(2, path="/public/ab", method=2)],
            {**GOOD_VARS, "ssl_client_verify": "NONE"},
        ),
        "report": converse([_req(3)], {**GOOD_VARS, "ssl_client_verify": "NONE"}),
        "xfcc-trusted": converse([_req(4, headers=xfcc)]),
        "xfcc-untrusted": converse([_req(4, headers=xfcc)], {**GOOD_VARS, "realip_remote_addr": "11.0.0.1"}),
        "xfcc-mapped": converse([_req(4, headers=xfcc)], {**GOOD_VARS, "realip_remote_addr": "::ffff:10.9.8.7"}),
        "rfc9440": converse(
            [_req(5, headers=(("client-cert", RFC9440_LEAF),))], {**GOOD_VARS, "realip_remote_addr": "127.0.0.1"}
        ),
        "script": converse([_req(6, headers=(("x-a", "1"),))]),
        "raise": converse([_req(7)]),
        "empty-chain": converse([_req(8), codec.http_resp_call_frame(id=1, conf_token=8)]),
        "chain": converse([_req(9)]),
        "yield-stop": converse([_req(10, headers=(("x-a", "z"),))]),
        "resp-call": converse([codec.http_resp_call_frame(id=5, conf_token=11, headers=(("Content-Type", "x"),))]),
        "bad-status": converse([_req(12)]),
        "prepare-then-call": converse(
            [
                codec.prepare_conf_request_frame((ConfEntry("fz-script", "var:host;stop:401"),), "route#9"),
                _req(n_routes + 1),
                codec.prepare_conf_request_frame((ConfEntry("mtls-guard", '{"mode": "report"}'),)),
                codec.prepare_conf_request_frame((ConfEntry("nope", ""),)),
                codec.prepare_conf_request_frame((ConfEntry("mtls-guard", "{"),)),
            ]
        ),
        "unknown-token": converse([_req(999), codec.http_resp_call_frame(id=1, conf_token=998)]),
        "garbage": converse([codec.encode_frame(9, b"\x00" * 12), codec.encode_frame(2, b"\xff" * 12)]),
        "unexpected-answer": converse([codec.extra_info_result_frame(b"x"), _req(8)]),
        "call-while-waiting": _req(6) + _req(8),
        "framing-error": converse([_req(8)]) + b"\x01\x00\x00\x00" + _req(8),
    }
    for name, stream in conversations.items():
        yield name, harness.make_input(stream)
    everything = b"".join(conversations[n] for n in ("enforce-verified", "exempt-public", "script", "resp-call"))
    yield "everything-cut", harness.make_input(everything, [3, 4, 5, 200, 201, 999, 1500])
    yield "script-bytewise", harness.make_input(conversations["script"], bytewise=True)
    # Cut-offs: the sweep runs after the request (its answers arrive late and are discarded), then more calls.
    # APISIX still answers the one query it read before the Err; the session must drop that answer.
    first = _req(6)
    late = first + codec.extra_info_result_frame(b"1") + conversations["enforce-verified"] + conversations["raise"]
    yield "deadline-cut", harness.make_input(late, [len(first), len(first) + 30], deadlines=True)
    yield (
        "deadline-bytewise",
        harness.make_input(conversations["chain"] + conversations["exempt-public"], bytewise=True, deadlines=True),
    )


# --- policy ------------------------------------------------------------------------------------------


def policy_seeds() -> Iterator[tuple[str, bytes]]:
    paths = [
        "/public/abc",
        "/public/%61bc",
        "/a/%2e%2e/b",
        "/a/..;/b",
        "/x%2Fy",
        "/%25%32%65",
        "/caf\u00e9",
        "/caf%C3%A9",
        "/\uff0e\uff0e/admin",
        "/a%3Fb",
        "/a\x00",
        "/%E2%80%AE",
        "//a",
        "/a/.",
        "relative",
    ]
    for i, path in enumerate(paths):
        yield f"path-{i:02d}", b"\x00" + path.encode("utf-8", "surrogateescape")
    policies = [
        harness._ENFORCE_POLICY,
        harness._EXEMPT_POLICY,
        harness._REPORT_POLICY,
        harness._XFCC_POLICY,
        '{"exempt": [{"path": "/(a|b)*c", "hosts": ["*.example.com"], "methods": ["GET"]}], "reject": {"status": 403,'
        ' "body": "no", "expose_reason": true}}',
        '{"require": {"subject": {"CN": ["x"], "2.5.4.11": ["y"]}, "san": {"uri": ["spiffe://td/ns/*"],'
        ' "email": ["*@example.com"]}}}',
        '{"source": {"type": "header", "format": "pem-urlencoded", "header": "x-cert", "chain_header": "x-chain",'
        ' "trusted_proxies": ["10.0.0.1/32"], "ca": ' + json.dumps(CA_PEM) + "}}",
        '{"mode": "report", "mode": "enforce"}',
        "[1, 2",
        '{"policy": "named"}',
    ]
    for i, policy in enumerate(policies):
        yield f"policy-{i:02d}", b"\x01" + policy.encode()
    forwarded = [
        (0, [XFCC_LEAF], []),
        (0, ['By=spiffe://a;Hash=00;Cert="abc";Subject="CN=x",Cert=1'], []),
        (1, [ESCAPED_LEAF], [quote(CA_PEM, safe="")]),
        (2, [RFC9440_LEAF], [RFC9440_LEAF + ", :AAAA:"]),
        (2, ["::", ":AA=:"], []),
    ]
    for i, (fmt, values, chain) in enumerate(forwarded):
        text = "\x00".join(values) + ("\x01" + "\x00".join(chain) if chain else "")
        yield f"forwarded-{i}", bytes([2, fmt]) + text.encode()
    yield "pem-escaped", b"\x03" + ESCAPED_LEAF.encode()
    yield "pem-raw", b"\x03" + LEAF_PEM.encode()
    for name, pem in (("leaf", LEAF_PEM), ("ca", CA_PEM), ("rich", RICH_PEM)):
        yield f"der-{name}", b"\x05" + load_pem(pem).certificate.public_bytes(Encoding.DER)
    # decide: policy, method, path, header count, then per-variable picks (0 = the first, usually good, value).
    names = sorted(harness._POLICIES)
    for name in names:
        for path_pick in (0, 2):
            yield f"decide-{name}-{path_pick}", bytes([4, names.index(name), 0, 0, path_pick, 1, 0, 0, 0]) + bytes(8)
    rng = random.Random(20240601)  # noqa: S311 - reproducible seeds, not secrets
    for i in range(12):
        yield f"decide-random-{i:02d}", bytes([4]) + rng.randbytes(48)


SEEDS: dict[str, Callable[[], Iterator[tuple[str, bytes]]]] = {
    "codec": codec_seeds,
    "session": session_seeds,
    "policy": policy_seeds,
}


def build(root: Path = CORPUS) -> dict[str, dict[str, bytes]]:
    """target -> {file name: bytes}; every seed is checked against its harness function."""
    out: dict[str, dict[str, bytes]] = {}
    for target, seeds in SEEDS.items():
        files: dict[str, bytes] = {}
        for name, data in seeds():
            harness.TARGETS[target](data)  # a seed that fails the harness is a harness bug
            files[f"{name}-{hashlib.sha1(data).hexdigest()[:8]}"] = data  # noqa: S324 - a file name, not security
        out[target] = files
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only verify that the committed seeds are current")
    args = parser.parse_args(argv)
    harness.configure_logging()
    corpora = build()
    stale = []
    total = 0
    for target, files in corpora.items():
        directory = CORPUS / target
        present = {p.name: p.read_bytes() for p in directory.glob("*")} if directory.is_dir() else {}
        if present != files:
            stale.append(target)
        total += sum(map(len, files.values()))
        if not args.check:
            directory.mkdir(parents=True, exist_ok=True)
            for name in set(present) - set(files):
                (directory / name).unlink()
            for name, data in files.items():
                (directory / name).write_bytes(data)
        print(f"{target}: {len(files)} seeds, {sum(map(len, files.values()))} bytes")
    print(f"total: {total} bytes")
    if args.check and stale:
        print(f"stale corpora (re-run python -m fuzz.make_corpus): {', '.join(stale)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
