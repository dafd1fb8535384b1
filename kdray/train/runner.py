"""Run one training job with Ray Train V2's ``TorchTrainer``: ``kdray distill`` and ``kdray teacher``.

CPU workers use gloo; GPU workers get one GPU each and NCCL. ``local=True`` uses Train's in-process
local mode (``ScalingConfig(num_workers=0)``): the same loop, no worker group, for fast tests.
"""
from __future__ import annotations

import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdray import storage
from kdray.config import RunConfig
from kdray.errors import TrainingFailed
from kdray.models import load_record
from kdray.runfiles import STUDENT_FILE


def new_run_name(prefix: str) -> str:
    """A Ray Train run name no earlier run has: Train V2 silently *resumes* a run whose name and storage
    match an earlier one, so only an explicit ``--resume`` may reuse a name."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


@dataclass
class FitResult:
    metrics: dict[str, Any]
    checkpoint_dir: str | None  # where the final checkpoint (student.pt + train_state.pt) can be read
    path: str | None  # the run's folder in storage

    @property
    def failed(self) -> str | None:
        return self.metrics.get("failed")


def train_worker(config: dict[str, Any]) -> None:
    """The function every Ray Train worker runs."""
    from kdray.ray_setup import quiet_ray_loggers
    from kdray.train.loop import train_run
    from kdray.train.session import RayTrainSession

    quiet_ray_loggers()
    train_run(config, RayTrainSession(config.get("local_checkpoint_root"), config.get("resume_from")))


def share(obj: Any) -> Any:
    """Put a large object in Ray's object store once (when Ray runs) and pass the reference around."""
    import ray

    return ray.put(obj) if ray.is_initialized() else obj


def scaling_config(cfg: RunConfig, local: bool = False):
    from ray.train import ScalingConfig

    res = cfg.resources
    per_worker: dict[str, float] = {"CPU": res.cpus_per_worker}
    if res.use_gpu:
        per_worker["GPU"] = res.gpus_per_worker
    return ScalingConfig(num_workers=0 if local else res.num_workers, use_gpu=res.use_gpu,
                         resources_per_worker=None if local else per_worker)


