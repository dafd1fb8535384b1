"""``kdray final``: what distillation gained, with error bars, on the test split.

A sweep selects on one validation split with one seed, so its best trial is an optimistic estimate.
``final`` retrains the champion's configuration and the best labels-only (``none``) configuration with
K fresh seeds each, evaluates every run once on the test split, and reports mean ± std for both, the
teacher's own accuracy, the gain and its significance (Welch's t-test, and a bootstrap 95 % interval
of the difference of means). The result is an MLflow run under the sweep, shown by ``kdray compare``
and attached to the registered champion as tags and a description.

The package: :mod:`~kdray.final.champion` (champion vs labels only), :mod:`~kdray.final.per_type` (every type vs
labels only, paired), :mod:`~kdray.final.jobs` (the retraining runs, recorded as they end) and
:mod:`~kdray.final.stats` (the tests and intervals).
"""
from __future__ import annotations

from kdray.errors import FinalError
from kdray.final.champion import FinalResult, format_table, run_final
from kdray.final.jobs import KIND_SEED, best_labels_only, best_of_type, labels_only, train_and_test
from kdray.final.per_type import PerTypeResult, format_per_type, run_final_per_type, student_label
from kdray.final.stats import bootstrap_ci, holm, paired, welch

__all__ = ["KIND_SEED", "FinalError", "FinalResult", "PerTypeResult", "best_labels_only", "best_of_type",
           "bootstrap_ci", "format_per_type", "format_table", "holm", "labels_only", "paired", "run_final",
           "run_final_per_type", "student_label", "train_and_test", "welch"]
