"""Ordinary asyncio inside plugins, through a real runner on a Unix socket with a fake APISIX.

Each call runs in an asyncio Task by default, so timeouts, gather, sleep, current_task() and
anyio-based libraries (httpx) work in filters; a plugin declaring ``needs_task = False`` that awaits
anything but ExtraInfo fails closed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest

from runner import BasePlugin, HTTPRequest, PluginRegistry, Stop
from runner.protocol.messages import ErrCode
from runner.testing import FakeApisix, conf, http_req_call_frame
from tests.conftest import ServeFactory

VARS = {"host": "api.example.com", "remote_addr": "192.0.2.7", "scheme": "https"}


class Recorder(BasePlugin[str]):
    """Base of the plugins below: remembers the Task of every call and whether its finally ran."""

    def __init__(self) -> None:
        self.tasks: list[asyncio.Task[Any] | None] = []
        self.finished = 0

    def enter(self) -> None:
        self.tasks.append(asyncio.current_task())


class TimeoutVars(Recorder):
    name = "timeout-vars"

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        self.enter()
        async with asyncio.timeout(5):
            values = await request.vars("host", "remote_addr")
        return Stop(200, body=json.dumps(values).encode())


class GatherVars(Recorder):
    name = "gather-vars"

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        first, second, _ = await asyncio.gather(request.vars("host"), request.vars("scheme"), asyncio.sleep(0))
        return Stop(200, body=json.dumps({**first, **second}).encode())


class CurrentTask(Recorder):
    name = "current-task"

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        self.enter()
        task = asyncio.current_task()
        return Stop(200 if task is not None else 500)


class HttpxGet(Recorder):
    """Conf: a URL; stops with what an httpx.AsyncClient GET of it returned."""

    name = "httpx-get"

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        async with httpx.AsyncClient(trust_env=False, timeout=5) as client:
            response = await client.get(conf, headers={"x-host": await request.var("host") or ""})
        return Stop(200, (("x-upstream-status", str(response.status_code)),), response.content)


class OwnTimeout(Recorder):
    name = "own-timeout"

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        try:
            async with asyncio.timeout(0.05):
                await asyncio.sleep(10)
        except TimeoutError:
            return Stop(504, body=b"upstream check timed out")
        return Stop(200)


class Sleeper(Recorder):
    """Sleeps an hour: only a cut-off or a lost connection ends it."""

    name = "sleeper"

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        self.enter()
        try:
            await asyncio.sleep(3600)
        finally:
            self.finished += 1
        return None


class RaisesLater(Recorder):
    name = "raises-later"

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        await asyncio.sleep(0.001)
        raise ValueError("plugin bug after a timer")


class FastForeign(Recorder):
    """Declares the fast path, then awaits a future of its own: a contract violation."""

    name = "fast-foreign"
    needs_task = False

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        await request.var("host")
        await asyncio.get_running_loop().create_future()
        return Stop(200)


PLUGINS = (
    TimeoutVars,
    GatherVars,
    CurrentTask,
    HttpxGet,
    OwnTimeout,
    Sleeper,
    RaisesLater,
    FastForeign,
)


@pytest.fixture
def plugins() -> dict[str, Recorder]:
    return {cls.name: cls() for cls in PLUGINS}


@asynccontextmanager
async def loopback_http() -> AsyncIterator[str]:
    """A one-response HTTP/1.1 server on 127.0.0.1; yields its URL. The body echoes the x-host header."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        host = next((line[8:] for line in head.split(b"\r\n") if line.lower().startswith(b"x-host: ")), b"")
        body = b"hello " + host
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/check"
    finally:
        server.close()
        await server.wait_closed()


