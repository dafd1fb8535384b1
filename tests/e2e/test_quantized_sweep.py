"""An int8 student on the accuracy–latency front, as users run it: a sweep searches ``student.quantize`` (float or
int8) for a wide MLP distilled from a CNN teacher; each trial logs the latency of the model it delivers (the int8
model's, for the quantised one), and ``kdray best --max-latency-ms`` with a budget between the two picks the int8
student, registers it (TorchScript: torch.export has no rule for packed int8 weights) and exports it; the exported
TorchScript file, loaded alone, has the test accuracy kdray reported for it."""
from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch
import yaml
from mlflow.tracking import MlflowClient
from sweep_helpers import request

from kdray.config import DatasetConfig
from kdray.data import load_dataset
from kdray.models import save_model
from kdray.tracking.store import TAG_STATUS, find_sweep, sweep_children

WIDE = {"hidden": [2048, 2048]}  # batch-1 latency dominated by reading the weights: int8 reads a quarter of them


@pytest.mark.ray
@pytest.mark.slow
def test_only_the_int8_student_meets_a_latency_budget_and_its_export_has_the_reported_accuracy(
        tmp_path, ray_cluster, mnist1d_teacher):
    from kdray.sweep.runner import run_sweep

    save_model(mnist1d_teacher, tmp_path / "teacher.pt")
    space = {
        "name": "int8", "metric": "val_accuracy", "seed": 0, "searcher": {"type": "grid"},
        "base": {"dataset": {"name": "mnist1d"}, "teacher": {"checkpoint": str(tmp_path / "teacher.pt")},
                 "student": {"name": "mlp", "options": WIDE},
                 "train": {"epochs": 2, "batch_size": 128, "lr": 0.001}},
        "space": {"knowledge": {"kd": {}}, "student.quantize": {"type": "categorical", "choices": [None, "int8"]}},
    }
    path = tmp_path / "int8.yaml"
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    run_sweep(request(tmp_path, path, "int8"))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    c = MlflowClient(uri)
    trials = [t for t in sweep_children(c, find_sweep(c, "int8"), kind="trial")
              if t.data.tags.get(TAG_STATUS) == "completed"]
    # the grid's two students, each distilled (kd) and, as every sweep adds, trained on labels alone (none)
    int8 = [t for t in trials if t.data.params["student.quantize"] == "int8"]
    floats = [t for t in trials if t.data.params["student.quantize"] == ""]
    assert len(trials) == 4 and len(int8) == len(floats) == 2
    fast = max(t.data.metrics["latency_ms"] for t in int8)
    slow = min(t.data.metrics["latency_ms"] for t in floats)
    assert fast < slow / 1.5, (fast, slow)  # the premise: int8 reads a quarter of the bytes per forward
    budget = math.sqrt(fast * slow)
    p = subprocess.run([sys.executable, "-m", "kdray", "best", "--sweep", "int8", "--max-latency-ms", f"{budget:.6f}",
                        "--json", "--tracking-uri", uri, "--export", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    info = json.loads(p.stdout)
    assert "Warning" not in p.stderr and "WARNING" not in p.stderr, p.stderr  # nothing for the user to act on
    best = max(int8, key=lambda t: t.data.metrics["val_accuracy"])
    assert info["run_id"] == best.info.run_id and info["candidates"] == 2  # only the int8 students fit
    scripted = torch.jit.load(info["exported"]["torchscript"])
    test = load_dataset(DatasetConfig(name="mnist1d")).test
    with torch.no_grad():
        accuracy = (scripted(test.x).argmax(1) == test.y).double().mean().item()
    assert accuracy == pytest.approx(info["test_accuracy"], abs=1e-12)
    assert info["test_accuracy"] > 0.3  # ten classes: it learned from the teacher
