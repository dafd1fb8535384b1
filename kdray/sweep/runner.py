"""``kdray sweep``: Ray Tune over a search space, every trial a run of the kdray training loop.

* Trials: a trial with one CPU worker runs the loop directly inside the Tune trial ("inline": no
  Train worker group to start, ~8 s saved per trial on these machines, FIELD-NOTES); a trial with
  several workers or GPUs drives a Ray Train ``TorchTrainer`` (DDP). ``resources.execution`` forces
  either. Train-driving trials hold only the custom ``kdray_driver`` resource, never a CPU, so a trial
  and its workers cannot deadlock on the same CPUs.
* Search: Optuna (seeded TPE, define-by-run conditional space, study in SQLite beside the run) or a
  grid; ASHA stops weak trials on validation accuracy; concurrency derived from the cluster.
* Record: one MLflow writer in this driver (``SweepTracker``); at the end the leaderboard, the search
  plots and the champion, measured once on the test split and registered as ``<model>@champion``.
"""
from __future__ import annotations

import io
import json
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from kdray import storage
from kdray.config import RunConfig
from kdray.storage import is_remote
from kdray.sweep.front import COSTS
from kdray.sweep.space import NONE, SearchSpace
from kdray.tracking.champion import (Champion, TrialOutcome, raw_example, read_checkpoint_record, register,
                                     remote_test_accuracy, select)
from kdray.tracking.store import (TAG_ORPHANED, TAG_STATUS, TAG_TRIAL, client, log_metrics, metric_key, probe,
                                  sweep_children)


class SweepError(RuntimeError):
    """A sweep that cannot start or complete (printed as a clear message by the CLI)."""


@dataclass
class SweepRequest:
    space: SearchSpace
    space_path: str
    space_yaml: str
    name: str
    storage: str
    tracking_uri: str
    address: str | None = None
    resume: bool = False
    num_samples: int | None = None
    max_concurrent: int | None = None
    quiet: bool = False
    register_champion: bool = True


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    outcomes: list[TrialOutcome]
    champion: Champion | None
    leaderboard: pd.DataFrame
    wall_s: float
    interrupted: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    budget: pd.DataFrame = field(default_factory=pd.DataFrame)  # per knowledge type: trials, epochs, best


SWEEP_FILE = "kdray_sweep.json"  # beside Tune's state: the sweep's own size, read back by --resume


def local_state_dir(req: SweepRequest) -> Path:
    """Where the driver keeps what only it uses (the Optuna study): the storage if it is a local path
    (with remote storage a copy of the study is uploaded beside Tune's state at the end)."""
    root = Path("kdray_runs").resolve() if is_remote(req.storage) else Path(req.storage)
    return root / req.name


def concurrency(res: dict[str, float], cfg: RunConfig, num_samples: int) -> int:
    """As many trials at once as the cluster's CPUs and GPUs fit, never oversubscribed."""
    from kdray.ray_setup import trials_that_fit

    return max(1, min(trials_that_fit(res, cfg.resources), num_samples))


def describe_need(cfg: RunConfig) -> str:
    r = cfg.resources
    return (f"{r.num_workers} worker(s) x {r.cpus_per_worker:g} CPU"
            + (f" + {r.gpus_per_worker:g} GPU" if r.use_gpu else ""))


def run_trial(params: dict[str, Any], *, space: SearchSpace, teacher_refs: list, cache_ref: Any,
              train_storage: str, execution: str) -> None:
    """One trial: resolve its config and run the training loop inline or through a TorchTrainer."""
    from kdray.ray_setup import quiet_ray_loggers
    from kdray.train.loop import train_run
    from kdray.train.session import TuneSession

    quiet_ray_loggers()
    cfg = space.resolve(params)
    loop = {"run": cfg.model_dump(mode="json"), "teacher_records": list(teacher_refs), "teacher_cache": cache_ref,
            "progress": False}
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


def cache_summary(cache: Any) -> dict[str, Any] | None:
    if cache is None:
        return None
    return {"samples": len(cache), "features": len(cache.features), "nbytes": cache.nbytes, "note": cache.note}


def _build_cache_task(records: list, dataset: dict[str, Any], layers: list[str], max_bytes: int, dtype: str,
                      use_gpu: bool, summarise: bool = False):
    """The cache (and, with ``summarise``, its summary as a second return value: what the driver reads)."""
    import torch

    from kdray.config import DatasetConfig
    from kdray.data import load_dataset
    from kdray.teacher_cache import build_cache
    from kdray.train.loop import resolve_ref

    records = [resolve_ref(r) for r in records]
    data = load_dataset(DatasetConfig.model_validate(dataset))
    device = "cuda" if use_gpu and torch.cuda.is_available() else "cpu"
    cache = build_cache(records, data, layers, max_bytes, dtype, device)
    return (cache, cache_summary(cache)) if summarise else cache