class TestOrdinaryAsyncio:
    def test_timeout_around_extra_info(self, serve: ServeFactory, sock_path: str, plugins: dict[str, Recorder]) -> None:
        """asyncio.timeout around request.vars works and the answer carries both variables."""

        async def main() -> tuple[int | None, bytes]:
            async with serve(plugins=PluginRegistry(plugins.values())), FakeApisix(sock_path, vars=VARS) as apisix:
                outcome = await apisix.request(conf(("timeout-vars", "")))
                assert outcome.stop is not None
                return outcome.client_status, outcome.stop.body

        status, body = asyncio.run(main())
        assert status == 200
        assert json.loads(body) == {"host": "api.example.com", "remote_addr": "192.0.2.7"}

    def test_gather_of_vars_and_sleep(self, serve: ServeFactory, sock_path: str, plugins: dict[str, Recorder]) -> None:
        """asyncio.gather of two request.vars and an asyncio.sleep(0) answers with both values."""

        async def main() -> tuple[bytes, tuple[str, ...]]:
            async with serve(plugins=PluginRegistry(plugins.values())), FakeApisix(sock_path, vars=VARS) as apisix:
                outcome = await apisix.request(conf(("gather-vars", "")))
                assert outcome.stop is not None
                return outcome.stop.body, outcome.extra_info

        body, asked = asyncio.run(main())
        assert json.loads(body) == {"host": "api.example.com", "scheme": "https"}
        assert asked == ("var:host", "var:scheme")

    def test_current_task_is_a_fresh_task(
        self, serve: ServeFactory, sock_path: str, plugins: dict[str, Recorder]
    ) -> None:
        """asyncio.current_task() is a Task of the call's own, a new one per call, done once answered."""

        async def main() -> list[int | None]:
            async with serve(plugins=PluginRegistry(plugins.values())), FakeApisix(sock_path) as apisix:
                return [(await apisix.request(conf(("current-task", "")))).client_status for _ in range(2)]

        assert asyncio.run(main()) == [200, 200]
        first, second = plugins["current-task"].tasks
        assert first is not None
        assert second is not None
        assert first is not second
        assert first.done()
        assert second.done()

    def test_httpx_get_to_a_loopback_server(
        self, serve: ServeFactory, sock_path: str, plugins: dict[str, Recorder]
    ) -> None:
        """An httpx.AsyncClient (anyio underneath) GETs a loopback HTTP server from inside a filter."""

        async def main() -> Stop | None:
            async with (
                loopback_http() as url,
                serve(plugins=PluginRegistry(plugins.values())),
                FakeApisix(sock_path, vars=VARS) as apisix,
            ):
                return (await apisix.request(conf(("httpx-get", url)))).stop

        stop = asyncio.run(main())
        assert stop is not None
        assert stop.status == 200
        assert dict(stop.headers)["x-upstream-status"] == "200"
        assert stop.body == b"hello api.example.com"

    def test_own_timeout_is_handled_by_the_plugin(
        self, serve: ServeFactory, sock_path: str, plugins: dict[str, Recorder]
    ) -> None:
        """A timeout that fires inside the filter reaches the filter's own handler, which answers 504."""

        async def main() -> Stop | None:
            async with serve(plugins=PluginRegistry(plugins.values())), FakeApisix(sock_path) as apisix:
                return (await apisix.request(conf(("own-timeout", "")))).stop

        stop = asyncio.run(main())
        assert stop is not None
        assert (stop.status, stop.body) == (504, b"upstream check timed out")

    def test_exception_after_an_await_fails_closed(
        self, serve: ServeFactory, sock_path: str, plugins: dict[str, Recorder]
    ) -> None:
        """A filter raising in its Task after a timer is a 503, and the next call on the runner works."""

        async def main() -> tuple[ErrCode | None, int | None]:
            async with serve(plugins=PluginRegistry(plugins.values())), FakeApisix(sock_path) as apisix:
                failed = await apisix.request(conf(("raises-later", "")))
                ok = await apisix.request(conf(("current-task", "")), key="r2")
                return failed.error, ok.client_status

        assert asyncio.run(main()) == (ErrCode.SERVICE_UNAVAILABLE, 200)


class TestCutOff:
    def test_call_timeout_cuts_off_a_hung_task(
        self, serve: ServeFactory, sock_path: str, plugins: dict[str, Recorder]
    ) -> None:
        """call_timeout answers a hung Task-mode filter with 503; its Task is cancelled and ends."""
        sleeper = plugins["sleeper"]

        async def main() -> tuple[ErrCode | None, float]:
            async with (
                serve(plugins=PluginRegistry(plugins.values()), call_timeout=0.3),
                FakeApisix(sock_path) as apisix,
            ):
                started = time.monotonic()
                outcome = await apisix.request(conf(("sleeper", "")))
                elapsed = time.monotonic() - started
                for _ in range(100):
                    if sleeper.finished:
                        break
                    await asyncio.sleep(0.01)
                return outcome.error, elapsed

        code, elapsed = asyncio.run(main())
        assert code == ErrCode.SERVICE_UNAVAILABLE
        assert elapsed < 0.3 + 1.0
        assert sleeper.finished == 1
        (task,) = sleeper.tasks
        assert task is not None
        assert task.done()

    def test_connection_loss_cancels_the_task(
        self, serve: ServeFactory, sock_path: str, plugins: dict[str, Recorder]
    ) -> None:
        """APISIX closing the connection mid-call cancels the filter's Task (finally runs, Task ends)."""
        sleeper = plugins["sleeper"]

        async def main() -> int:
            async with serve(plugins=PluginRegistry(plugins.values())), FakeApisix(sock_path) as apisix:
                token = await apisix.prepare(conf(("sleeper", "")))
                _, writer = await asyncio.open_unix_connection(sock_path)
                writer.write(http_req_call_frame(id=1, conf_token=token))
                await writer.drain()
                while not sleeper.tasks:
                    await asyncio.sleep(0.01)
                writer.close()
                await writer.wait_closed()
                for _ in range(100):
                    if sleeper.finished:
                        break
                    await asyncio.sleep(0.01)
                return sleeper.finished

        assert asyncio.run(main()) == 1
        (task,) = sleeper.tasks
        assert task is not None
        assert task.done()

    def test_fast_path_plugin_awaiting_a_future_fails_closed(
        self, serve: ServeFactory, sock_path: str, plugins: dict[str, Recorder], caplog: pytest.LogCaptureFixture
    ) -> None:
        """needs_task = False and a foreign future: 503 at once (no hang until call_timeout), with a clear log line."""

        async def main() -> tuple[ErrCode | None, float]:
            async with (
                serve(plugins=PluginRegistry(plugins.values()), call_timeout=30),
                FakeApisix(sock_path, vars=VARS) as apisix,
            ):
                started = time.monotonic()
                outcome = await apisix.request(conf(("fast-foreign", "")))
                return outcome.error, time.monotonic() - started

        with caplog.at_level(logging.ERROR, logger="mtls_guard.runner"):
            code, elapsed = asyncio.run(main())
        assert code == ErrCode.SERVICE_UNAVAILABLE
        assert elapsed < 2
        (line,) = [r.getMessage() for r in caplog.records if "fast-foreign" in r.getMessage()]
        assert "plugin 'fast-foreign' failed: TaskRequired: awaited <Future pending>" in line
        assert "needs_task = False" in line
