"""Live reload in one process: what applies live, the two phases, conf generations, and a served runner."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import yaml

from runner import PluginRegistry, Reconfigurable
from runner.process.cpus import usable_cpus
from runner.protocol import codec
from runner.protocol.messages import RPCType
from runner.registry import RegistryError
from runner.reload import Reloader, ReloadError, build, plan
from runner.server import RunnerServer
from runner.settings import Settings, SettingsSource
from runner.testing import FakeApisix, conf, http_req_call_frame
from tests.plugins_for_tests import FileVerdict, FixedOptions

pytestmark = pytest.mark.usefixtures("logging_restored")  # reloads reconfigure the logger


class OtherVerdict(FileVerdict):
    name = "other-verdict"


class Lines(logging.Handler):
    """The runner's log lines. Attached to ``mtls_guard.runner``: a reload replaces the handlers of
    ``mtls_guard`` itself (runner.logs), which would drop a handler there."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.levelname} {record.getMessage()}")

    def having(self, text: str) -> list[str]:
        return [line for line in self.lines if text in line]


@pytest.fixture
def lines() -> Iterator[Lines]:
    """The runner's log lines during the test."""
    handler = Lines()
    child = logging.getLogger("mtls_guard.runner")
    child.addHandler(handler)
    yield handler
    child.removeHandler(handler)


def write_config(path: Path, verdict: Path, **extra: Any) -> None:
    data = {"plugins": {"file-verdict": {"verdict_file": str(verdict)}}, **extra}
    path.write_text(yaml.safe_dump(data))


class Setup:
    """A config file naming a verdict file, the registry, and how to load the settings."""

    def __init__(self, directory: Path, sock_path: str, verdict: str = "allow") -> None:
        self.sock_path = sock_path
        self.verdict = directory / "verdict"
        self.verdict.write_text(verdict)
        self.config = directory / "runner.yaml"
        write_config(self.config, self.verdict)
        self.source = SettingsSource(
            environ={"APISIX_LISTEN_ADDRESS": f"unix:{sock_path}"}, config_file=str(self.config)
        )
        self.plugin = FileVerdict()
        self.registry = PluginRegistry([self.plugin, FixedOptions()])
        self.settings = self.source.load()
        for plugin in self.registry:
            plugin.setup(self.settings.plugins.get(plugin.name, {}))


@pytest.fixture
def setup(sock_dir: Path, sock_path: str) -> Setup:
    return Setup(sock_dir, sock_path)


@contextlib.asynccontextmanager
async def serving(setup: Setup) -> AsyncIterator[tuple[RunnerServer, Reloader]]:
    server = RunnerServer(setup.settings, setup.registry)
    await server.start()
    task = asyncio.ensure_future(server.serve())
    try:
        yield server, Reloader(setup.source, setup.registry, setup.settings, server.apply_settings)
    finally:
        server.stop()
        await task


VERDICT = conf(("file-verdict", "plain"))


class TestPlan:
    def test_restart_only_settings_are_kept_and_listed(self, sock_path: str) -> None:
        """Socket mode and frame limit stay as they run and are listed; log level and timeouts apply."""
        current = Settings(listen=sock_path, workers=1)
        new = replace(current, socket_mode=0o700, max_frame_bytes=4096, log_level="debug", call_timeout=3.0)
        planned = plan(PluginRegistry([FileVerdict()]), current, new)
        assert planned.restart_needed == ("socket_mode", "max_frame_bytes")
        assert (planned.settings.socket_mode, planned.settings.max_frame_bytes) == (0o766, current.max_frame_bytes)
        assert (planned.settings.log_level, planned.settings.call_timeout) == ("debug", 3.0)

    def test_plugin_without_reconfigure_keeps_its_options(self, sock_path: str) -> None:
        """Changed options of a plugin without reconfigure are listed as needing a restart and not passed on."""
        registry = PluginRegistry([FileVerdict(), FixedOptions()])
        current = Settings(listen=sock_path, workers=1, plugins={"fixed-options": {"a": 1}})
        new = replace(current, plugins={"fixed-options": {"a": 2}, "file-verdict": {"x": 1}})
        planned = plan(registry, current, new)
        assert planned.restart_needed == ("plugins.fixed-options",)
        assert planned.settings.plugins == {"fixed-options": {"a": 1}, "file-verdict": {"x": 1}}

    def test_new_section_for_a_plugin_without_reconfigure_is_left_out(self, sock_path: str) -> None:
        """A section added for a plugin that cannot take it live is listed and not passed on."""
        current = Settings(listen=sock_path, workers=1)
        planned = plan(PluginRegistry([FixedOptions()]), current, replace(current, plugins={"fixed-options": {"a": 1}}))
        assert planned.restart_needed == ("plugins.fixed-options",)
        assert planned.settings.plugins == {}

    def test_unknown_plugin_section_is_refused(self, sock_path: str) -> None:
        """A section naming no installed plugin (a typo) refuses the reload, as it refuses a start."""
        current = Settings(listen=sock_path, workers=1)
        with pytest.raises(ReloadError, match="unknown plugin"):
            plan(PluginRegistry([FileVerdict()]), current, replace(current, plugins={"file-verdikt": {}}))

    def test_more_workers_than_cpus_needs_no_restart(self, sock_path: str) -> None:
        """A worker count capped to the usable CPUs, as at start-up, is not a change."""
        current = Settings(listen=sock_path, workers=usable_cpus())
        assert plan(PluginRegistry(), current, replace(current, workers=64)).restart_needed == ()


