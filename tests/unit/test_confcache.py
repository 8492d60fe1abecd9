"""ConfStore: conf tokens, sliding expiry, the LRU bound and shared compiled configs."""

from __future__ import annotations

import pytest

from runner.confcache import ConfStore
from runner.errors import ConfTokenNotFound, InvalidPluginConfig, UnknownPlugin
from runner.protocol.messages import ConfEntry, ErrCode, PrepareConfRequest
from runner.registry import PluginRegistry
from tests.plugins_for_tests import StrictJson, make_registry


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def request(*entries: tuple[str, str], key: str | None = None) -> PrepareConfRequest:
    return PrepareConfRequest(tuple(ConfEntry(n, v) for n, v in entries), key)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def plugins() -> PluginRegistry:
    return make_registry()


def store_for(plugins: PluginRegistry, clock: FakeClock, **kwargs: int) -> ConfStore:
    options = {"ttl": 10.0, "max_entries": 100, **kwargs}
    return ConfStore(plugins, clock=clock, **options)  # type: ignore[arg-type]


class TestTokens:
    def test_tokens_are_non_zero_and_increase(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """Each PrepareConf gets a new token, starting at 1 and strictly increasing."""
        store = store_for(plugins, clock)
        tokens = [store.prepare(request(("echo", str(i)))) for i in range(5)]

        assert tokens == [1, 2, 3, 4, 5]

    def test_wraparound_skips_zero(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """After 0xFFFFFFFF the counter wraps to 1, never issuing token 0 (APISIX would accept it)."""
        store = ConfStore(plugins, ttl=10, max_entries=10, clock=clock, first_token=0xFFFFFFFE)
        tokens = [store.prepare(request(("echo", str(i)))) for i in range(3)]

        assert tokens == [0xFFFFFFFE, 0xFFFFFFFF, 1]

    def test_wraparound_skips_tokens_still_in_use(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """A wrapped counter never hands out a token that is still live."""
        store = ConfStore(plugins, ttl=10, max_entries=10, clock=clock, first_token=1)
        first = store.prepare(request(("echo", "a")))
        store._next = 0xFFFFFFFF  # as if four billion PrepareConfs had happened since
        tokens = [store.prepare(request(("echo", str(i)))) for i in range(2)]

        assert first == 1
        assert tokens == [0xFFFFFFFF, 2]

    def test_first_token_zero_is_never_issued(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """Even a counter configured to start at 0 skips it."""
        store = ConfStore(plugins, ttl=10, max_entries=10, clock=clock, first_token=0)

        assert store.prepare(request()) == 1

    def test_empty_conf_list_gets_a_token(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """A route with ext-plugin-pre-req but no conf sends an empty list; it gets a usable token."""
        store = store_for(plugins, clock)
        token = store.prepare(request())

        assert token != 0
        assert store.lookup(token) == ()

    def test_same_key_and_entries_returns_same_token(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """The idempotent key dedupes: a repeated PrepareConf reuses the live token."""
        store = store_for(plugins, clock)
        first = store.prepare(request(("echo", "a"), key="route#1#ext-plugin-pre-req#1"))
        second = store.prepare(request(("echo", "a"), key="route#1#ext-plugin-pre-req#1"))

        assert first == second
        assert len(store) == 1

    def test_same_key_with_new_entries_gets_new_token(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """A changed conf under the same key is a new chain, not the old one."""
        store = store_for(plugins, clock)
        first = store.prepare(request(("echo", "a"), key="k"))
        second = store.prepare(request(("echo", "b"), key="k"))

        assert first != second
        assert store.lookup(second)[0].conf == "b"
        assert store.lookup(first)[0].conf == "a"

    def test_without_key_every_prepare_is_new(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """Without a key there is nothing to dedupe on."""
        store = store_for(plugins, clock)

        assert store.prepare(request(("echo", "a"))) != store.prepare(request(("echo", "a")))


class TestExpiry:
    def test_lookup_extends_ttl(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """Every lookup restarts the TTL, so a token in use never expires."""
        store = store_for(plugins, clock, ttl=10)
        token = store.prepare(request(("echo", "a")))
        for _ in range(5):
            clock.now += 9
            store.lookup(token)

        assert store.lookup(token)[0].name == "echo"

    def test_expired_token_is_not_found(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """A token unused for the TTL raises ConfTokenNotFound (APISIX then re-prepares)."""
        store = store_for(plugins, clock, ttl=10)
        token = store.prepare(request(("echo", "a")))
        clock.now += 10

        with pytest.raises(ConfTokenNotFound) as caught:
            store.lookup(token)
        assert caught.value.token == token
        assert caught.value.code == ErrCode.CONF_TOKEN_NOT_FOUND
        assert len(store) == 0

    def test_unknown_token_is_not_found(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """A token never issued (e.g. from before a runner restart) raises ConfTokenNotFound."""
        store = store_for(plugins, clock)

        with pytest.raises(ConfTokenNotFound, match="conf token 77 not found"):
            store.lookup(77)

    def test_prepare_purges_expired_entries(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """Expired tokens do not accumulate: the next PrepareConf drops them."""
        store = store_for(plugins, clock, ttl=10)
        for i in range(5):
            store.prepare(request(("echo", str(i))))
        clock.now += 11
        store.prepare(request(("echo", "new")))

        assert len(store) == 1

    def test_expired_key_gets_a_new_token(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """The key dedupe never resurrects an expired token."""
        store = store_for(plugins, clock, ttl=10)
        first = store.prepare(request(("echo", "a"), key="k"))
        clock.now += 10
        second = store.prepare(request(("echo", "a"), key="k"))

        assert second != first
        with pytest.raises(ConfTokenNotFound):
            store.lookup(first)

    def test_reprepare_with_key_extends_ttl(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """A deduped PrepareConf counts as a use of the token."""
        store = store_for(plugins, clock, ttl=10)
        token = store.prepare(request(("echo", "a"), key="k"))
        clock.now += 9
        store.prepare(request(("echo", "a"), key="k"))
        clock.now += 9

        assert store.lookup(token)[0].conf == "a"


class TestBound:
    def test_lru_bound_evicts_least_recently_used(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """When full, the token used longest ago goes; recently used ones stay."""
        store = store_for(plugins, clock, max_entries=3)
        a, b, c = (store.prepare(request(("echo", n))) for n in "abc")
        store.lookup(a)  # b is now the least recently used
        d = store.prepare(request(("echo", "d")))

        assert len(store) == 3
        with pytest.raises(ConfTokenNotFound):
            store.lookup(b)
        for token in (a, c, d):
            store.lookup(token)

    def test_evicted_key_is_forgotten(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """An evicted token is not returned again for its key."""
        store = store_for(plugins, clock, max_entries=1)
        first = store.prepare(request(("echo", "a"), key="k1"))
        store.prepare(request(("echo", "b"), key="k2"))
        again = store.prepare(request(("echo", "a"), key="k1"))

        assert again != first

    def test_rejects_non_positive_limits(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """A store that could hold nothing is a configuration error."""
        with pytest.raises(ValueError, match="positive"):
            ConfStore(plugins, ttl=0, max_entries=1, clock=clock)
        with pytest.raises(ValueError, match="positive"):
            ConfStore(plugins, ttl=1, max_entries=0, clock=clock)


class TestCompile:
    def test_same_plugin_and_value_compiled_once_and_shared(self, clock: FakeClock) -> None:
        """A thousand routes with one policy hold one compiled policy object."""
        strict = StrictJson()
        store = ConfStore(PluginRegistry([strict]), ttl=10, max_entries=100, clock=clock)
        tokens = [store.prepare(request(("strict-json", '{"a": 1}'), key=f"route#{i}")) for i in range(10)]
        confs = {id(store.lookup(t)[0].conf) for t in tokens}

        assert strict.parsed == ['{"a": 1}']
        assert len(confs) == 1
        assert store.compiled_count == 1

    def test_different_values_compiled_separately(self, clock: FakeClock) -> None:
        """Different config strings are different compiled objects."""
        strict = StrictJson()
        store = ConfStore(PluginRegistry([strict]), ttl=10, max_entries=100, clock=clock)
        token = store.prepare(request(("strict-json", '{"a": 1}'), ("strict-json", '{"a": 2}')))

        assert [link.conf for link in store.lookup(token)] == [{"a": 1}, {"a": 2}]
        assert strict.parsed == ['{"a": 1}', '{"a": 2}']

    def test_invalid_conf_names_plugin_and_index(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """A conf the plugin rejects raises InvalidPluginConfig naming the plugin and its position."""
        store = store_for(plugins, clock)

        with pytest.raises(InvalidPluginConfig) as caught:
            store.prepare(request(("echo", "x"), ("strict-json", "[1]")))
        assert caught.value.plugin == "strict-json"
        assert caught.value.index == 1
        assert "conf[1]" in str(caught.value)
        assert "conf must be a JSON object" in str(caught.value)
        assert caught.value.code == ErrCode.BAD_REQUEST
        assert len(store) == 0

    def test_invalid_conf_is_not_cached(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """A rejected value is rejected again on the next PrepareConf, never half-registered."""
        store = store_for(plugins, clock)
        for _ in range(2):
            with pytest.raises(InvalidPluginConfig):
                store.prepare(request(("strict-json", "not json")))
        assert store.compiled_count == 0

    def test_unknown_plugin(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """A conf naming a plugin the runner lacks is refused (skipping it would fail open)."""
        store = store_for(plugins, clock)

        with pytest.raises(UnknownPlugin) as caught:
            store.prepare(request(("echo", ""), ("nope", "{}")))
        assert caught.value.plugin == "nope"
        assert caught.value.index == 1
        assert "no such plugin" in str(caught.value)
        assert "echo" in str(caught.value)

    def test_duplicate_plugin_names_kept_in_order(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """The conf list is an ordered list, not a dict: repeated names each run, in order."""
        store = store_for(plugins, clock)
        token = store.prepare(request(("order", "1"), ("echo", "x"), ("order", "2"), ("order", "3")))

        assert [(link.name, link.conf) for link in store.lookup(token)] == [
            ("order", "1"),
            ("echo", "x"),
            ("order", "2"),
            ("order", "3"),
        ]

    def test_non_json_values_pass_through(self, plugins: PluginRegistry, clock: FakeClock) -> None:
        """APISIX only checks that a value is a string; the raw string reaches the plugin."""
        store = store_for(plugins, clock)
        token = store.prepare(request(("echo", "bar"), ("echo", ""), ("echo", "{not json")))

        assert [link.conf for link in store.lookup(token)] == ["bar", "", "{not json"]

    def test_compiled_cache_is_bounded(self, clock: FakeClock) -> None:
        """The compiled-config cache has its own bound, dropping the least recently used value."""
        strict = StrictJson()
        store = ConfStore(PluginRegistry([strict]), ttl=10, max_entries=100, clock=clock, max_compiled=2)
        for i in range(3):
            store.prepare(request(("strict-json", f'{{"n": {i}}}')))
        store.prepare(request(("strict-json", '{"n": 0}')))

        assert store.compiled_count == 2
        assert strict.parsed == ['{"n": 0}', '{"n": 1}', '{"n": 2}', '{"n": 0}']
