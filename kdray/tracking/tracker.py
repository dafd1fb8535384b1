"""The sweep's MLflow writer: a Ray Tune callback in the driver, the only process that writes.

Several processes writing one SQLite file give "database is locked" (FIELD-NOTES), and trials on
other nodes cannot reach a local file anyway; so trials only *report* to Tune and this callback, in
the driver, turns each report into MLflow records. It is idempotent across resumes: the parent run is
found by the sweep's name, each child run by its Tune trial id, so a resumed sweep continues the same
runs instead of creating new ones.
"""
from __future__ import annotations

import json
import math
import sys
import threading
import time
from typing import Any

from ray.tune import Callback

from kdray import __version__
from kdray.tracking.store import (
    TAG_KIND,
    TAG_KNOWLEDGE,
    TAG_PARENT,
    TAG_STATUS,
    TAG_SWEEP,
    TAG_TRIAL,
    artifact_location,
    client,
    git_commit,
    run_params,
    sweep_children,
)

# Per-epoch metrics that are logged (strings such as teacher_source become tags).
METRICS = ("val_accuracy", "val_loss", "train_accuracy", "train_loss", "lr", "epoch_time_s", "train_time_s",
           "samples_per_s", "report_latency_s", "checkpoint_write_s", "resumed_from_epoch")


def searched_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's searched values keyed as in its resolved config: ``kd+sp:kd.temperature`` -> ``kd.temperature``."""
    return {k.split(":", 1)[-1]: v for k, v in config.items()}


def trial_number(trial: Any) -> int:
    """The trial's position in the sweep (1-based), from Tune's experiment tag (``5_knowledge=kd,...``)."""
    try:
        return int(str(trial.experiment_tag).split("_", 1)[0])
    except (AttributeError, ValueError):
        return 0


