"""Client certificates forwarded in headers by a trusted front proxy (XFCC, URL-encoded PEM, RFC 9440).

Only the certificate bytes are used. Text fields a proxy may add next to them (XFCC Subject/URI/DNS/By,
Kong/ALB subject headers) are attacker-shaped whenever sanitisation fails upstream, and DN strings are not
canonical across producers, so identity is always re-derived from the certificate. Anything ambiguous
(repeated headers, several XFCC elements, duplicate keys) is an error, never "take the first": that is
the multi-valued-header bypass class (Istio CVE-2026-31838). Forwarded certificates carry no trust of
their own; callers must still check them against a ``TrustBundle``.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

from cryptography.hazmat.primitives import serialization

from plugins.mtls_guard.identity import (
    MAX_INPUT_BYTES,
    CertificateCache,
    CertificateError,
    ClientCertificate,
    load_der,
    split_pem,
    unescape_nginx,
)

__all__ = ["ForwardedCertificate", "ForwardedFormat", "build_xfcc", "parse_forwarded"]

# Cert + Chain URL-encoded (up to 3x expansion each) plus small text fields.
MAX_HEADER_CHARS = 8 * MAX_INPUT_BYTES
# Leaf plus intermediates; real chains have 1-3. Bounds parse work per request.
MAX_CERTIFICATES = 10

_OWS = " \t"
_XFCC_KEY_RE = re.compile(r"[ \t]*([A-Za-z][A-Za-z0-9_-]*)=")
# Quoted strings: possessive quantifiers (Python 3.11+) never backtrack, so an unterminated quote
# fails in linear time, and runs of plain characters are consumed in one step (6x faster).
_XFCC_QUOTED_RE = re.compile(r'"((?:[^"\\]++|\\.)*+)"', re.DOTALL)
_XFCC_BARE_RE = re.compile(r'[^,;"\\ \t]*')
_XFCC_UNESCAPE_RE = re.compile(r"\\(.)", re.DOTALL)
_XFCC_SEPARATOR_RE = re.compile(r"[ \t]*([,;]|\Z)")
_XFCC_SINGLE_KEYS = frozenset({"hash", "cert", "chain"})
_XFCC_BARE_SAFE_RE = re.compile(r'[^,;"\\\s]+')
_PRINTABLE_RE = re.compile(r"[\x20-\x7e]*")
# RFC 8941 s3.3.5 sf-binary: ":" base64 ":" (no parameters accepted: RFC 9440 defines none).
_SF_BINARY_RE = re.compile(r":([A-Za-z0-9+/]*={0,2}):")
_HEX64_RE = re.compile(r"[0-9a-fA-F]{64}")
# Same output as quote(safe="") / nginx's $ssl_client_escaped_cert for ASCII, ~5x faster than quote().
_URL_ESCAPE = {c: f"%{c:02X}" for c in range(128) if not (chr(c).isalnum() or chr(c) in "-._~")}
_DER_KEY = "b64der:"  # cache-key namespace: canonical base64 of a DER certificate


class ForwardedFormat(StrEnum):
    XFCC = "xfcc"
    PEM_URLENCODED = "pem-urlencoded"
    RFC9440 = "rfc9440"


@dataclass(frozen=True, slots=True)
class ForwardedCertificate:
    leaf: ClientCertificate
    chain: tuple[ClientCertificate, ...]  # untrusted intermediates: path-building hints only


def _parse_b64_der(key: str) -> ClientCertificate:
    try:
        der = base64.b64decode(key.removeprefix(_DER_KEY), validate=True)
    except (binascii.Error, ValueError):
        raise CertificateError("certificate base64 is invalid") from None
    return load_der(der)


def _load_bodies(bodies: Sequence[str], cache: CertificateCache | None) -> list[ClientCertificate]:
    """Parse canonical base64 DER bodies, through the cache when given (same key for PEM and RFC 9440)."""
    if len(bodies) > MAX_CERTIFICATES:
        raise CertificateError("too many forwarded certificates")
    if cache is None:
        return [_parse_b64_der(body) for body in bodies]
    return [cache.get(_DER_KEY + body, _parse_b64_der) for body in bodies]


def _single(values: Sequence[str], what: str) -> str | None:
    if isinstance(values, str):
        # A bare string is a programming error that would otherwise be iterated per character.
        raise TypeError("values must be a sequence of header values, not a string")
    if not values:
        return None
    if len(values) > 1:
        raise CertificateError(f"{what} header repeated")
    value = values[0]
    if not isinstance(value, str) or len(value) > MAX_HEADER_CHARS:
        raise CertificateError(f"{what} header is too large or not text")
    if not value.strip(_OWS):
        raise CertificateError(f"{what} header is empty")
    return value


# -- XFCC ---------------------------------------------------------------------------------------------


def _xfcc_elements(value: str) -> list[list[tuple[str, str]]]:
    """Split an XFCC value into elements of (lower-cased key, unescaped value) pairs, strictly."""
    elements: list[list[tuple[str, str]]] = []
    pairs: list[tuple[str, str]] = []
    pos = 0
    while True:
        key = _XFCC_KEY_RE.match(value, pos)
        if key is None:
            raise CertificateError("XFCC syntax error: expected key=value")
        pos = key.end()
        quoted = _XFCC_QUOTED_RE.match(value, pos)
        if quoted is not None:
            text = quoted.group(1)
            if "\\" in text:
                text = _XFCC_UNESCAPE_RE.sub(r"\1", text)
            pos = quoted.end()
        else:
            bare = _XFCC_BARE_RE.match(value, pos)
            assert bare is not None  # the pattern matches the empty string
            text = bare.group()
            pos = bare.end()
        pairs.append((key.group(1).lower(), text))
        sep = _XFCC_SEPARATOR_RE.match(value, pos)
        if sep is None:
            raise CertificateError("XFCC syntax error: bad quoting or separator")
        pos = sep.end()
        if sep.group(1) != ";":
            elements.append(pairs)
            pairs = []
        if sep.group(1) == "":
            return elements


def _parse_xfcc(value: str, cache: CertificateCache | None) -> ForwardedCertificate:
    elements = _xfcc_elements(value)
    if len(elements) != 1:
        # Several elements = several hops/clients; choosing one is exactly the ambiguity attackers use.
        raise CertificateError("XFCC header has more than one element")
    fields: dict[str, str] = {}
    for key, text in elements[0]:
        if key in _XFCC_SINGLE_KEYS:
            if key in fields:
                raise CertificateError("XFCC element repeats a Hash, Cert or Chain key")
            fields[key] = text
    if "cert" not in fields:
        raise CertificateError("XFCC element has no Cert")
    leaf_bodies = split_pem(unescape_nginx(fields["cert"]))
    if len(leaf_bodies) != 1:
        raise CertificateError("XFCC Cert must hold exactly one certificate")
    (leaf,) = _load_bodies(leaf_bodies, cache)
    expected = fields.get("hash")
    if expected is not None and (not _HEX64_RE.fullmatch(expected) or expected.lower() != leaf.fingerprint_sha256):
        raise CertificateError("XFCC Hash does not match Cert")
    chain: tuple[ClientCertificate, ...] = ()
    if "chain" in fields:
        certs = _load_bodies(split_pem(unescape_nginx(fields["chain"])), cache)
        if leaf not in certs:
            raise CertificateError("XFCC Chain does not contain Cert")
        chain = tuple(c for c in certs if c != leaf)
    return ForwardedCertificate(leaf=leaf, chain=chain)


def _xfcc_value(text: str) -> str:
    if _XFCC_BARE_SAFE_RE.fullmatch(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def build_xfcc(cert: ClientCertificate, *, by: str | None = None) -> str:
    """An Envoy-style XFCC element for ``cert``, safe to place in an HTTP header (printable ASCII only).

    SAN values that are not printable ASCII are left out (IA5String allows control characters, which
    would otherwise inject into the header); receivers must use Cert for identity anyway.
    """
    if by is not None and not (by and _PRINTABLE_RE.fullmatch(by)):
        raise ValueError("by must be non-empty printable ASCII")
    pem = cert.certificate.public_bytes(serialization.Encoding.PEM).decode("ascii")
    parts = [f"By={_xfcc_value(by)}"] if by is not None else []
    parts.append(f"Hash={cert.fingerprint_sha256}")
    parts.append(f'Cert="{pem.translate(_URL_ESCAPE)}"')
    # Envoy always quotes Subject.
    subject = cert.subject.rfc4514(ascii_only=True)
    parts.append('Subject="' + subject.replace("\\", "\\\\").replace('"', '\\"') + '"')
    parts.extend(f"URI={_xfcc_value(u)}" for u in cert.san_uri if u and _PRINTABLE_RE.fullmatch(u))
    parts.extend(f"DNS={_xfcc_value(d)}" for d in cert.san_dns if d and _PRINTABLE_RE.fullmatch(d))
    return ";".join(parts)


# -- URL-encoded PEM and RFC 9440 ---------------------------------------------------------------------


def _parse_pem_urlencoded(
    value: str, chain_values: Sequence[str], cache: CertificateCache | None
) -> ForwardedCertificate:
    # AWS ALB appends the chain to the leaf in the same value; nginx/Kong send the leaf only.
    bodies = list(split_pem(unescape_nginx(value)))
    for extra in chain_values:
        bodies.extend(split_pem(unescape_nginx(extra)))
    leaf, *chain = _load_bodies(bodies, cache)
    return ForwardedCertificate(leaf=leaf, chain=tuple(c for c in chain if c != leaf))


def _sf_binary(item: str) -> str:
    """Canonical (padded) base64 of one RFC 8941 byte sequence; missing padding is tolerated (s4.2.7)."""
    match = _SF_BINARY_RE.fullmatch(item.strip(_OWS))
    if match is None:
        raise CertificateError("RFC 9440 value is not a structured-field byte sequence")
    body = match.group(1)
    bare = body.rstrip("=")
    canonical = bare + "=" * (-len(bare) % 4)
    if not bare or len(bare) % 4 == 1 or body not in (bare, canonical):
        raise CertificateError("RFC 9440 byte sequence has invalid base64 length or padding")
    return canonical


def _parse_rfc9440(value: str, chain_values: Sequence[str], cache: CertificateCache | None) -> ForwardedCertificate:
    bodies = [_sf_binary(value)]
    # Client-Cert-Chain is an sf-list; several field lines combine into one list (RFC 9110 s5.3).
    joined = ",".join(chain_values)
    if joined.strip(_OWS):
        bodies.extend(_sf_binary(member) for member in joined.split(","))
    leaf, *chain = _load_bodies(bodies, cache)
    return ForwardedCertificate(leaf=leaf, chain=tuple(c for c in chain if c != leaf))


def parse_forwarded(
    fmt: ForwardedFormat,
    values: Sequence[str],
    chain_values: Sequence[str] = (),
    cache: CertificateCache | None = None,
) -> ForwardedCertificate | None:
    """The forwarded client certificate, None when the header is absent, CertificateError when unusable.

    ``values``/``chain_values`` are all occurrences of the configured certificate/chain headers. An
    empty header value is an error, not "absent": a proxy that sets the header always means something.
    XFCC carries its chain inside the element, so a separate chain header is refused for XFCC.
    """
    if isinstance(chain_values, str):
        raise TypeError("chain_values must be a sequence of header values, not a string")
    if any(not isinstance(v, str) for v in chain_values) or sum(map(len, chain_values)) > MAX_HEADER_CHARS:
        raise CertificateError("chain header is too large or not text")
    value = _single(values, "certificate")
    if value is None:
        return None
    if fmt is ForwardedFormat.XFCC:
        if chain_values:
            raise CertificateError("a separate chain header is not used with XFCC")
        return _parse_xfcc(value, cache)
    if fmt is ForwardedFormat.PEM_URLENCODED:
        return _parse_pem_urlencoded(value, chain_values, cache)
    if fmt is ForwardedFormat.RFC9440:
        return _parse_rfc9440(value, chain_values, cache)
    raise ValueError(f"unknown forwarded format {fmt!r}")
