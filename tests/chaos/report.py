"""Summary lines of the chaos scenarios, printed again at the end of the run (tests/conftest.py's
``pytest_terminal_summary``), so that CI logs carry each scenario's figures even when it passed."""

LINES: list[str] = []


def add(line: str) -> None:
    print(line)
    LINES.append(line)
