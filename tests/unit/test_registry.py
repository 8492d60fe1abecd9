"""PluginRegistry: explicit registration that refuses anything ambiguous, and entry-point discovery."""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from importlib.metadata import EntryPoint
from typing import Any

import pytest

import runner.registry
from runner import BasePlugin, HTTPRequest, PluginRegistry, Stop
from runner.registry import ENTRY_POINT_GROUP, RegistryError
from tests.plugins_for_tests import Echo, StrictJson


def named(name: Any) -> BasePlugin[str]:
    plugin: BasePlugin[str] = BasePlugin()
    plugin.name = name
    return plugin


class SyncFilter:
    name = "sync"

    def setup(self, options: Mapping[str, Any]) -> None:
        return None

    def parse_conf(self, value: str) -> str:
        return value

    def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        return None

    async def on_response(self, conf: str, response: object) -> None:
        return None


class NoParse:
    name = "no-parse"

    def setup(self, options: Mapping[str, Any]) -> None:
        return None

    async def on_request(self, conf: str, request: HTTPRequest) -> Stop | None:
        return None

    async def on_response(self, conf: str, response: object) -> None:
        return None


def fake_entry_points(monkeypatch: pytest.MonkeyPatch, *eps: EntryPoint) -> list[str]:
    groups: list[str] = []

    def entry_points(*, group: str) -> tuple[EntryPoint, ...]:
        groups.append(group)
        return tuple(ep for ep in eps if ep.group == group)

    monkeypatch.setattr(runner.registry, "entry_points", entry_points)
    return groups


def ep(name: str, value: str) -> EntryPoint:
    return EntryPoint(name=name, value=value, group=ENTRY_POINT_GROUP)


# Targets for the fake entry points below.
echo_instance = Echo()
echo_class = Echo
wrong_name = StrictJson()
not_a_plugin = object()


def echo_factory() -> Echo:
    return Echo()


class TestRegister:
    def test_registers_in_order(self) -> None:
        """Registered plugins are found by name and listed in registration order."""
        echo, strict = Echo(), StrictJson()
        registry = PluginRegistry([echo, strict])

        assert registry.get("echo") is echo
        assert registry.get("strict-json") is strict
        assert registry.get("missing") is None
        assert registry.names == ("echo", "strict-json")
        assert list(registry) == [echo, strict]
        assert len(registry) == 2

    def test_duplicate_name_rejected(self) -> None:
        """Two plugins with one name would make the conf ambiguous."""
        registry = PluginRegistry([Echo()])

        with pytest.raises(RegistryError, match="'echo' is registered twice"):
            registry.register(Echo())
        assert len(registry) == 1

    @pytest.mark.parametrize("name", ["", "x" * 129, None, 5])
    def test_bad_names_rejected(self, name: Any) -> None:
        """Names must be strings of 1..128 characters (APISIX's conf schema limit)."""
        with pytest.raises(RegistryError, match=r"1\.\.128"):
            PluginRegistry([named(name)])

    def test_longest_allowed_name(self) -> None:
        """A 128-character name is still valid."""
        registry = PluginRegistry([named("x" * 128)])

        assert registry.names == ("x" * 128,)

    def test_non_async_filter_rejected(self) -> None:
        """A plain function filter would return a value, not a coroutine: refused at start."""
        with pytest.raises(RegistryError, match=r"on_request\(\) must be an async function"):
            PluginRegistry([SyncFilter()])  # type: ignore[list-item]

    def test_missing_parse_conf_rejected(self) -> None:
        """Every contract method must exist."""
        with pytest.raises(RegistryError, match=r"no parse_conf\(\)"):
            PluginRegistry([NoParse()])  # type: ignore[list-item]


class TestDiscover:
    def test_fake_entry_point_instance(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An entry point naming a plugin instance is registered under its name."""
        groups = fake_entry_points(monkeypatch, ep("echo", f"{__name__}:echo_instance"))
        registry = PluginRegistry.discover()

        assert groups == [ENTRY_POINT_GROUP]
        assert registry.get("echo") is echo_instance

    @pytest.mark.parametrize("target", ["echo_class", "echo_factory"])
    def test_fake_entry_point_class_or_factory(self, monkeypatch: pytest.MonkeyPatch, target: str) -> None:
        """A class or zero-argument factory is called to get the instance."""
        fake_entry_points(monkeypatch, ep("echo", f"{__name__}:{target}"))
        plugin = PluginRegistry.discover().get("echo")

        assert isinstance(plugin, Echo)
        assert plugin is not echo_instance

    def test_entry_point_name_must_match_plugin_name(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An entry point whose name differs from the plugin's is a start-up error."""
        fake_entry_points(monkeypatch, ep("echo", f"{__name__}:wrong_name"))

        with pytest.raises(RegistryError, match="names must match"):
            PluginRegistry.discover()

    def test_broken_entry_point_is_a_startup_error(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An entry point that cannot be imported stops the runner instead of silently missing."""
        fake_entry_points(monkeypatch, ep("ghost", "no_such_module_xyz:plugin"))

        with pytest.raises(RegistryError, match="cannot load plugin entry point 'ghost'"):
            PluginRegistry.discover()

    def test_entry_point_without_contract_rejected(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """An entry point that loads something which is not a plugin is refused."""
        fake_entry_points(monkeypatch, ep("thing", f"{__name__}:not_a_plugin"))

        with pytest.raises(RegistryError):
            PluginRegistry.discover()

    def test_discovery_is_sorted_by_name(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """Discovery order does not depend on installation order."""
        fake_entry_points(
            monkeypatch,
            ep("strict-json", "tests.plugins_for_tests:StrictJson"),
            ep("echo", "tests.plugins_for_tests:Echo"),
        )

        assert PluginRegistry.discover().names == ("echo", "strict-json")

    def test_installed_mtls_guard_entry_point(self) -> None:
        """The project's own `mtls-guard` entry point is installed and loads as a plugin."""
        module = importlib.import_module("plugins.mtls_guard")
        if not hasattr(module, "plugin"):
            pytest.skip("plugins.mtls_guard does not expose `plugin` yet (adapter not landed)")
        registry = PluginRegistry.discover()

        assert "mtls-guard" in registry.names
