"""Policy documents (route JSON, policy-file YAML) -> validated, typed, immutable configuration.

The policy file itself (named policies, defaults, its YAML loader) is :mod:`.library`; it validates
each named policy with :func:`parse_policy` from here.

Validation is strict because a typo in a security policy must not silently weaken it: unknown keys are
errors at every level, duplicate keys are errors (JSON and YAML would otherwise keep the last one), and
every error names the key path (``require.san.dns[1]: ...``). Nothing here runs per request.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Literal, TypeAlias, TypeVar

from runner.protocol.codec import fold_header_name

from .crl_files import route_table
from .forwarded import ForwardedFormat
from .identity import CertificateError
from .matchers import (
    APISIX_METHODS,
    MAX_PATTERN_LENGTH,
    EmailPattern,
    UriPattern,
    compile_regex,
    normalize_fingerprint,
    parse_dns_pattern,
    parse_email_pattern,
    parse_host_pattern,
    parse_uri_pattern,
)
from .revocation import CrlError, RevocationTable
from .trust import TrustBundle

__all__ = [
    "ApisixSource",
    "ExemptRule",
    "Forward",
    "HeaderSource",
    "IPNetwork",
    "Mode",
    "NameRequirement",
    "PolicyConfig",
    "PolicyError",
    "Reject",
    "Requirements",
    "SanRequirement",
    "fold_name",
    "join_path",
    "parse_policy",
]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
_T = TypeVar("_T")
_D = TypeVar("_D")

HOST_MISMATCH_STATUS: Final = 421
MAX_RULES: Final = 1024
MAX_LIST: Final = 1024
MAX_PEM: Final = 1 << 20
MAX_BODY: Final = 16 * 1024
# RFC 4512 short names accepted in subject/issuer constraints; anything else must be a dotted OID.
NAME_ATTRIBUTES: Final = frozenset({"CN", "O", "OU", "C", "L", "ST", "DC", "SERIALNUMBER", "EMAILADDRESS", "UID"})
_OID: Final = re.compile(r"[0-2](?:\.(?:0|[1-9][0-9]*))+\Z")
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9a-z-]{1,128}\Z")
_ID: Final = re.compile(r"[\x21-\x7e](?:[\x20-\x7e]{0,62}[\x21-\x7e])?\Z")
_PRINTABLE: Final = re.compile(r"[\x20-\x7e]*\Z")
# Headers the plugin must never be told to delete or forge: framing and routing belong to nginx.
_RESERVED_HEADERS: Final = frozenset(
    {"host", "content-length", "transfer-encoding", "connection", "te", "upgrade", "keep-alive", "trailer"}
)
_DEFAULT_HEADERS: Final = {
    ForwardedFormat.XFCC: "x-forwarded-client-cert",
    ForwardedFormat.PEM_URLENCODED: "x-client-cert",
    ForwardedFormat.RFC9440: "client-cert",
}


class PolicyError(ValueError):
    """A policy document is invalid; ``path`` is the offending key path ("" for the document)."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(f"{path}: {message}" if path else message)


class Mode(StrEnum):
    ENFORCE = "enforce"
    REPORT = "report"


@dataclass(frozen=True, slots=True)
class ExemptRule:
    id: str
    path: str | None
    methods: frozenset[str] | None
    hosts: tuple[str, ...] | None  # normalised: lower-case names or "*.domain"
    preflight: bool = False  # a CORS preflight: OPTIONS with Origin and Access-Control-Request-Method


@dataclass(frozen=True, slots=True)
class SanRequirement:
    dns: tuple[str, ...] = ()
    uri: tuple[UriPattern, ...] = ()
    email: tuple[EmailPattern, ...] = ()


@dataclass(frozen=True, slots=True)
class NameRequirement:
    """Per attribute (short name or dotted OID), the accepted values; every attribute must hold."""

    attributes: tuple[tuple[str, frozenset[str]], ...]


@dataclass(frozen=True, slots=True)
class Requirements:
    san: SanRequirement | None = None
    subject: NameRequirement | None = None
    issuer: NameRequirement | None = None
    fingerprints: frozenset[str] | None = None
    ca: TrustBundle | None = None
    crl: RevocationTable | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    status: int = 403
    body: str = "Forbidden\n"
    content_type: str = "text/plain; charset=utf-8"
    expose_reason: bool = False


@dataclass(frozen=True, slots=True)
class ApisixSource:
    type: Literal["apisix"] = "apisix"


@dataclass(frozen=True, slots=True)
class HeaderSource:
    format: ForwardedFormat
    header: str
    chain_header: str | None
    trusted_proxies: tuple[IPNetwork, ...]
    ca: TrustBundle
    type: Literal["header"] = "header"


