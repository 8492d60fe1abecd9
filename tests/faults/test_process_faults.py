"""Fault injection against `mtls-guard run --workers 2` spawned the way APISIX spawns it: a worker
SIGKILLed under load, the socket file deleted, a burst of a thousand connections.

Each test ends with the same checks as the in-process ones, seen from outside: no protected request
was let through without a valid certificate, healthy connections kept getting right answers, and
the supervisor's and workers' descriptor counts (/proc/<pid>/fd) came back to where they were.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from runner.testing import ApisixOutcome, FakeApisix
from tests.faults._support import (
    PROBES,
    PROTECTED,
    Healthy,
    Ledger,
    Probe,
    RawConn,
    RunnerProcess,
    close_all,
    correct,
    free_port,
    http_get,
    pin,
    raise_fd_limit,
    request,
    settled_fds,
    wait_fds,
    warm_up,
    worker_sockets,
)

SpawnRunner = Callable[..., RunnerProcess]


@pytest.fixture
def spawn_runner(sock_dir: Path) -> Iterator[SpawnRunner]:
    """``spawn_runner(path, *args)`` starts ``mtls-guard run``; every runner is killed at teardown."""
    started: list[RunnerProcess] = []

    def start(path: str, *args: str) -> RunnerProcess:
        runner = RunnerProcess(path, sock_dir, *args)
        started.append(runner)
        return runner

    yield start
    for runner in started:
        runner.kill()


def assert_clean_exit(runner: RunnerProcess) -> None:
    assert runner.terminate() == 0, runner.output
    assert "Traceback" not in runner.output, runner.output


class Load:
    """Pinned FakeApisix connections cycling through the probes; every outcome is logged with its timing."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.log: list[tuple[int, float, float, Probe, ApisixOutcome]] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []

    def start(self, client: FakeApisix, index: int) -> None:
        async def loop() -> None:
            i = index
            while not self._stop.is_set():
                probe = PROBES[i % len(PROBES)]
                i += 1
                started = time.monotonic()
                outcome = await request(client, probe)
                self.log.append((id(client), started, time.monotonic(), probe, outcome))
                self.ledger.record(probe, outcome)
                await asyncio.sleep(0.001)

        self._tasks.append(asyncio.ensure_future(loop()))

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def of(self, client: FakeApisix) -> list[tuple[float, float, Probe, ApisixOutcome]]:
        return [(s, e, p, o) for c, s, e, p, o in self.log if c == id(client)]


