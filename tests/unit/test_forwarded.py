"""Unit tests for plugins.mtls_guard.forwarded: XFCC, URL-encoded PEM and RFC 9440 forwarded certificates."""

from __future__ import annotations

import base64
import contextlib
import time
from collections.abc import Callable
from urllib.parse import quote

import pytest
from cryptography.hazmat.primitives.serialization import Encoding
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from plugins.mtls_guard.forwarded import (
    ForwardedCertificate,
    ForwardedFormat,
    build_xfcc,
    parse_forwarded,
)
from plugins.mtls_guard.identity import CertificateCache, CertificateError, ClientCertificate, load_pem
from tests.certs import CertFactory, Issued, escaped

XFCC = ForwardedFormat.XFCC
PEM = ForwardedFormat.PEM_URLENCODED
RFC9440 = ForwardedFormat.RFC9440


@pytest.fixture(scope="module")
def factory() -> CertFactory:
    return CertFactory()


@pytest.fixture(scope="module")
def root(factory: CertFactory) -> Issued:
    return factory.ca()


@pytest.fixture(scope="module")
def intermediate(factory: CertFactory, root: Issued) -> Issued:
    return factory.ca("Issuing CA", parent=root)


@pytest.fixture(scope="module")
def leaf(factory: CertFactory, intermediate: Issued) -> Issued:
    return factory.leaf(
        intermediate,
        cn="client",
        dns=["client.example"],
        uris=["spiffe://example.org/ns/a/sa/client"],
        subject_extra={"O": "Example"},
        chain=[intermediate],
    )


@pytest.fixture(scope="module")
def leaf_cert(leaf: Issued) -> ClientCertificate:
    return load_pem(leaf.pem)


def sf(issued: Issued) -> str:
    """RFC 8941 byte sequence of a certificate's DER."""
    return ":" + base64.b64encode(issued.der).decode("ascii") + ":"


def parse(fmt: ForwardedFormat, *values: str, chain: tuple[str, ...] = ()) -> ForwardedCertificate:
    result = parse_forwarded(fmt, list(values), list(chain))
    assert result is not None
    return result


