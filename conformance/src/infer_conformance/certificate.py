"""The certificate a suite run ends with: what was checked on which backend, and with what outcome.

Suite tests name what they certify with the ``certifies`` marker (``@pytest.mark.certifies("capability:batch")``).
Each key aggregates its tests: ``failed`` if any failed, else ``passed`` if any passed, else
``skipped`` with the reasons. Keys are grouped by their prefix: ``family:`` (golden fixtures
graded), ``capability:`` (declared capabilities) and ``contract:`` (load, resources, KV,
long context, ...). The plugin prints it at the end of the run and ``--infer-report FILE``
writes it as JSON.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Certificate"]

_GROUPS = {"family": "fixtures", "capability": "capabilities", "contract": "contracts"}


@dataclass
class _Check:
    passed: int = 0
    failed: int = 0
    skipped: int = 0
    reasons: list[str] = field(default_factory=list)

    @property
    def status(self) -> str:
        if self.failed:
            return "failed"
        return "passed" if self.passed else "skipped"


@dataclass
class Certificate:
    """Outcomes of one suite run, keyed by what each test certifies."""

    #: Backend, versions, device, dtype and model of the run (filled when the model loads).
    facts: dict[str, Any] = field(default_factory=dict)
    #: Every certified key's outcomes.
    checks: dict[str, _Check] = field(default_factory=dict)
    #: Every suite test's final outcome, by node id.
    outcomes: dict[str, str] = field(default_factory=dict)
    #: Reasons of skipped suite tests, by node id.
    skips: dict[str, str] = field(default_factory=dict)

    def record(self, nodeid: str, keys: list[str], outcome: str, reason: str | None) -> None:
        """Record a test's outcome (``passed``/``failed``/``skipped``) under each key it certifies.

        A second record of the same test replaces the first (a teardown error after a pass).
        """
        previous = self.outcomes.get(nodeid)
        self.outcomes[nodeid] = outcome
        if previous is not None:
            for key in keys:
                check = self.checks[key]
                setattr(check, previous, getattr(check, previous) - 1)
        if outcome == "skipped" and reason:
            self.skips[nodeid] = reason
        for key in keys:
            check = self.checks.setdefault(key, _Check())
            setattr(check, outcome, getattr(check, outcome) + 1)
            if outcome == "skipped" and reason and reason not in check.reasons:
                check.reasons.append(reason)

    def as_dict(self) -> dict[str, Any]:
        """The certificate as JSON-ready data."""
        grouped: dict[str, dict[str, Any]] = {group: {} for group in dict.fromkeys(_GROUPS.values())}
        for key, check in sorted(self.checks.items()):
            prefix, _, name = key.partition(":")
            entry: dict[str, Any] = {"status": check.status, "passed": check.passed, "failed": check.failed}
            if check.skipped:
                entry["skipped"] = check.skipped
                entry["skip_reasons"] = check.reasons
            grouped[_GROUPS.get(prefix, "contracts")][name] = entry
        counts = {o: sum(1 for v in self.outcomes.values() if v == o) for o in ("passed", "failed", "skipped")}
        return {
            **self.facts,
            **grouped,
            "tests": counts,
            "certified": counts["failed"] == 0 and counts["passed"] > 0,
            "skipped": [{"test": nodeid, "reason": reason} for nodeid, reason in sorted(self.skips.items())],
        }

    def lines(self) -> list[str]:
        """The certificate as text for the terminal."""
        data = self.as_dict()
        fact = {key: data.get(key, "?") for key in ("backend", "version", "contract_version", "core_contract_version")}
        out = [
            f"backend {fact['backend']} {fact['version']} (contract {fact['contract_version']},"
            f" core {fact['core_contract_version']}) on {data.get('device', '?')} / {data.get('dtype', '?')}",
            f"model: {data.get('model', '?')}",
        ]
        for prefix, group in _GROUPS.items():
            for name, entry in data[group].items():
                why = f" ({'; '.join(entry['skip_reasons'])})" if entry["status"] == "skipped" else ""
                out.append(f"  {prefix} {name}: {entry['status']}{why}")
        counts = data["tests"]
        verdict = "CERTIFIED" if data["certified"] else "NOT CERTIFIED"
        out.append(f"{verdict}: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped")
        return out

    def write(self, path: Path) -> None:
        """Write the certificate as JSON to ``path``."""
        path.write_text(json.dumps(self.as_dict(), indent=1, sort_keys=False) + "\n")