class TestWorkerKilled:
    def test_sigkill_under_load(self, spawn_runner: SpawnRunner, sock_path: str) -> None:
        """A worker SIGKILLed under load: its calls fail closed, it is replaced, tokens work on every worker."""
        runner = spawn_runner(sock_path, "--workers", "2")
        workers = runner.wait_ready(2)
        asyncio.run(warm_up(runner, workers))
        supervisor_fds = settled_fds(runner.pid)
        worker_fds = {pid: settled_fds(pid) for pid in workers}
        sockets = worker_sockets(runner)
        victim, survivor = sorted(workers)

        async def main() -> tuple[dict[int, list[FakeApisix]], Load, float, int, list[ApisixOutcome]]:
            ledger = Ledger()
            load = Load(ledger)
            pinned: dict[int, list[FakeApisix]] = {pid: [] for pid in workers}
            clients: list[FakeApisix] = []
            try:
                for _ in range(40):  # each connection is pinned to the worker that accepted it
                    client, owner = await pin(sock_path, sockets)
                    clients.append(client)
                    pinned[owner].append(client)
                    if min(len(c) for c in pinned.values()) >= 3:
                        break
                assert min(len(c) for c in pinned.values()) >= 3, {p: len(c) for p, c in pinned.items()}
                for i, client in enumerate(clients):
                    load.start(client, i)
                while len(load.log) < 300:
                    await asyncio.sleep(0.01)
                killed_at = time.monotonic()
                os.kill(victim, signal.SIGKILL)
                deadline = time.monotonic() + 10
                while len(runner.workers() - {survivor, victim}) != 1 or victim in runner.workers():
                    assert time.monotonic() < deadline, f"no replacement worker: {runner.workers()}"
                    await asyncio.sleep(0.01)
                (replacement,) = runner.workers() - {survivor}
                await asyncio.sleep(1.0)  # load goes on while the replacement starts
                await load.stop()

                # A connection of a killed-worker client landing on the replacement: its old token works.
                on_replacement = []
                for client in pinned[victim]:
                    for _ in range(20):
                        await client.close()  # drop the pooled connection: the next request reconnects
                        before = sockets()
                        outcome = await request(client, PROTECTED)
                        on_replacement.append(outcome)
                        after = sockets()
                        if after.get(replacement, set()) - before.get(replacement, set()):
                            break
                    else:
                        raise AssertionError("no new connection reached the replacement worker")
                return pinned, load, killed_at, replacement, on_replacement
            finally:
                for client in clients:
                    await client.close()

        pinned, load, killed_at, replacement, on_replacement = asyncio.run(main())
        load.ledger.assert_fail_closed(minimum=50)

        # Connections of the surviving worker never noticed anything.
        for client in pinned[survivor]:
            outcomes = load.of(client)
            assert outcomes, "a surviving client made no requests"
            assert all(correct(p, o) for _, _, p, o in outcomes), [o for _, _, p, o in outcomes if not correct(p, o)]
        # Connections of the killed worker: right answers before the kill, at most a 503 for the calls it
        # took down, then right answers again on a new connection with the token prepared before (tries == 1).
        for client in pinned[victim]:
            outcomes = load.of(client)
            failed = [(s, e, o) for s, e, p, o in outcomes if not correct(p, o)]
            assert all(o.kind == "error" and o.tries == 1 for _, _, o in failed), failed
            assert all(e >= killed_at for _, e, _ in failed), "a request failed before the kill"
            assert len(failed) <= 2, failed
            assert outcomes[-1][3].tries == 1, outcomes[-1]
            assert correct(outcomes[-1][2], outcomes[-1][3]), outcomes[-1]
            assert client.prepare_count == 1, "the token had to be prepared again"
        assert all(correct(PROTECTED, o) for o in on_replacement), on_replacement

        # Only the killed worker was replaced; descriptors are back where they were.
        assert runner.workers() == {survivor, replacement}
        assert replacement not in (victim, survivor)
        assert asyncio.run(wait_fds(runner.pid, supervisor_fds)) == supervisor_fds
        assert asyncio.run(wait_fds(survivor, worker_fds[survivor])) == worker_fds[survivor]
        assert asyncio.run(wait_fds(replacement, worker_fds[victim])) <= worker_fds[victim]
        assert_clean_exit(runner)


async def readyz_probe(port: int, path: str, log: list[tuple[bool, int, bool]]) -> None:
    """One /readyz poll, logged with whether the socket file existed just before and just after it."""
    existed = os.path.exists(path)
    status = await http_get(port, "/readyz")
    log.append((existed, status, os.path.exists(path)))


