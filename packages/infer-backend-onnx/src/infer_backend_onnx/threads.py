"""How many threads this process may really run: CPU affinity and the cgroup CPU quota.

``os.cpu_count()`` reports the host's cores, not the container's share: a runtime sized from
it oversubscribes a 2-core container several times over (the as-shipped GenAI anchor loses a
factor of 4 that way). The budget here is the smaller of the CPUs this process may run on and
the CPU quota of its cgroup (v2 ``cpu.max``, or v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["cgroup_cpu_limit", "cpu_budget"]

_CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = _CGROUP_ROOT) -> float | None:
    """CPUs the cgroup quota allows (e.g. ``1.5``), or ``None`` when no quota is set or readable."""
    v2 = root / "cpu.max"
    try:
        if v2.is_file():
            quota, _, period = v2.read_text().strip().partition(" ")
            if quota == "max":
                return None
            return int(quota) / int(period or "100000")
        quota_file, period_file = root / "cpu" / "cpu.cfs_quota_us", root / "cpu" / "cpu.cfs_period_us"
        if not quota_file.is_file():
            quota_file, period_file = root / "cpu.cfs_quota_us", root / "cpu.cfs_period_us"
        if quota_file.is_file() and period_file.is_file():
            quota_us = int(quota_file.read_text().strip())
            period_us = int(period_file.read_text().strip())
            return quota_us / period_us if quota_us > 0 and period_us > 0 else None
    except (OSError, ValueError):
        # An unreadable or odd cgroup file means "no known quota", not a failure to load a model.
        return None
    return None


def cpu_budget(root: Path = _CGROUP_ROOT) -> int:
    """Threads worth running: ``min(affinity, ceil(cgroup quota))``, at least 1."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no sched_getaffinity
        cpus = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is not None:
        cpus = min(cpus, math.ceil(limit))
    return max(1, cpus)
