"""What is measured: scenarios (server side + workload), and the request every scenario sends.

A :class:`Scenario` names the server under test (``floor`` or ``runner``), the PrepareConf entries
the load generator sends, the request path and headers, and the ExtraInfo conversation expected per
request (``ei_trips``: one tuple of variable names per round trip; the names of one trip are sent
pipelined). The same object, serialised as JSON, configures the server process and the load
generator, so both sides always agree.

Every runner scenario is compared with its *floor twin* (:meth:`Scenario.floor_twin`): the same
workload answered by ``bench/floor.py`` with pre-built bytes and the same ExtraInfo round trips.

To add a scenario, append to :data:`SCENARIOS` (see the mtls-guard ones below). Plugins named in
``conf`` are taken from ``bench.plugins.PLUGINS`` first, then from the installed
``apisix_mtls_guard.plugins`` entry points (so ``mtls-guard`` needs no extra code);
``plugin_options`` become the runner settings' ``plugins`` section. The pre-flight exchange of the
load generator checks the declared ``ei_trips`` against what the server really asks, so a wrong
declaration fails loudly instead of skewing the floor comparison.

``workers`` chooses how the runner is started: ``()`` runs ``runner.app.run`` in a bench process
(the plugins registered in-process); each number N in it starts the production command,
``mtls-guard run --workers N`` (N = 1: one process; N > 1: supervisor + N worker processes), and is
measured as a separate runner against the same floor twin.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "ARGS",
    "HEADERS",
    "MTLS_GUARD_POLICY",
    "SCENARIOS",
    "SRC_IP",
    "VARS",
    "Scenario",
    "select",
]

Pairs = tuple[tuple[str, str | None], ...]

# A browser-like request as APISIX forwards it: lower-cased names, 20 headers, ~1.6 KB frame.
HEADERS: Pairs = (
    ("host", "api.example.com"),
    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    ("accept", "application/json, text/plain, */*"),
    ("accept-language", "en-GB,en;q=0.7,de;q=0.3"),
    ("accept-encoding", "gzip, deflate, br, zstd"),
    ("referer", "https://portal.example.com/orders?page=3&sort=date"),
    ("cookie", "session=3f9a1c2e7b5d4f60a8e9c1b2d3f4a5b6; theme=dark; consent=analytics%3Dno"),
    ("authorization", "Bearer eyJhbGciOiJFUzI1NiJ9.eyJzdWIiOiJjbGllbnQtNDIifQ.c2lnbmF0dXJl"),
    ("content-type", "application/json"),
    ("connection", "keep-alive"),
    ("sec-fetch-dest", "empty"),
    ("sec-fetch-mode", "cors"),
    ("sec-fetch-site", "same-site"),
    ("x-request-id", "0b6c2a9e-5f8d-4e31-9a7c-2d4e6f8a0b1c"),
    ("x-forwarded-for", "203.0.113.7, 198.51.100.23"),
    ("x-forwarded-proto", "https"),
    ("x-forwarded-port", "443"),
    ("x-real-ip", "203.0.113.7"),
    ("traceparent", "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"),
    ("cache-control", "no-cache"),
)
ARGS: Pairs = (("page", "3"), ("sort", "date"), ("debug", None))
SRC_IP = "203.0.113.7"
# What "APISIX" answers to ExtraInfo Var queries (ctx.var); names not listed get no result.
VARS: dict[str, str] = {
    "host": "api.example.com",
    "remote_addr": SRC_IP,
    "scheme": "https",
    "server_port": "443",
    "route_id": "1",
    "ssl_client_verify": "SUCCESS",
    "ssl_client_s_dn": "CN=client-42,O=Example",
    "ssl_client_fingerprint": "4f0c1b2a9e8d7c6b5a49382716051f2e3d4c5b6a",
}

ServerKind = Literal["floor", "runner"]
Action = Literal["none", "stop", "rewrite"]


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    server: ServerKind = "runner"
    conf: tuple[tuple[str, str], ...] = (("bench-vars", "host"),)
    """PrepareConf entries (plugin name, conf string), in execution order."""
    plugin_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Runner settings ``plugins`` section (plugin name -> options for ``setup``)."""
    method: int = 0  # A6 Method enum: GET
    path: str = "/api/v1/orders/1234"
    headers: Pairs = HEADERS
    args: Pairs = ARGS
    vars: dict[str, str] = field(default_factory=lambda: dict(VARS))
    ei_trips: tuple[tuple[str, ...], ...] = (("host",),)
    """ExtraInfo Var queries per request: one tuple of names per round trip (pipelined within)."""
    expect_action: Action = "none"
    exact_reply: bool = True
    """Every reply must equal the pre-flight reply byte for byte (false if replies vary)."""
    connections: tuple[int, ...] = (1, 8, 32)
    workers: tuple[int, ...] = ()
    """() = the runner in a bench process; N = ``mtls-guard run --workers N`` (one runner per N)."""

    @property
    def round_trips(self) -> int:
        return len(self.ei_trips)

    @property
    def queries_per_request(self) -> int:
        return sum(len(trip) for trip in self.ei_trips)

    @property
    def shape(self) -> str:
        """ExtraInfo shape, e.g. ``1x1`` (one round trip of one var) or ``1x5`` or ``0``."""
        if not self.ei_trips:
            return "0"
        sizes = {len(t) for t in self.ei_trips}
        if len(sizes) == 1:
            return f"{len(self.ei_trips)}x{sizes.pop()}"
        return "+".join(str(len(t)) for t in self.ei_trips)

    def floor_twin(self) -> Scenario:
        """The floor server answering the same workload with the same ExtraInfo round trips."""
        return dataclasses.replace(
            self,
            name=f"floor/ei-{self.shape}",
            description=f"floor: pre-built replies, ExtraInfo {self.shape}",
            server="floor",
            plugin_options={},
            expect_action="none",
            exact_reply=True,
            workers=(),
        )

    # -- transport between processes ---------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Scenario:
        data = json.loads(text)
        data["conf"] = tuple((n, v) for n, v in data["conf"])
        data["headers"] = tuple((n, v) for n, v in data["headers"])
        data["args"] = tuple((n, v) for n, v in data["args"])
        data["ei_trips"] = tuple(tuple(trip) for trip in data["ei_trips"])
        data["connections"] = tuple(data["connections"])
        data["workers"] = tuple(data.get("workers", ()))
        return cls(**data)


