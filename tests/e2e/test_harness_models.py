"""The harness's models of APISIX (request-target, args, header rewrites) and of upstream frameworks, without nginx."""

from __future__ import annotations

import pytest

from runner.protocol.messages import Rewrite
from tests.e2e.apisix_uri import split_target, upstream_target, uri_args, uri_safe_encode
from tests.e2e.bridge import apply_args, apply_rewrite, delivered_target
from tests.e2e.upstreams import cgi_headers, effective_methods, interpret

# ngx_escape_uri(NGX_ESCAPE_URI): 0x00-0x20, '#', '%', '?', 0x7F-0xFF.
_ESCAPED = {*range(0x21), 0x23, 0x25, 0x3F, *range(0x7F, 0x100)}


class TestUriSafeEncode:
    """uri_safe_encode escapes exactly the bytes nginx's NGX_ESCAPE_URI table escapes, in upper-case hex."""

    @pytest.mark.parametrize("byte", range(0x80))
    def test_each_ascii_byte(self, byte: int) -> None:
        """Every ASCII byte is escaped as %XX exactly when it is in the table, else kept literally."""
        expected = f"%{byte:02X}" if byte in _ESCAPED else chr(byte)
        assert uri_safe_encode(chr(byte)) == expected

    def test_bytes_above_0x7f_are_escaped(self) -> None:
        """Every byte >= 0x80 (UTF-8 sequences, and raw bytes carried as surrogates) is escaped."""
        assert uri_safe_encode("/caf\u00e9") == "/caf%C3%A9"
        assert uri_safe_encode("/\uff0f") == "/%EF%BC%8F"
        assert uri_safe_encode("/\udcff") == "/%FF"
        for byte in range(0x80, 0x100):
            assert uri_safe_encode(bytes([byte]).decode("utf-8", "surrogateescape")) == f"%{byte:02X}"

    def test_structural_characters_stay_literal(self) -> None:
        """';', '\\', '"', '<', '/', '.' and an existing escape's letters are not touched; '%' itself is."""
        assert uri_safe_encode('/a;b\\c"d<e>/../%2F') == '/a;b\\c"d<e>/../%252F'
        assert uri_safe_encode("/a b?c#d\n") == "/a%20b%3Fc%23d%0A"


class TestUpstreamTarget:
    """The request-target APISIX proxies: raw without a Rewrite path, else encoded path plus the raw query."""

    def test_no_rewrite_keeps_the_raw_target(self) -> None:
        """With $upstream_uri empty the raw target goes upstream, escapes and dot segments included."""
        assert upstream_target("/admin/..%2Fpublic/x?a=%2F", None) == "/admin/..%2Fpublic/x?a=%2F"

    def test_rewrite_path_is_encoded_and_keeps_the_raw_query(self) -> None:
        """uri_safe_encode(path) + '?' + the raw query, byte for byte."""
        assert upstream_target("/admin/..%2Fpublic/x?a=%2F&b", "/public/x y") == "/public/x%20y?a=%2F&b"

    def test_rewrite_without_query_has_no_question_mark(self) -> None:
        """$is_args is empty for an empty query, including a bare trailing '?'."""
        assert upstream_target("/a", "/b") == "/b"
        assert upstream_target("/a?", "/b") == "/b"

    def test_changed_args_without_path_send_the_escaped_uri(self) -> None:
        """When only the args changed nginx no longer sends the unparsed target but $uri (escaped) and $args."""
        assert upstream_target("/a/../b%20c?x=1", None, uri="/b c", args="y=2") == "/b%20c?y=2"

    def test_split_target(self) -> None:
        """The query starts at the first '?'."""
        assert split_target("/p?a=1?b") == ("/p", "a=1?b")
        assert split_target("/p") == ("/p", "")


