"""Live reload: read the settings again, validate all of them, then swap them in at once.

A reload (SIGHUP, or a watched file that changed: runner.watch) has two phases, so that a bad file
never leaves anything half-applied:

1. prepare: read the settings the way start-up did (runner.settings.SettingsSource: the file again,
   under the same environment and command-line overrides), keep those a running process cannot
   change (logged in one line as needing a restart), and have every plugin with ``reconfigure`` build
   its new state beside the current one (runner.plugin.Reconfigurable). This runs in a helper thread:
   the event loop keeps answering calls from the current state meanwhile.
2. commit: on the event loop, between two calls: every plugin's commit, the log level and file, the
   live settings, and a new conf generation, so that every conf token is compiled again on its next
   use (runner.confcache). A call already running finishes with the chain it started with.

With workers the supervisor runs both phases across all processes (runner.process.workerreload). A failure
anywhere in the first phase commits nothing anywhere and logs one ``event=reload_failed`` line.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Final, Protocol

from .logs import NOTICE, prepare_logging
from .metrics import CounterSnapshot, GaugeSnapshot
from .plugin import Reconfigurable
from .process.cpus import usable_cpus
from .registry import PluginRegistry
from .settings import Settings, SettingsError, SettingsSource
from .watch import watch_files

__all__ = [
    "RESTART_ONLY",
    "Fanout",
    "Plan",
    "ReloadError",
    "ReloadStats",
    "Reloader",
    "build",
    "catch_early_hangups",
    "plan",
    "reloading",
]

log = logging.getLogger("mtls_guard.runner")

RESTART_ONLY: Final = ("listen", "workers", "metrics_addr", "event_loop", "socket_mode", "max_frame_bytes", "replace")
"""Settings a running runner keeps: the bound socket and port, its processes, its event loop, the mode
the socket was created with, and the frame limit every open connection's decoder already holds."""


class ReloadError(Exception):
    """Why a reload was refused: one line naming the setting, plugin or file."""


@dataclass(frozen=True, slots=True)
class Plan:
    settings: Settings
    """What runs once committed: the new settings, except those kept as they are."""
    restart_needed: tuple[str, ...]
    """Settings (``plugins.<name>`` for a plugin without ``reconfigure``) that changed but are kept."""


def plan(registry: PluginRegistry, current: Settings, new: Settings) -> Plan:
    """Split ``new`` into what applies live and what needs a restart; raises ReloadError."""
    unknown = sorted(set(new.plugins) - set(registry.names))
    if unknown:
        raise ReloadError(f"settings name unknown plugin(s): {', '.join(unknown)}")
    # As at start-up (runner.cli), never more workers than usable CPUs: no restart for a capped count.
    requested = replace(new, workers=min(new.workers, usable_cpus()))
    restart = [name for name in RESTART_ONLY if getattr(requested, name) != getattr(current, name)]
    plugins = dict(new.plugins)
    for plugin in registry:
        if isinstance(plugin, Reconfigurable):
            continue
        old = current.plugins.get(plugin.name)
        if new.plugins.get(plugin.name, {}) != (old or {}):
            restart.append(f"plugins.{plugin.name}")
            if old is None:
                del plugins[plugin.name]
            else:
                plugins[plugin.name] = old
    kept = {name: getattr(current, name) for name in RESTART_ONLY}
    try:
        settings = replace(new, plugins=plugins, **kept)
    except SettingsError as exc:
        raise ReloadError(str(exc)) from exc
    return Plan(settings, tuple(restart))


def build(registry: PluginRegistry, settings: Settings) -> Callable[[], None]:
    """Phase 1 in this process: every plugin's new state and the log handlers, built beside the
    current ones; returns the commit that installs them all. Raises ReloadError."""
    commits: list[tuple[str, Callable[[], None]]] = []
    for plugin in registry:
        if not isinstance(plugin, Reconfigurable):
            continue
        try:
            commit = plugin.reconfigure(settings.plugins.get(plugin.name, {}))
        except Exception as exc:
            raise ReloadError(f"plugin {plugin.name!r}: {exc or type(exc).__name__}") from exc
        if not callable(commit):
            raise ReloadError(f"plugin {plugin.name!r}: reconfigure returned {type(commit).__name__}, not a commit")
        commits.append((plugin.name, commit))
    try:  # last: a failing plugin leaves no log file opened for nothing
        commits.append(("logging", prepare_logging(settings.log_level, settings.log_file)))
    except OSError as exc:
        raise ReloadError(f"log_file {settings.log_file}: {exc.strerror or exc}") from exc

    def commit_all() -> None:
        for name, commit in commits:
            try:
                commit()
            except Exception:  # a broken contract; the other commits must still run to stay consistent
                log.exception("event=reload_commit_error plugin=%s", name)

    return commit_all


