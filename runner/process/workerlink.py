"""The supervisor's line to each worker: one socketpair per worker, for scrape-time metrics and
reload requests.

With ``--workers N`` each worker counts in its own memory (nothing shared on the request path).
The supervisor used to add up files the workers rewrote every second, so a scrape could miss up
to ~1.25 s of calls; now it asks every worker at the moment it is scraped and sums the answers.
Cost: one JSON snapshot per worker per scrape, on the worker's loop, between two calls.

Wire format over the socketpair: the supervisor sends a 4-byte sequence number, the worker answers
with that number, a 4-byte length and its ``metrics.to_json`` view. Sequence numbers let a late
answer (after the supervisor stopped waiting) be told apart and dropped. A sequence number with the
top bit set is a control request instead (runner.process.workerreload): a 4-byte length and a JSON object
follow it, and the worker answers with a JSON object in the same framing. Control requests run as
tasks of their own, so a slow one (a reload building its state) does not hold up scrapes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["Control", "WorkerLink", "answer_scrapes", "gather_views"]

_HEAD = struct.Struct(">II")  # sequence number, payload length
_SEQ = struct.Struct(">I")
_CONTROL = 0x80000000
# A worker that does not answer a scrape this fast (its loop busy, e.g. compiling a huge
# PrepareConf) is counted from its fallback file instead, so its counts never drop out of the sum.
SCRAPE_TIMEOUT = 0.5


class WorkerLink:
    """The supervisor's end of one worker's socketpair."""

    def __init__(self, sock: socket.socket) -> None:
        sock.setblocking(False)
        self._sock: socket.socket | None = sock
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: dict[int, asyncio.Future[dict[str, Any] | None]] = {}
        self._seq = 0
        self._opening = asyncio.Lock()

    @property
    def gone(self) -> bool:
        """The worker closed its end (it exited), as opposed to being slow to answer."""
        return self._sock is None or (self._writer is not None and self._writer.is_closing())

    async def fetch(self, timeout: float) -> dict[str, Any] | None:
        """The worker's current view, or None if it is gone or does not answer within ``timeout``."""
        return await self._ask(None, timeout)

    async def request(self, body: dict[str, Any], timeout: float) -> dict[str, Any] | None:
        """A control request's answer, or None if the worker is gone or does not answer within ``timeout``."""
        return await self._ask(json.dumps(body).encode(), timeout)

    async def _ask(self, payload: bytes | None, timeout: float) -> dict[str, Any] | None:
        async with self._opening:  # two scrapes at once must not both wrap the socket
            if self._writer is None:
                if self._sock is None:
                    return None
                reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
                self._reader_task = asyncio.ensure_future(self._read(reader))
        if self._writer.is_closing():
            return None
        self._seq = (self._seq + 1) & (_CONTROL - 1)
        seq = self._seq if payload is None else self._seq | _CONTROL
        answer: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = answer
        self._writer.write(_SEQ.pack(seq) if payload is None else _HEAD.pack(seq, len(payload)) + payload)
        try:
            return await asyncio.wait_for(answer, timeout)
        except TimeoutError:
            return None
        finally:
            self._waiting.pop(seq, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                seq, size = _HEAD.unpack(await reader.readexactly(_HEAD.size))
                body = await reader.readexactly(size)
                answer = self._waiting.get(seq)
                if answer is not None and not answer.done():
                    answer.set_result(json.loads(body))
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass  # the worker exited (or spoke nonsense): callers fall back
        finally:
            for answer in self._waiting.values():
                if not answer.done():
                    answer.set_result(None)
            if self._writer is not None:
                self._writer.close()

    def close(self) -> None:
        if self._reader_task is not None:
            self._reader_task.cancel()
        if self._writer is not None:
            self._writer.close()
        elif self._sock is not None:
            self._sock.close()
        self._sock = None


Control = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


async def answer_scrapes(
    sock: socket.socket, snapshot: Callable[[], dict[str, Any]], control: Control | None = None
) -> None:
    """The worker's end: answer each scrape with ``snapshot()`` and each control request with
    ``control(request)`` until the supervisor goes away."""
    sock.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    running: set[asyncio.Task[None]] = set()

    def answer(seq: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        writer.write(_HEAD.pack(seq, len(data)) + data)

    async def handle(seq: int, request: Any) -> None:
        if control is None or not isinstance(request, dict):
            answer(seq, {"error": "no such request"})
            return
        try:
            result = await control(request)
        except Exception as exc:  # noqa: BLE001 - the supervisor waits for an answer; give it the reason
            result = {"error": f"{type(exc).__name__}: {exc}"}
        answer(seq, result)

    try:
        while True:
            (seq,) = _SEQ.unpack(await reader.readexactly(_SEQ.size))
            if seq & _CONTROL:
                (size,) = _SEQ.unpack(await reader.readexactly(_SEQ.size))
                task = asyncio.ensure_future(handle(seq, json.loads(await reader.readexactly(size))))
                running.add(task)
                task.add_done_callback(running.discard)
            else:
                answer(seq, snapshot())
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError, ValueError):
        pass  # the supervisor exited (or spoke nonsense); the worker's parent check ends the process
    finally:
        for task in running:
            task.cancel()
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def gather_views(
    links: Sequence[WorkerLink | None], fallbacks: Sequence[str], timeout: float = SCRAPE_TIMEOUT
) -> list[dict[str, Any]]:
    """Ask every link at once; ``fallbacks[i]`` (a JSON file, if given) stands in for a silent ``links[i]``."""

    async def ask(link: WorkerLink | None) -> dict[str, Any] | None:
        return await link.fetch(timeout) if link is not None else None

    answers = await asyncio.gather(*(ask(link) for link in links))
    views = []
    for i, answer in enumerate(answers):
        view = answer if answer is not None or i >= len(fallbacks) else _read_view(fallbacks[i])
        if view is not None:
            views.append(view)
    return views


def _read_view(path: str) -> dict[str, Any] | None:
    try:
        view = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None
    return view if isinstance(view, dict) else None
