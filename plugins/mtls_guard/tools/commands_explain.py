"""``mtls-guard explain``: the decision the runner would make for one request, and what it assumed to get there.

Exit codes: 0 the request passes, 1 it is rejected (nginx's own 400 for a --target included) or the
policy is invalid, 2 a usage error or an unreadable input file (commands_io).
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from runner.protocol.messages import METHOD_NAMES

from ..identity import CertificateError, ClientCertificate
from ..matchers import authority_host
from ..policy import CompiledPolicy
from .commands_io import (
    EXIT_NEGATIVE,
    EXIT_USAGE,
    CommandError,
    fail,
    load_library,
    load_policy,
    load_revocation_files,
    read_certificates,
)

__all__ = ["register"]

PROG: Final = "mtls-guard explain"
ASSUMED_VERIFY: Final = (
    "assuming APISIX verified the certificate (ssl_client_verify=SUCCESS); pass --client-ca to check it"
)
_TOKEN: Final = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _method(value: str) -> str:
    # nginx answers 400 to a method with lower-case letters, so no request carries "get": reading it as
    # GET only spares the operator's shift key.
    name = value.upper()
    if name not in METHOD_NAMES:
        known = ", ".join(METHOD_NAMES)
        raise argparse.ArgumentTypeError(f"{value!r} is not a method APISIX passes to the runner ({known})")
    return name


def _peer(value: str) -> str:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not an IP address") from None
    return value


def _header(value: str) -> tuple[str, str]:
    name, colon, rest = value.partition(":")
    name = name.strip()
    if not colon:
        raise argparse.ArgumentTypeError(f"{value!r} is not NAME:VALUE (no colon)")
    if not _TOKEN.fullmatch(name):
        raise argparse.ArgumentTypeError(f"{name!r} is not a header name")
    if name.lower() == "host":
        raise argparse.ArgumentTypeError("the Host header is set with --host")
    return name.lower(), rest.strip()


def _depth(value: str) -> int:
    try:
        depth = int(value)
    except ValueError:
        depth = -1
    if depth < 0:
        raise argparse.ArgumentTypeError(f"{value!r} is not a depth (a whole number, 0 or more)")
    return depth


def _verify(value: str) -> str:
    if value in ("SUCCESS", "NONE") or (value.startswith("FAILED:") and len(value) > len("FAILED:")):
        return value
    raise argparse.ArgumentTypeError(f"{value!r} is not SUCCESS, NONE or FAILED:<reason> (nginx's $ssl_client_verify)")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    ex = sub.add_parser(
        "explain",
        help="print the decision the runner would make for one request",
        description="Run one request through the plugin as the runner would, and print the decision, why "
        "each exemption rule did or did not apply, and what was assumed. Exit 0: the request passes; "
        "1: it is rejected or the policy is invalid; 2: usage error or unreadable input.",
    )
    ex.add_argument("--policy", required=True, help="policy as a JSON/YAML file, or inline JSON ('{...}')")
    ex.add_argument("--policy-file", help="policy library (YAML) for named policies")
    ex.add_argument(
        "--method", default="GET", type=_method, help="a method APISIX passes to the runner (case-insensitive)"
    )
    where = ex.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--target", help="the request-target exactly as the client sends it (e.g. '/admin/..%%2Fpublic/x?a=1')"
    )
    where.add_argument("--path", help="the path as APISIX sends it to the runner ($uri, already decoded)")
    ex.add_argument("--host", default="localhost", help="Host of the request (default localhost)")
    ex.add_argument("--sni", help="TLS SNI (default: same as --host)")
    ex.add_argument("--scheme", default="https", choices=("https", "http"))
    cert = ex.add_mutually_exclusive_group()
    cert.add_argument("--cert", help="client certificate, PEM; may be followed by the intermediates the client sends")
    cert.add_argument("--no-cert", action="store_true", help="no client certificate (default)")
    verify = ex.add_mutually_exclusive_group()
    verify.add_argument(
        "--verify",
        type=_verify,
        help="nginx's $ssl_client_verify as given (default with --cert: assumed SUCCESS, and said so; else NONE)",
    )
    verify.add_argument(
        "--client-ca",
        metavar="FILE",
        help="PEM bundle of the SSL object's client.ca: verify --cert against it as nginx would",
    )
    ex.add_argument(
        "--client-depth",
        type=_depth,
        metavar="N",
        help="with --client-ca: the SSL object's client.depth, the most intermediates allowed (default 1)",
    )
    ex.add_argument(
        "--crl",
        action="append",
        default=[],
        metavar="FILE",
        help="a CRL file or directory (PEM or DER), as the runner's crl_files: revoked certificates are denied",
    )
    ex.add_argument(
        "--crl-issuer",
        action="append",
        default=[],
        metavar="FILE",
        help="PEM bundle of the CRLs' issuers (crl_issuer_files); --policy-file CA bundles count too",
    )
    ex.add_argument("--peer", default="127.0.0.1", type=_peer, help="direct peer address ($realip_remote_addr)")
    ex.add_argument("--header", action="append", default=[], type=_header, metavar="NAME:VALUE", help="request header")
    ex.add_argument("--json", action="store_true", help="machine-readable output")
    ex.set_defaults(command=main)


def main(args: argparse.Namespace) -> int:
    try:
        return _explain(args)
    except CommandError as exc:
        return fail(PROG, exc.code, str(exc))


def _check_combinations(args: argparse.Namespace) -> None:
    if args.scheme == "http":
        options = {"--cert": args.cert, "--client-ca": args.client_ca, "--verify": args.verify, "--sni": args.sni}
        given = [name for name, value in options.items() if value]
        if given:
            raise CommandError(EXIT_USAGE, f"{', '.join(given)} with --scheme http: plain HTTP has no TLS handshake")
    if args.client_depth is not None and not args.client_ca:
        raise CommandError(EXIT_USAGE, "--client-depth applies to --client-ca, which is not given")


@dataclass
class _Verification:
    """What explain assumed about the request, and the --client-ca check when there was one."""

    assumptions: list[str] = field(default_factory=list)
    client_ca: dict[str, Any] | None = None


def _tls_variables(
    args: argparse.Namespace, policy: CompiledPolicy, variables: dict[str, str | None], seen: _Verification
) -> None:
    """ssl_client_verify and ssl_client_escaped_cert from --cert, --verify and --client-ca."""
    source = policy.engine.header_source
    if source is not None and (args.cert or args.client_ca):
        seen.assumptions.append(
            f"the policy takes the client certificate from the {source.header} header a trusted proxy sets: "
            "--cert and --client-ca play no part (send the header with --header, from a trusted --peer)"
        )
    if args.verify:
        variables["ssl_client_verify"] = args.verify
    if not args.cert:
        return
    from .commands_verify import DEFAULT_DEPTH, client_verify
    from .devcerts import escaped

    chain = read_certificates(args.cert, "--cert")
    # $ssl_client_escaped_cert is the leaf alone; the intermediates only help nginx build the path.
    variables["ssl_client_escaped_cert"] = escaped(_pem(chain[0]))
    if args.verify:
        return
    if not args.client_ca:
        variables["ssl_client_verify"] = "SUCCESS"
        if source is None:
            seen.assumptions.append(ASSUMED_VERIFY)
        return
    anchors = read_certificates(args.client_ca, "--client-ca")
    try:
        depth = DEFAULT_DEPTH if args.client_depth is None else args.client_depth
        result = client_verify(chain, anchors, now=datetime.now(UTC), depth=depth)
    except CertificateError as exc:
        raise CommandError(EXIT_USAGE, f"--client-ca {args.client_ca}: {exc}") from None
    variables["ssl_client_verify"] = result.verify
    seen.client_ca = {"file": args.client_ca, "ssl_client_verify": result.verify, "reason": result.reason}
    seen.assumptions.append(
        "assuming OpenSSL's chain check in nginx agrees with mtls-guard's (RFC 5280, at the current time); "
        "they differ on edge cases such as a CA certificate presented as the client's"
    )
    for position in result.unanchored:
        seen.assumptions.append(
            f"--client-ca certificate #{position} has no self-signed root in the file: nginx does not anchor on it "
            "(no partial chains)"
        )


def _routed_host(target: str | None, host: str) -> str:
    """nginx's ``$host``, which APISIX routes on: the host of an absolute-form request-target, else the Host."""
    if target is not None and target.startswith(("http://", "https://")):
        authority = target.split("://", 1)[1].split("/", 1)[0].split("?", 1)[0]
        return (authority_host(authority) or "").lower()
    return host.lower()