class ReloadStats:
    """Reload outcomes for /metrics (a runner.metrics.MetricsSource), kept by the process that
    decides: the single process, or the supervisor (not its workers)."""

    def __init__(self) -> None:
        self.ok = 0
        self.failed = 0
        self.generation = 0
        self.last_success = time.time()  # like Prometheus' own: start-up counts as a successful load

    def metrics(self) -> list[CounterSnapshot | GaugeSnapshot]:
        return [
            CounterSnapshot(
                "mtls_guard_reloads",
                "Live reloads by result",
                ("result",),
                {("ok",): float(self.ok), ("failed",): float(self.failed)},
            ),
            GaugeSnapshot(
                "mtls_guard_config_last_reload_success_timestamp_seconds",
                "Unix time of the last successful reload (or of the start)",
                (),
                {(): self.last_success},
            ),
            GaugeSnapshot(
                "mtls_guard_config_generation", "Successful reloads since start", (), {(): float(self.generation)}
            ),
        ]


class Fanout(Protocol):
    """The other processes a reload must reach (runner.process.workerreload); the same two phases.
    ``attempt`` numbers every reload, failed ones too, so that an answer is never taken for another's."""

    async def prepare(self, attempt: int, settings: Settings) -> None:
        """Have every process build ``settings``; raise ReloadError with the first reason one failed."""

    async def commit(self, attempt: int) -> None: ...

    async def abort(self, attempt: int) -> None: ...


class Reloader:
    """Runs this process's reloads one at a time; requests that arrive during one make one more."""

    def __init__(
        self,
        source: SettingsSource,
        registry: PluginRegistry,
        settings: Settings,
        apply: Callable[[Settings], None],
        *,
        stats: ReloadStats | None = None,
        fanout: Fanout | None = None,
    ) -> None:
        self.source = source
        self.settings = settings
        self.stats = stats or ReloadStats()
        self.busy = False
        self._registry = registry
        self._apply = apply
        self._fanout = fanout
        self._wanted = asyncio.Event()
        self._trigger = ""
        self._attempts = 0

    def request(self, trigger: str) -> None:
        """Ask for a reload (a signal handler, the file watch); cheap and safe at any time."""
        self._trigger = trigger
        self._wanted.set()

    async def run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            await self.reload(self._trigger)

    async def reload(self, trigger: str) -> bool:
        """One reload, start to end; True if it was committed."""
        self.busy = True
        try:
            return await self._reload(trigger)
        finally:
            self.busy = False

    async def _reload(self, trigger: str) -> bool:
        started = time.monotonic()
        self._attempts += 1
        attempt = self._attempts
        try:
            new = await asyncio.to_thread(self.source.load)
            planned = plan(self._registry, self.settings, new)
            commit = await self._prepare_everywhere(attempt, planned.settings)
        except (SettingsError, ReloadError) as exc:
            return self._failed(trigger, str(exc))
        except Exception as exc:  # noqa: BLE001 - a bug must neither end reloading nor change anything
            return self._failed(trigger, f"internal error: {type(exc).__name__}: {exc}")
        commit()
        self._apply(planned.settings)
        self.settings = planned.settings
        if self._fanout is not None:
            await self._fanout.commit(attempt)
        self.stats.ok += 1
        self.stats.generation = generation = self.stats.generation + 1
        self.stats.last_success = time.time()
        if planned.restart_needed:
            log.warning("event=reload_restart_needed settings=%s", ",".join(planned.restart_needed))
        took = time.monotonic() - started
        log.log(NOTICE, "event=reloaded generation=%d trigger=%s took=%.3fs", generation, trigger, took)
        return True

    async def _prepare_everywhere(self, attempt: int, settings: Settings) -> Callable[[], None]:
        local = asyncio.to_thread(build, self._registry, settings)
        if self._fanout is None:
            return await local
        # This process and the others build at the same time; any failure aborts all of them.
        mine, theirs = await asyncio.gather(local, self._fanout.prepare(attempt, settings), return_exceptions=True)
        for outcome in (mine, theirs):
            if isinstance(outcome, BaseException):
                await self._fanout.abort(attempt)
                raise outcome
        assert not isinstance(mine, BaseException)
        return mine

    def _failed(self, trigger: str, reason: str) -> bool:
        self.stats.failed += 1
        log.error("event=reload_failed trigger=%s reason=%r", trigger, reason)
        return False


class _EarlyHangups:
    """SIGHUP's default action ends the process: from the start of ``mtls-guard run`` until the
    event loop takes the signal over, a SIGHUP is only noted, and reloads once serving."""

    seen = False

    def note(self, signum: int, frame: object) -> None:
        self.seen = True

    def take(self) -> bool:
        seen, self.seen = self.seen, False
        return seen


_early = _EarlyHangups()


def catch_early_hangups() -> None:
    signal.signal(signal.SIGHUP, _early.note)


@contextlib.asynccontextmanager
async def reloading(reloader: Reloader | None) -> AsyncIterator[None]:
    """While the body runs, SIGHUP and the file watch (``reload_watch_seconds``) reload."""
    if reloader is None:
        yield
        return
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGHUP, reloader.request, "sighup")
    if _early.take():
        reloader.request("sighup")
    tasks = [
        asyncio.ensure_future(reloader.run()),
        asyncio.ensure_future(watch_files(lambda: reloader.settings, reloader.source.config_file, reloader.request)),
    ]
    try:
        yield
    finally:
        loop.remove_signal_handler(signal.SIGHUP)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # not the default action while shutting down
        for task in tasks:
            task.cancel()
        # Let them end here: a task the loop is closed on would be reported as destroyed while pending.
        await asyncio.gather(*tasks, return_exceptions=True)
