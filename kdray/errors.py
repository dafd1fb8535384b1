"""kdray's exceptions: one root, :class:`KdrayError`, with the exit status the command line gives it.

The CLI catches the root once (``kdray.cli.main``): a bad input exits 2 naming the file and the field
(:class:`ConfigError`), a runtime failure exits 1 with its message. Every module raises a subclass of the root
for what a user can act on; Python's own exceptions stay for programming errors.
"""
from __future__ import annotations

from pathlib import Path


class KdrayError(Exception):
    """A failure at run time (not a config problem): exit status 1 with this message."""

    exit_code = 1


class ConfigError(KdrayError):
    """A bad config: a list of (field, message) pairs, and the file they came from. Exit status 2."""

    exit_code = 2

    def __init__(self, errors: list[tuple[str, str]] | str, file: str | Path | None = None, field: str = "") -> None:
        if isinstance(errors, str):
            errors = [(field, errors)]
        self.errors = errors
        self.file = str(file) if file else None
        super().__init__(self._message())

    def with_file(self, file: str | Path) -> "ConfigError":
        return ConfigError(self.errors, file)

    def _message(self) -> str:
        where = f"{self.file}: " if self.file else ""
        lines = [f"{where}{f'field {f!r}: ' if f else ''}{m}" for f, m in self.errors]
        return lines[0] if len(lines) == 1 else f"{len(lines)} problems:\n  " + "\n  ".join(lines)

    def __str__(self) -> str:
        return self._message()

    @property
    def fields(self) -> list[str]:
        return [f for f, _ in self.errors]


class SweepError(KdrayError):
    """A sweep that cannot start or complete."""


class FinalError(KdrayError):
    """``kdray final`` cannot retrain or compare (no champion, too many failed runs, ...)."""


class BudgetError(KdrayError):
    """``kdray best --max-latency-ms/--max-params``: no trial meets the budget, or its student cannot be read."""


class TrainingFailed(KdrayError):
    """A run that ended without a usable model (its loss became NaN, or it wrote no checkpoint)."""


class TrackingUnavailable(KdrayError):
    """The MLflow tracking store cannot be reached (or refuses the request)."""


class DatasetUnavailable(KdrayError):
    """A data set that is not on this machine and may not be downloaded."""


__all__ = ["BudgetError", "ConfigError", "DatasetUnavailable", "FinalError", "KdrayError", "SweepError",
           "TrackingUnavailable", "TrainingFailed"]
