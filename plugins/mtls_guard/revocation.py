"""Certificate revocation by CRLs: built once from verified CRLs, looked up in O(1) per certificate.

A ``RevocationTable`` is built at start-up, on a reload, or when a policy with ``require.crl`` compiles;
requests never parse or scan a CRL. Every CRL's signature is verified against a known issuer certificate
first (found by name, the CRL's authority key identifier preferred), so nobody who can only write a file
can revoke, or un-revoke, anything: an unknown issuer, a bad signature or an unusable CRL is an error.

A certificate finds its issuer's CRLs by (issuer name, authority key identifier): the AKI names the
issuer's key, so the CRLs of a CA that changed keys under the same name stay apart. A certificate whose
AKI names no known key of an issuer with that name (or that carries none) is checked against every CRL of
that name, failing closed. A certificate whose issuer has no CRL is not checked.

nginx hands the runner the leaf only, so in APISIX mode the intermediates it verified are never seen.
So that revoking an intermediate still works there, a CA certificate among the known issuers that its
own issuer's CRL lists revokes every certificate its key issued: when every known certificate of that
key is revoked (a CA re-certified with the same key whose old certificate was revoked as superseded keeps
working as long as the new certificate is known). Paths verified by mtls-guard itself (header mode,
``require.ca``) are checked certificate by certificate.

A CRL past its nextUpdate is stale; that is judged per request against a precomputed instant, so a CRL
going stale while the runner runs takes effect without a reload. Stale CRLs deny every certificate of
their issuer (``crl-stale``) unless ``allow_stale`` is set; either way a warning is logged at most once
a minute per CRL.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, NamedTuple, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.x509.oid import NameOID

from .identity import ClientCertificate, IssuerId, Name, extension_value, issuer_id_of
from .reasons import Reason
from .trust import Path

__all__ = [
    "NO_REVOCATION",
    "CrlError",
    "CrlInfo",
    "CrlSource",
    "Outcome",
    "RevocationTable",
    "build_table",
    "first_problem",
]

log = logging.getLogger("mtls_guard.revocation")

STALE_WARNING_INTERVAL: Final = timedelta(minutes=1)
MAX_LABEL: Final = 64
_NEVER: Final = datetime.max.replace(tzinfo=UTC)
_E = TypeVar("_E", bound=x509.ExtensionType)
Outcome = tuple[Reason, str]  # (revoked or crl-stale, detail)
_REVOKED_LEAF: Final = (Reason.REVOKED, "leaf")
_REVOKED_CHAIN: Final = (Reason.REVOKED, "chain")
_REVOKED_ISSUER: Final = (Reason.REVOKED, "issuer-revoked")


class CrlError(ValueError):
    """A CRL (or a file that should hold CRLs) cannot be used; the message names it and says why."""


@dataclass(frozen=True, slots=True)
class CrlSource:
    name: str  # where it came from: a file path (``#2`` for the second CRL of a file) or "require.crl[0]"
    crl: x509.CertificateRevocationList


@dataclass(frozen=True, slots=True)
class CrlInfo:
    """One CRL in use, as reported (metrics, ``mtls-guard check``, logs)."""

    source: str
    issuer: str  # a bounded label: the issuer's CN (printable, at most MAX_LABEL characters) or its key id
    entries: int
    this_update: datetime
    next_update: datetime | None

    @property
    def label(self) -> str:
        """The source without its directory: the ``crl`` metric label and the ``crl-stale`` detail."""
        return _printable(os.path.basename(self.source) or self.source)

    def describe(self, now: datetime) -> str:
        due = "no nextUpdate" if self.next_update is None else f"nextUpdate {self.next_update.isoformat()}"
        stale = " (STALE)" if self.next_update is not None and now >= self.next_update else ""
        return f"{self.source}: issuer {self.issuer!r}, {self.entries} revoked, {due}{stale}"


class _Status(NamedTuple):
    """What one issuer key's CRLs say, merged."""

    revoked: frozenset[int]
    stale_after: datetime  # the earliest nextUpdate of its CRLs
    stale_detail: str  # the label of that CRL
    ca_revoked: bool  # every known certificate of this key is revoked: so is all it issued


