"""Bounded background traffic through nginx for the runner lifecycle tests (loopback only, stops by itself)."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from tests.e2e.clients import Clients

__all__ = ["Hit", "Load"]


@dataclass(frozen=True)
class Hit:
    """One request of the load: what was asked, when, and what came back (status None = client error)."""

    cert: str | None
    path: str
    started: float
    finished: float
    status: int | None
    outcome: str | None = None
    error: str = ""


class Load:
    """One thread per (cert, path) of ``mix``, each with a keep-alive client, until ``stop()`` or the limits."""

    def __init__(
        self,
        clients: Clients,
        mix: Sequence[tuple[str | None, str]],
        *,
        max_seconds: float = 20.0,
        max_requests_per_thread: int = 3000,
    ) -> None:
        self.clients = clients
        self.mix = mix
        self.max_seconds = max_seconds
        self.max_requests = max_requests_per_thread
        self.hits: list[Hit] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def __enter__(self) -> Load:
        for index, (cert, path) in enumerate(self.mix):
            thread = threading.Thread(target=self._worker, args=(cert, path), name=f"e2e-load-{index}", daemon=True)
            self._threads.append(thread)
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> list[Hit]:
        self._stop.set()
        for thread in self._threads:
            thread.join(30)
        return self.snapshot()

    def snapshot(self) -> list[Hit]:
        with self._lock:
            return list(self.hits)

    def _worker(self, cert: str | None, path: str) -> None:
        deadline = time.monotonic() + self.max_seconds
        client = self.clients.client(cert)
        try:
            for _ in range(self.max_requests):
                if self._stop.is_set() or time.monotonic() > deadline:
                    return
                started = time.monotonic()
                try:
                    reply = self.clients.request(path, cert=cert, client=client)
                except httpx.HTTPError as exc:
                    hit = Hit(cert, path, started, time.monotonic(), None, None, f"{type(exc).__name__}: {exc}")
                    client.close()
                    client = self.clients.client(cert)
                else:
                    hit = Hit(cert, path, started, time.monotonic(), reply.status, reply.outcome)
                with self._lock:
                    self.hits.append(hit)
        finally:
            client.close()
