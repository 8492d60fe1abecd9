"""Shared fixtures: short socket directories, test plugin registries, an in-process runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from runner import PluginRegistry
from runner.server import RunnerServer
from runner.settings import Settings
from tests.plugins_for_tests import make_registry

ServeFactory = Callable[..., contextlib.AbstractAsyncContextManager[RunnerServer]]


@pytest.fixture
def registry() -> PluginRegistry:
    """Fresh instances of the test plugins (counters start at zero)."""
    return make_registry()


@pytest.fixture
def sock_dir() -> Iterator[Path]:
    """A directory short enough for AF_UNIX paths (108 bytes), whatever pytest's tmp_path is."""
    path = Path(tempfile.mkdtemp(prefix="mg-", dir="/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def sock_path(sock_dir: Path) -> str:
    return str(sock_dir / "runner.sock")


@pytest.fixture
def serve(registry: PluginRegistry, sock_path: str) -> ServeFactory:
    """``async with serve(call_timeout=0.5) as server:`` runs a RunnerServer on ``sock_path``.

    The server stops (and is awaited) when the block ends, so each test owns its runner fully.
    """

    @contextlib.asynccontextmanager
    async def run(
        path: str | None = None, plugins: PluginRegistry | None = None, **settings: Any
    ) -> AsyncIterator[RunnerServer]:
        server = RunnerServer(Settings(listen=path or sock_path, **settings), plugins or registry)
        await server.start()
        task = asyncio.ensure_future(server.serve())
        try:
            yield server
        finally:
            server.stop()
            await task

    return run


@pytest.fixture
def logging_restored() -> Iterator[None]:
    """Code that reconfigures the ``mtls_guard`` logger (a reload, runner.logs): put it back afterwards."""
    root = logging.getLogger("mtls_guard")
    handlers, level, propagate = list(root.handlers), root.level, root.propagate
    yield
    for handler in [h for h in root.handlers if h not in handlers]:
        root.removeHandler(handler)
        handler.close()
    root.handlers[:0] = [h for h in handlers if h not in root.handlers]
    root.setLevel(level)
    root.propagate = propagate
