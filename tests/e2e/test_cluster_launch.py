"""A sweep on the cluster users launch (issue 10, defects 1-2): a 0-CPU head, workers that join 20 s after
the sweep starts, and S3 storage (a real S3-compatible server on loopback). tests/cluster_driver.py runs it."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient
from sweep_helpers import TINY_SPACE

from kdray.tracking.store import find_sweep, sweep_children

HELPERS = Path(__file__).resolve().parents[1] / "helpers"  # the drivers run as scripts

pytestmark = pytest.mark.slow
SAMPLES, EPOCHS = 4, 30


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("launch")
    space = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
    space.update(num_samples=SAMPLES, searcher={"type": "tpe", "n_startup_trials": 4})
    space["base"]["train"]["epochs"] = EPOCHS
    path = tmp / "space.yaml"
    path.write_text(yaml.safe_dump(space))
    r = subprocess.run([sys.executable, str(HELPERS / "cluster_driver.py"), str(tmp / "summary.json"),
                        str(path)], capture_output=True, text=True, timeout=900)
    log = (tmp / "sweep.log").read_text() if (tmp / "sweep.log").exists() else ""
    assert (tmp / "summary.json").exists(), r.stdout[-3000:] + r.stderr[-5000:]
    summary = json.loads((tmp / "summary.json").read_text())
    assert r.returncode == 0, r.stderr[-5000:]
    return tmp, summary, log


def test_the_sweep_waits_for_workers_instead_of_refusing_a_0_cpu_head(launched):
    tmp, summary, log = launched
    assert summary["alive_before_workers"], log[-3000:]
    assert "waiting for workers" in log, log[:3000]
    assert summary["returncode"] == 0, log[-5000:]


def test_trials_run_in_parallel_on_the_workers_that_joined_and_a_champion_is_registered(launched):
    tmp, summary, log = launched
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    c = MlflowClient(uri)
    runs = sweep_children(c, find_sweep(c, "launch"), kind="trial")
    assert len(runs) == SAMPLES
    assert {r.data.tags["kdray.node_id"] for r in runs} <= set(summary["workers"])  # the head trains nothing
    spans = sorted((r.info.start_time, r.info.end_time) for r in runs)
    overlapping = sum(1 for a, b in zip(spans, spans[1:]) if b[0] < a[1])
    assert overlapping >= 1, spans  # more than one trial at a time once the workers are there
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model("models:/kdray-tiny@champion")
    from kdray.config import DatasetConfig
    from kdray.data import load_dataset

    test = load_dataset(DatasetConfig(name="test_blobs")).test
    with torch.no_grad():
        acc = (model(test.x).argmax(1) == test.y).float().mean().item()
    assert acc > 0.5  # three classes: a trained student, not chance


def test_everything_the_workers_write_is_in_the_bucket_and_resume_reads_it(launched):
    tmp, summary, log = launched
    keys = summary["keys_after_sweep"]
    assert any(k.startswith("runs/teachers/test_cnn1d-") and k.endswith(".pt") for k in keys), keys[:20]
    assert "runs/launch/tuner.pkl" in keys and "runs/launch/kdray_sweep.json" in keys
    assert any(k.startswith("runs/launch/") and "/checkpoint_" in k for k in keys)
    assert not (tmp / "kdray_runs" / "teachers").exists()  # no head-local teacher
    assert summary["resume_returncode"] == 0, (tmp / "resume.log").read_text()[-3000:]
    assert "champion:" in (tmp / "resume.log").read_text()


def test_an_autoscaling_cluster_is_judged_by_what_it_can_grow_to(tmp_path):
    def space(name: str, workers: int) -> Path:
        data = yaml.safe_load(yaml.safe_dump(TINY_SPACE))
        data["base"]["resources"].update(num_workers=workers, execution="train")
        (tmp_path / name).write_text(yaml.safe_dump(data))
        return tmp_path / name

    r = subprocess.run([sys.executable, str(HELPERS / "cluster_driver.py"), "ceiling",
                        str(tmp_path / "summary.json"), str(space("fits.yaml", 1)), str(space("big.yaml", 3))],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-5000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    big = summary["too_big"]
    assert big["returncode"] == 2, big
    assert "field 'base.resources.num_workers'" in big["stderr"] and "can grow to 2" in big["stderr"], big
    plan = next(line for line in summary["fits"] if " trials, " in line)
    assert "2 at a time" in plan, summary["fits"]  # from the autoscaler's maximum, not the 0 CPUs present
