"""The sweep's MLflow writer: a Ray Tune callback in the driver, the only process that writes.

Several processes writing one SQLite file give "database is locked" (FIELD-NOTES), and trials on
other nodes cannot reach a local file anyway; so trials only *report* to Tune and this callback, in
the driver, turns each report into MLflow records. It is idempotent across resumes: the parent run is
found by the sweep's name, each child run by its Tune trial id, so a resumed sweep continues the same
runs instead of creating new ones.

The callbacks never call MLflow themselves: they put records on an ordered queue that one writer
thread drains (``_Writer``), so a slow or absent store neither holds up Tune's loop nor fails a trial.
Per-epoch metrics are coalesced per run into ``log_batch`` calls. A failing call is retried with
exponential backoff (0.5 s doubling to 30 s) while the queue keeps growing in memory and training goes
on; the first failure and the recovery are announced on one line each. A record leaves the queue only
once MLflow has it, and the queue is part of the callback's state that Tune checkpoints with the
experiment, so a sweep that ends (or is killed) while the store is down writes the rest on ``--resume``.
Replaying is harmless: MLflow keeps one row per identical metric (same key, value, step, timestamp),
and tags and params are rewritten with the same values.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from kdray.goal import TAG_METRIC
from kdray.runfiles import ran_all_epochs
from kdray.tracking.store import (
    TAG_KIND,
    TAG_KNOWLEDGE,
    TAG_PARENT,
    TAG_STATUS,
    TAG_SWEEP,
    TAG_TRIAL,
    already_exists,
    artifact_location,
    client,
    first_line,
    git_commit,
    run_params,
    sweep_children,
    transient,
)
from kdray.tracking.writer import BACKOFF_MAX_S, BACKOFF_START_S, log_params, quick_http_retries, writer_for
from kdray.version import __version__

# Per-epoch metrics that are logged (strings such as teacher_source become tags).
METRICS = ("val_accuracy", "val_loss", "train_accuracy", "train_loss", "lr", "epoch_time_s", "train_time_s",
           "samples_per_s", "report_latency_s", "checkpoint_write_s", "resumed_from_epoch", "generation", "best_peer",
           "teacher_cached_fraction", "student_params", "latency_ms", "latency_b64_ms",
           # language models: per target token, at T = 1 (kdray.data.evaluate.evaluate_lm)
           "val_nll", "val_ppl", "val_kl_teacher", "val_rkl_teacher", "val_top1_agree", "val_kl_true", "tokens_per_s",
           # prompt/answer rows (lm_tasks): greedy answers exactly right; on_policy: what the student generated
           "val_exact_match", "on_policy_fraction", "generated_tokens",
           # the spend of a language model's trial in tokens (kdray.train.loop.budget_metrics)
           "budget_tokens", "budget_epochs")
# Families of metrics: every loss term, each dml peer's accuracy, each born-again generation's last accuracy.
METRIC_PREFIXES = ("loss_", "val_accuracy_peer", "val_accuracy_gen")

OPEN_TIMEOUT_S = float(os.environ.get("KDRAY_MLFLOW_OPEN_TIMEOUT_S", "120"))
# How long the sweep waits at its end for records still queued (the store may be down); then it stops
# with a message, and --resume writes them from Tune's saved state.
FLUSH_TIMEOUT_S = float(os.environ.get("KDRAY_MLFLOW_FLUSH_TIMEOUT_S", "300"))
def searched_params(config: dict[str, Any]) -> dict[str, Any]:
    """A trial's searched values keyed as in its resolved config: ``kd+sp:kd.temperature`` -> ``kd.temperature``."""
    return {k.split(":", 1)[-1]: v for k, v in config.items()}


def tag_number(experiment_tag: Any) -> int:
    """The trial's position in the sweep (1-based) from Tune's experiment tag (``5_knowledge=kd,...``),
    which Tune keeps on the trial and adds to every result; 0 if there is none."""
    try:
        return int(str(experiment_tag).split("_", 1)[0])
    except ValueError:
        return 0


