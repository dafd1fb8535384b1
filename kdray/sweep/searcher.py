"""Optuna through Ray Tune, with a deliberate answer to "what does an early-stopped trial tell Optuna?".

Ray's ``OptunaSearch`` tells Optuna that a trial ASHA stopped early COMPLETED, with its last (early,
low) value (FIELD-NOTES). TPE then models those half-trained scores as if they were final results
and steers away from regions that were merely stopped early. kdray tells Optuna the truth instead:

* stopped early by ASHA -> ``PRUNED``. Optuna already received every epoch's value as an
  intermediate value, and its TPE ranks pruned trials by how far they got and their last value,
  below every completed trial: exactly ASHA's verdict ("worse than the trials it let continue").
* a trial whose loss became NaN/inf (``failed`` in its last report) or that errored -> ``FAIL``;
  TPE ignores failed trials.
* ran every epoch -> ``COMPLETE`` with its final validation accuracy (and, in a two-objective search, its
  cost: latency or parameter count, which Optuna's multi-objective TPE minimises).
"""
from __future__ import annotations

import os
import pickle
import time
import warnings
from typing import Any

import optuna
from optuna.trial import TrialState
from ray.tune.search import ConcurrencyLimiter, Searcher
from ray.tune.search.optuna import OptunaSearch

from kdray.runfiles import ran_all_epochs


def make_sampler(kind: str, seed: int, n_startup_trials: int) -> optuna.samplers.BaseSampler:
    """A seeded sampler: the same seed and space propose the same trials (when run one at a time)."""
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # group=True: with conditional parameters (each knowledge type's own sub-space) multivariate TPE
    # models each group of co-occurring parameters jointly instead of falling back to independent TPE.
    # multivariate and group are "experimental" in Optuna's terms, and kdray chose them knowingly: no warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                          n_startup_trials=n_startup_trials)


TUNE_ID_ATTR = "kdray.trial_id"  # user attribute of each Optuna trial: Tune's id of the trial (MLflow's kdray.trial_id)
SNAPSHOT_FILE = "optuna-snapshot.db"  # beside Tune's state (remote storage): the study as of its last ask or tell
# With remote storage: where each sweep's study copy is published (``optuna-snapshot.db`` beside Tune's state), set by
# the driver for new and resumed sweeps alike.
PUBLISH_URIS: dict[str, str] = {}
# Where each sweep's study lives in *this* process, set by the driver before Tune restores a searcher: the
# pickled searcher names the SQLite path of the machine that started the sweep.
STUDY_URLS: dict[str, str] = {}


