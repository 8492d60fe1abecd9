"""Policy documents (route JSON, policy-file YAML) -> validated, typed, immutable configuration.

This module knows the policy's vocabulary and reads a document into the types of :mod:`.policy_config`;
:class:`PolicyError` and the generic readers (string, list, object...) are :mod:`.schema_readers`.
The policy file itself (named policies, defaults, its YAML loader) is :mod:`.library`; it validates
each named policy with :func:`parse_policy` from here.

Validation is strict because a typo in a security policy must not silently weaken it: unknown keys are
errors at every level, duplicate keys are errors (JSON and YAML would otherwise keep the last one), and
every error names the key path (``require.san.dns[1]: ...``). Nothing here runs per request.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Mapping
from typing import Final

from runner.protocol.codec import fold_header_name

from .crl_files import route_table
from .forwarded import ForwardedFormat
from .identity import CertificateError
from .matchers import (
    APISIX_METHODS,
    MAX_PATTERN_LENGTH,
    compile_regex,
    normalize_fingerprint,
    parse_dns_pattern,
    parse_email_pattern,
    parse_host_pattern,
    parse_uri_pattern,
)
from .policy_config import (
    HOST_MISMATCH_STATUS,
    ApisixSource,
    ExemptRule,
    Forward,
    HeaderSource,
    IPNetwork,
    Mode,
    NameRequirement,
    PolicyConfig,
    Reject,
    Requirements,
    SanRequirement,
)
from .revocation import CrlError, RevocationTable
from .schema_readers import (
    PolicyError,
    join_path,
    parsed_reader,
    read_bool,
    read_list,
    read_object,
    read_optional,
    read_str,
)
from .trust import TrustBundle

__all__ = ["fold_name", "parse_policy"]

MAX_RULES: Final = 1024
MAX_PEM: Final = 1 << 20
MAX_BODY: Final = 16 * 1024
# RFC 4512 short names accepted in subject/issuer constraints; anything else must be a dotted OID.
NAME_ATTRIBUTES: Final = frozenset({"CN", "O", "OU", "C", "L", "ST", "DC", "SERIALNUMBER", "EMAILADDRESS", "UID"})
_OID: Final = re.compile(r"[0-2](?:\.(?:0|[1-9][0-9]*))+\Z")
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]{1,128}\Z")
_ID: Final = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,62}[\x21-\x7e])?\Z")
# Headers the plugin must never be told to delete or forge: framing and routing belong to nginx.
_RESERVED_HEADERS: Final = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "keep-alive", "trailer"}
)
_DEFAULT_HEADERS: Final = {
    ForwardedFormat.XFCC: "x-forwarded-client-cert",
    ForwardedFormat.PEM_URLENCODED: "x-client-cert",
    ForwardedFormat.RFC9440: "client-cert",
}


def fold_name(name: str) -> str:
    """A (validated, ASCII) header name as CGI-style upstreams read it: codec.fold_header_name."""
    return fold_header_name(name.encode("ascii")).decode("ascii")


def _header_name(value: object, path: str) -> str:
    name = read_str(value, path, max_len=128).lower()
    if not _TOKEN.match(name):
        raise PolicyError(path, "not a valid HTTP header name")
    if fold_name(name) in _RESERVED_HEADERS:
        raise PolicyError(path, f"{name!r} is reserved and cannot be used")
    return name


def _trust_bundle(value: object, path: str) -> TrustBundle:
    pem = read_str(value, path, max_len=MAX_PEM, printable=False)
    try:
        return TrustBundle.from_pem(pem)
    except CertificateError as exc:
        raise PolicyError(path, f"invalid CA bundle: {exc}") from None


# -- sections ----------------------------------------------------------------------------------------


def _method(value: object, path: str) -> str:
    method = read_str(value, path, max_len=16).upper()
    if method not in APISIX_METHODS:
        raise PolicyError(path, f"unknown method {method!r} (allowed: {' '.join(sorted(APISIX_METHODS))})")
    return method


def _regex(value: object, path: str) -> str:
    pattern = read_str(value, path, max_len=MAX_PATTERN_LENGTH, printable=False)
    try:
        compile_regex(pattern)
    except ValueError as exc:
        raise PolicyError(path, str(exc)) from None
    return pattern


def _exempt(value: object, path: str) -> tuple[ExemptRule, ...]:
    keys = frozenset({"id", "path", "methods", "hosts", "preflight"})
    items = read_list(value, path, lambda v, p: v, unique=False)
    if len(items) > MAX_RULES:
        raise PolicyError(path, f"more than {MAX_RULES} rules")
    rules: list[ExemptRule] = []
    for index, item in enumerate(items):
        at = join_path(path, index)
        m = read_object(item, at, keys)
        preflight = read_optional(m, at, "preflight", read_bool, False)
        if not (preflight or keys.difference({"id", "preflight"}).intersection(m)):
            raise PolicyError(at, "needs at least one of path, methods, hosts, or preflight: true")
        rule_id = f"exempt[{index}]"
        if "id" in m:
            rule_id = read_str(m["id"], join_path(at, "id"), max_len=64)
            if not _ID.match(rule_id):
                raise PolicyError(join_path(at, "id"), "must not start or end with a space")
        if any(r.id == rule_id for r in rules):
            raise PolicyError(join_path(at, "id"), f"duplicate rule id {rule_id!r}")
        methods = read_optional(m, at, "methods", lambda v, p: frozenset(read_list(v, p, _method)), None)
        if preflight and methods is not None and methods != {"OPTIONS"}:
            raise PolicyError(join_path(at, "methods"), 'a preflight rule applies to OPTIONS only: omit "methods"')
        hosts = read_optional(m, at, "hosts", lambda v, p: read_list(v, p, parsed_reader(parse_host_pattern)), None)
        rules.append(ExemptRule(rule_id, read_optional(m, at, "path", _regex, None), methods, hosts, preflight))
    return tuple(rules)


def _name_requirement(value: object, path: str) -> NameRequirement:
    if not isinstance(value, Mapping) or not value:
        raise PolicyError(path, "must be a non-empty object of attribute -> list of values")
    attrs: list[tuple[str, frozenset[str]]] = []
    for key, values in value.items():
        key_path = join_path(path, str(key))
        if not isinstance(key, str) or not (key.upper() in NAME_ATTRIBUTES or _OID.match(key)):
            raise PolicyError(
                key_path, f"unknown attribute (use one of {' '.join(sorted(NAME_ATTRIBUTES))} or a dotted OID)"
            )
        label = key.upper() if key.upper() in NAME_ATTRIBUTES else key
        if any(label == a for a, _ in attrs):
            raise PolicyError(key_path, "attribute listed twice")
        exact = read_list(values, key_path, lambda v, p: read_str(v, p, max_len=1024, printable=False))
        attrs.append((label, frozenset(exact)))
    return NameRequirement(tuple(attrs))


def _route_crl(value: object, path: str, ca: TrustBundle | None) -> RevocationTable:
    """require.crl: PEM CRL text (or a list of them), each verified against require.ca right here."""
    if ca is None:
        raise PolicyError(path, "needs require.ca: the route's CRLs are verified against that bundle")
    pem: Callable[[object, str], str] = lambda v, p: read_str(v, p, max_len=MAX_PEM, printable=False)  # noqa: E731
    try:
        return route_table(pem(value, path) if isinstance(value, str) else read_list(value, path, pem), ca.anchors)
    except CrlError as exc:
        raise PolicyError(path, f"invalid CRL: {exc}") from None


def _require(value: object, path: str) -> Requirements:
    m = read_object(value, path, frozenset({"san", "subject", "issuer", "fingerprint_sha256", "ca", "crl"}))
    san: SanRequirement | None = None
    if "san" in m:
        san_path = join_path(path, "san")
        s = read_object(m["san"], san_path, frozenset({"dns", "uri", "email"}))
        if not s:
            raise PolicyError(san_path, "needs at least one of dns, uri, email")
        san = SanRequirement(
            dns=read_optional(s, san_path, "dns", lambda v, p: read_list(v, p, parsed_reader(parse_dns_pattern)), ()),
            uri=read_optional(
                s, san_path, "uri", lambda v, p: read_list(v, p, parsed_reader(parse_uri_pattern, 2048)), ()
            ),
            email=read_optional(
                s, san_path, "email", lambda v, p: read_list(v, p, parsed_reader(parse_email_pattern)), ()
            ),
        )
    return Requirements(
        san=san,
        subject=read_optional(m, path, "subject", _name_requirement, None),
        issuer=read_optional(m, path, "issuer", _name_requirement, None),
        fingerprints=read_optional(
            m,
            path,
            "fingerprint_sha256",
            lambda v, p: frozenset(read_list(v, p, parsed_reader(normalize_fingerprint))),
            None,
        ),
        ca=(ca := read_optional(m, path, "ca", _trust_bundle, None)),
        crl=read_optional(m, path, "crl", lambda v, p: _route_crl(v, p, ca), None),
    )


def _reject(value: object, path: str) -> Reject:
    m = read_object(value, path, frozenset({"status", "body", "content_type", "expose_reason"}))
    default = Reject()
    status = m.get("status", default.status)
    if isinstance(status, bool) or not isinstance(status, int) or not 400 <= status <= 599:
        raise PolicyError(join_path(path, "status"), "must be an integer from 400 to 599")
    if status == HOST_MISMATCH_STATUS:
        raise PolicyError(join_path(path, "status"), "421 is reserved for Host/SNI mismatches")
    body = m.get("body", default.body)
    if not isinstance(body, str) or len(body) > MAX_BODY:
        raise PolicyError(join_path(path, "body"), f"must be a string of at most {MAX_BODY} characters")
    content_type = read_optional(m, path, "content_type", read_str, default.content_type)
    return Reject(status, body, content_type, read_optional(m, path, "expose_reason", read_bool, default.expose_reason))


def _network(value: object, path: str) -> IPNetwork:
    text = read_str(value, path, max_len=64)
    try:
        # strict: "10.0.0.1/8" is almost always a typo for a narrower range, so refuse to guess.
        return ipaddress.ip_network(text, strict=True)
    except ValueError as exc:
        raise PolicyError(path, f"not a valid CIDR: {exc}") from None


def _source(value: object, path: str) -> ApisixSource | HeaderSource:
    if not isinstance(value, Mapping) or value.get("type") not in ("apisix", "header"):
        raise PolicyError(join_path(path, "type"), 'must be "apisix" or "header"')
    if value["type"] == "apisix":
        read_object(value, path, frozenset({"type"}))
        return ApisixSource()
    m = read_object(value, path, frozenset({"type", "format", "header", "chain_header", "trusted_proxies", "ca"}))
    for key in ("format", "trusted_proxies", "ca"):
        if key not in m:
            raise PolicyError(join_path(path, key), "is required for header sources")
    if m["format"] not in tuple(ForwardedFormat):
        formats = ", ".join(f.value for f in ForwardedFormat)
        raise PolicyError(join_path(path, "format"), f"must be one of {formats}")
    fmt = ForwardedFormat(str(m["format"]))
    chain_header: str | None = "client-cert-chain" if fmt is ForwardedFormat.RFC9440 else None
    if "chain_header" in m:
        if fmt is ForwardedFormat.XFCC:
            raise PolicyError(join_path(path, "chain_header"), "xfcc carries the chain in the header itself")
        chain_header = _header_name(m["chain_header"], join_path(path, "chain_header"))
    header = read_optional(m, path, "header", _header_name, _DEFAULT_HEADERS[fmt])
    if chain_header is not None and fold_name(header) == fold_name(chain_header):
        raise PolicyError(join_path(path, "chain_header"), "must differ from header")
    return HeaderSource(
        format=fmt,
        header=header,
        chain_header=chain_header,
        trusted_proxies=read_list(m["trusted_proxies"], join_path(path, "trusted_proxies"), _network),
        ca=_trust_bundle(m["ca"], join_path(path, "ca")),
    )


def _forward(value: object, path: str) -> Forward:
    m = read_object(value, path, frozenset({"subject", "san", "fingerprint", "xfcc"}))
    names = {key: _header_name(v, join_path(path, key)) for key, v in m.items()}
    seen: dict[str, str] = {}
    for key, name in names.items():
        # Upstreams that fold "_" into "-" would read two such names as one header.
        folded = fold_name(name)
        if folded in seen:
            raise PolicyError(join_path(path, key), f"same header as {seen[folded]}")
        seen[folded] = key
    return Forward(names.get("subject"), names.get("san"), names.get("fingerprint"), names.get("xfcc"))


TOP_LEVEL_KEYS: Final = frozenset(
    {"policy", "mode", "exempt", "require", "require_sni_match", "reject", "source", "forward"}
)


def _require_unicode(value: object, path: str) -> None:
    """JSON ``\\udcXX`` escapes (and YAML's) can produce lone surrogates, which no later step can
    encode; reject them here, naming the key, instead of failing deep inside compilation."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise PolicyError(path, "contains a lone surrogate (an invalid \\uD800-\\uDFFF escape)") from None
    elif isinstance(value, Mapping):
        for key, item in value.items():
            _require_unicode(key, path)
            _require_unicode(item, join_path(path, str(key)))
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            _require_unicode(item, join_path(path, index))


def parse_policy(value: object, path: str = "", *, name: str | None = None) -> PolicyConfig:
    """Validate one policy object (without a ``policy`` reference: resolve that first)."""
    _require_unicode(value, path)
    m = read_object(value, path, TOP_LEVEL_KEYS)
    if "policy" in m:
        raise PolicyError(join_path(path, "policy"), "a named-policy reference is not allowed here")
    mode = m.get("mode", Mode.ENFORCE.value)
    if mode not in ("enforce", "report"):
        raise PolicyError(join_path(path, "mode"), 'must be "enforce" or "report"')
    return PolicyConfig(
        mode=Mode(mode),
        exempt=read_optional(m, path, "exempt", _exempt, ()),
        require=read_optional(m, path, "require", _require, Requirements()),
        require_sni_match=read_optional(m, path, "require_sni_match", read_bool, True),
        reject=read_optional(m, path, "reject", _reject, Reject()),
        source=read_optional(m, path, "source", _source, ApisixSource()),
        forward=read_optional(m, path, "forward", _forward, Forward()),
        name=name,
    )