class TestContract:
    def test_async_reconfigure_is_refused_at_registration(self) -> None:
        """reconfigure runs in a helper thread, so a coroutine function is refused when the plugin registers."""

        class AsyncReconfigure(FileVerdict):
            async def reconfigure(self, options: Any) -> Any:  # type: ignore[override]
                return None

        with pytest.raises(RegistryError, match="reconfigure"):
            PluginRegistry([AsyncReconfigure()])

    def test_base_plugin_has_no_reconfigure(self) -> None:
        """A BasePlugin subclass without its own reconfigure is not reloadable: its options need a restart."""
        assert not isinstance(FixedOptions(), Reconfigurable)
        assert isinstance(FileVerdict(), Reconfigurable)


class TestBuild:
    def test_commit_installs_every_plugin_state(self, tmp_path: Path, sock_path: str) -> None:
        """Nothing changes until the returned commit runs; then every plugin has its new state."""
        first, second = FileVerdict(), OtherVerdict()
        (tmp_path / "deny").write_text("deny")
        options = {"verdict_file": str(tmp_path / "deny")}
        settings = Settings(listen=sock_path, workers=1, plugins={"file-verdict": options, "other-verdict": options})
        commit = build(PluginRegistry([first, second]), settings)
        assert (first.allow, second.allow) == (True, True)
        commit()
        assert (first.allow, second.allow) == (False, False)

    def test_one_failing_plugin_commits_nothing(self, tmp_path: Path, sock_path: str) -> None:
        """A plugin refusing its file makes the whole build fail, naming it; the other keeps its state."""
        first, second = FileVerdict(), OtherVerdict()
        (tmp_path / "deny").write_text("deny")
        (tmp_path / "bad").write_text("perhaps")
        plugins = {
            "file-verdict": {"verdict_file": str(tmp_path / "deny")},
            "other-verdict": {"verdict_file": str(tmp_path / "bad")},
        }
        with pytest.raises(ReloadError, match=r"plugin 'other-verdict': verdict file .*bad"):
            build(PluginRegistry([first, second]), Settings(listen=sock_path, workers=1, plugins=plugins))
        assert (first.allow, first.commits) == (True, 0)

    def test_unusable_log_file_is_refused(self, tmp_path: Path, sock_path: str) -> None:
        """A log file that cannot be opened fails the build instead of losing the log at commit."""
        settings = Settings(listen=sock_path, workers=1, log_file=str(tmp_path / "missing" / "x.log"))
        with pytest.raises(ReloadError, match="log_file"):
            build(PluginRegistry(), settings)


