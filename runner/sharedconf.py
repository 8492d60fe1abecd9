"""The conf-token table shared by the worker processes of one runner (``--workers N``).

APISIX picks any pooled connection for a call, so a token prepared by worker A reaches worker B.
PrepareConf therefore stores the raw conf list here (SQLite in the runner's private run directory)
and returns a token allocated here; a worker that meets an unknown token fetches the raw conf once,
compiles it and caches the result. SQLite is only touched on PrepareConf, on a worker's first sight
of a token and, to keep the sliding TTL shared, at most once per ``ttl / 8`` per token and worker —
never on the per-request path.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable
from typing import Final

from .errors import RunnerError
from .protocol.messages import ConfEntry

__all__ = ["SharedConfs", "SharedConfsError"]

_MAX_TOKEN: Final = 0xFFFFFFFF
# Waiting for another worker's write blocks this worker's event loop; keep it short and fail closed.
_BUSY_TIMEOUT: Final = 0.5

_SCHEMA: Final = """
CREATE TABLE IF NOT EXISTS confs (
    token   INTEGER PRIMARY KEY,
    key     TEXT,
    entries TEXT NOT NULL,
    expires REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS confs_key ON confs(key);
CREATE INDEX IF NOT EXISTS confs_expires ON confs(expires);
CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


class SharedConfsError(RunnerError):
    """The shared table could not be read or written (the call fails closed: SERVICE_UNAVAILABLE)."""


def _encode(entries: tuple[ConfEntry, ...]) -> str:
    return json.dumps([[e.name, e.value] for e in entries], ensure_ascii=False)


def _decode(text: str) -> tuple[ConfEntry, ...]:
    return tuple(ConfEntry(name, value) for name, value in json.loads(text))


class SharedConfs:
    def __init__(self, path: str, *, max_entries: int, clock: Callable[[], float]) -> None:
        self.max_entries = max_entries
        """Rows kept (least recently extended go first); a reload may change it (ConfStore.resize)."""
        self._clock = clock
        try:
            self._db = sqlite3.connect(path, timeout=_BUSY_TIMEOUT, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            # A cache of what APISIX can re-send at any time: durability is not needed, speed is.
            self._db.execute("PRAGMA synchronous=OFF")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise SharedConfsError(f"shared conf table {path}: {exc}") from exc

    @staticmethod
    def initialise(path: str, first_token: int) -> None:
        """Create the table and the first token (the supervisor does this once, before forking)."""
        db = sqlite3.connect(path, isolation_level=None)
        try:
            # Switching to WAL takes an exclusive lock: done here once, workers starting together
            # find it done instead of queueing for it within their short busy timeout.
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)
            db.execute("INSERT OR REPLACE INTO meta(name, value) VALUES ('next_token', ?)", (first_token,))
        finally:
            db.close()

    def close(self) -> None:
        self._db.close()

    def allocate(self, entries: tuple[ConfEntry, ...], key: str | None, ttl: float) -> int:
        """A token for these entries: the existing one for the same key and entries, else a new one."""
        now = self._clock()
        text = _encode(entries)
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                token = self._reuse(key, text, now, ttl)
                if token is None:
                    token = self._insert(key, text, now + ttl)
                    self._prune(now)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise SharedConfsError(f"cannot store conf: {exc}") from exc
        return token

    def _reuse(self, key: str | None, text: str, now: float, ttl: float) -> int | None:
        if key is None:
            return None
        row = self._db.execute(
            "SELECT token FROM confs WHERE key = ? AND entries = ? AND expires > ?", (key, text, now)
        ).fetchone()
        if row is None:
            return None
        self._db.execute("UPDATE confs SET expires = ? WHERE token = ?", (now + ttl, row[0]))
        return int(row[0])

    def _insert(self, key: str | None, text: str, expires: float) -> int:
        (token,) = self._db.execute("SELECT value FROM meta WHERE name = 'next_token'").fetchone()
        while token == 0 or self._db.execute("SELECT 1 FROM confs WHERE token = ?", (token,)).fetchone():
            token = token % _MAX_TOKEN + 1
        self._db.execute(
            "INSERT INTO confs(token, key, entries, expires) VALUES (?, ?, ?, ?)", (token, key, text, expires)
        )
        self._db.execute("UPDATE meta SET value = ? WHERE name = 'next_token'", (token % _MAX_TOKEN + 1,))
        return int(token)

    def _prune(self, now: float) -> None:
        self._db.execute("DELETE FROM confs WHERE expires <= ?", (now,))
        (count,) = self._db.execute("SELECT COUNT(*) FROM confs").fetchone()
        if count > self.max_entries:
            self._db.execute(
                "DELETE FROM confs WHERE token IN (SELECT token FROM confs ORDER BY expires LIMIT ?)",
                (count - self.max_entries,),
            )

    def fetch(self, token: int) -> tuple[tuple[ConfEntry, ...], str | None, float] | None:
        """(entries, key, expires) of a live token, or None."""
        try:
            row = self._db.execute(
                "SELECT entries, key, expires FROM confs WHERE token = ? AND expires > ?", (token, self._clock())
            ).fetchone()
        except sqlite3.Error as exc:
            raise SharedConfsError(f"cannot read conf token {token}: {exc}") from exc
        if row is None:
            return None
        return _decode(row[0]), row[1], float(row[2])

    def touch(self, token: int, expires: float) -> None:
        """Extend a token's shared life (it is in use on this worker)."""
        try:
            self._db.execute("UPDATE confs SET expires = MAX(expires, ?) WHERE token = ?", (expires, token))
        except sqlite3.Error as exc:
            raise SharedConfsError(f"cannot extend conf token {token}: {exc}") from exc

    def __len__(self) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM confs WHERE expires > ?", (self._clock(),)).fetchone()
        return int(count)
