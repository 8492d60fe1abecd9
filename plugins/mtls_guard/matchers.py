"""Pattern parsers and compiled matchers: host names, typed SANs, fingerprints, regexes.

Exemption rules built from them live in :mod:`.exemptions`.

Parsers (``parse_*``) raise ValueError with a short message; the schema prefixes the key path. Compiled
matchers are immutable and do no parsing per request: every lookup is a set membership or a short
tuple scan, and all regular expressions run on RE2 (linear time, whatever the pattern).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final

import re2

__all__ = [
    "APISIX_METHODS",
    "MAX_PATTERN_LENGTH",
    "DomainSet",
    "EmailPattern",
    "SanMatcher",
    "UriPattern",
    "authority_host",
    "compile_regex",
    "normalize_fingerprint",
    "normalize_host",
    "parse_dns_pattern",
    "parse_email_pattern",
    "parse_host_pattern",
    "parse_uri_pattern",
]

# APISIX's route `methods` enum (apisix/schema_def.lua); anything else cannot reach a route anyway.
APISIX_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "MKCOL", "COPY", "MOVE", "OPTIONS"}
    | {"PROPFIND", "PROPPATCH", "LOCK", "UNLOCK", "PATCH", "TRACE"}
)
MAX_PATTERN_LENGTH: Final = 4096
# RE2 refuses to compile a program bigger than its memory budget, which bounds what one route costs.
_PATTERN_MAX_MEM: Final = 2 << 20

_LABEL: Final = re.compile(r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?\Z")
_SCHEME: Final = re.compile(r"[a-z][a-z0-9+.-]*\Z")
_URI_CHARS: Final = re.compile(r"[\x21-\x7e]+\Z")
_HEX64: Final = re.compile(r"[0-9a-f]{64}\Z")


def normalize_host(host: str) -> str:
    """Host names compare case-insensitively and an FQDN's trailing dot is the same name."""
    host = host.lower()
    return host[:-1] if host.endswith(".") else host


def authority_host(value: str | None) -> str | None:
    """The host of a Host header value (``Name:8443``, ``[::1]:443``): normalised, port removed.

    None for an empty or malformed value, which then matches no host rule and no SNI.
    """
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        rest = value[end + 1 :]
        if end < 0 or (rest and not (rest[0] == ":" and rest[1:].isdigit())):
            return None
        return value[: end + 1].lower()
    name, colon, port = value.rpartition(":")
    if colon:
        if not port.isdigit():
            return None
        value = name
    return normalize_host(value) or None


def _hostname(value: str, *, min_labels: int = 1) -> str:
    name = normalize_host(value)
    labels = name.split(".")
    if len(name) > 253 or len(labels) < min_labels or not all(_LABEL.match(label) for label in labels):
        raise ValueError(f"not a valid host name: {value!r}")
    return name


def _wildcard_name(value: str) -> str:
    """Validate a name that may start with one whole-label ``*``; returns it normalised."""
    if "*" not in value:
        return _hostname(value)
    head, sep, rest = value.partition(".")
    if head != "*" or not sep or "*" in rest:
        raise ValueError("wildcard must be a whole label, and only the leftmost one")
    # "*.com" would accept a whole public suffix: require two labels under the wildcard.
    return "*." + _hostname(rest, min_labels=2)


def parse_host_pattern(value: str) -> str:
    """An exempt-rule host: an exact name or ``*.domain`` (exactly one label at the star)."""
    return _wildcard_name(value)


def parse_dns_pattern(value: str) -> str:
    """A DNS SAN pattern: same syntax as a host pattern, case-insensitive."""
    return _wildcard_name(value)


@dataclass(frozen=True, slots=True)
class DomainSet:
    """Exact names plus ``*.parent`` wildcards; a wildcard covers exactly one non-empty label."""

    exact: frozenset[str]
    wildcard_parents: frozenset[str]

    @classmethod
    def of(cls, patterns: Iterable[str]) -> DomainSet:
        exact: set[str] = set()
        parents: set[str] = set()
        for pattern in patterns:
            if pattern.startswith("*."):
                parents.add(pattern[2:])
            else:
                exact.add(pattern)
        return cls(frozenset(exact), frozenset(parents))

    def matches(self, name: str | None) -> bool:
        if not name:
            return False
        name = normalize_host(name)
        if name in self.exact:
            return True
        label, dot, parent = name.partition(".")
        return bool(dot) and bool(label) and parent in self.wildcard_parents


