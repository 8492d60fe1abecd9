"""Unit tests for plugins.mtls_guard.trust: RFC 5280 path validation of client certificates, its cache and bundles."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from plugins.mtls_guard import trust
from plugins.mtls_guard.identity import CertificateError, ClientCertificate, load_der, load_pem
from plugins.mtls_guard.policy import compile_policy
from plugins.mtls_guard.schema_readers import PolicyError
from plugins.mtls_guard.trust import MAX_SUPPLIED_INTERMEDIATES, TrustBundle
from plugins.mtls_guard.trust_profile import MAX_INTERMEDIATES
from tests.certs import CertFactory, Issued

FACTORY = CertFactory()
NOW = FACTORY.now
KEY_CERT_SIGN = x509.KeyUsage(
    digital_signature=False,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)
PARTNER_ONLY = x509.NameConstraints(permitted_subtrees=[x509.DNSName("partner.example")], excluded_subtrees=None)
NO_INTERNAL = x509.NameConstraints(permitted_subtrees=None, excluded_subtrees=[x509.DNSName("internal")])
PARTNER_ORG = x509.NameConstraints(
    permitted_subtrees=[x509.DirectoryName(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Partner")]))],
    excluded_subtrees=None,
)


@pytest.fixture(scope="module")
def root() -> Issued:
    return FACTORY.ca("Trust Root", subject_extra={"O": "Example"})


@pytest.fixture(scope="module")
def partner(root: Issued) -> Issued:
    """An issuing CA constrained to the DNS subtree partner.example."""
    return FACTORY.ca("Partner Issuing", parent=root, name_constraints=PARTNER_ONLY)


@pytest.fixture(scope="module")
def chain(root: Issued) -> tuple[Issued, Issued, ClientCertificate]:
    """root -> CA with pathLenConstraint 0 -> CA -> leaf."""
    zero = FACTORY.ca("PathLen Zero", parent=root, path_length=0)
    below = FACTORY.ca("Below Zero", parent=zero)
    return zero, below, cert(FACTORY.leaf(below))


def cert(issued: Issued | x509.Certificate) -> ClientCertificate:
    raw = issued.cert if isinstance(issued, Issued) else issued
    return load_der(raw.public_bytes(serialization.Encoding.DER))


def certs(*issued: Issued | x509.Certificate) -> list[ClientCertificate]:
    return [cert(i) for i in issued]


def bundle(*issued: Issued | x509.Certificate) -> TrustBundle:
    return TrustBundle(certs(*issued))


def pem(issued: Issued | x509.Certificate) -> str:
    raw = issued.cert if isinstance(issued, Issued) else issued
    return raw.public_bytes(serialization.Encoding.PEM).decode("ascii")


def custom(
    cn: str,
    *,
    signer: Issued | None,
    key: Any = None,
    extensions: Sequence[tuple[x509.ExtensionType, bool]] = (),
    algorithm: hashes.SHA224 | hashes.SHA256 | hashes.SHA384 | None = hashes.SHA256(),  # noqa: B008 - immutable
    not_before: datetime | None = None,
    not_after: datetime | None = None,
) -> Issued:
    """A certificate with exactly ``extensions`` (no AKI/SKI unless given), for profiles CertFactory does not make."""
    key = key if key is not None else ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(signer.cert.subject if signer else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or NOW - timedelta(days=1))
        .not_valid_after(not_after or NOW + timedelta(days=30))
    )
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    made = builder.sign(signer.key if signer else key, algorithm)
    return Issued(cert=made, key=key, pem=pem(made), key_pem="", chain_pem=pem(made))


def ca_extensions(*, critical: bool = True) -> list[tuple[x509.ExtensionType, bool]]:
    return [(x509.BasicConstraints(ca=True, path_length=None), critical), (KEY_CERT_SIGN, True)]


def _der(tag: int, body: bytes) -> bytes:
    size = len(body)
    if size < 0x80:
        return bytes([tag, size]) + body
    length = size.to_bytes((size.bit_length() + 7) // 8, "big")
    return bytes([tag, 0x80 | len(length)]) + length + body


def _element(der: bytes) -> tuple[bytes, bytes, bytes]:
    """(contents, whole element, rest) of the first DER element of ``der``."""
    size, header = der[1], 2
    if size & 0x80:
        header += size & 0x7F
        size = int.from_bytes(der[2:header], "big")
    return der[header : header + size], der[: header + size], der[header + size :]


def v1_root(cn: str) -> Issued:
    """A self-signed X.509 v1 certificate: a bare v3 one re-encoded without its version field and re-signed."""
    key = ec.generate_private_key(ec.SECP256R1())
    v3 = custom(cn, signer=None, key=key).cert
    tbs_contents, _, _ = _element(v3.tbs_certificate_bytes)
    _, _, without_version = _element(tbs_contents)
    tbs = _der(0x30, without_version)
    _, _, after_tbs = _element(_element(v3.public_bytes(serialization.Encoding.DER))[0])
    _, algorithm, _ = _element(after_tbs)
    signature = _der(0x03, b"\x00" + key.sign(tbs, ec.ECDSA(hashes.SHA256())))
    made = x509.load_der_x509_certificate(_der(0x30, tbs + algorithm + signature))
    assert made.version is x509.Version.v1
    return Issued(cert=made, key=key, pem=pem(made), key_pem="", chain_pem=pem(made))


class TestPaths:
    def test_leaf_issued_by_anchor_verifies(self, root: Issued) -> None:
        """A leaf signed directly by a bundle root verifies."""
        assert bundle(root).verify(cert(FACTORY.leaf(root)), now=NOW) is None

    def test_leaf_under_bundle_intermediate_verifies(self, root: Issued) -> None:
        """A leaf issued by an intermediate that sits in the bundle next to its root verifies without a chain."""
        issuing = FACTORY.ca("Bundle Issuing", parent=root)
        assert bundle(root, issuing).verify(cert(FACTORY.leaf(issuing)), now=NOW) is None

    def test_leaf_through_supplied_intermediates_verifies(self, root: Issued) -> None:
        """Header mode: intermediates supplied with the leaf, in any order, complete the path."""
        upper = FACTORY.ca("Upper", parent=root)
        lower = FACTORY.ca("Lower", parent=upper)
        leaf = cert(FACTORY.leaf(lower))
        assert bundle(root).verify(leaf, certs(lower, upper), now=NOW) is None
        assert bundle(root).verify(leaf, certs(upper, lower, root), now=NOW) is None
        assert bundle(root).verify(leaf, certs(lower), now=NOW) == "untrusted-issuer"

    def test_bad_signature_refused(self, root: Issued) -> None:
        """A leaf naming the anchor as issuer but signed by another key is 'bad-signature'."""
        impostor = FACTORY.ca(subject=root.cert.subject)
        assert bundle(root).verify(cert(FACTORY.leaf(impostor)), now=NOW) == "bad-signature"

    @pytest.mark.parametrize("basic_constraints", [True, False], ids=["cA-false", "no-basic-constraints"])
    def test_issuer_that_is_not_a_ca_refused(self, root: Issued, basic_constraints: bool) -> None:
        """A certificate without basicConstraints cA cannot issue, even when supplied as intermediate."""
        not_ca = FACTORY.leaf(root, cn="not a ca", basic_constraints=basic_constraints)
        leaf = cert(FACTORY.leaf(not_ca))
        assert bundle(root).verify(leaf, certs(not_ca), now=NOW) == "untrusted-issuer"

    def test_ca_without_key_cert_sign_refused(self, root: Issued) -> None:
        """A CA whose keyUsage lacks keyCertSign cannot issue: refused as intermediate, rejected in a bundle."""
        no_sign = FACTORY.ca("No KeyCertSign", parent=root, key_cert_sign=False)
        assert bundle(root).verify(cert(FACTORY.leaf(no_sign)), certs(no_sign), now=NOW) == "untrusted-issuer"
        with pytest.raises(CertificateError, match=r"#2 is a CA without keyCertSign"):
            bundle(root, no_sign)

    def test_ca_without_key_usage_extension_accepted(self, root: Issued) -> None:
        """A CA without any keyUsage extension may issue (RFC 5280 s6.1.4(n); CA/B's requirement is relaxed)."""
        plain = FACTORY.ca("No KeyUsage", parent=root, key_usage=False)
        assert bundle(root).verify(cert(FACTORY.leaf(plain)), certs(plain), now=NOW) is None
        assert bundle(root, plain).verify(cert(FACTORY.leaf(plain)), now=NOW) is None

    def test_non_critical_basic_constraints_accepted(self, root: Issued) -> None:
        """A CA whose basicConstraints is not critical still issues: path validation checks cA, not criticality."""
        relaxed = custom("Non-critical BC", signer=root, extensions=ca_extensions(critical=False))
        assert bundle(root).verify(cert(FACTORY.leaf(relaxed)), certs(relaxed), now=NOW) is None

    def test_ca_with_eku_excluding_client_auth_refused(self, root: Issued) -> None:
        """A CA restricted to serverAuth by its EKU cannot vouch for client certificates (EKU chaining)."""
        extensions = [*ca_extensions(), (x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), False)]
        servers = custom("Server CA", signer=root, extensions=extensions)
        assert bundle(root).verify(cert(FACTORY.leaf(servers)), certs(servers), now=NOW) == "untrusted-issuer"
        with pytest.raises(CertificateError, match=r"#2 has an extendedKeyUsage without clientAuth"):
            bundle(root, servers)

    def test_unsupported_signature_algorithm_refused(self, root: Issued) -> None:
        """An intermediate signed with ECDSA-SHA224 is refused when supplied and rejected inside a bundle."""
        weak = custom("SHA-224 Issuing", signer=root, extensions=ca_extensions(), algorithm=hashes.SHA224())
        assert bundle(root).verify(cert(FACTORY.leaf(weak)), certs(weak), now=NOW) == "untrusted-issuer"
        with pytest.raises(CertificateError, match=r"#2 is signed with an algorithm the verifier refuses"):
            bundle(root, weak)


