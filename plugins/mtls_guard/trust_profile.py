"""What the certificate verifier is told to enforce, and what that demands of a trust bundle's CAs.

Path validation is RFC 5280's, done by ``cryptography.x509.verification`` (client profile): signatures,
basicConstraints cA and pathLenConstraint, keyCertSign, name constraints, validity at the request's time,
unknown critical extensions, EKU clientAuth on the leaf and EKU chaining through the CAs. Its CA/B-Forum
defaults are relaxed only where they go beyond RFC 5280 path validation (``_CA_POLICY``, ``_EE_POLICY``):
the leaf may lack a SAN, an AKI or an EKU (no EKU = unrestricted), CAs may lack keyUsage, and the
criticality of AKI/SKI/basicConstraints/EKU is not policed.

The checks here run when a bundle is built (:class:`.trust.TrustBundle`): a certificate the verifier would
refuse as a CA, or whose constraints it cannot enforce, fails the policy's compilation instead of every
request, and the bundle's own issuing relations decide which certificates are anchors.
"""

from __future__ import annotations

import functools

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, SignatureAlgorithmOID
from cryptography.x509.verification import Criticality, ExtensionPolicy, Policy, PolicyBuilder, Store, VerificationError

from .identity import ClientCertificate, extension_value

__all__ = [
    "MAX_INTERMEDIATES",
    "SIGNATURE_ALGORITHMS",
    "anchor_depths",
    "bundle_problem",
    "has_directory_names",
    "issued_by",
    "verifier_builder",
]

MAX_INTERMEDIATES = 4  # on the path between leaf and anchor: at most 5 signature hops


# -- the verifier's profile ------------------------------------------------------------------------------


def _ca_key_usage(_policy: Policy, _cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    # RFC 5280 s6.1.4(n): keyCertSign is required only when keyUsage is present (CA/B requires keyUsage).
    if usage is not None and not usage.key_cert_sign:
        raise ValueError("keyUsage without keyCertSign")


def _ca_basic_constraints(_policy: Policy, _cert: x509.Certificate, basic: x509.BasicConstraints) -> None:
    # cryptography 51 also checks cA outside the validator this replaces; repeated so that no version can lose it.
    if not basic.ca:
        raise ValueError("basicConstraints without cA")


def _ee_extended_key_usage(_policy: Policy, _cert: x509.Certificate, usage: x509.ExtendedKeyUsage | None) -> None:
    # RFC 5280 s4.2.1.12: an absent EKU is unrestricted; anyExtendedKeyUsage alone does not grant clientAuth.
    if usage is not None and ExtendedKeyUsageOID.CLIENT_AUTH not in usage:
        raise ValueError("extendedKeyUsage without clientAuth")


# Criticality is an issuer's duty that RFC 5280 path validation does not check, so it is AGNOSTIC where the
# defaults insist. Name constraints, EKU chaining, AIA and everything outside these extensions stay default.
_CA_POLICY = (
    ExtensionPolicy.webpki_defaults_ca()
    .may_be_present(x509.KeyUsage, Criticality.AGNOSTIC, _ca_key_usage)
    .require_present(x509.BasicConstraints, Criticality.AGNOSTIC, _ca_basic_constraints)
    # Path-building hints only; RFC 5280 also allows the issuer+serial AKI form that CA/B forbids.
    .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
    .may_be_present(x509.SubjectKeyIdentifier, Criticality.AGNOSTIC, None)
)
_EE_POLICY = (
    ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
    # RFC 5280 s4.2.1.6 needs a SAN only when the subject is empty; many client certificates carry just a CN.
    .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    .may_be_present(x509.ExtendedKeyUsage, Criticality.AGNOSTIC, _ee_extended_key_usage)
)
# What the verifier accepts on a certificate it checks (CA/B 7.1.3.2); RSASSA-PSS parameters are not
# checked here, so an odd PSS variant inside a bundle fails at request time ("untrusted-issuer").
_SIG = SignatureAlgorithmOID
SIGNATURE_ALGORITHMS = frozenset(
    {_SIG.RSA_WITH_SHA256, _SIG.RSA_WITH_SHA384, _SIG.RSA_WITH_SHA512, _SIG.RSASSA_PSS}
    | {_SIG.ECDSA_WITH_SHA256, _SIG.ECDSA_WITH_SHA384, _SIG.ECDSA_WITH_SHA512}
)


def verifier_builder(store: Store) -> PolicyBuilder:
    return (
        PolicyBuilder()
        .store(store)
        .max_chain_depth(MAX_INTERMEDIATES)
        .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
    )


# -- construction-time checks ----------------------------------------------------------------------------

_PROBED: dict[str, str | None] = {}  # fingerprint -> problem; routes tend to share bundles
# First matching text of the probe's error -> what to tell the operator (all fixed texts).
_PROBE_PROBLEMS = (
    ("RSA key is too weak", "has an RSA key shorter than 2048 bits"),
    ("public key algorithm", "has a key type the verifier does not support (RSA >= 2048, ECDSA P-256/384/521)"),
    ("EKU", "has an extendedKeyUsage without clientAuth or anyExtendedKeyUsage"),
)


@functools.cache
def _probe_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _probe(cert: x509.Certificate) -> str | None:
    """Why the verifier would refuse ``cert`` as an issuer, found by letting it try.

    The probe leaf names ``cert`` as issuer but is signed by an unrelated key. The verifier checks the
    issuer's profile, key and the leaf's signature algorithm before the signature itself (cryptography
    51, Policy::valid_issuer), so "signature does not match" means that everything else passed.
    """
    key = _probe_key()
    at = cert.not_valid_before_utc
    unusable = "is not usable as a CA by the certificate verifier"
    try:
        probe = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "trust bundle probe")]))
            .issuer_name(cert.subject)
            .public_key(key.public_key())
            .serial_number(1)
            .not_valid_before(at)
            .not_valid_after(at)
            .sign(key, hashes.SHA256())
        )
        verifier_builder(Store([cert])).time(at).build_client_verifier().verify(probe, [])
    except VerificationError as exc:
        message = str(exc).partition(" (encountered processing")[0]
        if "signature does not match" in message:
            return None
        return next((text for needle, text in _PROBE_PROBLEMS if needle in message), unusable)
    except Exception:  # noqa: BLE001 - whatever else the verifier chokes on, it cannot use this CA
        return unusable
    return unusable


