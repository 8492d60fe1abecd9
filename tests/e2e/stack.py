"""The end-to-end world as one object: nginx -> bridge (FakeApisix) -> ``mtls-guard run``, and its start-up.

Without a usable nginx (see ``nginx_env``) the end-to-end tests are skipped, unless
``MTLS_GUARD_REQUIRE_E2E=1`` (CI sets it in ``.ci/run``): then every one of them fails with the reason.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.e2e.bridge import Bridge, Route
from tests.e2e.clients import Clients, Reply
from tests.e2e.nginx_env import NginxEnv, probe
from tests.e2e.nginx_front import NginxFront
from tests.e2e.pki import Pki
from tests.e2e.runner_process import RunnerProcess

__all__ = ["REQUIRE_ENV", "Stack", "require_nginx", "running_stack"]

REQUIRE_ENV = "MTLS_GUARD_REQUIRE_E2E"


@dataclass
class Stack:
    """One running world: nginx -> bridge (FakeApisix) -> ``mtls-guard run``."""

    pki: Pki
    front: NginxFront
    bridge: Bridge
    runner: RunnerProcess
    clients: Clients

    def diagnostics(self) -> str:
        """nginx error.log (error and worse) and the runner's log tail, for assertion messages."""
        runner_tail = "\n".join(self.runner.log().splitlines()[-15:])
        return f"\n--- nginx errors ---\n{self.front.errors()}\n--- runner log (tail) ---\n{runner_tail}"

    def expect(self, reply: Reply, status: int, reason: str | None = None) -> None:
        """Assert status (and the plugin's exposed reason) with the whole story in the message."""
        message = f"{reply.describe()}{self.diagnostics()}"
        assert reply.status == status, message
        if reason is not None:
            assert reply.reason == reason, message


def require_nginx() -> NginxEnv:
    result = probe()
    if result.usable:
        assert result.env is not None
        return result.env
    if os.environ.get(REQUIRE_ENV) == "1":
        pytest.fail(f"{REQUIRE_ENV}=1 but the end-to-end tests cannot run: {result.reason()}", pytrace=False)
    pytest.skip(f"end-to-end tests skipped: {result.reason()}")


@contextlib.contextmanager
def running_stack(
    env: NginxEnv, pki: Pki, workdir: Path, routes: Sequence[Route], runner_args: Sequence[str] = ()
) -> Iterator[Stack]:
    """Start runner, bridge and nginx (in that order) and stop all of them, whatever happens.
    ``runner_args`` go to ``mtls-guard run`` (e.g. ``--config``)."""
    sock_dir = tempfile.mkdtemp(prefix="mg-e2e-", dir="/tmp")  # AF_UNIX: 108 bytes at most
    try:
        with contextlib.ExitStack() as stack:
            runner = RunnerProcess(os.path.join(sock_dir, "runner.sock"), workdir / "runner.log", *runner_args)
            stack.enter_context(runner)
            bridge = stack.enter_context(Bridge(runner.socket_path, routes))
            (workdir / "nginx").mkdir(exist_ok=True)
            front = stack.enter_context(NginxFront(env, pki, workdir / "nginx", bridge.port))
            yield Stack(pki, front, bridge, runner, Clients(front, pki))
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)
