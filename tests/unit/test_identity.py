"""Unit tests for plugins.mtls_guard.identity: parsing, DN/SAN model, cache and trust-bundle verification."""

from __future__ import annotations

import contextlib
import hashlib
import traceback
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import given
from hypothesis import strategies as st

from plugins.mtls_guard.identity import (
    MAX_INPUT_BYTES,
    CertificateCache,
    CertificateError,
    ClientCertificate,
    Name,
    load_der,
    load_pem,
    load_pem_chain,
    unescape_nginx,
)
from plugins.mtls_guard.trust import TrustBundle
from tests.certs import CertFactory, Issued, escaped


@pytest.fixture(scope="module")
def factory() -> CertFactory:
    return CertFactory()


@pytest.fixture(scope="module")
def root(factory: CertFactory) -> Issued:
    return factory.ca("Test Root CA", subject_extra={"O": "Example"})


@pytest.fixture(scope="module")
def intermediate(factory: CertFactory, root: Issued) -> Issued:
    return factory.ca("Test Issuing CA", parent=root, subject_extra={"O": "Example"})


@pytest.fixture(scope="module")
def leaf(factory: CertFactory, intermediate: Issued) -> Issued:
    return factory.leaf(
        intermediate,
        cn="svc-payments",
        dns=["API.Example.COM.", "b.example"],
        uris=["spiffe://example.org/ns/pay/sa/api"],
        emails=["ops@example.org"],
        ips=["192.0.2.7", "2001:db8::1"],
        subject_extra={"C": "DE", "O": "Example", "OU": "Payments"},
        chain=[intermediate],
    )


NOW = datetime.now(UTC)