def _pem(cert: ClientCertificate) -> str:
    from cryptography.hazmat.primitives.serialization import Encoding

    return cert.certificate.public_bytes(Encoding.PEM).decode("ascii")


def _explain(args: argparse.Namespace) -> int:
    from runner.testing import uri_safe_encode

    from .explain import explain, nginx_uri, query_args

    _check_combinations(args)
    library = load_library(args.policy_file)
    plugin, compiled = load_policy(args.policy, "--policy", library)
    plugin.revocation = load_revocation_files(args.crl, args.crl_issuer, library)
    headers: list[tuple[str, str | None]] = [("host", args.host), *args.header]
    target = args.target
    if target is not None:
        try:
            path, query = nginx_uri(target)
        except ValueError as exc:
            # Not a usage error: the request is a real one, and nginx rejects it before APISIX sees it.
            return fail(PROG, EXIT_NEGATIVE, f"nginx answers 400 to --target {target!r} ({exc})")
    else:
        path, query = args.path, ""
        target = args.path
    variables: dict[str, str | None] = {
        "host": _routed_host(args.target, args.host),
        "ssl_server_name": (args.sni or args.host).lower() if args.scheme == "https" else None,
        "realip_remote_addr": args.peer,
        "ssl_client_verify": "NONE",
        "upstream_uri": "",  # APISIX's default: no earlier plugin rewrote the path
        "real_request_uri": target,
    }
    seen = _Verification()
    _tls_variables(args, compiled, variables, seen)
    if args.scheme != "https":
        variables["ssl_client_verify"] = None
    if "%" in path:
        seen.assumptions.append("assuming no earlier plugin rewrote the path ($upstream_uri is empty)")
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
        "ssl_client_verify": variables["ssl_client_verify"],
        "client_ca": seen.client_ca,
        "assumptions": seen.assumptions,
        "crls": [info.describe(datetime.now(UTC)) for info in plugin.revocation.crls],
        "variables_asked": list(result.variables_asked),
        "extra_info_round_trips": result.round_trips,
    }
    if args.json:
        print(json.dumps(outcome, indent=2))
    else:
        _print_text(outcome, target, result.variables_asked, result.round_trips)
    return 0 if d.allowed else EXIT_NEGATIVE