class TestNameConstraints:
    def test_name_outside_permitted_subtree_refused_in_header_mode(self, root: Issued, partner: Issued) -> None:
        """A sub-CA constrained to partner.example cannot vouch for billing.internal via a supplied chain."""
        leaf = cert(FACTORY.leaf(partner, cn="billing", dns=["billing.internal"]))
        assert bundle(root).verify(leaf, certs(partner), now=NOW) == "name-constraints"

    def test_name_outside_permitted_subtree_refused_with_sub_ca_in_bundle(self, root: Issued, partner: Issued) -> None:
        """The constraint holds when the sub-CA is in the route's bundle, with its root or as the only anchor."""
        leaf = cert(FACTORY.leaf(partner, cn="billing", dns=["billing.internal"]))
        assert bundle(root, partner).verify(leaf, now=NOW) == "name-constraints"
        assert bundle(partner).verify(leaf, now=NOW) == "name-constraints"

    def test_name_inside_permitted_subtree_accepted(self, root: Issued, partner: Issued) -> None:
        """A leaf for api.partner.example under the constrained sub-CA verifies in both modes."""
        leaf = cert(FACTORY.leaf(partner, cn="api", dns=["api.partner.example"]))
        assert bundle(root).verify(leaf, certs(partner), now=NOW) is None
        assert bundle(root, partner).verify(leaf, now=NOW) is None

    def test_excluded_subtree_refused(self, root: Issued) -> None:
        """A CA excluding .internal cannot issue for billing.internal but can for other names."""
        excluding = FACTORY.ca("Excluding", parent=root, name_constraints=NO_INTERNAL)
        inside = cert(FACTORY.leaf(excluding, dns=["billing.internal"]))
        outside = cert(FACTORY.leaf(excluding, dns=["billing.example"]))
        assert bundle(root).verify(inside, certs(excluding), now=NOW) == "name-constraints"
        assert bundle(root, excluding).verify(inside, now=NOW) == "name-constraints"
        assert bundle(root).verify(outside, certs(excluding), now=NOW) is None

    def test_leaf_without_san_under_constrained_ca_refused(self, root: Issued, partner: Issued) -> None:
        """A SAN-less leaf under a name-constrained CA is refused: its subject DN would go unchecked."""
        leaf = cert(FACTORY.leaf(partner, cn="billing.internal"))
        assert bundle(root).verify(leaf, certs(partner), now=NOW) == "name-constraints"
        assert bundle(root, partner).verify(leaf, now=NOW) == "name-constraints"

    @pytest.mark.parametrize("critical", [True, False])
    def test_directory_name_constraints_fail_closed(self, root: Issued, critical: bool) -> None:
        """directoryName constraints, which the verifier cannot apply, refuse the path and reject a bundle."""
        extensions = [*ca_extensions(), (PARTNER_ORG, critical)]
        by_org = custom("Partner Org CA", signer=root, extensions=extensions)
        leaf = cert(FACTORY.leaf(by_org, subject_extra={"O": "Billing"}, dns=["billing.partner.example"]))
        assert bundle(root).verify(leaf, certs(by_org), now=NOW) == "name-constraints"
        with pytest.raises(CertificateError, match=r"#2 has directoryName name constraints"):
            bundle(root, by_org)


