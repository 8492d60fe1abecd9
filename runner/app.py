"""Process lifecycle: plugin set-up, event loop choice, signals, serve, exit code."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from .registry import PluginRegistry
from .server import RunnerServer, StartupError
from .session import RPCObserver
from .settings import Settings

__all__ = ["EXIT_OK", "EXIT_STARTUP_FAILURE", "run", "setup_plugins"]

log = logging.getLogger("mtls_guard.runner")

EXIT_OK = 0
EXIT_STARTUP_FAILURE = 3


def setup_plugins(registry: PluginRegistry, settings: Settings) -> None:
    """Give each plugin its options; unknown plugin sections are start-up errors (typos)."""
    unknown = sorted(set(settings.plugins) - set(registry.names))
    if unknown:
        raise StartupError(f"settings name unknown plugin(s): {', '.join(unknown)}")
    for plugin in registry:
        try:
            plugin.setup(settings.plugins.get(plugin.name, {}))
        except Exception as exc:
            raise StartupError(f"plugin {plugin.name!r} setup failed: {exc}") from exc


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind in ("uvloop", "auto"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise StartupError("event_loop uvloop requested but uvloop is not installed") from None
        else:
            loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            return loop
    return asyncio.new_event_loop()


def run(
    settings: Settings,
    registry: PluginRegistry,
    *,
    observers: Iterable[RPCObserver] = (),
    extra: Callable[[RunnerServer], Awaitable[Any]] | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code."""
    try:
        setup_plugins(registry, settings)
    except StartupError as exc:
        log.error("event=startup_failed reason=%r", str(exc))
        return EXIT_STARTUP_FAILURE
    server = RunnerServer(settings, registry, observers=observers)

    async def main() -> int:
        try:
            await server.start()
        except StartupError as exc:
            log.error("event=startup_failed reason=%r", str(exc))
            return EXIT_STARTUP_FAILURE
        server.install_signal_handlers()
        side = asyncio.ensure_future(extra(server)) if extra is not None else None
        try:
            await server.serve()
        finally:
            server.remove_signal_handlers()
            if side is not None:
                side.cancel()
        return EXIT_OK

    loop = _new_loop(settings.event_loop)
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()
