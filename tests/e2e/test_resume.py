"""An interrupted sweep (SIGINT, then SIGKILL of the resumed driver) finished with --resume: every trial
exactly once in MLflow, none lost, each with one value per epoch."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from sweep_helpers import TINY_SPACE

from kdray.tracking.store import TAG_STATUS, TAG_TRIAL, find_sweep, sweep_children

EPOCHS = 12
SAMPLES = 5


def sweep_cmd(tmp: Path, name: str, *extra: str) -> list[str]:
    return [sys.executable, "-u", "-m", "kdray", "sweep", str(tmp / "space.yaml"), "--name", name,
            "--storage", str(tmp / "runs"), "--tracking-uri", f"sqlite:///{tmp / 'mlflow.db'}", *extra]


def run_until(tmp: Path, env: dict, finished_wanted: int, sig: int, *extra: str) -> tuple[int, int, list[str]]:
    """Run the sweep CLI and send ``sig`` once ``finished_wanted`` trials have finished in this process."""
    proc = subprocess.Popen(sweep_cmd(tmp, "r", *extra), cwd=tmp, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env)
    finished, log = 0, []
    deadline = time.time() + 240
    for line in proc.stdout:
        log.append(line)
        if "finished: val_accuracy" in line:
            finished += 1
            if finished == finished_wanted:
                proc.send_signal(sig)
        if time.time() > deadline:
            proc.kill()
            break
    return proc.wait(timeout=120), finished, log


def test_a_sweep_interrupted_then_killed_resumes_with_every_trial_exactly_once(tmp_path):
    """SIGINT after two trials, --resume, SIGKILL of that driver after one more trial, --resume again."""
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    space["num_samples"] = SAMPLES
    space["base"]["train"]["epochs"] = EPOCHS
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)

    rc, finished, log = run_until(tmp_path, env, 2, signal.SIGINT)
    assert finished >= 2, "".join(log[-30:])
    assert rc == 130 and any("--resume --name r" in line for line in log), "".join(log[-20:])
    before = {r.data.tags[TAG_TRIAL] for r in sweep_children(c, find_sweep(c, "r"))}
    assert 2 <= len(before) < SAMPLES

    rc, finished, log = run_until(tmp_path, env, 1, signal.SIGKILL, "--resume")
    assert finished >= 1 and rc == -signal.SIGKILL, "".join(log[-30:])
    assert any("resuming sweep r" in line for line in log), "".join(log[-30:])

    r = subprocess.run(sweep_cmd(tmp_path, "r", "--resume"), cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "champion:" in r.stdout

    parent = find_sweep(c, "r")
    assert parent.info.status == "FINISHED" and parent.data.tags[TAG_STATUS] == "completed"
    children = sweep_children(c, parent, kind="trial")
    ids = [ch.data.tags[TAG_TRIAL] for ch in children]
    assert len(ids) == len(set(ids)) == SAMPLES, ids  # none lost, none twice
    assert {ch.data.tags["kdray.trial_number"] for ch in children} == {str(i) for i in range(1, SAMPLES + 1)}
    for ch in children:
        assert ch.info.status == "FINISHED" and ch.data.tags[TAG_STATUS] == "completed", (  # why, if not
            ch.data.tags.get("mlflow.runName"), ch.data.tags.get(TAG_STATUS), ch.data.tags.get("kdray.failure"),
            r.stdout[-2000:])
        steps = sorted(m.step for m in c.get_metric_history(ch.info.run_id, "val_accuracy"))
        assert steps == list(range(1, EPOCHS + 1)), (ch.data.tags["kdray.trial_number"], steps)


def test_a_driver_killed_while_the_saved_state_lags_its_checkpoints_resumes_every_trial(tmp_path):
    """The window Tune's own retention leaves: a trial's new checkpoint has registered (Tune's num_to_keep deletes
    the oldest then) while the experiment state on storage still restores it from a checkpoint two epochs older.
    The driver dies exactly there (a deterministic fault hook); the resumed sweep must restore that trial."""
    from kdray.sweep.retention import FAULT_ENV

    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    space["num_samples"] = 3
    space["base"]["train"]["epochs"] = EPOCHS
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    killed = subprocess.run(sweep_cmd(tmp_path, "lag"), cwd=tmp_path, capture_output=True, text=True,
                            env={**env, FAULT_ENV: "2"}, timeout=300)
    assert killed.returncode == 77 and "test fault: killing the driver" in killed.stdout, (
        killed.stdout[-3000:] + killed.stderr[-3000:])
    r = subprocess.run(sweep_cmd(tmp_path, "lag", "--resume"), cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    children = sweep_children(c, find_sweep(c, "lag"), kind="trial")
    assert len(children) == 3
    for ch in children:
        assert ch.data.tags[TAG_STATUS] == "completed", (ch.data.tags.get("kdray.failure"), r.stdout[-3000:])
        steps = sorted(m.step for m in c.get_metric_history(ch.info.run_id, "val_accuracy"))
        assert steps == list(range(1, EPOCHS + 1)), steps
    # Retention still holds: each trial keeps its newest train.keep_checkpoints (2), deleted behind saved state.
    kept = {d.name: sorted(x.name for x in d.glob("checkpoint_*")) for d in (tmp_path / "runs" / "lag").iterdir()
            if d.is_dir() and d.name.startswith("run_trial")}
    assert len(kept) == 3 and all(len(v) == 2 for v in kept.values()), kept


def test_a_sweep_resumed_with_another_tracking_store_writes_every_trial_there_and_nothing_to_the_old_one(tmp_path):
    """"Finish an interrupted sweep from S3 on any machine" usually means a new head and a new tracking server:
    the resuming command's store gets every trial exactly once and the champion, the first store nothing more."""
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    space["num_samples"] = 4
    space["base"]["train"]["epochs"] = 6
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    rc, finished, log = run_until(tmp_path, env, 2, signal.SIGINT)
    assert rc == 130 and finished >= 2, "".join(log[-30:])
    a = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")

    def contents(c):
        runs = sweep_children(c, find_sweep(c, "r"))
        return sorted((r.info.run_id, r.info.status, len(c.get_metric_history(r.info.run_id, "val_accuracy")),
                       tuple(sorted(r.data.tags.items()))) for r in runs)

    before = contents(a)
    b_uri = f"sqlite:///{tmp_path / 'other' / 'mlflow.db'}"
    (tmp_path / "other").mkdir()
    cmd = [b_uri if x == f"sqlite:///{tmp_path / 'mlflow.db'}" else x for x in sweep_cmd(tmp_path, "r", "--resume")]
    r = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    b = MlflowClient(b_uri)
    parent = find_sweep(b, "r")
    assert parent is not None and parent.data.tags[TAG_STATUS] == "completed"
    children = sweep_children(b, parent, kind="trial")
    assert sorted(int(ch.data.tags["kdray.trial_number"]) for ch in children) == [1, 2, 3, 4]
    for ch in children:
        assert ch.data.tags[TAG_STATUS] == "completed", (ch.data.tags.get("kdray.failure"), r.stdout[-2000:])
        steps = sorted(m.step for m in b.get_metric_history(ch.info.run_id, "val_accuracy"))
        assert steps == list(range(1, 7)), steps
    champion = b.get_model_version_by_alias("kdray-tiny", "champion")
    assert b.get_run(champion.run_id).data.tags.get("kdray.sweep") == "r"  # a run of B, logged for this sweep
    assert contents(a) == before  # the first store got nothing new


