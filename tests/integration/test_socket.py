"""The asyncio server in-process: binding rules, byte transport, deadlines, idle sweeps, shutdown."""

from __future__ import annotations

import asyncio
import os
import socket
import stat
import time
from pathlib import Path

import pytest

from runner import PluginRegistry
from runner.protocol import codec
from runner.protocol.messages import ErrCode, RPCType, Stop
from runner.server import RunnerServer, StartupError, bind_unix_socket, socket_is_live
from runner.settings import Settings
from runner.testing import FakeApisix, conf, http_req_call_frame, prepare_conf_frame
from tests.conftest import ServeFactory
from tests.plugins_for_tests import Hang, make_registry


def make_stale(path: str) -> None:
    """A socket file nobody listens on (what a SIGKILLed runner leaves)."""
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(path)
    stale.close()


async def read_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readexactly(4)
    return head[0], await reader.readexactly(int.from_bytes(head[1:], "big"))


class TestBind:
    def test_creates_listening_socket_with_mode(self, sock_path: str) -> None:
        """The socket is created with the requested mode (0766 lets nginx workers of another user connect)."""
        sock = bind_unix_socket(sock_path, 0o766)
        try:
            assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
            assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o766
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(sock_path)
        finally:
            sock.close()

    def test_replaces_stale_socket(self, sock_path: str) -> None:
        """A socket file without a listener is removed and bound again."""
        stale = socket.socket(socket.AF_UNIX)
        stale.bind(sock_path)
        stale.close()
        with socket.socket(socket.AF_UNIX) as client, pytest.raises(ConnectionRefusedError):
            client.connect(sock_path)

        sock = bind_unix_socket(sock_path, 0o760)
        try:
            assert stat.S_IMODE(os.stat(sock_path).st_mode) == 0o760
            with socket.socket(socket.AF_UNIX) as client:
                client.connect(sock_path)
        finally:
            sock.close()

    def test_refuses_regular_file(self, sock_path: str) -> None:
        """A regular file at the path is never deleted."""
        Path(sock_path).write_text("data")

        with pytest.raises(StartupError, match="not a socket"):
            bind_unix_socket(sock_path, 0o766)
        assert Path(sock_path).read_text() == "data"

    def test_refuses_symlink(self, sock_dir: Path, sock_path: str) -> None:
        """A symlink at the path is not followed or removed, even if it points to a socket."""
        target = sock_dir / "target"
        target.write_text("t")
        os.symlink(target, sock_path)

        with pytest.raises(StartupError, match="not a socket"):
            bind_unix_socket(sock_path, 0o766)
        assert os.path.islink(sock_path)
        assert target.read_text() == "t"

    def test_missing_directory(self, sock_dir: Path) -> None:
        """A socket directory that does not exist is a start-up error naming it."""
        with pytest.raises(StartupError, match="does not exist"):
            bind_unix_socket(str(sock_dir / "missing" / "r.sock"), 0o766)

    def test_live_socket_is_refused_by_default(self, sock_path: str) -> None:
        """A socket someone listens on is not replaced unless asked; the error names the path and --replace."""
        live = bind_unix_socket(sock_path, 0o766)
        try:
            inode = os.stat(sock_path).st_ino
            with pytest.raises(StartupError, match="--replace") as caught:
                bind_unix_socket(sock_path, 0o766)
            assert sock_path in str(caught.value)
            assert os.stat(sock_path).st_ino == inode
        finally:
            live.close()

    def test_live_socket_is_replaced_when_any_is_allowed(self, sock_path: str) -> None:
        """existing="any" (--replace, or APISIX's own respawn) takes a served path over."""
        live = bind_unix_socket(sock_path, 0o766)
        try:
            inode = os.stat(sock_path).st_ino
            new = bind_unix_socket(sock_path, 0o766, "any")
            new.close()
            assert os.stat(sock_path).st_ino != inode
        finally:
            live.close()

    def test_nothing_may_exist_when_rebinding(self, sock_path: str) -> None:
        """existing="none" (re-binding a path we lost) refuses even a stale socket: it is someone else's now."""
        make_stale(sock_path)

        with pytest.raises(StartupError, match="taken by another process"):
            bind_unix_socket(sock_path, 0o766, "none")
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)

    def test_socket_is_live(self, sock_path: str) -> None:
        """Liveness is a connect: refused or missing means stale, a connection (even in the backlog) means live."""
        assert socket_is_live(sock_path) is False
        make_stale(sock_path)
        assert socket_is_live(sock_path) is False
        os.unlink(sock_path)
        live = bind_unix_socket(sock_path, 0o766)
        try:
            assert socket_is_live(sock_path) is True
        finally:
            live.close()