def teacher_layers_needed(space: SearchSpace, records: list[dict[str, Any]]) -> list[str]:
    """Every teacher layer any trial of the space can tap (from its representative points)."""
    from kdray.knowledge import DistillObjective, ModelLayout
    from kdray.models import model_from_record

    t_layout = ModelLayout.of(model_from_record(records[0]))
    layers: list[str] = []
    for point in space.representative_points():
        cfg = space.resolve(point)
        if not cfg.knowledge:
            continue
        from kdray.models import MODELS

        s_net = MODELS.get(cfg.student.name)
        from kdray.data import describe_dataset

        info = describe_dataset(cfg.dataset)
        student = s_net.build(info.num_classes, info.model_input, **cfg.student.options)
        obj = DistillObjective.from_specs(cfg.knowledge, t_layout, ModelLayout.of(student))
        layers.extend(n for n in obj.teacher_layers if n not in layers)
    return layers


def prepare_cache(space: SearchSpace, base: RunConfig, refs: list, records: list, say,
                  spill_dir: str | None = None) -> tuple[Any, Any]:
    """Share teacher outputs across the trials, or say why the teacher runs live.

    Returns (what trials get, the per-epoch cache to stop at the end or None): a one-pass cache when training
    inputs are fixed; teacher outputs per (epoch, sample) (:mod:`kdray.view_cache`) when they are augmented.
    """
    import ray

    if base.teacher is None or base.cache.teacher_outputs == "off":
        say("teacher-output cache: off" + (" (cache.teacher_outputs: off)" if base.teacher else ""))
        return None, None
    from kdray.data import load_dataset

    data = load_dataset(base.dataset)
    layers = teacher_layers_needed(space, records)
    t0 = time.time()
    if not data.deterministic:
        from kdray.view_cache import start_view_cache

        r = base.resources
        view_cache = start_view_cache(records, refs, data, base.dataset.model_dump(mode="json"), base.seed, layers,
                                      base.cache, space.max_epochs, spill_dir, r.use_gpu,
                                      trial_gpus=r.num_workers * r.gpus_per_worker if r.use_gpu else 0.0)
        say(f"teacher-output cache: augmented inputs, outputs shared per (epoch, sample): "
            f"{view_cache.handle.note}; memory {base.cache.max_bytes / 2**20:.0f} MiB, then spilled to storage")
        return view_cache.handle, view_cache
    args = (refs, base.dataset.model_dump(mode="json"), layers, base.cache.max_bytes, base.cache.dtype,
            base.resources.use_gpu)
    if base.resources.use_gpu:  # the teacher pass belongs on a GPU node: a Ray task there
        task = ray.remote(_build_cache_task).options(num_cpus=base.resources.cpus_per_worker,
                                                     num_gpus=min(1.0, base.resources.gpus_per_worker),
                                                     num_returns=2)
        ref, summary_ref = task.remote(*args, summarise=True)
        summary = ray.get(summary_ref)  # a few numbers: the cache itself (up to max_bytes) stays in the store
    else:  # on CPU, here: no worker process to start for one pass over the data
        cache = _build_cache_task(*args)
        summary = cache_summary(cache)
        ref = ray.put(cache) if cache is not None else None
    if summary is None:
        say("teacher-output cache: nothing fits the memory budget (cache.max_bytes); teachers run live")
        return None, None
    say(f"teacher-output cache: {summary['samples']} samples, logits + {summary['features']} feature maps "
        f"({summary['nbytes'] / 2**20:.1f} MiB, {summary['note']}) built in {time.time() - t0:.1f} s; shared by "
        "all trials")
    return ref, None


def report_view_cache(view_cache: Any, c: Any, parent_id: str, say) -> None:
    """What the per-epoch cache did, in the sweep's MLflow run and on the console."""
    s = view_cache.summary()
    err = view_cache.producer_error()
    total = s["rows_by_producer"] + s["rows_by_trials"]
    for k in ("rows_by_producer", "rows_by_trials", "rows_read", "blocks_spilled", "blocks_reloaded",
              "blocks_dropped", "peak_bytes", "bytes_per_sample", "mean_truncation_kl"):
        c.log_metric(parent_id, f"teacher_cache.{k}", float(s[k]))
    c.set_tag(parent_id, "kdray.teacher_cache", view_cache.handle.note)
    epochs = s["epochs_computed"]
    say(f"teacher-output cache: {total} teacher rows computed for epochs "
        f"{epochs[0] if epochs else 0}-{epochs[-1] if epochs else 0} ({s['rows_by_producer']} by the producer, "
        f"{s['rows_by_trials']} by trials ahead of it), {s['rows_read']} rows read from the store; peak "
        f"{s['peak_bytes'] / 2**20:.1f} MiB in memory, {s['blocks_spilled']} blocks spilled"
        + (f"; mean KL(teacher || top-k) {s['mean_truncation_kl']:.2e} nats" if s["mean_truncation_kl"] else "")
        + (f"; the producer failed ({err}), trials computed live" if err else ""))


