"""Test certificate factory; lives in the package because the demo uses it too."""

from plugins.mtls_guard.devcerts import CertFactory, Issued, escaped, name_oid

__all__ = ["CertFactory", "Issued", "escaped", "name_oid"]