# mtls-guard as a route would use it: health checks exempt, everything else needs a client
# certificate whose SAN URI is a SPIFFE ID of the prod namespace; the upstream gets the identity.
MTLS_GUARD_POLICY = json.dumps(
    {
        "exempt": [{"id": "health", "path": "/healthz", "methods": ["GET", "HEAD"]}],
        "require": {"san": {"uri": ["spiffe://example.test/ns/prod/sa/*"]}},
        "forward": {"subject": "x-client-subject", "san": "x-client-san"},
    },
    separators=(",", ":"),
)
_MTLS_GUARD_CONNECTIONS = (1, 8, 32, 128)
# What a protected request asks (plugins/mtls_guard/policy.py): TLS-ness and Host need no variable.
PROTECTED_VARS = ("ssl_client_verify", "ssl_client_escaped_cert", "ssl_server_name")
_MTLS_GUARD_WORKERS = (1, 2)


@functools.cache
def client_certificate() -> str:
    """A real client certificate as nginx's ``$ssl_client_escaped_cert`` renders it, made once per
    process (the parent's copy travels to the server and the load generator inside the scenario)."""
    from plugins.mtls_guard.tools.devcerts import CertFactory, escaped

    factory = CertFactory()
    ca = factory.ca("Bench Client CA")
    leaf = factory.leaf(
        ca,
        cn="billing-7f9c",
        subject_extra={"O": "Example", "OU": "prod"},
        uris=["spiffe://example.test/ns/prod/sa/billing"],
    )
    return escaped(leaf.pem)


def _mtls_guard_vars() -> dict[str, str]:
    """ctx.var as nginx fills it for a verified client certificate over TLS (SNI = Host)."""
    return {
        **VARS,
        "ssl_client_verify": "SUCCESS",
        "ssl_client_escaped_cert": client_certificate(),
        "ssl_server_name": "api.example.com",
    }


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="runner/host-var",
        description="runner, trivial plugin: await request.var('host'), return None",
    ),
    Scenario(
        name="mtls-guard/exempt",
        description="mtls-guard, exempt path (GET /healthz): decided from the request alone, no ExtraInfo",
        conf=(("mtls-guard", MTLS_GUARD_POLICY),),
        path="/healthz",
        args=(),
        vars=_mtls_guard_vars(),
        ei_trips=(),
        # The judged path goes upstream with every request let through (SECURITY.md).
        expect_action="rewrite",
        connections=_MTLS_GUARD_CONNECTIONS,
        workers=_MTLS_GUARD_WORKERS,
    ),
    Scenario(
        name="mtls-guard/protected",
        description=(
            "mtls-guard, protected path: 3 variables in one pipelined ExtraInfo round trip, a verified "
            "client certificate (parsed once, then cached), SAN checked, identity forwarded (Rewrite)"
        ),
        conf=(("mtls-guard", MTLS_GUARD_POLICY),),
        vars=_mtls_guard_vars(),
        ei_trips=(PROTECTED_VARS,),
        expect_action="rewrite",
        connections=_MTLS_GUARD_CONNECTIONS,
        workers=_MTLS_GUARD_WORKERS,
    ),
    Scenario(
        name="mtls-guard/percent-path",
        description=(
            "mtls-guard, protected path holding a '%' ($uri or an encoded $upstream_uri?): the protected "
            "variables plus upstream_uri in one round trip"
        ),
        conf=(("mtls-guard", MTLS_GUARD_POLICY),),
        path="/api/v1/orders/50%",
        vars={**_mtls_guard_vars(), "upstream_uri": ""},
        ei_trips=((*PROTECTED_VARS, "upstream_uri"),),
        expect_action="rewrite",
        connections=(8,),
        workers=(1,),
    ),
)


def select(names: list[str] | None) -> list[Scenario]:
    """Scenarios by name (all of them when ``names`` is empty); unknown names are an error."""
    if not names:
        return list(SCENARIOS)
    known = {s.name: s for s in SCENARIOS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {', '.join(unknown)}; known: {', '.join(known)}")
    return [known[n] for n in names]