def _print_text(outcome: dict[str, Any], target: str, asked: tuple[str, ...], round_trips: int) -> None:
    action = f"reject {outcome['status']}" if outcome["status"] else "pass to upstream"
    detail = f" detail={outcome['detail']}" if outcome["detail"] else ""
    print(f"decision: {outcome['verdict']} ({action}) reason={outcome['reason']}{detail}")
    for assumption in outcome["assumptions"]:
        print(assumption)
    print(f"mode: {outcome['mode']}")
    print(f"request-target: {target}  ->  nginx $uri (judged): {outcome['uri']}")
    if outcome["upstream_target"] is not None:
        print(f"upstream receives: {outcome['upstream_target']}")
    if outcome["client_ca"] is not None:
        ca = outcome["client_ca"]
        print(
            f"client certificate checked against --client-ca {ca['file']}: ssl_client_verify={ca['ssl_client_verify']}"
        )
    for crl in outcome["crls"]:
        print(f"revocation checked against --crl {crl}")
    if outcome["exemptions"]:
        print("exemptions (first match wins):")
        for line in outcome["exemptions"]:
            print(f"  {line}")
    else:
        print("exemptions: none in this policy")
    print(f"variables fetched: {', '.join(asked) or 'none'} ({round_trips} round trip(s))")
    for name, value in outcome["upstream_headers"]:
        print(f"upstream header: {name}: {'<removed>' if value is None else value}")
