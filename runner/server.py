"""The asyncio Unix-socket server: binding, connections, deadlines and shutdown.

All protocol work happens in runner.session; this module only moves bytes and manages lifetimes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import signal
import socket
import stat
import time
from collections.abc import Iterable
from typing import Literal, cast

from .balance import Acceptor, ConnectionBalance
from .confcache import ConfStore
from .registry import PluginRegistry
from .session import RPCObserver, Session, SessionConfig
from .settings import Settings
from .sharedconf import SharedConfs

__all__ = ["RunnerServer", "StartupError", "bind_unix_socket", "in_use_message", "socket_file_is", "socket_is_live"]

log = logging.getLogger("mtls_guard.runner")

# Pending connections the kernel queues for us (listen backlog). APISIX opens up to 32 per nginx worker.
LISTEN_BACKLOG = 1024
# How often deadlines and idle connections are checked; cheaper than a timer per call.
_SWEEP_INTERVAL = 0.25


def random_first_token() -> int:
    """Where this process starts numbering conf tokens.

    APISIX workers may keep tokens from a previous runner process (a sidecar restart is not
    announced to them). If every process numbered from 1, such a stale token would name another
    route's config here — possibly a more permissive one. Starting at a random point makes the
    old and new ranges overlap only with probability ~(tokens issued by both) / 2**32; a stale
    token then gets CONF_TOKEN_NOT_FOUND and APISIX re-prepares.
    """
    return secrets.randbelow(0xFFFFFFFF) + 1


class StartupError(RuntimeError):
    """The runner cannot start (socket path unusable, plugin setup failed)."""


def socket_file_is(path: str, inode: int | None) -> bool:
    """Whether ``path`` is still the socket we bound (same inode), not deleted or replaced."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISSOCK(st.st_mode) and st.st_ino == inode


def socket_is_live(path: str, timeout: float = 1.0) -> bool:
    """Whether a process accepts connections on the Unix socket at ``path``.

    Refused (or gone) means a stale file: a runner killed with SIGKILL leaves its socket behind,
    and APISIX respawns the runner 3 s later. A connection, a full backlog (EAGAIN) or a slow
    answer mean someone listens. The probe connection closes without a byte; a runner sees an
    ordinary disconnect."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(timeout)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except (BlockingIOError, TimeoutError):
        return True
    except OSError as exc:
        raise StartupError(f"cannot tell whether a runner serves {path}: {exc.strerror or exc}") from exc
    finally:
        probe.close()
    return True


def in_use_message(path: str) -> str:
    return f"another runner is serving {path}: stop it first, or pass --replace to take the socket over"


Existing = Literal["stale", "any", "none"]
"""What may already be at a socket path before we bind: a stale socket only, any socket (take
over a live runner too), or nothing (re-binding a path we lost: whatever appeared there now
belongs to someone else)."""


def bind_unix_socket(path: str, mode: int, existing: Existing = "stale") -> socket.socket:
    """Bind a listening socket at ``path``, replacing a socket as ``existing`` allows but never another file."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        raise StartupError(f"cannot inspect socket path {path}: {exc.strerror}") from exc
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"socket path {path} exists and is not a socket; refusing to replace it")
        if existing == "none":
            raise StartupError(f"socket path {path} was taken by another process meanwhile")
        if existing == "stale" and socket_is_live(path):
            raise StartupError(in_use_message(path))
        os.unlink(path)
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise StartupError(f"socket directory {directory} does not exist")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        # nginx workers may run as another user ("nobody"); they need write access to connect.
        os.chmod(path, mode)
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror or exc}") from exc
    return sock


class _Connection(asyncio.Protocol):
    # No __slots__: connection_made binds the session's data_received on the instance (see there).

    def __init__(self, server: RunnerServer) -> None:
        self._server = server
        self.transport: asyncio.Transport | None = None
        self.session: Session | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing asyncio.Transport.
        self.transport = cast(asyncio.Transport, transport)
        self.session = Session(
            self._server.session_config, self.transport.write, self.transport.close, self._server.loop.call_soon
        )
        # asyncio looks data_received up on every read: hand the bytes straight to the session,
        # one Python call less per read. (uvloop looked the method up before this point and keeps
        # calling the one below, which does the same.)
        self.data_received = self.session.data_received  # type: ignore[method-assign]
        self._server.connections.add(self)
        self._server.connection_opened()

    def data_received(self, data: bytes) -> None:
        assert self.session is not None
        self.session.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.session is not None:
            self.session.connection_lost()
        self._server.connections.discard(self)
        self._server.connection_closed()


