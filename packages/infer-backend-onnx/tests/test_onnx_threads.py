"""The thread budget: CPU affinity capped by the cgroup CPU quota (fake cgroup files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infer_backend_onnx.threads import cgroup_cpu_limit, cpu_budget

pytestmark = pytest.mark.unit


def test_cgroup_v2_quota_is_quota_over_period(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5


def test_cgroup_v2_max_means_no_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota_is_read_from_the_cpu_controller(tmp_path: Path) -> None:
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2.0


def test_cgroup_v1_negative_quota_means_no_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_garbage_in_cgroup_files_means_no_quota(tmp_path: Path) -> None:
    (tmp_path / "cpu.max").write_text("lots of cpus\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_budget_is_the_quota_rounded_up_when_below_the_affinity(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cpu_budget(tmp_path) == 2


def test_budget_is_the_affinity_when_the_quota_is_larger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    (tmp_path / "cpu.max").write_text("800000 100000\n")
    assert cpu_budget(tmp_path) == 2


def test_budget_is_at_least_one_thread(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0}, raising=False)
    (tmp_path / "cpu.max").write_text("10000 100000\n")
    assert cpu_budget(tmp_path) == 1
