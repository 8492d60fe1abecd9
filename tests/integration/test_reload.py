"""`mtls-guard run` reloading live: SIGHUP and the file watch, single process and with workers, under load.

The runner loads the test plugin ``file-verdict`` (tests/plugins_for_tests.py) through an entry point
of a throw-away distribution on PYTHONPATH: routes pass while its file says ``allow`` and get 403
once it says ``deny``.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner.protocol.messages import ConfEntry, Pairs
from runner.testing import FakeApisix, conf
from tests.integration.test_process import Runner, Spawn, apisix_env, wait_ready
from tests.integration.test_process import spawn as spawn  # noqa: PLC0414 - the fixture, shared
from tests.integration.test_workers import _free_port, _wait_for_workers

ENTRIES = conf(("file-verdict", "var:host"))  # one ExtraInfo round trip: calls are in flight across commits
KEY = "route#1#ext-plugin-pre-req#1"
HOST_VARS = {"host": "a.test"}
# The longest a reload may take from SIGHUP to its log line, which comes once every process committed:
# the only time in which answers may still be the old ones.
TRANSITION = 2.0


def _plugin_path(directory: Path) -> str:
    """A directory whose only content is a distribution declaring the test plugins' entry points."""
    root = directory / "entry-points"
    dist = root / "reload_test_plugins-0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: reload-test-plugins\nVersion: 0\n")
    (dist / "entry_points.txt").write_text(
        "[apisix_mtls_guard.plugins]\n"
        "file-verdict = tests.plugins_for_tests:FileVerdict\n"
        "fixed-options = tests.plugins_for_tests:FixedOptions\n"
    )
    return str(root)


@dataclass
class Deployment:
    directory: Path
    sock_path: str
    workers: int
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.verdict = self.directory / "verdict"
        self.verdict.write_text("allow")
        self.config = self.directory / "runner.yaml"
        self.write_config()
        self.port = _free_port()

    def write_config(self, **changes: Any) -> None:
        data = {
            "log_level": "warning",
            "plugins": {"file-verdict": {"verdict_file": "verdict"}, "fixed-options": {"a": 1}},
            **self.extra,
            **changes,
        }
        self.config.write_text(yaml.safe_dump(data))

    def start(self, spawn: Spawn, *, wait: bool = True) -> Runner:
        env = apisix_env(self.sock_path, PYTHONPATH=_plugin_path(self.directory))
        args = [
            "--config",
            str(self.config),
            "--workers",
            str(self.workers),
            "--metrics-addr",
            f"127.0.0.1:{self.port}",
        ]
        runner = spawn(env, *args)
        if wait:
            wait_ready(runner, self.sock_path)
            if self.workers > 1:
                _wait_for_workers(runner, self.workers)
        return runner

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=5) as response:
            return str(response.read().decode())


@pytest.fixture(params=[1, 2], ids=["single-process", "two-workers"])
def deployment(request: pytest.FixtureRequest, sock_dir: Path, sock_path: str) -> Deployment:
    return Deployment(sock_dir, sock_path, request.param)


def _lines(runner: Runner, event: str) -> list[str]:
    return [line for line in (runner.stdout + runner.stderr).splitlines() if f"event={event}" in line]


async def wait_for_line(runner: Runner, event: str, count: int = 1, timeout: float = 10.0) -> float:
    """Wait until ``event`` was logged ``count`` times; returns when it was seen."""
    deadline = time.monotonic() + timeout
    while len(_lines(runner, event)) < count:
        assert time.monotonic() < deadline, f"no {event} line: {runner.stdout}{runner.stderr}"
        assert runner.proc.poll() is None, f"runner exited: {runner.stdout}{runner.stderr}"
        await asyncio.sleep(0.01)
    return time.monotonic()


@dataclass(frozen=True)
class Answer:
    started: float
    ended: float
    outcome: str  # "allow", "deny" or what went wrong


async def load(
    path: str,
    connections: int,
    stop: asyncio.Event,
    entries: tuple[ConfEntry, ...] = ENTRIES,
    vars: Mapping[str, str | None] = HOST_VARS,
    headers: Pairs = (),
) -> list[list[Answer]]:
    """APISIX-like steady load: one token, then requests on ``connections`` pooled connections until ``stop``."""
    first = FakeApisix(path, vars=vars)
    token = await first.prepare(entries, KEY)
    fakes = [first] + [FakeApisix(path, vars=vars) for _ in range(connections - 1)]
    for fake in fakes:
        fake._tokens[KEY] = token  # what APISIX's shared dict does

    async def drive(fake: FakeApisix) -> list[Answer]:
        answers = []
        while not stop.is_set():
            started = time.monotonic()
            outcome = await fake.request(entries, key=KEY, headers=headers)
            if outcome.tries != 1 or outcome.kind not in ("pass", "rewrite", "stop"):
                verdict = f"{outcome.kind}:{outcome.error}:{outcome.tries}"
            elif outcome.kind != "stop":  # passed, with or without a Rewrite
                verdict = "allow"
            else:
                verdict = "deny" if outcome.client_status == 403 else f"status {outcome.client_status}"
            answers.append(Answer(started, time.monotonic(), verdict))
        return answers

    try:
        return list(await asyncio.gather(*(drive(f) for f in fakes)))
    finally:
        for fake in fakes:
            await fake.close()


def assert_switched_once(per_connection: list[list[Answer]], signalled: float, reloaded: float) -> None:
    """Every call answered allow or deny (nothing failed), each connection switched from allow to deny
    exactly once, nothing finished before the signal was denied and nothing started after the reload
    line was allowed."""
    answers = [a for connection in per_connection for a in connection]
    assert len(answers) > 200
    assert {a.outcome for a in answers} == {"allow", "deny"}, "a call failed or was answered wrongly"
    for connection in per_connection:
        outcomes = [a.outcome for a in connection]
        assert "deny" in outcomes
        switch = outcomes.index("deny")
        assert outcomes == ["allow"] * switch + ["deny"] * (len(outcomes) - switch)
    assert all(a.outcome == "allow" for a in answers if a.ended < signalled)
    assert all(a.outcome == "deny" for a in answers if a.started > reloaded)


class TestUnderLoad:
    @pytest.mark.slow
    def test_sighup_switches_every_connection_once_without_errors(self, spawn: Spawn, deployment: Deployment) -> None:
        """Under steady load, SIGHUP after allow -> deny moves every connection from allow to deny exactly
        once with no failed call; a later invalid file keeps denying, logged in one line."""
        runner = deployment.start(spawn)

        async def scenario() -> tuple[list[list[Answer]], float, float]:
            stop = asyncio.Event()
            running = asyncio.ensure_future(load(deployment.sock_path, 8, stop))
            await asyncio.sleep(0.5)
            deployment.verdict.write_text("deny")
            signalled = time.monotonic()
            runner.proc.send_signal(signal.SIGHUP)
            reloaded = await wait_for_line(runner, "reloaded")
            await asyncio.sleep(0.5)
            deployment.verdict.write_text("perhaps")
            runner.proc.send_signal(signal.SIGHUP)
            await wait_for_line(runner, "reload_failed")
            await asyncio.sleep(0.5)
            stop.set()
            return await running, signalled, reloaded

        per_connection, signalled, reloaded = asyncio.run(scenario())
        assert_switched_once(per_connection, signalled, reloaded)
        assert reloaded - signalled < TRANSITION
        assert len(_lines(runner, "reload_failed")) == 1, "one line, not one per worker"
        assert "verdict file" in _lines(runner, "reload_failed")[0]
        text = deployment.metrics()
        assert 'mtls_guard_reloads_total{result="ok"} 1.0' in text
        assert 'mtls_guard_reloads_total{result="failed"} 1.0' in text
        assert "mtls_guard_config_generation 1.0" in text
        runner.proc.send_signal(signal.SIGTERM)
        assert runner.wait(5) == 0


def _catches_sighup(pid: int) -> bool:
    """Whether the process has a handler for SIGHUP (bit 0 of SigCgt in /proc/PID/status)."""
    match = re.search(r"SigCgt:\s*([0-9a-f]+)", Path(f"/proc/{pid}/status").read_text())
    return match is not None and bool(int(match.group(1), 16) & 1)