def make_trainer(cfg: RunConfig, loop_config: dict[str, Any], *, name: str, storage_path: str,
                 local: bool = False, callbacks: list | None = None):
    """A TorchTrainer for ``cfg``; a run with the same ``name`` and storage resumes its last checkpoint."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    return TorchTrainer(
        train_worker,
        train_loop_config=loop_config,
        scaling_config=scaling_config(cfg, local),
        torch_config=TorchConfig(backend="nccl" if cfg.resources.use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=name,
            storage_path=storage_path,
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            failure_config=ray.train.FailureConfig(max_failures=cfg.resources.max_failures),
            callbacks=callbacks,
            # Train logs every report and checkpoint at INFO; kdray prints its own one line per epoch.
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
        ),
    )


def fit(
    cfg: RunConfig,
    teacher_records: list[dict[str, Any]] | None = None,
    *,
    storage_path: str,
    name: str,
    local: bool = False,
    progress: bool = True,
    teacher_cache: Any = None,
    extra: dict[str, Any] | None = None,
    resume_from: str | None = None,
    serve_teacher: bool = False,
) -> FitResult:
    """Train ``cfg`` to the end and return its last metrics and final checkpoint. ``serve_teacher`` (``kdray
    distill``): ``teacher.serve`` starts the teacher's actors for this run and stops them after it; without it (or
    ``local``, in this process) the run loads its teacher itself."""
    loop_config = {
        "run": cfg.model_dump(mode="json"),
        "teacher_records": [share(r) for r in teacher_records or []],
        "teacher_cache": teacher_cache,
        "progress": progress,
    }
    loop_config.update(extra or {})
    if local:
        if storage.is_remote(storage_path):
            raise ValueError("local mode runs in this process and keeps its checkpoints on this disk: give a local "
                             f"--storage, not {storage_path}, or run without --local")
        root = Path(storage_path) / name
        loop_config["local_checkpoint_root"] = str(root)
        # Train's local mode restores nothing itself: a run resumed under its name continues from its newest checkpoint
        resume_from = resume_from or newest_checkpoint(root)
    if resume_from:  # Train V2's way: the loop reads it when Train itself has no checkpoint to restore
        loop_config["resume_from"] = str(resume_from)
    servers = []
    if serve_teacher and not local and cfg.teacher is not None and cfg.teacher.serve is not None and \
            teacher_records and cfg.knowledge:  # `kdray distill`: the run serves its teacher itself, for its length
        from kdray.cache.served import start_servers

        servers = start_servers(loop_config["teacher_records"], {}, cfg.teacher.serve)
        loop_config["teacher_servers"] = servers
    try:
        result = make_trainer(cfg, loop_config, name=name, storage_path=storage_path, local=local).fit()
    finally:
        if servers:
            from kdray.cache.served import stop_servers

            stop_servers(servers)
    if result.error is not None:
        raise result.error
    metrics = dict(result.metrics or {})
    ckpt_dir = None
    if metrics.get("failed"):  # its checkpoint holds only failure.json (RayTrainSession.report_failure)
        return FitResult(metrics, None, str(result.path) if result.path else None)
    if result.checkpoint is not None:
        ckpt_dir = result.checkpoint.path
        if not Path(ckpt_dir).exists():  # remote storage: download once
            ckpt_dir = result.checkpoint.to_directory()
    return FitResult(metrics, ckpt_dir, str(result.path) if result.path else None)


def newest_checkpoint(root: Path) -> str | None:
    """The newest complete checkpoint folder (``checkpoint_NNNNNN`` with its train state) a local-mode run kept."""
    from kdray.runfiles import STATE_FILE

    done = sorted(p for p in root.glob("checkpoint_*") if (p / STATE_FILE).is_file() and (p / STUDENT_FILE).is_file())
    return str(done[-1]) if done else None


def final_student(result: FitResult) -> dict[str, Any]:
    """The student's model record from the final checkpoint of a run."""
    if result.failed:
        raise TrainingFailed(f"the run failed: {result.failed}")
    if result.checkpoint_dir is None:
        raise TrainingFailed("the run reported no checkpoint")
    return load_record(Path(result.checkpoint_dir) / STUDENT_FILE)


def _inline_run(run: dict[str, Any], progress: bool) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """The training loop in one process (a Ray task, or this process): metrics and the final student."""
    import tempfile

    from kdray.ray_setup import quiet_ray_loggers
    from kdray.train.loop import train_run
    from kdray.train.session import Session

    quiet_ray_loggers()
    with tempfile.TemporaryDirectory() as d:
        session = Session(checkpoint_root=d)
        last = train_run({"run": run, "progress": progress}, session)
        if last.get("failed") or session.last_checkpoint is None:
            return last, None
        return last, load_record(session.last_checkpoint / STUDENT_FILE)


def fit_inline(cfg: RunConfig, progress: bool = True) -> tuple[dict[str, Any], dict[str, Any] | None]:
    """Train a one-worker run without a Train worker group (no ~8 s group start-up): a plain Ray task."""
    import ray

    if not ray.is_initialized():
        return _inline_run(cfg.model_dump(mode="json"), progress)
    task = ray.remote(_inline_run).options(num_cpus=cfg.resources.cpus_per_worker,
                                           num_gpus=min(1.0, cfg.resources.gpus_per_worker))
    return ray.get(task.remote(cfg.model_dump(mode="json"), progress))


def copy_checkpoint_file(result: FitResult, dest: str | Path) -> Path:
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_suffix(dest.suffix + ".tmp")
    shutil.copyfile(Path(result.checkpoint_dir) / STUDENT_FILE, tmp)
    tmp.replace(dest)
    return dest
