"""``kdray sweep``: Ray Tune over a search space, every trial a run of the kdray training loop.

* Trials (:mod:`~kdray.sweep.trial`): a trial with one CPU worker runs the loop directly inside the Tune trial
  ("inline": no Train worker group to start, ~8 s saved per trial on these machines, FIELD-NOTES); a trial
  with several workers or GPUs drives a Ray Train ``TorchTrainer`` (DDP). ``resources.execution`` forces
  either. Train-driving trials hold only the custom ``kdray_driver`` resource, never a CPU, so a trial and
  its workers cannot deadlock on the same CPUs.
* Search (:mod:`~kdray.sweep.tuner`): Optuna (seeded TPE, define-by-run conditional space, study in SQLite
  beside the run) or a grid; ASHA stops weak trials on validation accuracy; concurrency derived from the cluster.
* Record: one MLflow writer in this driver (``SweepTracker``); at the end the leaderboard, the search plots
  (:mod:`~kdray.sweep.report`) and the champion, measured once on the test split and registered as
  ``<model>@champion``.

``run_sweep`` reads as its phases: preflight (inputs, Ray, resources) -> teacher and its shared outputs -> the
tuner (new or restored) -> the trials -> the finish (records flushed, report, champion).
"""
from __future__ import annotations

import io
import json
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from kdray import storage
from kdray.cache.served import start_servers, stop_servers
from kdray.config import RunConfig
from kdray.errors import SweepError
from kdray.storage import is_remote
from kdray.sweep.report import (
    checkpoint_uri,
    import_plot_libraries,
    leaderboard,
    log_budget,
    log_search_plots,
    trial_outcomes,
)
from kdray.sweep.request import SWEEP_FILE, SweepRequest, SweepResult, local_state_dir, space_digest
from kdray.sweep.resume import (
    align_search_state,
    discard_orphans,
    registered_champion,
    restore_study,
    stored_size,
    use_live_tracker,
    was_interrupted,
)
from kdray.sweep.space import NONE
from kdray.sweep.teacher_outputs import prepare_cache, prepare_generations, report_view_cache
from kdray.sweep.tuner import concurrency, describe_need, make_scheduler, make_search, make_trainable, new_tuner
from kdray.tracking.champion import (
    Champion,
    raw_example,
    read_checkpoint_record,
    register,
    remote_test_metrics,
    select,
)
from kdray.tracking.store import TAG_STATUS, TAG_TRIAL, client, probe, sweep_children

__all__ = ["SWEEP_FILE", "SweepError", "SweepRequest", "SweepResult", "concurrency", "local_state_dir", "run_sweep"]


@dataclass
class _Sweep:
    """What one call of :func:`run_sweep` knows, phase after phase."""

    req: SweepRequest
    say: Callable[[str], None]
    base: RunConfig
    num_samples: int
    experiment_dir: str
    execution: str = "inline"
    fixed: int | None = None  # trials at once, or None: as many as the workers present fit
    most: dict[str, float] | None = None  # what the cluster has (or can grow to); None when unknown
    state_dir: Path = Path()
    records: list = field(default_factory=list)
    refs: list = field(default_factory=list)
    cache_ref: Any = None
    generations_ref: Any = None  # seq_kd: the teacher's answers to the training prompts, made once
    view_cache: Any = None
    servers: list = field(default_factory=list)  # teacher.serve: the actors holding the teacher
    cache_stats: dict = field(default_factory=dict)  # what the one-pass teacher cache measured (logged to the run)
    tracker: Any = None
    parent_id: str = ""
    c: Any = None
    warm: Any = None  # the thread that creates a fresh MLflow store's schema while Ray starts
    timings: dict[str, float] = field(default_factory=dict)
    t_start: float = field(default_factory=time.time)

    @property
    def space(self):
        return self.req.space

    @property
    def sweep_file(self) -> str:
        return storage.join(self.experiment_dir, SWEEP_FILE)