class TestTransport:
    def test_frames_split_across_writes(self, serve: ServeFactory, sock_path: str) -> None:
        """A request written a few bytes at a time is reassembled and answered once."""

        async def main() -> list[int]:
            async with serve():
                reader, writer = await asyncio.open_unix_connection(sock_path)
                frame = prepare_conf_frame(conf(("stop", '{"status": 401}')))
                for i in range(0, len(frame), 3):
                    writer.write(frame[i : i + 3])
                    await writer.drain()
                    await asyncio.sleep(0)
                kind, payload = await read_frame(reader)
                token = codec.decode_prepare_conf_reply(payload)
                writer.write(http_req_call_frame(id=1, conf_token=token) * 3)  # pipelined
                kinds = [kind]
                kinds += [(await read_frame(reader))[0] for _ in range(3)]
                writer.close()
                return kinds

        assert asyncio.run(main()) == [RPCType.PREPARE_CONF] + [RPCType.HTTP_REQ_CALL] * 3

    def test_peer_disconnect_mid_call(self, serve: ServeFactory, sock_path: str, registry: PluginRegistry) -> None:
        """APISIX closing a connection while a plugin waits cancels that plugin; the runner goes on."""
        hang = registry.get("hang")
        assert isinstance(hang, Hang)

        async def main() -> tuple[int, int]:
            async with serve() as server, FakeApisix(sock_path) as apisix:
                token = await apisix.prepare(conf(("hang", "")))
                _, writer = await asyncio.open_unix_connection(sock_path)
                writer.write(http_req_call_frame(id=1, conf_token=token))
                await writer.drain()
                while hang.started == 0:
                    await asyncio.sleep(0.01)
                writer.close()
                while len(server.connections) > 1:
                    await asyncio.sleep(0.01)
                outcome = await apisix.request(conf(("stop", '{"status": 402}')))
                return hang.closed, outcome.client_status or 0

        assert asyncio.run(main()) == (1, 402)

    def test_observers_see_every_rpc(self, sock_path: str) -> None:
        """The metrics hook is called once per RPC with its type and outcome."""
        seen: list[tuple[str, str]] = []

        async def main() -> None:
            server = RunnerServer(
                Settings(listen=sock_path), make_registry(), observers=[lambda r, o, s: seen.append((r, o))]
            )
            await server.start()
            task = asyncio.ensure_future(server.serve())
            async with FakeApisix(sock_path) as apisix:
                await apisix.request(conf(("stop", "{}")))
                await apisix.request(conf(("raise", "")), key="r2")
            server.stop()
            await task

        asyncio.run(main())
        assert seen == [
            ("prepare_conf", "ok"),
            ("http_req_call", "ok"),
            ("prepare_conf", "ok"),
            ("http_req_call", "service_unavailable"),
        ]


class TestSweeper:
    def test_idle_connections_closed_after_idle_timeout(self, serve: ServeFactory, sock_path: str) -> None:
        """A connection idle longer than idle_timeout is closed; a fresh one is kept."""

        async def main() -> tuple[bytes, bool]:
            async with serve(idle_timeout=180) as server:
                old_reader, old_writer = await asyncio.open_unix_connection(sock_path)
                new_reader, new_writer = await asyncio.open_unix_connection(sock_path)
                while len(server.connections) < 2:
                    await asyncio.sleep(0.01)
                sessions = sorted(
                    (c.session for c in server.connections if c.session is not None), key=lambda s: s.last_activity
                )
                sessions[0].last_activity -= 181  # as if it had been idle for three minutes
                eof = await asyncio.wait_for(old_reader.read(), 2)
                new_writer.write(prepare_conf_frame(conf()))
                kind, _ = await read_frame(new_reader)
                old_writer.close()
                new_writer.close()
                return eof, kind == RPCType.PREPARE_CONF

        eof, served = asyncio.run(main())
        assert eof == b""
        assert served

    def test_deadline_enforced_by_server(self, serve: ServeFactory, sock_path: str) -> None:
        """The server's sweep cuts off a hung call with SERVICE_UNAVAILABLE within timeout + one sweep."""

        async def main() -> tuple[ErrCode, float]:
            async with serve(call_timeout=0.3), FakeApisix(sock_path) as apisix:
                token = await apisix.prepare(conf(("hang", "")))
                started = time.monotonic()
                ex = await apisix.exchange(http_req_call_frame(id=1, conf_token=token))
                return codec.decode_error(ex.frames[0].payload), time.monotonic() - started

        code, elapsed = asyncio.run(main())
        assert code == ErrCode.SERVICE_UNAVAILABLE
        assert elapsed < 0.3 + 1.0