class TestCommon:
    @pytest.mark.parametrize("fmt", list(ForwardedFormat))
    def test_absent_header_is_none(self, fmt: ForwardedFormat) -> None:
        """No header at all means no forwarded certificate (None), for every format."""
        assert parse_forwarded(fmt, []) is None

    @pytest.mark.parametrize("fmt", list(ForwardedFormat))
    def test_empty_header_is_an_error(self, fmt: ForwardedFormat) -> None:
        """A present but empty header is unusable, not 'absent'."""
        with pytest.raises(CertificateError, match="empty"):
            parse_forwarded(fmt, [""])
        with pytest.raises(CertificateError, match="empty"):
            parse_forwarded(fmt, ["  "])

    def test_repeated_header_rejected(self, leaf: Issued, leaf_cert: ClientCertificate) -> None:
        """Two occurrences of the certificate header are rejected in every format, even if identical."""
        cases = {
            XFCC: build_xfcc(leaf_cert),
            PEM: escaped(leaf.pem),
            RFC9440: sf(leaf),
        }
        for fmt, value in cases.items():
            with pytest.raises(CertificateError, match="repeated"):
                parse_forwarded(fmt, [value, value])

    def test_bare_string_values_are_a_type_error(self, leaf: Issued) -> None:
        """Passing one string instead of a list of header values is a programming error."""
        with pytest.raises(TypeError):
            parse_forwarded(PEM, escaped(leaf.pem))

    def test_cache_shared_between_formats(self, leaf: Issued, leaf_cert: ClientCertificate) -> None:
        """The same certificate arriving as PEM, RFC 9440 or XFCC is parsed once through the cache."""
        cache = CertificateCache()
        results = [
            parse_forwarded(PEM, [escaped(leaf.pem)], cache=cache),
            parse_forwarded(RFC9440, [sf(leaf)], cache=cache),
            parse_forwarded(XFCC, [build_xfcc(leaf_cert)], cache=cache),
        ]
        assert all(r is not None and r.leaf == leaf_cert for r in results)
        assert (cache.misses, cache.hits) == (1, 2)

    def test_cached_failure_still_raises(self) -> None:
        """A bad certificate seen twice raises CertificateError both times and is parsed once."""
        cache = CertificateCache()
        for _ in range(2):
            with pytest.raises(CertificateError):
                parse_forwarded(RFC9440, [":MIIB:"], cache=cache)
        assert (cache.misses, cache.hits) == (1, 1)

    @given(fmt=st.sampled_from(list(ForwardedFormat)), values=st.lists(st.text(max_size=200), max_size=3))
    def test_arbitrary_text_only_raises_certificate_error(self, fmt: ForwardedFormat, values: list[str]) -> None:
        """Arbitrary header text never raises anything but CertificateError."""
        with contextlib.suppress(CertificateError):
            parse_forwarded(fmt, values)

    @given(fmt=st.sampled_from(list(ForwardedFormat)), chain=st.lists(st.text(max_size=100), max_size=3))
    def test_arbitrary_chain_text_only_raises_certificate_error(self, fmt: ForwardedFormat, chain: list[str]) -> None:
        """Arbitrary chain-header text next to a valid leaf never raises anything but CertificateError."""
        leaf_value = {
            XFCC: 'Cert="x"',
            PEM: "-----BEGIN%20CERTIFICATE-----%0A",
            RFC9440: ":AAAA:",
        }[fmt]
        with contextlib.suppress(CertificateError):
            parse_forwarded(fmt, [leaf_value], chain)

    @settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.data())
    def test_mutated_valid_values_only_raise_certificate_error(
        self, leaf: Issued, intermediate: Issued, leaf_cert: ClientCertificate, data: st.DataObject
    ) -> None:
        """Valid values with random edits, cuts and insertions either parse or raise CertificateError."""
        fmt = data.draw(st.sampled_from(list(ForwardedFormat)))
        value = {
            XFCC: build_xfcc(leaf_cert, by="spiffe://p") + f';Chain="{escaped(leaf.chain_pem)}"',
            PEM: escaped(leaf.chain_pem),
            RFC9440: sf(leaf),
        }[fmt]
        for _ in range(data.draw(st.integers(1, 4))):
            pos = data.draw(st.integers(0, len(value)))
            cut = data.draw(st.integers(0, 8))
            insert = data.draw(st.text(alphabet=st.sampled_from(',;=":% \\\t-+/AZaz09é\x00'), max_size=4))
            value = value[:pos] + insert + value[pos + cut :]
        chain = [sf(intermediate)] if fmt is RFC9440 else []
        with contextlib.suppress(CertificateError):
            result = parse_forwarded(fmt, [value], chain)
            assert result is None or isinstance(result.leaf, ClientCertificate)

    @pytest.mark.parametrize("fmt", list(ForwardedFormat))
    def test_pathological_large_values_fail_fast(self, fmt: ForwardedFormat) -> None:
        """Large near-miss values (unterminated quotes, endless base64) are rejected in linear time."""
        body = "A" * (4 * 64 * 1024)
        values = {
            XFCC: 'Cert="' + "\\a" * (len(body) // 3),
            PEM: "-----BEGIN%20CERTIFICATE-----%0A" + body,
            RFC9440: ":" + body,
        }
        started = time.perf_counter()
        with pytest.raises(CertificateError):
            parse_forwarded(fmt, [values[fmt]])
        assert time.perf_counter() - started < 0.5


class TestXfcc:
    def test_round_trip_from_real_certificate(self, leaf_cert: ClientCertificate) -> None:
        """build_xfcc output parses back to the same certificate with no chain."""
        result = parse(XFCC, build_xfcc(leaf_cert, by="spiffe://example.org/ns/edge/sa/proxy"))
        assert result.leaf == leaf_cert
        assert result.chain == ()

    def test_envoy_style_element_with_chain(self, leaf: Issued, intermediate: Issued) -> None:
        """An Envoy-shaped element with lower-case escapes and a Chain including the leaf parses."""
        cert = quote(leaf.pem, safe="").replace("%0A", "%0a")
        chain = quote(leaf.chain_pem, safe="")
        value = (
            f"By=spiffe://cluster.local/ns/edge/sa/gw;Hash={load_pem(leaf.pem).fingerprint_sha256};"
            f'Cert="{cert}";Chain="{chain}";Subject="O=Example,CN=client";'
            "URI=spiffe://example.org/ns/a/sa/client;DNS=client.example"
        )
        result = parse(XFCC, value)
        assert result.leaf.der == leaf.der
        assert [c.der for c in result.chain] == [intermediate.der]

    def test_keys_are_case_insensitive_and_ows_tolerated(self, leaf: Issued) -> None:
        """Keys match case-insensitively and spaces around separators are accepted."""
        result = parse(XFCC, f"by=x ; CERT={escaped(leaf.pem)} ")
        assert result.leaf.der == leaf.der

    def test_subject_uri_dns_fields_are_ignored_for_identity(self, leaf: Issued, leaf_cert: ClientCertificate) -> None:
        """Forged Subject/URI/DNS/By text does not change the identity, which comes from Cert."""
        value = (
            'By=spiffe://evil;Subject="CN=admin,OU=Admins,O=Root";URI=spiffe://example.org/ns/kube-system/sa/admin;'
            f'DNS=admin.internal;Cert="{escaped(leaf.pem)}"'
        )
        result = parse(XFCC, value)
        assert result.leaf == leaf_cert
        assert result.leaf.subject.values("CN") == ("client",)
        assert result.leaf.subject.values("OU") == ()
        assert result.leaf.san_uri == ("spiffe://example.org/ns/a/sa/client",)
        assert result.leaf.san_dns == ("client.example",)

    def test_two_elements_rejected(self, leaf_cert: ClientCertificate, factory: CertFactory, root: Issued) -> None:
        """An XFCC value with two elements (two hops or an appended forgery) is rejected."""
        other = load_pem(factory.leaf(root, cn="admin").pem)
        for value in (
            f"{build_xfcc(leaf_cert)},{build_xfcc(other)}",
            f"{build_xfcc(other)}, {build_xfcc(leaf_cert)}",
            f"{build_xfcc(leaf_cert)},By=x",
        ):
            with pytest.raises(CertificateError, match="more than one element"):
                parse(XFCC, value)

    def test_quoted_separators_do_not_split(self, leaf: Issued) -> None:
        """',' and ';' and escaped quotes inside a quoted value do not split elements or pairs."""
        value = f'Subject="CN=a\\"b\\\\,O=x;y";Cert="{escaped(leaf.pem)}";URI="urn:a,b;c"'
        assert parse(XFCC, value).leaf.der == leaf.der

    def test_hash_mismatch_rejected(self, leaf: Issued, factory: CertFactory, root: Issued) -> None:
        """A Hash that is not the SHA-256 of Cert is rejected."""
        wrong = load_pem(factory.leaf(root).pem).fingerprint_sha256
        with pytest.raises(CertificateError, match="Hash"):
            parse(XFCC, f"Hash={wrong};Cert={escaped(leaf.pem)}")

    @pytest.mark.parametrize("bad_hash", ["", "abc", "zz" * 32, "sha256:00"])
    def test_malformed_hash_rejected(self, leaf: Issued, bad_hash: str) -> None:
        """A Hash that is not 64 hex digits is rejected."""
        with pytest.raises(CertificateError, match="Hash"):
            parse(XFCC, f"Hash={bad_hash};Cert={escaped(leaf.pem)}")

    def test_upper_case_hash_accepted(self, leaf: Issued, leaf_cert: ClientCertificate) -> None:
        """Hash comparison ignores hex case."""
        assert parse(XFCC, f"Hash={leaf_cert.fingerprint_sha256.upper()};Cert={escaped(leaf.pem)}").leaf == leaf_cert

    def test_missing_cert_rejected(self, leaf_cert: ClientCertificate) -> None:
        """An element without Cert is unusable even when Subject/URI/Hash are present."""
        value = f'Hash={leaf_cert.fingerprint_sha256};Subject="CN=client";URI=spiffe://x'
        with pytest.raises(CertificateError, match="no Cert"):
            parse(XFCC, value)

    def test_duplicate_cert_or_hash_rejected(self, leaf: Issued, leaf_cert: ClientCertificate) -> None:
        """Cert, Hash and Chain may appear once per element."""
        cert = escaped(leaf.pem)
        for value in (
            f"Cert={cert};Cert={cert}",
            f"Hash={leaf_cert.fingerprint_sha256};Hash={leaf_cert.fingerprint_sha256};Cert={cert}",
            f"Cert={cert};Chain={cert};chain={cert}",
        ):
            with pytest.raises(CertificateError, match="repeats"):
                parse(XFCC, value)

    @pytest.mark.parametrize(
        "template",
        [
            'Cert="{c}',  # unterminated quote
            'Cert="{c}"x',  # junk after closing quote
            'Cert={c}"x"',  # quote inside bare value
            "Cert={c};",  # dangling separator
            "Cert{c}",  # no '='
            "=x;Cert={c}",  # empty key
            'Cert="{c}\\',  # trailing backslash
            "Cert={c};;By=x",  # empty pair
        ],
    )
    def test_bad_syntax_rejected(self, leaf: Issued, template: str) -> None:
        """Malformed quoting or separators are rejected rather than repaired."""
        with pytest.raises(CertificateError):
            parse(XFCC, template.format(c=escaped(leaf.pem)))

    def test_bad_cert_encoding_rejected(self, leaf: Issued) -> None:
        """A Cert that is raw PEM with newlines, broken %-escapes or two certificates is rejected."""
        for cert in (leaf.pem, escaped(leaf.pem).replace("%0A", "%0"), escaped(leaf.chain_pem), "garbage"):
            with pytest.raises(CertificateError):
                parse(XFCC, f'Cert="{cert}"')

    def test_chain_must_contain_cert(self, leaf: Issued, intermediate: Issued) -> None:
        """A Chain that does not include the Cert leaf is inconsistent and rejected."""
        with pytest.raises(CertificateError, match="Chain"):
            parse(XFCC, f"Cert={escaped(leaf.pem)};Chain={escaped(intermediate.pem)}")

    def test_separate_chain_header_refused(self, leaf_cert: ClientCertificate, intermediate: Issued) -> None:
        """XFCC carries its own chain; a separate chain header is refused."""
        with pytest.raises(CertificateError, match="chain header"):
            parse(XFCC, build_xfcc(leaf_cert), chain=(escaped(intermediate.pem),))


class TestBuildXfcc:
    def test_contains_envoy_fields(self, leaf_cert: ClientCertificate) -> None:
        """The element has By, Hash, quoted Cert and Subject, URI and DNS in Envoy's order."""
        value = build_xfcc(leaf_cert, by="spiffe://proxy")
        keys = [part.split("=", 1)[0] for part in value.split(";")]
        assert keys == ["By", "Hash", "Cert", "Subject", "URI", "DNS"]
        assert f"Hash={leaf_cert.fingerprint_sha256}" in value
        assert 'Subject="CN=client,O=Example"' in value
        assert f'Cert="{escaped(leaf_cert.certificate.public_bytes(Encoding.PEM).decode())}"' in value

    def test_header_safe_for_hostile_names(self, factory: CertFactory, root: Issued) -> None:
        """Quotes, separators, non-ASCII and control characters never break out of the header value."""
        hostile = load_pem(
            factory.leaf(
                root,
                cn='x"\r\nX-Injected: 1;By=evil,Cert=y',
                subject_extra={"O": "Müller \\ Co"},
                uris=["urn:a;b,c", "urn:bad\r\nX-Evil: 1"],
                dns=["ok.example"],
            ).pem
        )
        value = build_xfcc(hostile)
        assert value.isascii()
        assert all(0x20 <= ord(ch) < 0x7F for ch in value)
        result = parse(XFCC, value)
        assert result.leaf == hostile
        assert 'URI="urn:a;b,c"' in value
        assert "X-Evil" not in value

    def test_invalid_by_rejected(self, leaf_cert: ClientCertificate) -> None:
        """A 'by' value that is empty or not printable ASCII is a configuration error."""
        for by in ("", "a\r\nb", "é"):
            with pytest.raises(ValueError, match="by"):
                build_xfcc(leaf_cert, by=by)


class TestPemUrlencoded:
    def test_round_trip_nginx_escaped_leaf(self, leaf: Issued, leaf_cert: ClientCertificate) -> None:
        """An nginx-style escaped leaf parses to the certificate with no chain."""
        result = parse(PEM, escaped(leaf.pem))
        assert result.leaf == leaf_cert
        assert result.chain == ()

    def test_alb_leaf_followed_by_chain(self, leaf: Issued, intermediate: Issued) -> None:
        """An ALB-style value (leaf then intermediates, '+/=' left raw) yields leaf and chain."""
        result = parse(PEM, quote(leaf.chain_pem, safe="+=/"))
        assert result.leaf.der == leaf.der
        assert [c.der for c in result.chain] == [intermediate.der]

    def test_separate_chain_headers(self, leaf: Issued, intermediate: Issued, root: Issued) -> None:
        """Chain header values are appended as intermediates in order."""
        result = parse(PEM, escaped(leaf.pem), chain=(escaped(intermediate.pem), escaped(root.pem)))
        assert [c.der for c in result.chain] == [intermediate.der, root.der]

    @pytest.mark.parametrize(
        "value",
        ["garbage", "%ZZ", "-----BEGIN%20CERTIFICATE-----%0AAAAA%0A-----END%20CERTIFICATE-----%0A", "%E2%82%AC"],
    )
    def test_garbage_rejected(self, value: str) -> None:
        """Values that are not URL-encoded PEM certificates are rejected."""
        with pytest.raises(CertificateError):
            parse(PEM, value)

    def test_too_many_certificates_rejected(self, leaf: Issued) -> None:
        """More certificates than any real chain holds are refused before parsing them all."""
        with pytest.raises(CertificateError, match="too many"):
            parse(PEM, escaped(leaf.pem * 11))


class TestRfc9440:
    def test_round_trip_with_chain(self, leaf: Issued, intermediate: Issued, root: Issued) -> None:
        """Client-Cert plus a two-member Client-Cert-Chain parse to leaf and ordered chain."""
        result = parse(RFC9440, sf(leaf), chain=(f"{sf(intermediate)}, {sf(root)}",))
        assert result.leaf.der == leaf.der
        assert [c.der for c in result.chain] == [intermediate.der, root.der]

    def test_chain_split_over_field_lines(self, leaf: Issued, intermediate: Issued, root: Issued) -> None:
        """Several Client-Cert-Chain field lines combine into one list."""
        result = parse(RFC9440, sf(leaf), chain=(sf(intermediate), sf(root)))
        assert [c.der for c in result.chain] == [intermediate.der, root.der]

    def test_missing_padding_tolerated(self, factory: CertFactory, root: Issued) -> None:
        """Unpadded base64 is accepted (RFC 8941 s4.2.7: parsers SHOULD NOT fail on missing padding)."""
        issued = next(i for i in (factory.leaf(root, cn=f"p{n}") for n in range(20)) if len(i.der) % 3)
        unpadded = sf(issued).replace("=", "")
        assert parse(RFC9440, unpadded).leaf.der == issued.der

    def test_surrounding_whitespace_tolerated(self, leaf: Issued) -> None:
        """Leading and trailing SP/HTAB around the item are stripped."""
        assert parse(RFC9440, f" \t{sf(leaf)} ").leaf.der == leaf.der

    @pytest.mark.parametrize(
        ("mutate", "message"),
        [
            (lambda v: v[1:], "byte sequence"),  # no opening colon
            (lambda v: v[:-1], "byte sequence"),  # no closing colon
            (lambda v: v.strip(":"), "byte sequence"),  # bare base64 token
            (lambda v: v[:20] + " " + v[20:], "byte sequence"),  # space inside
            (lambda v: v[:20] + "-_" + v[22:], "byte sequence"),  # base64url alphabet
            (lambda v: v + ";a=1", "byte sequence"),  # parameters
            (lambda v: v + ", " + v, "byte sequence"),  # a list, not an item
            (lambda v: '"' + v + '"', "byte sequence"),  # string
            (lambda v: v.rstrip(":=") + "===:", "byte sequence"),  # three padding characters
            (lambda v: ":QUJD=D:", "byte sequence"),  # padding in the middle
            (lambda v: ":QUJDR===:", "byte sequence"),  # padding beyond a length that needs none
            (lambda v: ":QUJDRA=:", "padding"),  # wrong amount of padding for the length
            (lambda v: ":Q:", "padding"),  # length % 4 == 1 cannot be base64
            (lambda v: "::", "padding"),  # empty byte sequence
        ],
    )
    def test_malformed_byte_sequences_rejected(self, leaf: Issued, mutate: Callable[[str], str], message: str) -> None:
        """Anything but exactly one well-formed sf-binary item is rejected at the syntax level."""
        with pytest.raises(CertificateError, match=message):
            parse(RFC9440, mutate(sf(leaf)))

    @pytest.mark.parametrize("chain", [", ", "{c},", ",{c}", "{c},,{c}", "{c};x", "{c} {c}"])
    def test_malformed_chain_rejected(self, leaf: Issued, intermediate: Issued, chain: str) -> None:
        """Empty members, parameters or missing commas in Client-Cert-Chain are rejected."""
        with pytest.raises(CertificateError):
            parse(RFC9440, sf(leaf), chain=(chain.format(c=sf(intermediate)),))

    def test_valid_base64_of_garbage_rejected(self) -> None:
        """A well-formed byte sequence that is not a DER certificate is rejected."""
        with pytest.raises(CertificateError):
            parse(RFC9440, ":" + base64.b64encode(b"not a certificate").decode() + ":")

    def test_chain_without_client_cert_is_absent(self, intermediate: Issued) -> None:
        """A chain header alone carries no leaf, so there is no forwarded certificate."""
        assert parse_forwarded(RFC9440, [], [sf(intermediate)]) is None
