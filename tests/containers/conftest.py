"""tests/containers: the timing lines at the end of the run."""

from tests.containers import report


def pytest_terminal_summary(terminalreporter):
    if report.LINES:
        terminalreporter.section("containers")
        for line in report.LINES:
            terminalreporter.write_line(line)