class TestName:
    def test_attributes_in_certificate_order_with_short_names(self, leaf: Issued) -> None:
        """Subject attributes come back in certificate order with short upper-case names."""
        subject = load_pem(leaf.pem).subject
        assert subject.attributes == (
            ("C", "DE"),
            ("O", "Example"),
            ("OU", "Payments"),
            ("CN", "svc-payments"),
        )

    def test_values_lookup_is_case_insensitive_and_accepts_oids(self, leaf: Issued) -> None:
        """values() matches short names case-insensitively and known dotted OIDs to the same attribute."""
        subject = load_pem(leaf.pem).subject
        assert subject.values("ou") == ("Payments",)
        assert subject.values("2.5.4.11") == ("Payments",)
        assert subject.values("L") == ()

    def test_unknown_oid_kept_dotted_and_matched_exactly(self, factory: CertFactory, root: Issued) -> None:
        """Attributes without a short name are keyed by their dotted OID."""
        oid = "1.3.6.1.4.1.99999.1"
        issued = factory.leaf(root, subject_extra={oid: "custom"})
        subject = load_pem(issued.pem).subject
        assert subject.values(oid) == ("custom",)
        assert (oid, "custom") in subject.attributes

    def test_multi_valued_rdn_is_flattened_and_rendered_with_plus(self, factory: CertFactory, root: Issued) -> None:
        """A multi-valued RDN contributes each value to lookups and renders joined by '+'."""
        subject = x509.Name(
            [
                x509.RelativeDistinguishedName([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example")]),
                x509.RelativeDistinguishedName(
                    [
                        x509.NameAttribute(NameOID.COMMON_NAME, "alice"),
                        x509.NameAttribute(NameOID.USER_ID, "a123"),
                    ]
                ),
            ]
        )
        parsed = load_pem(factory.leaf(root, subject=subject).pem).subject
        assert parsed.values("CN") == ("alice",)
        assert parsed.values("UID") == ("a123",)
        assert parsed.values("O") == ("Example",)
        rendered = parsed.rfc4514()
        assert rendered.endswith(",O=Example")
        assert rendered.split(",")[0] in ("CN=alice+UID=a123", "UID=a123+CN=alice")

    def test_escaped_comma_value_is_one_value(self, factory: CertFactory, root: Issued) -> None:
        """A value containing ',' stays one value and is escaped in the RFC 4514 rendering."""
        parsed = load_pem(factory.leaf(root, subject_extra={"O": "Example, Inc."}).pem).subject
        assert parsed.values("O") == ("Example, Inc.",)
        assert parsed.rfc4514() == r"CN=client,O=Example\, Inc."

    def test_non_ascii_values_round_trip(self, factory: CertFactory, root: Issued) -> None:
        """Non-ASCII values are returned unchanged; ascii_only rendering escapes them as UTF-8 hex pairs."""
        parsed = load_pem(factory.leaf(root, cn="Jürgen Müller").pem).subject
        assert parsed.values("CN") == ("Jürgen Müller",)
        assert parsed.rfc4514() == "CN=Jürgen Müller"
        assert parsed.rfc4514(ascii_only=True) == r"CN=J\C3\BCrgen M\C3\BCller"

    def test_rfc4514_escapes_special_and_control_characters(self) -> None:
        """RFC 4514 special characters are backslash-escaped and control characters hex-escaped."""
        name = Name((("O", '#a+b"c\\d<e>f;g=h '), ("CN", "x\r\ny")))
        assert name.rfc4514() == r"CN=x\0D\0Ay,O=\#a\+b\"c\\d\<e\>f\;g\=h\ "

    def test_dn_strings_are_not_identity(self, factory: CertFactory, root: Issued) -> None:
        """A CN that looks like a full DN does not create other attributes."""
        parsed = load_pem(factory.leaf(root, cn="svc,OU=Admins").pem).subject
        assert parsed.values("OU") == ()
        assert parsed.values("CN") == ("svc,OU=Admins",)


class TestClientCertificateFields:
    def test_san_types_are_kept_apart(self, leaf: Issued) -> None:
        """DNS, URI, email and IP SANs land only in their own typed tuple."""
        cert = load_pem(leaf.pem)
        assert cert.san_dns == ("api.example.com", "b.example")
        assert cert.san_uri == ("spiffe://example.org/ns/pay/sa/api",)
        assert cert.san_email == ("ops@example.org",)
        assert cert.san_ip == ("192.0.2.7", "2001:db8::1")

    def test_uri_and_email_that_look_like_hostnames_never_become_dns(self, factory: CertFactory, root: Issued) -> None:
        """A URI SAN or email SAN naming a host never appears in san_dns (SAN type confusion)."""
        cert = load_pem(factory.leaf(root, uris=["admin.example.com"], emails=["admin.example.com"]).pem)
        assert cert.san_dns == ()
        assert cert.san_uri == ("admin.example.com",)
        assert cert.san_email == ("admin.example.com",)

    def test_dns_lower_casing_is_ascii_only(self, factory: CertFactory, root: Issued) -> None:
        """DNS SANs are lower-cased and lose one trailing dot."""
        cert = load_pem(factory.leaf(root, dns=["WWW.Example.ORG."]).pem)
        assert cert.san_dns == ("www.example.org",)

    def test_no_san_extension_gives_empty_tuples(self, factory: CertFactory, root: Issued) -> None:
        """A certificate without SubjectAltName has empty SAN tuples."""
        cert = load_pem(factory.leaf(root).pem)
        assert (cert.san_dns, cert.san_uri, cert.san_email, cert.san_ip) == ((), (), (), ())

    def test_fingerprint_is_sha256_of_der(self, leaf: Issued) -> None:
        """fingerprint_sha256 is the lower-case hex SHA-256 of the DER encoding."""
        cert = load_pem(leaf.pem)
        assert cert.der == leaf.der
        assert cert.fingerprint_sha256 == hashlib.sha256(leaf.der).hexdigest()

    def test_serial_issuer_and_times(self, leaf: Issued, intermediate: Issued) -> None:
        """Serial, issuer and tz-aware UTC validity times come from the certificate."""
        cert = load_pem(leaf.pem)
        assert cert.serial == leaf.cert.serial_number
        assert cert.issuer.values("CN") == ("Test Issuing CA",)
        assert cert.not_before == leaf.cert.not_valid_before_utc
        assert cert.not_after.tzinfo is not None
        assert cert.not_after.utcoffset() == timedelta(0)

    def test_equality_and_hash_follow_der(self, leaf: Issued) -> None:
        """Two parses of the same certificate are equal and hash alike."""
        first, second = load_pem(leaf.pem), load_der(leaf.der)
        assert first == second
        assert len({first, second}) == 1

    def test_repr_does_not_dump_der(self, leaf: Issued) -> None:
        """repr() omits the DER bytes so logging a certificate object stays small."""
        assert "der=" not in repr(load_pem(leaf.pem))


@pytest.fixture(scope="module")
def bounded(factory: CertFactory, root: Issued) -> ClientCertificate:
    start = datetime(2030, 1, 1, 12, 0, 0, tzinfo=UTC)
    return load_pem(factory.leaf(root, not_before=start, not_after=start + timedelta(seconds=10)).pem)


class TestValidityAt:
    def test_valid_inside_window(self, bounded: ClientCertificate) -> None:
        """A time inside the window is valid."""
        assert bounded.validity_at(bounded.not_before + timedelta(seconds=5)) == "valid"

    def test_boundaries_are_inclusive(self, bounded: ClientCertificate) -> None:
        """notBefore and notAfter themselves are valid (RFC 5280 'inclusive')."""
        assert bounded.validity_at(bounded.not_before) == "valid"
        assert bounded.validity_at(bounded.not_after) == "valid"

    def test_one_second_before_is_not_yet_valid(self, bounded: ClientCertificate) -> None:
        """One second before notBefore is not-yet-valid."""
        assert bounded.validity_at(bounded.not_before - timedelta(seconds=1)) == "not-yet-valid"

    def test_just_after_not_after_is_expired(self, bounded: ClientCertificate) -> None:
        """Any instant after notAfter, even a microsecond, is expired."""
        assert bounded.validity_at(bounded.not_after + timedelta(microseconds=1)) == "expired"
        assert bounded.validity_at(bounded.not_after + timedelta(seconds=1)) == "expired"

    def test_other_timezone_compares_as_instant(self, bounded: ClientCertificate) -> None:
        """A tz-aware time in another zone is compared as the same instant."""
        from datetime import timezone

        plus2 = timezone(timedelta(hours=2))
        assert bounded.validity_at(bounded.not_before.astimezone(plus2) - timedelta(seconds=1)) == ("not-yet-valid")

    def test_naive_datetime_rejected(self, bounded: ClientCertificate) -> None:
        """A naive datetime is a programming error, not silently treated as UTC or local time."""
        with pytest.raises(ValueError, match="timezone-aware"):
            bounded.validity_at(datetime(2030, 1, 1, 12, 0, 5))


class TestLoading:
    def test_load_pem_accepts_str_bytes_and_crlf(self, leaf: Issued) -> None:
        """load_pem accepts str, bytes and CRLF line endings."""
        expected = load_pem(leaf.pem).fingerprint_sha256
        assert load_pem(leaf.pem.encode()).fingerprint_sha256 == expected
        assert load_pem(leaf.pem.replace("\n", "\r\n")).fingerprint_sha256 == expected

    def test_load_pem_rejects_two_certificates(self, leaf: Issued) -> None:
        """load_pem refuses input holding two certificates instead of taking the first."""
        with pytest.raises(CertificateError, match="exactly one"):
            load_pem(leaf.chain_pem)

    def test_load_pem_chain_keeps_order(self, leaf: Issued, intermediate: Issued) -> None:
        """load_pem_chain returns every certificate in input order."""
        chain = load_pem_chain(leaf.chain_pem)
        assert [c.der for c in chain] == [leaf.der, intermediate.der]

    @pytest.mark.parametrize(
        "garbage",
        [
            "",
            "   \n",
            "hello world",
            "-----BEGIN CERTIFICATE-----\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
            "-----BEGIN CERTIFICATE-----\nMIIB",
        ],
    )
    def test_garbage_pem_raises_certificate_error(self, garbage: str) -> None:
        """Empty, non-PEM and structurally broken PEM raise CertificateError."""
        with pytest.raises(CertificateError):
            load_pem(garbage)
        with pytest.raises(CertificateError):
            load_pem_chain(garbage)

    def test_truncated_base64_rejected(self, leaf: Issued) -> None:
        """A PEM whose body was cut short is rejected."""
        lines = leaf.pem.splitlines()
        truncated = "\n".join([*lines[: len(lines) // 2], lines[-1]]) + "\n"
        with pytest.raises(CertificateError):
            load_pem(truncated)

    def test_corrupted_der_rejected(self, leaf: Issued) -> None:
        """DER with trailing bytes or a broken length is rejected by load_der."""
        with pytest.raises(CertificateError):
            load_der(leaf.der + b"\x00")
        with pytest.raises(CertificateError):
            load_der(leaf.der[:-5])
        with pytest.raises(CertificateError):
            load_der(b"")

    def test_private_key_or_extra_text_rejected(self, leaf: Issued) -> None:
        """Other PEM types and stray text next to a certificate are rejected, not skipped."""
        with pytest.raises(CertificateError):
            load_pem(leaf.key_pem)
        with pytest.raises(CertificateError):
            load_pem_chain(leaf.pem + leaf.key_pem)
        with pytest.raises(CertificateError):
            load_pem("subject=CN=admin\n" + leaf.pem)

    def test_huge_input_rejected_quickly(self, leaf: Issued) -> None:
        """Input above the size cap is refused before parsing."""
        huge = leaf.pem * (MAX_INPUT_BYTES // len(leaf.pem) + 1)
        with pytest.raises(CertificateError, match="too large"):
            load_pem_chain(huge)
        with pytest.raises(CertificateError, match="too large"):
            load_der(b"\x30" * (MAX_INPUT_BYTES + 1))

    def test_wrong_types_and_non_ascii_rejected(self) -> None:
        """Non-text input and non-ASCII PEM raise CertificateError, not TypeError."""
        for bad in (None, 42, ["pem"]):
            with pytest.raises(CertificateError):
                load_pem(bad)  # type: ignore[arg-type]
        with pytest.raises(CertificateError):
            load_der("not bytes")  # type: ignore[arg-type]
        with pytest.raises(CertificateError):
            load_pem("-----BEGIN CERTIFICATE-----\nMIIé\n-----END CERTIFICATE-----\n")

    def test_error_messages_do_not_echo_input(self, leaf: Issued) -> None:
        """Exception messages never contain the input or certificate contents."""
        secret = "CN=top-secret-admin"
        for bad in (secret, leaf.pem[:200] + secret):
            with pytest.raises(CertificateError) as caught:
                load_pem(bad)
            assert secret not in str(caught.value)
            assert "MII" not in str(caught.value)
        with pytest.raises(CertificateError) as caught:
            load_der(leaf.der[:-1])
        assert caught.value.__cause__ is None

    @given(st.text(max_size=300))
    def test_arbitrary_text_only_raises_certificate_error(self, text: str) -> None:
        """Arbitrary text never raises anything but CertificateError from the PEM loaders."""
        for loader in (load_pem, load_pem_chain):
            with contextlib.suppress(CertificateError):
                loader(text)

    @given(st.binary(max_size=600))
    def test_arbitrary_bytes_only_raise_certificate_error(self, data: bytes) -> None:
        """Arbitrary bytes never raise anything but CertificateError from load_der."""
        with contextlib.suppress(CertificateError):
            load_der(b"\x30\x82" + data)


class TestUnescapeNginx:
    def test_round_trip_with_nginx_escaping(self, leaf: Issued) -> None:
        """unescape_nginx inverts nginx's $ssl_client_escaped_cert encoding exactly."""
        assert unescape_nginx(escaped(leaf.pem)) == leaf.pem
        assert load_pem(unescape_nginx(escaped(leaf.pem))).der == leaf.der

    def test_lower_case_hex_and_alb_safe_characters(self, leaf: Issued) -> None:
        """Lower-case %xx and raw '+', '/', '=' (ALB style) decode; '+' stays a plus sign."""
        from urllib.parse import quote

        alb = quote(leaf.pem, safe="+/=")
        assert unescape_nginx(alb) == leaf.pem
        assert unescape_nginx("a%2bb+c%0a") == "a+b+c\n"

    @pytest.mark.parametrize("bad", ["%", "%2", "abc%zz", "%0G", "ab%", "caf\u00e9", "a\nb", "%FF", "%C3%A9"])
    def test_percent_garbage_rejected(self, bad: str) -> None:
        """Broken escapes, raw non-printable characters and non-ASCII results are rejected."""
        with pytest.raises(CertificateError):
            unescape_nginx(bad)

    def test_decodes_only_once(self) -> None:
        """A double-encoded value is decoded a single time."""
        assert unescape_nginx("%2520") == "%20"

    def test_size_and_type_limits(self) -> None:
        """Oversized and non-str values raise CertificateError."""
        with pytest.raises(CertificateError):
            unescape_nginx("A" * (3 * MAX_INPUT_BYTES + 1))
        with pytest.raises(CertificateError):
            unescape_nginx(b"%41")  # type: ignore[arg-type]


class TestCertificateCache:
    def test_parses_once_per_key(self, leaf: Issued) -> None:
        """The same key is parsed once; later lookups are hits returning the same object."""
        calls: list[str] = []

        def parse(key: str) -> ClientCertificate:
            calls.append(key)
            return load_pem(key)

        cache = CertificateCache()
        first = cache.get(leaf.pem, parse)
        second = cache.get(leaf.pem, parse)
        assert first is second
        assert len(calls) == 1
        assert (cache.hits, cache.misses, len(cache)) == (1, 1, 1)

    def test_failures_are_cached_and_reraised(self) -> None:
        """A failing key is parsed once and then re-raises the same CertificateError."""
        calls: list[str] = []

        def parse(key: str) -> ClientCertificate:
            calls.append(key)
            return load_pem(key)

        cache = CertificateCache()
        with pytest.raises(CertificateError) as first:
            cache.get("garbage", parse)
        for _ in range(50):
            with pytest.raises(CertificateError) as again:
                cache.get("garbage", parse)
            assert again.value is first.value
        assert len(calls) == 1
        assert cache.hits == 50
        # Re-raising must not accumulate traceback frames in the cached exception.
        assert len(list(traceback.walk_tb(again.value.__traceback__))) < 10

    def test_evicts_least_recently_used_at_bound(self, factory: CertFactory, root: Issued) -> None:
        """The cache holds at most max_entries and evicts the least recently used key."""
        pems = [factory.leaf(root, cn=f"c{i}").pem for i in range(3)]
        calls: list[str] = []

        def parse(key: str) -> ClientCertificate:
            calls.append(key)
            return load_pem(key)

        cache = CertificateCache(max_entries=2)
        cache.get(pems[0], parse)
        cache.get(pems[1], parse)
        cache.get(pems[0], parse)  # pems[0] becomes most recent
        cache.get(pems[2], parse)  # evicts pems[1]
        assert len(cache) == 2
        cache.get(pems[0], parse)
        assert len(calls) == 3
        cache.get(pems[1], parse)
        assert len(calls) == 4

    @given(
        max_entries=st.integers(1, 4),
        # Keys over a few tails and heads: several keys share a tail, so the exact-match tier is contended.
        keys=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 2)), max_size=60),
    )
    def test_parses_exactly_like_a_plain_lru(self, max_entries: int, keys: list[tuple[int, int]]) -> None:
        """Whatever the keys and their shared tails, the cache parses exactly when an LRU of max_entries misses."""
        from collections import OrderedDict

        cache = CertificateCache(max_entries=max_entries)
        model: OrderedDict[str, None] = OrderedDict()
        parsed: list[str] = []

        def parse(key: str) -> ClientCertificate:
            parsed.append(key)
            raise CertificateError(f"not a certificate: {key[:8]}")

        for head, tail in keys:
            key = f"head-{head}:" + "x" * 200 + f"tail-{tail}"
            expected_parse = key not in model
            model[key] = None
            model.move_to_end(key)
            if len(model) > max_entries:
                model.popitem(last=False)
            before = len(parsed)
            with pytest.raises(CertificateError, match=f"head-{head}"):
                cache.get(key, parse)
            assert (len(parsed) > before) == expected_parse
            assert len(cache) == len(model)

    def test_other_exceptions_are_not_cached(self) -> None:
        """Only CertificateError is cached; a bug in the parse function propagates every time."""

        def parse(key: str) -> ClientCertificate:
            raise RuntimeError("bug")

        cache = CertificateCache()
        for _ in range(2):
            with pytest.raises(RuntimeError):
                cache.get("k", parse)
        assert len(cache) == 0

    def test_invalid_bound_rejected(self) -> None:
        """A non-positive bound is a configuration error."""
        with pytest.raises(ValueError, match="max_entries"):
            CertificateCache(0)


class TestTrustBundle:
    def test_leaf_issued_by_root_verifies(self, factory: CertFactory, root: Issued) -> None:
        """A leaf signed directly by the bundle's root verifies."""
        bundle = TrustBundle.from_pem(root.pem)
        assert bundle.verify(load_pem(factory.leaf(root).pem), now=NOW) is None

    def test_leaf_via_supplied_intermediate_verifies(self, leaf: Issued, root: Issued) -> None:
        """A leaf issued by an intermediate verifies when the intermediate is supplied as chain."""
        bundle = TrustBundle.from_pem(root.pem)
        leaf_cert, *chain = load_pem_chain(leaf.chain_pem)
        assert bundle.verify(leaf_cert, chain, now=NOW) is None

    def test_missing_intermediate_is_untrusted(self, leaf: Issued, root: Issued) -> None:
        """Without the intermediate, a root-only bundle cannot build the path."""
        assert TrustBundle.from_pem(root.pem).verify(load_pem(leaf.pem), now=NOW) == "untrusted-issuer"

    def test_bundle_with_only_the_intermediate_is_an_anchor(self, leaf: Issued, intermediate: Issued) -> None:
        """A bundle holding only the issuing intermediate anchors the path (partial chain)."""
        assert TrustBundle.from_pem(intermediate.pem).verify(load_pem(leaf.pem), now=NOW) is None

    def test_rogue_self_signed_with_ca_subject_never_verifies(self, factory: CertFactory, root: Issued) -> None:
        """A self-signed certificate whose subject and issuer copy the CA's DN does not verify."""
        rogue = load_pem(factory.self_signed_leaf(subject=root.cert.subject).pem)
        assert rogue.issuer == load_pem(root.pem).subject
        assert TrustBundle.from_pem(root.pem).verify(rogue, now=NOW) in ("untrusted-issuer", "bad-signature")

    def test_rogue_ca_with_same_dn_cannot_issue(self, factory: CertFactory, root: Issued) -> None:
        """A leaf from a different CA that copies the trusted CA's DN fails on the signature."""
        impostor = factory.ca(subject=root.cert.subject)
        leaf = load_pem(factory.leaf(impostor).pem)
        bundle = TrustBundle.from_pem(root.pem)
        assert bundle.verify(leaf, now=NOW) == "bad-signature"
        assert bundle.verify(leaf, [load_pem(impostor.pem)], now=NOW) == "bad-signature"

    def test_forged_intermediate_with_real_dn_rejected(
        self, factory: CertFactory, root: Issued, intermediate: Issued
    ) -> None:
        """A self-made intermediate copying the real intermediate's DN cannot link to the root."""
        fake = factory.ca(subject=intermediate.cert.subject, parent=factory.ca(subject=root.cert.subject))
        leaf = load_pem(factory.leaf(fake).pem)
        assert TrustBundle.from_pem(root.pem).verify(leaf, [load_pem(fake.pem)], now=NOW) == "bad-signature"

    def test_untrusted_root_in_chain_grants_nothing(self, factory: CertFactory, root: Issued) -> None:
        """Supplying another root and its intermediate as chain does not create trust."""
        other_root = factory.ca("Other Root")
        other_int = factory.ca("Other Issuing", parent=other_root)
        leaf = load_pem(factory.leaf(other_int).pem)
        chain = [load_pem(other_int.pem), load_pem(other_root.pem)]
        assert TrustBundle.from_pem(root.pem).verify(leaf, chain, now=NOW) == "untrusted-issuer"

    def test_expired_intermediate(self, factory: CertFactory) -> None:
        """An intermediate that has expired makes the chain 'expired-chain'."""
        root = factory.ca("Long Root", not_before=NOW - timedelta(days=60))
        old = factory.ca(
            "Old Issuing",
            parent=root,
            not_before=NOW - timedelta(days=30),
            not_after=NOW - timedelta(days=1),
        )
        # Valid from before the intermediate expired, so a moment exists when the whole path is valid.
        leaf = load_pem(factory.leaf(old, not_before=NOW - timedelta(days=3)).pem)
        bundle = TrustBundle.from_pem(root.pem)
        assert bundle.verify(leaf, [load_pem(old.pem)], now=NOW) == "expired-chain"
        assert bundle.verify(leaf, [load_pem(old.pem)], now=NOW - timedelta(days=2)) is None

    def test_not_yet_valid_and_expired_anchor(self, factory: CertFactory) -> None:
        """The anchor's own validity is checked at 'now' too."""
        future = factory.ca("Future Root", not_before=NOW + timedelta(days=1))
        leaf = load_pem(factory.leaf(future).pem)
        assert TrustBundle.from_pem(future.pem).verify(leaf, now=NOW) == "not-yet-valid-chain"
        assert TrustBundle.from_pem(future.pem).verify(leaf, now=NOW + timedelta(days=2)) is None
        past = factory.ca("Past Root", not_before=NOW - timedelta(days=9), not_after=NOW - timedelta(days=2))
        leaf = load_pem(factory.leaf(past).pem)
        assert TrustBundle.from_pem(past.pem).verify(leaf, now=NOW) == "expired-chain"

    def test_renewed_intermediate_is_found_among_alternatives(self, factory: CertFactory, root: Issued) -> None:
        """With an expired and a renewed copy of the same intermediate, the valid path wins."""
        key = factory.new_key()
        expired = factory.ca("Rolling", parent=root, key=key, not_after=NOW - timedelta(hours=1))
        renewed = factory.ca("Rolling", parent=root, key=key)
        leaf = load_pem(factory.leaf(renewed).pem)
        chain = [load_pem(expired.pem), load_pem(renewed.pem)]
        assert TrustBundle.from_pem(root.pem).verify(leaf, chain, now=NOW) is None

    def test_serverauth_only_leaf_is_not_client_cert(self, factory: CertFactory, root: Issued) -> None:
        """A leaf whose EKU lists only serverAuth is 'not-client-cert'."""
        server = load_pem(factory.leaf(root, eku=[ExtendedKeyUsageOID.SERVER_AUTH]).pem)
        assert TrustBundle.from_pem(root.pem).verify(server, now=NOW) == "not-client-cert"

    def test_leaf_without_eku_is_accepted(self, factory: CertFactory, root: Issued) -> None:
        """A leaf with no EKU extension at all is unrestricted and verifies."""
        plain = load_pem(factory.leaf(root, client_auth=False).pem)
        assert plain.extended_key_usage is None
        assert TrustBundle.from_pem(root.pem).verify(plain, now=NOW) is None

    def test_ca_certificate_as_leaf_is_not_client_cert(self, root: Issued, intermediate: Issued) -> None:
        """Presenting a CA certificate (even the anchor itself) as client certificate is refused."""
        bundle = TrustBundle.from_pem(root.pem)
        assert bundle.verify(load_pem(root.pem), now=NOW) == "not-client-cert"
        assert bundle.verify(load_pem(intermediate.pem), now=NOW) == "not-client-cert"

    def test_chain_too_long(self, factory: CertFactory, root: Issued) -> None:
        """A path with more than four intermediates is 'chain-too-long'."""
        parent, chain = root, []
        for depth in range(5):
            parent = factory.ca(f"Level {depth}", parent=parent)
            chain.append(load_pem(parent.pem))
        leaf = load_pem(factory.leaf(parent).pem)
        bundle = TrustBundle.from_pem(root.pem)
        assert bundle.verify(leaf, chain, now=NOW) == "chain-too-long"
        assert TrustBundle.from_pem(parent.pem).verify(leaf, now=NOW) is None

    def test_path_length_constraint_enforced(self, factory: CertFactory) -> None:
        """A root with pathLenConstraint 0 cannot anchor a path through an intermediate."""
        strict_root = factory.ca("Strict Root", path_length=0)
        sub = factory.ca("Sub", parent=strict_root)
        leaf = load_pem(factory.leaf(sub).pem)
        bundle = TrustBundle.from_pem(strict_root.pem)
        assert bundle.verify(leaf, [load_pem(sub.pem)], now=NOW) == "chain-too-long"
        assert bundle.verify(load_pem(factory.leaf(strict_root).pem), now=NOW) is None

    def test_too_many_supplied_intermediates(self, factory: CertFactory, root: Issued) -> None:
        """A flood of supplied intermediates is refused before any path search."""
        junk = [load_pem(factory.ca(f"Junk {i}", parent=root).pem) for i in range(9)]
        leaf = load_pem(factory.leaf(root).pem)
        assert TrustBundle.from_pem(root.pem).verify(leaf, junk, now=NOW) == "chain-too-long"

    def test_non_ca_in_bundle_rejected(self, root: Issued, leaf: Issued) -> None:
        """from_pem refuses a bundle containing a non-CA certificate, naming its position only."""
        with pytest.raises(CertificateError, match=r"#2 is not a CA") as caught:
            TrustBundle.from_pem(root.pem + leaf.pem)
        assert "svc-payments" not in str(caught.value)

    def test_empty_or_garbage_bundle_rejected(self) -> None:
        """An empty or unparsable bundle raises CertificateError."""
        for bad in ("", "not a bundle"):
            with pytest.raises(CertificateError):
                TrustBundle.from_pem(bad)

    def test_fingerprints_exposed(self, root: Issued, intermediate: Issued) -> None:
        """fingerprints holds the SHA-256 of every bundle certificate."""
        bundle = TrustBundle.from_pem(root.pem + intermediate.pem)
        assert bundle.fingerprints == frozenset(hashlib.sha256(i.der).hexdigest() for i in (root, intermediate))

    def test_naive_now_rejected(self, root: Issued, leaf: Issued) -> None:
        """verify() requires a timezone-aware 'now'."""
        with pytest.raises(ValueError, match="timezone-aware"):
            TrustBundle.from_pem(root.pem).verify(load_pem(leaf.pem), now=datetime(2030, 1, 1))
