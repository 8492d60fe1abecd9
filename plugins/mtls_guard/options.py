"""mtls-guard's runner options -> everything the plugin serves with: policy library, CRLs, cache size.

``load_options`` reads every file the options name and validates all of it before anything changes, so
that ``MtlsGuard.reconfigure`` (start-up and live reload) installs a new state only when all of it is
good. Errors are ``ValueError`` with one line naming the option and the file; the runner exits 3 with it
at start-up and keeps the old state on a reload.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Final

from cryptography import x509

from .crl_files import read_crl_paths, read_issuer_files
from .library import PolicyLibrary
from .policy_config import HeaderSource
from .revocation import NO_REVOCATION, CrlError, RevocationTable, build_table
from .schema import parse_policy
from .schema_readers import PolicyError

__all__ = ["OPTIONS", "GuardOptions", "library_issuers", "load_options", "load_revocation"]

log = logging.getLogger("mtls_guard.revocation")

OPTIONS: Final = frozenset({"policy_file", "cert_cache_size", "crl_files", "crl_issuer_files", "stale_crl"})
STALE_CRL_CHOICES: Final = ("deny", "allow")


@dataclass(frozen=True, slots=True)
class GuardOptions:
    """The validated result of the options: what MtlsGuard installs."""

    library: PolicyLibrary | None
    revocation: RevocationTable
    cert_cache_size: int


def _paths(options: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = options.get(key, [])
    if isinstance(value, str) or not isinstance(value, Sequence) or not all(isinstance(v, str) and v for v in value):
        raise ValueError(f"{key} must be a list of paths")
    return tuple(value)


def library_issuers(library: PolicyLibrary | None) -> Iterator[x509.Certificate]:
    """The CA certificates of the library's policies (``require.ca``, ``source.ca``): issuers of CRLs too."""
    if library is None:
        return
    configs = [parse_policy(library.defaults, "defaults")]
    configs += [parse_policy(library.resolve({"policy": name})[0], name) for name in library.names()]
    for config in configs:
        bundles = [config.require.ca, config.source.ca if isinstance(config.source, HeaderSource) else None]
        for bundle in bundles:
            if bundle is not None:
                yield from (anchor.certificate for anchor in bundle.anchors)


def load_revocation(
    crl_files: Sequence[str],
    issuer_files: Sequence[str],
    library: PolicyLibrary | None,
    *,
    allow_stale: bool = False,
) -> RevocationTable:
    """The runner's CRL table; CrlError (CrlReadError for a file that cannot be read) names the option and
    the first file that cannot be used."""
    try:
        issuers = read_issuer_files(issuer_files)  # read even without CRLs: a broken file is reported now
    except CrlError as exc:
        raise type(exc)(f"crl_issuer_files: {exc}") from None
    if not crl_files:
        # Still carries stale_crl: policies' own CRLs (require.crl) follow the runner's choice.
        return RevocationTable({}, {}, (), allow_stale=allow_stale) if allow_stale else NO_REVOCATION
    issuers.extend(library_issuers(library))
    try:
        table = build_table(read_crl_paths(crl_files), issuers, allow_stale=allow_stale)
    except CrlError as exc:
        raise type(exc)(f"crl_files: {exc}") from None
    now = datetime.now(UTC)
    for info in table.crls:
        log.info(
            "event=crl_loaded crl=%s issuer=%r entries=%d next_update=%s",
            info.source,
            info.issuer,
            info.entries,
            info.next_update.isoformat() if info.next_update else "none",
        )
        if info.next_update is not None and now >= info.next_update:
            action = "allowed (stale_crl: allow)" if allow_stale else "denied (crl-stale)"
            log.warning(
                "event=crl_stale crl=%s next_update=%s certificates of its issuer are %s",
                info.source,
                info.next_update.isoformat(),
                action,
            )
    return table


def load_options(options: Mapping[str, Any]) -> GuardOptions:
    """Validate ``plugins: {mtls-guard: {...}}`` and read every file it names; ValueError on anything wrong."""
    unknown = sorted(set(options) - OPTIONS)
    if unknown:
        raise ValueError(f"unknown mtls-guard option(s): {', '.join(unknown)} (known: {', '.join(sorted(OPTIONS))})")
    size = options.get("cert_cache_size", 4096)
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise ValueError("cert_cache_size must be a positive integer")
    stale = options.get("stale_crl", "deny")
    if stale not in STALE_CRL_CHOICES:
        raise ValueError(f"stale_crl must be one of {', '.join(STALE_CRL_CHOICES)}, not {stale!r}")
    library: PolicyLibrary | None = None
    policy_file = options.get("policy_file")
    if policy_file is not None:
        try:
            library = PolicyLibrary.from_yaml_file(str(policy_file))
        except PolicyError as exc:
            raise ValueError(f"policy file {policy_file}: {exc}") from exc
    crl_files, issuer_files = _paths(options, "crl_files"), _paths(options, "crl_issuer_files")
    try:
        revocation = load_revocation(crl_files, issuer_files, library, allow_stale=stale == "allow")
    except CrlError as exc:
        raise ValueError(str(exc)) from None
    return GuardOptions(library, revocation, size)