_UNCHECKED: Final = _Status(frozenset(), _NEVER, "", False)


def _printable(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text[:MAX_LABEL])


class RevocationTable:
    """Revoked serials by issuer key, from verified CRLs (see the module docstring); nothing in it changes
    once built but the times its stale CRLs were last logged."""

    __slots__ = ("_by_key", "_by_name", "_warned", "active", "allow_stale", "crls")

    def __init__(
        self,
        by_key: dict[IssuerId, _Status],
        by_name: dict[str, _Status],
        crls: tuple[CrlInfo, ...],
        *,
        allow_stale: bool = False,
    ) -> None:
        self._by_key = by_key
        self._by_name = by_name
        self.crls = crls
        self.allow_stale = allow_stale  # the runner's stale_crl option; route tables follow the runner's
        self.active = bool(by_name)  # False: nothing to look up, callers skip the check entirely
        self._warned: dict[str, datetime] = {}  # CRL label -> when its staleness was last logged

    def _status(self, issuer: IssuerId) -> _Status | None:
        status = self._by_key.get(issuer)
        return status if status is not None else self._by_name.get(issuer[0])

    def check_leaf(self, cert: ClientCertificate, now: datetime, allow_stale: bool) -> Outcome | None:
        """None when ``cert`` is not revoked (or its issuer has no CRL), else why it is refused."""
        status = self._status(cert.issuer_id)
        if status is None:
            return None
        if cert.serial in status.revoked:
            return _REVOKED_LEAF
        if status.ca_revoked:
            return _REVOKED_ISSUER
        return self._stale(status, now, allow_stale) if now >= status.stale_after else None

    def check_path(self, path: Path, now: datetime, allow_stale: bool) -> Outcome | None:
        """``check_leaf`` for every certificate of a verified path; a revocation outranks a stale CRL."""
        stale: _Status | None = None
        for position, (issuer, serial) in enumerate(path):
            status = self._status(issuer)
            if status is None:
                continue
            if serial in status.revoked:
                return _REVOKED_CHAIN if position else _REVOKED_LEAF
            if status.ca_revoked:
                return _REVOKED_ISSUER
            if stale is None and now >= status.stale_after:
                stale = status
        return None if stale is None else self._stale(stale, now, allow_stale)

    def _stale(self, status: _Status, now: datetime, allow_stale: bool) -> Outcome | None:
        last = self._warned.get(status.stale_detail)
        if last is None or now - last >= STALE_WARNING_INTERVAL:
            self._warned[status.stale_detail] = now
            log.warning(
                "event=crl_stale crl=%s next_update=%s action=%s",
                status.stale_detail,
                status.stale_after.isoformat(),
                "allow (stale_crl: allow)" if allow_stale else "deny every certificate of its issuer",
            )
        return None if allow_stale else (Reason.CRL_STALE, status.stale_detail)


NO_REVOCATION: Final = RevocationTable({}, {}, ())


def first_problem(a: Outcome | None, b: Outcome | None) -> Outcome | None:
    """The outcome to report from two tables' checks: a revocation before a stale CRL."""
    if a is None or (b is not None and b[0] is Reason.REVOKED):
        return b
    return a


# -- building ------------------------------------------------------------------------------------------


def _key_id(cert: x509.Certificate) -> bytes:
    ski = extension_value(cert, x509.SubjectKeyIdentifier)
    # RFC 5280 s4.2.1.2 method 1 when the CA carries no SKI: what most CAs put in their certificates' AKI.
    return ski.digest if ski is not None else x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest


def _subject_id(cert: x509.Certificate) -> IssuerId:
    return Name.from_x509(cert.subject).key(), _key_id(cert)