async def _verdict(path: str) -> str:
    async with FakeApisix(path, vars={"host": "a.test"}) as apisix:
        outcome = await apisix.request(ENTRIES, key=KEY)
    return "allow" if outcome.kind == "pass" else f"{outcome.kind}:{outcome.client_status}"


class TestSignals:
    def test_sighup_during_startup_is_not_fatal_and_applies(self, spawn: Spawn, deployment: Deployment) -> None:
        """SIGHUPs while the runner starts neither kill it nor get lost: once serving it decides by the new file."""
        runner = deployment.start(spawn, wait=False)
        deadline = time.monotonic() + 10
        while not _catches_sighup(runner.proc.pid):  # before that, SIGHUP's default action would end it
            assert time.monotonic() < deadline, runner.stdout + runner.stderr
            assert runner.proc.poll() is None, runner.stdout + runner.stderr
            time.sleep(0.002)
        deployment.verdict.write_text("deny")  # start-up may or may not read it: a reload is sure to
        for _ in range(3):
            runner.proc.send_signal(signal.SIGHUP)
        assert not os.path.exists(deployment.sock_path), "the signals were meant to arrive during start-up"
        wait_ready(runner, deployment.sock_path)
        asyncio.run(wait_for_line(runner, "reloaded"))
        assert asyncio.run(_verdict(deployment.sock_path)) == "stop:403"
        assert _lines(runner, "reload_failed") == []
        runner.proc.send_signal(signal.SIGTERM)
        assert runner.wait(5) == 0

    def test_repeated_sighups_coalesce(self, spawn: Spawn, deployment: Deployment) -> None:
        """A burst of SIGHUPs gives a few reloads, not a queue of twenty, and the runner keeps serving."""
        runner = deployment.start(spawn)
        deployment.verdict.write_text("deny")
        for _ in range(20):
            runner.proc.send_signal(signal.SIGHUP)
        asyncio.run(wait_for_line(runner, "reloaded"))
        time.sleep(0.5)
        assert 1 <= len(_lines(runner, "reloaded")) < 20
        assert asyncio.run(_verdict(deployment.sock_path)) == "stop:403"
        assert runner.proc.poll() is None

    def test_settings_that_need_a_restart_are_listed_and_the_rest_applies(
        self, spawn: Spawn, deployment: Deployment
    ) -> None:
        """Changed socket_mode and options of a plugin without reconfigure: one warning line; the rest applies."""
        runner = deployment.start(spawn)
        deployment.write_config(
            socket_mode="0700", plugins={"file-verdict": {"verdict_file": "verdict"}, "fixed-options": {"a": 2}}
        )
        deployment.verdict.write_text("deny")
        runner.proc.send_signal(signal.SIGHUP)
        asyncio.run(wait_for_line(runner, "reloaded"))
        lines = _lines(runner, "reload_restart_needed")
        assert len(lines) == 1, runner.stdout + runner.stderr
        assert lines[0].endswith("event=reload_restart_needed settings=socket_mode,plugins.fixed-options")
        assert asyncio.run(_verdict(deployment.sock_path)) == "stop:403"
        assert oct(os.stat(deployment.sock_path).st_mode & 0o777) == "0o766"


class TestWatch:
    def test_changed_file_reloads_without_a_signal(self, spawn: Spawn, sock_dir: Path, sock_path: str) -> None:
        """With reload_watch_seconds, writing the verdict file is enough: the runner reloads by itself."""
        deployment = Deployment(sock_dir, sock_path, 2, extra={"reload_watch_seconds": 0.2})
        runner = deployment.start(spawn)
        assert asyncio.run(_verdict(sock_path)) == "allow"
        deployment.verdict.write_text("deny")
        asyncio.run(wait_for_line(runner, "reloaded"))
        assert "trigger=watch" in _lines(runner, "reloaded")[0]
        assert asyncio.run(_verdict(sock_path)) == "stop:403"
