"""What a sweep optimises: one validation metric and its direction, and the test metric ``final`` compares.

Classifiers maximise ``val_accuracy``; language models minimise ``val_nll`` (nats per target token), or, on tasks with
exact answers, maximise ``val_exact_match``. Every place that
ranks trials (the leaderboard, the champion, ASHA's rungs, the budget per type, ``compare``, ``best``, ``final``) asks
the sweep's :class:`Goal` instead of assuming "higher is better". A sweep records its metric on its MLflow run
(``kdray.metric``), so the commands that read a sweep back rank it the same way.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

TAG_METRIC = "kdray.metric"


@dataclass(frozen=True)
class Goal:
    metric: str  # the validation metric, e.g. val_accuracy
    mode: str  # max | min

    @property
    def name(self) -> str:
        """``accuracy`` / ``nll``: the metric without its split."""
        return self.metric.removeprefix("val_")

    @property
    def test(self) -> str:
        """The same metric on the test split (``test_accuracy``, ``test_nll``)."""
        return f"test_{self.name}"

    @property
    def maximise(self) -> bool:
        return self.mode == "max"

    def key(self, value: float | None) -> float:
        """A sort key, larger is better; NaN (no value) ranks last."""
        if value is None or math.isnan(float(value)):
            return -math.inf
        return float(value) if self.maximise else -float(value)

    def better(self, a: float, b: float) -> bool:
        return self.key(a) > self.key(b)

    @property
    def worst(self) -> float:
        """What a trial that measured nothing reports (a failure): below (above) every real value."""
        return 0.0 if self.maximise else math.inf

    @property
    def label(self) -> str:
        return {"accuracy": "accuracy", "nll": "NLL (nats/token)", "exact_match": "exact match"}.get(self.name,
                                                                                                     self.name)

    @property
    def percent(self) -> bool:
        """Accuracies are shown in percent; NLL as it is."""
        return self.name in ("accuracy", "exact_match")

    def show(self, value: float) -> float:
        return value * 100.0 if self.percent else value


GOALS = {"val_accuracy": Goal("val_accuracy", "max"), "val_nll": Goal("val_nll", "min"),
         # rows of prompt + answer (lm_tasks): the fraction answered exactly by greedy generation
         "val_exact_match": Goal("val_exact_match", "max")}
ACCURACY = GOALS["val_accuracy"]


def goal_of(metric: str | None) -> Goal:
    """The goal of a metric name (None: accuracy, what sweeps recorded before they said)."""
    if not metric:
        return ACCURACY
    if metric not in GOALS:
        raise ValueError(f"unknown sweep metric {metric!r}; known: {', '.join(GOALS)}")
    return GOALS[metric]


__all__ = ["ACCURACY", "GOALS", "Goal", "TAG_METRIC", "goal_of"]
