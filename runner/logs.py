"""Logging for operators: quiet, one ``key=value`` line per event.

When APISIX spawns the runner, stdout and stderr are copied into APISIX's error.log at warn level
(wrapped in nginx's own prefix), so the default threshold is ``warning`` and the format stays
plain ``key=value`` text that survives the wrapping. A log file, when configured, receives the
same lines with timestamps.

``NOTICE`` ranks *above* ``WARNING`` on purpose (unlike syslog's notice): it marks the one line per
start an operator must see at the default threshold (``event=serving``: socket, workers, metrics
address) without calling it a warning; only ``log_level: error`` hides it.
"""

from __future__ import annotations

import logging
import sys

__all__ = ["LOGGER_NAME", "NOTICE", "configure_logging"]

LOGGER_NAME = "mtls_guard"
NOTICE = logging.WARNING + 5
logging.addLevelName(NOTICE, "NOTICE")
_STREAM_FORMAT = "mtls-guard %(levelname)s %(message)s"
_FILE_FORMAT = "%(asctime)s pid=%(process)d %(levelname)s %(message)s"


def configure_logging(level: str, log_file: str | None = None) -> None:
    """Route the ``mtls_guard`` loggers to stdout (and a file); idempotent."""
    root = logging.getLogger(LOGGER_NAME)
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    root.setLevel(level.upper())
    root.propagate = False
    stream = logging.StreamHandler(sys.stdout)
    stream.setFormatter(logging.Formatter(_STREAM_FORMAT))
    root.addHandler(stream)
    if log_file:
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.setFormatter(logging.Formatter(_FILE_FORMAT))
        root.addHandler(file_handler)