def _checkpoint_of(r, storage: str) -> Any:
    """A trial's last checkpoint as Ray's Checkpoint (which knows its filesystem: S3 or local)."""
    if r.checkpoint is not None:
        return r.checkpoint
    path = (r.metrics or {}).get("checkpoint_path")  # trials that drove a TorchTrainer
    if path and is_remote(storage):
        import pyarrow.fs
        import ray.train

        fs, _ = pyarrow.fs.FileSystem.from_uri(storage)
        return ray.train.Checkpoint(path, filesystem=fs)
    return path


def _outcomes(results, space: SearchSpace, max_epochs: int, run_ids: dict[str, str],
              storage: str = "") -> list[TrialOutcome]:
    from kdray.tracking.tracker import tag_number
    from kdray.train.loop import ran_all_epochs

    out = []
    ids = _trial_ids(results)
    for r in results:
        m = dict(r.metrics or {})
        # A trial that erred before its first report has no metrics: its id comes from Tune's own trial
        tid = m.get("trial_id") or ids.get(Path(r.path).name if r.path else "", "")
        params = dict(r.config or {})
        if r.error is not None:
            status = "error"
        elif m.get("failed"):
            status = "failed"
        elif not ran_all_epochs(m, max_epochs):
            status = "stopped_early"
        else:
            status = "completed"
        ckpt = _checkpoint_of(r, storage)
        number = tag_number(m.get("experiment_tag"))
        costs = {k: float(m[k]) for k in COSTS if isinstance(m.get(k), (int, float))}
        out.append(TrialOutcome(tid, run_ids.get(tid), params.get("knowledge", NONE), status, int(m.get("epoch", 0)),
                                float(m.get("val_accuracy", float("nan"))), params, ckpt, number, costs))
    return out


def _trial_ids(results) -> dict[str, str]:
    """Tune's trial id of each result, by the name of the trial's folder."""
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None) or []
    return {Path(t.path).name: t.trial_id for t in trials if getattr(t, "path", None)}


def checkpoint_uri(checkpoint: Any, storage: str) -> str | None:
    """Where a trial's checkpoint lives, as one string (``s3://bucket/...`` or a local path): a trial run's tag,
    from which ``kdray best --max-latency-ms`` reads a student that was not the champion."""
    if checkpoint is None:
        return None
    path = getattr(checkpoint, "path", checkpoint)
    if is_remote(storage) and "://" not in str(path):
        return f"{storage.split('://', 1)[0]}://{path}"
    return str(path)


def leaderboard(outcomes: list[TrialOutcome], front_cost: str | None = None) -> pd.DataFrame:
    """Every trial, best first, with its student's costs; with ``front_cost`` a ``pareto`` column marks the
    completed trials on the front of validation accuracy against that cost."""
    from kdray.sweep.front import pareto_front
    from kdray.tracking.tracker import searched_params

    rows = []
    for o in outcomes:
        row = {"trial": o.number, "trial_id": o.trial_id, "run_id": o.run_id, "knowledge": o.knowledge,
               "status": o.status, "epochs": o.epochs, "val_accuracy": o.val_accuracy, **o.costs}
        row.update({k: v for k, v in searched_params(o.params).items() if k != "knowledge"})
        rows.append(row)
    df = pd.DataFrame(rows)
    if not df.empty and front_cost:
        done = [i for i, o in enumerate(outcomes) if o.status == "completed"]
        pts = [(outcomes[i].val_accuracy, outcomes[i].costs.get(front_cost, float("nan"))) for i in done]
        on = {done[k] for k in pareto_front(pts)}
        df.insert(7, "pareto", [i in on for i in range(len(outcomes))])
    if not df.empty:
        # Same order as the champion's selection: accuracy, then the earlier trial on ties.
        df = df.sort_values(["val_accuracy", "trial"], ascending=[False, True], na_position="last").reset_index(drop=True)
        df.insert(0, "rank", range(1, len(df) + 1))
    return df


