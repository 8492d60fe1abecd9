"""/metrics with --workers: the supervisor asks the workers at scrape time, so a scrape has no lag."""

from __future__ import annotations

import asyncio
import os
import re
import time
import urllib.request

import pytest

from runner.testing import FakeApisix, conf
from tests.integration.test_process import Spawn, apisix_env, wait_ready
from tests.integration.test_process import spawn as spawn  # noqa: PLC0414 - the fixture, shared
from tests.integration.test_runner_startup import free_port

OK_CALLS = re.compile(r'^mtls_guard_rpc_total\{outcome="ok",type="http_req_call"\} (\S+)$', re.M)


async def requests(path: str, connections: int, each: int) -> None:
    async def drive() -> None:
        async with FakeApisix(path) as apisix:
            for _ in range(each):
                assert (await apisix.request(conf())).kind == "pass"

    await asyncio.gather(*(drive() for _ in range(connections)))


def ok_calls(port: int) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        match = OK_CALLS.search(response.read().decode())
    return float(match.group(1)) if match else 0.0


class TestScrapeTime:
    def test_counts_are_current_at_scrape_time(self, spawn: Spawn, sock_path: str) -> None:
        """A scrape right after the calls already counts every one of them, summed over both workers."""
        if len(os.sched_getaffinity(0)) < 2:
            pytest.skip("needs two usable CPUs for two workers")
        port = free_port()
        runner = spawn(apisix_env(sock_path), "--workers", "2", "--metrics-addr", f"127.0.0.1:{port}")
        wait_ready(runner, sock_path)

        for batch in range(1, 4):
            asyncio.run(requests(sock_path, connections=6, each=5))
            started = time.monotonic()
            assert ok_calls(port) == 30 * batch
            assert time.monotonic() - started < 0.5  # answered, not waited out into the fallback files
