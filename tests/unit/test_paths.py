"""Which path exemption rules see: $uri literally (delivered by our Rewrite), an earlier plugin's
$upstream_uri decoded once (delivered as is), and which forms are ambiguous in either."""

from __future__ import annotations

import pytest

from plugins.mtls_guard.paths import classify_path, exempt_path


def encoded(raw: str | None) -> tuple[str, str]:
    return classify_path(raw, encoded=True)


def decoded(raw: str | None) -> tuple[str, str]:
    return classify_path(raw, encoded=False)


class TestDecodedUri:
    """$uri: nginx decoded it once; mtls-guard delivers it with a Rewrite, so it is matched as it is."""

    @pytest.mark.parametrize("raw", ["/", "/api/v1/items", "/trailing/", "/Public", "/a b", "/café", "/a..b/..."])
    def test_matched_literally(self, raw: str) -> None:
        """A clean decoded path is matched exactly as given."""
        assert decoded(raw) == (raw, "")

    @pytest.mark.parametrize("raw", ["/p%75blic", "/100%", "/a%2e%2e/b", "/%2570ublic/x"])
    def test_literal_percent_is_ambiguous(self, raw: str) -> None:
        """A "%" in $uri came from "%25": it is never decoded again, and never exempt."""
        assert decoded(raw) == (raw, "literal-percent")
        assert exempt_path(raw, encoded=False) is None

    @pytest.mark.parametrize("raw", ["/public/../admin", "//admin", "/a;b", "/a\\b", "/a?b", "/a#b", "/a\nb"])
    def test_structure_is_ambiguous(self, raw: str) -> None:
        """Dot and empty segments, ";", "\\", "?", "#" and controls in $uri are never exempt."""
        assert decoded(raw) == (raw, "ambiguous-characters")

    def test_unicode_lookalikes(self) -> None:
        """A fullwidth solidus in $uri is ambiguous (NFKC folds it into "/")."""
        assert decoded("/public\uff0fadmin") == ("/public\uff0fadmin", "unicode-ambiguous")


class TestUnambiguousPaths:
    @pytest.mark.parametrize(
        ("raw", "expected"),
        [
            ("/", "/"),
            ("/api/v1/items", "/api/v1/items"),
            ("/trailing/", "/trailing/"),
            ("/Public", "/Public"),
            ("/.well-known/acme-challenge/x", "/.well-known/acme-challenge/x"),
            ("/a..b/...", "/a..b/..."),
            ("/a%20b", "/a b"),
            ("/caf%C3%A9", "/café"),
            ("/café", "/café"),
            ("/%41dmin", "/Admin"),
            ("/%2e%2ex", "/..x"),
            ("/a%2Eb", "/a.b"),
        ],
    )
    def test_decoded_value(self, raw: str, expected: str) -> None:
        """An encoded path free of ambiguous forms is percent-decoded once, case preserved, and matched as such."""
        assert encoded(raw) == (expected, "")


class TestAmbiguousPaths:
    @pytest.mark.parametrize(
        "raw",
        [
            pytest.param(None, id="none"),
            pytest.param("", id="empty"),
            pytest.param("admin", id="relative"),
            pytest.param("*", id="asterisk-form"),
            pytest.param("http://h/admin", id="absolute-form"),
        ],
    )
    def test_missing_or_not_absolute(self, raw: str | None) -> None:
        """A path that is absent or does not start with "/" is ambiguous."""
        assert encoded(raw)[1]
        assert decoded(raw)[1]

    @pytest.mark.parametrize("raw", ["/a%zz", "/a%4", "/a%", "/%%41", "/%g0"])
    def test_invalid_percent_encoding(self, raw: str) -> None:
        """A "%" that does not start two hex digits makes the path ambiguous."""
        assert encoded(raw) == (raw, "bad-escape")

    @pytest.mark.parametrize("raw", ["/public%2F..%2Fadmin", "/a%2fb", "/a%5Cb", "/a%5cb", "/a%252e%252e/b", "/100%25"])
    def test_encoded_separators_and_double_encoding(self, raw: str) -> None:
        """Encoded slash, encoded backslash and encoded "%" (double encoding) are never decoded."""
        assert encoded(raw) == (raw, "encoded-separator")

    @pytest.mark.parametrize(
        "raw",
        [
            "/public/../admin",
            "/public/..",
            "/./admin",
            "/a/.",
            "/..",
            "//admin",
            "/a//b",
            "/public;/../admin",
            "/public/..;/admin",
            "/a;jsessionid=1",
            "/a\\b",
            "/health\n",
            "/a\x00b",
            "/a\tb",
            "/a\x7fb",
            "/a\x85b",
            "/a?b=1",
            "/a#frag",
        ],
    )
    def test_raw_ambiguous_forms(self, raw: str) -> None:
        """Dot segments, empty segments, ";", "\\", controls, "?" and "#" in the raw path are ambiguous."""
        assert encoded(raw) == (raw, "ambiguous-characters")

    @pytest.mark.parametrize(
        "raw",
        [
            "/public/%2e%2e/admin",
            "/public/.%2e/admin",
            "/%2E/admin",
            "/health%0A",
            "/health%0d%0a",
            "/a%00",
            "/a%7F",
            "/a%09b",
            "/public%3B/admin",
            "/a%3Fb",
            "/a%23b",
            "/a%C2%85b",
        ],
    )
    def test_decoded_ambiguous_forms(self, raw: str) -> None:
        """Forms that only appear after decoding (%2e dot segments, %0A, %3B, encoded C1) are ambiguous."""
        assert encoded(raw) == (raw, "decoded-ambiguous")

    @pytest.mark.parametrize("raw", ["/%C3", "/%C0%AF", "/%ED%A0%80", "/%FF", "/\udcff"])
    def test_invalid_utf8(self, raw: str) -> None:
        """Bytes that are not valid UTF-8 (truncated, overlong "/", surrogates) make the path ambiguous."""
        assert encoded(raw) == (raw, "invalid-utf8")

    @pytest.mark.parametrize(
        "raw",
        [
            "/public/\uff0e\uff0e/admin",
            "/public\uff0fadmin",
            "/public/%EF%BC%8E%EF%BC%8E/admin",
            "/a\uff05 2e",
            "/a\uff1bb",
            "/\u2024\u2024/admin",
            "/ad\u200bmin",
            "/a\u202eb",
            "/a\u2028",
            "/a\ue000",
            "/a\ud7fc",
        ],
    )
    def test_unicode_lookalikes_and_invisible_characters(self, raw: str) -> None:
        """Compatibility forms of "/", ".", "%", ";" and invisible or unassigned code points are ambiguous."""
        assert encoded(raw) == (raw, "unicode-ambiguous")

    def test_ambiguous_value_is_the_raw_input(self) -> None:
        """An ambiguous result carries the raw input (for logs), never a partially decoded string."""
        assert encoded("/a/%2e%2e/b")[0] == "/a/%2e%2e/b"

    def test_long_path_is_handled(self) -> None:
        """An 8 KB path is classified without error."""
        raw = "/" + "a%41" * 2048
        assert encoded(raw) == ("/" + "aA" * 2048, "")
