"""Print the fuzz seed after a run, so any failure can be replayed with FUZZ_SEED."""
from __future__ import annotations

from tests.fuzz.seeds import SEED


def pytest_terminal_summary(terminalreporter) -> None:
    terminalreporter.write_line(f"fuzz seed: {SEED} (replay with FUZZ_SEED={SEED})")
