"""The certificates of the end-to-end world, written to files nginx, curl and httpx can load."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID

from tests.certs import CertFactory, Issued

__all__ = [
    "API_HOST",
    "FRONT_HOST",
    "OTHER_HOST",
    "SPIFFE_DEV",
    "SPIFFE_PROD",
    "ClientCert",
    "Pki",
    "constrained_chains",
]

API_HOST = "api.example.test"
FRONT_HOST = "front.example.test"
OTHER_HOST = "other.example.test"
SPIFFE_PROD = "spiffe://example.test/ns/prod/sa/web"
SPIFFE_DEV = "spiffe://example.test/ns/dev/sa/web"


@dataclass(frozen=True)
class ClientCert:
    """A client certificate on disk (``cert`` holds leaf + chain, ``key`` the private key)."""

    name: str
    issued: Issued
    cert: Path
    key: Path


class Pki:
    """A test CA with the server certificate and one client certificate per case of the matrix.

    ``valid``: test CA, SPIFFE ID prod. ``wrong_id``: test CA, SPIFFE ID dev. ``untrusted``: the prod
    SPIFFE ID issued by another CA. ``expired``: test CA, prod ID, expired yesterday. ``self_signed``:
    a "bring your own cert" leaf.
    """

    CLIENTS = ("valid", "wrong_id", "untrusted", "expired", "self_signed")

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        factory = CertFactory()
        self.ca = factory.ca("E2E Test Root CA")
        self.other_ca = factory.ca("E2E Other Root CA")
        server = factory.leaf(
            self.ca,
            cn=API_HOST,
            dns=[API_HOST, FRONT_HOST, OTHER_HOST],
            eku=[ExtendedKeyUsageOID.SERVER_AUTH],
        )
        now = factory.now
        issued = {
            "valid": factory.leaf(self.ca, cn="web-prod", uris=[SPIFFE_PROD]),
            "wrong_id": factory.leaf(self.ca, cn="web-dev", uris=[SPIFFE_DEV]),
            "untrusted": factory.leaf(self.other_ca, cn="web-prod", uris=[SPIFFE_PROD]),
            "expired": factory.leaf(
                self.ca,
                cn="web-prod",
                uris=[SPIFFE_PROD],
                not_before=now - timedelta(days=10),
                not_after=now - timedelta(days=1),
            ),
            "self_signed": factory.self_signed_leaf("web-prod", uris=[SPIFFE_PROD]),
        }
        self.ca_file = self._write("ca.pem", self.ca.pem)
        self.server_cert = self._write("server.pem", server.chain_pem)
        self.server_key = self._write("server.key", server.key_pem)
        self.clients = {
            name: ClientCert(
                name,
                cert,
                self._write(f"client-{name}.pem", cert.chain_pem),
                self._write(f"client-{name}.key", cert.key_pem),
            )
            for name, cert in issued.items()
        }

    def add_client(self, name: str, issued: Issued) -> ClientCert:
        """Write one more client certificate (e.g. a short-lived one made by a test) and register it."""
        client = ClientCert(
            name,
            issued,
            self._write(f"client-{name}.pem", issued.chain_pem),
            self._write(f"client-{name}.key", issued.key_pem),
        )
        self.clients[name] = client
        return client

    def _write(self, name: str, text: str) -> Path:
        path = self.dir / name
        path.write_text(text, encoding="ascii")
        if name.endswith(".key"):
            path.chmod(0o600)
        return path

    def client(self, name: str | None) -> ClientCert | None:
        return None if name is None else self.clients[name]


def constrained_chains(pki: Pki, spiffe: str = SPIFFE_PROD) -> dict[str, Issued]:
    """Client certificates whose chain (leaf + intermediates, in ``chain_pem``) tests RFC 5280 path
    constraints under ``pki.ca``, each with the SPIFFE ID ``spiffe`` so that only the chain decides:

    ``partner_ok``      via a sub-CA name-constrained to DNS partner.example, leaf DNS partner.example.
    ``partner_escape``  the same sub-CA, leaf DNS billing.internal: outside the permitted subtree.
    ``pathlen_ok``      via a sub-CA with pathLenConstraint 0, leaf issued directly by it.
    ``pathlen_escape``  the same sub-CA issued another CA, which issued the leaf: pathLen 0 violated.
    """
    factory = CertFactory()
    permitted = x509.NameConstraints(permitted_subtrees=[x509.DNSName("partner.example")], excluded_subtrees=None)
    partner = factory.ca("Partner Sub-CA", parent=pki.ca, name_constraints=permitted)
    strict = factory.ca("PathLen0 Sub-CA", parent=pki.ca, path_length=0)
    below = factory.ca("Below PathLen0 CA", parent=strict)
    return {
        "partner_ok": factory.leaf(partner, cn="partner-web", dns=["partner.example"], uris=[spiffe], chain=[partner]),
        "partner_escape": factory.leaf(partner, cn="billing", dns=["billing.internal"], uris=[spiffe], chain=[partner]),
        "pathlen_ok": factory.leaf(strict, cn="web-prod", uris=[spiffe], chain=[strict]),
        "pathlen_escape": factory.leaf(below, cn="web-prod", uris=[spiffe], chain=[below, strict]),
    }
