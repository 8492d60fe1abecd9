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
from runner.protocol.codec import HTTPReqCall
from runner.protocol.messages import ExtraInfoQuery, Method, Pairs, Stop, VarQuery

from ..decision import Decision, RequestInput, host_binds
from ..matchers import DomainSet, authority_host, compile_regex, normalize_host
from ..paths import classify_path
from ..plugin import MtlsGuard, read_facts
from ..policy import METHOD_OVERRIDE_ARG, METHOD_OVERRIDE_HEADERS, CompiledPolicy
from ..policy_config import ExemptRule

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


# The form types plugin.method_traits treats as a possible _method carrier: it decides, this only names the cause.
_FORM_TYPES = ("application/x-www-form-urlencoded", "multipart/form-data")


def _override(call: HTTPReqCall, method: str) -> str:
    """Which method override the request carries, named for the operator ("" for none found).

    method_traits decides; this only names what it found, in the same order it looks."""
    spellings = call.header_spellings(METHOD_OVERRIDE_HEADERS)
    if spellings:
        return f"the header {spellings[0]}"
    for name, value in call.args:
        for text in (name, value or ""):
            if METHOD_OVERRIDE_ARG in text.lower() or "%5fmethod" in text.lower():
                return f"the query argument {name}" + ("" if value is None else f"={value}")
    content_type = call.header("content-type") or ""
    if method == "POST" and content_type.lower().startswith(_FORM_TYPES):
        return f"a POST form body ({content_type.split(';')[0]}), which may hold _method"
    return ""


@dataclass(frozen=True, slots=True)
class _Request:
    """What the exemption rules are checked against, as the engine sees it."""

    facts: RequestInput
    call: HTTPReqCall
    judged: str  # the canonical path (decoded once when the upstream receives it encoded)
    why_ambiguous: str
    variables: Mapping[str, str | None]


def _host_unbound(request: _Request) -> str:
    """Why the Host cannot be believed (decision.host_binds is False), naming the name that differs."""
    host = request.facts.host
    routed = request.variables.get("host")
    if routed is None or normalize_host(routed) != host:
        return f"nginx routed on another host ($host {routed!r}) than the Host {host!r}"
    sni = request.variables.get("ssl_server_name")
    return f"the TLS SNI {sni!r} is another name than the Host {host!r}, so the Host cannot be believed (421)"


def _why_not(rule: ExemptRule, request: _Request) -> str:
    """Why ``rule`` does not exempt the request ("" when it does), in the order the engine checks."""
    facts = request.facts
    if request.why_ambiguous:
        path = facts.path or ""
        return f"the path {path!r} is ambiguous ({request.why_ambiguous}): ambiguous paths are never exempt"
    if rule.path is not None and compile_regex(rule.path).fullmatch(request.judged.encode("utf-8")) is None:
        return f"the path pattern {rule.path!r} does not match the canonical path {request.judged!r}"
    method = facts.method.upper()
    if rule.preflight and method != "OPTIONS":
        return f"not a CORS preflight: the method is {method}, not OPTIONS"
    if rule.methods is not None and method not in rule.methods:
        return f"the method {method} is not listed ({'|'.join(sorted(rule.methods))})"
    if rule.preflight or rule.methods is not None:
        traits = facts.method_traits()
        if traits.overridden:
            found = _override(request.call, method) or "a method override"
            return f"a method override is present ({found}): the upstream may act on another method"
        if rule.preflight and not traits.preflight:
            missing = [h for h in ("Origin", "Access-Control-Request-Method") if request.call.header(h) is None]
            return f"not a CORS preflight: OPTIONS without {' and '.join(missing)}"
    if rule.hosts is not None:
        if facts.host is None:
            return f"the request has no usable Host header (the rule names {'|'.join(rule.hosts)})"
        if not DomainSet.of(rule.hosts).matches(facts.host):
            return f"the Host {facts.host!r} differs from the rule's hosts ({'|'.join(rule.hosts)})"
        if not host_binds(facts.host, request.variables):
            return _host_unbound(request)
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
    try:
        code = Method[method.upper()].value
    except KeyError:
        raise ValueError(f"APISIX passes no method {method!r} to the runner") from None
    frame = codec.http_req_call_frame(
        id=0,
        conf_token=1,
        method=code,
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
    seen = _Request(facts, call, judged, why_ambiguous, variables)
    lines = []
    applied = ""
    for rule in policy.config.exempt:
        reason = _why_not(rule, seen)
        if reason:
            lines.append(f"[{rule.id}] no: {reason}")
        elif applied:
            lines.append(f"[{rule.id}] yes, but [{applied}] comes first")
        else:
            applied = rule.id
            lines.append(f"[{rule.id}] yes: exempts this request")
    return Explanation(
        decision=decision,
        stop=stop,
        upstream_headers=() if rewrite is None else rewrite.headers,
        upstream_path=None if rewrite is None else rewrite.path,
        variables_asked=tuple(channel.asked),
        round_trips=channel.round_trips,
        exemptions=tuple(lines),
    )