class TestSocketDeletedProcess:
    def test_single_process_rebinds_and_keeps_connections(self, spawn_runner: SpawnRunner, sock_path: str) -> None:
        """`--workers 1`: a deleted socket is bound again within ~1 s, /readyz follows, old connections serve on."""
        port = free_port()
        runner = spawn_runner(sock_path, "--workers", "1", "--metrics-addr", f"127.0.0.1:{port}")
        runner.wait_ready(0)

        async def warm() -> None:
            async with FakeApisix(sock_path) as client:
                assert correct(PROTECTED, await request(client, PROTECTED))

        asyncio.run(warm())  # the event loop keeps a spare fd from its first accept on
        runner_fds = settled_fds(runner.pid)

        async def main() -> tuple[Ledger, Healthy, float, list[tuple[bool, int, bool]]]:
            ledger = Ledger()
            async with Healthy(sock_path, ledger) as healthy:
                established = await RawConn.open(sock_path)
                try:
                    token = await established.prepare()
                    readyz: list[tuple[bool, int, bool]] = []
                    assert await http_get(port, "/readyz") == 200
                    os.unlink(sock_path)
                    started = time.monotonic()
                    while True:
                        await readyz_probe(port, sock_path, readyz)
                        if os.path.exists(sock_path):
                            async with FakeApisix(sock_path) as fresh:
                                outcome = await request(fresh, PROTECTED)
                                ledger.record(PROTECTED, outcome)
                                if correct(PROTECTED, outcome):
                                    break
                        assert time.monotonic() - started < 10, "the runner did not serve again"
                        await asyncio.sleep(0.02)
                    served_after = time.monotonic() - started
                    await asyncio.sleep(0.1)
                    await readyz_probe(port, sock_path, readyz)
                    outcome = await established.decide(token, PROTECTED)
                    ledger.record(PROTECTED, outcome)
                    assert correct(PROTECTED, outcome), outcome
                finally:
                    established.close()
                await healthy.stop(at_least=20)
            return ledger, healthy, served_after, readyz

        ledger, healthy, served_after, readyz = asyncio.run(main())
        ledger.assert_fail_closed()
        healthy.assert_served(minimum=20)
        assert served_after < 1.0, served_after
        missing = [status for before, status, after in readyz if not before and not after]
        assert missing, "no /readyz poll happened while the socket file was missing"
        assert set(missing) == {503}, readyz
        assert readyz[-1] == (True, 200, True), readyz
        assert asyncio.run(wait_fds(runner.pid, runner_fds)) == runner_fds
        assert_clean_exit(runner)

    def test_workers_serve_again_at_the_same_path(self, spawn_runner: SpawnRunner, sock_path: str) -> None:
        """With --workers 2 the deleted socket is bound again at its path; /readyz never says ready without it."""
        port = free_port()
        runner = spawn_runner(sock_path, "--workers", "2", "--metrics-addr", f"127.0.0.1:{port}")
        workers = runner.wait_ready(2)
        asyncio.run(warm_up(runner, workers))
        supervisor_fds = settled_fds(runner.pid)
        worker_fds = max(settled_fds(pid) for pid in workers)

        async def main() -> tuple[Ledger, float, list[tuple[bool, int, bool]]]:
            ledger = Ledger()
            readyz: list[tuple[bool, int, bool]] = []
            assert await http_get(port, "/readyz") == 200
            inode = os.stat(sock_path).st_ino
            os.unlink(sock_path)
            started = time.monotonic()
            while True:  # poll readiness and try fresh connections until one is served
                await readyz_probe(port, sock_path, readyz)
                if os.path.exists(sock_path):
                    async with FakeApisix(sock_path) as fresh:
                        outcome = await request(fresh, PROTECTED)
                        ledger.record(PROTECTED, outcome)
                        if correct(PROTECTED, outcome):
                            break
                assert time.monotonic() - started < 10, "the runner did not serve again"
                await asyncio.sleep(0.02)
            served_after = time.monotonic() - started
            assert os.stat(sock_path).st_ino != inode
            async with FakeApisix(sock_path) as fresh:
                for probe in PROBES:
                    outcome = await request(fresh, probe)
                    ledger.record(probe, outcome)
                    assert correct(probe, outcome), (probe, outcome)
            await readyz_probe(port, sock_path, readyz)
            return ledger, served_after, readyz

        ledger, served_after, readyz = asyncio.run(main())
        ledger.assert_fail_closed()
        # Deleting the file is noticed within a tick; the workers are rolled onto the new socket.
        assert served_after < 3.0, served_after
        missing = [status for before, status, after in readyz if not before and not after]
        assert missing, "no /readyz poll happened while the socket file was missing"
        assert set(missing) == {503}, readyz
        assert readyz[-1] == (True, 200, True), readyz
        new_workers = runner.wait_ready(2)
        assert not new_workers & workers, "the workers serving the deleted socket were kept"
        assert asyncio.run(wait_fds(runner.pid, supervisor_fds)) == supervisor_fds
        for pid in new_workers:
            assert asyncio.run(wait_fds(pid, worker_fds)) <= worker_fds
        assert_clean_exit(runner)

    def test_workers_keep_existing_connections(self, spawn_runner: SpawnRunner, sock_path: str) -> None:
        """With --workers 2, connections established before the socket file is deleted keep answering."""
        runner = spawn_runner(sock_path, "--workers", "2")
        runner.wait_ready(2)

        async def main() -> tuple[Ledger, list[ApisixOutcome], list[ApisixOutcome]]:
            ledger = Ledger()
            established = [await RawConn.open(sock_path) for _ in range(4)]
            try:
                tokens = [await conn.prepare() for conn in established]
                load = Load(ledger)
                clients = [FakeApisix(sock_path, pool_size=1, timeout=5) for _ in range(4)]
                for i, client in enumerate(clients):
                    load.start(client, i)
                await asyncio.sleep(0.3)
                os.unlink(sock_path)
                deadline = time.monotonic() + 10
                while not os.path.exists(sock_path):
                    assert time.monotonic() < deadline, "the socket was not bound again"
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.3)
                await load.stop()
                for client in clients:
                    await client.close()
                after = []
                for conn, token in zip(established, tokens, strict=True):
                    try:
                        after.append(await conn.decide(token, PROTECTED))
                    except (OSError, EOFError):
                        after.append(ApisixOutcome("error"))
                return ledger, [o for *_, o in load.log], after
            finally:
                close_all(established)

        ledger, during, after = asyncio.run(main())
        ledger.assert_fail_closed()
        assert all(o.kind != "error" for o in during), [o for o in during if o.kind == "error"][:3]
        assert all(correct(PROTECTED, o) for o in after), after
        assert_clean_exit(runner)


