"""``mtls-guard lint``: find every way an APISIX configuration lets mtls-guard fail open or break.

Pipeline: load and merge the files (``lint_load``; Kubernetes manifests through ``lint_k8s``) and what
a live Admin API serves (``lint_admin``), validate ext-plugin configurations and policies
(``lint_plugins``), check SSL objects and certificates (``lint_tls``), then cross-check routes against
SNIs (``lint_coverage``) and exemption rules against route hosts (``lint_exempt``). This module only
wires them to the command line and renders the findings.

Exit codes: 0 no errors (warnings and notes allowed), 1 at least one error, 2 unreadable input, an
unreachable Admin API, or a usage error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import entry_points

from runner.registry import ENTRY_POINT_GROUP

from ..crl_files import CrlReadError
from ..library import PolicyLibrary
from ..options import load_revocation
from ..revocation import CrlError
from ..schema_readers import PolicyError
from .lint_admin import DEFAULT_KEY_ENV, AdminError, AdminSnapshot, fetch_admin
from .lint_coverage import check_coverage
from .lint_exempt import check_exemptions
from .lint_findings import CODES, Findings, Severity
from .lint_load import Config, load_export, load_files
from .lint_plugins import PluginAnalysis
from .lint_read import InputError
from .lint_tls import check_ssls

__all__ = ["CODES", "LintResult", "lint_files", "main", "register"]

EXIT_OK = 0
EXIT_ERRORS = 1
EXIT_UNREADABLE = 2


@dataclass(frozen=True, slots=True)
class LintResult:
    config: Config
    findings: Findings

    @property
    def exit_code(self) -> int:
        return EXIT_ERRORS if self.findings.count(Severity.ERROR) else EXIT_OK


def installed_plugins() -> frozenset[str]:
    """Names the runner would load here (entry points are listed, not imported: lint must not run them)."""
    return frozenset(ep.name for ep in entry_points(group=ENTRY_POINT_GROUP))


def lint_files(
    paths: Sequence[str],
    *,
    now: datetime | None = None,
    expiry_warning_days: int = 30,
    library: PolicyLibrary | None = None,
    known_plugins: Iterable[str] | None = None,
    admin: AdminSnapshot | None = None,
    crl_files: Sequence[str] = (),
    crl_issuer_files: Sequence[str] = (),
) -> LintResult:
    """Lint one configuration spread over ``paths`` and ``admin`` (objects already fetched from a live
    Admin API); raises InputError for unreadable input."""
    findings = Findings()
    config = load_files(paths, findings)
    for kind, objects in (admin.objects if admin is not None else {}).items():
        load_export(config, findings, kind, objects, origin="admin")
    plugins = PluginAnalysis(
        config,
        findings,
        known_plugins=installed_plugins() if known_plugins is None else known_plugins,
        library=library,
    )
    ssls = check_ssls(config, findings, now=now or datetime.now(UTC), warn_days=expiry_warning_days)
    check_coverage(config, findings, ssls, plugins)
    check_exemptions(config, findings, plugins)
    if crl_files or crl_issuer_files:
        check_crls(findings, crl_files, crl_issuer_files, library, now or datetime.now(UTC))
    return LintResult(config, findings)


def check_crls(
    findings: Findings,
    crl_files: Sequence[str],
    issuer_files: Sequence[str],
    library: PolicyLibrary | None,
    now: datetime,
) -> None:
    """MG080/MG081: the runner's crl_files as it loads them (options.load_revocation), so a CRL that would
    stop the runner or fail a reload is found in CI; InputError for a file that cannot be read."""
    try:
        table = load_revocation(crl_files, issuer_files, library)
    except CrlReadError as exc:
        raise InputError(f"--crl/--crl-issuer {exc}") from None
    except CrlError as exc:
        fix = "verify it against crl_issuer_files (openssl crl -verify -CAfile ISSUER.pem -in FILE) and replace it"
        findings.add("MG080", "crl_files", str(exc), fix)
        return
    for info in table.crls:
        if info.next_update is not None and now >= info.next_update:
            findings.add(
                "MG081",
                "crl_files",
                f"{info.source} (issuer {info.issuer!r}) is past its nextUpdate {info.next_update:%Y-%m-%d %H:%M}Z: "
                "every certificate of its issuer is denied (crl-stale) unless stale_crl: allow",
                "publish a fresh CRL from the issuing CA, then kill -HUP the runner",
                source=info.source,
            )


# -- rendering ---------------------------------------------------------------------------------------


def _summary(findings: Findings) -> dict[str, int]:
    return {f"{s.value}s": findings.count(s) for s in Severity}


def render_text(result: LintResult) -> str:
    lines = []
    for f in result.findings.sorted():
        where = f"{f.source}:{f.line}: " if f.source and f.line else f"{f.source}: " if f.source else ""
        obj = "" if f.obj == f.source else f" {f.obj}:"
        lines.append(f"{where}{f.severity} {f.code}{obj} {f.message} -- fix: {f.fix}")
    counts = _summary(result.findings)
    files = ", ".join(f"{f.path} ({f.shape}, {f.resources} objects)" for f in result.config.files)
    lines.append(f"{counts['errors']} error(s), {counts['warnings']} warning(s), {counts['infos']} note(s) in {files}")
    return "\n".join(lines)


def render_json(result: LintResult) -> str:
    document = {
        "files": [
            {"path": f.path, "format": f.format, "shape": f.shape, "resources": f.resources}
            for f in result.config.files
        ],
        "findings": [f.as_dict() for f in result.findings.sorted()],
        "summary": _summary(result.findings),
        "exit_code": result.exit_code,
    }
    return json.dumps(document, indent=2)


# -- command line ------------------------------------------------------------------------------------


def _parse_now(text: str | None) -> datetime:
    if text is None:
        return datetime.now(UTC)
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise InputError(f"--now {text!r}: not an ISO 8601 date/time") from None
    return when if when.tzinfo is not None else when.replace(tzinfo=UTC)


def _admin_snapshot(args: argparse.Namespace) -> AdminSnapshot | None:
    if args.admin_url is None:
        if args.admin_key_env is not None:
            raise InputError("--admin-key-env needs --admin-url")
        return None
    if not 0 < args.admin_timeout <= 3600:  # also refuses nan, which urllib would accept and never time out
        raise InputError("--admin-timeout must be more than 0 and at most 3600 seconds")
    var = args.admin_key_env or DEFAULT_KEY_ENV
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", var):  # never echo it: it may be the key itself
        raise InputError("--admin-key-env takes the *name* of an environment variable holding the key")
    key = os.environ.get(var) or None
    if key is None and args.admin_key_env is not None:
        raise InputError(f"--admin-key-env {var}: the environment variable is unset or empty")
    return fetch_admin(args.admin_url, key, key_env=var if key else None, timeout=args.admin_timeout)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lint",
        help="check an APISIX config (apisix.yaml, Admin API export, Kubernetes manifests or a live Admin API) "
        "for mTLS fail-open and breakage",
        description="Check APISIX standalone apisix.yaml files, Admin API exports (JSON/YAML), APISIX Ingress "
        "Controller manifests (apisix.apache.org/v2, multi-document YAML) and/or what a running APISIX serves "
        "(--admin-url); everything given is merged into one configuration. Exit 0: no errors; 1: errors found; "
        "2: unreadable input, unreachable Admin API or bad usage.",
    )
    p.add_argument("files", nargs="*", metavar="FILE")
    p.add_argument(
        "--admin-url",
        metavar="URL",
        help="also read routes, services, plugin configs, global rules and SSLs from this Admin API "
        "(APISIX 3.x, e.g. http://127.0.0.1:9180)",
    )
    p.add_argument(
        "--admin-key-env",
        metavar="VAR",
        help=f"environment variable holding the Admin API key (default {DEFAULT_KEY_ENV}; if that is unset, "
        "no key is sent); the key itself is never taken on the command line",
    )
    p.add_argument("--admin-key", help=argparse.SUPPRESS)  # only to refuse it with a clear message
    p.add_argument("--admin-timeout", type=float, default=10.0, metavar="SECONDS", help="per request (default 10)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--expiry-warning-days", type=int, default=30, metavar="DAYS")
    p.add_argument("--policy-file", help="runner policy library (YAML) for named policies")
    p.add_argument(
        "--crl",
        action="append",
        default=[],
        metavar="FILE",
        help="the runner's crl_files (file or directory, PEM or DER): verified as the runner loads them; repeatable",
    )
    p.add_argument(
        "--crl-issuer",
        action="append",
        default=[],
        metavar="FILE",
        help="PEM bundle of the CRLs' issuers (crl_issuer_files); --policy-file CA bundles count too; repeatable",
    )
    p.add_argument("--now", help="evaluate certificate dates at this ISO 8601 time (default: now)")
    p.add_argument(
        "--plugin",
        action="append",
        default=[],
        metavar="NAME",
        help="another runner plugin name to accept in ext-plugin conf lists (repeatable)",
    )
    p.set_defaults(command=main)


def main(args: argparse.Namespace) -> int:
    try:
        if args.admin_key is not None:
            # Command lines show up in ps output and shell history: the key only comes from the environment.
            raise InputError(
                "--admin-key is not accepted: put the key in an environment variable and name it "
                "with --admin-key-env VAR"
            )
        if not args.files and args.admin_url is None:
            raise InputError("give at least one FILE, or --admin-url URL")
        now = _parse_now(args.now)
        library = PolicyLibrary.from_yaml_file(args.policy_file) if args.policy_file else None
        admin = _admin_snapshot(args)
        result = lint_files(
            args.files,
            now=now,
            expiry_warning_days=args.expiry_warning_days,
            library=library,
            known_plugins=installed_plugins() | set(args.plugin),
            admin=admin,
            crl_files=args.crl,
            crl_issuer_files=args.crl_issuer,
        )
    except (InputError, PolicyError, AdminError) as exc:
        print(f"mtls-guard lint: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(render_json(result) if args.format == "json" else render_text(result))
    return result.exit_code
