"""SSL objects: the ``client`` block, its skip regexes, and the certificates (server chain, client CA).

Produces one ``SslInfo`` per enabled server SSL object for the coverage checks, and reports what is
wrong with the object itself. Facts about APISIX cited in messages: mtls-anchors.md section 1.1
(schema), 1.3 (enforcement flow) and 1.4 (regex matching).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from ..identity import CertificateError, ClientCertificate, load_pem
from .lint_findings import Findings
from .lint_load import Config, Resource
from .lint_regex import SkipPattern, analyse, catch_all, unmatched_example

__all__ = ["SslInfo", "check_ssls", "host_covers"]

_PEM_BLOCK: Final = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)
_REFERENCE: Final = ("$secret://", "$env://")


@dataclass(frozen=True, slots=True)
class SslInfo:
    resource: Resource
    snis: tuple[str, ...]  # lower-case, may start with "*."
    has_client: bool  # client.ca configured: APISIX requests a client certificate on these SNIs
    client_ca: tuple[ClientCertificate, ...]  # empty when absent, a reference, or unparseable
    skip: tuple[SkipPattern, ...] | None  # None: no skip_mtls_uri_regex -> reject in the handshake

    @property
    def tolerant(self) -> bool:
        """APISIX requests but tolerates missing/invalid certificates (skip regex present)."""
        return self.has_client and self.skip is not None

    @property
    def skip_catch_all(self) -> bool:
        return self.skip is not None and catch_all(self.skip)

    @property
    def label(self) -> str:
        return self.resource.label


def host_covers(pattern: str, name: str) -> bool:
    """TLS name matching: a certificate SAN ``*.a.com`` covers exactly one extra label (RFC 6125)."""
    if pattern == name:
        return True
    if pattern.startswith("*."):
        head, _, rest = name.partition(".")
        return bool(head) and head != "*" and rest == pattern[2:]
    return False


class _SslChecker:
    def __init__(self, resource: Resource, findings: Findings, now: datetime, warn_days: int) -> None:
        self.r = resource
        self.findings = findings
        self.now = now
        self.warn_days = warn_days

    def add(self, code: str, message: str, fix: str) -> None:
        self.findings.add(code, self.r.label, message, fix, source=self.r.source, line=self.r.line)

    # -- certificates -------------------------------------------------------------------------------

    def parse(self, what: str, pem: object) -> tuple[ClientCertificate, ...] | None:
        """Certificates of one PEM field, in order; None (reported) when absent, a reference or broken."""
        if isinstance(pem, str) and pem.startswith(_REFERENCE):
            self.add("MG046", f"{what} is a reference ({pem.split('/', 3)[0]}//...): not checked", "nothing to do")
            return None
        if not isinstance(pem, str):
            self.add("MG040", f"{what} must be a PEM string", "paste the PEM text")
            return None
        blocks = _PEM_BLOCK.findall(pem)
        if not blocks:
            self.add("MG040", f"{what} contains no PEM certificate", "paste the PEM text, BEGIN/END lines included")
            return None
        certs: list[ClientCertificate] = []
        for index, block in enumerate(blocks):
            try:
                certs.append(load_pem(block))
            except CertificateError as exc:
                self.add("MG040", f"{what} certificate #{index + 1}: {exc}", "replace it with a valid PEM certificate")
                return None
        return tuple(certs)

    def dates(self, what: str, certs: Sequence[ClientCertificate]) -> None:
        for index, cert in enumerate(certs):
            name = f"{what} certificate #{index + 1} ({cert.subject.rfc4514(ascii_only=True)})"
            state = cert.validity_at(self.now)
            if state == "expired":
                self.add("MG041", f"{name} expired on {cert.not_after:%Y-%m-%d}", "renew it")
            elif state == "not-yet-valid":
                self.add("MG043", f"{name} is valid only from {cert.not_before:%Y-%m-%d %H:%M}Z", "check the clock")
            elif cert.not_after - self.now <= timedelta(days=self.warn_days):
                days = (cert.not_after - self.now).days
                left = f"in {days} day(s)" if days else "within a day"
                self.add("MG042", f"{name} expires {left}, on {cert.not_after:%Y-%m-%d}", "renew it soon")

    def server_chain(self, what: str, certs: Sequence[ClientCertificate], snis: Sequence[str]) -> None:
        leaf = certs[0]
        issuer = leaf.certificate.issuer
        if issuer != leaf.certificate.subject and not any(c.certificate.subject == issuer for c in certs[1:]):
            self.add(
                "MG044",
                f"{what}: incomplete chain, the issuer of the leaf ({leaf.issuer.rfc4514(ascii_only=True)}) is "
                "not included; clients that do not already have that issuer certificate fail the handshake",
                "append the intermediate certificate(s) after the leaf (not needed if the issuer is a root "
                "every client trusts)",
            )
        names = leaf.san_dns or tuple(v.lower() for v in leaf.subject.values("CN"))
        for sni in snis:
            if not any(host_covers(n, sni) for n in names):
                self.add(
                    "MG047",
                    f"{what} does not cover SNI {sni!r} (it names {', '.join(names) or 'nothing'}); clients reject it",
                    "issue a certificate whose SAN includes this name, or remove the SNI",
                )

    def server_certs(self, snis: Sequence[str]) -> None:
        fields: list[tuple[str, object]] = [("cert", self.r.value.get("cert"))]
        extra = self.r.value.get("certs")
        if isinstance(extra, list):
            fields += [(f"certs[{i}]", pem) for i, pem in enumerate(extra)]
        for what, pem in fields:
            if pem is None and what == "cert":
                self.add("MG035", "has no 'cert'", "add the server certificate chain")
                continue
            certs = self.parse(what, pem)
            if certs:
                self.dates(what, certs)
                self.server_chain(what, certs, snis)

    def client_ca(self, ca: object) -> tuple[ClientCertificate, ...]:
        certs = self.parse("client.ca", ca)
        if not certs:
            return ()
        self.dates("client.ca", certs)
        for index, cert in enumerate(certs):
            if not cert.is_ca:
                self.add(
                    "MG045",
                    f"client.ca certificate #{index + 1} ({cert.subject.rfc4514(ascii_only=True)}) is not a CA "
                    "(no BasicConstraints cA=true); it cannot issue client certificates",
                    "put the issuing CA certificate(s) in client.ca, not leaf certificates",
                )
        return certs

    # -- skip regexes -------------------------------------------------------------------------------

    def skip_patterns(self, raw: object) -> tuple[SkipPattern, ...] | None:
        if raw is None:
            return None
        if not isinstance(raw, list) or not raw or not all(isinstance(p, str) for p in raw):
            self.add(
                "MG035",
                "client.skip_mtls_uri_regex must be a non-empty list of strings",
                "list at least one pattern, or drop the key",
            )
            return None
        patterns = tuple(analyse(p) for p in raw)
        for p in patterns:
            self.skip_pattern(p)
        if not catch_all(patterns):
            example = unmatched_example(patterns)
            self.add(
                "MG011",
                "APISIX itself still demands a verified client certificate for every URI matching none of "
                f"{[p.text for p in patterns]} (e.g. {example}) and answers 400 before any plugin runs",
                "fine if intended; to let mtls-guard decide everything, use the catch-all pattern '^/'",
            )
        return patterns

    def skip_pattern(self, p: SkipPattern) -> None:
        quoted = repr(p.text)
        if p.pcre_only is not None:
            self.add(
                "MG034",
                f"skip regex {quoted} uses PCRE-only syntax {p.pcre_only!r} that the linter cannot evaluate",
                "prefer plain syntax (anchors, classes, groups) so it can be checked",
            )
            return
        if p.error is not None:
            self.add(
                "MG032",
                f"skip regex {quoted} does not compile ({p.error}); APISIX's ngx.re.match fails on it and treats "
                "it as 'no match', so those URIs are silently enforced",
                "fix the pattern",
            )
            return
        if p.catch_all:
            return  # anchoring cannot narrow a pattern that is meant to match everything
        core = re.sub(r"\A(?:\^|\\A)|(?:\$|\\z|\\Z)\Z", "", p.text)
        literal = "/" + core.lstrip("/") if re.fullmatch(r"[\w/~-]+", core) else None
        if not p.start_anchored:
            tail = "" if p.end_anchored else "/admin"
            example = f"'/x{literal}{tail}'" if literal else "any URI merely containing a match"
            self.add(
                "MG030",
                f"skip regex {quoted} is not anchored with ^: APISIX searches it anywhere in $uri, so "
                f"{example} is exempt too",
                f"anchor it: '^{p.text}'"
                if p.text.startswith("/")
                else "anchor it: '^/...' (every $uri starts with /)",
            )
        if not p.end_anchored and not p.end_open:
            if literal is None:
                example = "every URI continuing after a match"
            elif literal.endswith("/"):
                example = f"'{literal}..;/admin' (which servlet upstreams read as /admin)"
            else:
                example = f"'{literal}-internal/secrets'"
            self.add(
                "MG031",
                f"skip regex {quoted} is not anchored at the end, so {example} is exempt too",
                r"end it with \z (exact) or with .* if a prefix is really meant",
            )
        if p.dollar_end:
            self.add(
                "MG033",
                f"skip regex {quoted} ends with $, which PCRE also matches before a trailing newline, so the "
                "same URI followed by %0A is exempt too",
                r"use \z instead of $",
            )

    # -- the object ---------------------------------------------------------------------------------

    def check(self) -> SslInfo | None:
        value = self.r.value
        snis_raw = value.get("snis", [value["sni"]] if isinstance(value.get("sni"), str) else None)
        if not isinstance(snis_raw, list) or not snis_raw or not all(isinstance(s, str) for s in snis_raw):
            self.add("MG035", "needs 'sni' or a non-empty 'snis' list of host names", "add the SNIs")
            snis_raw = []
        snis = tuple(s.lower().rstrip(".") for s in snis_raw)
        self.server_certs(snis)
        client = value.get("client")
        if client is None:
            return SslInfo(self.r, snis, False, (), None)
        if not isinstance(client, Mapping) or "ca" not in client:
            self.add("MG035", "client must be an object with a 'ca' (APISIX requires it)", "add client.ca")
            return SslInfo(self.r, snis, False, (), None)
        depth = client.get("depth", 1)
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            self.add("MG035", "client.depth must be an integer >= 0", "use the default 1 or a larger depth")
        ca = self.client_ca(client["ca"])
        skip = self.skip_patterns(client.get("skip_mtls_uri_regex"))
        return SslInfo(self.r, snis, True, ca, skip)


def _enabled_server_ssl(value: Mapping[str, Any]) -> bool:
    # type "client" objects hold certificates APISIX presents to upstreams; status 0 disables an object.
    return bool(value.get("type", "server") == "server" and value.get("status", 1) != 0)


def check_ssls(config: Config, findings: Findings, *, now: datetime, warn_days: int) -> list[SslInfo]:
    infos: list[SslInfo] = []
    for resource in config.of("ssls"):
        if not _enabled_server_ssl(resource.value):
            continue
        info = _SslChecker(resource, findings, now, warn_days).check()
        if info is not None:
            infos.append(info)
    return infos