def stored_trial_statuses(experiment_uri: str) -> dict[str, str]:
    """Tune's trial statuses in the newest experiment state on storage (what ``--resume`` restores)."""
    import pyarrow.fs

    from kdray.sweep.retention import stored_state

    state = stored_state(*pyarrow.fs.FileSystem.from_uri(experiment_uri)) or {"trial_data": []}
    return {t["trial_id"]: t["status"] for t in (json.loads(tj) for tj, _ in state["trial_data"])}


def unfinished_copy(db: bytes, tmp: Path) -> bytes:
    """The study as a copy taken before any verdict looks: every finished trial RUNNING, no final values."""
    import sqlite3

    path = tmp / "lagging.db"
    path.write_bytes(db)
    with sqlite3.connect(path) as con:
        con.execute("UPDATE trials SET state = 'RUNNING', datetime_complete = NULL WHERE state = 'COMPLETE'")
        con.execute("DELETE FROM trial_values")
    con.close()
    return path.read_bytes()


def copy_states(db: bytes, tmp: Path) -> dict[str, str]:
    """Tune trial id -> state of each trial in a stored copy of the study."""
    import sqlite3

    path = tmp / "copy.db"
    path.write_bytes(db)
    with sqlite3.connect(path) as con:
        rows = con.execute("SELECT a.value_json, t.state FROM trials t JOIN trial_user_attributes a "
                           "ON a.trial_id = t.trial_id WHERE a.key = 'kdray.trial_id'").fetchall()
    con.close()
    return {json.loads(v): state for v, state in rows}


