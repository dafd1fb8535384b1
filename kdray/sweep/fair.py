"""A fair budget across knowledge types: every type gets full-length trials before ASHA may abandon it.

Plain ASHA with TPE answers "which knowledge type wins?" unfairly. TPE piles trials onto whatever looked
good early, and ASHA's first rung compares a trial with every trial before it: a type whose advantage
shows late (KD regularises an MLP that overfits) is stopped at the first rung every time and never gets
a full-length trial. kdray's fair budget (``min_trials_per_type``, default 2) has two parts:

* **Stratified start-up**: the sweep's first trials go round-robin over the knowledge choices, each
  choice ``min_trials_per_type`` times (its other parameters sampled as usual), before the searcher
  chooses types freely.
* **Per-type ASHA** (:class:`FairASHA`): the first ``min_trials_per_type`` trials of each type run their
  full length; they are recorded at the rungs but never stopped. Until a type has that many full-length
  trials, a later trial of it is compared at a rung only with trials of the same type; afterwards with
  every trial, as ASHA does. A protected trial that fails frees its slot for the next trial of its type.

The rung rule is Ray's ASHA (``AsyncHyperBandScheduler``, one bracket): rungs at ``grace_period *
reduction_factor**k`` below ``max_t``; at a rung a trial stops if its value is below the
``1 - 1/reduction_factor`` quantile of the values recorded there (``numpy.nanpercentile``).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, TrialScheduler

from kdray.sweep.space import NONE


def fair_start(choices: list[str], per_type: int, num_samples: int) -> list[str]:
    """The knowledge choices of the first trials: round-robin, each ``per_type`` times, at most ``num_samples``."""
    order = [c for _ in range(per_type) for c in choices]
    return order[:num_samples]


def milestones(max_t: int, grace_period: int, reduction_factor: float) -> list[int]:
    """ASHA's rungs below ``max_t`` (a rung at ``max_t`` decides nothing: the trial ends there anyway)."""
    if grace_period >= max_t:
        return []
    n = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    out = [int(round(grace_period * reduction_factor ** k)) for k in range(n)]
    return sorted({m for m in out if m < max_t})


class FairRungs:
    """The bookkeeping of :class:`FairASHA`, without Tune: trials by id, their type, their values at rungs."""

    def __init__(self, max_t: int, grace_period: int, reduction_factor: float, min_trials_per_type: int) -> None:
        self.rf, self.min_full = float(reduction_factor), int(min_trials_per_type)
        self.rungs = milestones(max_t, grace_period, reduction_factor)
        self.recorded: dict[int, dict[str, dict[str, float]]] = {m: {} for m in self.rungs}
        self.kind: dict[str, str] = {}
        self.protected: set[str] = set()
        self.slots: dict[str, int] = {}  # protected trials of each type that have not failed
        self.full: dict[str, int] = {}  # full-length trials of each type
        self.stopped = 0

    def add(self, trial_id: str, kind: str) -> bool:
        """Register a trial; True if it is protected (one of its type's first ``min_trials_per_type``). A trial
        added again (Tune re-adds a trial it retries) keeps what it had."""
        if trial_id in self.kind:
            return trial_id in self.protected
        self.kind[trial_id] = kind
        if self.slots.get(kind, 0) < self.min_full:
            self.slots[kind] = self.slots.get(kind, 0) + 1
            self.protected.add(trial_id)
            return True
        return False

    def settled(self, kind: str) -> bool:
        """True once ``kind`` has its full-length trials: from then on its trials meet every type's at rungs."""
        return self.full.get(kind, 0) >= self.min_full

    def decide(self, trial_id: str, epoch: float, value: float) -> bool:
        """A trial's result at ``epoch`` (or ``budget_epochs``, a budget in tokens: a fraction of an epoch is
        judged at the highest rung it has passed): True to continue, False to stop it."""
        kind = self.kind.get(trial_id, NONE)
        reached = [m for m in self.rungs if epoch >= m]
        if not reached:
            return True
        m = reached[-1]  # the highest rung reached; a trial is judged once per rung
        if any(trial_id in per for per in self.recorded[m].values()):
            return True
        pool = self.recorded[m].get(kind, {}) if not self.settled(kind) else {
            t: v for per in self.recorded[m].values() for t, v in per.items()}
        values = list(pool.values())
        cutoff = float(np.nanpercentile(values, (1 - 1 / self.rf) * 100)) if values else None
        self.recorded[m].setdefault(kind, {})[trial_id] = float(value)
        if trial_id in self.protected or cutoff is None or not value < cutoff:
            return True
        self.stopped += 1
        return False

    def end(self, trial_id: str, full_length: bool) -> None:
        """A trial ended (completed, stopped, failed or removed); a protected one that did not run its
        full length gives its slot to the next trial of its type."""
        kind = self.kind.pop(trial_id, None)
        if kind is None:
            return
        if full_length:
            self.full[kind] = self.full.get(kind, 0) + 1
        elif trial_id in self.protected:
            self.slots[kind] -= 1
        self.protected.discard(trial_id)


