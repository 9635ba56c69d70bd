"""Fault drills: the whole job run against the real parts while faults are injected, with figures.

Each drill records one :class:`DrillResult`; the session prints them as a table and writes them
to ``drills-report.json`` (or ``$MARKETPIPE_DRILL_REPORT``). `make drills` runs them, `make test`
does not: they take minutes each.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pytest

from tests.drills.figures import DrillResult, table

_results: list[DrillResult] = []


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.path).parents:
            item.add_marker(pytest.mark.drill)


@dataclass
class Drill:
    """What one drill injected and what survived, filled in as it runs."""

    name: str
    started: float = field(default_factory=time.monotonic)
    faults_injected: int = 0
    faults_survived: int = 0
    notes: list[str] = field(default_factory=list)

    def inject(self, count: int = 1) -> None:
        self.faults_injected += count

    def survived(self, count: int = 1) -> None:
        self.faults_survived += count

    def finish(self, expected: int, stored: int, lost: int, twice: int, differing: int) -> DrillResult:
        result = DrillResult(
            drill=self.name,
            faults_injected=self.faults_injected,
            faults_survived=self.faults_survived,
            bars_expected=expected,
            bars_stored=stored,
            points_lost=lost,
            stored_twice=twice,
            differing=differing,
            seconds=round(time.monotonic() - self.started, 1),
            notes="; ".join(self.notes),
        )
        _results.append(result)
        return result


@pytest.fixture
def drill(request: pytest.FixtureRequest) -> Drill:
    """A drill's figures, named after its test; the drill calls :meth:`Drill.finish` when it has checked the stores."""
    return Drill(request.node.name.removeprefix("test_").replace("_", " "))


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not _results:
        return
    terminalreporter.write_sep("=", "fault drills")
    terminalreporter.write_line(table(_results))
    report = Path(os.environ.get("MARKETPIPE_DRILL_REPORT", "drills-report.json"))
    report.write_text(json.dumps([asdict(r) for r in _results], indent=2) + "\n")
    terminalreporter.write_line(f"figures written to {report}")
