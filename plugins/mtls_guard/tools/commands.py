"""Operator tools of the ``mtls-guard`` command: check, explain, demo (and lint).

Exit codes follow runner.cli: 0 valid / allowed, 1 invalid policy / denied / lint errors, 2 usage error
or unreadable input, 3 the demo's runner could not start. Every error is one line on stderr
(commands_io.fail), never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from datetime import UTC, datetime
from typing import Final

from ..library import PolicyLibrary
from ..policy import compile_policy
from ..policy_config import PolicyConfig
from ..schema_readers import PolicyError
from . import commands_explain, lint
from .commands_io import (
    EXIT_NEGATIVE,
    EXIT_STARTUP,
    EXIT_USAGE,
    CommandError,
    fail,
    load_library,
    load_policy,
    load_revocation_files,
)
from .lint_findings import Severity
from .lint_policy import policy_findings

__all__ = ["register"]

CHECK: Final = "mtls-guard check"
DEMO: Final = "mtls-guard demo"


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = sub.add_parser(
        "check",
        help="validate a policy and print what it means",
        description="Validate a policy (or every named policy of --policy-file) and print what it means; "
        "fail-open settings are reported on stderr with their lint codes (docs/lint-findings.md). "
        "Exit 0: valid (warnings allowed); 1: invalid, or valid but failing open (an error finding); "
        "2: usage error or unreadable input.",
    )
    check.add_argument("policy", nargs="?", help="policy as a JSON/YAML file, or inline JSON ('{...}')")
    check.add_argument("--policy-file", help="policy library (YAML) for named policies; alone: check all")
    check.add_argument(
        "--crl",
        action="append",
        default=[],
        metavar="FILE",
        help="a CRL file or directory (PEM or DER) to validate as the runner's crl_files would; repeatable",
    )
    check.add_argument(
        "--crl-issuer",
        action="append",
        default=[],
        metavar="FILE",
        help="PEM bundle of the CRLs' issuer certificates (crl_issuer_files); --policy-file CA bundles count too",
    )
    check.set_defaults(command=_check)

    commands_explain.register(sub)

    demo = sub.add_parser("demo", help="runner + fake APISIX + generated certificates, in one process")
    demo.set_defaults(command=_demo)

    lint.register(sub)


def _check(args: argparse.Namespace) -> int:
    try:
        if args.policy is None and args.policy_file is None and not args.crl:
            raise CommandError(
                EXIT_USAGE, "give a POLICY, or --policy-file to check every named policy (or --crl to check CRLs)"
            )
        library = load_library(args.policy_file)
        if args.crl or args.crl_issuer:
            _check_crls(args, library)
            if args.policy is None and args.policy_file is None:
                return 0
        if args.policy is not None:
            _, compiled = load_policy(args.policy, "policy", library)
            print("valid policy")
            print(compiled.describe())
            return EXIT_NEGATIVE if _report_fail_open(compiled.config, library, "") else 0
        assert library is not None
        failing_open = False
        for name in library.names():
            try:
                # The library validated each policy's schema; compiling also builds its matchers.
                compiled = compile_policy({"policy": name}, library)
            except PolicyError as exc:
                raise CommandError(EXIT_NEGATIVE, f"invalid policy {name!r} in {library.source}: {exc}") from None
            print(f"policy {name!r}: valid")
            failing_open |= _report_fail_open(compiled.config, library, f"policy {name!r}: ")
        if not library.names():
            print(f"{library.source}: no named policies")
        return EXIT_NEGATIVE if failing_open else 0
    except CommandError as exc:
        return fail(CHECK, exc.code, str(exc))


def _check_crls(args: argparse.Namespace, library: PolicyLibrary | None) -> None:
    table = load_revocation_files(args.crl, args.crl_issuer, library)
    now = datetime.now(UTC)
    print(f"valid CRLs: {len(table.crls)} in use, each signature verified against its issuer")
    for info in table.crls:
        print(f"  {info.describe(now)}")
        if info.next_update is not None and now >= info.next_update:
            print(
                f"{CHECK}: warning: {info.source} is past its nextUpdate: the runner denies every certificate "
                "of its issuer (crl-stale) unless stale_crl: allow",
                file=sys.stderr,
            )


def _report_fail_open(config: PolicyConfig, library: PolicyLibrary | None, label: str) -> bool:
    """Print the policy's fail-open findings on stderr, one line each; True if any is an error."""
    errors = False
    for finding in policy_findings(config, library):
        errors |= finding.severity is Severity.ERROR
        print(
            f"{CHECK}: {finding.severity} {finding.code}: {label}{finding.message} -- fix: {finding.fix}",
            file=sys.stderr,
        )
    return errors


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    try:
        return demo_main()
    except OSError as exc:
        # The demo's own runner: a socket or temporary directory it could not set up.
        return fail(DEMO, EXIT_STARTUP, f"the demo's runner could not start: {exc}")