def trial_number(trial: Any) -> int:
    return tag_number(getattr(trial, "experiment_tag", None))


class SweepTracker(Callback):
    """Parent run per sweep, child run per trial, metrics per epoch, status and failure reasons."""

    def __init__(self, uri: str, experiment: str, sweep: str, space: Any, *, max_epochs: int,
                 space_yaml: str, total: int, quiet: bool = False) -> None:
        self.uri, self.experiment, self.sweep = uri, experiment, sweep
        self.space = space
        self.max_epochs, self.space_yaml, self.total, self.quiet = max_epochs, space_yaml, total, quiet
        self.flush_timeout_s = FLUSH_TIMEOUT_S
        self._replay_history = False
        self._init_state()

    def _init_state(self) -> None:
        self._client = None
        self.parent_id: str | None = None
        self.experiment_id: str | None = None
        self._created_parent = False
        self._best: tuple[float, str] | None = None
        self._done = 0
        self._last_status = 0.0
        self._ended_generations: set[str] = set()  # born-again generation runs already ended
        self._sources: dict[str, tuple] = {}  # per trial: the teacher source and reason last tagged
        self._attach()

    def _attach(self) -> None:
        """The writer of this sweep in this process: shared by every copy of the tracker (Tune restores a
        pickled copy on --resume), so ``flush`` on any copy waits for the records of all of them."""
        self._w = writer_for(self.uri, self.sweep, self.quiet)
        if self.parent_id and self._w.parent_id is None:
            self._w.attach_parent(self.experiment_id, self.parent_id)

    def __getstate__(self) -> dict[str, Any]:  # Tune pickles its callbacks with the experiment state
        state = self.__dict__.copy()
        for k in ("_client", "_w", "_created_parent", "_replay_history"):  # no thread, queue or client
            state.pop(k, None)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.__dict__.setdefault("_sources", {})  # a tracker pickled by an older kdray
        self._client, self._created_parent, self._replay_history = None, False, False
        self._attach()

    def __reduce__(self):
        """``Tuner.restore`` unpickles the callbacks of the run that started the sweep (``tuner.pkl``): a sweep
        resumed with another ``--tracking-uri`` would write to the old store. Unpickled in a process whose
        resuming command made its own tracker live (:meth:`make_live`), the pickle *is* that tracker."""
        return _restore_tracker, (self.sweep, self.__getstate__())

    def make_live(self) -> "SweepTracker":
        """Make this the tracker that Tune calls for its sweep in this process, also through a restored pickle."""
        _LIVE[self.sweep] = self
        return self

    def release(self) -> None:
        if _LIVE.get(self.sweep) is self:
            del _LIVE[self.sweep]

    @property
    def created_parent(self) -> bool:
        """Did :meth:`open` create the sweep's parent run (a new store), rather than find it?"""
        return self._created_parent

    def replay_history(self) -> None:
        """A resumed sweep in a store that has never seen it: write every trial's results so far (from Tune's own
        ``result.json`` in each trial's folder on storage) before anything new, so the store gets every trial."""
        self._replay_history = True

    # -- Tune's checkpoint of the callback: the records MLflow does not have yet ------------------------
    def get_state(self) -> dict | None:
        return {"kdray_pending": self._w.snapshot(), "kdray_uri": self.uri}

    def set_state(self, state: dict) -> None:
        state = state or {}
        if state.get("kdray_uri", self.uri) != self.uri:  # queued for the old store: the history replay covers it
            return
        self._w.replay(state.get("kdray_pending") or [])

    # -- set-up ----------------------------------------------------------------------------------------
    @property
    def c(self):
        if self._client is None:
            self._client = client(self.uri)
        return self._client

    def open(self, announce: bool = True) -> str:
        """Create (or, on resume, reopen) the experiment and the sweep's parent run; return its id.

        Synchronous, before any trial runs: retried while the store is busy ("database is locked") or
        briefly unreachable, for up to ``KDRAY_MLFLOW_OPEN_TIMEOUT_S`` (120 s).
        """
        quick_http_retries()
        delay, deadline, told = BACKOFF_START_S, time.monotonic() + OPEN_TIMEOUT_S, False
        while True:
            try:
                return self._open(announce)
            except Exception as e:  # noqa: BLE001 - classified below
                if not transient(e) or time.monotonic() + delay > deadline:
                    raise
                if not told:
                    self._warn(f"MLflow at {self.uri} is busy or unreachable ({first_line(e)}); retrying for up "
                               f"to {OPEN_TIMEOUT_S:.0f} s")
                    told = True
                self._client = None  # a fresh client (and, for SQLite, a fresh look at the schema)
                time.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX_S)

    def _open(self, announce: bool) -> str:
        c = self.c
        self.experiment_id = self._experiment_id(c)
        found = c.search_runs([self.experiment_id],
                              filter_string=f"tags.`{TAG_KIND}` = 'sweep' and tags.`{TAG_SWEEP}` = '{self.sweep}'",
                              max_results=1)
        if found and not self._created_parent:
            self.parent_id = found[0].info.run_id
            c.update_run(self.parent_id, status="RUNNING")
            self._w.attach_parent(self.experiment_id, self.parent_id)
            for child in sweep_children(c, found[0]):
                tid = child.data.tags.get(TAG_TRIAL)
                if tid:
                    hist = c.get_metric_history(child.info.run_id, "val_accuracy")
                    self._w.known_run(tid, child.info.run_id, max((m.step for m in hist), default=0))
            if announce:
                self._say(f"resuming sweep {self.sweep}: {len(self._w.runs)} trial runs already in MLflow")
            return self.parent_id
        if found:  # this call created it before a retry: finish what that attempt began
            self.parent_id = found[0].info.run_id
        else:
            base = self.space.base
            tags = {TAG_KIND: "sweep", TAG_SWEEP: self.sweep, "mlflow.runName": self.sweep,
                    "kdray.version": __version__, "kdray.git_commit": git_commit(),
                    "dataset": str(base.get("dataset", {}).get("name", "mnist1d")),
                    "student": str(base.get("student", {}).get("name", "")),
                    "teacher": _teacher_name(base), "mlflow.note.content": self.space.description,
                    "kdray.model_name": self.space.model_name, TAG_METRIC: self.space.metric}
            run = c.create_run(self.experiment_id, tags=tags, run_name=self.sweep)
            self.parent_id = run.info.run_id
            self._created_parent = True
        fixed = {f"space.{k}": str(v) for k, v in {
            "name": self.space.name, "num_samples": self.total, "seed": self.space.seed,
            "metric": self.space.metric, "scheduler": self.space.scheduler.type,
            "searcher": self.space.searcher.type, "choices": ",".join(self.space.choices),
            "objectives": ",".join(self.space.objectives),
            "min_trials_per_type": self.space.min_trials_per_type}.items()}
        log_params(c, self.parent_id, fixed)
        c.log_text(self.parent_id, self.space_yaml, "search_space.yaml")
        self._w.attach_parent(self.experiment_id, self.parent_id)
        return self.parent_id

    def _experiment_id(self, c) -> str:
        """The search space's experiment, created if missing. Two sweeps may create it at the same moment:
        the one that loses the race gets "already exists" and reads the other's."""
        exp = c.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        try:
            return c.create_experiment(self.experiment, artifact_location=artifact_location(self.uri),
                                       tags={"kdray.search_space": self.space.name})
        except Exception as e:  # noqa: BLE001
            if not already_exists(e):
                raise
            exp = c.get_experiment_by_name(self.experiment)
            if exp is None:
                raise
            return exp.experiment_id

    def setup(self, **info: Any) -> None:
        if self._w.parent_id is None:
            self.open(announce=self.parent_id is None)  # a restored copy reconnects quietly
        else:
            self.experiment_id, self.parent_id = self._w.experiment_id, self._w.parent_id

    def flush(self, timeout_s: float | None = None) -> bool:
        """Block until MLflow has every record queued so far; False if ``timeout_s`` passed first."""
        return self._w.flush(self.flush_timeout_s if timeout_s is None else timeout_s)

    def unwritten(self) -> str:
        """What is still queued, in words (for the message of a sweep whose store stayed down)."""
        return self._w.describe_pending()

    # -- trials ------------------------------------------------------------------------------------
    def _child(self, trial: Any) -> str:
        """Queue the creation of the trial's child run (once); return the trial id that names it."""
        tid = trial.trial_id
        if tid in self._w.known:
            return tid
        resolved = self.space.resolved_dict(trial.config)
        choice = trial.config.get("knowledge", "none")
        n = trial_number(trial)
        tags = {TAG_PARENT: self._w.parent_id or self.parent_id, TAG_TRIAL: tid, TAG_SWEEP: self.sweep,
                TAG_KIND: "trial", TAG_KNOWLEDGE: choice, TAG_STATUS: "running",
                "mlflow.runName": f"trial-{n:03d}-{choice}", "kdray.trial_number": str(n),
                "kdray.version": __version__, "kdray.git_commit": git_commit(),
                "dataset": str(resolved.get("dataset", {}).get("name", "mnist1d")),
                "student": str(resolved.get("student", {}).get("name", "")),
                "teacher": _teacher_name(resolved),
                # What the searcher chose, under the names shared by every choice (kd.temperature, train.lr).
                "kdray.searched": json.dumps(searched_params(trial.config), default=str)}
        self._w.put({"kind": "create", "tid": tid, "experiment_id": self._w.experiment_id or self.experiment_id,
                     "tags": tags, "params": run_params(resolved), "resolved": resolved})
        return tid

    def _generation(self, trial: Any, tid: str, result: dict, step: int, metrics: list, ts: int) -> None:
        """A born-again trial: each generation is a run nested in the trial's run, with its own epochs."""
        g = int(result["generation"])
        gtid = f"{tid}/gen{g}"
        if gtid not in self._w.known:
            choice = trial.config.get("knowledge", "none")
            tags = {TAG_TRIAL: gtid, TAG_SWEEP: self.sweep, TAG_KIND: "generation", TAG_KNOWLEDGE: choice,
                    "mlflow.runName": f"trial-{trial_number(trial):03d}-{choice}-gen{g}", "kdray.generation": str(g)}
            self._w.put({"kind": "create", "tid": gtid, "parent_tid": tid, "lookup_first": True,
                         "experiment_id": self._w.experiment_id or self.experiment_id, "tags": tags, "params": {},
                         "resolved": self.space.resolved_dict(trial.config)})
        local = int(result.get("generation_epoch", step))
        source = {f"kdray.{k}": str(result[k]) for k in ("teacher_source", "teacher_reason") if k in result}
        self._w.put({"kind": "log", "tid": gtid, "metrics": [(k, v, t, local) for k, v, t, _ in metrics],
                     "tags": source if local == 1 else {}})
        per_generation = int(result.get("epochs_planned", step)) // max(1, int(result.get("generations", 1)))
        if local >= per_generation or result.get("failed"):
            self._end_generation(gtid, "FAILED" if result.get("failed") else "FINISHED",
                                 "failed" if result.get("failed") else "completed")

    def _end_generation(self, gtid: str, status: str, tag: str) -> None:
        """End a generation's nested run once (a trial stopped or failed inside it ends it too)."""
        if gtid in self._w.known and gtid not in self._ended_generations:
            self._ended_generations.add(gtid)
            self._end(gtid, status, {TAG_STATUS: tag})

    def on_step_begin(self, iteration: int, trials: list, **info: Any) -> None:
        if self._replay_history:
            self._replay_history = False
            self._replay(iteration, trials)

    def _replay(self, iteration: int, trials: list) -> None:
        """Every restored trial's reports, then its end if it has ended, as if this tracker had seen them."""
        quiet, self.quiet = self.quiet, True  # the console saw these lines when they happened
        try:
            for trial in trials:
                for result in trial_results(trial):
                    self.on_trial_result(iteration, trials, trial, result)
                if trial.status == "TERMINATED":
                    self.on_trial_complete(iteration, trials, trial)
                elif trial.status == "ERROR":
                    self.on_trial_error(iteration, trials, trial)
        finally:
            self.quiet = quiet
        self._say(f"{self.uri} had not seen sweep {self.sweep}: wrote the {len(trials)} trials run so far into it "
                  "from Tune's results")

    def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._child(trial)
        self._say(f"trial {trial_number(trial)}/{self.total} started: {_describe(trial.config)}")

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        tid = self._child(trial)
        step = int(result.get("epoch", result.get("training_iteration", 0)))
        if step <= self._w.last_step.get(tid, 0):
            return  # an epoch re-run after a restore from an earlier checkpoint: already recorded
        self._w.last_step[tid] = step
        ts = int(time.time() * 1000)
        keys = [k for k in result if k in METRICS or k.startswith(METRIC_PREFIXES)]
        metrics = [(k, float(result[k]), ts, step) for k in keys
                   if isinstance(result[k], (int, float)) and math.isfinite(float(result[k]))]
        tags = {}
        if tid not in self._w.tagged:
            tags = {f"kdray.{k}": str(result[k]) for k in ("node_ip", "node_id", "teacher_source", "teacher_reason",
                                                            "teacher_split_mismatch", "latency_device",
                                                            "teacher_generations", "strategy")
                    if k in result}
            self._w.tagged.add(tid)
        # The teacher's outputs changed source mid-run (a lost store): the trial's tags follow. A born-again trial's
        # later generations have another teacher (the previous generation, run live): their runs say so instead.
        source = (result.get("generation"), result.get("teacher_source"), result.get("teacher_reason"))
        seen = self._sources.setdefault(tid, source)
        if source != seen and source[1] is not None and source[0] == seen[0]:
            self._sources[tid] = source
            tags.update({"kdray.teacher_source": str(source[1]), "kdray.teacher_reason": str(source[2])})
        if metrics or tags:
            self._w.put({"kind": "log", "tid": tid, "metrics": metrics, "tags": tags})
        if result.get("generation"):
            self._generation(trial, tid, result, step, metrics, ts)
        goal = self.space.goal
        val = result.get(goal.metric)
        if (isinstance(val, (int, float)) and (self._best is None or goal.better(val, self._best[0]))
                and not result.get("failed")):
            self._best = (float(val), f"trial {trial_number(trial)} ({trial.config.get('knowledge')})")
        self._status(trials)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = self._child(trial)
        last = trial.last_result or {}
        epoch = int(last.get("epoch", 0))
        n = trial_number(trial)
        if last.get("failed"):
            self._end(tid, "FAILED", {TAG_STATUS: "failed", "kdray.failure": str(last["failed"])[:5000]})
            self._say(f"trial {n} FAILED: {last['failed']}")
        else:
            early = not ran_all_epochs(last, self.max_epochs)  # its own train.epochs: it may be searched
            self._end(tid, "FINISHED", {TAG_STATUS: "stopped_early" if early else "completed",
                                        "kdray.epochs": str(epoch)})
            if last.get("generation"):  # ASHA stopped it inside a generation
                self._end_generation(f"{tid}/gen{last['generation']}", "FINISHED", "stopped_early")
            metric = self.space.metric
            val = last.get(metric, float("nan"))
            self._say(f"trial {n} {'stopped early by ASHA at epoch ' + str(epoch) if early else 'finished'}: "
                      f"{metric} {val:.4f} ({_describe(trial.config)})")
        self._done += 1

    def on_trial_recover(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = self._child(trial)
        retries = trial.num_failures
        err = _error_text(trial)
        tags = {"kdray.retries": str(retries), TAG_STATUS: "retrying"}
        if err:
            tags[f"kdray.retry_{retries}_error"] = err[:5000]
        self._w.put({"kind": "log", "tid": tid, "metrics": [], "tags": tags})
        self._say(f"trial {trial_number(trial)} failed ({err.splitlines()[-1] if err else 'error'}); "
                  f"retry {retries} from its last checkpoint")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        tid = self._child(trial)
        err = _error_text(trial)
        tags = {TAG_STATUS: "error", "kdray.failure": err[:5000] or "error"}
        if trial.num_failures:
            tags["kdray.retries"] = str(max(trial.num_failures - 1, 0))
        self._end(tid, "FAILED", tags)
        g = (trial.last_result or {}).get("generation")
        if g:  # the generation it was in ends with it
            self._end_generation(f"{tid}/gen{g}", "FAILED", "error")
        self._say(f"trial {trial_number(trial)} ERROR: {(err.splitlines() or ['?'])[-1]}")
        self._done += 1

    def _end(self, tid: str, status: str, tags: dict[str, str]) -> None:
        self._w.put({"kind": "log", "tid": tid, "metrics": [], "tags": tags,
                     "terminate": status, "end_time": int(time.time() * 1000)})

    # -- output ------------------------------------------------------------------------------------
    def _say(self, msg: str) -> None:
        if not self.quiet:
            print(f"[kdray] {msg}", file=sys.stdout, flush=True)

    def _warn(self, msg: str) -> None:  # tracking trouble is shown even with --quiet (on stderr then)
        print(f"[kdray] {msg}", file=sys.stderr if self.quiet else sys.stdout, flush=True)

    def _status(self, trials: list) -> None:
        now = time.time()
        if now - self._last_status < 15:
            return
        self._last_status = now
        running = sum(1 for t in trials if t.status == "RUNNING")
        best = f", best {self.space.metric} {self._best[0]:.4f} ({self._best[1]})" if self._best else ""
        waiting = self._w.outage()
        self._say(f"{self._done}/{self.total} trials done, {running} running{best}"
                  + (f" (MLflow unreachable: {waiting} records buffered)" if waiting else ""))


_LIVE: dict[str, SweepTracker] = {}  # by sweep name: the tracker of the command running in this process


def _restore_tracker(sweep: str, state: dict[str, Any]) -> SweepTracker:
    live = _LIVE.get(sweep)
    if live is not None:
        return live
    tracker = SweepTracker.__new__(SweepTracker)
    tracker.__setstate__(state)
    return tracker


def trial_results(trial: Any) -> list[dict[str, Any]]:
    """Every result a trial reported, in order, from Tune's ``result.json`` in its folder on storage (local or
    S3); its last result alone when the file cannot be read."""
    fs, path = trial.storage.storage_filesystem, f"{trial.path}/result.json"
    try:
        with fs.open_input_stream(path) as f:
            lines = f.readall().decode().splitlines()
        return [json.loads(line) for line in lines if line.strip()]
    except (OSError, ValueError):
        return [trial.last_result] if trial.last_result else []


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
    """The trial's error trace: Tune writes it beside the driver first and uploads it later, so the local copy is
    read when the stored one is not there yet (``Trial.get_error`` reads storage only)."""
    try:
        err = trial.get_error()
    except Exception:  # noqa: BLE001
        err = None
    if not err:
        try:
            local = getattr(trial, "error_file", None)
            err = Path(local).read_text() if local and Path(local).is_file() else None
        except OSError:
            err = None
    return str(err) if err else ""
