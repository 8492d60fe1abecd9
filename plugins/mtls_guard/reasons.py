"""Decision reasons: a fixed set, safe as metric labels and in the ``x-mtls-guard-reason`` header.

A module of its own so that the checks that produce reasons (``decision``, ``revocation``) can share
them without importing each other.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["Reason"]


class Reason(StrEnum):
    EXEMPT = "exempt"
    VERIFIED = "verified"
    NO_CERT = "no-cert"
    VERIFY_FAILED = "verify-failed"
    EXPIRED = "expired"
    NOT_YET_VALID = "not-yet-valid"
    REVOKED = "revoked"
    CRL_STALE = "crl-stale"
    IDENTITY_MISMATCH = "identity-mismatch"
    FINGERPRINT_MISMATCH = "fingerprint-mismatch"
    CA_MISMATCH = "ca-mismatch"
    HOST_MISMATCH = "host-mismatch"
    PLAIN_HTTP = "plain-http"
    UNTRUSTED_PROXY = "untrusted-proxy"
    FORWARDED_CERT_INVALID = "forwarded-cert-invalid"
