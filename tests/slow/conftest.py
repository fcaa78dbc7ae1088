"""The slow tier's session summary: the wall time of each phase of the modules this run went through."""

from __future__ import annotations

import pytest

from tests.slow.guest import TIMINGS_REPORTS


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    for path, report in config.stash.get(TIMINGS_REPORTS, []):
        terminalreporter.write_line(f"slow tier wall times ({path}; serial consoles in tests/slow/.cache/logs/):")
        terminalreporter.write_line(report)