def _label(cert: x509.Certificate) -> str:
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return _printable(str(names[-1].value)) if names else _key_id(cert).hex()[:16]


def _crl_extension(crl: x509.CertificateRevocationList, kind: type[_E]) -> _E | None:
    try:
        return crl.extensions.get_extension_for_class(kind).value
    except x509.ExtensionNotFound:
        return None


def _describe_issuer(name: x509.Name) -> str:
    return _printable(name.rfc4514_string()) or "an empty name"


class _Issuers:
    """The known issuer certificates, by name; ``where`` says where they come from (for errors)."""

    def __init__(self, certificates: Iterable[x509.Certificate], where: str) -> None:
        self.where = where
        self.unique = list({c.fingerprint(hashes.SHA256()): c for c in certificates}.values())
        self.by_name: dict[str, list[x509.Certificate]] = {}
        for cert in self.unique:
            self.by_name.setdefault(Name.from_x509(cert.subject).key(), []).append(cert)

    def signer_of(self, source: CrlSource) -> x509.Certificate:
        crl = source.crl
        candidates = self.by_name.get(Name.from_x509(crl.issuer).key(), [])
        if not candidates:
            raise CrlError(
                f"{source.name}: issued by {_describe_issuer(crl.issuer)}, which is none of the known issuer "
                f"certificates (add that CA certificate to {self.where})"
            )
        aki = _crl_extension(crl, x509.AuthorityKeyIdentifier)
        wanted = aki.key_identifier if aki is not None else None
        for cert in sorted(candidates, key=lambda c: wanted is None or _key_id(c) != wanted):
            try:
                valid = crl.is_signature_valid(cert.public_key())  # type: ignore[arg-type]
            except Exception:  # noqa: BLE001 - a key type that cannot sign CRLs did not sign this one
                valid = False
            if not valid:
                continue
            usage = extension_value(cert, x509.KeyUsage)
            if usage is not None and not usage.crl_sign:
                raise CrlError(f"{source.name}: signed by a certificate whose keyUsage lacks cRLSign")
            return cert
        raise CrlError(
            f"{source.name}: its signature does not verify with the certificate of its issuer "
            f"{_describe_issuer(crl.issuer)} (signed by another key, or altered)"
        )


class _Read(NamedTuple):
    info: CrlInfo
    issuer_key: IssuerId
    scope: bytes  # the IssuingDistributionPoint, b"" without: CRLs of one issuer key and scope supersede each other
    order: tuple[int, datetime]  # (CRL number, thisUpdate): the newest of one scope is used
    revoked: frozenset[int]


def _read(source: CrlSource, signer: x509.Certificate) -> _Read:
    """Everything the table needs from one CRL, read once; CrlError for what this module cannot honour."""
    crl = source.crl
    try:
        scope, number = b"", -1
        for ext in crl.extensions:
            value = ext.value
            if isinstance(value, x509.DeltaCRLIndicator):
                raise CrlError(f"{source.name}: a delta CRL; give the complete CRL instead")
            if isinstance(value, x509.IssuingDistributionPoint):
                if value.indirect_crl:
                    raise CrlError(f"{source.name}: an indirect CRL (entries of other issuers) is not supported")
                scope = value.public_bytes()
            elif isinstance(value, x509.CRLNumber):
                number = value.crl_number
            elif ext.critical and isinstance(value, x509.UnrecognizedExtension):
                # RFC 5280 s5.2: a CRL with a critical extension the reader does not know must not be used.
                raise CrlError(f"{source.name}: unsupported critical extension {ext.oid.dotted_string}")
        revoked: set[int] = set()
        for entry in crl:
            for ext in entry.extensions:
                if isinstance(ext.value, x509.CertificateIssuer):
                    raise CrlError(f"{source.name}: an indirect CRL (entries of other issuers) is not supported")
                if ext.critical and isinstance(ext.value, x509.UnrecognizedExtension):
                    raise CrlError(f"{source.name}: unsupported critical entry extension {ext.oid.dotted_string}")
            revoked.add(entry.serial_number)
        this_update, next_update = crl.last_update_utc, crl.next_update_utc
    except CrlError:
        raise
    except Exception:  # noqa: BLE001 - cryptography parses lazily; whatever it chokes on makes the CRL unusable
        raise CrlError(f"{source.name}: the CRL cannot be parsed") from None
    info = CrlInfo(source.name, _label(signer), len(revoked), this_update, next_update)
    return _Read(info, _subject_id(signer), scope, (number, this_update), frozenset(revoked))


