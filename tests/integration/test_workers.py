"""`mtls-guard run --workers 2`: one supervisor, two worker processes, one socket, shared tokens."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from runner.testing import FakeApisix, conf
from tests.integration.test_process import Runner, Spawn, apisix_env, wait_ready
from tests.integration.test_process import spawn as spawn  # noqa: PLC0414 - the fixture, shared

PROTECTED = conf(("mtls-guard", json.dumps({"exempt": [{"id": "health", "path": "/health"}]})))
NO_CERT = {"scheme": "https", "host": "a.test", "ssl_server_name": "a.test", "ssl_client_verify": "NONE"}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def _worker_rundir(worker_pid: int) -> Path:
    argv = Path(f"/proc/{worker_pid}/cmdline").read_bytes().split(b"\0")
    return Path(argv[argv.index(b"runner.process.worker") + 1].decode())


def _wait_for_workers(runner: Runner, count: int) -> list[int]:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        pids = _children(runner.proc.pid)
        if len(pids) == count:
            return pids
        time.sleep(0.05)
    raise AssertionError(f"expected {count} workers, saw {_children(runner.proc.pid)}")


async def _many_connections(path: str, connections: int, requests: int) -> tuple[list[str], list[int], int]:
    """One PrepareConf, then requests on many pooled connections (spread over the workers)."""
    first = FakeApisix(path, vars=NO_CERT)
    token = await first.prepare(PROTECTED, "route#1#ext-plugin-pre-req#1")
    fakes = [first] + [FakeApisix(path, vars=NO_CERT) for _ in range(connections - 1)]
    for fake in fakes:
        fake._tokens["route#1#ext-plugin-pre-req#1"] = token  # what APISIX's shared dict does

    async def drive(fake: FakeApisix) -> list[tuple[str, int]]:
        results = []
        for i in range(requests):
            path_ = "/health" if i % 2 else "/api"
            outcome = await fake.request(PROTECTED, path=path_, headers=(("host", "a.test"),))
            results.append((outcome.kind, outcome.tries))
        return results

    try:
        batches = await asyncio.gather(*(drive(f) for f in fakes))
    finally:
        for fake in fakes:
            await fake.close()
    flat = [r for batch in batches for r in batch]
    return [k for k, _ in flat], [t for _, t in flat], sum(f.prepare_count for f in fakes)


class TestWorkers:
    def test_tokens_prepared_once_work_on_every_worker(self, spawn: Spawn, sock_path: str) -> None:
        """One PrepareConf serves requests spread over both workers with no CONF_TOKEN_NOT_FOUND round trip."""
        runner = spawn(apisix_env(sock_path), "--workers", "2")
        wait_ready(runner, sock_path)
        pids = _wait_for_workers(runner, 2)
        kinds, tries, prepares = asyncio.run(_many_connections(sock_path, connections=24, requests=10))
        assert prepares == 1
        assert set(tries) == {1}
        assert kinds.count("stop") == 120  # every protected request without a certificate: 403
        assert kinds.count("rewrite") == 120  # every exempt one (delivered with the judged path)
        time.sleep(1.3)  # workers write their counters every second
        rundir = _worker_rundir(pids[0])
        served = [json.loads((rundir / f"metrics-{i}.json").read_text()) for i in range(2)]
        calls = [sum(n for t, o, n in s["rpc"] if t == "http_req_call") for s in served]
        assert min(calls) >= 0.3 * sum(calls), f"connections were not spread over the workers: {calls}"
        assert sum(calls) == 240

    def test_sigterm_stops_supervisor_and_workers_within_a_second(self, spawn: Spawn, sock_path: str) -> None:
        """SIGTERM ends the supervisor with 0 in under 1 s, removes the socket and leaves no worker behind."""
        runner = spawn(apisix_env(sock_path), "--workers", "2")
        wait_ready(runner, sock_path)
        pids = _wait_for_workers(runner, 2)
        started = time.monotonic()
        runner.proc.send_signal(signal.SIGTERM)
        assert runner.wait(5) == 0
        assert time.monotonic() - started < 1.0
        assert not os.path.lexists(sock_path)
        for pid in pids:
            assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]

    def test_workers_leave_with_a_killed_supervisor(self, spawn: Spawn, sock_path: str) -> None:
        """SIGKILL of the supervisor makes its workers exit and remove the private run directory."""
        runner = spawn(apisix_env(sock_path), "--workers", "2")
        wait_ready(runner, sock_path)
        pids = _wait_for_workers(runner, 2)
        rundir = _worker_rundir(pids[0])
        runner.kill()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and (any(Path(f"/proc/{p}").exists() for p in pids) or rundir.exists()):
            time.sleep(0.05)
        assert not any(Path(f"/proc/{p}").exists() for p in pids)
        assert not rundir.exists()

    def test_metrics_are_summed_over_workers(self, spawn: Spawn, sock_path: str) -> None:
        """The supervisor's /metrics adds up both workers' counters; /readyz and /healthz answer 200."""
        port = _free_port()
        runner = spawn(apisix_env(sock_path), "--workers", "2", "--metrics-addr", f"127.0.0.1:{port}")
        wait_ready(runner, sock_path)
        _wait_for_workers(runner, 2)
        asyncio.run(_many_connections(sock_path, connections=8, requests=5))
        time.sleep(1.3)
        base = f"http://127.0.0.1:{port}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as response:
            text = response.read().decode()
        assert 'mtls_guard_rpc_total{outcome="ok",type="http_req_call"} 40.0' in text
        assert 'mtls_guard_decisions_total{mode="enforce",reason="no-cert",verdict="deny"} 24.0' in text
        assert 'mtls_guard_decisions_total{mode="enforce",reason="exempt",verdict="allow"} 16.0' in text
        for probe in ("healthz", "readyz"):
            with urllib.request.urlopen(f"{base}/{probe}", timeout=5) as response:
                assert response.status == 200


class TestUsableCpus:
    def test_workers_never_outnumber_usable_cpus(self, spawn: Spawn, sock_path: str) -> None:
        """With one usable CPU, `--workers 2` runs a single process and says so in one warning line."""
        cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(cpus)})  # the runner inherits this mask, as under `taskset -c`
        try:
            runner = spawn(apisix_env(sock_path), "--workers", "2")
        finally:
            os.sched_setaffinity(0, cpus)
        wait_ready(runner, sock_path)
        assert _children(runner.proc.pid) == []
        deadline = time.monotonic() + 5
        while "event=workers_capped" not in runner.stdout + runner.stderr and time.monotonic() < deadline:
            time.sleep(0.05)
        assert "event=workers_capped requested=2 usable_cpus=1 running=1" in runner.stdout + runner.stderr
