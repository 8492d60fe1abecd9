"""Test certificate factory; lives in the package because the demo uses it too."""

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding

from plugins.mtls_guard.tools.devcerts import CertFactory, Issued, escaped, name_oid

__all__ = ["CertFactory", "Issued", "crl_der", "crl_pem", "escaped", "name_oid"]


def crl_pem(crl: x509.CertificateRevocationList) -> bytes:
    """A CRL as a PEM ``X509 CRL`` block (crl_files accept it, and require.crl takes it as text)."""
    return crl.public_bytes(Encoding.PEM)


def crl_der(crl: x509.CertificateRevocationList) -> bytes:
    """A CRL as DER (crl_files accept it)."""
    return crl.public_bytes(Encoding.DER)