class TestSocketFile:
    def test_deleted_socket_is_rebound(self, serve: ServeFactory, sock_path: str) -> None:
        """If the socket file is deleted (tmp cleaners), the runner listens again; old connections keep working."""

        async def main() -> tuple[int, int, bool]:
            async with serve() as server, FakeApisix(sock_path, pool_size=1) as pooled:
                before = await pooled.request(conf(("stop", '{"status": 401}')))
                os.unlink(sock_path)
                assert not server.ready()
                for _ in range(200):
                    if server.ready():
                        break
                    await asyncio.sleep(0.01)
                async with FakeApisix(sock_path) as fresh:
                    new = await fresh.request(conf(("stop", '{"status": 402}')))
                again = await pooled.request(conf(("stop", '{"status": 401}')))
                assert (before.client_status, again.tries) == (401, 1)
                return new.client_status or 0, again.client_status or 0, server.ready()

        assert asyncio.run(main()) == (402, 401, True)
        assert not os.path.lexists(sock_path)

    def test_replaced_socket_is_never_taken_back(self, serve: ServeFactory, sock_path: str) -> None:
        """Once another socket took the path the server gives it up for good: not ready, no re-bind after
        that socket goes, nothing removed at stop; its own connections keep being served."""

        async def main() -> tuple[bool, bool, int]:
            async with serve() as server, FakeApisix(sock_path, pool_size=1) as pooled:
                await pooled.request(conf(("stop", '{"status": 401}')))
                os.unlink(sock_path)
                successor = socket.socket(socket.AF_UNIX)
                successor.bind(sock_path)  # bound before the next sweep: a replacement, not a deletion
                successor.listen()
                for _ in range(100):
                    if server.superseded.is_set():
                        break
                    await asyncio.sleep(0.01)
                ready = server.ready()
                successor.close()
                os.unlink(sock_path)  # the successor exits and removes its file
                await asyncio.sleep(0.6)  # two sweeps
                rebound = os.path.lexists(sock_path)
                again = await pooled.request(conf(("stop", '{"status": 401}')))
                return ready, rebound, again.client_status or 0

        assert asyncio.run(main()) == (False, False, 401)
        assert not os.path.lexists(sock_path)

    def test_foreign_file_at_path_is_left_alone(self, serve: ServeFactory, sock_path: str) -> None:
        """A regular file that replaced the socket is neither deleted nor bound over, even at shutdown."""

        async def main() -> bool:
            async with serve() as server:
                os.unlink(sock_path)
                Path(sock_path).write_text("mine")
                await asyncio.sleep(0.6)  # two sweeps
                return server.ready()

        assert asyncio.run(main()) is False
        assert Path(sock_path).read_text() == "mine"


class TestShutdown:
    def test_stop_removes_socket_and_closes_idle(self, serve: ServeFactory, sock_path: str) -> None:
        """stop() unlinks the socket file and closes idle connections."""

        async def main() -> bytes:
            async with serve():
                reader, writer = await asyncio.open_unix_connection(sock_path)
                writer.write(prepare_conf_frame(conf()))
                await read_frame(reader)
            eof = await asyncio.wait_for(reader.read(), 1)
            writer.close()
            return eof

        assert asyncio.run(main()) == b""
        assert not os.path.exists(sock_path)

    def test_stop_before_start_is_honoured(self, sock_path: str) -> None:
        """A stop() (SIGTERM) arriving while the server is still binding makes serve() shut down at once."""

        async def main() -> float:
            server = RunnerServer(Settings(listen=sock_path), make_registry())
            server.stop()
            await server.start()
            started = time.monotonic()
            await asyncio.wait_for(server.serve(), 2)
            return time.monotonic() - started

        assert asyncio.run(main()) < 1.0
        assert not os.path.lexists(sock_path)

    def test_busy_call_is_drained(self, serve: ServeFactory, sock_path: str) -> None:
        """A call in progress at shutdown still gets its reply if it ends within drain_timeout."""

        async def main() -> tuple[int, bytes]:
            async with FakeApisix(sock_path) as apisix:
                async with serve(drain_timeout=0.5) as server:
                    token = await apisix.prepare(conf(("sleep", "0.2")))
                    reader, writer = await asyncio.open_unix_connection(sock_path)
                    writer.write(http_req_call_frame(id=4, conf_token=token))
                    await writer.drain()
                    while not any(c.session is not None and c.session.busy for c in server.connections):
                        await asyncio.sleep(0.005)
                # the server has stopped here; the reply was written before the connection closed
                reply = await asyncio.wait_for(read_frame(reader), 1)
                writer.close()
                return reply

        kind, payload = asyncio.run(main())
        assert kind == RPCType.HTTP_REQ_CALL
        assert codec.decode_http_req_call_reply(payload).action == Stop(200, (), b"slept")

    def test_hung_call_is_aborted_at_drain_timeout(self, serve: ServeFactory, sock_path: str) -> None:
        """A call still running after drain_timeout is dropped, so shutdown stays under APISIX's 1 s."""

        async def main() -> tuple[float, bytes]:
            async with FakeApisix(sock_path) as apisix:
                async with serve(drain_timeout=0.3, call_timeout=30) as server:
                    token = await apisix.prepare(conf(("hang", "")))
                    reader, writer = await asyncio.open_unix_connection(sock_path)
                    writer.write(http_req_call_frame(id=4, conf_token=token))
                    await writer.drain()
                    while not any(c.session is not None and c.session.busy for c in server.connections):
                        await asyncio.sleep(0.005)
                    started = time.monotonic()
                elapsed = time.monotonic() - started
                data = await asyncio.wait_for(reader.read(), 1)
                writer.close()
                return elapsed, data

        elapsed, data = asyncio.run(main())
        assert elapsed < 1.0
        assert data == b""
