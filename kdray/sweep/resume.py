"""What ``--resume`` needs: the sweep's size and space checked, the Optuna study found, the resuming command's
tracker in place of the pickled one, the champion not registered twice, orphaned runs sorted out."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from kdray import storage
from kdray.errors import SweepError
from kdray.sweep.request import SweepRequest, space_digest
from kdray.tracking.champion import Champion, TrialOutcome
from kdray.tracking.store import TAG_ORPHANED, TAG_TRIAL, sweep_children


def stored_size(sweep_file: str, fallback: int, req: SweepRequest, say) -> int:
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


def restore_study(req: SweepRequest, experiment_dir: str, state_dir: Path, say) -> None:
    """Where a resumed sweep's Optuna study is: the local copy if this machine has it, else the copy uploaded at its
    last ask or tell (``optuna-snapshot.db``), else the one uploaded at the end of a run (``optuna.db``). The
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


def was_interrupted(results) -> bool:
    """True if Tune returned before every trial ended (Ctrl+C: Tune saves its state and returns)."""
    trials = getattr(getattr(results, "_experiment_analysis", None), "trials", None)
    if trials is None:  # pragma: no cover - Tune internals changed: fall back to the results themselves
        return any(r.metrics is None for r in results)
    return any(t.status not in ("TERMINATED", "ERROR") for t in trials)


def discard_orphans(c, parent_id: str, known: set[str], say) -> None:
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


UNFINISHED = frozenset({"PENDING", "RUNNING", "PAUSED"})  # the Tune trials a resume runs again (resume_unfinished)


def align_search_state(experiment_dir: str, searcher: Any) -> list[str]:
    """Tune's stored search state made to agree with the trials it restores, before ``Tuner.restore`` reads it;
    returns what was changed (nothing when the files agree).

    Tune saves a sweep as separate files: its trials (``experiment_state``), its trial counter and concurrency slots
    (``search_gen_state``) and the searcher (``searcher-state``), and uploads them with pyarrow's multi-threaded
    ``copy_files`` (``train/_internal/storage.py``) while its next save may rewrite them. A driver killed in between
    leaves them from different saves, and restored as they were: a counter behind ran one trial more than the sweep
    has, numbered like another; a counter ahead ended the sweep a trial short, for good; concurrency slots
    (``ConcurrencyLimiter.live_trials``) held by trials Tune no longer runs never freed, and the resume hung. The
    trials are the truth (Tune restores them); the counter, the slots and the searcher's map (``searcher.align``)
    are set from them, and written under the session name of the newest trials' file, so they are what Tune reads
    (it takes the name that sorts last: ``tune/utils/util.py`` ``_load_newest_checkpoint``), also where its staging
    folder keeps an older copy. ``searcher`` is a bare instance of the sweep's searcher class.

    A driver killed during its very first save can leave trials with no search state stored: Tune then starts its
    search again from the pickled tuner, which this cannot repair; the change list says so."""
    import os
    import tempfile

    import ray.cloudpickle as cloudpickle

    state_file = storage.newest(experiment_dir, "experiment_state-*.json")
    if state_file is None:
        return []
    trials = {t["trial_id"]: t["status"] for t in (json.loads(tj) for tj, _ in
                                                   json.loads(storage.read_bytes(state_file))["trial_data"])}
    live = {t for t, status in trials.items() if status in UNFINISHED}
    session = Path(state_file.partition("?")[0]).name[len("experiment_state-"):-len(".json")]
    changes: list[str] = []
    gen_file = storage.newest(experiment_dir, "search_gen_state-*.json")
    searcher_file = storage.newest(experiment_dir, "searcher-state-*.pkl")
    missing = [n for n, f in (("search_gen_state", gen_file), ("searcher-state", searcher_file)) if f is None]
    if missing and trials:
        changes.append(f"no {' or '.join(missing)} was stored with the {len(trials)} trials (the driver was killed "
                       "during its first save): Tune starts that part of the search again, and the sweep may run "
                       "more trials than it was started with")
    if gen_file is not None:
        target = storage.join(experiment_dir, f"search_gen_state-{session}.json")
        gen = cloudpickle.loads(storage.read_bytes(gen_file))
        if gen["counter"] != len(trials):
            changes.append(f"trial counter {gen['counter']} -> {len(trials)}")
            gen["counter"], gen["finished"] = len(trials), False  # a searcher that has finished says so again
        for name, wrapper in gen.items():
            if name.startswith("name:") and isinstance(wrapper, dict) and "live_trials" in wrapper \
                    and set(wrapper["live_trials"]) != live:
                changes.append(f"{name[5:]} slots {len(wrapper['live_trials'])} -> {len(live)}")
                wrapper["live_trials"] = set(live)
        if changes or gen_file != target:
            storage.write_bytes(target, cloudpickle.dumps(gen))
    if searcher_file is not None:
        target = storage.join(experiment_dir, f"searcher-state-{session}.pkl")
        fd, tmp = tempfile.mkstemp(suffix=".pkl")
        os.close(fd)
        try:
            with open(tmp, "wb") as f:
                f.write(storage.read_bytes(searcher_file))
            searcher.restore(tmp)
            fixed = searcher.align(trials)
            changes.extend(fixed)
            if fixed or searcher_file != target:
                searcher.save(tmp)
                with open(tmp, "rb") as f:
                    storage.write_bytes(target, f.read())
        finally:
            os.remove(tmp)
    return changes
