"""Operator tools of the ``mtls-guard`` command: check, explain, demo (and lint).

Exit codes follow runner.cli: 0 ok / allowed, 1 invalid policy / denied / lint errors, 2 usage.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from .identity import CertificateError, load_pem
from .library import PolicyLibrary
from .plugin import MtlsGuard
from .policy import CompiledPolicy, compile_policy
from .schema import PolicyError

__all__ = ["register"]

_MAX_INPUT = 4 << 20


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    check = sub.add_parser("check", help="validate a policy and print what it means")
    check.add_argument("policy", nargs="?", help="policy as a file (JSON/YAML) or inline JSON")
    check.add_argument("--policy-file", help="policy library (YAML) for named policies; alone: check all")
    check.set_defaults(command=_check)

    ex = sub.add_parser("explain", help="print the decision the runner would make for one request")
    ex.add_argument("--policy", required=True, help="policy as a file (JSON/YAML) or inline JSON")
    ex.add_argument("--policy-file", help="policy library (YAML) for named policies")
    ex.add_argument("--method", default="GET")
    where = ex.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--target", help="the request-target exactly as the client sends it (e.g. '/admin/..%%2Fpublic/x?a=1')"
    )
    where.add_argument("--path", help="the path as APISIX sends it to the runner ($uri, already decoded)")
    ex.add_argument("--host", default="localhost", help="Host of the request (default localhost)")
    ex.add_argument("--sni", help="TLS SNI (default: same as --host)")
    ex.add_argument("--scheme", default="https", choices=("https", "http"))
    cert = ex.add_mutually_exclusive_group()
    cert.add_argument("--cert", help="client certificate (PEM file) presented in the handshake")
    cert.add_argument("--no-cert", action="store_true", help="no client certificate (default)")
    ex.add_argument("--verify", help="nginx $ssl_client_verify (default SUCCESS with --cert, else NONE)")
    ex.add_argument("--peer", default="127.0.0.1", help="direct peer address ($realip_remote_addr)")
    ex.add_argument("--header", action="append", default=[], metavar="NAME:VALUE", help="request header")
    ex.add_argument("--json", action="store_true", help="machine-readable output")
    ex.set_defaults(command=_explain)

    demo = sub.add_parser("demo", help="runner + fake APISIX + generated certificates, in one process")
    demo.set_defaults(command=_demo)

    try:
        from . import lint
    except ImportError:  # pragma: no cover - lint ships with the package
        return
    lint.register(sub)


def _fail(message: str) -> int:
    print(f"mtls-guard: {message}", file=sys.stderr)
    return 1


def _library(path: str | None) -> PolicyLibrary | None:
    return None if path is None else PolicyLibrary.from_yaml_file(path)


def _policy_source(value: str) -> str | Mapping[str, Any]:
    """A policy given as a path to a JSON/YAML file, or inline JSON."""
    if not value.lstrip().startswith("{") and os.path.exists(value):
        path = Path(value)
        if path.stat().st_size > _MAX_INPUT:
            raise PolicyError("", f"{value}: larger than {_MAX_INPUT} bytes")
        text = path.read_text(encoding="utf-8")
        if path.suffix in (".yaml", ".yml"):
            try:
                data = yaml.safe_load(text)
            except yaml.YAMLError as exc:
                raise PolicyError("", f"{value}: invalid YAML: {exc}") from exc
            if not isinstance(data, dict):
                raise PolicyError("", f"{value}: a policy must be a mapping")
            return data
        return text
    return value


def _load(policy: str, policy_file: str | None) -> tuple[MtlsGuard, CompiledPolicy]:
    plugin = MtlsGuard()
    plugin.library = _library(policy_file)
    return plugin, compile_policy(_policy_source(policy), plugin.library)


def _check(args: argparse.Namespace) -> int:
    try:
        if args.policy is None:
            if args.policy_file is None:
                return _fail("check needs a POLICY or --policy-file")
            library = _library(args.policy_file)
            assert library is not None
            for name in library.names():
                compile_policy({"policy": name}, library)
                print(f"policy {name!r}: valid")
            return 0
        _, compiled = _load(args.policy, args.policy_file)
    except (PolicyError, OSError, UnicodeDecodeError) as exc:
        return _fail(f"invalid policy: {exc}")
    print("valid policy")
    print(compiled.describe())
    return 0


def _explain(args: argparse.Namespace) -> int:
    from runner.testing import uri_safe_encode

    from .explain import explain, nginx_uri, query_args

    try:
        plugin, compiled = _load(args.policy, args.policy_file)
    except (PolicyError, OSError, UnicodeDecodeError) as exc:
        return _fail(f"invalid policy: {exc}")
    headers: list[tuple[str, str | None]] = [("host", args.host)]
    for raw in args.header:
        name, sep, value = raw.partition(":")
        if not sep or not name.strip():
            return _fail(f"--header {raw!r}: expected NAME:VALUE")
        headers.append((name.strip().lower(), value.strip()))
    target = args.target
    if target is not None:
        try:
            path, query = nginx_uri(target)
        except ValueError as exc:
            return _fail(f"--target {target!r}: nginx answers 400 ({exc})")
    else:
        path, query = args.path, ""
        target = args.path
    variables: dict[str, str | None] = {
        "host": args.host.lower(),  # nginx's $host (APISIX routes on it)
        "ssl_server_name": (args.sni or args.host).lower() if args.scheme == "https" else None,
        "realip_remote_addr": args.peer,
        "ssl_client_verify": "NONE",
        "upstream_uri": "",  # APISIX's default: no earlier plugin rewrote the path
        "real_request_uri": target,
    }
    if args.cert:
        try:
            pem = Path(args.cert).read_text(encoding="ascii")
            load_pem(pem)
        except (OSError, UnicodeDecodeError, CertificateError) as exc:
            return _fail(f"--cert {args.cert}: {exc}")
        from .devcerts import escaped

        variables["ssl_client_escaped_cert"] = escaped(pem)
        variables["ssl_client_verify"] = "SUCCESS"
    if args.verify:
        variables["ssl_client_verify"] = args.verify
    if args.scheme != "https":
        variables["ssl_client_verify"] = None
    result = explain(
        plugin,
        compiled,
        method=args.method,
        path=path,
        headers=tuple(headers),
        variables=variables,
        args=query_args(query),
        src_ip=args.peer,
    )
    # What nginx proxies: the raw target, unless the Rewrite set a path (APISIX's uri_safe_encode + query).
    delivered = target
    if result.upstream_path is not None:
        delivered = uri_safe_encode(result.upstream_path) + (f"?{query}" if query else "")
    d = result.decision
    outcome: dict[str, Any] = {
        "allowed": d.allowed,
        "verdict": d.verdict,
        "reason": str(d.reason),
        "detail": d.detail,
        "mode": str(d.mode),
        "status": result.stop.status if result.stop else None,
        "upstream_headers": [[n, v] for n, v in result.upstream_headers],
        "uri": path,
        "upstream_target": None if result.stop else delivered,
        "exemptions": list(result.exemptions),
        "variables_asked": list(result.variables_asked),
        "extra_info_round_trips": result.round_trips,
    }
    if args.json:
        print(json.dumps(outcome, indent=2))
    else:
        action = f"reject {outcome['status']}" if result.stop else "pass to upstream"
        print(f"decision: {d.verdict} ({action}) reason={d.reason}" + (f" detail={d.detail}" if d.detail else ""))
        print(f"mode: {d.mode}")
        print(f"request-target: {target}  ->  nginx $uri (judged): {path}")
        if not result.stop:
            print(f"upstream receives: {delivered}")
        if result.exemptions:
            print("exemptions (first match wins):")
            for line in result.exemptions:
                print(f"  {line}")
        print(f"variables fetched: {', '.join(result.variables_asked) or 'none'} ({result.round_trips} round trip(s))")
        for name, value in result.upstream_headers:
            print(f"upstream header: {name}: {'<removed>' if value is None else value}")
    return 0 if d.allowed else 1


def _demo(args: argparse.Namespace) -> int:
    from .demo import main as demo_main

    return demo_main()
