"""``kdray final``'s retraining runs: each (configuration, seed) trained and tested, and recorded as it ends.

One failing run (a CUDA out-of-memory error, a data error, a lost node) must not throw away the runs that
finished. Every run is collected on its own (``ray.wait``), recorded in MLflow the moment it ends (a
``final_seed`` child run of the sweep, keyed by a hash of its resolved config, seed included), and a rerun of
the same command reuses what is recorded and trains only what is missing. Failures are reported by name at
the end, after everything else has been recorded.
"""
from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kdray.config import RunConfig
from kdray.errors import FinalError
from kdray.goal import ACCURACY, Goal
from kdray.tracking.store import TAG_KIND, TAG_PARENT, TAG_STATUS, TAG_SWEEP, log_metrics, sweep_children

KIND_SEED = "final_seed"
TAG_JOB = "kdray.final_job"  # the hash of the run config (with its seed): what a rerun looks up
OUTPUT_METRICS = ("val_accuracy", "test_accuracy", "val_nll", "test_nll", "test_ppl", "val_exact_match",
                  "test_exact_match", "workers")
NOT_MEASURED = {"val_accuracy": math.nan, "test_accuracy": math.nan, "failed": 1.0}


class FinalJobsFailed(FinalError):
    """Some retraining runs raised; the others are recorded. ``failures``: (label, seed, error) per failed run."""

    def __init__(self, failures: list[tuple[str, int, str]], recorded: int, total: int) -> None:
        self.failures = failures
        lines = "; ".join(f"{label} seed {seed}: {err}" for label, seed, err in failures)
        super().__init__(f"{len(failures)} of {total} retraining runs failed ({lines}). The other {recorded} are "
                         "recorded in MLflow: run the same command again to retrain only the failed ones")


@dataclass
class Job:
    label: str  # the configuration's name in the report: champion, none, kd, ...
    seed: int
    run: dict[str, Any]  # the resolved run config with this seed
    config: RunConfig

    @property
    def key(self) -> str:
        return job_key(self.run)


def job_key(run: dict[str, Any]) -> str:
    """A content hash of a resolved run config (seed included): the same key means the same run."""
    return hashlib.sha256(json.dumps(run, sort_keys=True, default=str).encode()).hexdigest()[:20]


class JobLedger:
    """The retraining runs of one sweep recorded in MLflow, as ``final_seed`` children of its parent run."""

    def __init__(self, c: Any, parent: Any, sweep: str) -> None:
        self.c, self.parent, self.sweep = c, parent, sweep

    def recorded(self) -> dict[str, dict[str, float]]:
        """The outputs of every run recorded as finished, by job key (a run that failed to train is not)."""
        out: dict[str, dict[str, float]] = {}
        for run in sweep_children(self.c, self.parent, kind=KIND_SEED):
            key = run.data.tags.get(TAG_JOB)
            if not key or run.info.status != "FINISHED":
                continue
            m = run.data.metrics
            output = {k: float(m.get(k, math.nan)) for k in OUTPUT_METRICS}
            if run.data.tags.get("kdray.diverged"):  # its loss became NaN: a result, as in the first run
                output.update({k: math.nan for k in OUTPUT_METRICS if k != "workers"}, failed=1.0)
            out[key] = output
        return out

    def _create(self, job: Job) -> str:
        tags = {TAG_PARENT: self.parent.info.run_id, TAG_KIND: KIND_SEED, TAG_SWEEP: self.sweep, TAG_JOB: job.key,
                "kdray.final_label": job.label, "kdray.seed": str(job.seed),
                "kdray.knowledge": job.config.knowledge_label}
        run = self.c.create_run(self.parent.info.experiment_id, run_name=f"final-{job.label}-seed{job.seed}",
                                tags=tags)
        return run.info.run_id

    def record(self, job: Job, output: dict[str, float]) -> None:
        rid = self._create(job)
        log_metrics(self.c, rid, {k: v for k, v in output.items() if k in OUTPUT_METRICS})
        if output.get("failed"):
            self.c.set_tag(rid, "kdray.diverged", "the loss became non-finite")
        self.c.set_terminated(rid, "FINISHED")

    def record_error(self, job: Job, error: str) -> None:
        rid = self._create(job)
        self.c.set_tag(rid, "kdray.failure", error[:4000])
        self.c.set_terminated(rid, "FAILED")


def describe_error(e: BaseException) -> str:
    """One line for an exception, unwrapping Ray's task error to the user's own exception."""
    cause = getattr(e, "cause", None) or e
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}".strip().rstrip(":")


