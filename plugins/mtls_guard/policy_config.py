"""A validated mtls-guard policy: the typed, immutable configuration :mod:`.schema` reads a policy
document into and :mod:`.policy` compiles into matchers.

Plain frozen dataclasses, no validation: every instance that reaches the plugin was built by
:func:`.schema.parse_policy`, which checked it key by key. Defaults are the strictest choice, so an
empty policy enforces a client certificate and exempts nothing.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from enum import StrEnum
from typing import Final, Literal, TypeAlias

from .forwarded import ForwardedFormat
from .matchers import EmailPattern, UriPattern
from .revocation import RevocationTable
from .trust import TrustBundle

__all__ = [
    "HOST_MISMATCH_STATUS",
    "ApisixSource",
    "ExemptRule",
    "Forward",
    "HeaderSource",
    "IPNetwork",
    "Mode",
    "NameRequirement",
    "PolicyConfig",
    "Reject",
    "Requirements",
    "SanRequirement",
]

IPNetwork: TypeAlias = ipaddress.IPv4Network | ipaddress.IPv6Network
# The status of a Host/SNI mismatch; a policy's reject.status may not take it, so the two stay apart.
HOST_MISMATCH_STATUS: Final = 421


class Mode(StrEnum):
    ENFORCE = "enforce"
    REPORT = "report"


@dataclass(frozen=True, slots=True)
class ExemptRule:
    id: str
    path: str | None
    methods: frozenset[str] | None
    hosts: tuple[str, ...] | None  # normalised: lower-case names or "*.domain"
    preflight: bool = False  # a CORS preflight: OPTIONS with Origin and Access-Control-Request-Method


@dataclass(frozen=True, slots=True)
class SanRequirement:
    dns: tuple[str, ...] = ()
    uri: tuple[UriPattern, ...] = ()
    email: tuple[EmailPattern, ...] = ()


@dataclass(frozen=True, slots=True)
class NameRequirement:
    """Per attribute (short name or dotted OID), the accepted values; every attribute must hold."""

    attributes: tuple[tuple[str, frozenset[str]], ...]


@dataclass(frozen=True, slots=True)
class Requirements:
    san: SanRequirement | None = None
    subject: NameRequirement | None = None
    issuer: NameRequirement | None = None
    fingerprints: frozenset[str] | None = None
    ca: TrustBundle | None = None
    crl: RevocationTable | None = None


@dataclass(frozen=True, slots=True)
class Reject:
    status: int = 403
    body: str = "Forbidden\n"
    content_type: str = "text/plain; charset=utf-8"
    expose_reason: bool = False


@dataclass(frozen=True, slots=True)
class ApisixSource:
    type: Literal["apisix"] = "apisix"


@dataclass(frozen=True, slots=True)
class HeaderSource:
    format: ForwardedFormat
    header: str
    chain_header: str | None
    trusted_proxies: tuple[IPNetwork, ...]
    ca: TrustBundle
    type: Literal["header"] = "header"


@dataclass(frozen=True, slots=True)
class Forward:
    subject: str | None = None
    san: str | None = None
    fingerprint: str | None = None
    xfcc: str | None = None

    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.subject, self.san, self.fingerprint, self.xfcc) if n is not None)


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    mode: Mode = Mode.ENFORCE
    exempt: tuple[ExemptRule, ...] = ()
    require: Requirements = Requirements()
    require_sni_match: bool = True
    reject: Reject = Reject()
    source: ApisixSource | HeaderSource = ApisixSource()
    forward: Forward = Forward()
    name: str | None = None  # the named policy of the policy file this was built from, if any
