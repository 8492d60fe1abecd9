"""Client-certificate identity: hostile-input-safe parsing, typed SANs, parsed DNs (trust anchors: ``.trust``).

Everything here treats its input as attacker-controlled (forwarded headers, nginx variables). Parsers raise
only ``CertificateError`` and never put certificate contents into messages, because those messages are
logged. Identity is always taken from parsed fields, never from DN *strings*: DN renderings differ between
nginx, HAProxy, Traefik and Envoy, so policy code compares ``Name.values()`` and typed SAN tuples instead.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Literal, TypeVar
from urllib.parse import unquote_to_bytes

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

# A client chain of a few certificates is ~2-6 KiB of PEM; anything far beyond is abuse, not a certificate.
MAX_INPUT_BYTES = 64 * 1024
# CertificateCache's exact-match tier: entries, and the longest key it keeps (an escaped RSA-4096 PEM
# is ~3 KB), so it holds at most 1024 x 8 KB; keys are found by their last RECENT_TAIL characters.
RECENT_ENTRIES = 1024
RECENT_MAX_KEY = 8192
RECENT_TAIL = 96

IssuerId = tuple[str, bytes]

_SHORT_NAMES: dict[str, str] = {
    "2.5.4.3": "CN",
    "2.5.4.4": "SN",
    "2.5.4.5": "SERIALNUMBER",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.9": "STREET",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "2.5.4.12": "TITLE",
    "2.5.4.17": "POSTALCODE",
    "2.5.4.42": "GN",
    "2.5.4.97": "ORGANIZATIONIDENTIFIER",
    "0.9.2342.19200300.100.1.1": "UID",
    "0.9.2342.19200300.100.1.25": "DC",
    "1.2.840.113549.1.9.1": "EMAILADDRESS",
}
_OID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)+")
# Whole input must be certificate blocks and whitespace: stray text or other PEM types (keys!) are rejected
# rather than skipped, so what we parse is exactly what the sender meant. The classes are disjoint from
# the "-" that follows, so matching is linear.
_PEM_INPUT_RE = re.compile(r"\s*(?:-----BEGIN CERTIFICATE-----[A-Za-z0-9+/=\s]+-----END CERTIFICATE-----\s*)+")
_PEM_BLOCK_RE = re.compile(r"-----BEGIN CERTIFICATE-----([A-Za-z0-9+/=\s]+)-----END CERTIFICATE-----")
_BAD_PERCENT_RE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_RAW_URL_CHARS_RE = re.compile(r"[\x20-\x7e]*")
# ASCII-only lower-casing: str.lower() would fold e.g. KELVIN SIGN (U+212A) into "k".
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


class CertificateError(ValueError):
    """Input is not a usable certificate. The message is fixed text, safe to log."""


def _normalise_attribute(attribute: str) -> str:
    if _OID_RE.fullmatch(attribute):
        return _SHORT_NAMES.get(attribute, attribute)
    return attribute.upper()


def _escape_rfc4514(value: str, *, ascii_only: bool) -> str:
    out: list[str] = []
    last = len(value) - 1
    for i, ch in enumerate(value):
        if ch in ',+"\\<>;=' or (ch == "#" and i == 0) or (ch == " " and i in (0, last)):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F or (ascii_only and ord(ch) > 0x7E):
            # Hex pairs of the UTF-8 encoding (RFC 4514 s2.4): keeps control bytes out of logs and headers.
            out.extend(f"\\{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
        else:
            out.append(ch)
    return "".join(out)


@dataclass(frozen=True, slots=True)
class Name:
    """A distinguished name as (attribute, value) pairs in certificate order.

    ``rdn_sizes`` records how the pairs were grouped into RDNs (empty = one pair per RDN) so that
    multi-valued RDNs render with ``+``; lookups ignore grouping.
    """

    attributes: tuple[tuple[str, str], ...]
    rdn_sizes: tuple[int, ...] = ()

    @classmethod
    def from_x509(cls, name: x509.Name) -> Name:
        attrs: list[tuple[str, str]] = []
        sizes: list[int] = []
        for rdn in name.rdns:
            count = 0
            for attr in rdn:
                oid = attr.oid.dotted_string
                value = attr.value
                text = value if isinstance(value, str) else "#" + bytes(value).hex()
                attrs.append((_SHORT_NAMES.get(oid, oid), text))
                count += 1
            sizes.append(count)
        multi = any(s != 1 for s in sizes)
        return cls(tuple(attrs), tuple(sizes) if multi else ())

    def key(self) -> str:
        """A comparable form of the name: attribute by attribute, whatever ASN.1 string types encode the
        values (a CA may write PrintableString where its certificates copy UTF8String) or how RDNs group."""
        return repr(self.attributes)

    def values(self, attribute: str) -> tuple[str, ...]:
        """All values of ``attribute`` (short name, case-insensitive; or dotted OID) in certificate order."""
        wanted = _normalise_attribute(attribute)
        return tuple(v for a, v in self.attributes if a == wanted)

    def _rdns(self) -> Iterator[tuple[tuple[str, str], ...]]:
        sizes = self.rdn_sizes or (1,) * len(self.attributes)
        pos = 0
        for size in sizes:
            yield self.attributes[pos : pos + size]
            pos += size

    def rfc4514(self, *, ascii_only: bool = False) -> str:
        """RFC 4514 string, last RDN first like nginx's $ssl_client_s_dn. For display, not for matching.

        ``ascii_only`` escapes non-ASCII characters as UTF-8 hex pairs, for use in HTTP header values.
        """
        rdns = ["+".join(f"{a}={_escape_rfc4514(v, ascii_only=ascii_only)}" for a, v in rdn) for rdn in self._rdns()]
        return ",".join(reversed(rdns))


@dataclass(frozen=True, slots=True)
class ClientCertificate:
    """The parsed, immutable view of one certificate that policy decisions are made on."""

    der: bytes = field(repr=False)
    fingerprint_sha256: str
    serial: int
    subject: Name
    issuer: Name
    not_before: datetime
    not_after: datetime
    san_dns: tuple[str, ...]
    san_uri: tuple[str, ...]
    san_email: tuple[str, ...]
    san_ip: tuple[str, ...]
    certificate: x509.Certificate = field(compare=False, repr=False)
    # Added beyond the agreed interface; parsed eagerly so that malformed extensions fail at load time.
    is_ca: bool = False
    extended_key_usage: tuple[str, ...] | None = None  # dotted OIDs; None when the extension is absent
    issuer_id: IssuerId = ("", b"")  # finds the issuer's CRL (revocation); computed once, at parse time

    def validity_at(self, now: datetime) -> Literal["valid", "expired", "not-yet-valid"]:
        """RFC 5280 s4.1.2.5: valid from notBefore through notAfter, both inclusive."""
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        if now < self.not_before:
            return "not-yet-valid"
        if now > self.not_after:
            return "expired"
        return "valid"

    @property
    def client_auth_allowed(self) -> bool:
        """False only when an EKU extension is present without clientAuth (anyExtendedKeyUsage won't do)."""
        eku = self.extended_key_usage
        return eku is None or ExtendedKeyUsageOID.CLIENT_AUTH.dotted_string in eku


_E = TypeVar("_E", bound=x509.ExtensionType)


def extension_value(cert: x509.Certificate, kind: type[_E]) -> _E | None:
    """The value of ``cert``'s extension of type ``kind``, or None when absent."""
    try:
        return cert.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def issuer_id_of(cert: x509.Certificate, issuer: Name | None = None) -> IssuerId:
    """(the issuer's ``Name.key()``, the authority key identifier or b""): where ``cert``'s CRL is found."""
    aki = extension_value(cert, x509.AuthorityKeyIdentifier)
    key_id = aki.key_identifier if aki is not None and aki.key_identifier is not None else b""
    return (issuer or Name.from_x509(cert.issuer)).key(), key_id


def _from_der(der: bytes) -> ClientCertificate:
    # cryptography parses extensions lazily; touch everything here so malformed parts fail now, inside
    # the one place that converts every parser exception into CertificateError.
    try:
        cert = x509.load_der_x509_certificate(der)
        san = extension_value(cert, x509.SubjectAlternativeName)
        basic = extension_value(cert, x509.BasicConstraints)
        eku = extension_value(cert, x509.ExtendedKeyUsage)
        issuer = Name.from_x509(cert.issuer)
        dns = tuple(
            d.translate(_ASCII_LOWER).removesuffix(".") for d in (san.get_values_for_type(x509.DNSName) if san else [])
        )
        return ClientCertificate(
            der=der,
            fingerprint_sha256=hashlib.sha256(der).hexdigest(),
            serial=cert.serial_number,
            subject=Name.from_x509(cert.subject),
            issuer=issuer,
            not_before=cert.not_valid_before_utc,
            not_after=cert.not_valid_after_utc,
            san_dns=dns,
            san_uri=tuple(san.get_values_for_type(x509.UniformResourceIdentifier)) if san else (),
            san_email=tuple(san.get_values_for_type(x509.RFC822Name)) if san else (),
            san_ip=tuple(str(ip) for ip in san.get_values_for_type(x509.IPAddress)) if san else (),
            certificate=cert,
            is_ca=bool(basic and basic.ca),
            extended_key_usage=tuple(o.dotted_string for o in eku) if eku is not None else None,
            issuer_id=issuer_id_of(cert, issuer),
        )
    except Exception:  # noqa: BLE001 - see below
        # Hostile DER can raise many types; all mean "unusable". No chaining: some causes (e.g.
        # UnicodeDecodeError) would carry certificate bytes into logs.
        raise CertificateError("certificate could not be parsed") from None


def _as_bytes(data: object, what: str) -> bytes:
    if isinstance(data, str):
        if len(data) > MAX_INPUT_BYTES:
            raise CertificateError(f"{what} input too large")
        try:
            return data.encode("ascii")
        except UnicodeEncodeError:
            raise CertificateError(f"{what} input is not ASCII") from None
    if isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
        if len(raw) > MAX_INPUT_BYTES:
            raise CertificateError(f"{what} input too large")
        return raw
    raise CertificateError(f"{what} input has the wrong type")


def split_pem(data: str | bytes) -> tuple[str, ...]:
    """The base64 bodies (whitespace removed) of the certificate blocks in ``data``; at least one.

    Bodies are canonical cache keys: two renderings of the same PEM differing only in line breaks map
    to the same key.
    """
    raw = _as_bytes(data, "PEM")
    try:
        text = raw.decode("ascii")
    except UnicodeDecodeError:
        raise CertificateError("PEM input is not ASCII") from None
    if not _PEM_INPUT_RE.fullmatch(text):
        raise CertificateError("input is not a sequence of PEM certificates")
    return tuple("".join(body.split()) for body in _PEM_BLOCK_RE.findall(text))


def _der_from_body(body: str) -> bytes:
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise CertificateError("PEM certificate body is not valid base64") from None


def load_pem_chain(data: str | bytes) -> tuple[ClientCertificate, ...]:
    """One or more PEM certificates, in input order."""
    return tuple(_from_der(_der_from_body(body)) for body in split_pem(data))


def load_pem(data: str | bytes) -> ClientCertificate:
    """Exactly one PEM certificate; several are refused rather than silently taking the first."""
    bodies = split_pem(data)
    if len(bodies) != 1:
        raise CertificateError("expected exactly one PEM certificate")
    return _from_der(_der_from_body(bodies[0]))


def load_der(data: bytes) -> ClientCertificate:
    """One DER certificate (trailing bytes are rejected by the ASN.1 parser)."""
    raw = _as_bytes(data, "DER") if not isinstance(data, str) else b""
    if not raw:
        raise CertificateError("DER input is empty or has the wrong type")
    return _from_der(raw)


def unescape_nginx(value: str) -> str:
    """Decode a URL-encoded PEM ($ssl_client_escaped_cert, Kong, AWS ALB, XFCC Cert=).

    Strict: every ``%`` must start a hex pair, raw characters must be printable ASCII, and the decoded
    bytes must be ASCII. ``+`` is a literal plus (ALB leaves ``+`` unescaped), never a space. Decoding
    happens once; a double-encoded value stays encoded and then fails PEM parsing.
    """
    if not isinstance(value, str):
        raise CertificateError("escaped certificate has the wrong type")
    if len(value) > 3 * MAX_INPUT_BYTES:
        raise CertificateError("escaped certificate too large")
    if _BAD_PERCENT_RE.search(value) or not _RAW_URL_CHARS_RE.fullmatch(value):
        raise CertificateError("escaped certificate is not valid percent-encoding")
    try:
        return unquote_to_bytes(value).decode("ascii")
    except UnicodeDecodeError:
        raise CertificateError("escaped certificate does not decode to ASCII") from None


_Parsed = ClientCertificate | CertificateError


class CertificateCache:
    """Bounded LRU of parse results keyed by input text, including failures.

    Keys are stored as SHA-256 digests so that memory is bounded by entry count, not by the size of
    attacker-chosen input. One cache must be used with one parse function (or with keys that carry a
    prefix naming it): the key alone decides the hit.

    In front of it sits a small exact-match tier for the certificates seen lately: looked up by the
    key's last characters (the end of the certificate's signature) and confirmed by comparing the
    whole key, it spares the SHA-256 of a 1-3 KB PEM on every request (the costliest step of a
    verified request once the certificate is parsed). A tail shared by other keys only means a miss
    there; memory stays bounded (entries x key size, both capped).
    """

    def __init__(self, max_entries: int = 4096) -> None:
        if max_entries < 1:
            raise ValueError("max_entries must be >= 1")
        self.max_entries = max_entries
        self.hits = 0
        self.misses = 0
        # digest -> (result, the key's tail in _recent or "")
        self._entries: OrderedDict[bytes, tuple[_Parsed, str]] = OrderedDict()
        # tail -> (whole key, digest, result): a subset of _entries, dropped with them
        self._recent: dict[str, tuple[str, bytes, _Parsed]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str, parse: Callable[[str], ClientCertificate]) -> ClientCertificate:
        tail = key[-RECENT_TAIL:]
        recent = self._recent.get(tail)
        try:
            if recent is None or recent[0] != key:
                raise KeyError(tail)
            self._entries.move_to_end(recent[1])  # there: an eviction drops its _recent entry
        except KeyError:
            entry = self._lookup(key, tail, parse)
        else:
            self.hits += 1
            entry = recent[2]
        if isinstance(entry, CertificateError):
            # Drop the old traceback: re-raising the same instance would otherwise grow it on every hit.
            raise entry.with_traceback(None)
        return entry

    def _lookup(self, key: str, tail: str, parse: Callable[[str], ClientCertificate]) -> _Parsed:
        digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
        found = self._entries.get(digest)
        if found is not None:
            self.hits += 1
            self._entries.move_to_end(digest)
            entry = found[0]
        else:
            self.misses += 1
            try:
                entry = parse(key)
            except CertificateError as exc:
                entry = exc
            if len(self._entries) >= self.max_entries:
                _, (_, old_tail) = self._entries.popitem(last=False)
                self._recent.pop(old_tail, None)
        if len(key) <= RECENT_MAX_KEY:
            if len(self._recent) >= RECENT_ENTRIES:
                self._recent.clear()
            old = self._recent.get(tail)
            if old is not None and old[1] != digest and old[1] in self._entries:
                self._entries[old[1]] = (old[2], "")  # that entry's tail now names this key
            self._recent[tail] = (key, digest, entry)
            self._entries[digest] = (entry, tail)
        else:
            self._entries[digest] = (entry, "")
        return entry
