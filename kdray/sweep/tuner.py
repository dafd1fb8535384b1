"""How many trials run at once, and the searcher and scheduler a space asks for."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from kdray.config import RunConfig
from kdray.sweep.space import SearchSpace


def concurrency(res: dict[str, float], cfg: RunConfig, num_samples: int) -> int:
    """As many trials at once as the cluster's CPUs and GPUs fit, never oversubscribed."""
    from kdray.ray_setup import trials_that_fit

    return max(1, min(trials_that_fit(res, cfg.resources), num_samples))


def describe_need(cfg: RunConfig) -> str:
    r = cfg.resources
    return (f"{r.num_workers} worker(s) x {r.cpus_per_worker:g} CPU"
            + (f" + {r.gpus_per_worker:g} GPU" if r.use_gpu else ""))


def queue_fair_start(space: SearchSpace, num_samples: int, name: str, storage: Any, say) -> None:
    """Queue the sweep's first trials round-robin over the knowledge choices (their other parameters are sampled):
    Optuna's ``enqueue_trial`` on the study that Tune's searcher then opens and asks."""
    import optuna

    from kdray.sweep.fair import fair_start

    choices = list(space.choices)
    order = fair_start(choices, space.min_trials_per_type, num_samples)
    directions = ["maximize" if m == "max" else "minimize" for m in space.modes]
    study = optuna.create_study(study_name=name, storage=storage, directions=directions, load_if_exists=True)
    for choice in order:
        study.enqueue_trial({"knowledge": choice})
    need = len(choices) * space.min_trials_per_type
    say(f"fair budget: the first {len(order)} trials go round-robin over the {len(choices)} knowledge choices"
        + ("" if len(order) == need else f" ({num_samples} trials < {len(choices)} choices x "
                                          f"{space.min_trials_per_type}: raise num_samples to give each its share)"))


def make_search(space: SearchSpace, req: Any, state_dir: Path, num_samples: int, max_epochs: int, say) -> Any:
    """The searcher: a grid, or Optuna's sampler (seeded) over the define-by-run space, its study in SQLite beside the
    driver; the fair start queued in that study first."""
    import optuna

    from kdray.sweep.searcher import GridSearch, KdraySearch, StudyStorage, make_sampler

    if space.searcher.type == "grid":
        return GridSearch(space.grid_points(), space.metric, space.mode)
    study_storage = StudyStorage(f"sqlite:///{state_dir / 'optuna.db'}", req.name)
    metric = space.objectives if space.multi_objective else space.metric
    mode = space.modes if space.multi_objective else space.mode
    level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created": kdray says what it does
    try:
        if space.min_trials_per_type:  # the fair start: queued in the study that Tune's searcher asks
            queue_fair_start(space, num_samples, req.name, study_storage, say)
        return KdraySearch(space=space.define_by_run, metric=metric, mode=mode,
                           sampler=make_sampler(space.searcher.type, space.seed, space.searcher.n_startup_trials),
                           study_name=req.name, storage=study_storage, max_epochs=max_epochs)
    finally:
        optuna.logging.set_verbosity(level)


def make_scheduler(space: SearchSpace, max_epochs: int, say) -> Any:
    """FIFO, ASHA that records no failure report, or ASHA with the fair budget per knowledge type."""
    from ray.tune.schedulers import FIFOScheduler

    from kdray.sweep.fair import FailureAwareASHA, FairASHA

    grace = min(space.scheduler.grace_period, max_epochs)
    if space.scheduler.type == "asha" and space.scheduler.unit == "tokens":
        say(f"ASHA's rungs count tokens: each trial is judged once it has trained on and generated {grace} epochs' "
            "worth of the training split's target tokens (budget_epochs), and so on up the rungs: in fewer epochs "
            "when its batches add generated tokens, in more when its completions are shorter than the data's answers"
            + (f"; each knowledge type's first {space.min_trials_per_type} trials run all {max_epochs} epochs"
               if space.min_trials_per_type else ""))
        # FairASHA has its own rungs (Ray's ASHA would stop a trial at max_t budget_epochs, before its last epoch
        # when it generates); with no fair budget every type is settled from the start, plain ASHA
        return FairASHA(metric=space.metric, mode=space.mode, max_t=max_epochs, grace_period=grace,
                        reduction_factor=space.scheduler.reduction_factor,
                        min_trials_per_type=space.min_trials_per_type, time_attr="budget_epochs")
    if space.scheduler.type == "asha" and space.min_trials_per_type:
        say(f"fair budget: each knowledge type's first {space.min_trials_per_type} trials run all "
            f"{max_epochs} epochs; until a type has them, ASHA compares its trials with its own")
        return FairASHA(metric=space.metric, mode=space.mode, max_t=max_epochs, grace_period=grace,
                        reduction_factor=space.scheduler.reduction_factor,
                        min_trials_per_type=space.min_trials_per_type)
    if space.scheduler.type == "asha":
        return FailureAwareASHA(time_attr="epoch", metric=space.metric, mode=space.mode, max_t=max_epochs,
                                grace_period=grace, reduction_factor=space.scheduler.reduction_factor)
    return FIFOScheduler()


def make_trainable(space: SearchSpace, base: RunConfig, refs: list, cache_ref: Any, train_storage: str,
                   execution: str, generations_ref: Any = None, servers: list | None = None) -> Any:
    """The trial function with what every trial shares, and the resources Tune reserves for it: an inline trial
    its worker's CPUs/GPUs; a trial that drives a TorchTrainer only the driver resource (its workers hold the CPUs)."""
    from ray import tune

    from kdray.ray_setup import DRIVER_RESOURCE
    from kdray.sweep.trial import run_trial

    trainable = tune.with_parameters(run_trial, space=space, teacher_refs=refs, cache_ref=cache_ref,
                                     train_storage=train_storage, execution=execution,
                                     generations_ref=generations_ref, servers=servers or [])
    if execution == "inline":
        r = base.resources
        return tune.with_resources(trainable, {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker})
    return tune.with_resources(trainable, {DRIVER_RESOURCE: 1})


def new_tuner(trainable: Any, search: Any, scheduler: Any, callbacks: list, *, name: str, storage_path: str,
              num_samples: int, max_concurrent: int | None, inline: bool, max_failures: int) -> Any:
    """Tune over the trials: Tune keeps every checkpoint (``kdray.sweep.retention`` deletes behind saved state), the
    tracker first among the callbacks (Tune restores callback states by position)."""
    from ray import tune

    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=num_samples,
                                    max_concurrent_trials=max_concurrent,
                                    reuse_actors=inline),  # inline trials reuse their process: no torch per trial
        run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0, callbacks=callbacks,
                                  failure_config=tune.FailureConfig(max_failures=max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=None)),
    )
