"""Header mode: the certificate comes from a trusted front proxy (nginx terminating mTLS on another port).

The front proxy (tolerant verify_client: it forwards whatever certificate it got) sends
the leaf as ``X-Client-Cert`` (route ``/hdr/``, URL-encoded PEM) and as an XFCC element (route
``/xfcc/``) to the plain-HTTP listener from 127.0.0.1, the only trusted proxy address. Clients that
talk to the plain listener themselves from 127.0.0.2 play untrusted peers.
"""

from __future__ import annotations

import pytest

from tests.certs import escaped
from tests.e2e.stack import Stack

pytestmark = pytest.mark.e2e

ROUTES = ["/hdr/", "/xfcc/"]
UNTRUSTED_PEER = "127.0.0.2"


# The certificate header of each route's format, as the upstream would see it (lower-cased).
_CERT_HEADER = {"/hdr/": "x-client-cert", "/xfcc/": "x-forwarded-client-cert"}


def _forged(stack: Stack, prefix: str, cert: str = "valid") -> list[tuple[str, str]]:
    """The certificate header of ``prefix``'s format, as a client would forge it."""
    pem = escaped(stack.pki.clients[cert].issued.pem)
    if prefix == "/xfcc/":
        return [("X-Forwarded-Client-Cert", f'Cert="{pem}"')]
    return [("X-Client-Cert", pem)]


class TestTrustedFrontProxy:
    """Requests that come through the front proxy at 127.0.0.1, which is in trusted_proxies."""

    @pytest.mark.parametrize("prefix", ROUTES)
    def test_valid_certificate_through_the_proxy_is_allowed(self, stack: Stack, prefix: str) -> None:
        """A valid certificate forwarded by the trusted proxy is re-verified and its identity forwarded.

        Only the forward headers carry it: the certificate header itself never reaches the upstream.
        """
        reply = stack.clients.request(f"{prefix}orders/1", cert="valid", listener="front")
        stack.expect(reply, 200)
        assert reply.upstream_headers("x-client-subject") == ["CN=web-prod"]
        assert reply.upstream_headers(_CERT_HEADER[prefix]) == []
        assert stack.bridge.records[-1].vars["realip_remote_addr"] == "127.0.0.1"

    @pytest.mark.parametrize("prefix", ROUTES)
    @pytest.mark.parametrize(
        ("cert", "reason"),
        [
            (None, "no-cert"),
            ("self_signed", "verify-failed"),
            ("untrusted", "verify-failed"),
            ("expired", "expired"),
            ("wrong_id", "identity-mismatch"),
        ],
    )
    def test_bad_certificate_through_the_proxy_is_refused(
        self, stack: Stack, prefix: str, cert: str | None, reason: str
    ) -> None:
        """The proxy forwards unverified certificates; the plugin re-verifies them against source.ca."""
        reply = stack.clients.request(f"{prefix}orders/1", cert=cert, listener="front")
        stack.expect(reply, 403, reason)

    @pytest.mark.parametrize("prefix", ROUTES)
    def test_exempt_path_through_the_proxy_needs_no_certificate(self, stack: Stack, prefix: str) -> None:
        """The route's exempt path answers 200 through the proxy without a certificate."""
        stack.expect(stack.clients.request(f"{prefix}health", listener="front"), 200)

    def test_forged_verified_header_from_a_trusted_peer_is_ignored(self, stack: Stack) -> None:
        """A trusted peer claiming SUCCESS for a self-signed certificate still gets verify-failed."""
        headers = [("X-SSL-Client-Verify", "SUCCESS"), *_forged(stack, "/hdr/", "self_signed")]
        reply = stack.clients.request("/hdr/orders/1", listener="http", headers=headers)
        stack.expect(reply, 403, "verify-failed")

    def test_curl_through_the_proxy(self, stack: Stack) -> None:
        """curl with a client certificate through the front proxy is allowed."""
        stack.expect(stack.clients.curl("/hdr/orders/1", cert="valid", listener="front"), 200)


class TestUntrustedPeer:
    """Clients that send certificate headers to the plain listener themselves, from 127.0.0.2."""

    @pytest.mark.parametrize("prefix", ROUTES)
    def test_certificate_header_from_an_untrusted_peer_is_refused(self, stack: Stack, prefix: str) -> None:
        """A valid certificate in the header, sent directly from 127.0.0.2, gets 403 untrusted-proxy."""
        reply = stack.clients.request(
            f"{prefix}orders/1", listener="http", source=UNTRUSTED_PEER, headers=_forged(stack, prefix)
        )
        stack.expect(reply, 403, "untrusted-proxy")
        assert stack.bridge.records[-1].vars["realip_remote_addr"] == UNTRUSTED_PEER

    def test_forged_verified_header_from_an_untrusted_peer_changes_nothing(self, stack: Stack) -> None:
        """x-ssl-client-verify: SUCCESS next to the forged certificate header does not help an untrusted peer."""
        headers = [("X-SSL-Client-Verify", "SUCCESS"), *_forged(stack, "/hdr/")]
        reply = stack.clients.request("/hdr/orders/1", listener="http", source=UNTRUSTED_PEER, headers=headers)
        stack.expect(reply, 403, "untrusted-proxy")

    def test_forged_x_forwarded_for_does_not_make_a_peer_trusted(self, stack: Stack) -> None:
        """Only the TCP peer counts: X-Forwarded-For: 127.0.0.1 from 127.0.0.2 is still untrusted."""
        headers = [("X-Forwarded-For", "127.0.0.1"), ("X-Real-IP", "127.0.0.1"), *_forged(stack, "/hdr/")]
        reply = stack.clients.request("/hdr/orders/1", listener="http", source=UNTRUSTED_PEER, headers=headers)
        stack.expect(reply, 403, "untrusted-proxy")

    def test_untrusted_peer_without_header_is_refused(self, stack: Stack) -> None:
        """An untrusted peer without any certificate header is refused too (it is not the proxy)."""
        reply = stack.clients.request("/hdr/orders/1", listener="http", source=UNTRUSTED_PEER)
        stack.expect(reply, 403, "untrusted-proxy")

    def test_untrusted_peer_reaches_the_exempt_path(self, stack: Stack) -> None:
        """Exempt paths do not depend on the peer; spoofed identity and certificate headers are still stripped."""
        headers = [("X-Client-Subject", "CN=admin"), *_forged(stack, "/hdr/")]
        reply = stack.clients.request("/hdr/health", listener="http", source=UNTRUSTED_PEER, headers=headers)
        stack.expect(reply, 200)
        assert reply.upstream_headers("x-client-subject") == []
        assert reply.upstream_headers("x-client-cert") == []

    def test_curl_from_an_untrusted_peer(self, stack: Stack) -> None:
        """curl --interface 127.0.0.2 with a forged X-Client-Cert gets 403 untrusted-proxy."""
        reply = stack.clients.curl(
            "/hdr/orders/1", listener="http", source=UNTRUSTED_PEER, headers=_forged(stack, "/hdr/")
        )
        stack.expect(reply, 403, "untrusted-proxy")
