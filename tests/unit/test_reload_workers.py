"""A reload across worker processes (runner.process.workerreload), with the workers' ends in this process."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from runner import PluginRegistry
from runner.process.rundir import SETTINGS_FILE, read_settings, write_settings
from runner.process.workerlink import WorkerLink, answer_scrapes
from runner.process.workerreload import WorkerFanout, WorkerReloads
from runner.reload import Reloader
from runner.server import RunnerServer
from runner.settings import Settings, SettingsSource
from tests.plugins_for_tests import FileVerdict

pytestmark = pytest.mark.usefixtures("logging_restored")  # reloads reconfigure the logger


class Refusing(FileVerdict):
    """Starts, then refuses every reload, as a worker whose file read failed would."""

    def reconfigure(self, options: Mapping[str, Any]) -> Callable[[], None]:
        if self.commits:
            raise ValueError("refused here")
        return super().reconfigure(options)


class StubServer:
    def __init__(self) -> None:
        self.applied: list[Settings] = []

    def apply_settings(self, settings: Settings) -> None:
        self.applied.append(settings)


@pytest.fixture
def errors() -> Iterator[list[str]]:
    """The runner's error lines during the test."""
    seen: list[str] = []
    handler = logging.Handler(logging.ERROR)
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    child = logging.getLogger("mtls_guard.runner")
    child.addHandler(handler)
    yield seen
    child.removeHandler(handler)


class Cluster:
    """A supervisor's reloader and two workers' ends, joined by socketpairs."""

    def __init__(
        self, directory: Path, sock_path: str, worker_plugins: list[FileVerdict], *, workers: str = "answer"
    ) -> None:
        """``workers``: "answer", "silent" (alive, never answering) or "gone" (exited)."""
        self.verdict = directory / "verdict"
        self.verdict.write_text("allow")
        self.config = directory / "runner.yaml"
        self.write_config(log_level="warning")
        self.rundir = str(directory)
        source = SettingsSource(environ={"APISIX_LISTEN_ADDRESS": f"unix:{sock_path}"}, config_file=str(self.config))
        self.settings = source.load()
        write_settings(self.rundir, self.settings)
        self.own = FileVerdict()
        self.workers = worker_plugins
        for plugin in [self.own, *worker_plugins]:
            plugin.setup(self.settings.plugins["file-verdict"])
        self.servers = [StubServer() for _ in worker_plugins]
        self.mode = workers
        self.links: list[tuple[str, WorkerLink]] = []
        self.tasks: list[asyncio.Future[None]] = []
        self.reloader = Reloader(
            source,
            PluginRegistry([self.own]),
            self.settings,
            lambda settings: None,
            fanout=WorkerFanout(self.rundir, lambda: self.links, prepare_timeout=0.3),
        )
        self._ends: list[socket.socket] = []

    def write_config(self, **extra: Any) -> None:
        self.config.write_text(
            yaml.safe_dump({"plugins": {"file-verdict": {"verdict_file": str(self.verdict)}}, **extra})
        )

    def start(self) -> None:
        for index, (plugin, server) in enumerate(zip(self.workers, self.servers, strict=True)):
            ours, theirs = socket.socketpair()
            self._ends.append(theirs)
            if self.mode == "gone":
                theirs.close()
            elif self.mode == "answer":
                reloads = WorkerReloads(self.rundir, PluginRegistry([plugin]), cast(RunnerServer, server))
                self.tasks.append(asyncio.ensure_future(answer_scrapes(theirs, dict, reloads.handle)))
            self.links.append((f"worker={index}", WorkerLink(ours)))

    async def stop(self) -> None:
        for _, link in self.links:
            link.close()
        for task in self.tasks:
            await asyncio.wait_for(task, 1.0)
        for end in self._ends:
            if end.fileno() != -1:
                end.close()


def _run(cluster: Cluster, change: Callable[[], object]) -> bool:
    async def scenario() -> bool:
        cluster.start()
        try:
            change()
            return await cluster.reloader.reload("sighup")
        finally:
            await cluster.stop()

    return asyncio.run(scenario())