def run_jobs(jobs: list[Job], refs: list, storage: str, ledger: JobLedger,
             train: Callable[..., dict[str, float]], say: Callable[[str], None],
             step_hook: Callable[[int, int], None] | None = None) -> list[dict[str, float]]:
    """Train and test every job not yet recorded, record each as it ends, and return all outputs in order.

    ``train(run, refs, storage, step_hook)`` trains and tests one run (:func:`kdray.final._train_and_test`).
    Raises :class:`FinalJobsFailed` at the end if any run raised, after recording every other one."""
    import ray

    done = ledger.recorded()
    outputs: dict[int, dict[str, float]] = {i: done[j.key] for i, j in enumerate(jobs) if j.key in done}
    todo = [i for i in range(len(jobs)) if i not in outputs]
    if outputs:
        say(f"{len(outputs)} of {len(jobs)} runs are already recorded from an earlier `kdray final`: "
            f"retraining the other {len(todo)}")
    failures: list[tuple[str, int, str]] = []
    t0 = time.time()

    def finished(i: int, output: dict[str, float] | None, error: BaseException | None) -> None:
        job = jobs[i]
        n = len(outputs) + len(failures) + 1
        if error is not None:
            msg = describe_error(error)
            failures.append((job.label, job.seed, msg))
            ledger.record_error(job, msg)
            say(f"[{n}/{len(jobs)}] {job.label} seed {job.seed} failed: {msg}")
            return
        outputs[i] = output
        ledger.record(job, output)
        what = next(m for m in ("test_exact_match", "test_nll", "test_accuracy") if m in output)
        v = output.get(what, math.nan)
        say(f"[{n}/{len(jobs)}] {job.label} seed {job.seed}: "
            + (f"{what.replace('_', ' ')} {v:.4f}" if math.isfinite(v) else "its loss became non-finite")
            + f" ({time.time() - t0:.0f} s)")

    if not ray.is_initialized():
        for i in todo:
            try:
                out = train(jobs[i].run, refs, storage, step_hook)
            except Exception as e:  # noqa: BLE001 - recorded and reported by name below
                finished(i, None, e)
            else:
                finished(i, out, None)
    else:
        remote = ray.remote(train)
        pending = {remote.options(**task_options(jobs[i].config)).remote(jobs[i].run, refs, storage, step_hook): i
                   for i in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            i = pending.pop(ready[0])
            try:
                out = ray.get(ready[0])
            except Exception as e:  # noqa: BLE001 - one run's error must not lose the others
                finished(i, None, e)
            else:
                finished(i, out, None)
    if failures:
        raise FinalJobsFailed(failures, len(outputs), len(jobs))
    return [outputs[i] for i in range(len(jobs))]


def task_options(rc: RunConfig) -> dict[str, Any]:
    """A retraining run is shaped as the sweep's trial: inline on its CPUs/GPU, or a driver of its workers."""
    from kdray.ray_setup import DRIVER_RESOURCE

    if rc.resources.resolved_execution() == "train":  # drives a TorchTrainer: its workers hold the CPUs
        return {"num_cpus": 0, "resources": {DRIVER_RESOURCE: 1}}
    return {"num_cpus": rc.resources.cpus_per_worker, "num_gpus": min(1.0, rc.resources.gpus_per_worker)}


def train_and_test(run: dict[str, Any], teacher_refs: list, storage: str = "",
                    step_hook: Any = None) -> dict[str, float]:
    """One seed of one configuration, trained as the sweep trained its trials (inline in one process, or a
    TorchTrainer over the same workers, so the global batch is the same), then measured on the test split."""
    import tempfile
    from pathlib import Path

    import torch

    from kdray.data import load_dataset
    from kdray.data.evaluate import evaluate_model
    from kdray.models import load_record, model_from_record
    from kdray.models.quantize import serving_device
    from kdray.ray_setup import quiet_ray_loggers, resolve_ref
    from kdray.runfiles import STUDENT_FILE
    from kdray.train.loop import train_run
    from kdray.train.session import Session

    quiet_ray_loggers()
    cfg = RunConfig.model_validate(run)
    records = [resolve_ref(r) for r in teacher_refs]
    if cfg.resources.resolved_execution() == "train":
        from kdray.storage import join
        from kdray.train.runner import final_student, fit, new_run_name

        result = fit(cfg, records, storage_path=join(storage, "final"), name=new_run_name(f"final-seed{cfg.seed}"),
                     progress=False, extra={"step_hook": step_hook} if step_hook else None)
        if result.failed:
            return dict(NOT_MEASURED)
        last, record = result.metrics, final_student(result)
    else:
        with tempfile.TemporaryDirectory() as d:
            session = Session(checkpoint_root=d)
            last = train_run({"run": run, "teacher_records": records, "step_hook": step_hook}, session)
            if last.get("failed"):
                return dict(NOT_MEASURED)
            record = load_record(Path(session.last_checkpoint) / STUDENT_FILE)
    model = model_from_record(record)
    device = serving_device(model, torch.device("cuda" if cfg.resources.use_gpu and torch.cuda.is_available()
                                                else "cpu"))  # an int8 student runs on the CPU
    test = evaluate_model(model.to(device), load_dataset(cfg.dataset).test, 512, device)
    return {"val_accuracy": float(last["val_accuracy"]), "test_accuracy": float(test["accuracy"]),
            **({"val_nll": float(last["val_nll"]), "test_nll": float(test["nll"]), "test_ppl": float(test["ppl"])}
               if "nll" in test else {}),
            **({"val_exact_match": float(last["val_exact_match"]), "test_exact_match": float(test["exact_match"])}
               if "exact_match" in test else {}),
            "workers": float(last.get("world_size", 1))}


def trusted(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run config read from MLflow without its ``plugins``: validating it would import the modules it names, and
    whoever can write to the tracking server would choose them. The plugins this command imported (``--plugin``,
    checked against the names by the CLI) reach every worker through the job's runtime environment."""
    return {k: v for k, v in cfg.items() if k != "plugins"}


def labels_only(cfg: dict[str, Any]) -> dict[str, Any]:
    """A run config without its knowledge terms and with nobody teaching: the same student on labels alone."""
    return {**cfg, "knowledge": [], "ce_weight": 1.0, "scheme": {"type": "distill"}}


def final_teacher(cfg: RunConfig, storage: str, uri: str, say, goal: Goal = ACCURACY) -> tuple[list, float]:
    """The teacher records of ``cfg`` (as Ray refs when Ray runs) and the teacher's test value of the sweep's metric
    (accuracy, or a language model's NLL; NaN for an ensemble and for a teacher of another tokenizer, which cannot
    read the test rows)."""
    import ray

    from kdray.teachers import teacher_records
    from kdray.tracking.champion import test_metrics

    records = teacher_records(cfg, storage, log=say, inline=True, tracking_uri=uri)
    value = (test_metrics(records[0], cfg.dataset.model_dump(mode="json")).get(goal.test, float("nan"))
             if len(records) == 1 and not records[0].get("tokenizer") else float("nan"))
    return ([ray.put(r) for r in records] if ray.is_initialized() else records), value


def seed_jobs(configs: dict[str, dict[str, Any]], seeds: list[int]) -> list[Job]:
    """One job for every configuration and seed: its run config with that seed."""
    jobs = []
    for name, cfg in configs.items():
        rc = RunConfig.model_validate(cfg)
        jobs.extend(Job(name, s, rc.model_copy(update={"seed": s}).model_dump(mode="json"), rc) for s in seeds)
    return jobs


def run_job_set(jobs: list[Job], refs: list, storage: str, ledger: JobLedger, say,
              step_hook: Any = None) -> list[dict[str, float]]:
    """Train and test every job (Ray tasks shaped as the sweep's trials when Ray runs, else in turn), each recorded
    as it ends; a failure is named after every other run is recorded."""
    return run_jobs(jobs, refs, storage, ledger, train_and_test, say, step_hook)


def group_label(run: Any, by: str | None = None) -> str:
    """A trial run's knowledge choice, and with ``by`` (a searched parameter, e.g. ``tkd.divergence``) its value too:
    ``tkd[divergence=rkl]``. Trials that did not search ``by`` keep their choice alone (``none``)."""
    kind = run.data.tags.get("kdray.knowledge", "none")
    if not by:
        return kind
    searched = json.loads(run.data.tags.get("kdray.searched", "{}"))
    if by not in searched:
        return kind
    short = by.split(".", 1)[1] if by.startswith(f"{kind}.") else by
    return f"{kind}[{short}={searched[by]}]"


def best_of_type(trials: list, knowledge: str, exclude: str | None = None, goal: Goal = ACCURACY,
                 by: str | None = None) -> Any | None:
    """The sweep's best trial run of one knowledge choice (or, with ``by``, of one :func:`group_label`) on the sweep's
    metric: completed ones first, else the best stopped early (ties: the one that got further). Failed trials never
    serve. None when the choice has no such trial."""
    mine = [t for t in trials if group_label(t, by) == knowledge and t.info.run_id != exclude
            and t.data.tags.get(TAG_STATUS) in ("completed", "stopped_early")]
    if not mine:
        return None
    return max(mine, key=lambda r: (r.data.tags.get(TAG_STATUS) == "completed",
                                    goal.key(r.data.metrics.get(goal.metric, math.nan)),
                                    int(r.data.tags.get("kdray.epochs", 0) or 0)))


def best_labels_only(trials: list, exclude: str | None = None, goal: Goal = ACCURACY) -> Any | None:
    """The sweep's best labels-only (``none``) trial run: completed ones first, else the best stopped early.

    ASHA stops ``none`` trials as readily as any other weak configuration, so a sweep may end without a
    completed one; the trial that got furthest still holds a searched configuration, and ``final``
    retrains it for the full budget anyway. Failed trials never serve. None when there is no such trial.
    """
    return best_of_type(trials, "none", exclude, goal)
