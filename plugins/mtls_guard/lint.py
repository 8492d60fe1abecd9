"""``mtls-guard lint``: find every way an APISIX configuration lets mtls-guard fail open or break.

Pipeline: load and merge the files (``lint_load``), validate ext-plugin configurations and policies
(``lint_plugins``), check SSL objects and certificates (``lint_tls``), then cross-check routes against
SNIs (``lint_coverage``) and exemption rules against route hosts (``lint_exempt``). This module only
wires them to the command line and renders the findings.

Exit codes: 0 no errors (warnings and notes allowed), 1 at least one error, 2 unreadable input.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib.metadata import entry_points

from runner.registry import ENTRY_POINT_GROUP

from .library import PolicyLibrary
from .lint_coverage import check_coverage
from .lint_exempt import check_exemptions
from .lint_findings import CODES, Findings, Severity
from .lint_load import Config, InputError, load_files
from .lint_plugins import PluginAnalysis
from .lint_tls import check_ssls
from .schema import PolicyError

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
) -> LintResult:
    """Lint one configuration spread over ``paths``; raises InputError for unreadable input."""
    findings = Findings()
    config = load_files(paths, findings)
    plugins = PluginAnalysis(
        config,
        findings,
        known_plugins=installed_plugins() if known_plugins is None else known_plugins,
        library=library,
    )
    ssls = check_ssls(config, findings, now=now or datetime.now(UTC), warn_days=expiry_warning_days)
    check_coverage(config, findings, ssls, plugins)
    check_exemptions(config, findings, plugins)
    return LintResult(config, findings)


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


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "lint",
        help="check an APISIX config (apisix.yaml or Admin API export) for mTLS fail-open and breakage",
        description="Check APISIX standalone apisix.yaml files or Admin API exports (JSON/YAML; several files "
        "are merged into one configuration). Exit 0: no errors; 1: errors found; 2: unreadable input.",
    )
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--expiry-warning-days", type=int, default=30, metavar="DAYS")
    p.add_argument("--policy-file", help="runner policy library (YAML) for named policies")
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
        now = _parse_now(args.now)
        library = PolicyLibrary.from_yaml_file(args.policy_file) if args.policy_file else None
        result = lint_files(
            args.files,
            now=now,
            expiry_warning_days=args.expiry_warning_days,
            library=library,
            known_plugins=installed_plugins() | set(args.plugin),
        )
    except (InputError, PolicyError) as exc:
        print(f"mtls-guard lint: {exc}", file=sys.stderr)
        return EXIT_UNREADABLE
    print(render_json(result) if args.format == "json" else render_text(result))
    return result.exit_code
