"""usable_cpus: the affinity mask, limited by a cgroup v2 CPU quota (the workers' default and ceiling)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from runner.process.cpus import usable_cpus


@pytest.mark.parametrize(
    ("cpu_max", "limit"),
    [("max 100000\n", None), ("100000 100000\n", 1), ("150000 100000", 1), ("400000 100000", 4), ("50000 100000", 1)],
)
def test_cgroup_quota_limits_whole_cpus(tmp_path: Path, cpu_max: str, limit: int | None) -> None:
    """A cgroup quota allows its whole CPUs (at least one); "max" means no limit beyond the affinity mask."""
    path = tmp_path / "cpu.max"
    path.write_text(cpu_max)
    affinity = len(os.sched_getaffinity(0))
    assert usable_cpus(path) == (affinity if limit is None else min(affinity, limit))


@pytest.mark.parametrize("content", [None, "", "garbage", "12 zero"])
def test_missing_or_odd_cgroup_file_is_ignored(tmp_path: Path, content: str | None) -> None:
    """Without a readable cgroup v2 quota only the affinity mask counts."""
    path = tmp_path / "cpu.max"
    if content is not None:
        path.write_text(content)
    assert usable_cpus(path) == len(os.sched_getaffinity(0))


def test_affinity_mask_counts(tmp_path: Path) -> None:
    """A process pinned to one CPU can use one CPU, whatever the machine has."""
    cpus = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(cpus)})
    try:
        assert usable_cpus(tmp_path / "absent") == 1
    finally:
        os.sched_setaffinity(0, cpus)