class SweepTracker(Callback):
    """Parent run per sweep, child run per trial, metrics per epoch, status and failure reasons."""

    def __init__(self, uri: str, experiment: str, sweep: str, space: Any, *, max_epochs: int,
                 space_yaml: str, total: int, quiet: bool = False) -> None:
        self.uri, self.experiment, self.sweep = uri, experiment, sweep
        self.space = space
        self.max_epochs, self.space_yaml, self.total, self.quiet = max_epochs, space_yaml, total, quiet
        self._init_state()

    def _init_state(self) -> None:
        self._client = None
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        self._children: dict[str, str] = {}
        self._last_step: dict[str, int] = {}  # run id -> last epoch logged (idempotent across resumes)
        self._tagged: set[str] = set()
        self._best: tuple[float, str] | None = None
        self._done = 0
        self._last_status = 0.0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment state
        state = self.__dict__.copy()
        for k in ("_client", "_lock", "_children", "_tagged", "_last_step"):
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._client, self._lock, self._children, self._tagged = None, threading.Lock(), {}, set()
        self._last_step = {}

    # -- set-up ----------------------------------------------------------------------------------------
    @property
    def c(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    def open(self, announce: bool = True) -> str:
        """Create (or, on resume, reopen) the experiment and the sweep's parent run; return its id."""
        c = self.c
        exp = c.get_experiment_by_name(self.experiment)
        self.experiment_id = exp.experiment_id if exp else c.create_experiment(
            self.experiment, artifact_location=artifact_location(self.uri),
            tags={"kdray.search_space": self.space.name})
        found = c.search_runs([self.experiment_id],
                              filter_string=f"tags.`{TAG_KIND}` = 'sweep' and tags.`{TAG_SWEEP}` = '{self.sweep}'",
                              max_results=1)
        if found:
            self.parent_id = found[0].info.run_id
            c.update_run(self.parent_id, status="RUNNING")
            for child in sweep_children(c, found[0]):
                tid = child.data.tags.get(TAG_TRIAL)
                if tid:
                    self._children[tid] = child.info.run_id
                    hist = c.get_metric_history(child.info.run_id, "val_accuracy")
                    self._last_step[child.info.run_id] = max((m.step for m in hist), default=0)
            if announce:
                self._say(f"resuming sweep {self.sweep}: {len(self._children)} trial runs already in MLflow")
        else:
            base = self.space.base
            tags = {TAG_KIND: "sweep", TAG_SWEEP: self.sweep, "mlflow.runName": self.sweep,
                    "kdray.version": __version__, "kdray.git_commit": git_commit(),
                    "dataset": str(base.get("dataset", {}).get("name", "mnist1d")),
                    "student": str(base.get("student", {}).get("name", "")),
                    "teacher": _teacher_name(base), "mlflow.note.content": self.space.description}
            run = c.create_run(self.experiment_id, tags=tags, run_name=self.sweep)
            self.parent_id = run.info.run_id
            fixed = {f"space.{k}": str(v) for k, v in {
                "name": self.space.name, "num_samples": self.total, "seed": self.space.seed,
                "metric": self.space.metric, "scheduler": self.space.scheduler.type,
                "searcher": self.space.searcher.type, "choices": ",".join(self.space.choices)}.items()}
            _log_params(c, self.parent_id, fixed)
            c.log_text(self.parent_id, self.space_yaml, "search_space.yaml")
        return self.parent_id

    def setup(self, **info: Any) -> None:
        if self.parent_id is None or self._client is None:
            self.open(announce=self.parent_id is None)  # a restored copy reconnects quietly

    # -- trials ------------------------------------------------------------------------------------
    def child(self, trial: Any) -> str:
        tid = trial.trial_id
        with self._lock:
            if tid in self._children:
                return self._children[tid]
            resolved = self.space.resolved_dict(trial.config)
            choice = trial.config.get("knowledge", "none")
            n = trial_number(trial)
            tags = {TAG_PARENT: self.parent_id, TAG_TRIAL: tid, TAG_SWEEP: self.sweep, TAG_KIND: "trial",
                    TAG_KNOWLEDGE: choice, TAG_STATUS: "running", "mlflow.runName": f"trial-{n:03d}-{choice}",
                    "kdray.trial_number": str(n),
                    "kdray.version": __version__, "kdray.git_commit": git_commit(),
                    "dataset": str(resolved.get("dataset", {}).get("name", "mnist1d")),
                    "student": str(resolved.get("student", {}).get("name", "")),
                    "teacher": _teacher_name(resolved)}
            run = self.c.create_run(self.experiment_id, tags=tags, run_name=tags["mlflow.runName"])
            rid = run.info.run_id
            _log_params(self.c, rid, run_params(resolved))
            self.c.log_dict(rid, resolved, "resolved_config.json")  # the whole config, to rerun it exactly
            # What the searcher chose, under the names shared by every choice (kd.temperature, train.lr).
            self.c.set_tag(rid, "kdray.searched", json.dumps(searched_params(trial.config), default=str))
            self._children[tid] = rid
            return rid

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self.child(trial)
        self._say(f"trial {trial_number(trial)}/{self.total} started: {_describe(trial.config)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        from mlflow.entities import Metric

        rid = self.child(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if step <= self._last_step.get(rid, 0):
            return  # an epoch re-run after a restore from an earlier checkpoint: already in MLflow
        self._last_step[rid] = step
        ts = int(time.time() * 1000)
        keys = [k for k in result if k in METRICS or k.startswith("loss_")]
        metrics = [Metric(k, float(result[k]), ts, step) for k in keys
                   if isinstance(result[k], (int, float)) and math.isfinite(float(result[k]))]
        if metrics:
            self.c.log_batch(rid, metrics=metrics)
        if rid not in self._tagged:
            tags = {f"kdray.{k}": str(result[k]) for k in ("node_ip", "node_id", "teacher_source", "teacher_reason")
                    if k in result}
            for k, v in tags.items():
                self.c.set_tag(rid, k, v)
            self._tagged.add(rid)
        val = result.get("val_accuracy")
        if isinstance(val, (int, float)) and (self._best is None or val > self._best[0]) and not result.get("failed"):
            self._best = (float(val), f"trial {trial_number(trial)} ({trial.config.get('knowledge')})")
        self._status(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rid = self.child(trial)
        last = trial.last_result or {}
        epoch = int(last.get("epoch", 0))
        n = trial_number(trial)
        if last.get("failed"):
            self.c.set_tag(rid, TAG_STATUS, "failed")
            self.c.set_tag(rid, "kdray.failure", str(last["failed"])[:5000])
            self.c.set_terminated(rid, "FAILED")
            self._say(f"trial {n} FAILED: {last['failed']}")
        else:
            early = epoch < self.max_epochs
            self.c.set_tag(rid, TAG_STATUS, "stopped_early" if early else "completed")
            self.c.set_tag(rid, "kdray.epochs", str(epoch))
            self.c.set_terminated(rid, "FINISHED")
            val = last.get("val_accuracy", float("nan"))
            self._say(f"trial {n} {'stopped early by ASHA at epoch ' + str(epoch) if early else 'finished'}: "
                      f"val_accuracy {val:.4f} ({_describe(trial.config)})")
        self._done += 1

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rid = self.child(trial)
        retries = trial.num_failures
        self.c.set_tag(rid, "kdray.retries", str(retries))
        self.c.set_tag(rid, TAG_STATUS, "retrying")
        err = _error_text(trial)
        if err:
            self.c.set_tag(rid, f"kdray.retry_{retries}_error", err[:5000])
        self._say(f"trial {trial_number(trial)} failed ({err.splitlines()[-1] if err else 'error'}); "
                  f"retry {retries} from its last checkpoint")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        rid = self.child(trial)
        err = _error_text(trial)
        self.c.set_tag(rid, TAG_STATUS, "error")
        self.c.set_tag(rid, "kdray.failure", err[:5000] or "error")
        if trial.num_failures:
            self.c.set_tag(rid, "kdray.retries", str(max(trial.num_failures - 1, 0)))
        self.c.set_terminated(rid, "FAILED")
        self._say(f"trial {trial_number(trial)} ERROR: {(err.splitlines() or ['?'])[-1]}")
        self._done += 1

    # -- output ------------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(f"[kdray] {msg}", file=sys.stdout, flush=True)

    def _status(self, trials: list) -> None:
        now = time.time()
        if now - self._last_status < 15:
            return
        self._last_status = now
        running = sum(1 for t in trials if t.status == "RUNNING")
        best = f", best val_accuracy {self._best[0]:.4f} ({self._best[1]})" if self._best else ""
        self._say(f"{self._done}/{self.total} trials done, {running} running{best}")


def _teacher_name(cfg: dict[str, Any]) -> str:
    t = cfg.get("teacher") or {}
    if t.get("train"):
        return str(t["train"].get("model", {}).get("name", ""))
    ck = t.get("checkpoint")
    return ",".join(ck) if isinstance(ck, list) else str(ck or "")


def _describe(params: dict[str, Any]) -> str:
    parts = [str(params.get("knowledge", "none"))]
    for k, v in params.items():
        if k == "knowledge":
            continue
        name = k.split(":", 1)[-1]
        parts.append(f"{name}={v:.3g}" if isinstance(v, float) else f"{name}={v}")
    return " ".join(parts)


def _error_text(trial: Any) -> str:
    try:
        err = trial.get_error()
    except Exception:  # noqa: BLE001
        err = None
    return str(err) if err else ""


def _log_params(c, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(k[:250], v) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i:i + 100])
