"""Findings of ``mtls-guard lint``: the stable code table and the collector the checks report into.

Each code has one fixed severity so that tooling can filter on codes alone; a check that needs two
severities for two situations uses two codes. Codes are never renumbered or reused.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from enum import StrEnum
from typing import Final

__all__ = ["CODES", "Finding", "Findings", "Severity"]


class Severity(StrEnum):
    ERROR = "error"
    WARNING = "warning"
    INFO = "info"


_E, _W, _I = Severity.ERROR, Severity.WARNING, Severity.INFO

# code -> (severity, short meaning). The README table and `--format json` consumers rely on this.
CODES: Final[dict[str, tuple[Severity, str]]] = {
    # input
    "MG001": (_W, "standalone apisix.yaml does not end with #END (APISIX ignores the file)"),
    "MG002": (_W, "content the linter does not recognise (ignored)"),
    "MG003": (_E, "a file contains no recognisable APISIX resource"),
    "MG004": (_E, "malformed object or duplicate key (APISIX rejects or misreads it)"),
    "MG005": (_W, "the same resource id is defined more than once"),
    "MG006": (_I, "no SSL objects in the input: TLS and host-coverage checks skipped"),
    # coverage: who enforces what on which SNI
    "MG010": (_E, "route reachable without a client certificate (tolerant SNI, no mtls-guard)"),
    "MG011": (_I, "skip_mtls_uri_regex is not catch-all: APISIX still enforces other URIs itself"),
    "MG012": (_W, "SSL client without skip regex: mtls-guard exemptions on this SNI never apply"),
    "MG013": (_I, "SSL client without skip regex: the handshake rejects clients without certificates"),
    "MG014": (_I, "route also reachable over plain HTTP, where APISIX checks no certificate"),
    "MG015": (_W, "mtls-guard route served only by SSL objects that request no client certificate"),
    "MG016": (_E, "plugin_config_id / service_id points to a missing object (APISIX answers 503)"),
    # ext-plugin configuration
    "MG020": (_E, "allow_degradation: true on ext-plugin-pre-req carrying mtls-guard (fails open)"),
    "MG021": (_W, "mtls-guard configured in ext-plugin-post-req (runs after authentication and other plugins)"),
    "MG022": (_E, "invalid mtls-guard policy (the runner rejects it, the route answers 503)"),
    "MG023": (_E, "unknown plugin name in an ext-plugin conf list (runner rejects it, 503)"),
    "MG024": (_E, "malformed ext-plugin configuration (APISIX schema rejects it)"),
    "MG025": (_W, "ext-plugin-pre-req carrying mtls-guard is disabled (_meta.disable)"),
    "MG026": (_W, "ext-plugin-pre-req carrying mtls-guard has _meta.filter (runs only sometimes)"),
    "MG027": (_W, "mtls-guard policy in report mode: denied requests are let through"),
    "MG028": (_W, "mtls-guard from a plugin config or service is overridden by the route's own"),
    "MG029": (_E, "mtls-guard configured in ext-plugin-post-resp (every call fails: 503 after the upstream ran)"),
    # skip_mtls_uri_regex
    "MG030": (_W, "skip regex not anchored at the start (^): matches anywhere in the URI"),
    "MG031": (_W, "skip regex not anchored at the end ($): matches every longer URI"),
    "MG032": (_E, "skip regex does not compile"),
    "MG033": (_I, "skip regex ends with $, which also matches before a trailing newline (%0A)"),
    "MG034": (_W, "skip regex uses PCRE-only syntax the linter cannot evaluate"),
    "MG035": (_E, "malformed SSL object or client block (APISIX rejects it)"),
    # certificates
    "MG040": (_E, "certificate does not parse as PEM"),
    "MG041": (_E, "certificate expired"),
    "MG042": (_W, "certificate expires soon"),
    "MG043": (_E, "certificate not yet valid"),
    "MG044": (_W, "incomplete server chain (leaf issuer not included)"),
    "MG045": (_W, "client.ca contains a certificate that is not a CA"),
    "MG046": (_I, "$secret:// or $env:// reference: cannot be checked offline"),
    "MG047": (_W, "server certificate does not cover an SNI of its SSL object"),
    # policy vs SSL object
    "MG050": (_E, "route CA (require.ca) shares nothing with the SNI's client.ca"),
    "MG051": (_I, "route CA relates to client.ca only through issuance (chain depth matters)"),
    # exemption rules
    "MG060": (_E, "host exemption in a global rule: every route is reachable without a certificate"),
    "MG061": (_E, "host exemption on a route that also answers for hosts the rule does not exempt"),
    "MG062": (_W, "an MG061 route is also served over plain HTTP, where no SNI binds the Host header"),
    "MG063": (_W, "methods: [OPTIONS] exemption also exempts OPTIONS that are not CORS preflights"),
    "MG064": (_E, "proxy-rewrite use_real_request_uri_unsafe delivers another path than mtls-guard judged"),
    # fail-open policies
    "MG070": (_E, "an exempt rule restricts neither path, method nor host: the policy checks no certificate"),
    "MG071": (_W, "a path-less host rule exempts every request of a route served under an mTLS host"),
    "MG072": (_W, "an exempt rule names methods only: every such request on every path is exempt"),
    "MG073": (_W, "an exempt path pattern never matches the canonical path it was written for (dead rule)"),
    "MG074": (_E, "source header trusts every address as a proxy (/0): any client forges the certificate"),
    "MG075": (_W, "source header trusts a very broad range as proxies (wider than /8 IPv4, /16 IPv6)"),
    "MG076": (_W, "require_sni_match: false accepts a certificate presented for another SNI (coalesced HTTP/2)"),
    "MG077": (_W, "a route switches an enforcing named policy to report mode"),
    # the runner's CRL files (--crl / --crl-issuer)
    "MG080": (_E, "a CRL file the runner cannot use (unknown issuer, bad signature, unparsable)"),
    "MG081": (_W, "a CRL past its nextUpdate: its issuer's certificates are denied (crl-stale)"),
}


@dataclass(frozen=True, slots=True)
class Finding:
    code: str
    obj: str  # "routes/1", "ssls/api", "apisix.yaml" for file-level findings
    message: str  # what is wrong and why it matters
    fix: str  # what to change
    source: str | None = None  # file the object came from
    line: int | None = None  # 1-based, YAML input only

    @property
    def severity(self) -> Severity:
        return CODES[self.code][0]

    def as_dict(self) -> dict[str, object]:
        return {
            "severity": str(self.severity),
            "code": self.code,
            "object": self.obj,
            "message": self.message,
            "fix": self.fix,
            "file": self.source,
            "line": self.line,
        }


class Findings:
    """Ordered, de-duplicated findings: several paths through the config may detect the same problem."""

    def __init__(self) -> None:
        self._items: dict[tuple[str, str, str], Finding] = {}

    def add(
        self, code: str, obj: str, message: str, fix: str, *, source: str | None = None, line: int | None = None
    ) -> None:
        if code not in CODES:
            raise KeyError(f"unknown finding code {code}")  # a typo in a check must not go unnoticed
        self._items.setdefault((code, obj, message), Finding(code, obj, message, fix, source, line))

    def __iter__(self) -> Iterator[Finding]:
        return iter(self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def count(self, severity: Severity) -> int:
        return sum(1 for f in self if f.severity is severity)

    def sorted(self) -> list[Finding]:
        """Errors first, then warnings, then notes; within one severity, the order the checks found them."""
        order = {Severity.ERROR: 0, Severity.WARNING: 1, Severity.INFO: 2}
        return sorted(self, key=lambda f: order[f.severity])
