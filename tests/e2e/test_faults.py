"""The fault suite: bad input fails fast and cleanly; failures at run time never lose or corrupt records."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import psutil
import pytest
import yaml
from sweep_helpers import TINY_SPACE

BLOBS_RUN = {"dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"}, "train": {"epochs": 2}}


def space(**over):
    data = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    for path, value in over.items():
        cur = data
        keys = path.split("/")
        for k in keys[:-1]:
            cur = cur.setdefault(k, {})
        if value is DELETE:
            cur.pop(keys[-1], None)
        else:
            cur[keys[-1]] = value
    return data


DELETE = object()
KD = "space/knowledge/kd"

# (command, file content, field named in the message); a None field means a syntax-level error (line named).
CASES = {
    "yaml-syntax": ("sweep", "name: x\nbase: {dataset: [unclosed\n", None),
    "empty-file": ("sweep", "", None),
    "not-a-mapping": ("distill", "- a\n- b\n", None),
    "unknown-top-key": ("sweep", space(nmae="x"), "nmae"),
    "wrong-type": ("sweep", space(num_samples="many"), "num_samples"),
    "zero-temperature": ("distill", {**BLOBS_RUN, "teacher": {"checkpoint": "t.pt"},
                                     "knowledge": [{"type": "kd", "temperature": 0}]}, "knowledge.0.temperature"),
    "negative-temperature-range": ("sweep", space(**{f"{KD}/kd.temperature": {"type": "float", "low": -1.0, "high": 4.0,
                                                                             "log": True}}),
                                                                                 "space.knowledge.kd.kd.temperature"),
    "low-above-high": ("sweep", space(**{"space/train.lr": {"type": "float", "low": 0.1, "high": 0.01}}),
                       "space.train.lr"),
    "empty-choices": ("sweep", space(**{f"{KD}/kd.temperature": {"type": "categorical", "choices": []}}),
                      "space.knowledge.kd.kd.temperature"),
    "unknown-knowledge-type": ("sweep", space(**{"space/knowledge/kdd": {}}), "space.knowledge.kdd"),
    "unknown-knowledge-param": ("sweep", space(**{f"{KD}/kd.tempreture": 3.0}), "space.knowledge.kd"),
    "unknown-model": ("sweep", space(**{"base/student": {"name": "resnet21"}}), "base.student.name"),
    "unknown-dataset": ("distill", {**BLOBS_RUN, "dataset": {"name": "mnist2d"}}, "dataset.name"),
    "hint-layer-absent": ("sweep", space(**{"space/knowledge/fitnet": {"fitnet.student_layer": "block9"}}),
                          "space.knowledge.fitnet.fitnet.student_layer"),
    "model-cannot-take-inputs": ("distill", {**BLOBS_RUN, "student": {"name": "resnet20"}}, "student.name"),
    "at-layers-do-not-pair": ("distill", {**BLOBS_RUN, "teacher": {"checkpoint": "t.pt"}, "knowledge": [
        {"type": "at", "teacher_layers": ["block1", "block2"], "student_layers": ["block1"]}]}, "knowledge.0"),
    "workers-exceed-machine": ("sweep", space(**{"base/resources/num_workers": 64}), "base.resources.num_workers"),
    "gpus-exceed-machine": ("distill", {**BLOBS_RUN, "resources": {"gpus_per_worker": 1}}, "resources.gpus_per_worker"),
    "fractional-gpus-above-one": ("distill", {**BLOBS_RUN, "resources": {"gpus_per_worker": 1.5}},
                                  "resources.gpus_per_worker"),
    "teacher-checkpoint-and-train": ("distill", {**BLOBS_RUN, "teacher": {"checkpoint": "t.pt", "train": {
        "model": {"name": "test_cnn1d"}}}, "knowledge": [{"type": "kd"}]}, "teacher"),
}


def ray_processes_since(t0: float) -> list[str]:
    """Ray's daemons started since ``t0`` from this environment (their paths are in it): another checkout's tests on
    the same machine start their own, which say nothing of the command under test."""
    out = []
    for p in psutil.process_iter(["name", "create_time", "cmdline"]):
        try:
            cmd = " ".join(p.info["cmdline"] or [])
            if p.info["create_time"] >= t0 and ("raylet" in cmd or "gcs_server" in cmd) and sys.prefix in cmd:
                out.append(cmd[:80])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_malformed_input_exits_fast_naming_file_and_field_without_ray_or_mlflow(tmp_path, case, blobs_teacher_file):
    command, content, field = CASES[case]
    if isinstance(content, dict) and content.get("teacher", {}).get("checkpoint") == "t.pt":
        content["teacher"]["checkpoint"] = str(blobs_teacher_file)
    path = tmp_path / f"{case}.yaml"
    path.write_text(content if isinstance(content, str) else yaml.safe_dump(content))
    db = tmp_path / "mlflow.db"
    t0 = time.time()
    args = [sys.executable, "-m", "kdray", command, str(path), "--storage", str(tmp_path / "runs")]
    if command == "sweep":
        args += ["--tracking-uri", f"sqlite:///{db}"]
    r = subprocess.run(args, capture_output=True, text=True, timeout=60, cwd=tmp_path,
                       env=dict(os.environ, PYTHONUNBUFFERED="1"))
    elapsed = time.time() - t0
    assert r.returncode == 2, (r.stdout[-2000:], r.stderr[-2000:])
    assert elapsed < 30, f"took {elapsed:.0f} s"
    assert str(path) in r.stderr
    if field is None:
        assert "YAML" in r.stderr or "empty" in r.stderr or "mapping" in r.stderr
    else:
        assert f"field '{field}" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    assert "starting Ray" not in r.stdout and not ray_processes_since(t0)
    assert not db.exists() and not (tmp_path / "mlruns").exists(), "MLflow was written"
    assert not (tmp_path / "runs").exists(), "run state was written"


def test_an_unreachable_tracking_server_stops_the_sweep_before_any_trial(tmp_path):
    p = tmp_path / "space.yaml"
    p.write_text(yaml.safe_dump(TINY_SPACE))
    with socket.socket() as s:  # a free port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "kdray", "sweep", str(p), "--tracking-uri", f"http://127.0.0.1:{port}",
                        "--storage", str(tmp_path / "runs")], capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 1 and "unreachable" in r.stderr and f"127.0.0.1:{port}" in r.stderr
    assert time.time() - t0 < 30 and "starting Ray" not in r.stdout and not ray_processes_since(t0)
    assert not (tmp_path / "runs").exists()


@pytest.mark.ray
def test_a_nan_trial_fails_with_its_reason_while_the_sweep_continues(ray_cluster, tmp_path):
    from mlflow import MlflowClient
    from sweep_helpers import request

    from kdray.sweep.runner import run_sweep
    from kdray.tracking.store import find_sweep, sweep_children

    # Two objectives: Tune ends a sweep on a result that lacks one of the searcher's metrics, a failure report
    # included (it once lacked latency_ms). The fair start runs none, then kd.
    data = space(**{"objectives": ["val_accuracy", "latency_ms"], "space": {"knowledge": {
        "none": {}, "kd": {"kd.temperature": 2.0, "train.optimizer": "sgd", "train.lr": 1.0e12, "train.momentum": 0.0,
                           "train.scheduler": "none"}}}})
    p = tmp_path / "nan.yaml"
    p.write_text(yaml.safe_dump(data))
    result = run_sweep(request(tmp_path, p, "nan"))
    c = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = {r.data.tags["kdray.knowledge"]: r for r in sweep_children(c, find_sweep(c, "nan"), kind="trial")}
    assert runs["kd"].info.status == "FAILED" and runs["kd"].data.tags["kdray.status"] == "failed"
    assert "non-finite" in runs["kd"].data.tags["kdray.failure"]
    assert runs["none"].info.status == "FINISHED" and runs["none"].data.tags["kdray.status"] == "completed"
    assert result.champion is not None and result.champion.knowledge == "none"


@pytest.mark.ray
def test_a_train_worker_killed_mid_epoch_resumes_from_its_checkpoint(ray_cluster, tmp_path, blobs_teacher):
    import torch
    from fault_hooks import KillOnce

    from kdray.config import RunConfig
    from kdray.train.loop import STUDENT_FILE, train_run
    from kdray.train.runner import final_student, fit
    from kdray.train.session import Session

    cfg = RunConfig.model_validate({"dataset": {"name": "test_blobs"}, "student": {"name": "test_mlp"},
                                    "teacher": {"checkpoint": "t.pt"}, "knowledge": [{"type": "kd"}],
                                    "train": {"epochs": 5, "batch_size": 32, "lr": 0.01},
                                    "resources": {"num_workers": 1, "max_failures": 2}})
    marker = tmp_path / "killed"
    result = fit(cfg, [blobs_teacher], storage_path=str(tmp_path), name="kill", progress=False,
                 extra={"step_hook": KillOnce(3, 5, marker)})  # SIGKILL in epoch 3, at step 5
    assert marker.exists(), "the worker was not killed"
    # Resumed from the last checkpoint Train had registered (epoch 1 or 2: the epoch-2 report may still be in
    # flight when the kill comes milliseconds later), never from scratch.
    assert result.metrics["epoch"] == 5 and 1 <= result.metrics["resumed_from_epoch"] <= 2
    reference = Session(checkpoint_root=tmp_path / "ref")
    train_run({"run": cfg.model_dump(mode="json"), "teacher_records": [blobs_teacher]}, reference)
    a = final_student(result)["state_dict"]
    b = torch.load(reference.last_checkpoint / STUDENT_FILE, weights_only=True)["state_dict"]
    for k in a:  # resuming from epoch 2 lost nothing: the same weights as an uninterrupted run
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
