"""The README's example plugin (examples/deny_header) works as documented: installed through the entry
points its own pyproject.toml declares, it serves requests under `mtls-guard run` and adds its command.
"""

from __future__ import annotations

import asyncio
import os
import tomllib
from pathlib import Path

from runner.testing import ApisixOutcome, FakeApisix, conf
from tests.integration.test_plugin_commands import install, mtls_guard
from tests.integration.test_process import Spawn, apisix_env, one_line, wait_ready
from tests.integration.test_process import spawn as spawn  # noqa: PLC0414 - the fixture, shared

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "deny_header"


def example_path(directory: Path) -> str:
    """PYTHONPATH for the example as `pip install` would set it up: its module, and a distribution
    declaring exactly the entry points of its pyproject.toml."""
    project = tomllib.loads((EXAMPLE / "pyproject.toml").read_text())["project"]
    site = install(directory, project["entry-points"], name=project["name"])
    return os.pathsep.join([site, str(EXAMPLE)])


async def requests(path: str) -> tuple[ApisixOutcome, ApisixOutcome, ApisixOutcome]:
    async with FakeApisix(path, vars={"host": "api.example.com"}) as apisix:
        denied = await apisix.request(conf(("deny-header", "X-Debug")), headers=(("X-Debug", "1"),))
        passed = await apisix.request(conf(("deny-header", "X-Debug")), headers=(("Accept", "*/*"),))
        rejected = await apisix.request(conf(("deny-header", "X Debug")), key="route#2")
        return denied, passed, rejected


def test_serves_requests(spawn: Spawn, sock_path: str, sock_dir: Path) -> None:
    """Under `mtls-guard run`: the header gets 403, its absence passes with x-seen-host, a bad conf is refused."""
    runner = spawn(apisix_env(sock_path, PYTHONPATH=example_path(sock_dir)))
    wait_ready(runner, sock_path)

    denied, passed, rejected = asyncio.run(requests(sock_path))

    assert denied.kind == "stop"
    assert denied.stop is not None
    assert (denied.client_status, denied.stop.body) == (403, b"no\n")
    assert passed.kind == "rewrite"
    assert passed.upstream_headers == (("x-seen-host", "api.example.com"),)
    assert rejected.client_status == 503  # PrepareConf failed: APISIX answers the route with 503
    assert "Traceback" not in runner.stdout + runner.stderr


def test_command(tmp_path: Path) -> None:
    """`mtls-guard deny-header VALUE` exits 0 for a header name, and 1 with one stderr line for anything else."""
    path = example_path(tmp_path)

    good = mtls_guard(path, "deny-header", "X-Debug", cwd=tmp_path)
    bad = mtls_guard(path, "deny-header", "X Debug", cwd=tmp_path)

    assert (good.returncode, good.stdout, good.stderr) == (0, "requests carrying a x-debug header get 403\n", "")
    assert bad.returncode == 1
    assert one_line(bad.stderr) == "mtls-guard deny-header: error: not a header name: 'X Debug'"
