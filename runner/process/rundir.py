"""The supervisor's private run directory (``--workers N``): the files it holds and how the settings
the workers start from are written.

The settings file is what a worker reads when it starts, including a worker started again after a
crash, so a reload replaces it (staged, then renamed over it once every worker built the new state)
before it asks the running workers to commit: a worker that dies meanwhile comes back with the
settings its siblings run.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

from ..settings import Settings

__all__ = [
    "BALANCE_FILE",
    "CONFS_FILE",
    "SETTINGS_FILE",
    "create_run_dir",
    "discard_staged_settings",
    "metrics_file",
    "publish_staged_settings",
    "read_settings",
    "ready_file",
    "stage_settings",
    "write_settings",
]

SETTINGS_FILE = "settings.json"
CONFS_FILE = "confs.sqlite3"
BALANCE_FILE = "connections.map"
_STAGED = SETTINGS_FILE + ".next"


def create_run_dir() -> str:
    """A private directory for the shared table and metrics (tmpfs when there is one)."""
    # mkdtemp creates a fresh 0700 directory, so a shared tmpfs is safe here.
    base = "/dev/shm" if os.access("/dev/shm", os.W_OK) else None  # noqa: S108
    return tempfile.mkdtemp(prefix="mtls-guard-", dir=base)  # mode 0700


def metrics_file(rundir: str, index: int) -> str:
    """A worker's counters, rewritten every second: the fallback when it does not answer a scrape."""
    return os.path.join(rundir, f"metrics-{index}.json")


def ready_file(rundir: str, index: int) -> str:
    """Created by a worker once it accepts connections."""
    return os.path.join(rundir, f"ready-{index}")


def _text(settings: Settings) -> str:
    """Only the supervisor serves metrics; TypeError for option values JSON cannot carry."""
    return json.dumps(dataclasses.asdict(dataclasses.replace(settings, metrics_addr=None)))


def write_settings(rundir: str, settings: Settings) -> None:
    Path(rundir, SETTINGS_FILE).write_text(_text(settings))


def stage_settings(rundir: str, settings: Settings) -> None:
    """Write the reloaded settings beside the current ones; raises OSError or TypeError."""
    Path(rundir, _STAGED).write_text(_text(settings))


def publish_staged_settings(rundir: str) -> None:
    os.replace(os.path.join(rundir, _STAGED), os.path.join(rundir, SETTINGS_FILE))


def discard_staged_settings(rundir: str) -> None:
    Path(rundir, _STAGED).unlink(missing_ok=True)


def read_settings(rundir: str, *, staged: bool = False) -> Settings:
    """The settings a worker starts from, or (``staged``) those a reload asks it to build."""
    return Settings(**json.loads(Path(rundir, _STAGED if staged else SETTINGS_FILE).read_text()))