class TestWorkerReload:
    def test_valid_reload_reaches_every_worker(self, tmp_path: Path, sock_path: str, errors: list[str]) -> None:
        """Every worker and the supervisor commit, workers apply the settings, and restarted ones read them."""
        cluster = Cluster(tmp_path, sock_path, [FileVerdict(), FileVerdict()])

        def change() -> None:
            cluster.verdict.write_text("deny")
            cluster.write_config(log_level="error")

        assert _run(cluster, change) is True
        assert [p.allow for p in (cluster.own, *cluster.workers)] == [False, False, False]
        assert [[s.log_level for s in server.applied] for server in cluster.servers] == [["error"], ["error"]]
        assert read_settings(cluster.rundir).log_level == "error"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(SETTINGS_FILE)) == [SETTINGS_FILE]
        assert errors == []

    def test_one_refusing_worker_keeps_the_old_state_everywhere(
        self, tmp_path: Path, sock_path: str, errors: list[str]
    ) -> None:
        """A single worker's failure commits nothing in any process and is one error line naming it."""
        cluster = Cluster(tmp_path, sock_path, [FileVerdict(), Refusing()])
        before = Path(cluster.rundir, SETTINGS_FILE).read_text()
        assert _run(cluster, lambda: cluster.verdict.write_text("deny")) is False
        assert [p.allow for p in (cluster.own, *cluster.workers)] == [True, True, True]
        assert [server.applied for server in cluster.servers] == [[], []]
        assert Path(cluster.rundir, SETTINGS_FILE).read_text() == before
        assert len(errors) == 1
        assert "event=reload_failed" in errors[0]
        assert "worker=1: plugin 'file-verdict': refused here" in errors[0]

    def test_invalid_file_is_reported_once(self, tmp_path: Path, sock_path: str, errors: list[str]) -> None:
        """A file every process refuses gives one error line, not one per worker."""
        cluster = Cluster(tmp_path, sock_path, [FileVerdict(), FileVerdict()])
        assert _run(cluster, lambda: cluster.verdict.write_text("perhaps")) is False
        assert len(errors) == 1
        assert [p.commits for p in (cluster.own, *cluster.workers)] == [1, 1, 1]

    def test_reload_after_a_failed_one_reaches_every_worker(
        self, tmp_path: Path, sock_path: str, errors: list[str]
    ) -> None:
        """A refused reload does not make the workers ignore the next one (each attempt has its own number)."""
        cluster = Cluster(tmp_path, sock_path, [FileVerdict(), FileVerdict()])

        async def scenario() -> list[bool]:
            cluster.start()
            try:
                cluster.verdict.write_text("perhaps")
                refused = await cluster.reloader.reload("sighup")
                cluster.verdict.write_text("deny")
                return [refused, await cluster.reloader.reload("sighup")]
            finally:
                await cluster.stop()

        assert asyncio.run(scenario()) == [False, True]
        assert [p.allow for p in (cluster.own, *cluster.workers)] == [False, False, False]
        assert [len(server.applied) for server in cluster.servers] == [1, 1]
        assert len(errors) == 1

    def test_silent_worker_fails_the_reload(self, tmp_path: Path, sock_path: str, errors: list[str]) -> None:
        """A worker that does not answer in time fails the reload rather than being left behind."""
        cluster = Cluster(tmp_path, sock_path, [FileVerdict()], workers="silent")
        assert _run(cluster, lambda: cluster.verdict.write_text("deny")) is False
        assert "worker=0 did not answer within 0.3s" in errors[0]
        assert cluster.own.allow is True

    def test_exited_worker_does_not_hold_the_reload_up(self, tmp_path: Path, sock_path: str, errors: list[str]) -> None:
        """A worker that exited is skipped: it starts again from the settings file the reload publishes."""
        cluster = Cluster(tmp_path, sock_path, [FileVerdict()], workers="gone")

        def change() -> None:
            cluster.verdict.write_text("deny")
            cluster.write_config(log_level="error")

        assert _run(cluster, change) is True
        assert errors == []
        assert cluster.own.allow is False
        assert read_settings(cluster.rundir).log_level == "error"


class TestWorkerEnd:
    def test_abort_overtaking_a_build_drops_it(self, tmp_path: Path, sock_path: str) -> None:
        """A commit for a generation that was aborted (or never built) is refused."""
        settings = Settings(listen=sock_path, workers=1)
        write_settings(str(tmp_path), settings)
        (tmp_path / "settings.json.next").write_text((tmp_path / SETTINGS_FILE).read_text())
        server = StubServer()
        reloads = WorkerReloads(str(tmp_path), PluginRegistry(), cast(RunnerServer, server))

        async def scenario() -> list[dict[str, Any]]:
            aborted = await reloads.handle({"op": "abort", "attempt": 1})
            prepared = await reloads.handle({"op": "prepare", "attempt": 1})
            return [aborted, prepared, await reloads.handle({"op": "commit", "attempt": 1})]

        assert asyncio.run(scenario()) == [{"ok": True}, {"ok": True}, {"error": "nothing built for attempt 1"}]
        assert server.applied == []