@dataclass(frozen=True, slots=True)
class Forward:
    subject: str | None = None
    san: str | None = None
    fingerprint: str | None = None
    xfcc: str | None = None

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.subject, self.san, self.fingerprint, self.xfcc) if n is not None)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    mode: Mode = Mode.ENFORCE
    exempt: tuple[ExemptRule, ...] = ()
    require: Requirements = Requirements()
    require_sni_match: bool = True
    reject: Reject = Reject()
    source: ApisixSource | HeaderSource = ApisixSource()
    forward: Forward = Forward()
    name: str | None = None  # the named policy of the policy file this was built from, if any


# -- primitive readers -------------------------------------------------------------------------------


def join_path(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def _type_name(value: object) -> str:
    kinds = {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}
    return kinds.get(type(value), type(value).__name__)


def read_object(value: object, path: str, allowed: frozenset[str]) -> Mapping[str, object]:
    """``value`` as an object whose keys are strings from ``allowed`` (else PolicyError at that key)."""
    if not isinstance(value, Mapping):
        raise PolicyError(path, f"must be an object, not {_type_name(value)}")
    for key in value:
        if not isinstance(key, str):
            raise PolicyError(path, f"keys must be strings, not {_type_name(key)}")
        if key not in allowed:
            raise PolicyError(join_path(path, key), f"unknown key (allowed: {', '.join(sorted(allowed))})")
    return value


def _str(value: object, path: str, *, max_len: int = 256, printable: bool = True) -> str:
    if not isinstance(value, str):
        raise PolicyError(path, f"must be a string, not {_type_name(value)}")
    if not value:
        raise PolicyError(path, "must not be empty")
    if len(value) > max_len:
        raise PolicyError(path, f"longer than {max_len} characters")
    if printable and not _PRINTABLE.match(value):
        raise PolicyError(path, "must be printable ASCII")
    return value


def _bool(value: object, path: str) -> bool:
    if not isinstance(value, bool):
        raise PolicyError(path, f"must be true or false, not {_type_name(value)}")
    return value


def _list(value: object, path: str, item: Callable[[object, str], _T], *, unique: bool = True) -> tuple[_T, ...]:
    if isinstance(value, str | bytes) or not isinstance(value, Sequence):
        raise PolicyError(path, f"must be a list, not {_type_name(value)}")
    if not value:
        raise PolicyError(path, "must not be empty")
    if len(value) > MAX_LIST:
        raise PolicyError(path, f"more than {MAX_LIST} entries")
    out = tuple(item(v, join_path(path, i)) for i, v in enumerate(value))
    if unique:
        seen: set[object] = set()
        for i, v in enumerate(out):
            if isinstance(v, Hashable) and v in seen:
                raise PolicyError(join_path(path, i), "duplicate entry")
            seen.add(v)
    return out


def _opt(m: Mapping[str, object], path: str, key: str, read: Callable[[object, str], _T], default: _D) -> _T | _D:
    """``read`` the optional ``key`` of ``m`` (with its key path), or ``default`` when absent."""
    return read(m[key], join_path(path, key)) if key in m else default


def _parsed(parse: Callable[[str], _T], max_len: int = 512) -> Callable[[object, str], _T]:
    """Adapt a matchers.parse_* function (ValueError) into an item reader (PolicyError with path)."""

    def read(value: object, path: str) -> _T:
        try:
            return parse(_str(value, path, max_len=max_len))
        except ValueError as exc:
            if isinstance(exc, PolicyError):
                raise
            raise PolicyError(path, str(exc)) from None

    return read


def fold_name(name: str) -> str:
    """A (validated, ASCII) header name as CGI-style upstreams read it: codec.fold_header_name."""
    return fold_header_name(name.encode("ascii")).decode("ascii")


def _header_name(value: object, path: str) -> str:
    name = _str(value, path, max_len=128).lower()
    if not _TOKEN.match(name):
        raise PolicyError(path, "not a valid HTTP header name")
    if fold_name(name) in _RESERVED_HEADERS:
        raise PolicyError(path, f"{name!r} is reserved and cannot be used")
    return name


def _trust_bundle(value: object, path: str) -> TrustBundle:
    pem = _str(value, path, max_len=MAX_PEM, printable=False)
    try:
        return TrustBundle.from_pem(pem)
    except CertificateError as exc:
        raise PolicyError(path, f"invalid CA bundle: {exc}") from None


# -- sections ----------------------------------------------------------------------------------------


def _method(value: object, path: str) -> str:
    method = _str(value, path, max_len=16).upper()
    if method not in APISIX_METHODS:
        raise PolicyError(path, f"unknown method {method!r} (allowed: {' '.join(sorted(APISIX_METHODS))})")
    return method


def _regex(value: object, path: str) -> str:
    pattern = _str(value, path, max_len=MAX_PATTERN_LENGTH, printable=False)
    try:
        compile_regex(pattern)
    except ValueError as exc:
        raise PolicyError(path, str(exc)) from None
    return pattern


def _exempt(value: object, path: str) -> tuple[ExemptRule, ...]:
    keys = frozenset({"id", "path", "methods", "hosts", "preflight"})
    items = _list(value, path, lambda v, p: v, unique=False)
    if len(items) > MAX_RULES:
        raise PolicyError(path, f"more than {MAX_RULES} rules")
    rules: list[ExemptRule] = []
    for index, item in enumerate(items):
        at = join_path(path, index)
        m = read_object(item, at, keys)
        preflight = _opt(m, at, "preflight", _bool, False)
        if not (preflight or keys.difference({"id", "preflight"}).intersection(m)):
            raise PolicyError(at, "needs at least one of path, methods, hosts, or preflight: true")
        rule_id = f"exempt[{index}]"
        if "id" in m:
            rule_id = _str(m["id"], join_path(at, "id"), max_len=64)
            if not _ID.match(rule_id):
                raise PolicyError(join_path(at, "id"), "must not start or end with a space")
        if any(r.id == rule_id for r in rules):
            raise PolicyError(join_path(at, "id"), f"duplicate rule id {rule_id!r}")
        methods = _opt(m, at, "methods", lambda v, p: frozenset(_list(v, p, _method)), None)
        if preflight and methods is not None and methods != {"OPTIONS"}:
            raise PolicyError(join_path(at, "methods"), 'a preflight rule applies to OPTIONS only: omit "methods"')
        hosts = _opt(m, at, "hosts", lambda v, p: _list(v, p, _parsed(parse_host_pattern)), None)
        rules.append(ExemptRule(rule_id, _opt(m, at, "path", _regex, None), methods, hosts, preflight))
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
        exact = _list(values, key_path, lambda v, p: _str(v, p, max_len=1024, printable=False))
        attrs.append((label, frozenset(exact)))
    return NameRequirement(tuple(attrs))


def _route_crl(value: object, path: str, ca: TrustBundle | None) -> RevocationTable:
    """require.crl: PEM CRL text (or a list of them), each verified against require.ca right here."""
    if ca is None:
        raise PolicyError(path, "needs require.ca: the route's CRLs are verified against that bundle")
    pem: Callable[[object, str], str] = lambda v, p: _str(v, p, max_len=MAX_PEM, printable=False)  # noqa: E731
    try:
        return route_table(pem(value, path) if isinstance(value, str) else _list(value, path, pem), ca.anchors)
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
            dns=_opt(s, san_path, "dns", lambda v, p: _list(v, p, _parsed(parse_dns_pattern)), ()),
            uri=_opt(s, san_path, "uri", lambda v, p: _list(v, p, _parsed(parse_uri_pattern, 2048)), ()),
            email=_opt(s, san_path, "email", lambda v, p: _list(v, p, _parsed(parse_email_pattern)), ()),
        )
    return Requirements(
        san=san,
        subject=_opt(m, path, "subject", _name_requirement, None),
        issuer=_opt(m, path, "issuer", _name_requirement, None),
        fingerprints=_opt(
            m, path, "fingerprint_sha256", lambda v, p: frozenset(_list(v, p, _parsed(normalize_fingerprint))), None
        ),
        ca=(ca := _opt(m, path, "ca", _trust_bundle, None)),
        crl=_opt(m, path, "crl", lambda v, p: _route_crl(v, p, ca), None),
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
    content_type = _opt(m, path, "content_type", _str, default.content_type)
    return Reject(status, body, content_type, _opt(m, path, "expose_reason", _bool, default.expose_reason))


def _network(value: object, path: str) -> IPNetwork:
    text = _str(value, path, max_len=64)
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
    header = _opt(m, path, "header", _header_name, _DEFAULT_HEADERS[fmt])
    if chain_header is not None and fold_name(header) == fold_name(chain_header):
        raise PolicyError(join_path(path, "chain_header"), "must differ from header")
    return HeaderSource(
        format=fmt,
        header=header,
        chain_header=chain_header,
        trusted_proxies=_list(m["trusted_proxies"], join_path(path, "trusted_proxies"), _network),
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
        exempt=_opt(m, path, "exempt", _exempt, ()),
        require=_opt(m, path, "require", _require, Requirements()),
        require_sni_match=_opt(m, path, "require_sni_match", _bool, True),
        reject=_opt(m, path, "reject", _reject, Reject()),
        source=_opt(m, path, "source", _source, ApisixSource()),
        forward=_opt(m, path, "forward", _forward, Forward()),
        name=name,
    )
