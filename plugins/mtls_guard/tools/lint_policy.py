"""Fail-open settings inside one mtls-guard policy, judged without the rest of the APISIX config.

A policy can be valid and still protect nothing: an exempt rule that matches every request, a
header source that believes every client, a route that quietly switches an enforcing named policy
to report mode. ``policy_findings`` reports them for one compiled policy, so both ``mtls-guard lint``
(once per ext-plugin entry, see ``lint_exempt``) and ``mtls-guard check`` (one policy) use it:

* MG070: an exempt rule with no path (or a catch-all one), no method list (or every method), no hosts;
* MG072: a rule naming methods only, which exempts those methods on every path;
* MG073: a path pattern that never matches a canonical path, or reads as a non-canonical one;
* MG074 / MG075: ``source: header`` trusting every address / a very broad range as its proxies;
* MG076: ``require_sni_match: false`` (certificate-checking source only);
* MG077: a route conf overriding an enforcing named policy with ``mode: report``.

Rules that depend on where the policy runs (host rules against route hosts) are in ``lint_exempt``.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Final

from ..library import PolicyLibrary
from ..matchers import APISIX_METHODS
from ..policy_config import ExemptRule, HeaderSource, IPNetwork, Mode, PolicyConfig
from .lint_findings import CODES, Severity
from .lint_pattern import DeadAlternative, dead_alternatives, matches_every_path

__all__ = [
    "PolicyFinding",
    "methods_unrestricted",
    "named_policy_downgrade",
    "path_unrestricted",
    "policy_findings",
]

_OPTIONS_ONLY: Final = frozenset({"OPTIONS"})
# Narrower ranges are ordinary proxy subnets; wider ones always include networks that are not yours:
# no single organisation's private IPv4 block is wider than 10.0.0.0/8, and IPv6 sites get /48s.
_BROAD_V4: Final = 8
_BROAD_V6: Final = 16
# IPv6 local-only space wider than /16 that is still as private as 10.0.0.0/8.
_LOCAL_V6: Final = (ipaddress.IPv6Network("fc00::/7"), ipaddress.IPv6Network("fe80::/10"))
_CANONICAL: Final = "mtls-guard matches the canonical path (decoded once, dot segments resolved, slashes merged)"


@dataclass(frozen=True, slots=True)
class PolicyFinding:
    """One finding about a policy on its own; lint adds where the policy sits."""

    code: str
    message: str  # one line: what is wrong and why it matters
    fix: str  # one line: what to change

    @property
    def severity(self) -> Severity:
        return CODES[self.code][0]


def path_unrestricted(rule: ExemptRule) -> bool:
    return rule.path is None or matches_every_path(rule.path)


def methods_unrestricted(rule: ExemptRule) -> bool:
    """No method condition: no list, or every method APISIX routes (a preflight rule is never unrestricted)."""
    return not rule.preflight and (rule.methods is None or rule.methods >= APISIX_METHODS)


def named_policy_downgrade(config: PolicyConfig, library: PolicyLibrary | None) -> str | None:
    """The named policy a route conf switched from enforce to report mode, if it did."""
    if config.mode is not Mode.REPORT or config.name is None or library is None:
        return None
    named = {**library.defaults, **library.policies.get(config.name, {})}
    return config.name if named.get("mode", Mode.ENFORCE.value) == Mode.ENFORCE.value else None


def policy_findings(config: PolicyConfig, library: PolicyLibrary | None = None) -> list[PolicyFinding]:
    """Fail-open settings of one validated policy (``library``: the policy file it was resolved with)."""
    found: list[PolicyFinding] = []
    for rule in config.exempt:
        found += _rule_findings(rule)
    if isinstance(config.source, HeaderSource):
        found += _proxy_findings(config.source)
    elif not config.require_sni_match:
        found.append(
            PolicyFinding(
                "MG076",
                "require_sni_match: false accepts a certificate presented on one SNI for a request whose Host names "
                "another: clients reuse one HTTP/2 connection for every host its server certificate covers, so a "
                "client certificate accepted on a.example.com is judged valid for b.example.com's routes too",
                "remove require_sni_match (default true: such requests get 421 and the client retries on a connection "
                "of its own for that host)",
            )
        )
    downgraded = named_policy_downgrade(config, library)
    if downgraded is not None:
        found.append(
            PolicyFinding(
                "MG077",
                f"the route conf overrides named policy {downgraded!r} (mode enforce in the policy file) with "
                '"mode": "report": every request that policy denies is let through and only logged',
                f'remove "mode": "report" from the route conf, or give the trial a named policy of its own '
                f"instead of weakening {downgraded!r} for one route",
            )
        )
    return found


def _rule_findings(rule: ExemptRule) -> list[PolicyFinding]:
    found: list[PolicyFinding] = []
    if rule.path is not None:
        found += _dead_path_findings(rule, rule.path)
    if rule.hosts is not None or rule.preflight or not path_unrestricted(rule):
        return found
    path = "no path" if rule.path is None else f"path {_quoted(rule.path)} matches every path"
    if methods_unrestricted(rule):
        methods = "no methods" if rule.methods is None else "every method"
        found.append(
            PolicyFinding(
                "MG070",
                f"exempt rule {rule.id!r} ({path}, {methods}, no hosts) exempts every request: wherever this policy "
                "runs it checks no certificate (in a global rule: every route without an mtls-guard of its own)",
                'give the rule a path for what must be public (e.g. "/healthz", "/public/.*"), or delete it',
            )
        )
    elif rule.methods is not None and rule.methods != _OPTIONS_ONLY:  # OPTIONS alone is MG063
        methods = " or ".join(sorted(rule.methods))
        found.append(
            PolicyFinding(
                "MG072",
                f"exempt rule {rule.id!r} ({path}, no hosts) exempts every {methods} request on every path: wherever "
                "this policy runs, these methods need no certificate",
                'add a path for what is public (e.g. "path": "/public/.*", "methods": [...]), or delete the rule',
            )
        )
    return found


def _dead_path_findings(rule: ExemptRule, pattern: str) -> list[PolicyFinding]:
    dead, total = dead_alternatives(pattern)
    found: list[PolicyFinding] = []
    for alternative in dead:
        subject = (
            f"exempt rule {rule.id!r} path {_quoted(pattern)}"
            if total == 1
            else f"alternative {_quoted(alternative.text)} of exempt rule {rule.id!r} path {_quoted(pattern)}"
        )
        found.append(PolicyFinding("MG073", f"{subject} {_dead_because(alternative)}", _dead_fix(alternative)))
    return found


def _quoted(pattern: str) -> str:
    # repr() would double every backslash of a regex, which then reads as another pattern.
    return f"'{pattern}'"


def _dead_because(alternative: DeadAlternative) -> str:
    required, why = alternative.required, _why_refused(alternative)
    if alternative.by_reading:
        return (
            f"reads as the path {_quoted(required)}, which never reaches matching ({why}); as a regex each "
            "unescaped '.' is any character, so it exempts other paths (one arbitrary character per '.') and never "
            "the one meant"
        )
    shown = "only the empty string" if not required else f"only paths containing {_quoted(required)}"
    return f"can match {shown}, and {why}: {_CANONICAL}, so it exempts nothing"


def _why_refused(alternative: DeadAlternative) -> str:
    required, reason = alternative.required, alternative.reason
    if reason in ("empty", "not-absolute"):
        return "every path starts with '/'"
    if reason == "literal-percent":
        return "paths are matched decoded ('%2e' is judged as '.', '%20' as a space), never holding '%'"
    if "?" in required or "#" in required:
        return "the query string and fragment are not part of the path"
    if "//" in required:
        return "nginx merges repeated slashes"
    if any(part in (".", "..") for part in required.split("/")[1:]):
        return "nginx resolves '.' and '..' segments ('/a/../b' is judged as '/b')"
    return "a path holding it (';', a backslash, controls, look-alike Unicode) is never exempt"


def _dead_fix(alternative: DeadAlternative) -> str:
    if alternative.by_reading:
        return (
            "write the canonical path the request is judged on ('/public/../admin' is judged as '/admin'); "
            "for a one-character segment write [^/] so the intent is explicit"
        )
    return (
        "write the pattern for the canonical path (`mtls-guard explain --target` shows the path a request-target "
        "is judged on), or delete it"
    )


def _proxy_findings(source: HeaderSource) -> list[PolicyFinding]:
    found: list[PolicyFinding] = []
    header = source.header
    for network in source.trusted_proxies:
        if network.prefixlen == 0:
            found.append(
                PolicyFinding(
                    "MG074",
                    f"source header trusts {network} as its proxies, i.e. every client: certificates are public, so "
                    f"any client can send its own {header!r} header carrying someone else's certificate and be "
                    "accepted as its holder without the private key",
                    "list only the front proxies' own addresses in trusted_proxies (e.g. 10.0.1.5/32), and make them "
                    f"overwrite {header!r} on every request",
                )
            )
        elif _broad(network):
            limit = f"/{_BROAD_V4}" if network.version == 4 else f"/{_BROAD_V6} outside fc00::/7 and fe80::/10"
            found.append(
                PolicyFinding(
                    "MG075",
                    f"source header trusts {network} as its proxies, wider than {limit} (the largest private "
                    "blocks): it includes networks that are not your proxies, and any client connecting from them "
                    f"can forge the {header!r} certificate header",
                    "narrow trusted_proxies to the subnets the front proxies actually connect from",
                )
            )
    return found


def _broad(network: IPNetwork) -> bool:
    if isinstance(network, ipaddress.IPv4Network):
        return network.prefixlen < _BROAD_V4
    return network.prefixlen < _BROAD_V6 and not any(network.subnet_of(local) for local in _LOCAL_V6)
