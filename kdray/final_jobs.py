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
from kdray.tracking.store import TAG_KIND, TAG_PARENT, TAG_SWEEP, log_metrics, sweep_children

KIND_SEED = "final_seed"
TAG_JOB = "kdray.final_job"  # the hash of the run config (with its seed): what a rerun looks up
OUTPUT_METRICS = ("val_accuracy", "test_accuracy", "workers")


class FinalJobsFailed(RuntimeError):
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
                output.update(val_accuracy=math.nan, test_accuracy=math.nan, failed=1.0)
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
        acc = output.get("test_accuracy", math.nan)
        say(f"[{n}/{len(jobs)}] {job.label} seed {job.seed}: "
            + (f"test accuracy {acc:.4f}" if math.isfinite(acc) else "its loss became non-finite")
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