def test_a_sweep_on_s3_killed_then_resumed_in_a_fresh_working_directory_keeps_its_optuna_study(tmp_path, monkeypatch):
    """The Optuna study lives beside the driver (SQLite in the working directory when storage is remote) and is
    uploaded as Tune saves its state; a resume on another machine (here: the first folder deleted) after a SIGKILL
    restores the searcher from the uploaded copy and finishes with every trial told to one study.

    A copy uploaded with Tune's state folder could lag that state: Tune uploads its files one by one in a background
    thread while its next save rewrites them, so a trial Tune's stored state holds as finished (and will not run
    again) was RUNNING (CI: ['COMPLETE', 'FAIL', 'COMPLETE', 'COMPLETE']) or WAITING in the copy. The driver is killed
    once the stored state holds a finished trial; the copy must know every trial of that state (kdray uploads it at
    every ask and tell). Then the copy is replaced by one from before every verdict (a failed upload): the end of the
    sweep settles it from Tune's results. (Tune's own three state files can lag each other too: see the test below.)"""
    import shutil

    import optuna
    from cluster_driver import BUCKET, start_s3

    from kdray import storage as kstorage

    for k, v in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    s3, endpoint = start_s3(tmp_path)
    storage = f"s3://{BUCKET}/runs?endpoint_override=127.0.0.1:{endpoint.rsplit(':', 1)[1]}&scheme=http"
    experiment = kstorage.join(storage, "s3r")
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    space["num_samples"] = 4
    space["base"]["train"]["epochs"] = 6
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    cmd = [sys.executable, "-u", "-m", "kdray", "sweep", str(tmp_path / "space.yaml"), "--name", "s3r", "--storage",
           storage, "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    first, second = tmp_path / "machine-1", tmp_path / "machine-2"
    first.mkdir(), second.mkdir()
    try:
        proc = subprocess.Popen(cmd, cwd=first, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        finished, log, stored = 0, [], {}
        for line in proc.stdout:
            log.append(line)
            finished += "finished: val_accuracy" in line
            stored = stored_trial_statuses(experiment) if finished else {}
            if "TERMINATED" in stored.values() and finished < 4:
                proc.kill()
                break
        assert proc.wait(timeout=60) == -signal.SIGKILL, "".join(log[-30:])
        shutil.rmtree(first)  # another machine: nothing of the first driver's folder is left
        # The stored copy is never older than Tune's stored state: it knows every trial, and each Tune finished.
        snapshot = kstorage.join(experiment, "optuna-snapshot.db")
        stored, copy = stored_trial_statuses(experiment), copy_states(kstorage.read_bytes(snapshot), tmp_path)
        assert set(stored) <= set(copy), (stored, copy)
        assert all(copy[t] in ("COMPLETE", "PRUNED", "FAIL") for t, s in stored.items() if s == "TERMINATED"), (
            stored, copy)
        # The end of the sweep still settles a copy that lags (an upload that failed while the storage was down).
        kstorage.write_bytes(snapshot, unfinished_copy(kstorage.read_bytes(snapshot), tmp_path))
        r = subprocess.run([*cmd, "--resume"], cwd=second, capture_output=True, text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    finally:
        s3.terminate()
        s3.wait(10)
    study = optuna.load_study(study_name="s3r", storage=f"sqlite:///{second / 'kdray_runs' / 's3r' / 'optuna.db'}")
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    trials = sweep_children(c, find_sweep(c, "s3r"), kind="trial")
    ids = [ch.data.tags[TAG_TRIAL] for ch in trials]
    assert len(ids) == 4, (ids, r.stdout[-3000:])
    assert_study_holds(study, ids, 6)  # every trial told, once
    ran = {(s["knowledge"], s["train.lr"]) for s in (json.loads(ch.data.tags["kdray.searched"]) for ch in trials)}
    told = {(t.params["knowledge"], t.params["train.lr"]) for t in study.trials
            if t.state.name == "COMPLETE" and t.user_attrs["kdray.trial_id"] in ids}
    assert len(ran) == 4 and told == ran  # the study holds exactly the trials the sweep ran
    # Tune's own verdicts agree with Optuna's: the values told after the resume are the trials' final results.
    last = {ch.data.tags[TAG_TRIAL]: max(c.get_metric_history(ch.info.run_id, "val_accuracy"), key=lambda m: m.step)
            for ch in trials}
    final = {tid: m.value for tid, m in last.items()}
    assert {t.user_attrs["kdray.trial_id"]: t.value for t in study.trials if t.user_attrs["kdray.trial_id"] in ids} \
        == pytest.approx(final)


def assert_study_holds(study, ids: list[str], epochs: int) -> None:
    """Each trial of the sweep (``ids``: MLflow's) told once, COMPLETE; any other Optuna trial is one a killed driver
    started after Tune's last stored save, which the resumed Tune replaced: FAIL and marked abandoned if it had run
    in part, COMPLETE with its final value if it had run to its end before the kill (a finished trial stays so)."""
    tids = [t.user_attrs.get("kdray.trial_id") for t in study.trials]
    assert len(tids) == len(set(tids)), tids  # no Tune trial told to two Optuna trials
    assert sorted(t for t, st in zip(tids, study.trials) if t in ids and st.state.name == "COMPLETE") == sorted(ids), (
        [(t.number, t.state.name, t.user_attrs) for t in study.trials], ids)
    for t in study.trials:
        if t.user_attrs.get("kdray.trial_id") in ids:
            continue
        values = t.intermediate_values
        if t.state.name == "COMPLETE":
            assert sorted(values) == list(range(1, epochs + 1)) and t.value == values[epochs], (t.number, values)
        else:
            assert t.state.name == "FAIL" and values and "kdray.abandoned" in t.user_attrs, (
                t.number, t.state.name, t.user_attrs, values)


def state_versions(experiment: Path, proc: subprocess.Popen, until) -> dict[str, list[bytes]]:
    """Every version of Tune's three state files the sweep writes to ``experiment``, oldest first, until
    ``until(newest)`` holds; then the driver is killed (SIGKILL). Tune uploads the three files separately, so
    a driver killed mid-upload leaves any mix of these versions on storage."""
    import ray.cloudpickle as cloudpickle

    readers = {"experiment_state-*.json": json.loads, "search_gen_state-*.json": cloudpickle.loads,
               "searcher-state-*.pkl": cloudpickle.loads}
    versions: dict[str, list[bytes]] = {k: [] for k in readers}
    deadline = time.time() + 240
    while proc.poll() is None and time.time() < deadline:
        for pattern, read in readers.items():
            for f in experiment.glob(pattern):
                try:
                    data = f.read_bytes()
                    read(data)
                except Exception:  # noqa: BLE001 - mid-write: the next poll reads it whole
                    continue
                if not versions[pattern] or versions[pattern][-1] != data:
                    versions[pattern].append(data)
        if all(versions.values()) and until({k: readers[k](v[-1]) for k, v in versions.items()}):
            proc.kill()
            break
        time.sleep(0.05)
    return versions


@pytest.mark.parametrize("behind", ["search-state", "trials"])
def test_a_driver_killed_between_the_uploads_of_its_state_files_resumes_to_exactly_num_samples_trials(tmp_path,
                                                                                                       behind):
    """Tune saves its trials (experiment_state), its trial counter and concurrency slots (search_gen_state) and the
    searcher (searcher-state) as three files and uploads them one by one, so a SIGKILL can leave them from different
    saves. Restored as they are, a counter one save behind ran a fifth trial of four, numbered like another (and its
    Optuna trial told COMPLETE besides); a counter one ahead ended the sweep a trial short. The resume aligns them
    with the trials Tune restores: four trials, each once in MLflow and in the study."""
    import optuna
    import ray.cloudpickle as cloudpickle

    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    space["num_samples"] = 4
    space["base"]["train"]["epochs"] = EPOCHS
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(sweep_cmd(tmp_path, "r"), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=env)

    def statuses(exp: dict) -> list[str]:
        return [json.loads(tj)["status"] for tj, _ in exp["trial_data"]]

    def consistent_with_a_finished_trial(newest: dict) -> bool:
        exp, gen = newest["experiment_state-*.json"], newest["search_gen_state-*.json"]
        s = statuses(exp)
        return len(s) >= 3 and gen["counter"] == len(s) and "TERMINATED" in s and set(s) != {"TERMINATED"}

    folder = tmp_path / "runs" / "r"
    versions = state_versions(folder, proc, consistent_with_a_finished_trial)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    n = len(statuses(json.loads(versions["experiment_state-*.json"][-1])))
    if behind == "search-state":  # the counter and the searcher as of a save with fewer trials
        gen = [v for v in versions["search_gen_state-*.json"] if cloudpickle.loads(v)["counter"] < n][-1]
        searcher = [v for v in versions["searcher-state-*.pkl"] if len(cloudpickle.loads(v)["_ot_trials"]) < n][-1]
        next(folder.glob("search_gen_state-*.json")).write_bytes(gen)
        next(folder.glob("searcher-state-*.pkl")).write_bytes(searcher)
    else:  # the trials as of a save before the newest trial was created
        exp = [v for v in versions["experiment_state-*.json"] if len(statuses(json.loads(v))) < n][-1]
        next(folder.glob("experiment_state-*.json")).write_bytes(exp)

    r = subprocess.run(sweep_cmd(tmp_path, "r", "--resume"), cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=180)  # the slots of the killed driver's trials once hung the resume here
    assert r.returncode == 0 and "champion:" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = find_sweep(c, "r")
    assert parent.data.tags[TAG_STATUS] == "completed", r.stdout[-3000:]
    children = sweep_children(c, parent, kind="trial")
    ids = sorted(ch.data.tags[TAG_TRIAL] for ch in children)
    assert len(ids) == len(set(ids)) == 4, (ids, r.stdout[-3000:])
    assert sorted(int(ch.data.tags["kdray.trial_number"]) for ch in children) == [1, 2, 3, 4], r.stdout[-3000:]
    for ch in children:
        assert ch.data.tags[TAG_STATUS] == "completed", (ch.data.tags.get("kdray.failure"), r.stdout[-3000:])
        steps = sorted(m.step for m in c.get_metric_history(ch.info.run_id, "val_accuracy"))
        assert steps == list(range(1, EPOCHS + 1)), steps
    study = optuna.load_study(study_name="r", storage=f"sqlite:///{folder / 'optuna.db'}")
    assert_study_holds(study, ids, EPOCHS)