def log_search_plots(c, parent_id: str, req: SweepRequest, board: pd.DataFrame, say) -> None:
    """Optuna's importance, parallel-coordinate and history plots (HTML + PNG) on the parent run."""
    import tempfile

    if req.space.searcher.type == "grid":
        studies = []
    else:
        import optuna

        storage = f"sqlite:///{local_state_dir(req) / 'optuna.db'}"
        try:
            studies = [optuna.load_study(study_name=req.name, storage=storage)]
        except Exception as e:  # noqa: BLE001
            say(f"could not open the Optuna study for plots: {e}")
            studies = []
    with tempfile.TemporaryDirectory() as d:
        for study in studies:
            import optuna.visualization as ov

            done = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
            if len(study.directions) > 1:  # Optuna's single-objective plots need a target there
                names = list(req.space.objectives)
                plots = {"pareto_front": lambda st: ov.plot_pareto_front(st, target_names=names)}
            else:
                plots = {"optimization_history": ov.plot_optimization_history,
                         "parallel_coordinate": ov.plot_parallel_coordinate}
                if len(done) >= 2:
                    plots["param_importances"] = ov.plot_param_importances
            for name, fn in plots.items():
                try:
                    with warnings.catch_warnings():  # "less than 2 trials" for each rare choice: noise here
                        warnings.simplefilter("ignore", UserWarning)
                        figure = fn(study)
                    figure.write_html(f"{d}/{name}.html", include_plotlyjs="cdn")
                except Exception as e:  # noqa: BLE001 - a plot is a bonus, never a failure
                    say(f"plot {name} skipped: {e}")
        if not board.empty:
            _history_png(board, f"{d}/val_accuracy_by_trial.png")
        if "pareto" in board.columns and req.space.multi_objective:
            from kdray.sweep.front import front_png

            cost = req.space.objectives[1]
            front_png(board, cost, f"{d}/pareto_front_{cost}.png")
        for f in Path(d).iterdir():
            c.log_artifact(parent_id, str(f), "plots")


def _import_plot_libraries() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import optuna.visualization  # noqa: F401
    import sklearn  # noqa: F401 - the champion's data loading imports it in this thread meanwhile


