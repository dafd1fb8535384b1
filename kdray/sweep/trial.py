"""The sweep's trial: what Tune ships to its workers and runs once per trial."""
from __future__ import annotations

from typing import Any

from kdray.sweep.space import SearchSpace


def run_trial(params: dict[str, Any], *, space: SearchSpace, teacher_refs: list, cache_ref: Any,
              train_storage: str, execution: str, generations_ref: Any = None, servers: list | None = None) -> None:
    """One trial: resolve its config and run the training loop inline or through a TorchTrainer."""
    from kdray.ray_setup import quiet_ray_loggers
    from kdray.train.loop import train_run
    from kdray.train.session import TuneSession

    quiet_ray_loggers()
    cfg = space.resolve(params)
    loop = {"run": cfg.model_dump(mode="json"), "teacher_records": list(teacher_refs), "teacher_cache": cache_ref,
            "progress": False, "teacher_generations": generations_ref if cfg.scheme.type == "seq_kd" else None,
            "teacher_servers": list(servers or []) if cfg.knowledge else []}  # teacher.serve: its actors
    if execution == "inline":
        train_run(loop, TuneSession())
        return
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from kdray.train.runner import make_trainer

    ctx = tune.get_context()
    trainer = make_trainer(cfg, loop, name=f"{ctx.get_experiment_name()}-{ctx.get_trial_id()}",
                           storage_path=train_storage, callbacks=[TuneReportCallback()])
    result = trainer.fit()
    if result.error is not None:
        raise result.error
