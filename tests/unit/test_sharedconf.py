"""The conf-token table shared by worker processes, and ConfStore on top of it."""

from __future__ import annotations

from pathlib import Path

import pytest

from runner.confcache import ConfStore
from runner.errors import ConfTokenNotFound, UnknownPlugin
from runner.protocol.messages import ConfEntry, PrepareConfRequest
from runner.sharedconf import SharedConfs
from tests.plugins_for_tests import make_registry


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _entries(*values: str) -> tuple[ConfEntry, ...]:
    return tuple(ConfEntry("echo", v) for v in values)


@pytest.fixture
def db(tmp_path: Path) -> str:
    path = str(tmp_path / "confs.sqlite3")
    SharedConfs.initialise(path, first_token=4000)
    return path


class TestSharedConfs:
    def test_tokens_start_where_the_supervisor_said_and_increase(self, db: str) -> None:
        """Tokens are allocated from the initial value on, one per new conf."""
        table = SharedConfs(db, max_entries=10, clock=Clock())
        assert table.allocate(_entries("a"), None, 60) == 4000
        assert table.allocate(_entries("b"), None, 60) == 4001

    def test_two_connections_see_each_others_tokens(self, db: str) -> None:
        """A token allocated through one worker's connection is fetched by another's."""
        clock = Clock()
        a, b = SharedConfs(db, max_entries=10, clock=clock), SharedConfs(db, max_entries=10, clock=clock)
        token = a.allocate(_entries("x", "y"), "route#1", 60)
        assert b.fetch(token) == (_entries("x", "y"), "route#1", clock.now + 60)
        assert b.allocate(_entries("z"), None, 60) == token + 1

    def test_same_key_and_entries_reuse_the_token(self, db: str) -> None:
        """Re-preparing the same route version returns the live token and extends it."""
        clock = Clock()
        table = SharedConfs(db, max_entries=10, clock=clock)
        token = table.allocate(_entries("x"), "route#1", 60)
        clock.now += 30
        assert table.allocate(_entries("x"), "route#1", 60) == token
        fetched = table.fetch(token)
        assert fetched is not None
        assert fetched[2] == clock.now + 60
        assert table.allocate(_entries("other"), "route#1", 60) != token

    def test_expired_tokens_are_gone(self, db: str) -> None:
        """A token past its expiry is not fetched, and is pruned on the next allocation."""
        clock = Clock()
        table = SharedConfs(db, max_entries=10, clock=clock)
        token = table.allocate(_entries("x"), None, 60)
        clock.now += 61
        assert table.fetch(token) is None
        table.allocate(_entries("y"), None, 60)
        assert len(table) == 1

    def test_touch_extends_but_never_shortens(self, db: str) -> None:
        """touch() moves the expiry forward only."""
        clock = Clock()
        table = SharedConfs(db, max_entries=10, clock=clock)
        token = table.allocate(_entries("x"), None, 60)
        table.touch(token, clock.now + 500)
        table.touch(token, clock.now + 10)
        assert table.fetch(token)[2] == clock.now + 500  # type: ignore[index]

    def test_bounded(self, db: str) -> None:
        """Beyond max_entries the tokens closest to expiry are dropped."""
        clock = Clock()
        table = SharedConfs(db, max_entries=3, clock=clock)
        tokens = []
        for i in range(5):
            clock.now += 1
            tokens.append(table.allocate(_entries(str(i)), None, 60))
        assert len(table) == 3
        assert table.fetch(tokens[0]) is None
        assert table.fetch(tokens[-1]) is not None


class TestConfStoreWithSharedTable:
    def _store(self, db: str, clock: Clock) -> ConfStore:
        shared = SharedConfs(db, max_entries=100, clock=clock)
        return ConfStore(make_registry(), ttl=60, max_entries=100, clock=clock, shared=shared)

    def test_token_prepared_on_one_worker_works_on_another(self, db: str) -> None:
        """Worker B resolves worker A's token from the shared table, compiling the conf itself."""
        clock = Clock()
        worker_a, worker_b = self._store(db, clock), self._store(db, clock)
        token = worker_a.prepare(PrepareConfRequest(_entries("v1", "v2"), "route#1"))
        chain = worker_b.lookup(token)
        assert [link.conf for link in chain] == [link.conf for link in worker_a.lookup(token)]
        assert len(worker_b) == 1

    def test_unknown_token_is_not_found_on_every_worker(self, db: str) -> None:
        """A token no worker issued gives CONF_TOKEN_NOT_FOUND."""
        clock = Clock()
        with pytest.raises(ConfTokenNotFound):
            self._store(db, clock).lookup(123456)

    def test_use_on_one_worker_keeps_the_token_alive_for_the_others(self, db: str) -> None:
        """Sliding expiry is shared: steady use on A keeps B from seeing the token expire."""
        clock = Clock()
        worker_a, worker_b = self._store(db, clock), self._store(db, clock)
        token = worker_a.prepare(PrepareConfRequest(_entries("v"), None))
        for _ in range(10):
            clock.now += 20  # 200 s in all, TTL 60 s: only A's use keeps it alive
            worker_a.lookup(token)
        assert worker_b.lookup(token)

    def test_invalid_conf_allocates_nothing(self, db: str) -> None:
        """A conf that does not compile is rejected before any token is written to the table."""
        clock = Clock()
        store = self._store(db, clock)
        with pytest.raises(UnknownPlugin):
            store.prepare(PrepareConfRequest((ConfEntry("no-such-plugin", "x"),), None))
        assert len(SharedConfs(db, max_entries=100, clock=clock)) == 0
