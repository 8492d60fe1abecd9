"""Run one request through the real plugin code path without a socket: `mtls-guard explain`.

The request is encoded as the HTTPReqCall frame APISIX would send, decoded by the runner's codec,
and handed to the same ``MtlsGuard.on_request`` the runner calls; ExtraInfo queries are answered
from a variable table. So the verdict printed is the one the runner would reach.
"""

from __future__ import annotations

import asyncio
import ipaddress
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import unquote_plus

from runner.driver import Pending
from runner.plugin import HTTPRequest
from runner.protocol import codec
from runner.protocol.messages import ExtraInfoQuery, Method, Pairs, Stop, VarQuery

from .decision import Decision, RequestInput, host_binds
from .matchers import DomainSet, authority_host, compile_regex
from .paths import classify_path
from .plugin import MtlsGuard, read_facts
from .policy import CompiledPolicy
from .schema import ExemptRule

__all__ = ["Explanation", "TableChannel", "explain", "nginx_uri", "query_args"]


class TableChannel:
    """ExtraInfo answered from a table, recording what was asked (and how many round trips)."""

    def __init__(self, table: Mapping[str, str | None]) -> None:
        self.table = dict(table)
        self.asked: list[str] = []
        self.round_trips = 0

    def query(self, queries: Sequence[ExtraInfoQuery]) -> Pending[list[bytes | None]]:
        self.round_trips += 1
        answers: list[bytes | None] = []
        for q in queries:
            if not isinstance(q, VarQuery):
                raise ValueError("explain answers variables only")
            self.asked.append(q.name)
            value = self.table.get(q.name)
            answers.append(None if value is None else value.encode("utf-8", "surrogateescape"))
        pending: Pending[list[bytes | None]] = Pending()
        pending.set_result(answers)
        return pending


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: Decision
    stop: Stop | None
    upstream_headers: Pairs
    upstream_path: str | None  # the Rewrite path (None: the upstream gets the client's request-target)
    variables_asked: tuple[str, ...]
    round_trips: int
    exemptions: tuple[str, ...]  # one line per rule: whether it applied, and if not, why


def nginx_uri(target: str) -> tuple[str, str]:
    """($uri, raw query) that nginx derives from a client's request-target, or ValueError (nginx: 400).

    Follows ngx_http_parse_complex_uri with merge_slashes on (APISIX's default): "%XX" decoded once
    (a decoded "/" or "." takes part in the structure, a decoded NUL is refused), dot segments resolved
    ("..", above the root, is refused), runs of "/" merged. An absolute-form target keeps its path.
    """
    if target.startswith(("http://", "https://")):
        rest = target.split("://", 1)[1]
        target = "/" + rest.split("/", 1)[1] if "/" in rest else "/"
    path, _, query = target.partition("?")
    if not path.startswith("/"):
        raise ValueError("the request-target must start with '/' (or be absolute-form)")
    raw = path.encode("utf-8", "surrogateescape")
    decoded = bytearray()
    i = 0
    while i < len(raw):
        if raw[i] == 0x25:  # "%"
            digits = raw[i + 1 : i + 3]
            if len(digits) != 2 or not all(chr(d) in string.hexdigits for d in digits):
                raise ValueError(f"invalid percent-encoding at offset {i}")
            value = int(digits, 16)
            if value == 0:
                raise ValueError("a %00 in the path")
            decoded.append(value)
            i += 3
        else:
            decoded.append(raw[i])
            i += 1
    segments: list[bytes] = []
    parts = bytes(decoded).split(b"/")[1:]
    for index, segment in enumerate(parts):
        last = index == len(parts) - 1
        if segment == b"..":
            if not segments:
                raise ValueError("'..' above the root")
            segments.pop()
            if last:
                segments.append(b"")
        elif segment == b".":
            if last:
                segments.append(b"")
        elif segment or last:
            segments.append(segment)
    return "/" + b"/".join(segments).decode("utf-8", "surrogateescape"), query


def query_args(query: str) -> Pairs:
    """HTTPReqCall.args as APISIX sends them (ngx.req.get_uri_args): unescaped, a bare name is a flag."""
    args: list[tuple[str, str | None]] = []
    for part in query.split("&"):
        if not part:
            continue
        name, sep, value = part.partition("=")
        if name:
            args.append((unquote_plus(name), unquote_plus(value) if sep else None))
    return tuple(args)


def _why_not(rule: ExemptRule, facts: RequestInput, judged: str, why_ambiguous: str, binds: bool | None) -> str:
    """Why ``rule`` does not exempt the request ("" when it does)."""
    if why_ambiguous:
        return f"the path is ambiguous ({why_ambiguous}): ambiguous paths are never exempt"
    if rule.path is not None and compile_regex(rule.path).fullmatch(judged.encode("utf-8")) is None:
        return f"the path {judged!r} does not full-match {rule.path!r}"
    methods = frozenset({"OPTIONS"}) if rule.preflight else rule.methods
    if methods is not None:
        if facts.method.upper() not in methods:
            return f"the method {facts.method} is not one of {'|'.join(sorted(methods))}"
        traits = facts.method_traits()
        if traits.overridden:
            return "a method-override header, _method argument or form body is present (another method may be acted on)"
        if rule.preflight and not traits.preflight:
            return "not a CORS preflight (OPTIONS needs Origin and Access-Control-Request-Method)"
    if rule.hosts is not None:
        if not DomainSet.of(rule.hosts).matches(facts.host):
            return f"the Host {facts.host!r} is not one of {'|'.join(rule.hosts)}"
        if binds is False:
            return "the Host names an exempt host but the TLS SNI or the routed host ($host) is another name (421)"
    return ""


def explain(
    plugin: MtlsGuard,
    policy: CompiledPolicy,
    *,
    method: str,
    path: str,
    headers: Pairs,
    variables: Mapping[str, str | None],
    args: Pairs = (),
    src_ip: str = "127.0.0.1",
) -> Explanation:
    frame = codec.http_req_call_frame(
        id=0,
        conf_token=1,
        method=Method[method.upper()].value,
        path=path,
        src_ip=ipaddress.ip_address(src_ip).packed,
        headers=headers,
        args=args,
    )
    call = codec.decode_http_req_call(frame[4:])
    channel = TableChannel(variables)
    request = HTTPRequest(call, channel)
    stop = asyncio.run(plugin.on_request(policy, request))
    decision: Decision = request.state["mtls_guard.decision"]
    rewrite = request.rewrite()
    facts, _ = read_facts(policy, HTTPRequest(call, TableChannel(variables)))
    facts = facts._replace(host=authority_host(call.header("host")))
    encoded = "%" in path and bool(variables.get("upstream_uri"))
    judged, why_ambiguous = classify_path(path, encoded=encoded)
    binds = host_binds(facts.host, variables)
    lines = []
    for rule in policy.config.exempt:
        reason = _why_not(rule, facts, judged, why_ambiguous, binds)
        lines.append(f"[{rule.id}] " + (f"no: {reason}" if reason else "yes"))
    return Explanation(
        decision=decision,
        stop=stop,
        upstream_headers=() if rewrite is None else rewrite.headers,
        upstream_path=None if rewrite is None else rewrite.path,
        variables_asked=tuple(channel.asked),
        round_trips=channel.round_trips,
        exemptions=tuple(lines),
    )
