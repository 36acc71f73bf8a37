"""Run the suite in a child process: how the suite's own tests prove what it passes and fails."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

__all__ = ["run_suite"]


def run_suite(*args: str, path: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python -m pytest -q ARGS`` with ``path`` (a folder of plugin modules) importable; output captured.

    Coverage's environment hook is dropped so a child run does not write into the parent's data.
    """
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    env.pop("COV_CORE_SOURCE", None)
    return subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--no-header", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )
