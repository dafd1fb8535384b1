"""Tracking failures never cost a trial or a sweep (issue 10, defect 7).

* A real ``mlflow server`` is stopped mid-sweep and restarted on the same port and store: training goes
  on, the tracker buffers what it could not write and writes it once the server is back, every epoch of
  every trial lands in MLflow exactly once, and the sweep ends with its champion registered.
* Two ``kdray sweep`` processes on one SQLite store at the same moment: one experiment, two sweep parent
  runs, and ``@champion`` on the better of the two champions.
* The alias rule on a real SQLite store: a worse model is registered but ``@champion`` stays; a better one
  takes it.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow import MlflowClient
from multinode_driver import free_port, stop
from sweep_helpers import TINY_SPACE

from kdray.tracking.store import TAG_STATUS, TAG_TRIAL, find_sweep, sweep_children

KDRAY = Path(sys.executable).with_name("kdray")
MODEL = "kdray-tiny"


def space_file(tmp: Path, *, samples: int, epochs: int, batch_size: int = 64) -> Path:
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    space["num_samples"] = samples
    space["base"]["train"]["epochs"] = epochs
    space["base"]["train"]["batch_size"] = batch_size
    p = tmp / "space.yaml"
    p.write_text(yaml.safe_dump(space, sort_keys=False))
    return p


def mlflow_server(tmp: Path, port: int) -> subprocess.Popen:
    """``mlflow server`` on 127.0.0.1:port over the SQLite store and artifact folder in ``tmp`` (the command
    of multinode_driver.start_mlflow, with the port chosen by the caller so a restart can reuse it)."""
    proc = subprocess.Popen(
        [str(KDRAY.with_name("mlflow")), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{tmp / 'server.db'}", "--artifacts-destination", str(tmp / "artifacts")],
        stdout=open(tmp / "mlflow-server.log", "a"), stderr=subprocess.STDOUT, start_new_session=True)
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(0.25)
    stop(proc)
    raise RuntimeError("mlflow server did not start: " + (tmp / "mlflow-server.log").read_text()[-2000:])


def sweep_cmd(space: Path, name: str, uri: str, storage: Path, *extra: str) -> list[str]:
    return [str(KDRAY), "sweep", str(space), "--name", name, "--tracking-uri", uri, "--storage", str(storage), *extra]


def env() -> dict[str, str]:
    """The sweep's environment. Its own Ray temp folder: a plain ``ray.init()`` joins the latest cluster that
    ``ray start`` (or ``ray.cluster_utils``) left in /tmp/ray, and each of these sweeps starts its own Ray."""
    e = dict(os.environ, PYTHONUNBUFFERED="1", RAY_TMPDIR=tempfile.mkdtemp(prefix="kr", dir="/tmp"))
    e.pop("RAY_ADDRESS", None)
    return e


def first_epoch_logged(c: MlflowClient, name: str) -> bool:
    parent = find_sweep(c, name)
    if parent is None:
        return False
    return any(c.get_metric_history(r.info.run_id, "val_accuracy") for r in sweep_children(c, parent, kind="trial"))


@pytest.mark.slow
def test_a_tracking_server_outage_mid_sweep_loses_nothing(tmp_path):
    samples, epochs = 4, 30
    # small batches and 30 epochs: the trials train for several seconds more once the store is gone
    space = space_file(tmp_path, samples=samples, epochs=epochs, batch_size=8)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    servers = [mlflow_server(tmp_path, port)]
    sweep = None
    try:
        log = open(tmp_path / "sweep.log", "w")
        sweep = subprocess.Popen(sweep_cmd(space, "outage", uri, tmp_path / "runs", "--max-concurrent", "1"),
                                 cwd=tmp_path, stdout=log, stderr=subprocess.STDOUT, env=env())
        c = MlflowClient(uri)
        deadline = time.time() + 150
        while not first_epoch_logged(c, "outage"):
            assert sweep.poll() is None, (tmp_path / "sweep.log").read_text()[-3000:]
            assert time.time() < deadline, "no epoch reached MLflow in 150 s"
            time.sleep(0.3)
        down = time.time()
        os.killpg(servers[0].pid, signal.SIGKILL)  # the store goes away at once (a crash) while trials train
        servers[0].wait(timeout=30)
        time.sleep(8)
        servers.append(mlflow_server(tmp_path, port))  # same port, same store
        up = time.time()
        rc = sweep.wait(timeout=240)
        out = (tmp_path / "sweep.log").read_text()
        assert rc == 0, out[-4000:]
        assert f"MLflow at {uri} unreachable" in out and "buffering" in out, out[-4000:]
        assert "MLflow back: wrote" in out, out[-4000:]
        lines = out.splitlines()
        first_failure = next(i for i, line in enumerate(lines) if "unreachable" in line)
        last_trial = max(i for i, line in enumerate(lines) if "finished: val_accuracy" in line)
        assert first_failure < last_trial, "no trial went on after the tracker saw the store down:\n" + out[-4000:]
        parent = find_sweep(c, "outage")
        assert parent.info.status == "FINISHED" and parent.data.tags[TAG_STATUS] == "completed"
        children = sweep_children(c, parent, kind="trial")
        assert len({ch.data.tags[TAG_TRIAL] for ch in children}) == len(children) == samples
        during = 0
        for ch in children:
            assert ch.info.status == "FINISHED" and ch.data.tags[TAG_STATUS] == "completed", ch.data.tags
            hist = c.get_metric_history(ch.info.run_id, "val_accuracy")
            assert sorted(m.step for m in hist) == list(range(1, epochs + 1))  # every epoch, exactly once
            during += sum(down * 1000 < m.timestamp < up * 1000 for m in hist)
        # Training went on while the store was down: epochs were reported (and timestamped) in the outage.
        assert during >= 1, "no epoch was reported while the tracking server was down"
        version = c.get_model_version_by_alias(MODEL, "champion")
        assert version.tags["kdray.sweep"] == "outage"
    finally:
        if sweep is not None and sweep.poll() is None:
            sweep.kill()
            sweep.wait(timeout=30)
        for server in servers:
            stop(server)


@pytest.mark.slow
def test_b_two_concurrent_sweeps_share_one_sqlite_store(tmp_path):
    space = space_file(tmp_path, samples=2, epochs=3)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Same space and seed: sweep "one" runs the first trial of sweep "two" only, so two's champion is at
    # least as good, and better unless that first trial is two's best too.
    samples = {"one": 1, "two": 2}
    logs = {n: open(tmp_path / f"{n}.log", "w") for n in samples}
    procs = {n: subprocess.Popen(sweep_cmd(space, n, uri, tmp_path / f"runs-{n}", "--max-concurrent", "1",
                                           "--num-samples", str(samples[n])),
                                 cwd=tmp_path, stdout=logs[n], stderr=subprocess.STDOUT, env=env())
             for n in samples}
    try:
        rcs = {n: p.wait(timeout=300) for n, p in procs.items()}
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
    outs = {n: (tmp_path / f"{n}.log").read_text() for n in samples}
    for n in samples:
        assert rcs[n] == 0, f"sweep {n}:\n" + outs[n][-4000:]
    c = MlflowClient(uri)
    exps = [e for e in c.search_experiments() if e.name == "tiny"]
    assert len(exps) == 1
    parents = c.search_runs([exps[0].experiment_id], filter_string="tags.`kdray.kind` = 'sweep'")
    assert sorted(p.data.tags["kdray.sweep"] for p in parents) == ["one", "two"]
    for p in parents:
        assert p.info.status == "FINISHED" and p.data.tags[TAG_STATUS] == "completed"
        assert len(sweep_children(c, p, kind="trial")) == samples[p.data.tags["kdray.sweep"]]
    versions = {v.tags["kdray.sweep"]: float(v.tags["kdray.val_accuracy"]) for v in
                c.search_model_versions(f"name = '{MODEL}'")}
    assert set(versions) == {"one", "two"}
    champion = c.get_model_version_by_alias(MODEL, "champion")
    assert float(champion.tags["kdray.val_accuracy"]) == max(versions.values()), (versions, champion.tags)
    if versions["one"] != versions["two"]:
        assert champion.tags["kdray.sweep"] == max(versions, key=versions.get)
    # best / compare without --sweep read the newest *finished* sweep: one of these two
    newest = max(parents, key=lambda p: p.info.start_time)
    assert find_sweep(c).info.run_id == newest.info.run_id


OPENER = """
import sys, time
from pathlib import Path
from kdray.sweep.space import load_space
from kdray.tracking.tracker import SweepTracker
space_path, uri, name, flags = sys.argv[1:5]
space = load_space(space_path)
tracker = SweepTracker(uri, space.name, name, space, max_epochs=1, space_yaml=Path(space_path).read_text(), total=1,
                       quiet=True)

