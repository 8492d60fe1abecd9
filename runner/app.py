"""Process lifecycle: plugin set-up, event loop choice, signals (SIGHUP reloads), serve, exit code."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, NoReturn

from .balance import ConnectionBalance
from .httpd import HealthEndpoint
from .logs import NOTICE
from .metrics import MetricsSource, RPCStats, build_registry, live_view
from .preflight import missing_extra
from .registry import PluginRegistry
from .reload import Reloader, ReloadStats, reloading
from .server import RunnerServer, StartupError
from .session import RPCObserver
from .settings import Settings, SettingsSource
from .sharedconf import SharedConfs

__all__ = ["EXIT_OK", "EXIT_STARTUP_FAILURE", "exit_now", "run", "setup_plugins"]

log = logging.getLogger("mtls_guard.runner")

EXIT_OK = 0
EXIT_STARTUP_FAILURE = 3


def exit_now(code: int) -> NoReturn:
    """Leave without the interpreter's teardown once everything is closed and flushed.

    Freeing tens of thousands of compiled policies and cached certificates object by object can
    take longer than the 1 s APISIX allows between SIGTERM and SIGKILL; nothing is left to release
    that the kernel does not release anyway."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


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


def server_gauges(server: RunnerServer) -> dict[str, tuple[str, Callable[[], float]]]:
    """The gauges one serving process exposes (with workers, the supervisor adds them up)."""
    return {
        "mtls_guard_conf_tokens": ("Conf tokens cached", lambda: float(len(server.store))),
        "mtls_guard_compiled_confs": ("Distinct compiled plugin configs", lambda: float(server.store.compiled_count)),
        "mtls_guard_connections": ("Open APISIX connections", lambda: float(len(server.connections))),
    }


def serving_line(socket_path: str, workers: int, endpoint: HealthEndpoint | None) -> None:
    """The one line per start that shows at the default log level (see runner.logs.NOTICE)."""
    metrics = endpoint.address if endpoint is not None else "off"
    log.log(NOTICE, "event=serving socket=%s workers=%d metrics=%s pid=%d", socket_path, workers, metrics, os.getpid())


def _metrics_endpoint(
    settings: Settings, registry: PluginRegistry, observers: list[RPCObserver], reload_stats: ReloadStats | None
) -> Callable[[RunnerServer], HealthEndpoint]:
    """Prepare /metrics + health; raises ImportError without prometheus-client."""
    from prometheus_client import generate_latest

    assert settings.metrics_addr is not None
    address = settings.metrics_addr
    stats = RPCStats()
    observers.append(stats)
    sources: list[MetricsSource] = [p for p in registry if isinstance(p, MetricsSource)]
    if reload_stats is not None:
        sources.append(reload_stats)

    def build(server: RunnerServer) -> HealthEndpoint:
        prom = build_registry(live_view(stats, server_gauges(server), sources))
        return HealthEndpoint(
            address,
            ready=server.ready,
            metrics=lambda: bytes(generate_latest(prom)),
            share_port=settings.replace,
        )

    return build


async def close_when_superseded(superseded: asyncio.Event, endpoint: HealthEndpoint) -> None:
    """Hand the metrics port to the runner that took the socket over: while both listen on it
    (SO_REUSEPORT), scrapes and probes would land on either one at random."""
    await superseded.wait()
    await endpoint.close()


def _new_loop(kind: str) -> asyncio.AbstractEventLoop:
    if kind in ("uvloop", "auto"):
        try:
            import uvloop
        except ImportError:
            if kind == "uvloop":
                raise StartupError(missing_extra("uvloop")) from None
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
    listen_socket: socket.socket | None = None,
    shared: SharedConfs | None = None,
    balance: ConnectionBalance | None = None,
    source: SettingsSource | None = None,
) -> int:
    """Serve until SIGTERM/SIGINT; returns the process exit code.

    ``listen_socket``/``shared`` run this process as one worker of runner.process.supervisor; ``extra`` is a
    coroutine run beside the server (cancelled at shutdown); ``source`` (how ``settings`` were read)
    enables reloads on SIGHUP and ``reload_watch_seconds`` (runner.reload)."""
    try:
        setup_plugins(registry, settings)
    except StartupError as exc:
        log.error("event=startup_failed reason=%r", str(exc))
        return EXIT_STARTUP_FAILURE
    observers = list(observers)
    reload_stats = ReloadStats() if source is not None else None
    endpoint_factory = None
    if settings.metrics_addr is not None:
        try:
            endpoint_factory = _metrics_endpoint(settings, registry, observers, reload_stats)
        except ImportError:  # runner.preflight catches this first; this is for in-process callers
            log.error("event=startup_failed reason=%r", missing_extra("metrics"))
            return EXIT_STARTUP_FAILURE
    server = RunnerServer(
        settings, registry, observers=observers, listen_socket=listen_socket, shared=shared, balance=balance
    )
    reloader = None
    if source is not None:
        reloader = Reloader(source, registry, settings, server.apply_settings, stats=reload_stats)

    async def main() -> int:
        endpoint = None
        # Before binding: once the socket exists, SIGTERM must always end in a clean exit that removes it.
        server.install_signal_handlers()
        try:
            # The metrics port first: if it is taken, no APISIX socket is left behind.
            if endpoint_factory is not None:
                endpoint = endpoint_factory(server)
                await endpoint.start()
            await server.start()
        except (StartupError, OSError) as exc:
            log.error("event=startup_failed reason=%r", str(exc))
            server.remove_signal_handlers()
            if endpoint is not None:
                await endpoint.close()
            return EXIT_STARTUP_FAILURE
        if listen_socket is None:  # a worker's supervisor says it once for all of them
            serving_line(settings.listen, 1, endpoint)
        side = asyncio.ensure_future(extra(server)) if extra is not None else None
        handover = None
        if endpoint is not None:
            handover = asyncio.ensure_future(close_when_superseded(server.superseded, endpoint))
        try:
            async with reloading(reloader):
                await server.serve()
        finally:
            server.remove_signal_handlers()
            tasks = [task for task in (side, handover) if task is not None]
            for task in tasks:
                task.cancel()
            # Awaited, not only cancelled: the loop closes right after, and a task still pending then is
            # destroyed mid-cleanup (a worker's scrape link closed its transport on a closed loop: tracebacks).
            await asyncio.gather(*tasks, return_exceptions=True)
            if endpoint is not None:
                await endpoint.close()
        return EXIT_OK

    try:
        loop = _new_loop(settings.event_loop)
    except StartupError as exc:  # runner.preflight catches this first; this is for workers and in-process callers
        log.error("event=startup_failed reason=%r", str(exc))
        return EXIT_STARTUP_FAILURE
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()
