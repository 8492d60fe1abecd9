"""``explain --client-ca``: nginx's ``$ssl_client_verify`` for a client chain, computed with the project's verifier.

nginx checks the chain a client presents against ``ssl_client_certificate`` (APISIX: the SSL object's
``client.ca``) with OpenSSL, and exposes the result as ``SUCCESS`` or ``FAILED:<OpenSSL's reason>``.
The verdict here comes from :class:`trust.TrustBundle` (RFC 5280 path validation, client profile),
adjusted where its semantics are not nginx's:

* nginx does not set X509_V_FLAG_PARTIAL_CHAIN, so OpenSSL anchors only on self-signed roots of the CA
  file (the file's other certificates serve as trusted intermediates; one without its root there
  anchors nothing), whereas a TrustBundle anchors on any certificate no other one of it issued;
* the leaf's own validity period, which TrustBundle leaves to its caller;
* ``client.depth`` (ssl_verify_depth, default 1): the most intermediates between leaf and root.

Reasons are OpenSSL 3's texts (X509_verify_cert_error_string), picked the way X509_verify_cert reports
them: path building first (issuer lookup by name and key identifier, trusted certificates first), then
the checks along the path. tests/unit/test_commands.py compares the verdicts with ``openssl verify``.
Where the verifiers themselves differ (OpenSSL accepts a CA certificate as the client's, RSA keys
under 2048 bits, ...) so can the verdict: explain states that assumption.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final

from cryptography import x509

from ..identity import ClientCertificate, extension_value
from ..trust import Reason, TrustBundle
from ..trust_profile import issued_by

__all__ = ["DEFAULT_DEPTH", "ClientVerification", "client_verify"]

DEFAULT_DEPTH: Final = 1  # APISIX's client.depth default, as nginx's ssl_verify_depth

OPENSSL_REASONS: Final[dict[Reason, str]] = {
    "untrusted-issuer": "unable to get local issuer certificate",
    "bad-signature": "certificate signature failure",
    "expired-chain": "certificate has expired",
    "not-yet-valid-chain": "certificate is not yet valid",
    # TrustBundle's own bound (trust.MAX_INTERMEDIATES) is rarely what stops a path; pathLenConstraint is.
    "chain-too-long": "path length constraint exceeded",
    "not-client-cert": "unsuitable certificate purpose",
    "name-constraints": "permitted subtree violation",
}
_DATED: Final = frozenset({"expired-chain", "not-yet-valid-chain"})
_LEAF_VALIDITY: Final = {"expired": "certificate has expired", "not-yet-valid": "certificate is not yet valid"}


@dataclass(frozen=True, slots=True)
class ClientVerification:
    verify: str  # the $ssl_client_verify value: SUCCESS or FAILED:<reason>
    reason: str | None  # the trust code's reason code (or the leaf's validity), None on success
    unanchored: tuple[int, ...]  # 1-based positions in the CA file of certificates without a root there


def _self_issued(cert: ClientCertificate) -> bool:
    return cert.certificate.subject == cert.certificate.issuer


def _rooted(bundle: Sequence[ClientCertificate]) -> list[int]:
    """Positions of the certificates that chain, inside ``bundle``, to a self-issued root of it."""
    rooted = [i for i, cert in enumerate(bundle) if _self_issued(cert)]
    rest = [i for i in range(len(bundle)) if i not in rooted]
    grown = True
    while grown:
        found = [i for i in rest if any(issued_by(bundle[i], bundle[p]) for p in rooted)]
        rooted += found
        rest = [i for i in rest if i not in found]
        grown = bool(found)
    return sorted(rooted)


def _key_ids_match(child: ClientCertificate, parent: ClientCertificate) -> bool:
    aki = extension_value(child.certificate, x509.AuthorityKeyIdentifier)
    ski = extension_value(parent.certificate, x509.SubjectKeyIdentifier)
    return aki is None or aki.key_identifier is None or ski is None or aki.key_identifier == ski.digest


def _candidate(cert: ClientCertificate, pool: Sequence[ClientCertificate]) -> ClientCertificate | None:
    # X509_check_issued: the issuer name, and the key identifiers when both are there (not the signature).
    subject = cert.certificate.issuer
    return next((c for c in pool if c.certificate.subject == subject and _key_ids_match(cert, c)), None)


def _openssl_path(
    leaf: ClientCertificate, supplied: Sequence[ClientCertificate], client_ca: Sequence[ClientCertificate]
) -> tuple[str | None, int]:
    """How OpenSSL's build_chain fares from ``leaf``: (its reason when no path reaches a self-signed
    certificate of the CA file, else None; the certificates above the leaf that count against the verify
    depth). Issuers are looked up as it does, trusted ones first, without its backtracking."""
    trusted = {c.fingerprint_sha256 for c in client_ca}
    current, top_trusted = leaf, leaf.fingerprint_sha256 in trusted
    path = [leaf]
    while not _self_issued(current):
        issuer = _candidate(current, client_ca)
        from_store = issuer is not None
        issuer = issuer or _candidate(current, supplied)
        if issuer is None or issuer in path:
            # X509_V_ERR_UNABLE_TO_GET_ISSUER_CERT when the chain already reached the CA file, else _LOCALLY.
            gap = "unable to get issuer certificate" if top_trusted else "unable to get local issuer certificate"
            return gap, len(path) - 1
        path.append(issuer)
        current, top_trusted = issuer, from_store or issuer.fingerprint_sha256 in trusted
    if top_trusted:
        # A trusted self-signed top is the anchor, the one certificate the depth does not count.
        return None, max(len(path) - 2, 0)
    reason = "self-signed certificate" if current is leaf else "self-signed certificate in certificate chain"
    return reason, len(path) - 1


def client_verify(
    chain: Sequence[ClientCertificate],
    client_ca: Sequence[ClientCertificate],
    *,
    now: datetime,
    depth: int = DEFAULT_DEPTH,
) -> ClientVerification:
    """``$ssl_client_verify`` for ``chain`` (leaf first, as the client sends it) against ``client_ca``.

    ``depth`` is APISIX's ``client.depth`` (nginx's ssl_verify_depth): the most intermediates a path may hold.

    CertificateError when the CA file holds a certificate the verifier cannot use as a CA (the message
    numbers it in file order).
    """
    if not chain:
        raise ValueError("no client certificate to verify")
    whole = TrustBundle(client_ca)  # refuses unusable CA certificates, numbered as in the file
    rooted = _rooted(client_ca)
    unanchored = tuple(i + 1 for i in range(len(client_ca)) if i not in rooted)
    leaf, supplied = chain[0], chain[1:]
    reason: Reason | None = "untrusted-issuer"
    if rooted:
        bundle = TrustBundle([client_ca[i] for i in rooted]) if unanchored else whole
        reason = bundle.verify(leaf, supplied, now=now)
    gap, intermediates = _openssl_path(leaf, supplied, client_ca)
    if intermediates > depth:
        # Found while OpenSSL builds the path, so before a missing issuer or anything it checks on the path.
        return ClientVerification("FAILED:certificate chain too long", "chain-too-long", unanchored)
    validity = leaf.validity_at(now)
    if reason is None or (validity != "valid" and reason in _DATED):
        # OpenSSL checks every certificate at the same time, last (internal_verify); TrustBundle dates the path
        # of a leaf outside its period at the edge of that period, which can blame a CA for the leaf's dates.
        if validity == "valid":
            return ClientVerification("SUCCESS", None, unanchored)
        return ClientVerification(f"FAILED:{_LEAF_VALIDITY[validity]}", validity, unanchored)
    # Path building comes first in OpenSSL, so a missing issuer is what nginx reports whatever else is wrong.
    text = gap or OPENSSL_REASONS[reason]
    return ClientVerification(f"FAILED:{text}", reason, unanchored)