class TestPathLength:
    def test_ca_after_path_length_zero_refused_when_supplied(
        self, root: Issued, chain: tuple[Issued, Issued, ClientCertificate]
    ) -> None:
        """root -> CA(pathLen 0) -> CA -> leaf is 'chain-too-long' with the CAs supplied as intermediates."""
        zero, below, leaf = chain
        assert bundle(root).verify(leaf, certs(below, zero), now=NOW) == "chain-too-long"

    def test_ca_after_path_length_zero_refused_with_cas_in_bundle(
        self, root: Issued, chain: tuple[Issued, Issued, ClientCertificate]
    ) -> None:
        """The same path is refused when both CAs are in the route's bundle, with or without the root."""
        zero, below, leaf = chain
        assert bundle(root, zero, below).verify(leaf, now=NOW) == "chain-too-long"
        assert bundle(zero, below).verify(leaf, now=NOW) == "chain-too-long"
        assert bundle(below, zero, root).verify(leaf, now=NOW) == "chain-too-long"

    def test_path_length_zero_ca_issues_leaves(
        self, root: Issued, chain: tuple[Issued, Issued, ClientCertificate]
    ) -> None:
        """A pathLen 0 CA may still issue end-entity certificates directly."""
        zero, _, _ = chain
        leaf = cert(FACTORY.leaf(zero))
        assert bundle(root).verify(leaf, certs(zero), now=NOW) is None
        assert bundle(root, zero).verify(leaf, now=NOW) is None

    def test_path_length_counts_bundle_and_supplied_intermediates(self, root: Issued) -> None:
        """A pathLen 1 CA in the bundle allows one CA below it, wherever that CA comes from, but not two."""
        one = FACTORY.ca("PathLen One", parent=root, path_length=1)
        middle = FACTORY.ca("Middle", parent=one)
        last = FACTORY.ca("Last", parent=middle)
        assert bundle(root, one).verify(cert(FACTORY.leaf(middle)), certs(middle), now=NOW) is None
        assert bundle(root, one, middle).verify(cert(FACTORY.leaf(last)), certs(last), now=NOW) == "chain-too-long"