def _merge(a: _Status | None, b: _Status) -> _Status:
    if a is None:
        return b
    due = a if a.stale_after <= b.stale_after else b
    return _Status(a.revoked | b.revoked, due.stale_after, due.stale_detail, a.ca_revoked or b.ca_revoked)


def _by_name(by_key: dict[IssuerId, _Status]) -> dict[str, _Status]:
    merged: dict[str, _Status] = {}
    for (name, _), status in by_key.items():
        merged[name] = _merge(merged.get(name), status)
    return merged


def _revoked_ca_keys(known: _Issuers, by_key: dict[IssuerId, _Status]) -> set[IssuerId]:
    """Keys of known CAs whose every known certificate is revoked: listed by their issuer's CRL, or
    issued by such a key (a CA re-certified with the same key keeps working while its new certificate is known)."""
    table = RevocationTable(by_key, _by_name(by_key), ())
    cas = [(_subject_id(c), issuer_id_of(c), c.serial_number) for c in known.unique if c.subject != c.issuer]
    revoked: set[int] = set()
    keys: set[IssuerId] = set()
    while True:
        grown = {
            i
            for i, (_, issuer, serial) in enumerate(cas)
            if i not in revoked and (issuer in keys or serial in (table._status(issuer) or _UNCHECKED).revoked)
        }
        if not grown:
            return keys
        revoked |= grown
        keys = {key for key, _, _ in cas if all(i in revoked for i, (k, _, _) in enumerate(cas) if k == key)}


def build_table(
    sources: Sequence[CrlSource],
    issuers: Iterable[x509.Certificate],
    *,
    allow_stale: bool = False,
    issuers_from: str = "crl_issuer_files",
) -> RevocationTable:
    """The table of ``sources``, each verified against ``issuers`` first (``issuers_from`` names where they
    come from in errors); CrlError names the first unusable CRL."""
    known = _Issuers(issuers, issuers_from)
    newest: dict[tuple[IssuerId, bytes], _Read] = {}
    for source in sources:
        read = _read(source, known.signer_of(source))
        group = (read.issuer_key, read.scope)
        current = newest.get(group)
        if current is None or read.order > current.order:
            newest[group] = read
        older = read if newest[group] is not read else current
        if older is not None:
            log.info("event=crl_superseded crl=%s by=%s", older.info.source, newest[group].info.source)
    by_key: dict[IssuerId, _Status] = {}
    for read in newest.values():
        status = _Status(read.revoked, read.info.next_update or _NEVER, read.info.label, False)
        by_key[read.issuer_key] = _merge(by_key.get(read.issuer_key), status)
    for key in _revoked_ca_keys(known, by_key):
        by_key[key] = by_key.get(key, _UNCHECKED)._replace(ca_revoked=True)
    # Known keys without a CRL of their own, under a name that has CRLs: their certificates are then found
    # by key, not checked against the CRLs of the name's other keys.
    names = {name for name, _ in by_key}
    for cert in known.unique:
        key = _subject_id(cert)
        if key[0] in names:
            by_key.setdefault(key, _UNCHECKED)
    return RevocationTable(by_key, _by_name(by_key), tuple(r.info for r in newest.values()), allow_stale=allow_stale)
