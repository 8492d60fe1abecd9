"""deny-header: a plugin for the apisix-mtls-guard runner that answers 403 when a request carries a header.

Route conf: the header's name, e.g. ``{"name": "deny-header", "value": "X-Debug"}`` in ext-plugin-pre-req.
"""

from __future__ import annotations

import argparse
import sys

from runner import BasePlugin, HTTPRequest, Stop


class DenyHeader(BasePlugin[str]):
    name = "deny-header"

    def parse_conf(self, value: str) -> str:
        header = value.strip().lower()  # compiled once per conf token, immutable
        if not header or any(c in header for c in " :\r\n"):
            raise ValueError(f"not a header name: {value!r}")  # APISIX gets an error for this route
        return header

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        if conf in request.headers:
            return Stop(403, (("content-type", "text/plain"),), b"no\n")
        host = await request.var("host")  # ExtraInfo; absent variables are None
        request.set_header("x-seen-host", host or "-")  # collected into one Rewrite
        return None


def register(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Adds ``mtls-guard deny-header VALUE``: check a route conf value before it goes live."""
    check = commands.add_parser("deny-header", help="check a deny-header route conf value")
    check.add_argument("value")
    check.set_defaults(command=_check)


def _check(args: argparse.Namespace) -> int:
    try:
        header = DenyHeader().parse_conf(args.value)
    except ValueError as exc:
        print(f"mtls-guard deny-header: error: {exc}", file=sys.stderr)
        return 1  # mtls-guard's exit codes: 1 is a negative verdict
    print(f"requests carrying a {header} header get 403")
    return 0