class TestLeafProfile:
    def test_server_auth_only_is_not_client_cert(self, root: Issued) -> None:
        """A leaf whose EKU lists only serverAuth is 'not-client-cert'."""
        server = cert(FACTORY.leaf(root, eku=[ExtendedKeyUsageOID.SERVER_AUTH]))
        assert bundle(root).verify(server, now=NOW) == "not-client-cert"

    def test_any_extended_key_usage_alone_is_not_client_cert(self, root: Issued) -> None:
        """anyExtendedKeyUsage without clientAuth does not make a client certificate."""
        anything = cert(FACTORY.leaf(root, eku=[ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE]))
        assert bundle(root).verify(anything, now=NOW) == "not-client-cert"

    def test_client_auth_leaf_verifies(self, root: Issued) -> None:
        """A leaf with EKU clientAuth (critical or not) verifies."""
        assert bundle(root).verify(cert(FACTORY.leaf(root, client_auth=True)), now=NOW) is None
        eku = x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH])
        critical = custom("critical-eku", signer=root, extensions=[(eku, True)])
        assert bundle(root).verify(cert(critical), now=NOW) is None

    def test_leaf_without_eku_is_accepted(self, root: Issued) -> None:
        """Decision: a leaf without an EKU extension is unrestricted (RFC 5280 s4.2.1.12) and verifies."""
        plain = cert(FACTORY.leaf(root, client_auth=False))
        assert plain.extended_key_usage is None
        assert bundle(root).verify(plain, now=NOW) is None

    def test_minimal_leaf_is_accepted(self, root: Issued) -> None:
        """Decision: a leaf with only a CN (no SAN, AKI, SKI, keyUsage or EKU) verifies; policies can match the CN."""
        bare = cert(custom("cn-only", signer=root))
        assert not bare.certificate.extensions
        assert bundle(root).verify(bare, now=NOW) is None

    def test_ca_as_leaf_is_not_client_cert(self, root: Issued) -> None:
        """A CA certificate presented as client certificate is refused, the anchor itself included."""
        issuing = FACTORY.ca("Issuing", parent=root)
        assert bundle(root).verify(cert(issuing), now=NOW) == "not-client-cert"
        assert bundle(root).verify(cert(root), now=NOW) == "not-client-cert"

    def test_key_cert_sign_on_end_entity_is_not_client_cert(self, root: Issued) -> None:
        """A non-CA leaf asserting keyCertSign is malformed (RFC 5280 s4.2.1.3) and refused."""
        odd = custom("odd", signer=root, extensions=[(KEY_CERT_SIGN, True)])
        assert bundle(root).verify(cert(odd), now=NOW) == "not-client-cert"

    def test_leaf_validity_is_left_to_the_caller(self, root: Issued) -> None:
        """An expired or not yet valid leaf whose issuer is fine verifies: callers check leaf.validity_at."""
        expired = cert(FACTORY.leaf(root, not_before=NOW - timedelta(days=3), not_after=NOW - timedelta(hours=1)))
        future = cert(FACTORY.leaf(root, not_before=NOW + timedelta(hours=1), not_after=NOW + timedelta(days=3)))
        assert bundle(root).verify(expired, now=NOW) is None
        assert bundle(root).verify(future, now=NOW) is None


