"""A reload across the supervisor's workers: runner.reload's two phases, over runner.process.workerlink.

The supervisor decides. It reads and checks the settings once (one error line, however many
workers), stages them in the run directory (runner.process.rundir) and asks every worker to build them: each
worker's plugins read their files themselves, since built state cannot cross processes. Only when
every worker, and the supervisor's own plugins, built without error does it publish the staged file
and ask each worker to commit; otherwise every process drops what it built and keeps running as
before. The supervisor starts no worker while a reload is under way (runner.process.supervisor), so no
worker starts from a file about to be replaced.

A worker reads its requests in order, so a commit the supervisor stopped waiting for still arrives
before the next reload's request, and applies once the worker's loop gets to it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence
from typing import Any

from ..registry import PluginRegistry
from ..reload import ReloadError, build
from ..server import RunnerServer
from ..settings import Settings, SettingsError
from .rundir import discard_staged_settings, publish_staged_settings, read_settings, stage_settings
from .workerlink import WorkerLink

__all__ = ["WorkerFanout", "WorkerReloads"]

log = logging.getLogger("mtls_guard.runner")

# Seconds a worker may take to build the new state (plugins read policy files, CRLs, CA bundles).
PREPARE_TIMEOUT = 30.0
# Seconds the supervisor waits for a commit to be confirmed (see the module docstring).
CONFIRM_TIMEOUT = 5.0


class WorkerFanout:
    """The supervisor's side: a runner.reload.Fanout over every worker that has a link."""

    def __init__(
        self,
        rundir: str,
        links: Callable[[], Sequence[tuple[str, WorkerLink]]],
        prepare_timeout: float = PREPARE_TIMEOUT,
    ) -> None:
        self._rundir = rundir
        self._links = links
        self._timeout = prepare_timeout
        self._asked: list[tuple[str, WorkerLink]] = []

    async def prepare(self, attempt: int, settings: Settings) -> None:
        try:
            stage_settings(self._rundir, settings)
        except (OSError, TypeError, ValueError) as exc:
            raise ReloadError(f"cannot hand the settings to the workers: {exc}") from exc
        self._asked = list(self._links())
        answers = await self._ask("prepare", attempt, self._timeout)
        for (name, link), answer in zip(self._asked, answers, strict=True):
            # A worker that exited is started again after the reload, from the file published by then.
            if answer is None and not link.gone:
                raise ReloadError(f"{name} did not answer within {self._timeout:g}s")
            if answer is not None and "error" in answer:
                raise ReloadError(f"{name}: {answer['error']}")

    async def commit(self, attempt: int) -> None:
        publish_staged_settings(self._rundir)
        for (name, link), answer in zip(self._asked, await self._ask("commit", attempt), strict=True):
            if answer is not None and "error" in answer:  # cannot happen unless the protocol is broken
                log.error("event=reload_commit_failed %s attempt=%d reason=%r", name, attempt, answer["error"])
            elif answer is None and not link.gone:  # it commits when its loop reads the request
                log.warning("event=reload_commit_unconfirmed %s attempt=%d", name, attempt)

    async def abort(self, attempt: int) -> None:
        discard_staged_settings(self._rundir)
        # Sent, not waited for: a worker reads its requests in order, so it drops what it built
        # before it sees any later request, and a silent worker must not delay the failure further.
        await self._ask("abort", attempt, timeout=0.0)

    async def _ask(self, op: str, attempt: int, timeout: float = CONFIRM_TIMEOUT) -> list[dict[str, Any] | None]:
        request = {"op": op, "attempt": attempt}
        return list(await asyncio.gather(*(link.request(request, timeout) for _, link in self._asked)))


class WorkerReloads:
    """A worker's side: builds what the supervisor staged, then commits or drops it when told."""

    def __init__(self, rundir: str, registry: PluginRegistry, server: RunnerServer) -> None:
        self._rundir = rundir
        self._registry = registry
        self._server = server
        self._pending: tuple[int, Settings, Callable[[], None]] | None = None
        self._aborted = 0

    async def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """runner.process.workerlink's control callback."""
        op, attempt = request.get("op"), request.get("attempt")
        if not isinstance(attempt, int):
            return {"error": "request without an attempt number"}
        if op == "prepare":
            try:
                settings = read_settings(self._rundir, staged=True)
                commit = await asyncio.to_thread(build, self._registry, settings)
            except (ReloadError, SettingsError, OSError, TypeError, ValueError) as exc:
                return {"error": str(exc)}
            if attempt > self._aborted:  # an abort can overtake a slow build
                self._pending = (attempt, settings, commit)
            return {"ok": True}
        if op == "commit":
            pending = self._pending
            if pending is None or pending[0] != attempt:
                return {"error": f"nothing built for attempt {attempt}"}
            self._pending = None
            pending[2]()
            self._server.apply_settings(pending[1])
            log.info("event=reload_committed attempt=%d", attempt)
            return {"ok": True}
        if op == "abort":
            self._aborted = max(self._aborted, attempt)
            if self._pending is not None and self._pending[0] <= attempt:
                self._pending = None
            return {"ok": True}
        return {"error": f"unknown request {op!r}"}
