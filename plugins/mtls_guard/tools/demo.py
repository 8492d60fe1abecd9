"""`mtls-guard demo`: the runner, a protocol-faithful fake APISIX and generated certificates, in one
process. Every scenario goes through the real socket, codec, session and plugin; only APISIX and
nginx are simulated (their TLS verdict arrives as the ``ssl_client_verify`` variable)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from runner.plugin import HTTPRequest
from runner.registry import PluginRegistry
from runner.server import RunnerServer
from runner.settings import Settings
from runner.testing import ApisixOutcome, FakeApisix, conf

from ..decision import Decision
from ..plugin import MtlsGuard
from .devcerts import CertFactory, escaped

__all__ = ["main"]

HOST = "api.example.test"
BILLING = "spiffe://example.test/ns/prod/sa/billing"

POLICY: dict[str, object] = {
    "exempt": [
        {"id": "health", "path": "/healthz|/readyz", "methods": ["GET", "HEAD"]},
        {"id": "cors-preflight", "preflight": True},
    ],
    "require": {"san": {"uri": ["spiffe://example.test/ns/*/sa/billing"]}},
    "forward": {"san": "x-client-san", "fingerprint": "x-client-fingerprint"},
}
REPORT_POLICY: dict[str, object] = {**POLICY, "mode": "report"}


@dataclass(frozen=True)
class Scenario:
    title: str
    method: str = "GET"
    path: str = "/api/orders"
    cert: str | None = None
    verify: str | None = None
    variables: dict[str, str | None] = field(default_factory=dict)
    policy: dict[str, object] = field(default_factory=lambda: POLICY)
    headers: tuple[tuple[str, str], ...] = ()


PREFLIGHT = (("origin", "https://app.example.test"), ("access-control-request-method", "POST"))


def _scenarios(certs: dict[str, str]) -> list[Scenario]:
    return [
        Scenario("exempt health check, no certificate", path="/healthz"),
        Scenario("CORS preflight, no certificate", method="OPTIONS", headers=PREFLIGHT),
        Scenario(
            "preflight + X-HTTP-Method-Override: DELETE",
            method="OPTIONS",
            headers=(*PREFLIGHT, ("x-http-method-override", "DELETE")),
        ),
        Scenario("protected path, no certificate"),
        Scenario("protected path, valid certificate (billing)", cert=certs["billing"]),
        Scenario("protected path, wrong identity (frontend)", cert=certs["frontend"]),
        Scenario("untrusted CA (nginx says FAILED)", verify="FAILED:unable to verify the first certificate"),
        Scenario("expired certificate on a resumed TLS session", cert=certs["expired"]),
        Scenario("Host differs from SNI", cert=certs["billing"], variables={"ssl_server_name": "other.example.test"}),
        # Over plain HTTP nginx's ssl_* variables are "not found".
        Scenario("plain HTTP", cert=None, variables={"ssl_client_verify": None, "ssl_server_name": None}),
        Scenario("report mode, no certificate", policy=REPORT_POLICY),
    ]


def _make_certs() -> dict[str, str]:
    factory = CertFactory()
    ca = factory.ca("Demo Root CA")
    now = datetime.now(UTC)
    return {
        "billing": factory.leaf(ca, cn="billing", uris=[BILLING]).pem,
        "frontend": factory.leaf(ca, cn="frontend", uris=["spiffe://example.test/ns/prod/sa/frontend"]).pem,
        "expired": factory.leaf(
            ca, cn="billing", uris=[BILLING], not_before=now - timedelta(days=30), not_after=now - timedelta(days=1)
        ).pem,
    }


def _variables(s: Scenario) -> dict[str, str | None]:
    values: dict[str, str | None] = {"ssl_server_name": HOST, "upstream_uri": ""}
    if s.cert is not None:
        values["ssl_client_verify"] = "SUCCESS"
        values["ssl_client_escaped_cert"] = escaped(s.cert)
    else:
        values["ssl_client_verify"] = s.verify or "NONE"
    values.update(s.variables)
    return values


def _answer(outcome: ApisixOutcome) -> str:
    if outcome.kind == "stop":
        return f"{outcome.client_status} from APISIX"
    if outcome.kind == "error":
        return f"503 ({outcome.error.name if outcome.error else 'error'})"
    return "proxied upstream"


async def _play(socket_path: str, plugin: MtlsGuard, certs: dict[str, str]) -> None:
    seen: list[Decision] = []

    def observe(_request: HTTPRequest, decision: Decision) -> None:
        seen.append(decision)

    plugin.observers.append(observe)
    print(f"policy of route 1: {json.dumps(POLICY)}")
    print('policy of route 2: the same with "mode": "report"\n')
    header = f"{'#':>2}  {'scenario':<46} {'request':<20} {'APISIX answers':<20} decision"
    print(header)
    print("-" * (len(header) + 24))
    async with FakeApisix(socket_path) as apisix:
        for number, s in enumerate(_scenarios(certs), 1):
            route = 2 if s.policy is REPORT_POLICY else 1
            outcome = await apisix.request(
                conf(("mtls-guard", json.dumps(s.policy))),
                key=f"route#{route}#ext-plugin-pre-req#1",
                method=s.method,
                path=s.path,
                headers=(("host", HOST), ("x_client_san", "forged-by-client"), *s.headers),
                vars=_variables(s),
            )
            d = seen[-1]
            verdict = f"{d.verdict} {d.reason}" + (f":{d.detail}" if d.detail else "")
            if d.mode == "report" and d.verdict == "deny":
                verdict += " (report mode: let through)"
            request = f"{s.method} {s.path}"
            print(f"{number:>2}  {s.title:<46} {request:<20} {_answer(outcome):<20} {verdict}")
            if outcome.rewrite is not None:
                if outcome.rewrite.path is not None:
                    print(f"{'':>4}upstream path {outcome.rewrite.path} (the path judged, not the raw request-target)")
                for name, value in outcome.rewrite.headers:
                    shown = "<removed: clients cannot spoof it>" if value is None else value[:60]
                    print(f"{'':>4}upstream header {name}: {shown}")
    print(f"\ndecisions counted: {dict(sorted((f'{v}/{r}/{m}', n) for (v, r, m), n in plugin.decisions.items()))}")


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.setFormatter(logging.Formatter("mtls-guard %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def main() -> int:
    print("mtls-guard demo: runner + fake APISIX + generated certificates, one process, no network\n")
    logger = logging.getLogger("mtls_guard")
    collect = _Collect()
    logger.addHandler(collect)
    logger.propagate = False
    workdir = tempfile.mkdtemp(prefix="mtls-guard-demo-")
    try:
        plugin = MtlsGuard()
        settings = Settings(listen=os.path.join(workdir, "runner.sock"))
        server = RunnerServer(settings, PluginRegistry([plugin]))

        async def session() -> None:
            await server.start()
            serving = asyncio.create_task(server.serve())
            try:
                await _play(settings.listen, plugin, _make_certs())
            finally:
                server.stop()
                await serving

        asyncio.run(session())
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        logger.removeHandler(collect)
    print("\nwhat the runner logged at its default level (APISIX copies it into error.log):")
    for line in collect.lines:
        print(f"  {line}")
    return 0
