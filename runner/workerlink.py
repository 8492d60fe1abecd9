"""Scrape-time metrics from worker processes: one socketpair per worker, asked when /metrics is read.

With ``--workers N`` each worker counts in its own memory (nothing shared on the request path).
The supervisor used to add up files the workers rewrote every second, so a scrape could miss up
to ~1.25 s of calls; now it asks every worker at the moment it is scraped and sums the answers.
Cost: one JSON snapshot per worker per scrape, on the worker's loop, between two calls.

Wire format, both directions over the socketpair: the supervisor sends a 4-byte sequence number,
the worker answers with that number, a 4-byte length and its ``metrics.to_json`` view. Sequence
numbers let a late answer (after the supervisor stopped waiting) be told apart and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["WorkerLink", "answer_scrapes", "gather_views"]

_HEAD = struct.Struct(">II")  # sequence number, payload length
_SEQ = struct.Struct(">I")
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

    async def fetch(self, timeout: float) -> dict[str, Any] | None:
        """The worker's current view, or None if it is gone or does not answer within ``timeout``."""
        async with self._opening:  # two scrapes at once must not both wrap the socket
            if self._writer is None:
                if self._sock is None:
                    return None
                reader, self._writer = await asyncio.open_unix_connection(sock=self._sock)
                self._reader_task = asyncio.ensure_future(self._read(reader))
        if self._writer.is_closing():
            return None
        self._seq = (self._seq + 1) & 0xFFFFFFFF
        seq = self._seq
        answer: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = answer
        self._writer.write(_SEQ.pack(seq))
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


async def answer_scrapes(sock: socket.socket, snapshot: Callable[[], dict[str, Any]]) -> None:
    """The worker's end: answer each request with ``snapshot()`` until the supervisor goes away."""
    sock.setblocking(False)
    reader, writer = await asyncio.open_unix_connection(sock=sock)
    try:
        while True:
            seq = await reader.readexactly(_SEQ.size)
            body = json.dumps(snapshot()).encode()
            writer.write(seq + _SEQ.pack(len(body)) + body)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass  # the supervisor exited; the worker's parent check ends the process
    finally:
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