def run_sweep(req: SweepRequest) -> SweepResult:
    """Run (or resume) a sweep to the end and register its champion."""
    sw = _preflight(req)
    try:  # from here on the teacher's actors and the per-epoch teacher-output cache hold actors and storage
        _teacher_and_outputs(sw)
        tuner = _tuner(sw)
        t0 = time.time()
        results = tuner.fit()
        if sw.view_cache is not None:
            try:
                report_view_cache(sw.view_cache, sw.c, sw.parent_id, sw.say)
            except Exception as e:  # noqa: BLE001 - a report must not fail a sweep whose trials ran
                sw.say(f"teacher-output cache: could not report its counters ({type(e).__name__}: {e})")
    finally:  # the cache's and the teacher's actors and the spill folder go with the sweep, however it ends
        if sw.view_cache is not None:
            sw.view_cache.stop()
        stop_servers(sw.servers)
        if sw.tracker is not None:
            sw.tracker.release()
    _flush(sw, results)
    sw.timings["trials_s"] = time.time() - t0
    return _finish(sw, results)


# -- preflight -----------------------------------------------------------------------------------------------
def _preflight(req: SweepRequest) -> _Sweep:
    """The sweep's size and name checked, Ray started or joined, and the trial's resources judged against what the
    cluster has or can grow to; nothing is written to MLflow yet."""
    from kdray.check import check_resources
    from kdray.ray_setup import (
        DRIVER_RESOURCE,
        autoscaler_max_resources,
        has_driver_resource,
        init_ray,
        trials_that_fit,
    )

    say = (lambda m: None) if req.quiet else (lambda m: print(f"[kdray] {m}", flush=True))
    space = req.space
    probe(req.tracking_uri)  # before Ray starts: an unreachable server stops us here
    sw = _Sweep(req, say, space.resolve({"knowledge": NONE}), req.num_samples or space.num_samples,
                storage.join(req.storage, req.name))
    if req.resume:
        if not storage.exists(storage.join(sw.experiment_dir, "tuner.pkl")):
            raise SweepError(f"no sweep named {req.name!r} to resume in {req.storage} (looked for {sw.experiment_dir})")
        sw.num_samples = stored_size(sw.sweep_file, sw.num_samples, req, say)
    elif storage.exists(sw.experiment_dir):
        raise SweepError(f"a sweep named {req.name!r} already exists in {req.storage}; use --resume to finish it "
                         f"or --name for a new one")
    elif space.searcher.type == "grid":
        sw.num_samples = len(space.grid_points())

    # A fresh MLflow SQLite store spends ~3 s creating its schema: do it while Ray starts (only the schema).
    sw.warm = threading.Thread(target=_warm_tracking_store, args=(req.tracking_uri,), daemon=True)
    sw.warm.start()
    say("starting Ray" if not req.address else f"joining the Ray cluster at {req.address}")
    res = init_ray(req.address)
    # A cluster is judged by what it can grow to (an autoscaler's node types x max workers), not by the
    # nodes present at start: a 0-CPU head with workers at min_workers: 0 is the usual shape.
    sw.most = autoscaler_max_resources() if req.address else res
    if sw.most is not None:
        check_resources(sw.base, sw.most, file=req.space_path, where="base.resources",
                        holder="the cluster can grow to" if req.address else None)
    sw.execution = sw.base.resources.resolved_execution()
    if sw.execution == "train" and not has_driver_resource():
        raise SweepError(
            f"trials that drive a TorchTrainer need the custom resource {DRIVER_RESOURCE!r} on the cluster; start "
            f"the head with `ray start --head --resources='{{\"{DRIVER_RESOURCE}\": 64}}'` (cluster.yaml does)")
    sw.fixed = req.max_concurrent or space.max_concurrent
    if not sw.fixed and sw.most is not None:
        sw.fixed = concurrency(sw.most, sw.base, sw.num_samples)
    say(f"sweep {req.name}: {sw.num_samples} trials, "
        + (f"{sw.fixed} at a time" if sw.fixed else "as many at a time as the workers present fit")
        + f" ({sw.execution} trials, {describe_need(sw.base)} each)")
    if trials_that_fit(res, sw.base.resources) < 1:
        say(f"the cluster has {res.get('CPU', 0):g} CPU / {res.get('GPU', 0):g} GPU now and one trial needs "
            f"{describe_need(sw.base)}: waiting for workers to join"
            + (" (the autoscaler adds them on demand)" if sw.most is not None and req.address else ""))
    sw.state_dir = local_state_dir(req)
    sw.state_dir.mkdir(parents=True, exist_ok=True)
    if is_remote(req.storage) and space.searcher.type != "grid":  # the study's copy beside Tune's state, kept current
        from kdray.sweep.searcher import PUBLISH_URIS, SNAPSHOT_FILE

        PUBLISH_URIS[req.name] = storage.join(sw.experiment_dir, SNAPSHOT_FILE)
    if req.resume and space.searcher.type != "grid":
        restore_study(req, sw.experiment_dir, sw.state_dir, say)
    return sw


