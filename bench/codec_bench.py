"""Micro-benchmark of runner.protocol.codec (not a test): median microseconds per operation.

Run with ``.venv/bin/python bench/codec_bench.py``. The request is shaped like a browser call
through APISIX: about 1.6 KB, 20 headers, 6 args. The generated ``A6`` accessors are timed on the
same bytes for comparison.
"""

from __future__ import annotations

import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from runner.protocol import codec
from runner.protocol.messages import HTTPReqCallReply, Method, Rewrite, Stop, VarQuery

HEADERS = (
    ("host", "api.example.com"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    ("accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    ("accept-language", "en-GB,en;q=0.7,de;q=0.3"),
    ("accept-encoding", "gzip, deflate, br, zstd"),
    ("referer", "https://www.example.com/catalogue/items"),
    ("cookie", "session=3f9a1c2e7b5d4f60a8e9c1b2d3f4a5b6; theme=dark"),
    ("connection", "keep-alive"),
    ("upgrade-insecure-requests", "1"),
    ("sec-fetch-dest", "document"),
    ("sec-fetch-mode", "navigate"),
    ("sec-fetch-site", "same-site"),
    ("sec-fetch-user", "?1"),
    ("priority", "u=0, i"),
    ("x-request-id", "0b6c2a9e-5f8d-4e31-9a7c-2d4e6f8a0b1c"),
    ("x-forwarded-for", "203.0.113.7"),
    ("x-forwarded-proto", "https"),
    ("x-client-cert-fingerprint", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"),
    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ("cache-control", "max-age=0"),
)
ARGS = (
    ("page", "3"),
    ("sort", "price"),
    ("q", "red shoes"),
    ("tag", "sale"),
    ("tag", "new"),
    ("debug", None),
)
REQUEST = codec.http_req_call_frame(
    id=4194311,
    conf_token=17,
    method=Method.GET,
    path="/catalogue/items/search",
    src_ip=bytes([203, 0, 113, 7]),
    headers=HEADERS,
    args=ARGS,
)[4:]


def view_and_lookup() -> object:
    req = codec.decode_http_req_call(REQUEST)
    return req.id, req.conf_token, req.method, req.path, req.header("x-client-cert-fingerprint")


def full_decode() -> object:
    req = codec.decode_http_req_call(REQUEST)
    return req.id, req.conf_token, req.method, req.path, req.src_ip, req.headers, req.args


def generated_decode() -> object:
    from A6.HTTPReqCall.Req import Req

    req = Req.GetRootAs(REQUEST, 0)
    headers = []
    for i in range(req.HeadersLength()):
        e = req.Headers(i)
        headers.append((e.Name(), e.Value()))
    args = []
    for i in range(req.ArgsLength()):
        e = req.Args(i)
        args.append((e.Name(), e.Value()))
    src_ip = bytes(req.SrcIp(i) for i in range(req.SrcIpLength()))
    return req.Id(), req.ConfToken(), req.Method(), req.Path(), src_ip, headers, args


NO_ACTION = HTTPReqCallReply(4194311)
STOP = HTTPReqCallReply(
    4194311, Stop(403, (("content-type", "text/plain"), ("x-mtls-guard", "denied")), b"client certificate required")
)
REWRITE = HTTPReqCallReply(
    4194311,
    Rewrite(
        headers=(
            ("x-client-dn", "CN=svc-a,O=Example"),
            ("x-client-verified", "SUCCESS"),
            ("x-forwarded-client-cert", None),
        ),
        resp_headers=(("x-mtls-guard", "allowed"), ("x-policy", "default")),
    ),
)
VAR = VarQuery("ssl_client_s_dn")

CASES: list[tuple[str, Callable[[], object]]] = [
    ("decode view + id/token/method/path + 1 header", view_and_lookup),
    ("decode view + all headers/args/src_ip", full_decode),
    ("same, generated A6 accessors", generated_decode),
    ("encode HTTPReqCall reply, no action", lambda: codec.http_req_call_reply_frame(NO_ACTION)),
    ("encode Stop, 2 headers + short body", lambda: codec.http_req_call_reply_frame(STOP)),
    ("encode Rewrite, 2 header sets + 1 delete", lambda: codec.http_req_call_reply_frame(REWRITE)),
    ("encode ExtraInfo VarQuery (cached)", lambda: codec.extra_info_query_frame(VAR)),
]


def measure(func: Callable[[], object], repeat: int = 7) -> float:
    timer = timeit.Timer(func)
    number, _ = timer.autorange()
    runs = timer.repeat(repeat=repeat, number=number)
    return statistics.median(runs) / number * 1e6


def main() -> None:
    print(f"Python {sys.version.split()[0]}; HTTPReqCall payload {len(REQUEST)} bytes, 20 headers, 6 args")
    for name, func in CASES:
        print(f"{measure(func):9.2f} us  {name}")


if __name__ == "__main__":
    main()
