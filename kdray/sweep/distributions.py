"""A search space's vocabulary: one searched parameter in Optuna's terms (:class:`Distribution`), the scheduler's and
the searcher's settings, and how many stages a teacher-assistant chain makes (what ASHA's horizon needs)."""
from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kdray.config import Strict


def chain_stages(chain: Any) -> list[int]:
    """The stages a teacher-assistant chain makes (its models, then the student), for each value it can take."""
    if isinstance(chain, Distribution):
        return [n for c in chain.choices or [] for n in chain_stages(c)]
    if isinstance(chain, str):
        return [len([n for n in chain.split(",") if n.strip()]) + 1]
    return [len(chain) + 1] if isinstance(chain, list) and chain else []


class Distribution(BaseModel):
    """One searched parameter, in Optuna's vocabulary."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["float", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    log: bool = False
    step: float | None = Field(None, gt=0)
    choices: list[Any] | None = None

    @model_validator(mode="after")
    def _coherent(self) -> "Distribution":
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical needs a non-empty `choices` list")
            if self.low is not None or self.high is not None or self.log or self.step is not None:
                raise ValueError("a categorical takes only `choices`")
            bad = [c for c in self.choices if not (c is None or isinstance(c, (str, int, float, bool)))]
            if bad:
                raise ValueError(f"Optuna's categorical choices must be strings, numbers, booleans or null; "
                                 f"got {bad[0]!r} "
                                 "(fix a list-valued parameter as a plain value instead)")
            if len({repr(c) for c in self.choices}) != len(self.choices):
                raise ValueError(f"`choices` has duplicates: {self.choices}")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} takes low/high, not `choices`")
        if self.low is None or self.high is None:
            raise ValueError(f"a {self.type} needs both `low` and `high`")
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            raise ValueError("`low` and `high` must be finite numbers")
        if self.low >= self.high:
            raise ValueError(f"`low` ({self.low}) must be smaller than `high` ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"a log-scaled range needs `low` > 0, got {self.low}")
        if self.log and self.step is not None:
            raise ValueError("Optuna does not combine `log` with `step`")
        if self.type == "int":
            if not float(self.low).is_integer() or not float(self.high).is_integer():
                raise ValueError("an int range needs whole `low` and `high`")
            if self.step is not None and not float(self.step).is_integer():
                raise ValueError("an int `step` must be whole")
        return self

    def suggest(self, trial: Any, name: str) -> Any:
        if self.type == "categorical":
            return trial.suggest_categorical(name, self.choices)
        if self.type == "int":
            return trial.suggest_int(name, int(self.low), int(self.high), step=int(self.step or 1), log=self.log)
        return trial.suggest_float(name, self.low, self.high, step=self.step, log=self.log)

    def extremes(self) -> list[Any]:
        """Values that together exercise the range: both ends, or every categorical choice."""
        if self.type == "categorical":
            return list(self.choices)
        cast = int if self.type == "int" else float
        return [cast(self.low), cast(self.high)]

    def grid(self, n: int) -> list[Any]:
        """``n`` evenly spaced values (log-spaced for log ranges), or every categorical choice."""
        if self.type == "categorical":
            return list(self.choices)
        if n <= 1:
            mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
            values = [mid]
        elif self.log:
            values = [math.exp(math.log(self.low) + i * (math.log(self.high) - math.log(self.low)) / (n - 1))
                      for i in range(n)]
        else:
            values = [self.low + i * (self.high - self.low) / (n - 1) for i in range(n)]
        if self.type == "int":
            return sorted({int(round(v)) for v in values})
        return values


def parse_value(raw: Any) -> Distribution | Any:
    """A mapping with ``type`` is a distribution; anything else is a fixed value."""
    if isinstance(raw, dict) and "type" in raw:
        return Distribution.model_validate(raw)
    return raw


class SchedulerConfig(Strict):
    type: Literal["asha", "fifo"] = "asha"
    grace_period: int = Field(4, ge=1, description="epochs every trial runs before ASHA may stop it")
    reduction_factor: float = Field(2.0, gt=1)
    unit: Literal["epochs", "tokens"] = Field(
        "epochs", description="what ASHA's rungs count: epochs, or (language models) tokens: each target token "
                              "trained on plus each token the student generated, in epochs of the training split's "
                              "target tokens (budget_epochs), so a trial that generates meets each rung sooner")


class SearcherConfig(Strict):
    type: Literal["tpe", "random", "grid"] = "tpe"
    n_startup_trials: int = Field(8, ge=0, description="random trials before TPE models the space")
    grid_points: int = Field(3, ge=1, description="values per numeric parameter for the grid searcher")


__all__ = ["Distribution", "SchedulerConfig", "SearcherConfig", "chain_stages", "parse_value"]
