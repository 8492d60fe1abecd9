"""A minimal HTTP endpoint on the runner's own event loop: ``/metrics``, ``/healthz``, ``/readyz``.

It runs in the same loop as the protocol server on purpose: if ``/healthz`` answers, the loop that
serves APISIX is alive. Opt-in (``metrics_addr``), GET only, one request per connection, bounded
request size and time — it is meant for a scraper and a kubelet, not for the internet.

- ``/healthz``: 200 whenever this loop answers (a single process: the loop serving APISIX; with
  workers: the supervisor's loop). Meant for liveness probes.
- ``/readyz``: 200 while ``ready()`` holds, else 503 (runner.server / runner.process.supervisor: listening,
  not stopping, the socket file at the path is still ours, and with workers at least one alive).
  Meant for readiness probes.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
from collections.abc import Awaitable, Callable

__all__ = ["HealthEndpoint", "parse_host_port"]

_MAX_REQUEST = 8192
_READ_TIMEOUT = 5.0


def parse_host_port(value: str, *, allow_ephemeral: bool = False) -> tuple[str, int]:
    """``127.0.0.1:9464`` / ``[::1]:9464`` / ``:9464`` -> (host, port); ValueError if malformed.
    Port 0 (any free port) only with ``allow_ephemeral`` — useless in a config, handy in tests."""
    host, sep, port = value.rpartition(":")
    lowest = 0 if allow_ephemeral else 1
    if not sep or not port.isdigit() or not lowest <= int(port) < 65536:
        raise ValueError(f"{value!r} is not HOST:PORT")
    host = host.strip("[]") or "127.0.0.1"
    return host, int(port)


class HealthEndpoint:
    def __init__(
        self,
        address: str,
        *,
        ready: Callable[[], bool],
        metrics: Callable[[], bytes | Awaitable[bytes]] | None,
        share_port: bool = False,
    ) -> None:
        """``share_port`` (SO_REUSEPORT) lets a runner that takes the socket over from a live one
        bind the same port while its predecessor still holds it (APISIX reload); Linux only allows
        that between processes of the same user, and only if the holder set it too."""
        self._host, self._port = parse_host_port(address, allow_ephemeral=True)
        self._ready = ready
        self._metrics = metrics
        self._share_port = share_port
        self._server: asyncio.Server | None = None

    @property
    def port(self) -> int:
        assert self._server is not None
        sock = self._server.sockets[0]
        return int(sock.getsockname()[1])

    @property
    def address(self) -> str:
        """HOST:PORT actually bound (for the start-up line)."""
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{host}:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self._host, self._port, reuse_port=self._share_port or None
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 0.2)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), _READ_TIMEOUT)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        if len(head) > _MAX_REQUEST:
            status, body, ctype = "431 Request Header Fields Too Large", b"", "text/plain"
        else:
            status, body, ctype = await self._route(head.split(b"\r\n", 1)[0])
        writer.write(
            f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n".encode("ascii")
            + body
        )
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def _route(self, request_line: bytes) -> tuple[str, bytes, str]:
        parts = request_line.split(b" ")
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"GET only\n", "text/plain"
        path = parts[1].split(b"?", 1)[0]
        if path == b"/healthz":
            return "200 OK", b"ok\n", "text/plain"
        if path == b"/readyz":
            if self._ready():
                return "200 OK", b"ready\n", "text/plain"
            return "503 Service Unavailable", b"not ready\n", "text/plain"
        if path == b"/metrics" and self._metrics is not None:
            body = self._metrics()
            if inspect.isawaitable(body):  # the supervisor asks its workers at scrape time
                body = await body
            return "200 OK", body, "text/plain; version=0.0.4; charset=utf-8"
        return "404 Not Found", b"not found\n", "text/plain"
