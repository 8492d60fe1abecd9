"""Who enforces what, where: routes x SNIs x (APISIX handshake check | mtls-guard).

An SSL object with ``client.ca`` and a ``skip_mtls_uri_regex`` makes APISIX request a certificate but
tolerate its absence (mtls-anchors.md section 1.3), so from then on only mtls-guard stands between a
client without a certificate and every route that can be reached through that SNI. Host matching is
deliberately generous (any name both sides could match counts), because a linter that misses one
reachable route is worse than one that asks about a route that is in fact unreachable.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Final, Literal

from ..identity import ClientCertificate
from ..trust import TrustBundle
from .lint_findings import Findings
from .lint_load import Config, Resource
from .lint_plugins import PRE_REQ, GuardUse, PluginAnalysis, plugins_of
from .lint_regex import may_exempt_route_uri
from .lint_tls import SslInfo

__all__ = ["check_coverage", "hosts_overlap", "redirects_to_https", "route_hosts", "route_uris"]

_FIX_ATTACH: Final = (
    f"attach mtls-guard in {PRE_REQ} to this route, its plugin config or service, or (safest) to a global rule"
)


def hosts_overlap(a: str, b: str) -> bool:
    """Could one host name match both patterns? ``*.x.com`` stands for any name ending in ``.x.com``."""
    if a == b:
        return True
    a_wild, b_wild = a.startswith("*."), b.startswith("*.")
    if a_wild and b_wild:
        return a[1:].endswith(b[1:]) or b[1:].endswith(a[1:])
    if a_wild:
        return b.endswith(a[1:])
    if b_wild:
        return a.endswith(b[1:])
    return False


def _names(value: Any) -> tuple[str, ...] | None:
    hosts = value.get("hosts")
    if isinstance(hosts, list) and hosts:
        return tuple(str(h).lower().rstrip(".") for h in hosts)
    if isinstance(value.get("host"), str):
        return (value["host"].lower().rstrip("."),)
    return None


def route_hosts(route: Resource, config: Config) -> tuple[str, ...] | None:
    """The route's hosts, else its service's (APISIX's router falls back to them); None matches any host."""
    own = _names(route.value)
    if own is not None:
        return own
    service = config.get("services", route.value["service_id"]) if "service_id" in route.value else None
    return _names(service.value) if service is not None else None


def route_uris(route: Resource) -> tuple[str, ...]:
    uris = route.value.get("uris")
    if isinstance(uris, list) and uris:
        return tuple(str(u) for u in uris)
    uri = route.value.get("uri")
    return (uri,) if isinstance(uri, str) else ("/*",)


def _exempt_somewhere(route: Resource, ssl: SslInfo) -> bool:
    """Can a request for this route match the SSL object's skip list, i.e. pass APISIX without a cert?"""
    if ssl.skip is None:
        return False
    return ssl.skip_catch_all or any(may_exempt_route_uri(ssl.skip, uri) for uri in route_uris(route))


def redirects_to_https(route: Resource, config: Config, plugins: PluginAnalysis) -> bool:
    """The redirect plugin (http_to_https) on the route, its plugin config, service or a global rule."""
    for holder in (*plugins.linked(route), *config.of("global_rules")):
        redirect = plugins_of(holder).get("redirect")
        if isinstance(redirect, Mapping) and redirect.get("http_to_https") is True:
            return True
    return False


def _serves(hosts: tuple[str, ...] | None, ssl: SslInfo) -> bool:
    return hosts is None or any(hosts_overlap(h, sni) for h in hosts for sni in ssl.snis)


def _issued_by(child: ClientCertificate, parent: ClientCertificate) -> bool:
    try:
        child.certificate.verify_directly_issued_by(parent.certificate)
    except Exception:  # noqa: BLE001 - any failure (name, signature, key type) means "not issued by"
        return False
    return True


def _ca_relation(route_ca: TrustBundle, client_ca: Sequence[ClientCertificate]) -> Literal["shared", "issued", "none"]:
    if route_ca.fingerprints & {c.fingerprint_sha256 for c in client_ca}:
        return "shared"
    # One CA issued the other (route CA = intermediate under client.ca's root, or the reverse): certificates
    # can pass both checks, provided the client sends the intermediate and client.depth allows the path.
    pairs = [(a, c) for a in route_ca.anchors for c in client_ca]
    if any(_issued_by(a, c) or _issued_by(c, a) for a, c in pairs):
        return "issued"
    return "none"


class _Coverage:
    def __init__(self, config: Config, findings: Findings, ssls: list[SslInfo], plugins: PluginAnalysis) -> None:
        self.config = config
        self.findings = findings
        self.ssls = ssls
        self.plugins = plugins

    def add(self, code: str, resource: Resource, message: str, fix: str) -> None:
        self.findings.add(code, resource.label, message, fix, source=resource.source, line=resource.line)

    def route(self, route: Resource) -> None:
        self.plugins.check_shadowing(route)
        guards = self.plugins.route_guards(route)
        served = [s for s in self.ssls if _serves(route_hosts(route, self.config), s)]
        # A narrow skip list (e.g. '^/health\z') leaves a route like /admin/* to APISIX's own check.
        tolerant = [s for s in served if s.tolerant and _exempt_somewhere(route, s)]
        if tolerant and not guards:
            scope = "every URI" if any(s.skip_catch_all for s in tolerant) else "URIs matching the skip regex"
            where = ", ".join(f"{s.label} ({', '.join(s.snis)})" for s in tolerant)
            self.add(
                "MG010",
                route,
                f"reachable without a client certificate for {scope}: {where} asks for a certificate but "
                "tolerates its absence (skip_mtls_uri_regex), and no mtls-guard runs for this route",
                _FIX_ATTACH,
            )
        client_ssls = [s for s in served if s.has_client]
        if client_ssls and not redirects_to_https(route, self.config, self.plugins):
            if guards:
                message = (
                    "also served on APISIX's plain-HTTP port, where no certificate exists: mtls-guard denies "
                    "protected requests there (scheme http), exempt ones pass"
                )
            else:
                message = "also served on APISIX's plain-HTTP port, where APISIX checks no client certificate at all"
            self.add("MG014", route, message, "disable the HTTP listener or add the redirect plugin (http_to_https)")
        apisix_guards = [g for g in guards if g.checks_apisix_cert]
        if apisix_guards and served and not client_ssls:
            self.add(
                "MG015",
                route,
                f"mtls-guard needs certificates verified by APISIX, but {', '.join(s.label for s in served)} "
                "request(s) no client certificate: every protected request is denied",
                "add client.ca (and skip_mtls_uri_regex for exemptions) to the SSL object",
            )
        for guard in apisix_guards:
            for ssl in client_ssls:
                self.route_ca(guard, ssl)

    def route_ca(self, guard: GuardUse, ssl: SslInfo) -> None:
        assert guard.policy is not None  # checks_apisix_cert implies a compiled policy
        route_ca = guard.policy.config.require.ca
        if route_ca is None or not ssl.client_ca:
            return
        relation = _ca_relation(route_ca, ssl.client_ca)
        if relation == "none":
            self.add(
                "MG050",
                guard.holder,
                f"{guard.where}: require.ca shares no certificate with {ssl.label}'s client.ca; APISIX verifies "
                "against client.ca first, so certificates from the route CA arrive as FAILED and are denied",
                f"add the route CA to {ssl.label}'s client.ca (or issue route certificates under it)",
            )
        elif relation == "issued":
            self.add(
                "MG051",
                guard.holder,
                f"{guard.where}: require.ca and {ssl.label}'s client.ca are related only by issuance; clients must "
                "send the intermediate and client.depth must allow the longer path",
                f"check client.depth of {ssl.label} (default 1), or put the same CA certificate in both",
            )

    def handshake_only(self, ssl: SslInfo, routes: list[Resource]) -> None:
        """client.ca without a skip regex: the handshake rejects certificate-less clients, no plugin runs."""
        exempting = [
            r.label
            for r in routes
            if _serves(route_hosts(r, self.config), ssl)
            and any(g.has_exemptions and g.checks_apisix_cert for g in self.plugins.route_guards(r))
        ]
        if exempting:
            self.add(
                "MG012",
                ssl.resource,
                f"client.ca without skip_mtls_uri_regex: the handshake rejects clients without a certificate, so "
                f"the mtls-guard exemptions of {', '.join(exempting)} can never apply",
                "add skip_mtls_uri_regex ['^/'] so mtls-guard decides, with mtls-guard on every route of this SNI",
            )
        else:
            self.add(
                "MG013",
                ssl.resource,
                "client.ca without skip_mtls_uri_regex: the handshake rejects clients without certificates; "
                "mtls-guard exemptions on this SNI can never apply",
                "nothing to do if every route here needs a certificate",
            )


def check_coverage(config: Config, findings: Findings, ssls: list[SslInfo], plugins: PluginAnalysis) -> None:
    routes = [r for r in config.of("routes") if r.value.get("status", 1) != 0]  # status 0 disables a route
    if routes and not config.of("ssls"):
        findings.add(
            "MG006",
            "ssls",
            "no SSL objects in the input, so host coverage, CA and plain-HTTP checks were skipped",
            "lint the routes together with the ssls export",
        )
    coverage = _Coverage(config, findings, ssls, plugins)
    for route in routes:
        coverage.route(route)
    for ssl in ssls:
        if ssl.has_client and ssl.skip is None:
            coverage.handshake_only(ssl, routes)
