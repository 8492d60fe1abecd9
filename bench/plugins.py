"""Plugins that exist only to be measured."""

from __future__ import annotations

from typing import TYPE_CHECKING

from runner import BasePlugin, HTTPRequest, PluginRegistry, Stop

if TYPE_CHECKING:
    from .scenarios import Scenario

__all__ = ["PLUGINS", "BenchVars", "build_registry"]

Trips = tuple[tuple[str, ...], ...]


class BenchVars(BasePlugin[Trips]):
    """Reads variables over ExtraInfo and changes nothing.

    Conf: round trips separated by ``|``, names within one trip (pipelined) by ``,``.
    ``"host"`` is exactly ``await request.var("host")``: one round trip, one variable.
    """

    name = "bench-vars"
    needs_task = False  # awaits only the runner's ExtraInfo: the fast path (README "Writing other plugins")

    def parse_conf(self, value: str) -> Trips:
        trips = tuple(tuple(n.strip() for n in trip.split(",") if n.strip()) for trip in value.split("|"))
        return tuple(t for t in trips if t)

    async def on_request(self, conf: Trips, request: HTTPRequest) -> Stop | None:
        for names in conf:
            if len(names) == 1:
                await request.var(names[0])
            else:
                await request.vars(*names)
        return None


PLUGINS = {p.name: p for p in (BenchVars,)}
"""Bench plugin classes by name; the runner server instantiates the ones a scenario's conf names."""


def build_registry(scenario: Scenario) -> PluginRegistry:
    """The plugins a scenario's conf names: bench plugins first, then installed entry points."""
    registry = PluginRegistry()
    installed: PluginRegistry | None = None
    for name in dict.fromkeys(n for n, _ in scenario.conf):
        if name in PLUGINS:
            registry.register(PLUGINS[name]())
            continue
        if installed is None:
            installed = PluginRegistry.discover()
        plugin = installed.get(name)
        if plugin is None:
            raise SystemExit(f"no bench or installed plugin named {name!r}")
        registry.register(plugin)
    return registry
