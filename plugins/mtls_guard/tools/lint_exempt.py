"""Exemption rules against APISIX's routing: host rules (``exempt[].hosts``) and CORS rules.

A host rule matches the request's Host header. mtls-guard believes that header only when it is also
the host APISIX routed on (nginx's ``$host``, which an absolute URI in the request line overrides) and,
over HTTPS, the TLS SNI names the same host (else 421); over plain HTTP nothing binds it to TLS. So a
host rule opens exactly the routes its policy runs on that APISIX serves under the exempt name, to
any client able to send that Host header (plain HTTP: anyone; HTTPS: anyone who gets a TLS connection
with that SNI, e.g. because the same APISIX serves a certificate for the name).

It is therefore safe only on a route that APISIX serves for the exempt names alone: every request it
exempts then asks for resources the operator chose to publish under that name. A route that also
answers for other names (or for every name: no ``host``/``hosts``) has its protection under those
names bypassed, and a global rule applies to every route. Checks here:

* MG060: a host rule in a global rule;
* MG061: a host rule on a route (own, plugin config or service policy) whose hosts are absent or
  include names the rule does not exempt;
* MG062: such a route also served over plain HTTP, where a bare Host header is enough;
* MG063: ``methods: [OPTIONS]``, which exempts every OPTIONS, where ``preflight: true`` was meant;
* MG064: proxy-rewrite ``use_real_request_uri_unsafe`` on a guarded route: it replaces the path
  mtls-guard judged and delivers with the raw request-target;
* MG071: a host rule without a path condition whose hosts are all the route's hosts, on a route
  served under a name an SSL object requests client certificates for: the policy is a no-op there;
* the per-policy fail-open checks of ``lint_policy`` (MG070, MG072-MG077), once per ext-plugin entry.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Final

from ..matchers import DomainSet, compile_regex
from ..policy_config import ExemptRule
from .lint_coverage import hosts_overlap, redirects_to_https, route_hosts, route_uris
from .lint_findings import Findings
from .lint_load import Config, Resource
from .lint_plugins import PRE_REQ, GuardUse, PluginAnalysis, plugins_of
from .lint_policy import methods_unrestricted, path_unrestricted, policy_findings

__all__ = ["check_exemptions", "route_hosts_exempt", "rule_may_apply"]

_OPTIONS_ONLY: Final = frozenset({"OPTIONS"})
_REGEX_META: Final = frozenset(".^$*+?()[]{}|\\")
_CHANNELS: Final = (
    "this works over plain HTTP always, and over HTTPS on a TLS connection whose SNI is that name, which "
    "any client gets when this APISIX serves a certificate for it"
)


def _host_rules(uses: Iterable[GuardUse]) -> Iterator[tuple[GuardUse, ExemptRule, tuple[str, ...]]]:
    for use in uses:
        if use.policy is None:
            continue
        for rule in use.policy.config.exempt:
            if rule.hosts is not None:
                yield use, rule, rule.hosts


def route_hosts_exempt(route_names: tuple[str, ...], rule_hosts: tuple[str, ...]) -> list[str]:
    """The route's host names that the rule's hosts do not exempt (empty: the route is the rule's own).

    An APISIX route host ``*.x.com`` also matches deeper names (``a.b.x.com``), which the rule's
    one-label ``*.x.com`` does not exempt; those requests are protected (fail closed) and no route can
    single them out, so the identical pattern counts as covered.
    """
    exempt = DomainSet.of(rule_hosts)
    return [h for h in route_names if not (h in rule_hosts if h.startswith("*") else exempt.matches(h))]


def _literal_prefix(pattern: str) -> str:
    """What every path the (full-match, RE2) pattern accepts starts with; "" when unknown."""
    if "|" in pattern:
        return ""
    end = 0
    while end < len(pattern) and pattern[end] not in _REGEX_META:
        end += 1
    # "/docs?" guarantees only "/doc": a quantifier makes the last literal character optional.
    return pattern[: end - 1] if end and pattern[end : end + 1] in ("*", "?", "{") else pattern[:end]


def rule_may_apply(rule: ExemptRule, route: Resource) -> bool:
    """Could some request of ``route`` match the rule's path and methods? "Yes" when unsure."""
    methods = _OPTIONS_ONLY if rule.preflight else rule.methods
    route_methods = route.value.get("methods")
    if (
        methods is not None
        and isinstance(route_methods, list)
        and route_methods
        and not methods & {str(m).upper() for m in route_methods}
    ):
        return False
    if rule.path is None:
        return True
    try:
        regex = compile_regex(rule.path)
    except ValueError:
        return True  # the policy compiled, so this cannot happen; never hide a finding over it
    literal = _literal_prefix(rule.path)
    for uri in route_uris(route):
        cut = min((i for i in (uri.find("*"), uri.find(":")) if i >= 0), default=-1)
        if cut < 0:
            if regex.fullmatch(uri.encode("utf-8")) is not None:
                return True
        elif literal.startswith(uri[:cut]) or uri[:cut].startswith(literal):
            return True
    return False


def _client_snis(config: Config) -> list[tuple[Resource, tuple[str, ...]]]:
    """Enabled server SSL objects with ``client`` (APISIX requests a client certificate) and their SNIs."""
    found: list[tuple[Resource, tuple[str, ...]]] = []
    for ssl in config.of("ssls"):
        # type "client" objects are certificates APISIX presents to upstreams; status 0 disables an object.
        serving = ssl.value.get("type", "server") == "server" and ssl.value.get("status", 1) != 0
        if not serving or not isinstance(ssl.value.get("client"), Mapping):
            continue
        raw = ssl.value.get("snis", [ssl.value.get("sni")])
        names = tuple(s.lower().rstrip(".") for s in raw if isinstance(s, str)) if isinstance(raw, list) else ()
        found.append((ssl, names))
    return found


class _Exemptions:
    def __init__(self, config: Config, findings: Findings, plugins: PluginAnalysis) -> None:
        self.config = config
        self.findings = findings
        self.plugins = plugins
        self.client_snis = _client_snis(config)

    def add(self, code: str, resource: Resource, message: str, fix: str) -> None:
        self.findings.add(code, resource.label, message, fix, source=resource.source, line=resource.line)

    def global_rules(self) -> None:
        for holder in self.config.of("global_rules"):
            for use, rule, hosts in _host_rules(self.plugins.pre_req.get(holder.label, [])):
                self.add(
                    "MG060",
                    holder,
                    f"{use.where}: exempt rule {rule.id!r} exempts hosts {', '.join(hosts)} in a global rule, "
                    "which runs for every route whatever its hosts: a client without a certificate reaches any "
                    f"route APISIX serves under that name (every route without host/hosts) by sending a Host header "
                    f"the rule names; {_CHANNELS}",
                    "remove the rule from the global policy and attach mtls-guard per route or service instead "
                    "(every mtls-guard that runs must exempt a request, so a global one without the rule denies "
                    "it); put the rule only on routes whose hosts are exactly those names",
                )

    def route(self, route: Resource) -> None:
        names = route_hosts(route, self.config)
        for use, rule, hosts in _host_rules(self.plugins.own_guards(route)):
            if not rule_may_apply(rule, route):
                continue
            uncovered = route_hosts_exempt(names, hosts) if names is not None else []
            if names is not None and not uncovered:
                continue  # the route serves only exempt names: the operator published it under them
            if names is not None and len(uncovered) == len(names):
                # None of the route's names is exempt: the rule needs Host == $host, and $host is one of
                # the route's names, so it never applies here (dead, not a bypass).
                continue
            exempt = ", ".join(hosts)
            where = use.where if use.holder.label == route.label else f"{use.where} of {use.holder.label}"
            head = f"{where}: exempt rule {rule.id!r} exempts hosts {exempt}"
            if names is None:
                problem = (
                    "but the route has no host/hosts (and no service supplies any), so APISIX serves it under every "
                    "name: what it protects is reachable without a certificate by sending a Host header the rule names"
                )
                fix = f"split the route: one with hosts {exempt} carrying this rule, one for the protected names"
            else:
                problem = (
                    f"but the route also answers for {', '.join(uncovered)}, which the rule does not exempt: what "
                    "it protects under those names is reachable without a certificate by sending a Host header "
                    "the rule names"
                )
                fix = f"split the route: one with hosts {exempt} carrying this rule, one for {', '.join(uncovered)}"
            fix += " (the protected route's policy without the host rule)"
            if use.holder.label != route.label:
                fix += (
                    f"; {use.holder.label} applies the rule to all its routes, so the protected one needs its own "
                    f"{PRE_REQ} (it replaces the one of its plugin config or service)"
                )
            self.add(
                "MG061",
                route,
                f"{head}, {problem}; {_CHANNELS}. Reported as an error: the route's certificate check can be "
                "bypassed at will",
                fix,
            )
            if not redirects_to_https(route, self.config, self.plugins):
                self.add(
                    "MG062",
                    route,
                    f"{where}: this route, which exempt rule {rule.id!r} (hosts {exempt}) opens, is also served on "
                    "APISIX's plain-HTTP port, where there is no TLS SNI to bind the Host header to: there a bare "
                    "Host header is enough, no TLS connection or server certificate for that name is needed",
                    "redirect plain HTTP to HTTPS (redirect plugin, http_to_https: true, on the route or a global "
                    "rule) or disable the HTTP listener; this narrows MG061, only splitting the route fixes it",
                )

    def cors(self) -> None:
        for uses in self.plugins.pre_req.values():
            for use in uses:
                if use.policy is None:
                    continue
                for rule in use.policy.config.exempt:
                    if rule.methods == _OPTIONS_ONLY and not rule.preflight:
                        self.add(
                            "MG063",
                            use.holder,
                            f"{use.where}: exempt rule {rule.id!r} exempts every OPTIONS request (methods: "
                            "[OPTIONS]), not only CORS preflights: an OPTIONS without Origin and "
                            "Access-Control-Request-Method reaches the upstream without a certificate too, and an "
                            "upstream that does not special-case OPTIONS runs its handler for it",
                            'replace "methods": ["OPTIONS"] with "preflight": true, which exempts only OPTIONS '
                            "requests carrying Origin and Access-Control-Request-Method",
                        )

    def raw_delivery(self, route: Resource) -> None:
        """MG064: proxy-rewrite's use_real_request_uri_unsafe sends the client's raw request-target after
        mtls-guard judged (and delivered) nginx's decoded $uri: the two can name different resources."""
        if not self.plugins.route_guards(route):
            return
        for holder in (*self.plugins.linked(route), *self.config.of("global_rules")):
            rewrite = plugins_of(holder).get("proxy-rewrite")
            if isinstance(rewrite, Mapping) and rewrite.get("use_real_request_uri_unsafe") is True:
                where = "" if holder.label == route.label else f" (from {holder.label})"
                self.add(
                    "MG064",
                    route,
                    f"proxy-rewrite use_real_request_uri_unsafe{where} runs after mtls-guard and proxies the "
                    "client's raw request-target instead of the path mtls-guard judged: '/admin/..%2Fpublic/x' "
                    "is judged as /public/x and delivered raw, which many frameworks serve from /admin",
                    "remove use_real_request_uri_unsafe (or set uri/regex_uri, which derive from the judged $uri)",
                )
                return

    def policies(self) -> None:
        """lint_policy's findings for every mtls-guard entry, reported where the entry is written."""
        for uses in self.plugins.pre_req.values():
            for use in uses:
                if use.policy is None:
                    continue
                for finding in policy_findings(use.policy.config, self.plugins.library):
                    self.add(finding.code, use.holder, f"{use.where}: {finding.message}", finding.fix)

    def whole_host(self, route: Resource) -> None:
        """MG071: a host rule without path or method restriction covering every host of the route."""
        names = route_hosts(route, self.config)
        if names is None:
            return  # a host rule there is MG061
        served = (ssl for ssl, snis in self.client_snis if any(hosts_overlap(n, s) for n in names for s in snis))
        mtls = next(served, None)
        if mtls is None:
            return  # no SSL object asks these names for a certificate: publishing them is not an mTLS bypass
        for use, rule, hosts in _host_rules(self.plugins.own_guards(route)):
            if not (path_unrestricted(rule) and methods_unrestricted(rule)) or route_hosts_exempt(names, hosts):
                continue
            where = use.where if use.holder.label == route.label else f"{use.where} of {use.holder.label}"
            self.add(
                "MG071",
                route,
                f"{where}: exempt rule {rule.id!r} (hosts {', '.join(hosts)}, no path or method restriction) names "
                f"every host of this route, so it exempts every request, although {mtls.label} requests client "
                "certificates for these names: mtls-guard checks nothing here",
                "give the rule a path for what is public under these names; if the whole host is public, serve it "
                "from an SSL object without client (no certificate prompt) and drop the rule",
            )


def check_exemptions(config: Config, findings: Findings, plugins: PluginAnalysis) -> None:
    checks = _Exemptions(config, findings, plugins)
    checks.global_rules()
    for route in config.of("routes"):
        if route.value.get("status", 1) != 0:  # status 0 disables a route
            checks.route(route)
            checks.whole_host(route)
            checks.raw_delivery(route)
    checks.cors()
    checks.policies()
