"""The atheris side of every target: instrument the code under test, then hand over to libFuzzer."""

from __future__ import annotations

import sys
from collections.abc import Callable

import atheris


def main(target: str) -> None:
    """Fuzz ``harness.TARGETS[target]``; libFuzzer options and corpus directories come from argv."""
    # Only modules imported inside this block get coverage instrumentation: the runner and plugins.
    with atheris.instrument_imports(include=["runner", "plugins"]):
        from fuzz import harness

    harness.configure_logging()
    check: Callable[[bytes], None] = harness.TARGETS[target]
    atheris.Setup(sys.argv, check)
    atheris.Fuzz()