def _warm_tracking_store(uri: str) -> None:
    try:
        client(uri).search_experiments(max_results=1)  # creates/migrates a SQLite store's schema
    except Exception:  # noqa: BLE001 - the real open reports any problem
        pass


# -- the teacher and its shared outputs ------------------------------------------------------------------------
def _teacher_and_outputs(sw: _Sweep) -> None:
    """The teacher (loaded, or trained once into the run storage, where every node and later sweeps read it) and
    the cache that shares its outputs with every trial."""
    import ray

    from kdray.teachers import teacher_records

    req, t0 = sw.req, time.time()
    sw.records = teacher_records(sw.base, req.storage, log=sw.say, progress=not req.quiet,
                                 inline=sw.execution == "inline", tracking_uri=req.tracking_uri)
    sw.timings["teacher_s"] = time.time() - t0
    sw.refs = [ray.put(r) for r in sw.records]
    t0 = time.time()
    serve = sw.base.teacher.serve if sw.base.teacher is not None else None
    if sw.records and serve is not None:  # the teacher on its own actors, its top-k served: nothing to cache
        ensemble = sw.base.teacher.ensemble.model_dump() if len(sw.records) > 1 else {}
        sw.servers = start_servers(sw.refs, ensemble, serve)
        sw.say(f"teacher: served by {serve.actors} actor(s) ({serve.cpus:g} CPU, {serve.gpus:g} GPU each), its top "
               f"{sw.base.cache.top_k} tokens per position; teacher-output cache: off (nothing for trials to load)")
    elif sw.records:
        sw.cache_ref, sw.view_cache = prepare_cache(sw.space, sw.base, sw.refs, sw.records, sw.say,
                                                    storage.join(req.storage, f"{req.name}-teacher-outputs"),
                                                    sw.cache_stats)
        sw.generations_ref = prepare_generations(sw.space, sw.base, sw.refs, sw.say)
    sw.timings["cache_s"] = time.time() - t0
    if sw.view_cache is not None and sw.view_cache.producer_gpus and sw.most is not None and not (
            req.max_concurrent or sw.space.max_concurrent):  # the producer's GPU is not the trials'
        sw.fixed = concurrency({**sw.most, "GPU": sw.most.get("GPU", 0) - sw.view_cache.producer_gpus}, sw.base,
                               sw.num_samples)
        sw.say(f"the teacher-output producer holds {sw.view_cache.producer_gpus:g} GPU: {sw.fixed} trials at a time")
    if sw.servers and serve is not None and (serve.cpus or serve.gpus) and sw.most is not None and not (
            req.max_concurrent or sw.space.max_concurrent):  # the serving actors' CPUs and GPUs are not the trials'
        held = {"CPU": serve.actors * serve.cpus, "GPU": serve.actors * serve.gpus}
        left = {**sw.most, **{k: sw.most.get(k, 0) - v for k, v in held.items()}}
        from kdray.ray_setup import trials_that_fit

        if not trials_that_fit(left, sw.base.resources):
            raise SweepError(f"{req.space_path}: teacher.serve: the teacher's actors hold {held['CPU']:g} CPU and "
                             f"{held['GPU']:g} GPU, and what the cluster has left ({left.get('CPU', 0):g} CPU, "
                             f"{left.get('GPU', 0):g} GPU) fits no trial ({describe_need(sw.base)})")
        sw.fixed = concurrency(left, sw.base, sw.num_samples)
        sw.say(f"the teacher's actors hold {held['CPU']:g} CPU and {held['GPU']:g} GPU: {sw.fixed} trials at a time")