class TestReloadServed:
    def test_valid_reload_changes_decisions_on_the_same_token(self, setup: Setup, lines: Lines) -> None:
        """After a reload the same token decides by the new file, without APISIX re-preparing it."""

        async def scenario() -> list[Any]:
            async with serving(setup) as (_, reloader), FakeApisix(setup.sock_path) as apisix:
                before = await apisix.request(VERDICT)
                setup.verdict.write_text("deny")
                ok = await reloader.reload("test")
                after = await apisix.request(VERDICT)
                return [
                    before.kind,
                    ok,
                    after.kind,
                    after.client_status,
                    after.tries,
                    apisix.prepare_count,
                    reloader.stats.generation,
                ]

        assert asyncio.run(scenario()) == ["pass", True, "stop", 403, 1, 1, 1]
        assert len(lines.having("event=reloaded generation=1 trigger=test")) == 1

    def test_invalid_file_keeps_the_old_state(self, setup: Setup, lines: Lines) -> None:
        """A verdict file the plugin refuses changes nothing; one error line names the plugin and the file."""

        async def scenario() -> list[Any]:
            async with serving(setup) as (_, reloader), FakeApisix(setup.sock_path) as apisix:
                setup.verdict.write_text("perhaps")
                ok = await reloader.reload("sighup")
                outcome = await apisix.request(VERDICT)
                return [ok, outcome.kind, reloader.stats.failed, reloader.stats.ok, setup.plugin.commits]

        assert asyncio.run(scenario()) == [False, "pass", 1, 0, 1]
        (line,) = lines.having("event=reload_failed")
        assert line.startswith("ERROR ")
        assert "plugin 'file-verdict'" in line
        assert str(setup.verdict) in line

    def test_broken_config_file_keeps_everything(self, setup: Setup, lines: Lines) -> None:
        """A config file that is not valid YAML fails the reload in one line naming the file."""

        async def scenario() -> bool:
            async with serving(setup) as (_, reloader):
                setup.config.write_text("plugins: [unclosed")
                return await reloader.reload("sighup")

        assert asyncio.run(scenario()) is False
        (line,) = lines.having("event=reload_failed")
        assert str(setup.config) in line
        assert "invalid YAML" in line

    def test_call_in_flight_finishes_with_the_state_it_started_with(self, setup: Setup, sock_path: str) -> None:
        """A call waiting for an ExtraInfo answer while a reload commits still gets the old decision."""
        entries = conf(("file-verdict", "var:host"))

        async def scenario() -> list[Any]:
            async with serving(setup) as (_, reloader), FakeApisix(sock_path) as apisix:
                token = await apisix.prepare(entries, "route#1")
                reader, writer = await asyncio.open_unix_connection(sock_path)
                decoder = codec.FrameDecoder()
                writer.write(http_req_call_frame(id=7, conf_token=token))
                query = await _next_frame(reader, decoder)
                setup.verdict.write_text("deny")
                ok = await reloader.reload("test")
                writer.write(codec.extra_info_result_frame(b"a.test"))
                reply = await _next_frame(reader, decoder)
                writer.close()
                later = await apisix.request(entries, key="route#1")
                action = codec.decode_http_req_call_reply(reply.payload).action
                return [query.type, ok, reply.type, action, later.client_status]

        assert asyncio.run(scenario()) == [RPCType.EXTRA_INFO, True, RPCType.HTTP_REQ_CALL, None, 403]

    def test_live_settings_apply_and_the_rest_is_listed_once(self, setup: Setup, lines: Lines) -> None:
        """Timeouts, limits and log level apply at once; event_loop and socket_mode need a restart, said in one line."""
        changes = {
            "call_timeout": 3,
            "max_conf_entries": 10,
            "log_level": "info",
            "socket_mode": "0700",
            "event_loop": "asyncio",
        }

        async def scenario() -> list[Any]:
            async with serving(setup) as (server, reloader):
                write_config(setup.config, setup.verdict, **changes)
                ok = await reloader.reload("sighup")
                settings = server.settings
                return [
                    ok,
                    server.session_config.call_timeout,
                    settings.max_conf_entries,
                    settings.socket_mode,
                    settings.event_loop,
                ]

        assert asyncio.run(scenario()) == [True, 3.0, 10, setup.settings.socket_mode, setup.settings.event_loop]
        assert logging.getLogger("mtls_guard").level == logging.INFO
        (line,) = lines.having("event=reload_restart_needed")
        assert line == "WARNING event=reload_restart_needed settings=event_loop,socket_mode"

    def test_command_line_options_keep_precedence(self, setup: Setup, lines: Lines) -> None:
        """An option given on the command line at start wins over the reloaded file, as it did at start."""
        setup.source = replace(setup.source, overrides={"call_timeout": 7.0})
        setup.settings = setup.source.load()

        async def scenario() -> list[Any]:
            async with serving(setup) as (server, reloader):
                write_config(setup.config, setup.verdict, call_timeout=2, idle_timeout=0)
                ok = await reloader.reload("sighup")
                return [ok, server.session_config.call_timeout, server.settings.idle_timeout]

        assert asyncio.run(scenario()) == [True, 7.0, 0.0]
        assert lines.having("event=reload_restart_needed") == []

    def test_conf_that_no_longer_compiles_is_refused_until_a_reload_fixes_it(self, setup: Setup, lines: Lines) -> None:
        """A route conf the reloaded plugin rejects answers 503 without re-prepare; reloading back serves it."""
        entries = conf(("file-verdict", "only-while-allowing"))

        async def scenario() -> list[Any]:
            async with serving(setup) as (_, reloader), FakeApisix(setup.sock_path) as apisix:
                kinds = [(await apisix.request(entries)).kind]
                setup.verdict.write_text("deny")
                await reloader.reload("test")
                for _ in range(2):
                    outcome = await apisix.request(entries)
                    kinds.append(f"{outcome.kind}:{outcome.error and outcome.error.name}:{outcome.tries}")
                setup.verdict.write_text("allow")
                await reloader.reload("test")
                kinds.append((await apisix.request(entries)).kind)
                return kinds

        assert asyncio.run(scenario()) == ["pass", "error:SERVICE_UNAVAILABLE:1", "error:SERVICE_UNAVAILABLE:1", "pass"]
        assert len(lines.having("no longer compiles after a reload")) == 2  # one line per refused call

    def test_requests_during_a_reload_make_one_more(self, setup: Setup) -> None:
        """Requests arriving while a reload runs coalesce into exactly one further reload."""

        async def scenario() -> int:
            async with serving(setup) as (_, reloader):
                runner = asyncio.ensure_future(reloader.run())
                reloader.request("sighup")
                while not reloader.busy:
                    await asyncio.sleep(0)
                for _ in range(4):
                    reloader.request("sighup")
                while reloader.stats.ok < 2:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.2)
                runner.cancel()
                return reloader.stats.ok

        assert asyncio.run(scenario()) == 2


async def _next_frame(reader: asyncio.StreamReader, decoder: codec.FrameDecoder) -> Any:
    frame = decoder.next_frame()
    while frame is None:
        data = await asyncio.wait_for(reader.read(1 << 16), 5)
        assert data, "runner closed the connection"
        decoder.feed(data)
        frame = decoder.next_frame()
    return frame
