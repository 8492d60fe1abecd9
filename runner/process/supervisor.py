"""``--workers N``: one supervisor process owning the socket, N worker processes serving it.

APISIX runs one runner per instance but one nginx worker per core; a single Python process would
cap the gateway at one core. The supervisor binds the socket once and passes the listening file
descriptor to N workers (``python -m runner.process.worker``, started and stopped by runner.process.workerpool), so
the kernel spreads APISIX's connections over them. Conf tokens live in a table shared by all
workers (runner.sharedconf): a token prepared on one worker works on every other without an extra
round trip for APISIX.

The supervisor replaces a worker that dies (with back-off if it keeps dying), re-binds the socket if
the file is deleted (then rolls the workers onto the new one) but never once another runner's file
took the path, serves /metrics (the workers' counters, asked for at scrape time and added up:
runner.process.workerlink), /healthz and /readyz when asked, reloads on SIGHUP (checks the settings once,
then has every worker apply them: runner.process.workerreload), and on SIGTERM stops everything within
APISIX's 1 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import socket
import stat
import time
from typing import Literal

from ..app import EXIT_OK, EXIT_STARTUP_FAILURE, serving_line, setup_plugins
from ..balance import ConnectionBalance
from ..httpd import HealthEndpoint
from ..metrics import MetricsView, RPCStats, build_registry, live_view, merge, to_json
from ..registry import PluginRegistry
from ..reload import Reloader, ReloadStats, reloading
from ..server import StartupError, bind_unix_socket, in_use_message, random_first_token, socket_file_is, socket_is_live
from ..settings import Settings, SettingsSource
from ..sharedconf import SharedConfs
from .rundir import BALANCE_FILE, CONFS_FILE, create_run_dir, write_settings
from .workerlink import gather_views
from .workerpool import WorkerPool
from .workerreload import WorkerFanout

__all__ = ["Supervisor"]

log = logging.getLogger("mtls_guard.runner")

_TICK = 0.1


class Supervisor:
    def __init__(self, settings: Settings, registry: PluginRegistry, source: SettingsSource | None = None) -> None:
        """``source``: how ``settings`` were read, to read them again on SIGHUP (no reloads without it)."""
        self.settings = settings
        self.registry = registry
        self.source = source
        self.reload_stats = ReloadStats()
        self._reloader: Reloader | None = None
        self.pool = WorkerPool(settings.workers, self._listening_fd)
        self._rundir = ""
        self._sock: socket.socket | None = None
        self._inode: int | None = None
        self._stopping = asyncio.Event()
        self._republish = False
        self._early_stop = False
        # Another runner's file took the path: never bind or unlink there again (see _watch).
        self._superseded = False
        self._endpoint: HealthEndpoint | None = None
        self._handover: asyncio.Future[None] | None = None
        self._view = merge([])  # what the metrics registry exposes; refreshed right before each exposition

    # -- lifecycle ----------------------------------------------------------------------------
    def run(self) -> int:
        # Until the event loop takes over, a SIGTERM only records the wish to stop: dying from
        # the default action would leave a socket or worker processes behind.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._early_signal)
        try:
            setup_plugins(self.registry, self.settings)  # fail before binding, in one clear line
            self._rundir = self.pool.rundir = create_run_dir()
            SharedConfs.initialise(os.path.join(self._rundir, CONFS_FILE), random_first_token())
            ConnectionBalance.create(os.path.join(self._rundir, BALANCE_FILE), self.pool.size)
            write_settings(self._rundir, self.settings)
        except (StartupError, OSError, TypeError) as exc:  # TypeError: plugin options JSON cannot carry
            log.error("event=startup_failed reason=%r", str(exc))
            self._cleanup()
            return EXIT_STARTUP_FAILURE
        loop = asyncio.new_event_loop()
        try:
            return loop.run_until_complete(self._main())
        finally:
            loop.close()
            self._cleanup()

    def _early_signal(self, signum: int, frame: object) -> None:
        self._early_stop = True

    async def _main(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        if self._early_stop:
            self._stopping.set()
        endpoint = None
        try:
            if self.settings.metrics_addr is not None:
                endpoint = self._endpoint = self._make_endpoint(self.settings.metrics_addr)
                await endpoint.start()
            self._check_path()
            self._bind("any" if self.settings.replace else "stale")
            self.pool.start_all()
            await self._publish(first=True)
        except (StartupError, OSError, ImportError) as exc:
            log.error("event=startup_failed reason=%r", str(exc))
            await self._stop_all()
            if endpoint is not None:
                await endpoint.close()
            return EXIT_STARTUP_FAILURE
        if not self._stopping.is_set():
            serving_line(self.settings.listen, self.pool.size, endpoint)
        if self.source is not None:
            fanout = WorkerFanout(self._rundir, self.pool.control_links)
            self._reloader = Reloader(
                self.source, self.registry, self.settings, self._applied, stats=self.reload_stats, fanout=fanout
            )
        try:
            async with reloading(self._reloader):
                await self._supervise()
        finally:
            await self._stop_all()
            if self._handover is not None:
                await self._handover
            if endpoint is not None:
                await endpoint.close()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
        return EXIT_OK

    async def _supervise(self) -> None:
        while not self._stopping.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), _TICK)
            if not self._stopping.is_set():
                self._watch()
            if self._republish:
                self._republish = False
                try:
                    await self._publish(first=False)
                except (StartupError, OSError) as exc:
                    log.error("event=socket_rebind_failed reason=%r", str(exc))

    def _applied(self, settings: Settings) -> None:
        self.settings = settings

    def _reloading(self) -> bool:
        return self._reloader is not None and self._reloader.busy

    def _check_path(self) -> None:
        """Refuse, before any work, to replace something at the socket path that is not a socket."""
        try:
            st = os.lstat(self.settings.listen)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"socket path {self.settings.listen} exists and is not a socket; refusing to replace it")

    def _staging_path(self) -> str | None:
        """Where to bind before publishing: next to the real path (rename cannot cross file
        systems), or None when that name would not fit AF_UNIX's 108 bytes."""
        directory, name = os.path.split(self.settings.listen)
        staging = os.path.join(directory, f".{name}.{os.getpid()}.new")
        return staging if len(os.fsencode(staging)) < 108 else None

    def _bind(self, existing: Literal["stale", "any", "none"]) -> None:
        """Bind under a staging name; the socket appears at its real path only once a worker
        accepts (``_publish``), so APISIX never queues calls that no process will take yet.
        ``existing``: what may be at the real path (bind_unix_socket), when there is no staging name."""
        staging = self._staging_path()
        path = staging or self.settings.listen
        # Only this process names a staging file after its pid: whatever is there is a leftover.
        self._sock = bind_unix_socket(path, self.settings.socket_mode, "any" if staging else existing)
        self._sock.set_inheritable(True)
        self._inode = os.stat(path).st_ino

    def _claim_path(self, *, first: bool) -> None:
        """Just before the staging socket moves to the real path: the first time, a live runner
        there is refused unless ``replace`` (checked at start-up too, but plugin set-up and the
        workers' start take time); after a re-bind, anything that appeared there is someone else's."""
        self._check_path()
        if not os.path.lexists(self.settings.listen):
            return
        if not first:
            raise StartupError(f"socket path {self.settings.listen} was taken by another process meanwhile")
        if not self.settings.replace and socket_is_live(self.settings.listen):
            raise StartupError(in_use_message(self.settings.listen))

    async def _publish(self, *, first: bool, timeout: float = 15.0, all_within: float = 5.0) -> None:
        """Wait until the workers serve, then move the socket to its path in one step (rename
        replaces a stale socket atomically: there is no moment without a socket).

        All workers should be up first: APISIX keeps its connections for minutes, so the ones
        opened before a slow worker starts would all stay on the others. After ``all_within``
        seconds one serving worker is enough (the rest join as they come up)."""
        started = time.monotonic()
        while True:
            ready = self.pool.ready_count()
            waited = time.monotonic() - started
            if ready == self.pool.size or (ready and waited > all_within):
                break
            if self._stopping.is_set():
                return
            if self.pool.all_exited():
                raise StartupError("every worker exited during start-up (see the lines above)")
            if waited > timeout:
                raise StartupError(f"no worker was ready within {timeout:g}s")
            await asyncio.sleep(0.01)
        staging = self._staging_path()
        if staging is not None:
            self._claim_path(first=first)
            os.rename(staging, self.settings.listen)

    def _listening_fd(self) -> int:
        """The socket a worker starting now must serve (the pool asks at every start)."""
        assert self._sock is not None
        return self._sock.fileno()

    # -- supervision --------------------------------------------------------------------------
    def _watch(self) -> None:
        now = time.monotonic()
        self.pool.forget_retired()
        # No worker starts during a reload: it would read the settings file about to be replaced.
        reloading_now = self._reloading()
        if not self._superseded and not reloading_now:
            self._watch_path()
        self.pool.restart_exited(now, may_start=not reloading_now)

    def _socket_intact(self) -> bool:
        return socket_file_is(self.settings.listen, self._inode)

    def _watch_path(self) -> None:
        """Re-bind a deleted socket file; give the path up for good once another file holds it,
        so that a runner that replaced us (--replace, or APISIX's after a reload) does not see
        us take the path back when it exits and removes its file."""
        if self._socket_intact():
            return
        if not os.path.lexists(self.settings.listen):
            self._rebind()
            return
        self._superseded = True
        log.warning(
            "event=socket_replaced path=%s action='serve these connections, never re-bind'", self.settings.listen
        )
        staging = self._staging_path()
        if staging is not None and socket_file_is(staging, self._inode):  # a re-bind that never got published
            os.unlink(staging)
        if self._endpoint is not None:  # the port belongs to the runner that owns the socket now
            self._handover = asyncio.ensure_future(self._endpoint.close())

    def _rebind(self) -> None:
        """The socket file was deleted: bind a new socket and start a fresh set of workers on it.

        The old workers retire (SIGUSR1): they stop accepting on the old, now unreachable socket
        but keep serving the APISIX connections they hold until APISIX closes them, so no
        established connection breaks."""
        log.warning("event=socket_missing path=%s action=rebind", self.settings.listen)
        old = self._sock
        try:
            self._bind("none")
        except StartupError as exc:
            log.error("event=socket_rebind_failed reason=%r", str(exc))
            return
        self.pool.retire_and_restart()
        if old is not None:
            old.close()
        self._republish = True

    def ready(self) -> bool:
        return self.pool.any_alive() and not self._stopping.is_set() and self._socket_intact()

    async def _stop_all(self) -> None:
        started = time.monotonic()
        if self._socket_intact():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.settings.listen)
        if self._sock is not None:
            self._sock.close()
        await self.pool.stop(started)
        log.info("event=stopped drained_in=%.3fs", time.monotonic() - started)

    def _cleanup(self) -> None:
        staging = self._staging_path()
        if staging is not None and os.path.lexists(staging):
            with contextlib.suppress(OSError):
                os.unlink(staging)
        if self._rundir:
            shutil.rmtree(self._rundir, ignore_errors=True)

    # -- metrics ------------------------------------------------------------------------------
    def _make_endpoint(self, address: str) -> HealthEndpoint:
        from prometheus_client import generate_latest

        registry = build_registry(lambda: self._view)

        async def exposition() -> bytes:
            # No await between the two lines: a concurrent scrape cannot swap the view in between.
            self._view = await self._collect()
            return bytes(generate_latest(registry))

        return HealthEndpoint(address, ready=self.ready, metrics=exposition, share_port=self.settings.replace)

    async def _collect(self) -> MetricsView:
        """Every worker's counters now (retiring ones too: they still serve connections); a worker
        that does not answer in time is counted from the file it rewrites every second."""
        own = to_json(live_view(RPCStats(), {}, [self.reload_stats])())  # the supervisor decides reloads
        return merge([*await gather_views(self.pool.scrape_links(), self.pool.metrics_files()), own])
