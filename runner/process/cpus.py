"""How many CPUs this process may really use: the worker count's default and ceiling.

Worker processes that outnumber the CPUs they may run on do not add capacity: they take turns on
the same core, each answering its share of APISIX's connections in smaller batches, with the
scheduler's time slices showing up as millisecond stalls. Measured with ``mtls-guard run`` pinned
to one core (``taskset -c 1``), exempt path, 8 connections: 1 worker 18.7 k req/s, 2 workers 14.5 k
req/s with a p99 of 4.6 ms instead of 0.9 ms (bench/README.md). So the runner never starts more
workers than usable CPUs.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CGROUP_CPU_MAX", "usable_cpus"]

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")


def _cgroup_limit(cpu_max: Path) -> int | None:
    """Whole CPUs a cgroup v2 quota allows (``docker --cpus``, Kubernetes CPU limits), or None."""
    try:
        quota, period = cpu_max.read_text(encoding="ascii").split()
        if quota == "max":
            return None
        # A fractional quota (1.5 CPUs) cannot keep two busy workers running: round down, at least 1.
        return max(1, int(quota) // int(period))
    except (OSError, ValueError):
        return None


def usable_cpus(cpu_max: Path = CGROUP_CPU_MAX) -> int:
    """The CPUs in this process's affinity mask, further limited by a cgroup v2 CPU quota."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    limit = _cgroup_limit(cpu_max)
    return max(1, min(count, limit) if limit is not None else count)