class RunnerServer:
    """Serves one socket until ``stop()``; ``run()`` wraps the whole lifecycle."""

    def __init__(
        self,
        settings: Settings,
        registry: PluginRegistry,
        *,
        observers: Iterable[RPCObserver] = (),
        listen_socket: socket.socket | None = None,
        shared: SharedConfs | None = None,
        balance: ConnectionBalance | None = None,
    ) -> None:
        """``listen_socket``/``shared``: worker mode under runner.process.supervisor, which owns the socket
        path (binds it, watches it, removes it) and the shared conf-token table."""
        self.settings = settings
        self.registry = registry
        self._inherited_socket = listen_socket
        self._balance = balance
        self._acceptor: Acceptor | None = None
        self.retiring = False
        self.store = ConfStore(
            registry,
            ttl=settings.token_ttl,
            max_entries=settings.max_conf_entries,
            clock=time.monotonic,
            first_token=random_first_token(),
            shared=shared,
        )
        self.session_config = SessionConfig(
            store=self.store,
            call_timeout=settings.call_timeout,
            max_payload=settings.max_frame_bytes,
            observers=tuple(observers),
        )
        self.connections: set[_Connection] = set()
        self._server: asyncio.AbstractServer | None = None
        # Created here, not in start(): stop() from a signal handler installed before binding must stick.
        self._stopping = asyncio.Event()
        self._all_closed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._socket_inode: int | None = None
        # Set once another file took the socket path (a runner started with --replace, or the one
        # APISIX spawned after a reload): from then on this process never binds or unlinks there.
        self.superseded = asyncio.Event()

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        assert self._loop is not None
        return self._loop

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._all_closed = asyncio.Event()
        await self._listen("any" if self.settings.replace else "stale")
        log.info("event=listening path=%s plugins=%s", self.settings.listen, ",".join(self.registry.names))

    async def _listen(self, existing: Existing) -> None:
        if self._inherited_socket is not None:
            self._acceptor = Acceptor(
                self._inherited_socket, lambda: _Connection(self), lambda: len(self.connections), self._balance
            )
            self._acceptor.publish()
            return
        sock = bind_unix_socket(self.settings.listen, self.settings.socket_mode, existing)
        self._socket_inode = os.stat(self.settings.listen).st_ino
        # backlog again here: asyncio (and uvloop) call listen() on the socket once more, with 100 by
        # default, and a burst of APISIX connects beyond the queue gets EAGAIN, which nginx reports
        # as a failed connect (503).
        self._server = await self.loop.create_unix_server(lambda: _Connection(self), sock=sock, backlog=LISTEN_BACKLOG)

    def ready(self) -> bool:
        """Listening, not shutting down, and our socket file is still at its path."""
        if (self._server is None and self._acceptor is None) or self._stopping.is_set():
            return False
        return self._inherited_socket is not None or self._socket_intact()

    def _socket_intact(self) -> bool:
        return socket_file_is(self.settings.listen, self._socket_inode)

    async def _watch_socket_path(self) -> None:
        """Re-bind a deleted socket file; give the path up for good once another file holds it.

        The second rule is what keeps a replaced runner from taking the socket back when its
        successor exits and removes its own file. A successor that comes and goes between two
        sweeps is indistinguishable from a deleted file, and is re-bound."""
        if self._inherited_socket is not None or self.superseded.is_set():
            return
        try:
            st = os.lstat(self.settings.listen)
        except FileNotFoundError:
            await self._restore_socket()
            return
        except OSError:
            return
        if not (stat.S_ISSOCK(st.st_mode) and st.st_ino == self._socket_inode):
            # Our listening socket keeps its inode allocated, so a new file never reuses the number.
            log.warning(
                "event=socket_replaced path=%s connections=%d action='serve these connections, never re-bind'",
                self.settings.listen,
                len(self.connections),
            )
            self.superseded.set()

    async def _restore_socket(self) -> None:
        """Someone deleted our socket file (tmp cleaners do): APISIX could no longer connect, so
        listen again at the same path. Established connections are unaffected."""
        log.warning("event=socket_missing path=%s action=rebind", self.settings.listen)
        old = self._server
        try:
            await self._listen("none")
        except StartupError as exc:
            log.error("event=socket_rebind_failed reason=%r", str(exc))
            return
        if old is not None:
            old.close()

    def apply_settings(self, settings: Settings) -> None:
        """Swap in reloaded settings (runner.reload passes only what may change live) and have every
        conf token compiled again on its next use, against the plugin state just committed."""
        self.settings = settings
        self.session_config.call_timeout = settings.call_timeout
        self.store.resize(ttl=settings.token_ttl, max_entries=settings.max_conf_entries)
        self.store.new_generation()

    def stop(self) -> None:
        """Ask the server to shut down (signal-safe: only sets an event); also works before start()."""
        self._stopping.set()

    def retire(self) -> None:
        """Worker mode: the supervisor re-bound the socket and started new workers. Stop accepting,
        keep serving the connections APISIX already has here, and stop once the last one closes."""
        if self._acceptor is None or self.retiring:
            return
        self.retiring = True
        self._acceptor.close(leave_balance=False)
        log.info("event=retiring connections=%d", len(self.connections))
        if not self.connections:
            self.stop()

    async def serve(self) -> None:
        """Serve until stop(), then drain and close; the socket file is removed in any case."""
        sweeper = asyncio.create_task(self._sweep())
        try:
            await self._stopping.wait()
        finally:
            sweeper.cancel()
            await self._shutdown()

    async def _shutdown(self) -> None:
        started = time.monotonic()
        if self._server is not None:
            self._server.close()
        if self._acceptor is not None:
            self._acceptor.close()
        self._unlink()
        for conn in list(self.connections):
            if conn.session is None or not conn.session.busy:
                self._close(conn)
        deadline = started + self.settings.drain_timeout
        while any(c.session is not None and c.session.busy for c in self.connections):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            await asyncio.sleep(min(0.01, remaining))
        for conn in list(self.connections):
            if conn.transport is not None:
                conn.transport.abort()
        if self.connections and self._all_closed is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._all_closed.wait(), 0.1)
        log.info("event=stopped drained_in=%.3fs", time.monotonic() - started)

    def connection_opened(self) -> None:
        if self._acceptor is not None:
            self._acceptor.publish()

    def connection_closed(self) -> None:
        if self._acceptor is not None:
            self._acceptor.publish()
        if not self.connections:
            if self._all_closed is not None:
                self._all_closed.set()
            if self.retiring:
                self.stop()

    @staticmethod
    def _close(conn: _Connection) -> None:
        if conn.transport is not None:
            conn.transport.close()

    def _unlink(self) -> None:
        # Only our own socket: after a rebind by someone else's process we must not remove theirs.
        if self._inherited_socket is None and self._socket_intact():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.settings.listen)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(_SWEEP_INTERVAL)
            try:
                await self._sweep_once(self.settings.idle_timeout)  # a reload may change it
            except Exception:  # a failing sweep must not end deadlines and idle closing for good
                log.exception("event=sweep_failed")

    async def _sweep_once(self, idle_timeout: float) -> None:
        now = time.perf_counter()
        mono = time.monotonic()
        await self._watch_socket_path()
        for conn in list(self.connections):
            session = conn.session
            if session is None:
                continue
            if session.busy:
                session.enforce_deadline(now)
            elif idle_timeout and mono - session.last_activity > idle_timeout:
                self._close(conn)

    def install_signal_handlers(self) -> None:
        """Call before start(): a SIGTERM arriving just after the bind then still exits cleanly."""
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, self.stop)

    def remove_signal_handlers(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().remove_signal_handler(sig)
