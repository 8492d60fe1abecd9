"""Conf tokens: PrepareConf's ordered plugin list, compiled once, kept with a sliding TTL.

APISIX caches a token for up to ``APISIX_CONF_EXPIRE_TIME`` in a shared dict and again per worker,
so one token can be used for nearly twice that long; every use therefore extends its life (as the
Go runner does). The store is bounded: when full, the least recently used token goes, and APISIX's
CONF_TOKEN_NOT_FOUND retry re-prepares it if it was still needed.

A live reload (runner.reload) changes the plugin state that compiled confs were built from, so the
store counts generations: each entry remembers the generation it was compiled in, and a token met in
a later one is compiled again from its raw entries before use. One comparison per lookup; nothing is
walked or recompiled at reload time.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ConfTokenNotFound, InvalidPluginConfig, StaleConf, UnknownPlugin
from .plugin import Plugin
from .protocol.messages import ConfEntry, PrepareConfRequest
from .registry import PluginRegistry
from .sharedconf import SharedConfs

__all__ = ["Chain", "ChainLink", "ConfStore"]

_MAX_TOKEN = 0xFFFFFFFF


@dataclass(frozen=True, slots=True)
class ChainLink:
    """One plugin of a route with its compiled config."""

    name: str
    plugin: Plugin[Any]
    conf: Any


Chain = tuple[ChainLink, ...]


@dataclass(slots=True)
class _Entry:
    chain: Chain
    source: tuple[ConfEntry, ...]
    key: str | None
    expires: float
    shared_touched: float = 0.0
    generation: int = 0
    """The store generation ``chain`` was compiled in."""
    failed: tuple[int, InvalidPluginConfig] | None = None
    """The later generation in which ``source`` did not compile, and why (see _recompile)."""


class ConfStore:
    """token -> compiled chain, with sliding expiry and an LRU bound.

    Compiled configs are shared between tokens with the same (plugin, value): a thousand routes
    with one policy hold one compiled policy.
    """

    def __init__(
        self,
        registry: PluginRegistry,
        *,
        ttl: float,
        max_entries: int,
        clock: Callable[[], float],
        max_compiled: int | None = None,
        first_token: int = 1,
        shared: SharedConfs | None = None,
    ) -> None:
        if ttl <= 0 or max_entries <= 0:
            raise ValueError("ttl and max_entries must be positive")
        self._registry = registry
        self._ttl = ttl
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[int, _Entry] = OrderedDict()
        self._by_key: dict[str, int] = {}
        self._compiled: OrderedDict[tuple[str, str], Any] = OrderedDict()
        self._fixed_max_compiled = max_compiled
        self._max_compiled = max_compiled or max_entries
        self._next = first_token
        self._shared = shared
        self._generation = 0

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def compiled_count(self) -> int:
        return len(self._compiled)

    @property
    def generation(self) -> int:
        return self._generation

    def new_generation(self) -> None:
        """Plugin state changed (a reload committed): every token compiles again on its next use."""
        self._generation += 1
        self._compiled.clear()

    def resize(self, *, ttl: float, max_entries: int) -> None:
        """Reloaded limits: later uses extend by ``ttl``; surplus tokens go now, least recently used first."""
        if ttl <= 0 or max_entries <= 0:
            raise ValueError("ttl and max_entries must be positive")
        self._ttl = ttl
        self._max = max_entries
        self._max_compiled = self._fixed_max_compiled or max_entries
        while len(self._entries) > self._max:
            self._drop(next(iter(self._entries)))
        while len(self._compiled) > self._max_compiled:
            self._compiled.popitem(last=False)
        if self._shared is not None:
            self._shared.max_entries = max_entries

    def prepare(self, request: PrepareConfRequest) -> int:
        """Compile every entry (in order) and return a token; raises InvalidPluginConfig."""
        now = self._clock()
        self._expire(now)
        if request.key is not None:
            token = self._by_key.get(request.key)
            if token is not None:
                entry = self._entries.get(token)
                if entry is not None and entry.source == request.entries:
                    if entry.generation != self._generation:  # compiled before a reload: must still compile
                        entry.chain = self._compile(entry.source)
                        entry.generation, entry.failed = self._generation, None
                    entry.expires = now + self._ttl
                    self._entries.move_to_end(token)
                    return token
        chain = self._compile(request.entries)
        if self._shared is None:
            token = self._new_token()
        else:  # other workers must find it too; the shared table allocates the token
            token = self._shared.allocate(request.entries, request.key, self._ttl)
        self._remember(token, _Entry(chain, request.entries, request.key, now + self._ttl, now, self._generation))
        return token

    def _compile(self, entries: tuple[ConfEntry, ...]) -> Chain:
        return tuple(self._link(i, e.name, e.value) for i, e in enumerate(entries))

    def _remember(self, token: int, entry: _Entry) -> None:
        old = self._entries.pop(token, None)
        if old is not None and old.key is not None and self._by_key.get(old.key) == token:
            del self._by_key[old.key]
        self._entries[token] = entry
        if entry.key is not None:
            self._by_key[entry.key] = token
        while len(self._entries) > self._max:
            self._drop(next(iter(self._entries)))

    def lookup(self, token: int) -> Chain:
        """The chain for ``token``, extending its life; ConfTokenNotFound if unknown or expired."""
        entry = self._entries.get(token)
        now = self._clock()
        if entry is not None and entry.expires <= now:
            self._drop(token)
            entry = None
        if entry is None:
            if self._shared is None:
                raise ConfTokenNotFound(token)
            return self._adopt(token, now)
        entry.expires = now + self._ttl
        self._entries.move_to_end(token)
        if self._shared is not None and now - entry.shared_touched > self._ttl / 8:
            self._shared.touch(token, entry.expires)
            entry.shared_touched = now
        if entry.generation != self._generation:
            return self._recompile(token, entry)
        return entry.chain

    def _recompile(self, token: int, entry: _Entry) -> Chain:
        """A token compiled before the last reload: compile its raw entries against the current
        plugin state. If they no longer compile, the token fails closed (StaleConf) for the rest of
        this generation, without compiling again on every call."""
        if entry.failed is not None and entry.failed[0] == self._generation:
            raise StaleConf(token, entry.failed[1])
        try:
            chain = self._compile(entry.source)
        except InvalidPluginConfig as exc:
            entry.failed = (self._generation, exc)
            raise StaleConf(token, exc) from None
        entry.chain, entry.generation, entry.failed = chain, self._generation, None
        return chain

    def _adopt(self, token: int, now: float) -> Chain:
        """A token another worker prepared: compile its raw conf here once."""
        assert self._shared is not None
        row = self._shared.fetch(token)
        if row is None:
            raise ConfTokenNotFound(token)
        entries, key, _expires = row
        chain = self._compile(entries)
        self._shared.touch(token, now + self._ttl)
        self._remember(token, _Entry(chain, entries, key, now + self._ttl, now, self._generation))
        return chain

    def _link(self, index: int, name: str, value: str) -> ChainLink:
        plugin = self._registry.get(name)
        if plugin is None:
            raise UnknownPlugin(name, index, self._registry.names)
        cache_key = (name, value)
        conf = self._compiled.get(cache_key, _MISSING)
        if conf is _MISSING:
            try:
                conf = plugin.parse_conf(value)
            except Exception as exc:
                raise InvalidPluginConfig(name, index, str(exc) or type(exc).__name__) from exc
            self._compiled[cache_key] = conf
            if len(self._compiled) > self._max_compiled:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(cache_key)
        return ChainLink(name, plugin, conf)

    def _new_token(self) -> int:
        token = self._next
        while token in self._entries or token == 0:
            token = token % _MAX_TOKEN + 1
        self._next = token % _MAX_TOKEN + 1
        return token

    def _expire(self, now: float) -> None:
        # Entries are kept in last-use order and share one TTL, so expired ones are at the front.
        while self._entries:
            token, entry = next(iter(self._entries.items()))
            if entry.expires > now:
                break
            self._drop(token)

    def _drop(self, token: int) -> None:
        entry = self._entries.pop(token)
        if entry.key is not None and self._by_key.get(entry.key) == token:
            del self._by_key[entry.key]


_MISSING: Any = object()