# -- the tuner -------------------------------------------------------------------------------------------------
def _tuner(sw: _Sweep) -> Any:
    """The MLflow parent run opened, and Tune's tuner: restored for ``--resume`` (with this command's tracker), or new
    with the space's searcher and scheduler."""
    from ray import tune

    from kdray.sweep.retention import CheckpointPruner, fault_callbacks
    from kdray.sweep.searcher import ElasticLimiter
    from kdray.tracking.tracker import SweepTracker

    req, space = sw.req, sw.space
    trainable = make_trainable(space, sw.base, sw.refs, sw.cache_ref, storage.join(req.storage, f"{req.name}-train"),
                               sw.execution, sw.generations_ref, sw.servers)
    sw.tracker = SweepTracker(req.tracking_uri, space.name, req.name, space, max_epochs=space.max_epochs,
                              space_yaml=req.space_yaml, total=sw.num_samples, quiet=req.quiet).make_live()
    sw.warm.join()
    t0 = time.time()
    sw.parent_id = sw.tracker.open()
    sw.timings["mlflow_open_s"] = time.time() - t0
    sw.c = client(req.tracking_uri)
    if req.resume:
        if sw.tracker.created_parent:  # resumed into a store that has never seen this sweep
            sw.tracker.replay_history()
        from kdray.sweep.searcher import GridSearch, KdraySearch

        kind = GridSearch if space.searcher.type == "grid" else KdraySearch
        if changed := align_search_state(sw.experiment_dir, kind.__new__(kind)):
            sw.say("Tune's stored state files came from different saves (the driver was killed while it uploaded "
                   "them); aligned with its trials: " + "; ".join(changed))
        tuner = tune.Tuner.restore(sw.experiment_dir, trainable, resume_unfinished=True, resume_errored=False,
                                   restart_errored=False)
        use_live_tracker(tuner, sw.tracker)
        return tuner
    search = make_search(space, req, sw.state_dir, sw.num_samples, space.max_epochs, sw.say)
    if hasattr(search, "publish"):
        search.publish()  # the new study (and its queued fair start) is on storage before Tune saves any state
    scheduler = make_scheduler(space, space.max_epochs, sw.say)
    if not sw.fixed:  # concurrency follows the workers that join (Tune's own limit is fixed at start)
        search = ElasticLimiter(search, sw.num_samples, sw.base.resources)
    # The sweep's own size and space, for --resume (which may be run without --num-samples, or on another machine).
    storage.write_text(sw.sweep_file, json.dumps({"num_samples": sw.num_samples, "space": space.name,
                                                  "space_sha256": space_digest(req.space_yaml)}))
    callbacks = [sw.tracker, CheckpointPruner(sw.base.train.keep_checkpoints), *fault_callbacks()]
    return new_tuner(trainable, search, scheduler, callbacks, name=req.name, storage_path=req.storage,
                     num_samples=sw.num_samples, max_concurrent=sw.fixed or None, inline=sw.execution == "inline",
                     max_failures=sw.base.resources.max_failures)


# -- the finish --------------------------------------------------------------------------------------------------
def _flush(sw: _Sweep, results: Any) -> None:
    """Every record of the trials in MLflow before anything reads them back; the Optuna study tidied and (remote
    storage) uploaded beside Tune's state."""
    req = sw.req
    if not sw.tracker.flush():
        raise SweepError(f"MLflow at {req.tracking_uri} stayed unreachable: {sw.tracker.unwritten()} could not be "
                         f"written. Tune's experiment state in {sw.experiment_dir} holds every trial's result and "
                         f"these records; once the store is back, `kdray sweep {req.space_path} --resume --name "
                         f"{req.name}` writes them and completes the sweep")
    study = sw.state_dir / "optuna.db"
    if sw.space.searcher.type != "grid" and not was_interrupted(results):
        from kdray.sweep.searcher import close_abandoned

        ended = {m["trial_id"]: (None if r.error is not None else m)
                 for r in results for m in [dict(r.metrics or {})] if m.get("trial_id")}
        metric = sw.space.objectives if sw.space.multi_objective else sw.space.metric
        settled = close_abandoned(f"sqlite:///{study}", req.name, ended, metric, sw.space.max_epochs)
        if settled["told"]:
            sw.say(f"Optuna study: {settled['told']} trial(s) that ended before the interruption told their results "
                   "(the study's stored copy was older than Tune's stored state)")
    if sw.space.searcher.type != "grid" and is_remote(req.storage) and study.is_file():
        storage.write_bytes(storage.join(sw.experiment_dir, "optuna.db"), study.read_bytes())


