"""The floor: the least work any Python runner on asyncio can do for the same conversation.

A bare ``asyncio.Protocol`` that looks only at frame headers and answers with pre-built bytes:

* PrepareConf -> a fixed token reply;
* HTTPReqCall -> the pre-built ExtraInfo Var queries of the first round trip (one write per trip,
  the queries of a trip pipelined), and after the last answer of the last trip a pre-built
  action-less HTTPReqCall reply. With no round trips the reply goes out at once.

Nothing is decoded or validated (a real runner must do both); the round trips match the runner
scenario it is compared with, so the ratio runner/floor is the cost of the runner's own work.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable
from typing import cast

from runner.protocol import codec
from runner.protocol.messages import ErrCode, HTTPReqCallReply, VarQuery

from .scenarios import Scenario

__all__ = ["FloorReplies", "serve_floor"]

_HEAD = struct.Struct(">I").unpack_from
_PREPARE, _REQ_CALL, _EXTRA_INFO = 1, 2, 3
# The id the load generator uses for every HTTPReqCall (see bench/loadgen.py).
REQUEST_ID = 4194311
TOKEN = 1


class FloorReplies:
    """Every byte the floor will ever send, built once."""

    def __init__(self, ei_trips: tuple[tuple[str, ...], ...], request_id: int = REQUEST_ID) -> None:
        self.token = codec.prepare_conf_reply_frame(TOKEN)
        self.trips = tuple(b"".join(codec.extra_info_query_frame(VarQuery(n)) for n in trip) for trip in ei_trips)
        self.trip_sizes = tuple(len(trip) for trip in ei_trips)
        self.reply = codec.http_req_call_reply_frame(HTTPReqCallReply(request_id))
        self.error = codec.error_frame(ErrCode.BAD_REQUEST)


class _FloorConnection(asyncio.Protocol):
    __slots__ = ("_buf", "_left", "_r", "_trip", "_write")

    def __init__(self, replies: FloorReplies) -> None:
        self._r = replies
        self._buf = b""
        self._trip = 0  # index of the next round trip to start
        self._left = 0  # answers still expected for the current round trip
        self._write: Callable[[bytes], object] = lambda _data: None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        self._write = cast("asyncio.Transport", transport).write

    def data_received(self, data: bytes) -> None:
        if self._buf:
            data = self._buf + data
        pos, n = 0, len(data)
        while n - pos >= 4:
            head = _HEAD(data, pos)[0]
            end = pos + 4 + (head & 0xFFFFFF)
            if end > n:
                break
            kind = head >> 24
            if kind == _EXTRA_INFO:
                self._left -= 1
                if not self._left:
                    self._next()
            elif kind == _REQ_CALL:
                self._trip = 0
                self._next()
            elif kind == _PREPARE:
                self._write(self._r.token)
            else:
                self._write(self._r.error)
            pos = end
        self._buf = data[pos:] if pos < n else b""

    def _next(self) -> None:
        r = self._r
        trip = self._trip
        if trip < len(r.trips):
            self._trip = trip + 1
            self._left = r.trip_sizes[trip]
            self._write(r.trips[trip])
        else:
            self._write(r.reply)


async def serve_floor(scenario: Scenario, path: str, on_ready: Callable[[], None], stop: asyncio.Event) -> None:
    """Serve the floor on ``path`` until ``stop`` is set."""
    replies = FloorReplies(scenario.ei_trips)
    loop = asyncio.get_running_loop()
    server = await loop.create_unix_server(lambda: _FloorConnection(replies), path, backlog=1024)
    on_ready()
    try:
        await stop.wait()
    finally:
        server.close()
