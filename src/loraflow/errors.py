"""loraflow's user-facing errors: each one says what is wrong, with which value, and how to fix it."""

from __future__ import annotations


class LoraflowError(Exception):
    """Base class for errors caused by the user's input rather than by a bug."""


class ConfigError(LoraflowError, ValueError):
    """One or more invalid settings. `problems` holds every one of them, not just the first."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        noun = "problem" if len(self.problems) == 1 else "problems"
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"Invalid configuration ({len(self.problems)} {noun}):\n{lines}")


class DataError(LoraflowError, ValueError):
    """A training or evaluation data file that cannot be used. The message names the file."""


FIRST_ROWS = 5  # how many bad row numbers a message lists


def row_list(rows: list[int]) -> str:
    """The first `FIRST_ROWS` row numbers, then `...` if there are more."""
    return ", ".join(str(r) for r in rows[:FIRST_ROWS]) + (", ..." if len(rows) > FIRST_ROWS else "")
