"""Spread APISIX's connections evenly over the worker processes sharing one listening socket.

All workers wait on the same socket and the kernel wakes every one of them for each new connection;
left alone, the first to run accepts everything queued (a burst of APISIX connections can land on
one worker and leave the others idle — AF_UNIX has no SO_REUSEPORT to spread them). So each worker
accepts one connection per wake-up, and a worker that already holds more connections than the
least-loaded one waits a moment before accepting, leaving the connection to that worker. Counts
live in a small shared memory map in the run directory, one 4-byte slot per worker.

Deferral is bounded (``_DEFER``): if the least-loaded worker is stuck or dead, the connection is
still accepted, a little later — balance is a preference, never a reason to refuse work.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import mmap
import os
import socket
import struct
from collections.abc import Callable

__all__ = ["Acceptor", "ConnectionBalance"]

log = logging.getLogger("mtls_guard.runner")

_SLOT = struct.Struct("=I")
_ABSENT = 0xFFFFFFFF  # a worker that is not running never looks least-loaded
_DEFER = 0.002


class ConnectionBalance:
    """Per-worker open-connection counts, shared by all workers of one supervisor."""

    def __init__(self, path: str, index: int, workers: int) -> None:
        self._index = index
        self._workers = workers
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, _SLOT.size * workers)
        finally:
            os.close(fd)

    @staticmethod
    def create(path: str, workers: int) -> None:
        """The supervisor creates the map once, every slot absent."""
        with open(path, "wb") as f:
            f.write(_SLOT.pack(_ABSENT) * workers)

    @staticmethod
    def mark_absent(path: str, index: int) -> None:
        """The supervisor clears the slot of a worker that died without doing it itself."""
        with contextlib.suppress(OSError), open(path, "r+b") as f:
            f.seek(_SLOT.size * index)
            f.write(_SLOT.pack(_ABSENT))

    def publish(self, connections: int) -> None:
        _SLOT.pack_into(self._map, _SLOT.size * self._index, connections)

    def leave(self) -> None:
        self.publish(_ABSENT)
        self._map.close()

    def should_defer(self, connections: int) -> bool:
        """True when another running worker holds fewer connections than we would after accepting."""
        for i in range(self._workers):
            if i != self._index and _SLOT.unpack_from(self._map, _SLOT.size * i)[0] < connections:
                return True
        return False


class Acceptor:
    """Accepts from a shared listening socket one connection per wake-up, deferring to a less
    loaded worker when asked to by ``ConnectionBalance``."""

    def __init__(
        self,
        sock: socket.socket,
        protocol_factory: Callable[[], asyncio.Protocol],
        connections: Callable[[], int],
        balance: ConnectionBalance | None,
    ) -> None:
        self._sock = sock
        self._factory = protocol_factory
        self._connections = connections
        self._balance = balance
        self._loop = asyncio.get_running_loop()
        self._pending: set[asyncio.Task[object]] = set()
        self._closed = False
        sock.setblocking(False)
        self._loop.add_reader(sock.fileno(), self._readable)

    def _readable(self) -> None:
        if self._balance is not None and self._balance.should_defer(self._connections()):
            # Stop watching for a moment so a less loaded worker can take this connection.
            self._loop.remove_reader(self._sock.fileno())
            self._loop.call_later(_DEFER, self._accept_one)
            return
        self._accept_one()

    def _accept_one(self) -> None:
        if self._closed:
            return
        try:
            conn, _ = self._sock.accept()
        except (BlockingIOError, InterruptedError):
            conn = None  # another worker took it
        except OSError as exc:  # EMFILE and friends: keep serving existing connections, retry later
            log.error("event=accept_failed reason=%r", str(exc))
            self._loop.call_later(0.1, self._resume)
            return
        if conn is not None:
            conn.setblocking(False)
            task: asyncio.Task[object] = asyncio.ensure_future(self._loop.connect_accepted_socket(self._factory, conn))
            self._pending.add(task)
            task.add_done_callback(self._pending.discard)
        self._resume()

    def _resume(self) -> None:
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._readable)

    def publish(self) -> None:
        if self._balance is not None and not self._closed:
            self._balance.publish(self._connections())

    def close(self, *, leave_balance: bool = True) -> None:
        """Stop accepting. A retiring worker keeps its slot as is: its successor already uses it."""
        if self._closed:
            return
        self._closed = True
        self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        if self._balance is not None and leave_balance:
            self._balance.leave()