class TestValidity:
    def test_expired_intermediate(self, root: Issued) -> None:
        """An intermediate past its notAfter makes the chain 'expired-chain'."""
        old = FACTORY.ca("Old", parent=root, not_before=NOW - timedelta(days=30), not_after=NOW - timedelta(hours=2))
        leaf = cert(FACTORY.leaf(old, not_before=NOW - timedelta(days=3)))
        assert bundle(root).verify(leaf, certs(old), now=NOW) == "expired-chain"
        assert bundle(root, old).verify(leaf, now=NOW) == "expired-chain"
        assert bundle(root).verify(leaf, certs(old), now=NOW - timedelta(days=1)) is None

    def test_not_yet_valid_intermediate(self, root: Issued) -> None:
        """An intermediate before its notBefore makes the chain 'not-yet-valid-chain'."""
        early = FACTORY.ca("Early", parent=root, not_before=NOW + timedelta(hours=2))
        leaf = cert(FACTORY.leaf(early, not_after=NOW + timedelta(days=3)))
        assert bundle(root).verify(leaf, certs(early), now=NOW) == "not-yet-valid-chain"
        assert bundle(root).verify(leaf, certs(early), now=NOW + timedelta(days=1)) is None

    def test_not_after_holds_through_its_second(self, root: Issued) -> None:
        """Validity is compared in whole seconds: an intermediate is still valid during its notAfter second."""
        ending = FACTORY.ca("Ending", parent=root, not_after=NOW + timedelta(hours=1))
        leaf = cert(FACTORY.leaf(ending))
        end = ending.cert.not_valid_after_utc
        assert bundle(root).verify(leaf, certs(ending), now=end + timedelta(microseconds=999_999)) is None
        assert bundle(root).verify(leaf, certs(ending), now=end + timedelta(seconds=1)) == "expired-chain"

    def test_naive_now_rejected(self, root: Issued) -> None:
        """verify() requires a timezone-aware 'now'."""
        with pytest.raises(ValueError, match="timezone-aware"):
            bundle(root).verify(cert(FACTORY.leaf(root)), now=datetime(2030, 1, 1))