class FairASHA(FIFOScheduler):
    """ASHA with a fair budget per knowledge type (see the module docstring), as a Tune scheduler."""

    def __init__(self, *, metric: str, max_t: int, grace_period: int, reduction_factor: float,
                 min_trials_per_type: int, time_attr: str = "epoch", mode: str = "max") -> None:
        super().__init__()
        self._metric, self.time_attr, self.max_t = metric, time_attr, int(max_t)
        self._sign = 1.0 if mode == "max" else -1.0  # the rungs keep "higher is better" values
        self.rungs = FairRungs(max_t, grace_period, reduction_factor, min_trials_per_type)

    def set_search_properties(self, metric: str | None, mode: str | None, **spec: Any) -> bool:
        return True  # the metric is the space's, set at construction

    def on_trial_add(self, tune_controller: Any, trial: Any) -> None:
        kind = (trial.config or {}).get("knowledge", NONE)
        if trial.status in ("TERMINATED", "ERROR"):
            # --resume re-adds every trial of the sweep (the scheduler itself is rebuilt from the Tuner): a trial
            # that already ended counts as the full-length trial it was, and holds no slot
            from kdray.runfiles import ran_all_epochs

            last = trial.last_result or {}
            if trial.status == "TERMINATED" and not last.get("failed") and ran_all_epochs(last, self.max_t):
                self.rungs.full[kind] = self.rungs.full.get(kind, 0) + 1
                self.rungs.slots[kind] = self.rungs.slots.get(kind, 0) + 1
            return
        self.rungs.add(trial.trial_id, kind)

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("failed") or self.time_attr not in result or self._metric not in result:
            return TrialScheduler.CONTINUE
        go = self.rungs.decide(trial.trial_id, float(result[self.time_attr]), self._sign * float(result[self._metric]))
        return TrialScheduler.CONTINUE if go else TrialScheduler.STOP

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        from kdray.runfiles import ran_all_epochs

        self.rungs.end(trial.trial_id, bool(result) and not result.get("failed")
                       and ran_all_epochs(result, self.max_t))

    def on_trial_remove(self, tune_controller: Any, trial: Any) -> None:
        self.rungs.end(trial.trial_id, False)

    def on_trial_error(self, tune_controller: Any, trial: Any) -> None:
        """An error ends the trial or precedes its retry (Tune then adds it again): either way its slot is free."""
        self.rungs.end(trial.trial_id, False)

    def debug_string(self) -> str:
        return f"kdray fair ASHA: rungs {self.rungs.rungs}, {self.rungs.stopped} stopped, full-length per type " \
               f"{self.rungs.full}"



class FailureAwareASHA(ASHAScheduler):
    """Ray's ASHA (fair budget off) that records no failure report at its rungs: a trial whose loss became NaN ends
    with ``val_accuracy: 0.0`` (``val_nll: inf``) and ``failed`` set, a value that is no measurement and would move
    every later trial's cutoff (FairASHA ignores them the same way)."""

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        if result.get("failed"):
            return TrialScheduler.CONTINUE  # its last report: the trial ends by itself
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        if result and result.get("failed"):
            self._trial_info.pop(trial.trial_id, None)  # forgotten, not recorded
            return
        super().on_trial_complete(tune_controller, trial, result)