def bundle_problem(cert: ClientCertificate) -> str | None:
    if cert.certificate.version is not x509.Version.v3:
        return "is not an X.509 v3 certificate"
    if not cert.is_ca:
        return "is not a CA (BasicConstraints cA)"
    usage = extension_value(cert.certificate, x509.KeyUsage)
    if usage is not None and not usage.key_cert_sign:
        return "is a CA without keyCertSign in its keyUsage"
    constraints = extension_value(cert.certificate, x509.NameConstraints)
    if constraints is not None and has_directory_names(constraints):
        return "has directoryName name constraints, which the verifier cannot enforce"
    if cert.fingerprint_sha256 not in _PROBED:
        if len(_PROBED) >= 1024:
            _PROBED.clear()
        _PROBED[cert.fingerprint_sha256] = _probe(cert.certificate)
    return _PROBED[cert.fingerprint_sha256]


def has_directory_names(constraints: x509.NameConstraints) -> bool:
    subtrees = (*(constraints.permitted_subtrees or ()), *(constraints.excluded_subtrees or ()))
    return any(isinstance(name, x509.DirectoryName) for name in subtrees)


def issued_by(child: ClientCertificate, parent: ClientCertificate) -> bool:
    """Whether ``parent`` issued ``child``: names chain and the signature verifies."""
    if child.certificate.issuer != parent.certificate.subject:
        return False
    try:
        child.certificate.verify_directly_issued_by(parent.certificate)
    except Exception:  # noqa: BLE001 - any failure (signature, key type) means "not issued by"
        return False
    return True


def anchor_depths(bundle: list[ClientCertificate]) -> dict[int, int]:
    """How many bundle CAs lie between each bundle certificate and an anchor (0: it is one); loops are absent.

    Anchors are the self-issued certificates and those no other bundle certificate issued.
    """
    issuers = [
        [p for p, parent in enumerate(bundle) if p != c and issued_by(cert, parent)] for c, cert in enumerate(bundle)
    ]
    depth = {c: 0 for c, cert in enumerate(bundle) if cert.subject == cert.issuer or not issuers[c]}
    frontier, level = set(depth), 0
    while frontier:
        level += 1
        frontier = {c for c in range(len(bundle)) if c not in depth and not frontier.isdisjoint(issuers[c])}
        depth.update(dict.fromkeys(frontier, level))
    return depth
