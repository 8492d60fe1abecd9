"""The routes of the end-to-end world and their mtls-guard policies (route JSON, as an APISIX admin would write it).

Route prefixes (APISIX matches routes by URI; the bridge by longest prefix):

``/``       enforce, certificate from nginx's TLS (source apisix), SPIFFE ID prod required.
``/report/`` the same rules in report mode.
``/hdr/``   header mode: certificate from a trusted front proxy as ``X-Client-Cert`` (URL-encoded PEM).
``/xfcc/``  header mode: certificate in an XFCC element.
"""

from __future__ import annotations

from typing import Any

from tests.e2e.bridge import Route
from tests.e2e.pki import SPIFFE_PROD, Pki

__all__ = ["FORWARD", "all_routes", "enforce_policy", "header_policy", "report_policy"]

FORWARD = {"subject": "x-client-subject", "san": "x-client-san", "fingerprint": "x-client-fingerprint"}
REQUIRE = {"san": {"uri": [SPIFFE_PROD]}}
REJECT = {"expose_reason": True}
TRUSTED_PROXIES = ["127.0.0.1/32"]


def enforce_policy() -> dict[str, Any]:
    return {
        "exempt": [
            {"id": "health", "path": "/health"},
            {"id": "public", "path": "/public/.*"},
            {"id": "cors-preflight", "methods": ["OPTIONS"]},
        ],
        "require": REQUIRE,
        "reject": REJECT,
        "forward": FORWARD,
    }


def report_policy() -> dict[str, Any]:
    return {
        "mode": "report",
        "exempt": [{"id": "health", "path": "/report/health"}, {"id": "cors-preflight", "methods": ["OPTIONS"]}],
        "require": REQUIRE,
        "reject": REJECT,
        "forward": FORWARD,
    }


def header_policy(pki: Pki, prefix: str, fmt: str) -> dict[str, Any]:
    return {
        "exempt": [{"id": "health", "path": f"{prefix}health"}],
        "source": {"type": "header", "format": fmt, "trusted_proxies": TRUSTED_PROXIES, "ca": pki.ca.pem},
        "require": REQUIRE,
        "reject": REJECT,
        "forward": FORWARD,
    }


def all_routes(pki: Pki) -> list[Route]:
    return [
        Route.mtls_guard("1", "/", enforce_policy()),
        Route.mtls_guard("2", "/report/", report_policy()),
        Route.mtls_guard("3", "/hdr/", header_policy(pki, "/hdr/", "pem-urlencoded")),
        Route.mtls_guard("4", "/xfcc/", header_policy(pki, "/xfcc/", "xfcc")),
    ]
