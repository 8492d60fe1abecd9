"""Conf generations (runner.confcache): after a reload every token is compiled again, once, from its raw conf."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from runner import PluginRegistry
from runner.confcache import ConfStore
from runner.errors import InvalidPluginConfig, StaleConf
from runner.protocol.messages import ConfEntry, ErrCode, PrepareConfRequest
from tests.plugins_for_tests import FileVerdict, StrictJson


def _request(*entries: tuple[str, str], key: str | None = None) -> PrepareConfRequest:
    return PrepareConfRequest(tuple(ConfEntry(n, v) for n, v in entries), key)


def _counting(plugin: Any, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    parsed: list[str] = []
    original: Callable[[str], Any] = plugin.parse_conf

    def parse(value: str) -> Any:
        parsed.append(value)
        return original(value)

    monkeypatch.setattr(plugin, "parse_conf", parse)
    return parsed


class TestGenerations:
    def test_token_compiled_before_a_reload_is_compiled_again_once(self) -> None:
        """After a new generation the next lookup compiles the raw conf again, later lookups do not."""
        plugin = StrictJson()
        store = ConfStore(PluginRegistry([plugin]), ttl=10, max_entries=10, clock=lambda: 0.0)
        token = store.prepare(_request(("strict-json", "{}")))
        store.lookup(token)
        store.new_generation()
        store.lookup(token)
        store.lookup(token)
        assert plugin.parsed == ["{}", "{}"]

    def test_token_that_no_longer_compiles_fails_closed(self, monkeypatch: pytest.MonkeyPatch) -> None:
        """A conf the new state rejects gives StaleConf (503, not a re-prepare), compiled once per generation."""
        plugin = FileVerdict()
        parsed = _counting(plugin, monkeypatch)
        store = ConfStore(PluginRegistry([plugin]), ttl=10, max_entries=10, clock=lambda: 0.0)
        token = store.prepare(_request(("file-verdict", "only-while-allowing")))
        plugin.allow = False
        store.new_generation()
        for _ in range(3):
            with pytest.raises(StaleConf, match="no longer compiles after a reload") as raised:
                store.lookup(token)
            assert raised.value.code == ErrCode.SERVICE_UNAVAILABLE
        assert len(parsed) == 2
        plugin.allow = True
        store.new_generation()
        assert store.lookup(token)[0].conf == (True, "only-while-allowing")

    def test_prepare_with_the_same_key_checks_the_conf_again(self) -> None:
        """PrepareConf reusing a token compiled before the reload rejects a conf that no longer compiles."""
        plugin = FileVerdict()
        store = ConfStore(PluginRegistry([plugin]), ttl=10, max_entries=10, clock=lambda: 0.0)
        store.prepare(_request(("file-verdict", "only-while-allowing"), key="route#1"))
        plugin.allow = False
        store.new_generation()
        with pytest.raises(InvalidPluginConfig):
            store.prepare(_request(("file-verdict", "only-while-allowing"), key="route#1"))

    def test_resize_drops_the_least_recently_used_surplus(self) -> None:
        """A smaller max_conf_entries drops the oldest tokens at once; a new TTL applies to later uses."""
        now = [0.0]
        store = ConfStore(PluginRegistry([StrictJson()]), ttl=10, max_entries=10, clock=lambda: now[0])
        tokens = [store.prepare(_request(("strict-json", f'{{"n": {i}}}'))) for i in range(5)]
        store.resize(ttl=100, max_entries=2)
        assert len(store) == 2
        store.lookup(tokens[-1])
        now[0] = 50.0
        store.lookup(tokens[-1])  # still alive: extended by the new TTL