def _history_png(board: pd.DataFrame, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    df = board.copy().rename(columns={"trial": "n"}).sort_values("n")
    fig, ax = plt.subplots(figsize=(7, 4))
    for k, g in df.groupby("knowledge"):
        ax.scatter(g["n"], g["val_accuracy"], label=k, s=24)
    done = df[df["status"] == "completed"]
    if not done.empty:
        ax.plot(done["n"], done["val_accuracy"].cummax(), color="black", lw=1, label="best completed so far")
    ax.set_xlabel("trial")
    ax.set_ylabel("validation accuracy (last epoch)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_sweep(req: SweepRequest) -> SweepResult:
    """Run (or resume) a sweep to the end and register its champion."""
    import optuna
    import ray
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    from kdray.check import check_resources
    from kdray.ray_setup import (DRIVER_RESOURCE, autoscaler_max_resources, has_driver_resource, init_ray,
                                  trials_that_fit)
    from kdray.sweep.fair import FailureAwareASHA, FairASHA
    from kdray.sweep.retention import CheckpointPruner, fault_callbacks
    from kdray.sweep.searcher import ElasticLimiter, GridSearch, KdraySearch, StudyStorage, make_sampler
    from kdray.tracking.tracker import SweepTracker
    from kdray.train.runner import teacher_records

    say = (lambda m: None) if req.quiet else (lambda m: print(f"[kdray] {m}", flush=True))
    space = req.space
    t_start = time.time()
    probe(req.tracking_uri)  # before Ray starts: an unreachable server stops us here
    base = space.resolve({"knowledge": NONE})
    max_epochs = space.max_epochs  # born-again trials report their generations as one run
    num_samples = req.num_samples or space.num_samples
    experiment_dir = storage.join(req.storage, req.name)
    sweep_file = storage.join(experiment_dir, SWEEP_FILE)
    if req.resume:
        if not storage.exists(storage.join(experiment_dir, "tuner.pkl")):
            raise SweepError(f"no sweep named {req.name!r} to resume in {req.storage} (looked for {experiment_dir})")
        num_samples = _stored_size(sweep_file, num_samples, req, say)
    elif storage.exists(experiment_dir):
        raise SweepError(f"a sweep named {req.name!r} already exists in {req.storage}; use --resume to finish it "
                         f"or --name for a new one")
    elif space.searcher.type == "grid":
        num_samples = len(space.grid_points())

    # A fresh MLflow SQLite store spends ~3 s creating its schema: do it while Ray starts. (Only the schema:
    # no run is written until the sweep has passed every check below.)
    warm = threading.Thread(target=_warm_tracking_store, args=(req.tracking_uri,), daemon=True)
    warm.start()
    say("starting Ray" if not req.address else f"joining the Ray cluster at {req.address}")
    res = init_ray(req.address)
    # A cluster is judged by what it can grow to (an autoscaler's node types x max workers), not by the
    # nodes present at start: a 0-CPU head with workers at min_workers: 0 is the usual shape.
    most = autoscaler_max_resources() if req.address else res
    if most is not None:
        check_resources(base, most, file=req.space_path, where="base.resources",
                        holder="the cluster can grow to" if req.address else None)
    execution = base.resources.resolved_execution()
    if execution == "train" and not has_driver_resource():
        raise SweepError(
            f"trials that drive a TorchTrainer need the custom resource {DRIVER_RESOURCE!r} on the cluster; start "
            f"the head with `ray start --head --resources='{{\"{DRIVER_RESOURCE}\": 64}}'` (cluster.yaml does)")
    fixed = req.max_concurrent or space.max_concurrent
    if not fixed and most is not None:
        fixed = concurrency(most, base, num_samples)
    say(f"sweep {req.name}: {num_samples} trials, "
        + (f"{fixed} at a time" if fixed else "as many at a time as the workers present fit")
        + f" ({execution} trials, {describe_need(base)} each)")
    if trials_that_fit(res, base.resources) < 1:
        say(f"the cluster has {res.get('CPU', 0):g} CPU / {res.get('GPU', 0):g} GPU now and one trial needs "
            f"{describe_need(base)}: waiting for workers to join"
            + (" (the autoscaler adds them on demand)" if most is not None and req.address else ""))

    timings: dict[str, float] = {}
    t0 = time.time()
    state_dir = local_state_dir(req)
    state_dir.mkdir(parents=True, exist_ok=True)
    if req.resume and space.searcher.type != "grid":
        restore_study(req, experiment_dir, state_dir, say)
    # Teachers live in the run storage: every node reads them, and a later sweep reuses them.
    records = teacher_records(base, req.storage, log=say, progress=not req.quiet, inline=execution == "inline",
                              tracking_uri=req.tracking_uri)
    timings["teacher_s"] = time.time() - t0
    refs = [ray.put(r) for r in records]
    t0 = time.time()
    cache_ref, view_cache = (prepare_cache(space, base, refs, records, say,
                                           storage.join(req.storage, f"{req.name}-teacher-outputs"))
                             if records else (None, None))
    timings["cache_s"] = time.time() - t0
    if view_cache is not None and view_cache.producer_gpus and most is not None and not (
            req.max_concurrent or space.max_concurrent):  # the producer's GPU is not the trials'
        fixed = concurrency({**most, "GPU": most.get("GPU", 0) - view_cache.producer_gpus}, base, num_samples)
        say(f"the teacher-output producer holds {view_cache.producer_gpus:g} GPU: {fixed} trials at a time")

    tracker = None
    try:  # from here on the per-epoch teacher-output cache holds actors and storage
        trainable = tune.with_parameters(run_trial, space=space, teacher_refs=refs, cache_ref=cache_ref,
                                         train_storage=storage.join(req.storage, f"{req.name}-train"),
                                         execution=execution)
        if execution == "inline":
            r = base.resources
            trainable = tune.with_resources(trainable, {"cpu": r.cpus_per_worker, "gpu": r.gpus_per_worker})
        else:
            trainable = tune.with_resources(trainable, {DRIVER_RESOURCE: 1})

        tracker = SweepTracker(req.tracking_uri, space.name, req.name, space, max_epochs=max_epochs,
                               space_yaml=req.space_yaml, total=num_samples, quiet=req.quiet).make_live()
        warm.join()
        t0 = time.time()
        parent_id = tracker.open()
        timings["mlflow_open_s"] = time.time() - t0
        c = client(req.tracking_uri)

        if req.resume:
            if tracker.created_parent:  # resumed into a store that has never seen this sweep
                tracker.replay_history()
            tuner = tune.Tuner.restore(experiment_dir, trainable, resume_unfinished=True, resume_errored=False,
                                       restart_errored=False)
            use_live_tracker(tuner, tracker)
        else:
            if space.searcher.type == "grid":
                search = GridSearch(space.grid_points(), space.metric, space.mode)
            else:
                study_storage = StudyStorage(f"sqlite:///{state_dir / 'optuna.db'}", req.name)
                metric = space.objectives if space.multi_objective else space.metric
                mode = space.modes if space.multi_objective else space.mode
                level = optuna.logging.get_verbosity()
                optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created": kdray says
                try:
                    if space.min_trials_per_type:  # the fair start: queued in the study that Tune's searcher asks
                        _queue_fair_start(space, num_samples, req.name, study_storage, say)
                    search = KdraySearch(space=space.define_by_run, metric=metric, mode=mode,
                                         sampler=make_sampler(space.searcher.type, space.seed,
                                                              space.searcher.n_startup_trials),
                                         study_name=req.name, storage=study_storage, max_epochs=max_epochs)
                finally:
                    optuna.logging.set_verbosity(level)
            grace = min(space.scheduler.grace_period, max_epochs)
            if space.scheduler.type == "asha" and space.min_trials_per_type:
                scheduler = FairASHA(metric=space.metric, max_t=max_epochs, grace_period=grace,
                                     reduction_factor=space.scheduler.reduction_factor,
                                     min_trials_per_type=space.min_trials_per_type)
                say(f"fair budget: each knowledge type's first {space.min_trials_per_type} trials run all "
                    f"{max_epochs} epochs; until a type has them, ASHA compares its trials with its own")
            elif space.scheduler.type == "asha":
                scheduler = FailureAwareASHA(time_attr="epoch", metric=space.metric, mode=space.mode,
                                             max_t=max_epochs, grace_period=grace,
                                             reduction_factor=space.scheduler.reduction_factor)
            else:
                scheduler = FIFOScheduler()
            if not fixed:  # concurrency follows the workers that join (Tune's own limit is fixed at start)
                search = ElasticLimiter(search, num_samples, base.resources)
            # The sweep's own size, for --resume (which may be run without --num-samples, or on another machine).
            storage.write_text(sweep_file, json.dumps({"num_samples": num_samples, "space": space.name,
                                                       "space_sha256": space_digest(req.space_yaml)}))
            tuner = tune.Tuner(
                trainable,
                tune_config=tune.TuneConfig(search_alg=search, scheduler=scheduler, num_samples=num_samples,
                                            max_concurrent_trials=fixed or None,
                                            # inline trials reuse their process: no torch import per trial
                                            reuse_actors=execution == "inline"),
                run_config=tune.RunConfig(
                    name=req.name, storage_path=req.storage, verbose=0,
                    # The tracker first: Tune restores callback states by position.
                    callbacks=[tracker, CheckpointPruner(base.train.keep_checkpoints), *fault_callbacks()],
                    failure_config=tune.FailureConfig(max_failures=base.resources.max_failures),
                    # Tune keeps every checkpoint; CheckpointPruner deletes one only behind saved sweep state.
                    checkpoint_config=tune.CheckpointConfig(num_to_keep=None),
                ),
            )
        t0 = time.time()
        results = tuner.fit()
        if view_cache is not None:
            try:
                report_view_cache(view_cache, c, parent_id, say)
            except Exception as e:  # noqa: BLE001 - a report must not fail a sweep whose trials ran
                say(f"teacher-output cache: could not report its counters ({type(e).__name__}: {e})")
    finally:  # the cache's actors and spill folder go with the sweep, however it ends
        if view_cache is not None:
            view_cache.stop()
        if tracker is not None:
            tracker.release()
    if not tracker.flush():  # the MLflow writer thread: every record of the trials in MLflow before it is read
        raise SweepError(f"MLflow at {req.tracking_uri} stayed unreachable: {tracker.unwritten()} could not be "
                         f"written. Tune's experiment state in {experiment_dir} holds every trial's result and "
                         f"these records; once the store is back, `kdray sweep {req.space_path} --resume --name "
                         f"{req.name}` writes them and completes the sweep")
    timings["trials_s"] = time.time() - t0
    if space.searcher.type != "grid" and not _was_interrupted(results):
        from kdray.sweep.searcher import close_abandoned

        close_abandoned(f"sqlite:///{state_dir / 'optuna.db'}", req.name)
    if space.searcher.type != "grid" and is_remote(req.storage) and (state_dir / "optuna.db").is_file():
        storage.write_bytes(storage.join(experiment_dir, "optuna.db"), (state_dir / "optuna.db").read_bytes())

    t0 = time.time()
    run_ids = {r.data.tags.get(TAG_TRIAL): r.info.run_id for r in sweep_children(c, c.get_run(parent_id))}
    outcomes = _outcomes(results, space, max_epochs, run_ids, req.storage)
    known = {o.trial_id for o in outcomes}
    if req.resume:
        _discard_orphans(c, parent_id, known, say)
    front_cost = space.objectives[1] if space.multi_objective else None
    board = leaderboard(outcomes, front_cost)
    buf = io.StringIO()
    board.to_csv(buf, index=False)
    c.log_text(parent_id, buf.getvalue(), "leaderboard.csv")
    budget = log_budget(c, parent_id, board, list(space.choices))
    for o in outcomes:  # where each full-length student is: `kdray best --max-latency-ms` may pick any of them
        uri = checkpoint_uri(o.checkpoint, req.storage) if o.status == "completed" and o.run_id else None
        if uri:
            c.set_tag(o.run_id, "kdray.checkpoint", uri)
    interrupted = len(outcomes) < num_samples or _was_interrupted(results)
    timings["leaderboard_s"] = time.time() - t0
    # The plots (Optuna's importance etc., ~2 s) are drawn while the champion is tested and registered.
    # Their libraries are imported here first: two threads importing plotly and scikit-learn at once share
    # narwhals, and Python's import locks then raise a deadlock error in one of them.
    _import_plot_libraries()
    plots = threading.Thread(target=log_search_plots, args=(c, parent_id, req, board, say), daemon=True)
    plots.start()

    champion = None
    if interrupted:
        plots.join()
        c.set_tag(parent_id, TAG_STATUS, "interrupted")
        c.set_terminated(parent_id, "KILLED")
        say(f"sweep {req.name} was interrupted after {len(outcomes)} trials; finish it with "
            f"`kdray sweep {req.space_path} --resume --name {req.name}`")
    else:
        best = select(outcomes)
        if best is None:
            plots.join()
            c.set_tag(parent_id, TAG_STATUS, "no_champion")
            c.set_terminated(parent_id, "FAILED")
            raise SweepError("no trial ran to the end successfully, so there is no champion; see the leaderboard "
                             "in MLflow")
        registered = registered_champion(req.tracking_uri, c, parent_id, best)
        if registered is not None:  # a finished sweep resumed: its champion is registered already
            champion = registered
            say(f"the champion of sweep {req.name} was registered when it finished: {champion.model_uri}")
        elif req.register_champion:
            t0 = time.time()
            record = read_checkpoint_record(best.checkpoint)
            own = space.resolve(best.params)  # its own data set and resources: dataset.* may be searched
            test_acc = remote_test_accuracy(record, own.dataset.model_dump(mode="json"), own.resources.gpus_per_worker)
            from kdray.data import load_dataset

            raw = load_dataset(own.dataset).train  # the test split is read only for the one evaluation
            example = raw_example(raw)
            champion = register(req.tracking_uri, best, record, test_acc, sweep=req.name,
                                 model_name=space.model_name, parent_run_id=parent_id, raw_example=example)
            timings["champion_s"] = time.time() - t0
        c.set_tag(parent_id, TAG_STATUS, "completed")
    plots.join()
    if not interrupted:
        c.set_terminated(parent_id, "FINISHED")
    wall = time.time() - t_start
    for k, v in timings.items():
        c.log_metric(parent_id, f"time.{k}", v)
    c.log_metric(parent_id, "time.wall_s", wall)
    return SweepResult(req.name, parent_id, outcomes, champion, board, wall, interrupted, timings, budget)


def restore_study(req: SweepRequest, experiment_dir: str, state_dir: Path, say) -> None:
    """Where a resumed sweep's Optuna study is: the local copy if this machine has it, else the copy saved with
    Tune's last state (``optuna-snapshot.db``), else the one uploaded at the end of a run (``optuna.db``). The
    searcher Tune unpickles is pointed at it (``STUDY_URLS``), wherever the sweep was started."""
    import optuna

    from kdray.sweep.searcher import SNAPSHOT_FILE, STUDY_URLS

    local = state_dir / "optuna.db"
    if not local.exists():
        for name in (SNAPSHOT_FILE, "optuna.db"):
            remote = storage.join(experiment_dir, name)
            if remote != str(local) and storage.exists(remote):
                local.write_bytes(storage.read_bytes(remote))
                say(f"Optuna study restored from {remote}")
                break
        else:
            raise SweepError(f"sweep {req.name}'s Optuna study is neither in {local} nor saved in {experiment_dir} "
                             f"({SNAPSHOT_FILE}): the searcher cannot be restored")
    url = f"sqlite:///{local}"
    try:
        optuna.load_study(study_name=req.name, storage=url)
    except Exception as e:  # noqa: BLE001 - a copy that is not this sweep's study
        raise SweepError(f"{local} does not hold the Optuna study {req.name!r}: {e}") from None
    STUDY_URLS[req.name] = url


def registered_champion(uri: str, c: Any, parent_id: str, best: TrialOutcome) -> Champion | None:
    """The champion this sweep already registered (a finished sweep resumed), or None. Registering it again
    would add a model version for the same student."""
    import mlflow

    tags = c.get_run(parent_id).data.tags
    if tags.get("kdray.champion_run_id") != best.run_id or not tags.get("kdray.champion_version"):
        return None
    mlflow.set_tracking_uri(uri)
    try:
        return Champion(**mlflow.artifacts.load_dict(f"runs:/{parent_id}/champion.json"))
    except Exception:  # noqa: BLE001 - registered, but its summary is not readable: register no second version
        return Champion(tags.get("kdray.sweep", ""), best.run_id, best.trial_id, best.knowledge, best.val_accuracy,
                        float("nan"), tags.get("kdray.champion_model_uri", ""), tags.get("kdray.registered_model", ""),
                        tags["kdray.champion_version"], best.params, note=tags.get("kdray.champion_alias", ""))


def use_live_tracker(tuner: Any, tracker: Any) -> None:
    """The restored tuner's callbacks with this command's tracker in place of the pickled one. The tracker's own
    ``__reduce__`` already does this for sweeps it started; a ``tuner.pkl`` written before that held a plain
    copy (Ray's private ``_local_tuner``: a later Ray without it keeps the restored callbacks)."""
    from kdray.tracking.tracker import SweepTracker

    local = getattr(tuner, "_local_tuner", None)
    run_config = local.get_run_config() if local is not None else None
    if run_config is not None and run_config.callbacks:
        run_config.callbacks = [tracker if isinstance(cb, SweepTracker) else cb for cb in run_config.callbacks]


def _queue_fair_start(space: SearchSpace, num_samples: int, name: str, storage: Any, say) -> None:
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


def log_budget(c: Any, parent_id: str, board: pd.DataFrame, choices: list[str]) -> pd.DataFrame:
    """The budget each knowledge type got, as ``budget_by_type.csv`` and ``budget.<type>.*`` metrics (one batch)."""
    from kdray.sweep.fair import budget_by_type

    df = budget_by_type(board, choices)
    buf = io.StringIO()
    df.to_csv(buf, index=False)
    c.log_text(parent_id, buf.getvalue(), "budget_by_type.csv")
    log_metrics(c, parent_id, {f"budget.{metric_key(r.knowledge)}.{k}": float(getattr(r, k)) for r in df.itertuples()
                               for k in ("trials", "full_length", "epochs", "epoch_share", "best_val_accuracy")})
    return df


def space_digest(space_yaml: str) -> str:
    import hashlib

    return hashlib.sha256(space_yaml.encode()).hexdigest()[:16]


def _stored_size(sweep_file: str, fallback: int, req: SweepRequest, say) -> int:
    """The number of trials the sweep was started with (its --num-samples or grid), not today's flags; refuses
    a resume with another search space, or with this space's file edited since the sweep started."""
    if not storage.exists(sweep_file):  # a sweep started before kdray stored its size
        return fallback
    stored = json.loads(storage.read_text(sweep_file))
    if stored.get("space", req.space.name) != req.space.name:
        raise SweepError(f"sweep {req.name} was started with search space {stored['space']!r}, not "
                         f"{req.space.name!r} ({req.space_path}): resume it with its own space file")
    if stored.get("space_sha256") and stored["space_sha256"] != space_digest(req.space_yaml):
        raise SweepError(f"{req.space_path} has changed since sweep {req.name} started (a resumed sweep must search "
                         "the space its trials came from): restore the file as it was, or start a new sweep with "
                         "another --name")
    size = int(stored["num_samples"])
    if req.num_samples and req.num_samples != size:
        say(f"--num-samples {req.num_samples} ignored: sweep {req.name} was started with {size} trials")
    return size


def _warm_tracking_store(uri: str) -> None:
    try:
        client(uri).search_experiments(max_results=1)  # creates/migrates a SQLite store's schema
    except Exception:  # noqa: BLE001 - the real open reports any problem
        pass


def _was_interrupted(results) -> bool:
    """True if Tune returned before every trial ended (Ctrl+C: Tune saves its state and returns)."""
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None)
    if trials is None:  # pragma: no cover - Tune internals changed: fall back to the results themselves
        return any(r.metrics is None for r in results)
    return any(t.status not in ("TERMINATED", "ERROR") for t in trials)


def _discard_orphans(c, parent_id: str, known: set[str], say) -> None:
    """After a SIGKILL, a trial started after Tune's last state save is unknown to the restored sweep and
    was re-run under a new id; its partial MLflow run is deleted so every trial appears exactly once."""
    parent = c.get_run(parent_id)
    gone = 0
    for run in sweep_children(c, parent):
        tid = run.data.tags.get(TAG_TRIAL)
        if tid and tid not in known and run.data.tags.get("kdray.kind") == "trial":
            if run.info.status == "RUNNING":
                c.delete_run(run.info.run_id)
                gone += 1
            else:
                c.set_tag(run.info.run_id, TAG_ORPHANED, "finished after the last saved sweep state")
    if gone:
        c.set_tag(parent_id, "kdray.discarded_partial_runs", str(gone))
        say(f"removed {gone} partial trial run(s) left by the interruption (those trials were re-run)")