class TestThousandConnectionsWorkers:
    def test_burst_of_thousand_connections(self, spawn_runner: SpawnRunner, sock_path: str) -> None:
        """1 000 connect() calls in one burst to --workers 2 are all accepted and served; worker fds return."""
        count = 1000
        raise_fd_limit(count + 512)
        runner = spawn_runner(sock_path, "--workers", "2")
        workers = runner.wait_ready(2)
        asyncio.run(warm_up(runner, workers))
        supervisor_fds = settled_fds(runner.pid)
        worker_fds = {pid: settled_fds(pid) for pid in workers}

        async def main() -> tuple[Ledger, Healthy, dict[int, int]]:
            ledger = Ledger()
            async with Healthy(sock_path, ledger) as healthy:
                token_conn = await RawConn.open(sock_path)
                try:
                    token = await token_conn.prepare()
                finally:
                    token_conn.close()
                conns: list[RawConn] = []
                try:
                    opened = await asyncio.gather(
                        *(RawConn.open(sock_path) for _ in range(count)), return_exceptions=True
                    )
                    conns = [c for c in opened if isinstance(c, RawConn)]
                    refused = [e for e in opened if not isinstance(e, RawConn)]
                    assert not refused, f"{len(refused)} of {count} connects refused: {refused[0]!r}"
                    outcomes = await asyncio.gather(
                        *(c.decide(token, PROBES[i % 4], call_id=i) for i, c in enumerate(conns))
                    )
                    for i, outcome in enumerate(outcomes):
                        ledger.record(PROBES[i % 4], outcome)
                        assert correct(PROBES[i % 4], outcome), outcome
                    peak = {pid: settled_fds(pid, samples=1) - worker_fds[pid] for pid in workers}
                finally:
                    close_all(conns)
                await healthy.stop(at_least=5)
            return ledger, healthy, peak

        ledger, healthy, peak = asyncio.run(main())
        healthy.assert_served(minimum=5)
        ledger.assert_fail_closed(minimum=count // 2)
        assert sum(peak.values()) >= count, peak  # every connection was held by a worker at once
        assert runner.workers() == workers
        assert asyncio.run(wait_fds(runner.pid, supervisor_fds)) == supervisor_fds
        for pid in workers:
            assert asyncio.run(wait_fds(pid, worker_fds[pid])) == worker_fds[pid]
        assert_clean_exit(runner)
