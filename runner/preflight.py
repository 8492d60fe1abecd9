"""What ``mtls-guard run`` checks once the settings are valid and before it binds or spawns anything.

Each failure is one line for the operator (exit code 3): said once, by the process that was
started, instead of a traceback from every worker after the socket already exists.
"""

from __future__ import annotations

import importlib
import logging
import os
import stat

from .server import StartupError, in_use_message, socket_is_live
from .settings import Settings

__all__ = ["check_extras", "check_socket_path", "missing_extra"]

log = logging.getLogger("mtls_guard.runner")

# Optional extras of pyproject.toml: (module to import, what needs it).
_EXTRAS = {
    "uvloop": ("uvloop", "event_loop uvloop"),
    "metrics": ("prometheus_client", "metrics_addr"),
}


def missing_extra(extra: str) -> str:
    """The one line saying which extra to install, and how."""
    module, needed_by = _EXTRAS[extra]
    return (
        f"{needed_by} needs {module}, which is not installed: "
        f"pip install '.[{extra}]' from a checkout of apisix-mtls-guard, into the runner's virtualenv"
    )


def check_extras(settings: Settings) -> None:
    """Import what the settings ask for; ``event_loop: auto`` falls back to asyncio by design."""
    wanted = []
    if settings.event_loop == "uvloop":
        wanted.append("uvloop")
    if settings.metrics_addr is not None:
        wanted.append("metrics")
    for extra in wanted:
        try:
            importlib.import_module(_EXTRAS[extra][0])
        except ImportError:
            raise StartupError(missing_extra(extra)) from None


def check_socket_path(settings: Settings) -> None:
    """Refuse a socket path another runner serves, unless ``settings.replace``.

    Two runners on one path take turns silently: the newer one gets APISIX's new connections, and
    the older one used to take the path back when the newer one exited. A stale socket (nobody
    listening) is replaced silently, as APISIX's respawn after a crash needs."""
    path = settings.listen
    try:
        st = os.lstat(path)
    except OSError:
        return  # nothing there (or unreadable: bind reports it with the other socket errors)
    if not stat.S_ISSOCK(st.st_mode):
        return  # bind refuses it with its own message
    if settings.replace:
        try:
            live = socket_is_live(path)
        except StartupError:
            live = True  # cannot tell; replacing is what was asked for
        if live:
            log.warning("event=socket_taken_over path=%s", path)
        return
    if socket_is_live(path):
        raise StartupError(in_use_message(path))
