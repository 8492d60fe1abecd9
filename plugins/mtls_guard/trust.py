"""Trust bundles: does a client certificate chain to one of a policy's CA anchors?

Path building is bounded because the intermediates come from the client: at most
``MAX_SUPPLIED_INTERMEDIATES`` are considered and a path holds at most ``MAX_INTERMEDIATES``. Failures
are reported as one :data:`Reason` code, the most telling one found, never as certificate contents.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Literal

from cryptography import x509

from .identity import CertificateError, ClientCertificate, extension_value, load_pem_chain

__all__ = ["MAX_INTERMEDIATES", "MAX_SUPPLIED_INTERMEDIATES", "Reason", "TrustBundle"]

Reason = Literal[
    "untrusted-issuer",
    "bad-signature",
    "expired-chain",
    "not-yet-valid-chain",
    "chain-too-long",
    "not-client-cert",
]
# Failure precedence when no path verifies: a complete cryptographic path that is only out of date is the
# most specific explanation; a name match whose signature fails is more telling than no match at all.
_RANK: dict[Reason, int] = {
    "untrusted-issuer": 0,
    "bad-signature": 1,
    "chain-too-long": 2,
    "not-yet-valid-chain": 3,
    "expired-chain": 3,
}
MAX_INTERMEDIATES = 4  # on the path between leaf and anchor: at most 5 signature hops
MAX_SUPPLIED_INTERMEDIATES = 8  # untrusted input; bounds the path search


def _may_issue(cert: ClientCertificate, intermediates_below: int) -> Reason | None:
    """RFC 5280 s4.2.1.3/s4.2.1.9: keyCertSign (if KeyUsage is present) and pathLenConstraint."""
    try:
        usage = extension_value(cert.certificate, x509.KeyUsage)
        basic = extension_value(cert.certificate, x509.BasicConstraints)
    except Exception:  # noqa: BLE001 - already parsed once at load; treat any surprise as "may not issue"
        return "untrusted-issuer"
    if usage is not None and not usage.key_cert_sign:
        return "untrusted-issuer"
    if basic is not None and basic.path_length is not None and intermediates_below > basic.path_length:
        return "chain-too-long"
    return None


class TrustBundle:
    """A set of trust anchors (roots or intermediates) that client certificates must chain to."""

    def __init__(self, anchors: Sequence[ClientCertificate]) -> None:
        if not anchors:
            raise CertificateError("trust bundle is empty")
        for index, anchor in enumerate(anchors):
            if not anchor.is_ca:
                raise CertificateError(f"trust bundle certificate #{index + 1} is not a CA (BasicConstraints cA)")
        self.anchors = tuple(anchors)
        self.fingerprints = frozenset(a.fingerprint_sha256 for a in anchors)
        self._by_subject: dict[x509.Name, list[ClientCertificate]] = {}
        for anchor in self.anchors:
            self._by_subject.setdefault(anchor.certificate.subject, []).append(anchor)
        # Signature results never change, so they are memoised; bounded, reset when full.
        self._signatures: dict[tuple[str, str], bool] = {}

    @classmethod
    def from_pem(cls, pem: str) -> TrustBundle:
        return cls(load_pem_chain(pem))

    def _signed_by(self, child: ClientCertificate, parent: ClientCertificate) -> bool:
        key = (child.fingerprint_sha256, parent.fingerprint_sha256)
        cached = self._signatures.get(key)
        if cached is None:
            try:
                # Checks issuer == parent subject and the signature itself.
                child.certificate.verify_directly_issued_by(parent.certificate)
                cached = True
            except Exception:  # noqa: BLE001 - any failure (bad sig, odd key type) means "not issued by"
                cached = False
            if len(self._signatures) >= 8192:
                self._signatures.clear()
            self._signatures[key] = cached
        return cached

    def verify(
        self, leaf: ClientCertificate, intermediates: Sequence[ClientCertificate] = (), *, now: datetime
    ) -> Reason | None:
        """None if ``leaf`` chains to an anchor of this bundle at ``now``, else a reason code.

        The leaf's own validity period is NOT checked here (use ``leaf.validity_at``); intermediates
        and the anchor reached must be valid at ``now``. ``intermediates`` are untrusted hints used only
        to build the path. A leaf that is itself a CA, or whose EKU excludes clientAuth, is
        "not-client-cert".
        """
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        if leaf.is_ca or not leaf.client_auth_allowed:
            return "not-client-cert"
        pool: dict[str, ClientCertificate] = {}
        for cert in intermediates:
            if cert.fingerprint_sha256 != leaf.fingerprint_sha256 and cert.is_ca:
                pool.setdefault(cert.fingerprint_sha256, cert)
        if len(pool) > MAX_SUPPLIED_INTERMEDIATES:
            return "chain-too-long"
        best: Reason = "untrusted-issuer"

        def note(reason: Reason) -> None:
            nonlocal best
            if _RANK[reason] > _RANK[best]:
                best = reason

        def dated(cert: ClientCertificate) -> Reason | None:
            state = cert.validity_at(now)
            if state == "valid":
                return None
            return "expired-chain" if state == "expired" else "not-yet-valid-chain"

        def search(current: ClientCertificate, path: tuple[ClientCertificate, ...]) -> bool:
            issuer_name = current.certificate.issuer
            for anchor in self._by_subject.get(issuer_name, ()):
                if not self._signed_by(current, anchor):
                    note("bad-signature")
                    continue
                if (refused := _may_issue(anchor, len(path))) is not None:
                    note(refused)
                    continue
                problem = next((r for c in (*path, anchor) if (r := dated(c)) is not None), None)
                if problem is None:
                    return True
                note(problem)
            for cand in pool.values():
                if cand in path or cand.certificate.subject != issuer_name:
                    continue
                if len(path) >= MAX_INTERMEDIATES:
                    note("chain-too-long")
                    continue
                if not self._signed_by(current, cand):
                    note("bad-signature")
                    continue
                if (refused := _may_issue(cand, len(path))) is not None:
                    note(refused)
                    continue
                if search(cand, (*path, cand)):
                    return True
            return False

        return None if search(leaf, ()) else best