class StudyStorage(optuna.storages.RDBStorage):
    """The sweep's Optuna study in SQLite, reopened where this process keeps it when a searcher is unpickled
    (``Tuner.restore`` on another machine or in another folder), not at the path it was created with."""

    def __init__(self, url: str, study_name: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        self.kdray_study = study_name

    def __reduce__(self):
        return _reopen_study, (self.kdray_study, self.url)


def _reopen_study(study_name: str, url: str) -> StudyStorage:
    return StudyStorage(STUDY_URLS.get(study_name, url), study_name)


def snapshot_sqlite(url: str, dest: str) -> None:
    """A consistent copy of a SQLite database (SQLite's online backup: safe while the study is written)."""
    import contextlib
    import sqlite3

    tmp = dest + ".tmp"
    with contextlib.closing(sqlite3.connect(url.removeprefix("sqlite:///"))) as src, \
            contextlib.closing(sqlite3.connect(tmp)) as out:
        src.backup(out)
    os.replace(tmp, dest)


class KdraySearch(OptunaSearch):
    """``OptunaSearch`` that reports early-stopped trials as PRUNED and NaN trials as FAIL, and (remote storage)
    publishes a copy of its study beside Tune's state at every ask and tell."""

    def __init__(self, *args: Any, max_epochs: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_epochs = int(max_epochs)
        self.orphans: list[int] = []  # see align: storage ids of Optuna trials a killed driver asked and left

    def publish(self) -> None:
        """With remote storage, upload a copy of the study (``optuna-snapshot.db``) now, before Tune can save a state
        that reflects this ask or tell: a resume on another machine after a SIGKILL then never finds a study older
        than Tune's stored state. Tune's own upload of its state folder cannot promise that: it copies the files one
        by one in a background thread while its next save rewrites them, and skips a sync while one is in flight
        (``tune/execution/experiment_state.py``, ``train/_internal/syncer.py``), which twice left a trial Tune had
        finished RUNNING or WAITING in the stored copy. Called on every ask and tell (two small uploads per trial),
        not on intermediate values, which a resumed trial reports again."""
        uri = PUBLISH_URIS.get(self._study_name)
        url = getattr(self._storage, "url", "") if self._storage is not None else ""
        if not uri or not url.startswith("sqlite:///"):
            return
        from kdray import storage

        tmp = url.removeprefix("sqlite:///") + ".publish"
        try:
            snapshot_sqlite(url, tmp)
            with open(tmp, "rb") as f:
                storage.write_bytes(uri, f.read())
        except OSError as e:  # the storage is down: the sweep goes on; the end of the sweep settles the study
            warnings.warn(f"could not upload the Optuna study to {uri}: {e}", stacklevel=2)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id not in self._ot_trials or result.get("failed"):
            return  # unknown after an interrupted run's restore, or a failure report (no real value)
        if isinstance(self.metric, list):
            return  # Optuna takes no intermediate values for several objectives (and nothing prunes them)
        if self.metric in result:
            try:
                super().on_trial_result(trial_id, result)
            except optuna.exceptions.UpdateFinishedTrialError:
                # After a SIGKILL the restored searcher may be older than the study in SQLite: a trial told
                # COMPLETE just before the kill is re-run from its checkpoint. Optuna already has its result.
                self._completed_trials.add(trial_id)

    def suggest(self, trial_id: str) -> dict | None:
        """Ray's suggestion, with Tune's trial id written on the Optuna trial: the key by which a study that lags
        Tune's state (see :func:`close_abandoned`) is told the results it missed, and by which a trial in
        optuna-dashboard is found in MLflow (``kdray.trial_id``)."""
        fresh = trial_id not in self._ot_trials
        if fresh and getattr(self, "orphans", None):  # a searcher pickled before orphans existed has none
            self._ot_trials[trial_id] = optuna.trial.Trial(self._ot_study, self.orphans.pop(0))
        config = super().suggest(trial_id)
        if fresh and trial_id in self._ot_trials:
            self._ot_trials[trial_id].set_user_attr(TUNE_ID_ATTR, trial_id)
            self.publish()
        return config

    def align(self, trials: dict[str, str]) -> list[str]:
        """The map of Tune trials to Optuna trials as of the trials Tune restores (``trials``: id -> status; see
        ``resume.align_search_state``); returns what changed.

        * A trial Tune restores but this (older) searcher never asked for is found in the study by its
          ``kdray.trial_id``: its results are told to its own Optuna trial.
        * A trial this (newer) searcher asked for but Tune does not restore is dropped; Tune proposes another.
        * An Optuna trial a killed driver asked for after Tune's last stored save (RUNNING, no Tune trial, no value
          reported) is handed to the next trial Tune proposes (:meth:`suggest`): the study holds the sweep's trials,
          none left behind as FAIL. One that had reported values ran in part: ``close_abandoned`` marks it FAIL.
          (A study copy uploaded at asks and tells only, or a two-objective study, which takes no intermediate
          values, shows none for a trial that did run in part: it is handed on and run again, whole.)"""
        study, known = self._ot_study, set(trials)
        by_tid = {t.user_attrs.get(TUNE_ID_ATTR): t for t in study.get_trials(deepcopy=False)}
        dropped = sorted(set(self._ot_trials) - known)
        found = sorted(t for t in known - set(self._ot_trials) if t in by_tid)
        self._ot_trials = {t: tr for t, tr in self._ot_trials.items() if t in known}
        self._ot_trials.update({t: optuna.trial.Trial(study, by_tid[t]._trial_id) for t in found})
        self._completed_trials = {t for t in self._completed_trials if t in known}
        mapped = {tr._trial_id for tr in self._ot_trials.values()}
        self.orphans = [t._trial_id for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
                        if t.user_attrs.get(TUNE_ID_ATTR) not in known and t._trial_id not in mapped
                        and not t.intermediate_values]
        return ([f"searcher: {len(dropped)} trial(s) Tune does not restore dropped"] if dropped else []) + \
            ([f"searcher: {len(found)} restored trial(s) found in the study"] if found else []) + \
            ([f"searcher: {len(self.orphans)} Optuna trial(s) asked but never run handed to the next trials"]
             if self.orphans else [])

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._completed_trials or trial_id not in self._ot_trials:
            return
        value, state = verdict(result, self.metric, self.max_epochs, error)
        # skip_if_finished: a trial told before an interruption (see on_trial_result) keeps its first verdict
        self._ot_study.tell(self._ot_trials[trial_id], value, state=state, skip_if_finished=True)
        self._completed_trials.add(trial_id)
        self.publish()


def verdict(result: dict | None, metric: str | list[str], max_epochs: int,
            error: bool = False) -> tuple[float | list[float] | None, TrialState]:
    """What Optuna is told of an ended trial (the module's docstring): COMPLETE with its value(s), PRUNED, or FAIL."""
    metrics = metric if isinstance(metric, list) else [metric]
    if error or not result or result.get("failed") or not all(m in result for m in metrics):
        return None, TrialState.FAIL
    if not ran_all_epochs(result, max_epochs):
        return None, TrialState.PRUNED
    values = [float(result[m]) for m in metrics]
    return (values if isinstance(metric, list) else values[0]), TrialState.COMPLETE


class ElasticLimiter(ConcurrencyLimiter):
    """Tune's ``ConcurrencyLimiter`` whose limit follows the cluster: as many trials as the workers present
    now hold (at least one, whose pending request is what makes an autoscaler add a node), up to
    ``ceiling``. Tune's own ``max_concurrent_trials`` is fixed when the sweep starts, which on a cluster
    whose workers join later would mean one trial at a time for the whole sweep."""

    def __init__(self, searcher: Searcher, ceiling: int, resources: Any, refresh_s: float = 2.0) -> None:
        self.resources, self.refresh_s = resources, refresh_s
        self._fit, self._checked = 1, float("-inf")
        super().__init__(searcher, max_concurrent=ceiling)

    @property
    def max_concurrent(self) -> int:
        now = time.monotonic()
        if now - self._checked >= self.refresh_s:
            from kdray.ray_setup import cluster_resources, trials_that_fit

            self._fit, self._checked = max(1, trials_that_fit(cluster_resources(), self.resources)), now
        return min(self._ceiling, self._fit)

    @max_concurrent.setter
    def max_concurrent(self, value: int) -> None:
        self._ceiling = value

    def set_state(self, state: dict) -> None:
        """A restored limiter re-reads the cluster: its saved timestamp is another process's clock."""
        super().set_state(state)
        self._fit, self._checked = 1, float("-inf")


def state_counts(study: optuna.Study) -> dict[str, int]:
    out: dict[str, int] = {}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] = out.get(t.state.name, 0) + 1
    return out


class GridSearch(Searcher):
    """The grid of a conditional space (every choice x ``grid_points`` values per parameter), in order.

    Tune's ``points_to_evaluate`` needs every key of every point in ``param_space``, which a conditional
    space cannot give; this searcher hands out the points itself and finishes after the last one.
    """

    def __init__(self, points: list[dict[str, Any]], metric: str, mode: str) -> None:
        super().__init__(metric=metric, mode=mode)
        self.points = list(points)
        self.next = 0

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        return True

    def suggest(self, trial_id: str) -> dict[str, Any] | None:
        if self.next >= len(self.points):
            return Searcher.FINISHED
        point = dict(self.points[self.next])
        self.next += 1
        return point

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        pass

    def align(self, trials: dict[str, str]) -> list[str]:
        """Points are handed out in order, one per trial: the next is the one after the trials Tune restores."""
        if self.next == len(trials):
            return []
        was, self.next = self.next, len(trials)
        return [f"grid: next point {was} -> {self.next}"]

    def save(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "wb") as f:
            pickle.dump({"points": self.points, "next": self.next}, f)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as f:
            state = pickle.load(f)
        self.points, self.next = state["points"], state["next"]


def close_abandoned(storage_url: str, study_name: str, ended: dict[str, dict | None], metric: str | list[str],
                    max_epochs: int) -> dict[str, int]:
    """Settle the study's RUNNING trials once the sweep is over; returns how many were told (``told``) and how
    many marked FAIL (``abandoned``).

    * A trial Tune ran to its end (``ended``: Tune's trial id -> last result, None if it erred) is told its
      verdict. Its twin can still be RUNNING after a resume when the stored study copy is older than Tune's
      stored state (an upload in :meth:`KdraySearch.publish` that failed): Tune does not run that trial again.
    * A trial Tune does not know was asked after Tune's last state save and re-proposed under a new id after a
      SIGKILL: FAIL, or its old twin would stay RUNNING forever in optuna-dashboard."""
    study = optuna.load_study(study_name=study_name, storage=storage_url)
    out = {"told": 0, "abandoned": 0}
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        tid = t.user_attrs.get(TUNE_ID_ATTR)
        if tid in ended:
            value, state = verdict(ended[tid], metric, max_epochs, error=ended[tid] is None)
            out["told"] += 1
        else:
            value, state = None, TrialState.FAIL
            out["abandoned"] += 1
            study._storage.set_trial_user_attr(t._trial_id, "kdray.abandoned",
                                               "started by a driver that was killed; Tune ran another trial instead")
        study.tell(t.number, value, state=state, skip_if_finished=True)
    return out
