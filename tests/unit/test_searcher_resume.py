"""The searcher's side of a resume whose stored files came from different saves (``resume.align_search_state``):
a real Optuna study in SQLite, the searcher's state through its own ``save``/``restore``, Tune's files as Tune
writes them (JSON trials, a cloudpickled search-generator state)."""
from __future__ import annotations

import json

import optuna
import ray.cloudpickle as cloudpickle

from kdray.sweep.resume import align_search_state
from kdray.sweep.searcher import (
    STUDY_URLS,
    TUNE_ID_ATTR,
    GridSearch,
    KdraySearch,
    StudyStorage,
    close_abandoned,
    make_sampler,
)


def space(trial: optuna.Trial) -> None:
    trial.suggest_float("train.lr", 1e-3, 1e-1, log=True)
    trial.suggest_categorical("knowledge", ["none", "kd"])


def searcher(tmp_path, name: str = "s") -> KdraySearch:
    return KdraySearch(space=space, metric="val_accuracy", mode="max", sampler=make_sampler("random", 0, 1),
                       study_name=name, storage=StudyStorage(f"sqlite:///{tmp_path / 'optuna.db'}", name),
                       max_epochs=3)


def restored(search: KdraySearch, tmp_path) -> KdraySearch:
    """The searcher as Tune restores it: its pickled state, into a bare instance (as ``align_search_state`` does)."""
    search.save(str(tmp_path / "searcher.pkl"))
    STUDY_URLS[search._study_name] = f"sqlite:///{tmp_path / 'optuna.db'}"
    out = KdraySearch.__new__(KdraySearch)
    out.restore(str(tmp_path / "searcher.pkl"))
    return out


def test_an_optuna_trial_asked_but_never_run_goes_to_the_next_trial_and_one_that_ran_in_part_is_marked_fail(tmp_path):
    s = searcher(tmp_path)
    first = s.suggest("t1")
    s.on_trial_result("t1", {"val_accuracy": 0.5, "training_iteration": 1})
    s.suggest("t2")  # started: it reported a value before the driver was killed
    s.on_trial_result("t2", {"val_accuracy": 0.4, "training_iteration": 1})
    asked = s.suggest("t3")  # asked, never started
    # Tune's stored trials: t1 only (t2 and t3 came after its last stored save)
    r = restored(s, tmp_path)
    notes = r.align({"t1": "RUNNING"})
    assert set(r._ot_trials) == {"t1"} and len(r.orphans) == 1, notes
    assert r.suggest("t4") == asked  # t3's Optuna trial, its parameters, now Tune's t4
    fresh = r.suggest("t5")
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert len(study.trials) == 4  # t1, t2, t3 (=t4), t5
    assert [t.user_attrs[TUNE_ID_ATTR] for t in study.trials] == ["t1", "t2", "t4", "t5"]
    assert fresh == study.trials[3].params and first == study.trials[0].params
    done = {"val_accuracy": 0.9, "epoch": 3, "training_iteration": 3}
    for t in ("t1", "t4", "t5"):
        r.on_trial_complete(t, done)
    settled = close_abandoned(f"sqlite:///{tmp_path / 'optuna.db'}", "s", {"t1": done, "t4": done, "t5": done},
                              "val_accuracy", 3)
    assert settled == {"told": 0, "abandoned": 1}
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "FAIL", "COMPLETE", "COMPLETE"]
    assert "killed" in study.trials[1].user_attrs["kdray.abandoned"]