def _finish(sw: _Sweep, results: Any) -> SweepResult:
    """Outcomes, leaderboard, budget and plots in the sweep's run, then the champion (or why there is none)."""
    req, space, c, parent_id = sw.req, sw.space, sw.c, sw.parent_id
    t0 = time.time()
    run_ids = {r.data.tags.get(TAG_TRIAL): r.info.run_id for r in sweep_children(c, c.get_run(parent_id))}
    outcomes = trial_outcomes(results, space, space.max_epochs, run_ids, req.storage)
    if req.resume:
        discard_orphans(c, parent_id, {o.trial_id for o in outcomes}, sw.say)
    board = leaderboard(outcomes, space.objectives[1] if space.multi_objective else None, space.goal)
    buf = io.StringIO()
    board.to_csv(buf, index=False)
    c.log_text(parent_id, buf.getvalue(), "leaderboard.csv")
    budget = log_budget(c, parent_id, board, list(space.choices), space.goal)
    for o in outcomes:  # where each full-length student is: `kdray best --max-latency-ms` may pick any of them
        uri = checkpoint_uri(o.checkpoint, req.storage) if o.status == "completed" and o.run_id else None
        if uri:
            c.set_tag(o.run_id, "kdray.checkpoint", uri)
    interrupted = len(outcomes) < sw.num_samples or was_interrupted(results)
    sw.timings["leaderboard_s"] = time.time() - t0
    # The plots (Optuna's importance etc., ~2 s) are drawn while the champion is tested and registered. Their
    # libraries are imported here first: two threads importing plotly and scikit-learn at once share narwhals,
    # and Python's import locks then raise a deadlock error in one of them.
    import_plot_libraries()
    plots = threading.Thread(target=log_search_plots, args=(c, parent_id, req, board, sw.say), daemon=True)
    plots.start()
    try:
        champion = None if interrupted else _champion(sw, outcomes)
    finally:
        plots.join()
    if interrupted:
        c.set_tag(parent_id, TAG_STATUS, "interrupted")
        c.set_terminated(parent_id, "KILLED")
        sw.say(f"sweep {req.name} was interrupted after {len(outcomes)} trials; finish it with "
               f"`kdray sweep {req.space_path} --resume --name {req.name}`")
    else:
        c.set_terminated(parent_id, "FINISHED")
    wall = time.time() - sw.t_start
    for k, v in sw.timings.items():
        c.log_metric(parent_id, f"time.{k}", v)
    for k, v in sw.cache_stats.items():
        c.log_metric(parent_id, f"teacher_cache.{k}", v)
    c.log_metric(parent_id, "time.wall_s", wall)
    return SweepResult(req.name, parent_id, outcomes, champion, board, wall, interrupted, sw.timings, budget)


def _champion(sw: _Sweep, outcomes: list) -> Champion | None:
    """The best full-length trial, measured once on its own test split and registered (once: a finished sweep
    resumed reads back the champion it registered)."""
    from kdray.data import load_dataset

    req, space, c, parent_id = sw.req, sw.space, sw.c, sw.parent_id
    best = select(outcomes, space.goal)
    if best is None:
        c.set_tag(parent_id, TAG_STATUS, "no_champion")
        c.set_terminated(parent_id, "FAILED")
        raise SweepError("no trial ran to the end successfully, so there is no champion; see the leaderboard in MLflow")
    champion = registered_champion(req.tracking_uri, c, parent_id, best)
    if champion is not None:  # a finished sweep resumed: its champion is registered already
        sw.say(f"the champion of sweep {req.name} was registered when it finished: {champion.model_uri}")
    elif req.register_champion:
        t0 = time.time()
        record = read_checkpoint_record(best.checkpoint)
        own = space.resolve(best.params)  # its own data set and resources: dataset.* may be searched
        test = remote_test_metrics(record, own.dataset.model_dump(mode="json"), own.resources.gpus_per_worker)
        example = raw_example(load_dataset(own.dataset).train)  # the test split is read only for the evaluation
        champion = register(req.tracking_uri, best, record, test, sweep=req.name, model_name=space.model_name,
                            parent_run_id=parent_id, raw_example=example, goal=space.goal)
        sw.timings["champion_s"] = time.time() - t0
    c.set_tag(parent_id, TAG_STATUS, "completed")
    return champion
