"""Explicit plugin registration, plus discovery through a Python entry-point group.

Third-party plugins become available with ``pip install``: a distribution declares, e.g.::

    [project.entry-points."apisix_mtls_guard.plugins"]
    my-plugin = "my_package.module:plugin"

where ``plugin`` is a plugin instance or a zero-argument class/factory returning one. A plugin can
also add subcommands to the ``mtls-guard`` command through a second group (loaded by runner/cli.py)::

    [project.entry-points."apisix_mtls_guard.commands"]
    my-plugin = "my_package.cli:register"

where ``register(subparsers)`` adds its commands to argparse's subparsers action.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Iterator
from importlib.metadata import entry_points
from typing import Any, cast

from .plugin import Plugin

__all__ = ["COMMANDS_ENTRY_POINT_GROUP", "ENTRY_POINT_GROUP", "PluginRegistry", "RegistryError"]

ENTRY_POINT_GROUP = "apisix_mtls_guard.plugins"
COMMANDS_ENTRY_POINT_GROUP = "apisix_mtls_guard.commands"
# APISIX's ext-plugin schema limits conf names to 1..128 characters.
_MAX_NAME = 128


class RegistryError(ValueError):
    """A plugin cannot be registered (bad name, duplicate, missing methods, failed import)."""


class PluginRegistry:
    """Name -> plugin. Registration is explicit and refuses anything ambiguous."""

    def __init__(self, plugins: Iterable[Plugin[Any]] = ()) -> None:
        self._plugins: dict[str, Plugin[Any]] = {}
        for plugin in plugins:
            self.register(plugin)

    def register(self, plugin: Plugin[Any]) -> None:
        name = getattr(plugin, "name", None)
        if not isinstance(name, str) or not 1 <= len(name) <= _MAX_NAME:
            raise RegistryError(f"plugin {plugin!r} needs a name of 1..{_MAX_NAME} characters")
        if name in self._plugins:
            raise RegistryError(f"plugin name {name!r} is registered twice")
        for method in ("setup", "parse_conf"):
            if not callable(getattr(plugin, method, None)):
                raise RegistryError(f"plugin {name!r} has no {method}()")
        for method in ("on_request", "on_response"):
            if not inspect.iscoroutinefunction(getattr(plugin, method, None)):
                raise RegistryError(f"plugin {name!r}: {method}() must be an async function")
        reconfigure = getattr(plugin, "reconfigure", None)  # optional (runner.plugin.Reconfigurable)
        if reconfigure is not None and (not callable(reconfigure) or inspect.iscoroutinefunction(reconfigure)):
            raise RegistryError(f"plugin {name!r}: reconfigure() must be a plain function (it runs in a thread)")
        self._plugins[name] = plugin

    def get(self, name: str) -> Plugin[Any] | None:
        return self._plugins.get(name)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._plugins)

    def __iter__(self) -> Iterator[Plugin[Any]]:
        return iter(self._plugins.values())

    def __len__(self) -> int:
        return len(self._plugins)

    @classmethod
    def discover(cls, group: str = ENTRY_POINT_GROUP) -> PluginRegistry:
        """Every plugin installed under the entry-point group; any broken one is a start-up error."""
        registry = cls()
        for ep in sorted(entry_points(group=group), key=lambda e: e.name):
            try:
                obj = ep.load()
                plugin = obj() if inspect.isclass(obj) or inspect.isfunction(obj) else obj
            except Exception as exc:
                raise RegistryError(f"cannot load plugin entry point {ep.name!r} ({ep.value}): {exc}") from exc
            if getattr(plugin, "name", None) != ep.name:
                raise RegistryError(
                    f"entry point {ep.name!r} ({ep.value}) provides a plugin named "
                    f"{getattr(plugin, 'name', None)!r}; the names must match"
                )
            registry.register(cast("Plugin[Any]", plugin))
        return registry