def test_a_searcher_saved_before_a_trial_tune_restores_finds_that_trial_in_the_study(tmp_path):
    s = searcher(tmp_path)
    s.suggest("t1")
    s.save(str(tmp_path / "old.pkl"))  # the searcher file one save behind
    s.suggest("t2")
    STUDY_URLS["s"] = f"sqlite:///{tmp_path / 'optuna.db'}"
    r = KdraySearch.__new__(KdraySearch)
    r.restore(str(tmp_path / "old.pkl"))
    assert set(r._ot_trials) == {"t1"}
    r.align({"t1": "TERMINATED", "t2": "RUNNING"})
    assert r._ot_trials["t2"].number == 1 and r.orphans == []
    r.on_trial_complete("t2", {"val_accuracy": 0.7, "epoch": 3})
    study = optuna.load_study(study_name="s", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert study.trials[1].state.name == "COMPLETE" and study.trials[1].value == 0.7


def tune_files(folder, trials: dict[str, str], counter: int, live: set[str]) -> None:
    """Tune's experiment state and search-generator state as its ``save_to_dir`` writes them (trials as JSON
    strings; the generator's state with its wrappers' under ``name:<class>``, cloudpickled)."""
    trial_data = [[json.dumps({"trial_id": t, "status": s}), "{}"] for t, s in trials.items()]
    (folder / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps({"trial_data": trial_data}))
    (folder / "search_gen_state-2026-01-01_00-00-00.json").write_bytes(cloudpickle.dumps(
        {"counter": counter, "total_samples": 4, "finished": False, "experiment": None,
         "name:ConcurrencyLimiter": {"max_concurrent": 2, "live_trials": set(live), "batch": False}}))


def test_the_counter_and_the_slots_follow_the_trials_tune_restores(tmp_path):
    grid = GridSearch([{"x": i} for i in range(4)], "val_accuracy", "max")
    grid.next = 2  # one save behind the trials below
    grid.save(str(tmp_path / "searcher-state-2026-01-01_00-00-00.pkl"))
    tune_files(tmp_path, {"a": "TERMINATED", "b": "TERMINATED", "c": "RUNNING"}, counter=2, live={"a", "b"})
    changes = align_search_state(str(tmp_path), GridSearch.__new__(GridSearch))
    assert changes == ["trial counter 2 -> 3", "ConcurrencyLimiter slots 2 -> 1", "grid: next point 2 -> 3"]
    gen = cloudpickle.loads((tmp_path / "search_gen_state-2026-01-01_00-00-00.json").read_bytes())
    assert gen["counter"] == 3 and gen["name:ConcurrencyLimiter"]["live_trials"] == {"c"}
    again = GridSearch.__new__(GridSearch)
    again.restore(str(tmp_path / "searcher-state-2026-01-01_00-00-00.pkl"))
    assert again.suggest("d") == {"x": 3}
    assert align_search_state(str(tmp_path), GridSearch.__new__(GridSearch)) == []  # agreeing files: untouched


def test_the_aligned_state_is_written_under_the_newest_trials_session_and_a_missing_one_is_said(tmp_path):
    """Tune reads the file whose name sorts last: an aligned copy of an older session's search state goes under the
    session of the trials it was aligned with (an older copy in Tune's staging folder then cannot win). With no search
    state stored at all (a driver killed during its first save) nothing can be aligned, and the change list says so."""
    tune_files(tmp_path, {"a": "TERMINATED", "b": "RUNNING"}, counter=2, live={"b"})
    old = tmp_path / "search_gen_state-2026-01-01_00-00-00.json"
    old.rename(tmp_path / "search_gen_state-2025-12-31_00-00-00.json")
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").rename(
        tmp_path / "experiment_state-2026-01-02_00-00-00.json")
    grid = GridSearch([{"x": i} for i in range(4)], "val_accuracy", "max")
    grid.next = 2
    grid.save(str(tmp_path / "searcher-state-2025-12-31_00-00-00.pkl"))
    assert align_search_state(str(tmp_path), GridSearch.__new__(GridSearch)) == []  # they agree: nothing changed
    assert sorted(p.name for p in tmp_path.glob("search*")) == [
        "search_gen_state-2025-12-31_00-00-00.json", "search_gen_state-2026-01-02_00-00-00.json",
        "searcher-state-2025-12-31_00-00-00.pkl", "searcher-state-2026-01-02_00-00-00.pkl"]
    for f in tmp_path.glob("search*"):
        f.unlink()
    said = align_search_state(str(tmp_path), GridSearch.__new__(GridSearch))
    assert len(said) == 1 and "no search_gen_state or searcher-state was stored with the 2 trials" in said[0]
