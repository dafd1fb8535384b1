"""Bring your own (issue 11), as a user starts it: a project folder with the user's model classes in a module
that is neither installed nor on PYTHONPATH, a table of their data, and their production model registered in
MLflow. `kdray distill` and `kdray sweep` run as commands, each starting its own Ray: every trial trains on
2 gloo workers that only know the plugin through Ray's runtime environment, exactly as on a cluster."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytestmark = pytest.mark.slow

PLUGIN = textwrap.dedent('''
    """A user's own models: a tabular student and the production model that will teach it."""
    import torch
    from torch import nn

    from kdray.models import register_model, set_layout


    class TabularNet(nn.Module):
        """What users train on tables: BatchNorm and dropout between linear blocks."""

        def __init__(self, num_classes, input_shape, hidden=32, dropout=0.1):
            super().__init__()
            d = int(torch.tensor(input_shape).prod())
            self.block1 = nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Dropout(dropout))
            self.block2 = nn.Sequential(nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
            self.head = nn.Linear(hidden, num_classes)
            set_layout(self, ["block1", "block2"], "block2")

        def forward(self, x):
            return self.head(self.block2(self.block1(x.flatten(1))))


    register_model("user_tabnet", "user", (8,), "a user's own tabular network (BatchNorm, dropout)")(TabularNet)


    class ProductionNet(nn.Module):
        """The model in production: it standardises raw rows itself and returns logits."""

        def __init__(self, mean, std, num_classes, hidden=64):
            super().__init__()
            self.register_buffer("mean", torch.as_tensor(mean, dtype=torch.float32))
            self.register_buffer("std", torch.as_tensor(std, dtype=torch.float32))
            self.net = nn.Sequential(nn.Linear(len(mean), hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                     nn.Linear(hidden, num_classes))

        def forward(self, x):
            return self.net((x - self.mean) / self.std)
''')


def _table(path: Path) -> None:
    import pandas as pd
    from sklearn.datasets import make_classification

    x, y = make_classification(n_samples=900, n_features=8, n_informative=6, n_redundant=0, n_classes=3,
                               class_sep=1.5, random_state=3)
    x = x * np.array([1, 10, 100, 0.1, 1, 5, 50, 2]) + 7.0  # raw units, far from standardised
    df = pd.DataFrame(x.astype(np.float32), columns=[f"f{i}" for i in range(8)])
    df["outcome"] = np.array(["churn", "stay", "upgrade"])[y]
    df.to_parquet(path)


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """The user's folder (plugin, data, configs) and their production model registered in MLflow."""
    import mlflow
    from mlflow.models import infer_signature

    root = tmp_path_factory.mktemp("byo")
    proj = root / "project"
    proj.mkdir()
    (proj / "user_models.py").write_text(PLUGIN)
    _table(proj / "data.parquet")
    uri = f"sqlite:///{root / 'mlflow.db'}"

    # The user trained their production model long ago, outside kdray, on raw rows (the whole file here).
    sys.path.insert(0, str(proj))
    try:
        import user_models
    finally:
        sys.path.remove(str(proj))
    import pandas as pd

    df = pd.read_parquet(proj / "data.parquet")
    x = torch.tensor(df[[f"f{i}" for i in range(8)]].to_numpy())
    y = torch.tensor(pd.Categorical(df["outcome"], categories=sorted(df["outcome"].unique())).codes.astype(np.int64))
    torch.manual_seed(0)
    net = user_models.ProductionNet(x.mean(0), x.std(0), 3)
    opt = torch.optim.Adam(net.parameters(), lr=0.01)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        teacher_acc = (net(x).argmax(1) == y).float().mean().item()
    from kdray.tracking.store import artifact_location

    mlflow.set_tracking_uri(uri)
    mlflow.MlflowClient(uri).create_experiment("production", artifact_location=artifact_location(uri))  # not ./mlruns
    mlflow.set_experiment("production")
    with mlflow.start_run():
        sig = infer_signature(x[:5].numpy(), net(x[:5]).detach().numpy())
        # MLflow 3's default format (torch.export): the teacher's workers never unpickle the user's code
        info = mlflow.pytorch.log_model(net, name="model", signature=sig, input_example=x[:5].numpy(),
                                        pip_requirements=["torch"], registered_model_name="churn-model")
    mlflow.MlflowClient(uri).set_registered_model_alias("churn-model", "production", info.registered_model_version)

    base = {
        "plugins": ["user_models"],
        "dataset": {"name": "table", "path": str(proj / "data.parquet"), "label": "outcome"},
        "teacher": {"mlflow": "models:/churn-model@production"},
        "student": {"name": "user_tabnet", "options": {"hidden": 16}},
        "train": {"epochs": 4, "batch_size": 64, "lr": 0.01},
        "resources": {"num_workers": 2, "cpus_per_worker": 1},
    }
    (proj / "distill.yaml").write_text(yaml.safe_dump({**base, "name": "byo", "knowledge": [{"type": "kd"}]}))
    (proj / "space.yaml").write_text(yaml.safe_dump({
        "plugins": ["user_models"], "name": "byo-space", "num_samples": 3, "seed": 0,
        # trials on one worker each, inside the trial (a Ray actor that also only gets the plugin from the runtime
        # environment): a 2-worker group per trial costs ~15 s of start-up here; the distillation above uses 2
        "base": {**base, "train": {**base["train"], "epochs": 2}, "resources": {"num_workers": 1,
                                                                                "cpus_per_worker": 1}},
        "scheduler": {"type": "fifo"}, "searcher": {"type": "tpe", "n_startup_trials": 3},
        "space": {"knowledge": {"none": {}, "kd": {"kd.temperature": {"type": "float", "low": 1.0, "high": 8.0}}}},
    }))
    return root, proj, uri, teacher_acc


def _kdray(args: list[str], cwd: Path, uri: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the plugin is only in the project folder
    env["MLFLOW_TRACKING_URI"] = uri
    kdray = str(Path(sys.executable).with_name("kdray"))
    return subprocess.run([kdray, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_a_users_model_class_distils_from_their_mlflow_model_on_2_workers(project):
    root, proj, uri, teacher_acc = project
    # Started from the folder above the project: the plugin is found next to the config, and the Ray workers
    # (which never see that folder on their path) get it from the runtime environment.
    r = _kdray(["distill", "project/distill.yaml", "--storage", str(root / "runs"), "--test", "--json"], root, uri)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "2 worker(s)" in r.stdout and "models:/churn-model@production" in r.stdout
    summary = json.loads(r.stdout.strip().splitlines()[-1])
    assert summary["test_accuracy"] > 0.6  # three classes: chance is 1/3
    from kdray.models import load_record

    record = load_record(summary["student"])
    assert record["model"] == "user_tabnet" and record["config"]["plugins"] == ["user_models"]


def test_a_sweep_over_a_plugin_student_registers_a_champion_that_loads_back(project):
    import mlflow

    root, proj, uri, _ = project
    r = _kdray(["sweep", "project/space.yaml", "--storage", str(root / "runs"), "--tracking-uri", uri, "--quiet"],
               root, uri)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    assert "champion:" in r.stdout
    mlflow.set_tracking_uri(uri)
    model = mlflow.pytorch.load_model("models:/kdray-byo-space@champion")  # exported: no plugin needed to serve it
    from kdray.config import DatasetConfig
    from kdray.data import load_dataset

    test = load_dataset(DatasetConfig.model_validate({"name": "table", "path": str(proj / "data.parquet"),
                                                      "label": "outcome"})).test
    with torch.no_grad():
        acc = (model(test.x).argmax(1) == test.y).float().mean().item()
    assert acc > 0.6