def step(n):  # every process passes each step together
    Path(flags, f"{name}.ready{n}").touch()
    while not Path(flags, f"go{n}").exists():
        time.sleep(0.002)

step(1)
tracker.c  # the first client of a fresh SQLite file creates its schema
step(2)
print(tracker.open())  # the experiment does not exist yet: every process creates it
"""


def test_d_sweeps_opening_one_fresh_sqlite_store_at_once_share_its_experiment(tmp_path):
    """Three drivers open a fresh SQLite store at the same instant: its schema is created once (two at once
    corrupted it for good), the experiment once, and each sweep gets its parent run."""
    space = space_file(tmp_path, samples=1, epochs=1)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    names = [f"s{i}" for i in range(3)]
    procs = [subprocess.Popen([sys.executable, "-c", OPENER, str(space), uri, n, str(tmp_path)], cwd=tmp_path,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env()) for n in names]
    deadline = time.time() + 120
    for step in (1, 2):
        while not all((tmp_path / f"{n}.ready{step}").exists() for n in names):
            assert time.time() < deadline and all(p.poll() is None for p in procs), [p.communicate() for p in procs]
            time.sleep(0.02)
        (tmp_path / f"go{step}").touch()
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0] * len(names), [o[1][-2000:] for o in outs]
    c = MlflowClient(uri)
    exps = [e for e in c.search_experiments() if e.name == "tiny"]
    assert len(exps) == 1
    parents = c.search_runs([exps[0].experiment_id], filter_string="tags.`kdray.kind` = 'sweep'")
    assert sorted(p.data.tags["kdray.sweep"] for p in parents) == names
    assert {o[0].strip() for o in outs} == {p.info.run_id for p in parents}


def _record():
    from kdray.models import model_record
    from kdray.models.zoo import Preprocess, build_model

    model = build_model("test_mlp", 3, Preprocess((16,)))
    return model_record(model, model_name="test_mlp", model_options=None, num_classes=3, dataset={"name": "test_blobs"})


def test_c_the_champion_alias_moves_only_to_a_better_model(tmp_path):
    import torch

    from kdray.tracking.champion import TrialOutcome, register

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("alias", artifact_location=(tmp_path / "artifacts").as_uri())
    record, example = _record(), torch.randn(5, 16)

    def sweep_with_champion(name: str, val: float):
        parent = c.create_run(exp, tags={"kdray.kind": "sweep", "kdray.sweep": name}).info.run_id
        child = c.create_run(exp, tags={"mlflow.parentRunId": parent}).info.run_id
        outcome = TrialOutcome("t1", child, "kd", "completed", 3, val, {}, None, 1)
        return register(uri, outcome, record, 0.5, sweep=name, model_name="alias-model", parent_run_id=parent,
                        raw_example=example)

    first = sweep_with_champion("good", 0.93)
    assert first.version == "1" and first.alias_moved
    worse = sweep_with_champion("worse", 0.91)
    assert worse.version == "2" and not worse.alias_moved  # registered, but the alias stays
    assert "@champion stays on version 1" in worse.note and "0.93" in worse.note, worse.note
    assert str(c.get_model_version_by_alias("alias-model", "champion").version) == "1"
    v2 = c.get_model_version("alias-model", "2")
    assert v2.tags["kdray.metric"] == "val_accuracy" and float(v2.tags["kdray.val_accuracy"]) == pytest.approx(0.91)
    better = sweep_with_champion("better", 0.95)
    assert better.version == "3" and better.alias_moved
    assert str(c.get_model_version_by_alias("alias-model", "champion").version) == "3"
    # a version registered by another metric (or an older kdray) is not compared: the new one takes the alias
    c.set_model_version_tag("alias-model", "3", "kdray.metric", "something_else")
    other = sweep_with_champion("other", 0.10)
    assert other.alias_moved and str(c.get_model_version_by_alias("alias-model", "champion").version) == "4"


def test_e_best_final_compare_default_to_the_newest_finished_sweep(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from kdray.tracking.store import client

    c = client(uri)
    exp = c.create_experiment("tiny")

    def parent(name: str, status: str | None, run_status: str):
        tags = {"kdray.kind": "sweep", "kdray.sweep": name, **({TAG_STATUS: status} if status else {})}
        rid = c.create_run(exp, tags=tags).info.run_id
        if run_status != "RUNNING":
            c.set_terminated(rid, run_status)
        time.sleep(0.01)  # distinct start times
        return rid

    done = parent("done", "completed", "FINISHED")
    parent("interrupted", "interrupted", "KILLED")
    parent("no-champion", "no_champion", "FAILED")
    running = parent("running", None, "RUNNING")  # another process's sweep, still going
    assert find_sweep(c).info.run_id == done
    assert find_sweep(c, "running").info.run_id == running  # by name: any sweep


BOOM_PLUGIN = '''
"""A knowledge type that fails in its first training step (a data error, say), for the sweep tests."""
import os

from kdray.knowledge import Knowledge, register_knowledge

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "imported.txt"), "a") as f:
    f.write(f"{os.getpid()}\\n")  # who imported this module


@register_knowledge("boom", "response", "raises in the first training step")
class Boom(Knowledge):
    def forward(self, z_s, z_t):
        return (z_s * 0).sum()

    def compute(self, student, teacher, target):
        if self.epoch >= 1:  # a dry run (epoch 0) passes: the error comes with the first step
            raise RuntimeError("boom: the first batch could not be read")
        return self(student.logits, teacher.logits)
'''


def test_a_trial_that_errs_before_its_first_report_keeps_its_id_and_a_finished_sweep_resumed_registers_nothing(
        tmp_path):
    """A trial that raises before it reports anything has no metrics: its outcome must still carry its Tune trial id
    (it got a mangled one, had no run id, and a resume then tagged its run orphaned). Resuming the finished sweep
    then registers no second champion version, and final/best/compare see every trial once."""
    import json
    import sys

    import yaml
    from mlflow import MlflowClient

    from kdray.tracking.store import find_sweep, sweep_children

    TAG_ORPHANED = "kdray.orphaned"
    from sweep_helpers import TINY_SPACE

    (tmp_path / "boom_kd.py").write_text(BOOM_PLUGIN)
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    space.update(num_samples=3, plugins=["boom_kd"], searcher={"type": "grid", "grid_points": 1})
    space["base"]["resources"]["max_failures"] = 0
    space["space"] = {"knowledge": {"none": {}, "kd": {}, "boom": {}}}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump(space))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "kdray", "sweep", str(tmp_path / "space.yaml"), "--name", "boom", "--storage",
           str(tmp_path / "runs"), "--tracking-uri", uri]
    first = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    c = MlflowClient(uri)
    runs = {r.data.tags["kdray.knowledge"]: r for r in sweep_children(c, find_sweep(c, "boom"), kind="trial")}
    assert runs["boom"].data.tags[TAG_STATUS] == "error" and "boom: the first batch" in runs["boom"].data.tags[
        "kdray.failure"]
    board = c.download_artifacts(find_sweep(c, "boom").info.run_id, "leaderboard.csv", str(tmp_path))
    import pandas as pd

    df = pd.read_csv(board)
    err = df[df["knowledge"] == "boom"].iloc[0]
    assert err["trial_id"] == runs["boom"].data.tags["kdray.trial_id"] and err["run_id"] == runs["boom"].info.run_id
    versions = len(c.search_model_versions("name='kdray-tiny'"))

    again = subprocess.run([*cmd, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "was registered when it finished" in again.stdout, again.stdout[-2000:]
    assert len(c.search_model_versions("name='kdray-tiny'")) == versions  # no second version of the same student
    parent = find_sweep(c, "boom")
    assert not [r.data.tags.get("mlflow.runName") for r in sweep_children(c, parent) if r.data.tags.get(TAG_ORPHANED)]
    compare = subprocess.run([sys.executable, "-m", "kdray", "compare", "--json", "--sweep", "boom",
                              "--tracking-uri", uri], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert len(json.loads(compare.stdout)["trials"]) == 3, compare.stdout[-2000:]
    # kdray final imports no module named by MLflow runs: it asks for --plugin, and nothing was imported.
    (tmp_path / "imported.txt").unlink(missing_ok=True)
    final = subprocess.run([sys.executable, "-m", "kdray", "final", "--seeds", "2", "--sweep", "boom", "--storage",
                            str(tmp_path / "runs"), "--tracking-uri", uri], cwd=tmp_path, capture_output=True,
                           text=True, timeout=300)
    assert final.returncode == 2 and "--plugin boom_kd" in final.stderr, final.stdout[-2000:] + final.stderr[-2000:]
    assert not (tmp_path / "imported.txt").exists()
    # A resume must search the space its trials came from: an edited space file is refused, before Ray starts.
    (tmp_path / "space.yaml").write_text((tmp_path / "space.yaml").read_text() + "\n# edited\n")
    edited = subprocess.run([*cmd, "--resume"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert edited.returncode == 1 and "has changed since sweep boom started" in edited.stderr, edited.stderr[-2000:]


def test_orphaned_trial_runs_are_not_counted_as_trials(tmp_path):
    """A run a resumed sweep no longer knows (it finished after the last saved state and was re-run under a new id)
    is tagged orphaned: final, best and compare read trials through sweep_children, which leaves it out."""
    import json
    import sys

    from mlflow import MlflowClient

    from kdray.tracking.store import TAG_KIND, TAG_PARENT, TAG_SWEEP, TAG_TRIAL, sweep_children

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    exp = c.create_experiment("orphans")
    parent = c.create_run(exp, run_name="s", tags={TAG_KIND: "sweep", TAG_SWEEP: "s"})
    for i, orphan in enumerate([False, True]):
        tags = {TAG_PARENT: parent.info.run_id, TAG_KIND: "trial", TAG_SWEEP: "s", TAG_TRIAL: f"t{i}",
                "kdray.knowledge": "none", TAG_STATUS: "completed", "kdray.trial_number": str(i + 1),
                "mlflow.runName": f"trial-00{i + 1}-none", **({"kdray.orphaned": "yes"} if orphan else {})}
        run = c.create_run(exp, tags=tags)
        c.log_metric(run.info.run_id, "val_accuracy", 0.5 + i * 0.1, step=1)
        c.set_terminated(run.info.run_id, "FINISHED")
    c.set_terminated(parent.info.run_id, "FINISHED")
    assert [r.data.tags[TAG_TRIAL] for r in sweep_children(c, c.get_run(parent.info.run_id), kind="trial")] == ["t0"]
    r = subprocess.run([sys.executable, "-m", "kdray", "compare", "--json", "--sweep", "s", "--tracking-uri", uri],
                       capture_output=True, text=True, timeout=120)
    trials = [t["trial"] for t in json.loads(r.stdout)["trials"]]
    assert trials == ["trial-001-none"], r.stdout[-2000:] + r.stderr[-2000:]
