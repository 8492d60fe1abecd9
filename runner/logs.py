"""Logging for operators: quiet, one ``key=value`` line per event.

When APISIX spawns the runner, stdout and stderr are copied into APISIX's error.log at warn level
(wrapped in nginx's own prefix), so the default threshold is ``warning`` and the format stays
plain ``key=value`` text that survives the wrapping. A log file, when configured, receives the
same lines with timestamps.

``NOTICE`` ranks *above* ``WARNING`` on purpose (unlike syslog's notice): it marks the one line per
start an operator must see at the default threshold (``event=serving``: socket, workers, metrics
address), and the one per live reload (``event=reloaded``), without calling them warnings; only
``log_level: error`` hides them.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

__all__ = ["LOGGER_NAME", "NOTICE", "configure_logging", "prepare_logging"]

LOGGER_NAME = "mtls_guard"
NOTICE = logging.WARNING + 5
logging.addLevelName(NOTICE, "NOTICE")
_STREAM_FORMAT = "mtls-guard %(levelname)s %(message)s"
_FILE_FORMAT = "%(asctime)s pid=%(process)d %(levelname)s %(message)s"


def configure_logging(level: str, log_file: str | None = None) -> None:
    """Route the ``mtls_guard`` loggers to stdout (and a file); idempotent."""
    prepare_logging(level, log_file)()


def prepare_logging(level: str, log_file: str | None = None) -> Callable[[], None]:
    """Open the log file now (an unusable path raises OSError here) and return the step that swaps
    the handlers in, which cannot fail: a reload validates first, then commits (runner.reload).
    Every successful reload reopens the file, so it may be moved away (logrotate) before a SIGHUP."""
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(logging.Formatter(_STREAM_FORMAT))
    handlers: list[logging.Handler] = [stream]
    if log_file:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        handlers.append(file_handler)

    def commit() -> None:
        root = logging.getLogger(LOGGER_NAME)
        old = list(root.handlers)
        root.setLevel(level.upper())
        root.propagate = False
        for handler in handlers:
            root.addHandler(handler)
        for handler in old:
            root.removeHandler(handler)
            handler.close()

    return commit
