"""Trust bundles: does a client certificate chain to one of a policy's CA anchors?

Paths are validated by ``cryptography.x509.verification`` under the profile of :mod:`.trust_profile`,
which also holds the checks a bundle passes when it is built. Two gaps of the verifier are closed here,
failing closed: it never applies name constraints to the subject DN, which policies can match, so a leaf
without a SAN under a name-constrained CA is refused, and so is any path through a CA with directoryName
constraints.

A bundle certificate issued by another one of the same bundle is an intermediate, not an anchor, so that
its issuer's constraints (pathLen, name constraints) apply to it; the others anchor paths, including
intermediates whose issuer is not in the bundle (partial chains). Certificates the verifier would refuse
as CAs are rejected at construction, so a policy with such a bundle fails to compile, not every request.

The leaf's own validity is the caller's check; as the verifier applies one time to the whole path, a leaf
outside its period is validated at the nearest instant inside it, with the rest of the path also valid now.
Client-supplied intermediates are untrusted: at most ``MAX_SUPPLIED_INTERMEDIATES`` are passed on and a
path holds at most ``MAX_INTERMEDIATES``. Results are memoised per (leaf, supplied chain) with the span of
time over which they are certain to hold: a cold ``verify`` costs ~150-300 us (one ECDSA check per hop), a
warm one ~1 us. Failures come back as one short :data:`Reason` code, never as certificate contents (the
verifier's messages quote them, so they are only matched, never passed on).
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Literal, TypeVar

from cryptography import x509
from cryptography.x509.verification import Store, VerificationError

from .identity import CertificateError, ClientCertificate, IssuerId, extension_value, issuer_id_of, load_pem_chain
from .trust_profile import (
    MAX_INTERMEDIATES,
    SIGNATURE_ALGORITHMS,
    anchor_depths,
    bundle_problem,
    has_directory_names,
    verifier_builder,
)

__all__ = ["MAX_SUPPLIED_INTERMEDIATES", "Path", "Reason", "TrustBundle"]

Reason = Literal[
    "untrusted-issuer",
    "bad-signature",
    "expired-chain",
    "not-yet-valid-chain",
    "chain-too-long",  # also a pathLenConstraint violation: the path is too long for that CA
    "not-client-cert",
    "name-constraints",
]
MAX_SUPPLIED_INTERMEDIATES = 8  # untrusted input; bounds the path search
CACHE_ENTRIES = 4096  # verified (leaf, chain) pairs, LRU
FAILURE_CACHE_ENTRIES = 1024  # kept apart so that a flood of bad chains cannot evict good ones

_SECOND = timedelta(seconds=1)
_EARLIEST = datetime.min.replace(tzinfo=UTC)
_LATEST = datetime.max.replace(tzinfo=UTC)
_Entry = TypeVar("_Entry")
# A verified path as revocation needs it: (issuer id, serial) of every certificate on it, leaf first,
# except a self-issued anchor (nothing above it can revoke it).
Path = tuple[tuple[IssuerId, int], ...]


def _until(not_after: datetime) -> datetime:
    # The verifier compares whole seconds (notAfter 12:00:00 still holds at 12:00:00.9), so validity is the
    # half-open [notBefore, notAfter + 1s) everywhere here; 9999-12-31T23:59:59 means "no expiry".
    return not_after + _SECOND if not_after < _LATEST - _SECOND else _LATEST


# -- request-time helpers --------------------------------------------------------------------------------


def _names_unchecked(leaf: ClientCertificate, chain: Sequence[x509.Certificate]) -> bool:
    """Whether the path carries name constraints the verifier passed over (see the module docstring)."""
    has_san = extension_value(leaf.certificate, x509.SubjectAlternativeName) is not None
    for cert in chain:
        constraints = extension_value(cert, x509.NameConstraints)
        if constraints is not None and (not has_san or has_directory_names(constraints)):
            return True
    return False


def _explain(message: str) -> Reason | None:
    """Reason code for a VerificationError message; None means "a validity period" (the caller dates it).

    Texts of cryptography 51 relied on (src/rust/cryptography-x509-verification): "... name constraint ...",
    "nameConstraints ...", "cert is not valid at validation time", "signature does not match", "chain
    construction exceeds max depth", "path length constraint violated", and the leaf profile's "... EE ..."
    plus :mod:`.trust_profile`'s "without clientAuth". Anything else is "untrusted-issuer". The message
    quotes the certificate it stopped at after " (encountered processing"; that part is cut off before matching.
    """
    text = message.partition(" (encountered processing")[0]
    if "name constraint" in text or "nameConstraints" in text:
        return "name-constraints"
    if "not valid at validation time" in text:
        return None
    if "signature does not match" in text:
        return "bad-signature"
    if "exceeds max depth" in text or "path length constraint" in text:
        return "chain-too-long"
    if "EE " in text or "without clientAuth" in text:
        return "not-client-cert"
    return "untrusted-issuer"


def _remember(
    cache: OrderedDict[tuple[str, tuple[str, ...]], _Entry], key: tuple[str, tuple[str, ...]], entry: _Entry, bound: int
) -> None:
    cache[key] = entry
    cache.move_to_end(key)
    if len(cache) > bound:
        cache.popitem(last=False)


class TrustBundle:
    """A set of trust anchors (roots or intermediates) that client certificates must chain to."""

    def __init__(self, anchors: Sequence[ClientCertificate]) -> None:
        if not anchors:
            raise CertificateError("trust bundle is empty")
        for index, anchor in enumerate(anchors, 1):
            if (problem := bundle_problem(anchor)) is not None:
                raise CertificateError(f"trust bundle certificate #{index} {problem}")
        self.anchors = tuple(anchors)
        self.fingerprints = frozenset(a.fingerprint_sha256 for a in anchors)
        unique = list({a.fingerprint_sha256: a for a in anchors}.values())
        depth = anchor_depths(unique)
        for c, cert in enumerate(unique):
            where = f"trust bundle certificate #{self.anchors.index(cert) + 1}"
            if c not in depth:
                raise CertificateError(f"{where} is only issued by bundle CAs that it issues itself")
            if depth[c] > MAX_INTERMEDIATES:
                raise CertificateError(f"{where} is more than {MAX_INTERMEDIATES} CAs below its root")
            if depth[c] and cert.certificate.signature_algorithm_oid not in SIGNATURE_ALGORITHMS:
                raise CertificateError(f"{where} is signed with an algorithm the verifier refuses")
        roots = [c for c, level in depth.items() if level == 0]
        self._builder = verifier_builder(Store([unique[c].certificate for c in roots]))
        self._inner = [cert.certificate for c, cert in enumerate(unique) if depth.get(c)]
        self._by_subject: dict[x509.Name, list[ClientCertificate]] = {}
        for cert in unique:
            self._by_subject.setdefault(cert.certificate.subject, []).append(cert)
        # Every instant at which some bundle certificate's validity changes: results hold between two.
        self._edges = sorted({t for cert in unique for t in (cert.not_before, _until(cert.not_after))})
        self._passed: OrderedDict[tuple[str, tuple[str, ...]], tuple[datetime, datetime, Path]] = OrderedDict()
        self._failed: OrderedDict[tuple[str, tuple[str, ...]], tuple[Reason, datetime, datetime]] = OrderedDict()

    @classmethod
    def from_pem(cls, pem: str) -> TrustBundle:
        return cls(load_pem_chain(pem))

    def verify(
        self, leaf: ClientCertificate, intermediates: Sequence[ClientCertificate] = (), *, now: datetime
    ) -> Reason | None:
        """``verify_path`` without the path."""
        return self.verify_path(leaf, intermediates, now=now)[0]

    def verify_path(
        self, leaf: ClientCertificate, intermediates: Sequence[ClientCertificate] = (), *, now: datetime
    ) -> tuple[Reason | None, Path]:
        """(None, the verified path) if ``leaf`` chains to an anchor of this bundle at ``now``, else a reason code.

        The leaf's own validity period is NOT checked here (use ``leaf.validity_at``); the rest of the path
        must be valid at ``now``. ``intermediates`` are untrusted hints used only to build the path. A leaf
        that is itself a CA, or whose EKU excludes clientAuth, is "not-client-cert". The path is remembered
        with the result, never revocation: callers check it against the current CRLs on every request.
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        # The verifier refuses these too; checked first so that the code does not depend on its messages.
        if leaf.is_ca or not leaf.client_auth_allowed:
            return "not-client-cert", ()
        key = (leaf.fingerprint_sha256, tuple(c.fingerprint_sha256 for c in intermediates) if intermediates else ())
        passed = self._passed.get(key)
        if passed is not None and passed[0] <= now < passed[1]:
            self._passed.move_to_end(key)
            return None, passed[2]
        failed = self._failed.get(key)
        if failed is not None and failed[1] <= now < failed[2]:
            self._failed.move_to_end(key)
            return failed[0], ()
        supplied: dict[str, ClientCertificate] = {}
        for cert in intermediates:
            # Only CAs can issue, and a self-issued certificate is a root: roots come from the bundle (a supplied
            # one would only send the verifier round in a loop until the depth bound).
            if cert.is_ca and cert.subject != cert.issuer and cert.fingerprint_sha256 not in self.fingerprints:
                supplied.setdefault(cert.fingerprint_sha256, cert)
        if len(supplied) > MAX_SUPPLIED_INTERMEDIATES:
            return "chain-too-long", ()
        reason, start, end, path = self._validate(leaf, list(supplied.values()), now)
        if reason is None:
            _remember(self._passed, key, (start, end, path), CACHE_ENTRIES)
            self._failed.pop(key, None)
        else:
            _remember(self._failed, key, (reason, start, end), FAILURE_CACHE_ENTRIES)
            self._passed.pop(key, None)
        return reason, path

    def _validate(
        self, leaf: ClientCertificate, supplied: list[ClientCertificate], now: datetime
    ) -> tuple[Reason | None, datetime, datetime, Path]:
        """The result, a span around ``now`` over which it is certain to be the same, and the path."""
        start, end = leaf.not_before, _until(leaf.not_after)
        # The verifier applies one time to every certificate, the leaf included. Outside the leaf's period
        # the path is validated at the nearest instant inside it and the rest of the path again at now.
        inside = start <= now < end
        at = now if inside else (start if now < start else leaf.not_after)
        try:
            verified = (
                self._builder.time(at)
                .build_client_verifier()
                .verify(leaf.certificate, [*self._inner, *(c.certificate for c in supplied)])
            )
        except VerificationError as exc:
            reason = _explain(str(exc))
            return reason or self._dated(leaf, supplied, at), *self._span(leaf, supplied, now), ()
        chain = verified.chain[1:]
        valid_from = max(c.not_valid_before_utc for c in chain)
        valid_until = min(_until(c.not_valid_after_utc) for c in chain)
        if now >= valid_until:
            return "expired-chain", *self._span(leaf, supplied, now), ()
        if now < valid_from:
            return "not-yet-valid-chain", *self._span(leaf, supplied, now), ()
        if _names_unchecked(leaf, chain):
            return "name-constraints", *self._span(leaf, supplied, now), ()
        above = ((issuer_id_of(c), c.serial_number) for c in chain if c.subject != c.issuer)
        path = ((leaf.issuer_id, leaf.serial), *above)
        if inside:
            # Signatures and constraints do not change with time: this path stays good while it is in date.
            return None, max(valid_from, start), min(valid_until, end), path
        return None, *self._span(leaf, supplied, now), path

    def _span(
        self, leaf: ClientCertificate, supplied: list[ClientCertificate], now: datetime
    ) -> tuple[datetime, datetime]:
        """The longest span around ``now`` in which no certificate the verifier may use changes validity.

        Within it every validity comparison comes out the same, so the verifier does too: that makes a
        remembered failure exact rather than a guess about which certificate was to blame.
        """
        index = bisect.bisect_right(self._edges, now)
        low = self._edges[index - 1] if index else _EARLIEST
        high = self._edges[index] if index < len(self._edges) else _LATEST
        for cert in (leaf, *supplied):
            for edge in (cert.not_before, _until(cert.not_after)):
                if edge <= now:
                    low = max(low, edge)
                else:
                    high = min(high, edge)
        return low, high

    def _dated(self, leaf: ClientCertificate, supplied: list[ClientCertificate], at: datetime) -> Reason:
        """Which validity problem stopped the path: the verifier's message does not say which certificate."""
        expired = future = False
        seen: set[x509.Name] = set()
        todo = [leaf.certificate.issuer]
        while todo:
            name = todo.pop()
            if name in seen:
                continue
            seen.add(name)
            candidates = [*self._by_subject.get(name, ()), *(c for c in supplied if c.certificate.subject == name)]
            for cert in candidates:
                expired = expired or at >= _until(cert.not_after)
                future = future or at < cert.not_before
                todo.append(cert.certificate.issuer)
        if expired:
            return "expired-chain"
        return "not-yet-valid-chain" if future else "untrusted-issuer"
