"""X.509 factory for the demo, the `explain` tool and tests: real certificates, built in microseconds.

EC P-256 keys are used because RSA key generation would dominate test run time. Every issued
certificate gets its own fresh key by default: sharing keys between certificates would let a
"rogue CA with the same DN" produce signatures that verify, which would silently turn negative
trust tests into false passes. Pass ``key=`` explicitly to re-issue a certificate for an existing key.
Serialised key PEMs are cached per key object so building many ``Issued`` values stays cheap.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from urllib.parse import quote

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID, ObjectIdentifier

__all__ = ["CertFactory", "Issued", "escaped", "name_oid"]

_SHORT_NAMES: dict[str, ObjectIdentifier] = {
    "CN": NameOID.COMMON_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
    "C": NameOID.COUNTRY_NAME,
    "L": NameOID.LOCALITY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "DC": NameOID.DOMAIN_COMPONENT,
    "SERIALNUMBER": NameOID.SERIAL_NUMBER,
    "EMAILADDRESS": NameOID.EMAIL_ADDRESS,
    "UID": NameOID.USER_ID,
    "STREET": NameOID.STREET_ADDRESS,
    "TITLE": NameOID.TITLE,
    "GN": NameOID.GIVEN_NAME,
    "SN": NameOID.SURNAME,
}


def name_oid(attribute: str) -> ObjectIdentifier:
    """Map a short attribute name (``"OU"``) or a dotted OID (``"2.5.4.11"``) to an ObjectIdentifier."""
    upper = attribute.upper()
    if upper in _SHORT_NAMES:
        return _SHORT_NAMES[upper]
    return ObjectIdentifier(attribute)


@dataclass(frozen=True)
class Issued:
    """A certificate with its private key and PEM renderings."""

    cert: x509.Certificate
    key: ec.EllipticCurvePrivateKey
    pem: str
    key_pem: str
    chain_pem: str

    @property
    def der(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.DER)


_KEY_PEM_CACHE: dict[int, tuple[ec.EllipticCurvePrivateKey, str]] = {}


def _key_pem(key: ec.EllipticCurvePrivateKey) -> str:
    # Keyed by id() but the key object is stored alongside, so the id cannot be recycled while cached.
    hit = _KEY_PEM_CACHE.get(id(key))
    if hit is not None and hit[0] is key:
        return hit[1]
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode("ascii")
    _KEY_PEM_CACHE[id(key)] = (key, pem)
    return pem


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


def _is_self_signed(issued: Issued) -> bool:
    return issued.cert.issuer == issued.cert.subject


class CertFactory:
    """Builds CA, intermediate and leaf certificates for tests."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0)

    # -- building blocks -------------------------------------------------------------------------

    @staticmethod
    def new_key() -> ec.EllipticCurvePrivateKey:
        return ec.generate_private_key(ec.SECP256R1())

    @staticmethod
    def name(cn: str | None, extra: Mapping[str, str] = {}) -> x509.Name:
        """Subject with ``extra`` attributes in the given order followed by CN (the usual C,O,OU,CN order)."""
        attrs = [x509.NameAttribute(name_oid(k), v) for k, v in extra.items()]
        if cn is not None:
            attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
        return x509.Name(attrs)

    def _build(
        self,
        *,
        subject: x509.Name,
        key: ec.EllipticCurvePrivateKey,
        issuer: Issued | None,
        not_before: datetime,
        not_after: datetime,
        extensions: Sequence[tuple[x509.ExtensionType, bool]],
    ) -> x509.Certificate:
        signing_key = issuer.key if issuer is not None else key
        issuer_name = issuer.cert.subject if issuer is not None else subject
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before)
            .not_valid_after(not_after)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(signing_key.public_key()), critical=False)
        )
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        return builder.sign(signing_key, hashes.SHA256())

    # -- public API ------------------------------------------------------------------------------

    def ca(
        self,
        cn: str = "Test Root CA",
        *,
        parent: Issued | None = None,
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        subject_extra: Mapping[str, str] = {},
        subject: x509.Name | None = None,
        path_length: int | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
        name_constraints: x509.NameConstraints | None = None,
        key_usage: bool = True,
        key_cert_sign: bool = True,
        crl_sign: bool = True,
    ) -> Issued:
        """Self-signed root, or an intermediate signed by ``parent``; default validity now-1d .. now+365d.

        ``name_constraints`` is added as a critical extension. ``key_usage=False`` leaves out the KeyUsage
        extension; ``key_cert_sign=False`` keeps it but without keyCertSign (negative trust tests), and
        ``crl_sign=False`` without cRLSign.
        """
        key = key or self.new_key()
        extensions: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=True, path_length=path_length), True)
        ]
        if key_usage:
            extensions.append(
                (
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=key_cert_sign,
                        crl_sign=crl_sign,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    True,
                )
            )
        if name_constraints is not None:
            extensions.append((name_constraints, True))
        cert = self._build(
            subject=subject if subject is not None else self.name(cn, subject_extra),
            key=key,
            issuer=parent,
            not_before=not_before or self.now - timedelta(days=1),
            not_after=not_after or self.now + timedelta(days=365),
            extensions=extensions,
        )
        pem = _pem(cert)
        # An intermediate's chain is itself plus its parent's chain, never including the root.
        chain_pem = pem
        if parent is not None and not _is_self_signed(parent):
            chain_pem += parent.chain_pem
        return Issued(cert=cert, key=key, pem=pem, key_pem=_key_pem(key), chain_pem=chain_pem)

    def leaf(
        self,
        issuer: Issued | None,
        *,
        cn: str = "client",
        dns: Sequence[str] = (),
        uris: Sequence[str] = (),
        emails: Sequence[str] = (),
        ips: Sequence[str] = (),
        subject_extra: Mapping[str, str] = {},
        not_before: datetime | None = None,
        not_after: datetime | None = None,
        client_auth: bool = True,
        chain: Sequence[Issued] = (),
        subject: x509.Name | None = None,
        eku: Sequence[ObjectIdentifier] | None = None,
        key: ec.EllipticCurvePrivateKey | None = None,
        basic_constraints: bool = True,
    ) -> Issued:
        """End-entity certificate signed by ``issuer`` (self-signed when None), valid now-1h .. now+1d.

        ``client_auth`` adds EKU clientAuth; ``eku`` overrides the EKU list entirely (empty list = no EKU
        extension). ``chain`` lists intermediates appended to ``chain_pem`` after the leaf.
        ``basic_constraints=False`` leaves out BasicConstraints (cA false) altogether.
        """
        key = key or self.new_key()
        extensions: list[tuple[x509.ExtensionType, bool]] = [
            (x509.BasicConstraints(ca=False, path_length=None), True),
            (
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=True,
                    key_cert_sign=False,
                    crl_sign=False,
                    encipher_only=False,
                    decipher_only=False,
                ),
                True,
            ),
        ]
        if not basic_constraints:
            extensions.pop(0)
        usages = list(eku) if eku is not None else ([ExtendedKeyUsageOID.CLIENT_AUTH] if client_auth else [])
        if usages:
            extensions.append((x509.ExtendedKeyUsage(usages), False))
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        sans += [x509.RFC822Name(e) for e in emails]
        sans += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
        if sans:
            extensions.append((x509.SubjectAlternativeName(sans), False))
        cert = self._build(
            subject=subject if subject is not None else self.name(cn, subject_extra),
            key=key,
            issuer=issuer,
            not_before=not_before or self.now - timedelta(hours=1),
            not_after=not_after or self.now + timedelta(days=1),
            extensions=extensions,
        )
        pem = _pem(cert)
        chain_pem = pem + "".join(c.pem for c in chain)
        return Issued(cert=cert, key=key, pem=pem, key_pem=_key_pem(key), chain_pem=chain_pem)

    def crl(
        self,
        issuer: Issued,
        revoked: Sequence[Issued | int] = (),
        *,
        this_update: datetime | None = None,
        next_update: datetime | None = None,
        number: int | None = 1,
        signing_key: ec.EllipticCurvePrivateKey | None = None,
        extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    ) -> x509.CertificateRevocationList:
        """A CRL of ``issuer`` listing ``revoked`` (certificates or serial numbers), valid now-1h .. now+1d.

        ``signing_key`` signs with another key than the issuer's (negative tests); ``number=None`` leaves
        out the CRL number; ``extensions`` are added as given.
        """
        key = issuer.key
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(issuer.cert.subject)
            .last_update(this_update or self.now - timedelta(hours=1))
            .next_update(next_update or self.now + timedelta(days=1))
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False)
        )
        if number is not None:
            builder = builder.add_extension(x509.CRLNumber(number), critical=False)
        for ext, critical in extensions:
            builder = builder.add_extension(ext, critical=critical)
        for entry in revoked:
            serial = entry.cert.serial_number if isinstance(entry, Issued) else entry
            builder = builder.add_revoked_certificate(
                x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(self.now).build()
            )
        return builder.sign(signing_key or key, hashes.SHA256())

    def self_signed_leaf(self, cn: str = "rogue", **kwargs: object) -> Issued:
        """A self-signed end-entity certificate (not a CA): the classic "bring your own cert" attacker."""
        return self.leaf(None, cn=cn, **kwargs)  # type: ignore[arg-type]


def escaped(pem: str) -> str:
    """Render PEM like nginx's ``$ssl_client_escaped_cert``.

    nginx uses ngx_escape_uri(NGX_ESCAPE_URI_COMPONENT), which escapes every byte except ALPHA, DIGIT,
    "-", ".", "_", "~" as upper-case ``%XX``; ``quote(safe="")`` has exactly that unreserved set.
    """
    return quote(pem, safe="")