@dataclass(frozen=True, slots=True)
class UriPattern:
    """``scheme://authority/seg/...``; a ``*`` segment matches one non-empty, non-dot segment."""

    scheme: str
    authority: str
    segments: tuple[str, ...]

    def text(self) -> str:
        return f"{self.scheme}://{self.authority}{''.join('/' + s for s in self.segments)}"

    def matches(self, scheme: str, authority: str, segments: tuple[str, ...]) -> bool:
        if scheme != self.scheme or authority != self.authority or len(segments) != len(self.segments):
            return False
        for want, got in zip(self.segments, segments, strict=True):
            if want == "*":
                if got in ("", ".", ".."):
                    return False
            elif want != got:
                return False
        return True


def _split_uri(value: str) -> tuple[str, str, tuple[str, ...]] | None:
    """Split an absolute URI into (lower scheme, lower authority, path segments); None if not of that form."""
    scheme, sep, rest = value.partition("://")
    if not sep or not _URI_CHARS.match(value) or "?" in rest or "#" in rest:
        return None
    authority, slash, path = rest.partition("/")
    scheme = scheme.lower()
    if not authority or not _SCHEME.match(scheme):
        return None
    return scheme, authority.lower(), tuple(path.split("/")) if slash else ()


def parse_uri_pattern(value: str) -> UriPattern:
    """Parse a URI SAN pattern such as ``spiffe://example.org/ns/*/sa/billing``."""
    parts = _split_uri(value)
    if parts is None:
        raise ValueError("must be an absolute URI scheme://authority[/path] without spaces, query or fragment")
    scheme, authority, segments = parts
    if "*" in scheme or "*" in authority:
        raise ValueError("wildcard is not allowed in the scheme or authority")
    if any("*" in s and s != "*" for s in segments):
        raise ValueError("wildcard must be a whole path segment")
    return UriPattern(scheme, authority, segments)


@dataclass(frozen=True, slots=True)
class EmailPattern:
    """``local@domain`` (local part case-sensitive) or ``*@domain`` (any local part)."""

    local: str  # "*" = any
    domain: str

    def text(self) -> str:
        return f"{self.local}@{self.domain}"


def parse_email_pattern(value: str) -> EmailPattern:
    local, at, domain = value.rpartition("@")
    if not at or not local or any(c.isspace() or ord(c) < 0x20 for c in local):
        raise ValueError("must be local@domain or *@domain")
    if "*" in local and local != "*":
        raise ValueError("wildcard must be the whole local part (*@domain)")
    return EmailPattern(local, _hostname(domain))


def normalize_fingerprint(value: str) -> str:
    """SHA-256 pins are written in many styles (``AB:CD:..``, ``abcd..``); compare lower-case hex."""
    digits = value.replace(":", "").lower()
    if not _HEX64.match(digits):
        raise ValueError("must be a SHA-256 fingerprint: 64 hex digits, colons allowed")
    return digits


@dataclass(frozen=True, slots=True)
class SanMatcher:
    """Typed SAN matching: a pattern of one type never looks at SANs of another type (CVE-2022-21656)."""

    dns: DomainSet
    uri: tuple[UriPattern, ...]
    email_exact: frozenset[tuple[str, str]]
    email_domains: frozenset[str]

    @classmethod
    def of(cls, dns: Iterable[str], uri: Iterable[UriPattern], email: Iterable[EmailPattern]) -> SanMatcher:
        emails = tuple(email)
        return cls(
            DomainSet.of(dns),
            tuple(uri),
            frozenset((e.local, e.domain) for e in emails if e.local != "*"),
            frozenset(e.domain for e in emails if e.local == "*"),
        )

    def matches(self, dns: Iterable[str], uri: Iterable[str], email: Iterable[str]) -> bool:
        # The certificate's own names are data, never patterns: a "*" label there is a literal label.
        if any(self.dns.matches(name) for name in dns):
            return True
        if self.uri:
            for value in uri:
                parts = _split_uri(value)
                if parts is not None and any(p.matches(*parts) for p in self.uri):
                    return True
        if self.email_exact or self.email_domains:
            for value in email:
                local, at, domain = value.rpartition("@")
                if not at or not local:
                    continue
                domain = normalize_host(domain)
                if domain in self.email_domains or (local, domain) in self.email_exact:
                    return True
        return False


def compile_regex(pattern: str) -> re2._Regexp[bytes]:
    """Compile one exemption pattern; raises ValueError with RE2's message when it cannot."""
    if len(pattern) > MAX_PATTERN_LENGTH:
        raise ValueError(f"pattern longer than {MAX_PATTERN_LENGTH} characters")
    options = re2.Options()
    options.max_mem = _PATTERN_MAX_MEM
    options.log_errors = False  # the error is reported through PolicyError, not RE2's stderr logging
    try:
        return re2.compile(pattern.encode("utf-8"), options)
    except re2.error as exc:
        reason = exc.args[0] if exc.args else ""
        text = reason.decode("utf-8", "replace") if isinstance(reason, bytes) else str(reason)
        raise ValueError(f"not a valid RE2 regular expression: {text}") from None
