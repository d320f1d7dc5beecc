"""The container test's timing line, printed again at the end of the run (tests/containers/
conftest.py), so that CI logs carry the figures even when the test passed."""

LINES: list[str] = []


def add(line: str) -> None:
    print(line)
    LINES.append(line)
