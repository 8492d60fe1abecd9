"""``reload_watch_seconds``: ask for a reload when the config file or a path a plugin option names
changes.

Polling rather than inotify: it behaves the same on every file system, sees a Kubernetes ConfigMap
update (a ``..data`` symlink swapped to a new directory) as the changed inode it is, and costs a few
``stat`` calls per interval. A directory counts as changed when an entry in it (one level) appears,
goes, or changes; a path that is missing is a state too, so its appearance is a change.
"""

from __future__ import annotations

import asyncio
import os
import stat
from collections.abc import Callable, Hashable

from .settings import Settings, path_options

__all__ = ["fingerprint", "watch_files", "watched_paths"]

# How often a watch that is off checks whether a reload turned it on.
_OFF_RECHECK = 1.0


def watched_paths(config_file: str | None, settings: Settings) -> list[str]:
    paths = [os.path.abspath(config_file)] if config_file else []
    return paths + [p for p in path_options(settings.plugins) if p not in paths]


def _state(path: str) -> Hashable:
    try:
        st = os.stat(path)
    except OSError as exc:
        return (path, exc.errno)
    state: tuple[Hashable, ...] = (path, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
    if stat.S_ISDIR(st.st_mode):
        try:
            with os.scandir(path) as entries:
                files = sorted(entry.path for entry in entries if not entry.is_dir())
        except OSError as exc:
            return (*state, exc.errno)
        state += tuple(_state(file) for file in files)
    return state


def fingerprint(paths: list[str]) -> tuple[Hashable, ...]:
    """What a change to any of ``paths`` changes: identity, size and modification time."""
    return tuple(_state(path) for path in paths)


async def watch_files(
    settings: Callable[[], Settings], config_file: str | None, request: Callable[[str], None]
) -> None:
    """Poll every ``settings().reload_watch_seconds`` (re-read each time: a reload may change it, or
    the paths) and call ``request("watch")`` when the fingerprint changes."""
    seen: tuple[Hashable, ...] | None = None
    while True:
        interval = settings().reload_watch_seconds
        if not interval:
            seen = None
            await asyncio.sleep(_OFF_RECHECK)
            continue
        now = fingerprint(watched_paths(config_file, settings()))
        if seen is not None and now != seen:
            request("watch")
        seen = now
        await asyncio.sleep(interval)