class TestUriArgs:
    """HTTPReqCall.args as ngx.req.get_uri_args() gives them."""

    def test_decoding_flags_and_repeats(self) -> None:
        """Names and values are unescaped ('+' is a space), bare names are flags, repeats are grouped."""
        assert uri_args("a=1&%5Fmethod=DELETE&b&a=x+y&=z&&c=") == (
            ("a", "1"),
            ("a", "x y"),
            ("_method", "DELETE"),
            ("b", None),
            ("c", ""),
        )

    def test_apply_args_rewrite(self) -> None:
        """A Rewrite's args delete (None) or replace a name; the result is re-encoded like ngx.encode_args."""
        rewrite = Rewrite(args=(("_method", None), ("a", "x y"), ("a", "z"), ("n", "/")))
        assert apply_args("a=1&_method=DELETE&k", rewrite) == "a=x%20y&a=z&k&n=%2F"
        assert apply_args("a=1", None) == "a=1"


class TestApplyRewrite:
    """Rewrite header entries as core.request.set_header applies them."""

    def test_delete_is_case_insensitive_but_exact(self) -> None:
        """Deleting x-client-subject removes X-Client-Subject but not x_client_subject."""
        sent = [("Host", "h"), ("X-Client-Subject", "a"), ("x_client_subject", "b"), ("X-CLIENT-SUBJECT", "c")]
        assert apply_rewrite(sent, Rewrite(headers=(("x-client-subject", None),))) == [
            ("Host", "h"),
            ("x_client_subject", "b"),
        ]

    def test_set_replaces_every_same_name_header(self) -> None:
        """A set replaces all case-insensitive matches, in the place of the first one."""
        sent = [("A", "1"), ("X-Id", "2"), ("B", "3"), ("x-id", "4")]
        assert apply_rewrite(sent, Rewrite(headers=(("x-id", "new"), ("y", "5")))) == [
            ("A", "1"),
            ("x-id", "new"),
            ("B", "3"),
            ("y", "5"),
        ]

    def test_delivered_target(self) -> None:
        """The bridge's delivered target combines path and args rewrites like APISIX."""
        assert delivered_target("/a/../b?q=1", "/b", None) == "/a/../b?q=1"
        assert delivered_target("/a/../b?q=1", "/b", Rewrite(path="/b")) == "/b?q=1"


class TestFrameworkReadings:
    """How the modelled upstream stacks read a delivered request."""

    @pytest.mark.parametrize(
        ("target", "expected"),
        [
            ("/admin/..%2Fpublic/x", ("admin", "public", "public", "public", "public")),
            ("/admin;x/../public/x", ("admin;x", "public", "public", "public", "public")),
            ("/public/..;/admin", ("public", "public", "admin", "public", "public")),
            ("/%2570ublic/x", ("%70ublic", "%70ublic", "%70ublic", "public", "%70ublic")),
            (
                "/public\\..\\admin",
                ("public\\..\\admin", "public\\..\\admin", "public\\..\\admin", "public\\..\\admin", "admin"),
            ),
            ("/public/x%EF%BC%8F..%EF%BC%8F..%EF%BC%8Fadmin", ("public", "public", "public", "public", "admin")),
            ("/public/x?/../admin", ("public",) * 5),
        ],
    )
    def test_resources(self, target: str, expected: tuple[str, ...]) -> None:
        """Resource per framework: express, wsgi, servlet, double_decode, windows."""
        readings = interpret("GET", target, [])["frameworks"]
        assert tuple(r["resource"] for r in readings.values()) == expected

    def test_express_keeps_encoded_slash_inside_its_segment(self) -> None:
        """express decodes per segment, so %2F never splits a segment."""
        assert interpret("GET", "/a/..%2Fb", [])["frameworks"]["express"]["segments"] == ["a", "../b"]

    def test_method_overrides(self) -> None:
        """Override headers in any spelling and _method override whatever method was sent."""
        assert effective_methods("OPTIONS", "", [("x_http_method_override", "delete")]) == ["DELETE"]
        assert effective_methods("GET", "_method=put", [("X-HTTP-Method", "PATCH")]) == ["PATCH", "PUT"]
        assert effective_methods("OPTIONS", "a=1", [("Origin", "x")]) == ["OPTIONS"]

    def test_cgi_folding(self) -> None:
        """'-' and '_' fold to '_', names upper-case, every value kept."""
        folded = cgi_headers([("X-Client-Subject", "a"), ("x_client_subject", "b"), ("X_Client-San", "c")])
        assert folded == {"X_CLIENT_SUBJECT": ["a", "b"], "X_CLIENT_SAN": ["c"]}
