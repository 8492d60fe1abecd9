"""Run one request through the real plugin code path without a socket: `mtls-guard explain`.

The request is encoded as the HTTPReqCall frame APISIX would send, decoded by the runner's codec,
and handed to the same ``MtlsGuard.on_request`` the runner calls; ExtraInfo queries are answered
from a variable table. So the verdict printed is the one the runner would reach.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from runner.driver import Pending
from runner.plugin import HTTPRequest
from runner.protocol import codec
from runner.protocol.messages import ExtraInfoQuery, Method, Pairs, Stop, VarQuery

from .decision import Decision
from .plugin import MtlsGuard
from .policy import CompiledPolicy

__all__ = ["Explanation", "TableChannel", "explain"]


class TableChannel:
    """ExtraInfo answered from a table, recording what was asked (and how many round trips)."""

    def __init__(self, table: Mapping[str, str | None]) -> None:
        self.table = dict(table)
        self.asked: list[str] = []
        self.round_trips = 0

    def query(self, queries: Sequence[ExtraInfoQuery]) -> Pending[list[bytes | None]]:
        self.round_trips += 1
        answers: list[bytes | None] = []
        for q in queries:
            if not isinstance(q, VarQuery):
                raise ValueError("explain answers variables only")
            self.asked.append(q.name)
            value = self.table.get(q.name)
            answers.append(None if value is None else value.encode("utf-8", "surrogateescape"))
        pending: Pending[list[bytes | None]] = Pending()
        pending.set_result(answers)
        return pending


@dataclass(frozen=True, slots=True)
class Explanation:
    decision: Decision
    stop: Stop | None
    upstream_headers: Pairs
    variables_asked: tuple[str, ...]
    round_trips: int


def explain(
    plugin: MtlsGuard,
    policy: CompiledPolicy,
    *,
    method: str,
    path: str,
    headers: Pairs,
    variables: Mapping[str, str | None],
    src_ip: str = "127.0.0.1",
) -> Explanation:
    frame = codec.http_req_call_frame(
        id=0,
        conf_token=1,
        method=Method[method.upper()].value,
        path=path,
        src_ip=ipaddress.ip_address(src_ip).packed,
        headers=headers,
    )
    call = codec.decode_http_req_call(frame[4:])
    channel = TableChannel(variables)
    request = HTTPRequest(call, channel)
    stop = asyncio.run(plugin.on_request(policy, request))
    decision: Decision = request.state["mtls_guard.decision"]
    rewrite = request.rewrite()
    return Explanation(
        decision=decision,
        stop=stop,
        upstream_headers=() if rewrite is None else rewrite.headers,
        variables_asked=tuple(channel.asked),
        round_trips=channel.round_trips,
    )