class TestBounds:
    def test_chain_longer_than_bound(self, root: Issued) -> None:
        """More than MAX_INTERMEDIATES intermediates on the path is 'chain-too-long'; exactly that many is fine."""
        parent, chain = root, []
        for depth in range(MAX_INTERMEDIATES + 1):
            parent = FACTORY.ca(f"Depth {depth}", parent=parent)
            chain.append(parent)
        deepest = cert(FACTORY.leaf(chain[-1]))
        assert bundle(root).verify(deepest, certs(*chain), now=NOW) == "chain-too-long"
        at_bound = cert(FACTORY.leaf(chain[-2]))
        assert bundle(root).verify(at_bound, certs(*chain[:-1]), now=NOW) is None

    def test_too_many_supplied_intermediates(self, root: Issued) -> None:
        """More than MAX_SUPPLIED_INTERMEDIATES distinct supplied CAs are refused before any path search."""
        junk = [FACTORY.ca(f"Junk {i}", parent=root) for i in range(MAX_SUPPLIED_INTERMEDIATES + 1)]
        leaf = cert(FACTORY.leaf(root))
        assert bundle(root).verify(leaf, certs(*junk), now=NOW) == "chain-too-long"
        assert bundle(root).verify(leaf, certs(*junk[:-1], *junk[:-1]), now=NOW) is None

    def test_bundle_hierarchy_deeper_than_bound_rejected(self, root: Issued) -> None:
        """A bundle whose own CAs nest deeper than MAX_INTERMEDIATES below the root is rejected at construction."""
        parent, chain = root, [root]
        for depth in range(MAX_INTERMEDIATES + 1):
            parent = FACTORY.ca(f"Nested {depth}", parent=parent)
            chain.append(parent)
        assert bundle(*chain[:-1]).verify(cert(FACTORY.leaf(chain[-2])), now=NOW) is None
        with pytest.raises(CertificateError, match=rf"#{len(chain)} is more than {MAX_INTERMEDIATES} CAs below"):
            bundle(*chain)


class TestCache:
    def test_hit_rechecks_validity(self, root: Issued) -> None:
        """A remembered chain is re-checked at each 'now': past the intermediate's notAfter it is 'expired-chain'."""
        short = FACTORY.ca("Short", parent=root, not_after=NOW + timedelta(days=2))
        leaf = cert(FACTORY.leaf(short, not_after=NOW + timedelta(days=10)))
        trusted = bundle(root)
        assert trusted.verify(leaf, certs(short), now=NOW) is None
        assert trusted.verify(leaf, certs(short), now=NOW + timedelta(days=3)) == "expired-chain"
        assert trusted.verify(leaf, certs(short), now=NOW + timedelta(hours=1)) is None

    def test_remembered_failure_expires_with_its_cause(self, root: Issued) -> None:
        """A remembered validity failure turns into success once the certificate becomes valid, and back."""
        early = FACTORY.ca("Early Cached", parent=root, not_before=NOW + timedelta(hours=2))
        leaf = cert(FACTORY.leaf(early, not_after=NOW + timedelta(days=3)))
        trusted = bundle(root)
        for _ in range(2):
            assert trusted.verify(leaf, certs(early), now=NOW) == "not-yet-valid-chain"
            assert trusted.verify(leaf, certs(early), now=NOW + timedelta(hours=3)) is None

    def test_remembered_failure_stays_a_failure(self, root: Issued) -> None:
        """A structural failure is answered the same from the cache, at any time."""
        partner = FACTORY.ca("Cached Partner", parent=root, name_constraints=PARTNER_ONLY)
        leaf = cert(FACTORY.leaf(partner, dns=["billing.internal"]))
        trusted = bundle(root)
        for offset in (0, 0, 1, 5):
            assert trusted.verify(leaf, certs(partner), now=NOW + timedelta(hours=offset)) == "name-constraints"

    def test_cache_is_keyed_by_supplied_chain(self, root: Issued) -> None:
        """The same leaf with and without its intermediate gets separate answers."""
        issuing = FACTORY.ca("Keyed", parent=root)
        leaf = cert(FACTORY.leaf(issuing))
        trusted = bundle(root)
        assert trusted.verify(leaf, certs(issuing), now=NOW) is None
        assert trusted.verify(leaf, now=NOW) == "untrusted-issuer"
        assert trusted.verify(leaf, certs(issuing), now=NOW) is None

    def test_caches_are_bounded(self, root: Issued, monkeypatch: pytest.MonkeyPatch) -> None:
        """Both caches stay within their bounds, however many distinct chains are verified."""
        monkeypatch.setattr(trust, "CACHE_ENTRIES", 2)
        monkeypatch.setattr(trust, "FAILURE_CACHE_ENTRIES", 1)
        trusted = bundle(root)
        for _ in range(3):
            assert trusted.verify(cert(FACTORY.leaf(root)), now=NOW) is None
            assert trusted.verify(cert(FACTORY.leaf(FACTORY.ca("Stranger"))), now=NOW) == "untrusted-issuer"
        assert (len(trusted._passed), len(trusted._failed)) == (2, 1)


