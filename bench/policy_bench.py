"""Micro-benchmark of the mtls-guard decision (not a test): median microseconds per decision.

Run with ``.venv/bin/python bench/policy_bench.py``. The policy has 50 exemption rules (path regexes,
method-only and host rules mixed) plus SAN and subject requirements; the client certificate is already
in the cache, as it is after the first request of a connection. A protected decision is timed as the
adapter runs it: the first call (answers NeedVars) plus the second call with the variables.
Target: < 20 us per decision.
"""

from __future__ import annotations

import json
import statistics
import sys
import timeit
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from plugins.mtls_guard.identity import CertificateCache
from plugins.mtls_guard.policy import CompiledPolicy, Decision, NeedVars, RequestInput, compile_policy
from tests.certs import CertFactory, escaped

TARGET_US = 20.0


def fifty_rules() -> list[dict[str, object]]:
    rules: list[dict[str, object]] = []
    for i in range(40):
        rule: dict[str, object] = {"id": f"svc{i}", "path": f"/svc{i}/(public|docs)/[a-z0-9_-]+(/.*)?"}
        if i % 3 == 0:
            rule["methods"] = ["GET", "HEAD"]
        rules.append(rule)
    rules += [
        {"id": "health", "path": "/healthz|/readyz|/livez", "methods": ["GET", "HEAD"]},
        {"id": "preflight", "methods": ["OPTIONS"]},
        {"id": "metrics", "path": "/metrics", "methods": ["GET"]},
        {"id": "static", "path": "/static/.+\\.(css|js|png|svg)"},
        {"id": "wellknown", "path": "/\\.well-known/.*"},
        {"id": "docs-host", "path": "/docs/.*", "hosts": ["docs.example.com", "*.docs.example.com"]},
        {"id": "status-host", "hosts": ["status.example.com"]},
        {"id": "api-version", "path": "/api/v[0-9]+/status"},
        {"id": "login", "path": "/login|/logout", "methods": ["GET", "POST"]},
        {"id": "favicon", "path": "/favicon\\.ico"},
    ]
    return rules


def median_us(fn: Callable[[], object], number: int = 20000, repeat: int = 7) -> float:
    fn()
    runs = timeit.repeat(fn, number=number, repeat=repeat)
    return statistics.median(runs) / number * 1e6


def main() -> int:
    factory = CertFactory()
    root = factory.ca("Bench Root")
    leaf = factory.leaf(
        root, cn="billing", dns=["billing.svc.example.com"], uris=["spiffe://example.org/ns/prod/sa/billing"]
    )
    policy: CompiledPolicy = compile_policy(
        json.dumps(
            {
                "exempt": fifty_rules(),
                "require": {
                    "san": {"uri": ["spiffe://example.org/ns/*/sa/billing"], "dns": ["*.svc.example.com"]},
                    "subject": {"CN": ["billing", "orders"]},
                },
                "forward": {"subject": "x-client-subject", "fingerprint": "x-client-fp"},
            }
        )
    )
    with_ca = compile_policy(json.dumps({"exempt": fifty_rules(), "require": {"ca": root.pem}}))
    cache = CertificateCache()
    now = factory.now
    base = {"ssl_server_name": "api.example.com", "host": "api.example.com", "scheme": "https"}
    valid = {**base, "ssl_client_verify": "SUCCESS", "ssl_client_escaped_cert": escaped(leaf.pem)}
    none = {**base, "ssl_client_verify": "NONE"}

    exempt_req = RequestInput("GET", "/svc38/docs/getting-started/intro")
    protected_req = RequestInput("POST", "/svc7/orders/12345/items", host="api.example.com")  # = SNI
    long_req = RequestInput("GET", "/" + "a" * 8190 + "!")
    pathological = compile_policy(
        json.dumps({"exempt": [*fifty_rules()[:47], {"path": "(a+)+$"}, {"path": "/(.*a){20}"}]})
    )

    def decide(p: CompiledPolicy, request: RequestInput, variables: dict[str, str] | None) -> Decision:
        first = p.decide(request, None, now=now, cache=cache)
        if isinstance(first, Decision):
            return first
        assert isinstance(first, NeedVars)
        second = p.decide(request, variables, now=now, cache=cache)
        assert isinstance(second, Decision)
        return second

    # Sanity: the scenarios decide what they claim to.
    assert decide(policy, exempt_req, None).detail == "svc38"
    assert decide(policy, protected_req, valid).reason == "verified"
    assert decide(policy, protected_req, none).reason == "no-cert"
    assert decide(with_ca, protected_req, valid).reason == "verified"

    rows = [
        ("exempt path (rule 39 of 50, first call)", lambda: decide(policy, exempt_req, None), True),
        ("protected, valid cached cert (2 calls)", lambda: decide(policy, protected_req, valid), True),
        ("protected, no cert (2 calls)", lambda: decide(policy, protected_req, none), True),
        (
            "  protected, first call only (NeedVars)",
            lambda: policy.decide(protected_req, None, now=now, cache=cache),
            False,
        ),
        ("  protected + per-route CA bundle (2 calls)", lambda: decide(with_ca, protected_req, valid), False),
        (
            "  8 KB path vs (a+)+$ and (.*a){20} (1st call)",
            lambda: pathological.decide(long_req, None, now=now, cache=cache),
            False,
        ),
    ]
    print(f"{'scenario':<50} {'median us':>10}")
    failed = False
    for label, fn, gated in rows:
        number = 2000 if "8 KB" in label else 20000
        us = median_us(fn, number=number)
        mark = "" if not gated else ("  ok" if us < TARGET_US else f"  OVER {TARGET_US:.0f} us TARGET")
        failed |= gated and us >= TARGET_US
        print(f"{label:<50} {us:>10.2f}{mark}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