def _rsa_root(bits: int) -> Issued:
    return custom(
        f"RSA {bits} Root", signer=None, key=rsa.generate_private_key(65537, bits), extensions=ca_extensions()
    )


class TestBundles:
    @pytest.mark.parametrize(
        ("make", "message"),
        [
            (lambda root: FACTORY.leaf(root, cn="leaf in bundle"), "is not a CA"),
            (lambda root: v1_root("Version One Root"), "is not an X.509 v3 certificate"),
            (lambda root: _rsa_root(1024), "RSA key shorter than 2048 bits"),
            (
                lambda root: custom(
                    "Ed25519 Root",
                    signer=None,
                    key=ed25519.Ed25519PrivateKey.generate(),
                    extensions=ca_extensions(),
                    algorithm=None,
                ),
                "key type the verifier does not support",
            ),
            (lambda root: FACTORY.ca("No Sign Root", key_cert_sign=False), "without keyCertSign"),
        ],
        ids=["not-ca", "v1", "rsa-1024", "ed25519", "no-keycertsign"],
    )
    def test_unusable_certificate_rejected_at_construction(self, root: Issued, make: Any, message: str) -> None:
        """A bundle certificate the verifier cannot use is a CertificateError naming its position, not its contents."""
        bad = make(root)
        with pytest.raises(CertificateError, match=rf"trust bundle certificate #2 .*{message}") as caught:
            TrustBundle.from_pem(root.pem + pem(bad))
        assert bad.cert.subject.rfc4514_string().split("=")[-1] not in str(caught.value)

    def test_rsa_2048_anchor_accepted(self) -> None:
        """An RSA-2048 root is usable and verifies leaves it signed."""
        big = _rsa_root(2048)
        leaf = custom("rsa-client", signer=big)
        assert TrustBundle.from_pem(big.pem).verify(cert(leaf), now=NOW) is None

    def test_bundle_loop_rejected(self) -> None:
        """Two bundle CAs that only issue each other leave no anchor and are rejected."""
        left_key, right_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
        right_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Right")])
        right_signer = Issued(
            cert=custom("Right", signer=None, key=right_key).cert, key=right_key, pem="", key_pem="", chain_pem=""
        )
        left = custom("Left", signer=right_signer, key=left_key, extensions=ca_extensions())
        right = (
            x509.CertificateBuilder()
            .subject_name(right_name)
            .issuer_name(left.cert.subject)
            .public_key(right_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(NOW - timedelta(days=1))
            .not_valid_after(NOW + timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(KEY_CERT_SIGN, critical=True)
            .sign(left_key, hashes.SHA256())
        )
        with pytest.raises(CertificateError, match=r"#1 is only issued by bundle CAs that it issues itself"):
            bundle(left, right)

    def test_duplicate_certificates_are_harmless(self, root: Issued) -> None:
        """A bundle listing the same CA twice behaves like one listing it once."""
        issuing = FACTORY.ca("Twice", parent=root)
        trusted = bundle(root, issuing, issuing, root)
        assert len(trusted.anchors) == 4
        assert trusted.verify(cert(FACTORY.leaf(issuing)), now=NOW) is None

    @pytest.mark.parametrize("where", ["require", "source"])
    def test_policy_with_unusable_bundle_fails_to_compile(self, root: Issued, where: str) -> None:
        """compile_policy turns an unusable CA bundle into a PolicyError naming the key, at PrepareConf time."""
        bad_bundle = root.pem + _rsa_root(1024).pem
        if where == "require":
            document: dict[str, Any] = {"require": {"ca": bad_bundle}}
        else:
            document = {
                "source": {"type": "header", "format": "xfcc", "trusted_proxies": ["10.0.0.0/8"], "ca": bad_bundle}
            }
        with pytest.raises(PolicyError, match=rf"{where}\.ca: invalid CA bundle: trust bundle certificate #2"):
            compile_policy(document)

    def test_load_pem_round_trip(self, root: Issued) -> None:
        """from_pem keeps every certificate and its fingerprint."""
        issuing = FACTORY.ca("Round Trip", parent=root)
        trusted = TrustBundle.from_pem(root.pem + issuing.pem)
        assert trusted.anchors == (load_pem(root.pem), load_pem(issuing.pem))
        assert trusted.fingerprints == {c.fingerprint_sha256 for c in trusted.anchors}
